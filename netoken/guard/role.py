"""The guard as netoken/roles.py lists it: status, counters, events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import layout, program, tc
from ..config import Config, ConfigError
from ..datapath import u32
from ..entries import PROTECT_HALF
from ..libbpf import Map
from ..program import ProgramRole
from ..state import RoleState
from .hooks import xdp_attached
from .pinned import apply, attach_pinned, detach_pinned
from .program import ROLE_NAME, Guard, GuardEvent, check, read_key_stats


def _protect_ids_from_lpm(paths: list[str], base: int) -> list[int]:
    """Entry indices the live LPM tries (pinned at PATHS) point at: what is
    protected, when the metadata that names it is gone."""
    ids: set[int] = set()
    for path in paths:
        with Map.from_pinned(path) as m:
            for k in list(m.keys()):
                raw = m.lookup(k)
                if raw:
                    r = layout.NtPortRules.from_bytes(raw)
                    ids.update(
                        r.rules[j].policy - base for j in range(min(r.count, layout.MAX_PORT_RULES))
                    )
    return sorted(i for i in ids if 0 <= i < PROTECT_HALF)


class GuardRole(ProgramRole):
    """The guard as netoken/roles.py lists it (see program.ProgramRole)."""

    name = ROLE_NAME
    PROGRAM = Guard
    RUNS = "XDP"  # "filter" for a guard at TC (see attachment())

    RATE_LIMITED = True

    def check(self, cfg: Config) -> None:
        check(cfg)

    def check_apply(self, cfg: Config) -> None:
        if cfg.guard is None:
            raise ConfigError(
                cfg.path,
                None,
                "no [guard] section, but a guard is attached here; add one, "
                "or stop guarding first with `netoken guard detach IFACE`",
            )
        check(cfg)

    def attach(self, ifname: str, cfg: Config, **opts: Any) -> dict[str, Any]:
        return attach_pinned(ifname, cfg, **opts)

    def apply(self, ifname: str, cfg: Config, now: float | None = None) -> dict[str, Any]:
        return apply(ifname, cfg)

    def detach(self, ifname: str) -> dict[str, Any]:
        return detach_pinned(ifname)

    def meta(self, st: RoleState) -> dict[str, Any]:
        # The config is described once for the namespace, unless this guard
        # still runs on maps of its own (pinned before maps were shared).
        own = st.read_meta() or {}
        if st.has_pin("nt_guard_config"):
            return own
        return {**(Guard.shared_state(st).read_meta() or {}), **own}

    def attachment(
        self, idx: int | None, meta: dict[str, Any]
    ) -> tuple[int | None, dict[str, Any]]:
        why = {
            "selected": "auto" if meta.get("hook_requested", "auto") == "auto" else "forced",
            "reason": meta.get("hook_reason"),
            "link": meta.get("link", "ethernet"),
        }
        hook = meta.get("hook")
        if hook is None and idx is not None:
            # No metadata to say (a ghost, or a guard from before hooks):
            # netoken's place at TC first, else XDP.
            hook = "tc" if tc.query(idx, "ingress") is not None else "xdp"
        if hook == "tc":
            return tc.query(idx, "ingress") if idx is not None else None, {
                "type": "tc",
                "qdisc": "clsact",
                "hook": "ingress",
                "handle": tc.HANDLE,
                "priority": tc.PRIORITY,
                "mode": "direct-action",
                "runs": "filter",
                **why,
            }
        live = xdp_attached(idx) if idx is not None else None
        return live[0] if live else None, {
            "type": "xdp",
            "mode": live[1] if live else None,
            "requested": meta.get("xdp_mode") or "auto",
            **why,
        }

    def status_details(self, st: RoleState, meta: dict[str, Any], d: dict[str, Any]) -> None:
        cfgv = self.pinned_config(st)
        d["option"] = {"kind": cfgv.kind, "exid": cfgv.exid}
        override = (
            layout.GUARD_ACTIONS[cfgv.action] if cfgv.action < len(layout.GUARD_ACTIONS) else "drop"
        )
        d["action"] = None  # filled in below, from the entries
        d["action_override"] = override if override != "entry" else None
        d["skew"] = cfgv.skew
        d["fragments"] = (
            layout.GUARD_FRAGMENTS_MODES[cfgv.fragments]
            if cfgv.fragments < len(layout.GUARD_FRAGMENTS_MODES)
            else "drop"
        )
        with Map.from_pinned(self.map_path(st, "nt_replay")) as m:
            d["replay_cache"] = {"entries": m.max_entries}
        d["events"] = {"rate": cfgv.event_rate, "burst": cfgv.event_burst, "per": "cpu"}

        d["keys"] = program.live_keys(self.map_path(st, "nt_keys"), meta)

        # What each entry accepts and does comes from the live half of
        # nt_protect; only destinations and ports come from the metadata.
        base = (cfgv.generation & 1) * PROTECT_HALF
        described = meta.get("guard", {}).get("protect")
        ids = (
            range(len(described))
            if described is not None
            else _protect_ids_from_lpm(
                [self.map_path(st, n) for n in ("nt_dst_v4", "nt_dst_v6")], base
            )
        )
        tokens: dict[int, int] = {}
        with Map.from_pinned(self.map_path(st, "nt_static")) as m:
            for k in list(m.keys()):
                sk = layout.NtStaticKey.from_bytes(k)
                tokens[sk.protect - base] = tokens.get(sk.protect - base, 0) + 1
        protect = []
        with Map.from_pinned(self.map_path(st, "nt_protect")) as m:
            for i in ids:
                raw = m.lookup(u32(base + i))
                p = layout.NtProtect.from_bytes(raw) if raw else layout.NtProtect()
                act = d["action_override"] or (
                    "monitor" if p.action == layout.GUARD_ACTION["monitor"] else "drop"
                )
                info = described[i] if described is not None else {}
                protect.append(
                    {
                        "id": i + 1,  # as config errors name it: guard.protect #N
                        "destinations": info.get("destinations"),
                        "ports": info.get("ports"),
                        "keys": [
                            kid
                            for kid in range(layout.MAX_KEYS)
                            if (p.keys[kid // 64] >> (kid % 64)) & 1
                        ],
                        "tokens": tokens.get(i, 0),
                        "action": act,
                    }
                )
        d["protect"] = protect
        d["config_action"] = meta.get("guard", {}).get("action")
        actions = {p["action"] for p in protect}
        d["action"] = d["action_override"] or (actions.pop() if len(actions) == 1 else "per entry")

    def stats_extra(self, st: RoleState) -> dict[str, Any]:
        """Per key id: SYNs whose option named it, verified (ok) or not (bad)."""
        with Map.from_pinned(st.pin("nt_key_stats")) as m:
            ks = read_key_stats(m)
        return {"keys": [{"id": kid, **v} for kid, v in sorted(ks.items())]}

    def suppressed_events(self, st: RoleState) -> int:
        """Events the in-kernel rate limit withheld (the SYNs were still counted)."""
        return self.stats(st)["events_suppressed"]

    def event_fields(self, st: RoleState) -> Callable[[GuardEvent], dict[str, Any]]:
        def fields(e: GuardEvent) -> dict[str, Any]:
            d: dict[str, Any] = {
                "verdict": e.verdict,
                "action": e.action,
                "protect": e.protect + 1,
                "family": e.family,
                "saddr": e.saddr,
                "sport": e.sport,
                "daddr": e.daddr,
                "dport": e.dport,
                "mode": e.mode or None,
                "key_id": e.key_id,
                "epoch": e.epoch,
            }
            if e.mode == "mac":
                d.update(nonce=e.nonce.hex(), tag=e.tag.hex())
            return d

        return fields


ROLE = GuardRole()
