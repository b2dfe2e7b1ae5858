"""Library API of the marker: load the TC program, fill its maps, attach it.

Everything the CLI's `mark` verbs do goes through here, so tests and other
programs get the same behaviour as operators.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import config as nconfig
from . import layout, program, schedule, tc
from .config import Config, Policy
from .datapath import SynEvent, add_keys, sync_keys, sync_map, u32
from .entries import POLICY_HALF, marker_config_value, marker_entries, policy_value
from .errors import MarkerError
from .libbpf import Map, TcFilter
from .program import ListeningRing, PinnedProgram, ProgramRole
from .state import RoleState

ROLE_NAME = "marker"
PROG_NAME = "netoken_mark"
# The object for each link layer (links.Link.framing): one source, compiled
# with -DNT_L3 for devices whose packets start at the IP header (Makefile).
OBJECTS = {"ethernet": "marker", "l3": "marker_l3"}
MAPS = (
    "nt_config",
    "nt_keys",
    "nt_policies",
    "nt_dst_v4",
    "nt_dst_v6",
    "nt_mark_stats",
    "nt_mark_events",
)


@dataclass(frozen=True)
class MarkEvent(SynEvent):
    """One marked SYN, as the ring buffer reports it."""

    policy: int
    epoch: int
    mode: str
    key_id: int
    reason: str
    room_from_ts: bool = False  # the Timestamps option was removed to make room

    @classmethod
    def from_bytes(cls, data: bytes) -> MarkEvent:
        e = layout.NtMarkEvent.from_bytes(data)
        mac = e.mode == layout.MODE_MAC
        return cls(
            **SynEvent.flow(e),
            nonce=bytes(e.nonce) if mac else b"",
            tag=bytes(e.tag[: layout.TAG_LEN]) if mac else bytes(e.tag),
            policy=e.policy,
            epoch=e.epoch,
            mode="mac" if mac else "static",
            key_id=e.key_id,
            reason=layout.MARK_REASONS[e.reason],
            room_from_ts=bool(e.room_from_ts),
        )


class Marker(PinnedProgram):
    """The marker: netoken_mark on a tc egress hook, and its maps (see PinnedProgram)."""

    ROLE = ROLE_NAME
    OBJECT = "marker"
    PROG_NAME = PROG_NAME
    MAPS = MAPS
    Error = MarkerError
    VERB = "mark"
    CONFIG_MAP = "nt_config"
    CONFIG_STRUCT = layout.NtConfig
    STATS_MAP = "nt_mark_stats"
    REASONS = layout.MARK_REASONS
    EVENTS_MAP = "nt_mark_events"
    EVENT = MarkEvent

    policies: tuple[Policy, ...] = ()  # what configure() last wrote

    @classmethod
    def load(cls, reuse: Mapping[str, Map] | None = None, framing: str = "ethernet") -> Marker:
        """Load a new program.  Maps named in REUSE are shared instead of
        created, which is how a replacement program keeps the live policies
        and counters of the one it replaces.  FRAMING is the link layer of
        the device it will run on (links.Link.framing): "l3" loads the
        object whose packets start at the IP header."""
        if framing not in OBJECTS:
            raise MarkerError(f"framing must be 'ethernet' or 'l3', got {framing!r}")
        m = cls._load_object(reuse, object_name=OBJECTS[framing])
        m.framing = framing
        return m

    def configure(self, cfg: Config, now: float | None = None) -> None:
        """Make the maps hold exactly CFG: keys, policies, prefixes, option,
        with each policy marking with the key its schedule has in use at NOW
        (Unix time; default the current time).

        Safe on a live, attached marker: every SYN sees either the old or the
        new policy for its destination, never none (see entries.py).
        """
        # A new generation: its low bit picks the half written now, and the
        # program's destination cache forgets what it looked up before.
        gen = self._config().generation + 1 & 0xFFFFFFFF
        base = (gen & 1) * POLICY_HALF
        entries = marker_entries(cfg, base)
        in_use = cfg.marking_keys(time.time() if now is None else now)
        add_keys(self.maps["nt_keys"], cfg.keys)
        for i, policy in enumerate(cfg.policies):
            self.maps["nt_policies"].update(
                u32(base + i), policy_value(policy, i, in_use.get(policy.name))
            )
        sync_map(self.maps["nt_dst_v4"], entries.v4)
        sync_map(self.maps["nt_dst_v6"], entries.v6)
        self.maps["nt_config"].update(u32(0), marker_config_value(cfg.option, gen))
        sync_keys(self.maps["nt_keys"], cfg.keys)
        self.policies = cfg.policies

    def attach(self, ifname: str) -> TcFilter:
        """Attach on IFNAME's egress, replacing only netoken's own filter."""
        idx = self.check_device(ifname)
        tc.ensure_clsact(idx)
        return tc.attach(idx, "egress", self.prog.fd)

    def events(self, callback: Callable[[MarkEvent], object]) -> ListeningRing:
        """A ring buffer that calls CALLBACK(MarkEvent) per marked SYN."""
        return super().events(callback)


def check(cfg: Config) -> None:
    """Reject, as a ConfigError, what the marker's maps could not hold; run
    before anything is loaded so a bad config never half-applies."""
    marker_entries(cfg)


def detach(ifname: str) -> bool:
    """Remove netoken's marker filter from IFNAME's egress; False if none was there."""
    idx = Marker.ifindex(ifname)
    if tc.query(idx, "egress") is None:
        return False
    tc.detach(idx, "egress")
    return True


def _policy_meta(p: Policy) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": p.name,
        "destinations": [str(n) for n in p.destinations],
        "ports": [r.lo if r.lo == r.hi else str(r) for r in p.ports],
        "mode": p.mode,
    }
    if p.mode == "mac":
        d["keys"] = list(p.keys)
    return d


def _config_meta(cfg: Config) -> dict[str, Any]:
    return {**program.config_meta(cfg), "policies": [_policy_meta(p) for p in cfg.policies]}


def attach_pinned(ifname: str, cfg: Config) -> dict[str, Any]:
    """Load, configure, pin and attach the marker on IFNAME's egress.

    With a marker already pinned there, this is an atomic replace: the new
    program reuses the pinned maps (counters and policies carry over), the
    maps get the new config while the old program still runs, and one tc
    replace swaps the programs, so no SYN goes through unmarked.  On any
    failure what this call created is removed and the previous filter, if
    any, is put back.
    """
    check(cfg)
    with Marker.attaching(ifname) as t:
        idx, old_meta = t.idx, t.old_meta
        prev_prog_id = tc.query(idx, "egress")
        if old_meta and old_meta.get("config"):
            # The shared maps already hold the new config: give the old
            # program its own back if that config still loads.
            t.restore_old = lambda old: old.configure(nconfig.load(old_meta["config"]))
        t.new = new = Marker.load(reuse=t.old.maps if t.old else None, framing=t.framing)
        new.configure(cfg)
        new.pin(t.st)
        owned = tc.netoken_created_clsact(ifname, idx, old_meta)
        created_clsact = tc.ensure_clsact(idx)
        if created_clsact:
            t.on_failure(lambda: tc.destroy_clsact_if_empty(ifname, idx))
        filt = tc.attach(idx, "egress", new.prog.fd)
        t.on_failure(lambda: tc.restore(idx, "egress", prev_prog_id))
        t.commit(
            {
                "tc": {"hook": "egress", "handle": tc.HANDLE, "priority": tc.PRIORITY},
                "created_clsact": created_clsact or owned,
                "link": t.framing,
            },
            _config_meta(cfg),
        )
    return t.result(
        handle=filt.handle,
        priority=filt.priority,
        replaced_prog_id=prev_prog_id,
        created_clsact=created_clsact,
        link=t.framing,
        pinned=str(t.st.pin_dir),
        policies=len(cfg.policies),
        keys=sorted(cfg.keys),
    )


def apply(ifname: str, cfg: Config, now: float | None = None) -> dict[str, Any]:
    """Make the live, pinned maps of IFNAME's marker hold CFG, with the key
    schedule as of NOW (default: the current time); no reattach."""
    check(cfg)
    now = time.time() if now is None else now
    with Marker.updating(ifname) as (m, meta, st):
        m.configure(cfg, now)
        prog_id = m.prog.id
        before = {p.get("name") for p in meta.get("policies", [])}
        meta.update(_config_meta(cfg))
    after = {p.name for p in cfg.policies}
    return {
        "ifname": st.ifname,
        "role": ROLE_NAME,
        "prog_id": prog_id,
        "policies": len(cfg.policies),
        "keys": sorted(cfg.keys),
        "added": sorted(after - before),
        "removed": sorted(before - after),
        "schedule": schedule.plan(cfg, now),
    }


def detach_pinned(ifname: str) -> dict[str, Any]:
    """Remove netoken's marker filter and pins from IFNAME.

    The clsact qdisc goes only if netoken created it and no other filter is
    left on either of its hooks.  IFNAME may be the name the marker was
    attached under: the state is found by ifindex, whatever the interface
    is called now.  An interface that is gone has taken its filters with it;
    its pins are still cleaned up.
    """
    with Marker.removing(ifname) as r:
        idx, meta, name = r.idx, r.meta, r.ifname
        prog_id = None
        if idx is not None:
            prog_id = tc.query(idx, "egress")
            if prog_id is None and not r.has_state:
                raise MarkerError(f"no netoken marker on {name}")
            if prog_id is not None:
                tc.detach(idx, "egress")
        clsact = "kept"
        if idx is not None and tc.netoken_created_clsact(name, idx, meta):
            clsact = tc.destroy_clsact_if_empty(name, idx)
    return {
        "ifname": name,
        "ifindex": r.st.ifindex,
        "attached_as": (meta or {}).get("ifname"),
        "role": ROLE_NAME,
        "removed_prog_id": prog_id,
        "interface_present": idx is not None,
        "clsact": clsact,
    }


# --------------------------------------------------------------------------
# the marker as a role of the generic status / stats / monitor views


class MarkerRole(ProgramRole):
    """The marker as netoken/roles.py lists it (see program.ProgramRole)."""

    name = ROLE_NAME
    PROGRAM = Marker
    RUNS = "filter"

    def check(self, cfg: Config) -> None:
        check(cfg)

    def attach(self, ifname: str, cfg: Config, **opts: Any) -> dict[str, Any]:
        return attach_pinned(ifname, cfg, **opts)

    def apply(self, ifname: str, cfg: Config, now: float | None = None) -> dict[str, Any]:
        return apply(ifname, cfg, now)

    def detach(self, ifname: str) -> dict[str, Any]:
        return detach_pinned(ifname)

    def attachment(
        self, idx: int | None, meta: dict[str, Any]
    ) -> tuple[int | None, dict[str, Any]]:
        live = tc.query(idx, "egress") if idx is not None else None
        return live, {
            "type": "tc",
            "qdisc": "clsact",
            "hook": "egress",
            "handle": tc.HANDLE,
            "priority": tc.PRIORITY,
            "mode": "direct-action",
        }

    def status_details(self, st: RoleState, meta: dict[str, Any], d: dict[str, Any]) -> None:
        d["created_clsact"] = meta.get("created_clsact")
        d["link"] = meta.get("link", "ethernet")
        cfgv = self.pinned_config(st)
        d["option"] = {"kind": cfgv.kind, "exid": cfgv.exid, "make_room": bool(cfgv.make_room)}
        d["keys"] = program.live_keys(self.map_path(st, "nt_keys"), meta)
        d["policies"] = [dict(p) for p in meta.get("policies", [])]
        # The key each policy marks with is a fact of the live half of
        # nt_policies; the schedule that says what it should be comes from
        # the metadata.
        base = (cfgv.generation & 1) * POLICY_HALF
        with Map.from_pinned(self.map_path(st, "nt_policies")) as m:
            for i, p in enumerate(d["policies"]):
                raw = m.lookup(u32(base + i))
                if p.get("mode") == "mac" and raw:
                    p["key"] = layout.NtPolicy.from_bytes(raw).key_id
        d["schedule"] = schedule.from_meta(meta, d["policies"], time.time())

    def event_fields(self, st: RoleState) -> Callable[[MarkEvent], dict[str, Any]]:
        names = _PolicyNames(st)

        def fields(e: MarkEvent) -> dict[str, Any]:
            d: dict[str, Any] = {
                "reason": e.reason,
                "policy": names.get(e.policy),
                "policy_id": e.policy,
                "family": e.family,
                "saddr": e.saddr,
                "sport": e.sport,
                "daddr": e.daddr,
                "dport": e.dport,
                "mode": e.mode,
                "room_from_ts": e.room_from_ts,
            }
            if e.mode == "mac":
                d.update(key_id=e.key_id, epoch=e.epoch, nonce=e.nonce.hex(), tag=e.tag.hex())
            return d

        return fields


class _PolicyNames:
    """Policy index -> name from the metadata, reread when `apply` rewrote it."""

    def __init__(self, st: RoleState) -> None:
        self._st = st
        self._mtime = -1.0
        self._checked = 0.0
        self._names: list[str] = []

    def get(self, index: int) -> str | None:
        now = time.monotonic()
        if now - self._checked > 0.5:
            self._checked = now
            mtime = self._st.meta_mtime() or -1.0
            if mtime != self._mtime:
                self._mtime = mtime
                meta = self._st.read_meta() or {}
                self._names = [p.get("name") for p in meta.get("policies", [])]
        return self._names[index] if 0 <= index < len(self._names) else None


ROLE = MarkerRole()
