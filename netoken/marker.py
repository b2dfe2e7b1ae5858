"""Library API of the marker: load the TC program, fill its maps, attach it.

Everything the CLI's `mark` verbs do goes through here, so tests and other
programs get the same behaviour as operators.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

from . import config as nconfig
from . import layout, state
from .config import Config, ConfigError, Policy
from .datapath import (
    config_value,
    key_value,
    object_path,
    percpu_counters,
    realtime_minus_tai_ns,
    sync_keys,
    sync_map,
    u32,
)
from .libbpf import (
    BPF_TC_EGRESS,
    BPF_TC_INGRESS,
    BpfObject,
    Map,
    Program,
    RingBuffer,
    TcFilter,
    tc_attach,
    tc_detach,
    tc_hook_create,
    tc_hook_destroy,
    tc_query,
    unpin,
)
from .rules import RuleError, compile_lpm, expand
from .state import PROG_PIN, PROG_PIN_NEW, RoleState

# netoken's own filter on the egress hook: a fixed handle and priority, so
# attach replaces only ours and detach removes only ours.  Priority 1 runs
# before filters added with tc's defaults (49152 and up).
TC_HANDLE = 0x6E74
TC_PRIORITY = 1

# The policy array is used in two halves.  `apply` writes the new policies to
# the idle half and then repoints the LPM entries one atomic update at a time,
# so a SYN never sees a prefix that points at a half-written policy.
POLICY_HALF = layout.MAX_POLICIES // 2

# max_entries of nt_dst_v4 / nt_dst_v6 in bpf/marker.bpf.c.
LPM_MAX_ENTRIES = 65536

ROLE_NAME = "marker"
PROG_NAME = "netoken_mark"
MAPS = (
    "nt_config",
    "nt_keys",
    "nt_policies",
    "nt_dst_v4",
    "nt_dst_v6",
    "nt_mark_stats",
    "nt_mark_events",
)


class MarkerError(Exception):
    """A marker operation failed for a reason the user can act on."""


def ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise MarkerError(f"interface {ifname!r} does not exist") from None


def policy_value(policy: Policy, index: int) -> bytes:
    v = layout.NtPolicy(id=index, mode=layout.MODES[policy.mode])
    if policy.mode == "mac":
        v.key_id = policy.key
    else:
        v.token[:] = list(policy.token.to_bytes(8, "big"))
    return bytes(v)


@dataclass(frozen=True)
class MarkEvent:
    """One marked SYN, as the ring buffer reports it."""

    ts_ns: int
    ifindex: int
    policy: int
    epoch: int
    family: int
    mode: str
    key_id: int
    reason: str
    saddr: str
    daddr: str
    sport: int
    dport: int
    nonce: bytes
    tag: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> MarkEvent:
        e = layout.NtMarkEvent.from_bytes(data)
        alen = 4 if e.family == 4 else 16
        addr = ipaddress.IPv4Address if e.family == 4 else ipaddress.IPv6Address
        mac = e.mode == layout.MODE_MAC
        return cls(
            ts_ns=e.ts_ns,
            ifindex=e.ifindex,
            policy=e.policy,
            epoch=e.epoch,
            family=e.family,
            mode="mac" if mac else "static",
            key_id=e.key_id,
            reason=layout.MARK_REASONS[e.reason],
            saddr=str(addr(bytes(e.saddr[:alen]))),
            daddr=str(addr(bytes(e.daddr[:alen]))),
            sport=e.sport,
            dport=e.dport,
            nonce=bytes(e.nonce) if mac else b"",
            tag=bytes(e.tag[: layout.TAG_LEN]) if mac else bytes(e.tag),
        )


def _check_compatible(want: Map, have: Map) -> None:
    # libbpf's reuse_fd adopts the existing map's shape without comparing, so
    # maps pinned by a different netoken build would be silently misread.
    a = (want.type, want.key_size, want.value_size, want.max_entries)
    b = (have.type, have.key_size, have.value_size, have.max_entries)
    if a != b:
        raise MarkerError(
            f"pinned map {have.name} does not match this netoken's marker "
            f"(type/key/value/entries {b} vs {a}); detach the old marker first"
        )


class Marker:
    """A loaded marker program and its maps (not necessarily attached).

    Either fresh from the ELF object (:meth:`load`) or reopened from its pins
    by another process (:meth:`from_pins`); both behave the same.
    """

    def __init__(
        self,
        obj: BpfObject | None = None,
        *,
        prog: Program | None = None,
        maps: dict[str, Map] | None = None,
    ) -> None:
        self.obj = obj
        if obj is not None:
            prog = obj.program(PROG_NAME)
            maps = {name: obj.map(name) for name in MAPS}
        if prog is None or maps is None:
            raise TypeError("Marker needs a BpfObject or a program and its maps")
        self.prog: Program = prog
        self.maps: dict[str, Map] = maps
        self.policies: tuple[Policy, ...] = ()

    @classmethod
    def load(cls, reuse: Mapping[str, Map] | None = None) -> Marker:
        """Load a new program.  Maps named in REUSE are shared instead of
        created, which is how a replacement program keeps the live policies
        and counters of the one it replaces."""
        obj = BpfObject.open(str(object_path("marker")))
        try:
            for name, m in (reuse or {}).items():
                _check_compatible(obj.map(name), m)
                obj.reuse_map(name, m)
            obj.load()
        except BaseException:
            obj.close()
            raise
        return cls(obj)

    @classmethod
    def from_pins(cls, ifname: str, st: RoleState | None = None) -> Marker:
        """Open the marker pinned for IFNAME (its program and every map)."""
        st = st or state_of(ifname)
        if not st.exists():
            raise MarkerError(
                f"no marker on {ifname} (run `netoken mark attach {ifname} -c FILE` first)"
            )
        missing = [n for n in MAPS if not os.path.exists(st.pin(n))]
        if missing:
            raise MarkerError(
                f"pinned marker state in {st.pin_dir} is incomplete (missing {', '.join(missing)}); "
                f"run `netoken mark detach {ifname}` and attach again"
            )
        maps: dict[str, Map] = {}
        try:
            for name in MAPS:
                maps[name] = Map.from_pinned(st.pin(name))
            prog = Program.from_pinned(st.pin(PROG_PIN))
        except BaseException:
            for m in maps.values():
                m.close()
            raise
        return cls(prog=prog, maps=maps)

    def pin(self, st: RoleState) -> None:
        """Pin every map not pinned yet, and this program as PROG_PIN_NEW:
        it becomes PROG_PIN (:meth:`commit_pin`) only once tc runs it, so the
        pins never name a program that is not attached."""
        st.make_dir()
        for name, m in self.maps.items():
            path = st.pin(name)
            if os.path.exists(path):
                with Map.from_pinned(path) as pinned:
                    if pinned.id == m.id:
                        continue
                raise MarkerError(f"{path} is pinned but is not this marker's map")
            m.pin(path)
        unpin(st.pin(PROG_PIN_NEW))
        self.prog.pin(st.pin(PROG_PIN_NEW))

    def commit_pin(self, st: RoleState) -> None:
        """Make the staged program pin the current one (rename is atomic)."""
        os.replace(st.pin(PROG_PIN_NEW), st.pin(PROG_PIN))

    def close(self) -> None:
        if self.obj is not None:
            self.obj.close()
        else:
            self.prog.close()
            for m in self.maps.values():
                m.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _generation(self) -> int:
        raw = self.maps["nt_config"].lookup(u32(0))
        return layout.NtConfig.from_bytes(raw).generation if raw else 0

    def configure(self, cfg: Config) -> None:
        """Make the maps hold exactly CFG: keys, policies, prefixes, option.

        Safe on a live, attached marker: every SYN sees either the old or the
        new policy for its destination, never none (see POLICY_HALF).
        """
        check(cfg)
        gen = 1 - self._generation()
        base = gen * POLICY_HALF
        keys = self.maps["nt_keys"]
        # New keys before the policies that name them, removed keys only after
        # no policy points at them any more: a SYN in between must find its key.
        for kid, key in cfg.keys.items():
            if keys.lookup(u32(kid)) != key_value(key):
                keys.update(u32(kid), key_value(key))
        for i, policy in enumerate(cfg.policies):
            self.maps["nt_policies"].update(u32(base + i), policy_value(policy, i))
        v4, v6 = _compile(cfg, base)
        sync_map(self.maps["nt_dst_v4"], v4)
        sync_map(self.maps["nt_dst_v6"], v6)
        self.maps["nt_config"].update(u32(0), config_value(cfg.option, gen))
        sync_keys(keys, cfg.keys)
        self.policies = cfg.policies

    def sync_clock(self) -> None:
        """Refresh the REALTIME-TAI offset (changes only with the TAI-UTC offset)."""
        raw = self.maps["nt_config"].lookup(u32(0))
        cur = layout.NtConfig.from_bytes(raw)
        cur.realtime_minus_tai_ns = realtime_minus_tai_ns()
        self.maps["nt_config"].update(u32(0), bytes(cur))

    def attach(self, ifname: str) -> TcFilter:
        """Attach on IFNAME's egress, replacing only netoken's own filter."""
        idx = ifindex(ifname)
        tc_hook_create(idx, BPF_TC_EGRESS)
        return tc_attach(idx, BPF_TC_EGRESS, self.prog.fd, TC_HANDLE, TC_PRIORITY, replace=True)

    def stats(self) -> dict[str, int]:
        return percpu_counters(self.maps["nt_mark_stats"], layout.MARK_REASONS)

    def events(self, callback) -> RingBuffer:
        """A ring buffer that calls CALLBACK(MarkEvent) per marked SYN."""
        return RingBuffer(self.maps["nt_mark_events"], lambda b: callback(MarkEvent.from_bytes(b)))


def detach(ifname: str) -> bool:
    """Remove netoken's marker filter from IFNAME's egress; False if none was there."""
    idx = ifindex(ifname)
    if tc_query(idx, BPF_TC_EGRESS, TC_HANDLE, TC_PRIORITY) is None:
        return False
    tc_detach(idx, BPF_TC_EGRESS, TC_HANDLE, TC_PRIORITY)
    return True


def attached_prog_id(ifname: str) -> int | None:
    return tc_query(ifindex(ifname), BPF_TC_EGRESS, TC_HANDLE, TC_PRIORITY)


# --------------------------------------------------------------------------
# checks that need no kernel


def _compile(cfg: Config, base: int) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    try:
        return compile_lpm(
            expand(
                (p.destinations, [(r.lo, r.hi) for r in p.ports], base + i)
                for i, p in enumerate(cfg.policies)
            )
        )
    except RuleError as e:
        raise ConfigError(cfg.path, None, str(e)) from None


def check(cfg: Config) -> None:
    """Reject, as a ConfigError, what the marker's maps could not hold; run
    before anything is loaded so a bad config never half-applies."""
    if len(cfg.policies) > POLICY_HALF:
        raise ConfigError(
            cfg.path, None, f"{len(cfg.policies)} policies; the marker holds at most {POLICY_HALF}"
        )
    for family, entries in zip(("IPv4", "IPv6"), _compile(cfg, 0), strict=True):
        if len(entries) > LPM_MAX_ENTRIES:
            raise ConfigError(
                cfg.path,
                None,
                f"{len(entries)} distinct {family} destination prefixes; "
                f"the marker holds at most {LPM_MAX_ENTRIES}",
            )


# --------------------------------------------------------------------------
# pinned lifecycle: what `netoken mark attach|detach` and `netoken apply` do


def state_of(ifname: str, create: bool = False) -> RoleState:
    """The marker's pinned state for IFNAME (bpffs mounted first with CREATE)."""
    return RoleState(ifname, ROLE_NAME, state.bpffs(create=create) or state.BPFFS)


def _policy_meta(p: Policy) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": p.name,
        "destinations": [str(n) for n in p.destinations],
        "ports": [r.lo if r.lo == r.hi else str(r) for r in p.ports],
        "mode": p.mode,
    }
    if p.mode == "mac":
        d["key"] = p.key
    return d


def _config_meta(cfg: Config) -> dict[str, Any]:
    return {
        "config": os.path.abspath(cfg.path),
        "applied_at": state.now_iso(),
        "option": {"kind": cfg.option.kind, "exid": cfg.option.exid},
        "keys": [
            {"id": k.id, "window": k.window, "bind": list(k.bind), "file": str(k.file)}
            for k in sorted(cfg.keys.values(), key=lambda k: k.id)
        ],
        "policies": [_policy_meta(p) for p in cfg.policies],
    }


def tc_filter_count(ifname: str, hook: str) -> int | None:
    """Filters on IFNAME's clsact HOOK ("ingress"/"egress") as `tc` lists
    them, or None if that cannot be told.

    libbpf can only query a filter whose handle and priority are known, so
    "is anything else installed here" needs a dump, which iproute2 does.
    """
    try:
        r = subprocess.run(
            ["tc", "-j", "filter", "show", "dev", ifname, hook],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    try:
        entries = json.loads(r.stdout or "[]")
    except ValueError:
        return None
    return len(entries) if isinstance(entries, list) else None


def _restore_filter(idx: int, prev_prog_id: int | None) -> None:
    if prev_prog_id is None:
        with contextlib.suppress(Exception):
            tc_detach(idx, BPF_TC_EGRESS, TC_HANDLE, TC_PRIORITY)
        return
    with contextlib.suppress(Exception), Program.from_id(prev_prog_id) as prev:
        tc_attach(idx, BPF_TC_EGRESS, prev.fd, TC_HANDLE, TC_PRIORITY, replace=True)


def _destroy_clsact_if_empty(ifname: str, idx: int) -> str:
    counts = [tc_filter_count(ifname, hook) for hook in ("ingress", "egress")]
    if None in counts:
        return "kept (could not list its filters)"
    others = sum(c for c in counts if c is not None)
    if others:
        return f"kept ({others} other filter entries)"
    try:
        tc_hook_destroy(idx, BPF_TC_INGRESS | BPF_TC_EGRESS)
    except OSError as e:
        return f"kept (removing it failed: {e.strerror})"
    return "removed"


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
    idx = ifindex(ifname)
    st = state_of(ifname, create=True)
    with state.locked():
        old_meta = st.read_meta()
        st.check_netns(old_meta)
        if not st.exists() and st.pin_dir.exists():
            st.remove()  # a crash between mkdir and the first pin left it
        old = Marker.from_pins(ifname, st) if st.exists() else None
        prev_prog_id = tc_query(idx, BPF_TC_EGRESS, TC_HANDLE, TC_PRIORITY)
        new: Marker | None = None
        created_clsact = attached = False
        try:
            new = Marker.load(reuse=old.maps if old else None)
            new.configure(cfg)
            new.pin(st)
            created_clsact = tc_hook_create(idx, BPF_TC_EGRESS)
            filt = tc_attach(
                idx, BPF_TC_EGRESS, new.prog.fd, TC_HANDLE, TC_PRIORITY, replace=True
            )
            attached = True
            new.commit_pin(st)
            kept = bool(
                old_meta and old_meta.get("created_clsact") and old_meta.get("ifindex") == idx
            )
            meta = {
                "version": state.META_VERSION,
                "role": ROLE_NAME,
                "ifname": ifname,
                "ifindex": idx,
                "netns": state.current_netns(),
                "tc": {"hook": "egress", "handle": TC_HANDLE, "priority": TC_PRIORITY},
                "created_clsact": created_clsact or kept,
                "attached_at": state.now_iso(),
                **_config_meta(cfg),
            }
            st.write_meta(meta)
            prog_id, tag = new.prog.id, new.prog.tag
        except BaseException:
            if attached:
                _restore_filter(idx, prev_prog_id)
            if created_clsact:
                _destroy_clsact_if_empty(ifname, idx)
            unpin(st.pin(PROG_PIN_NEW))
            if old is None:
                st.remove()
            elif new is not None and old_meta and old_meta.get("config"):
                # The shared maps already hold the new config: give the old
                # program its own back if that config still loads.
                with contextlib.suppress(Exception):
                    old.configure(nconfig.load(old_meta["config"]))
            raise
        finally:
            if new is not None:
                new.close()
            if old is not None:
                old.close()
    return {
        "ifname": ifname,
        "ifindex": idx,
        "role": ROLE_NAME,
        "prog_id": prog_id,
        "tag": tag,
        "handle": filt.handle,
        "priority": filt.priority,
        "replaced_prog_id": prev_prog_id,
        "created_clsact": created_clsact,
        "pinned": str(st.pin_dir),
        "policies": len(cfg.policies),
        "keys": sorted(cfg.keys),
    }


def apply(ifname: str, cfg: Config) -> dict[str, Any]:
    """Make the live, pinned maps of IFNAME's marker hold CFG; no reattach."""
    check(cfg)
    st = state_of(ifname)
    with state.locked():
        meta = st.read_meta() or {}
        st.check_netns(meta)
        with Marker.from_pins(ifname, st) as m:
            m.configure(cfg)
            prog_id = m.prog.id
        before = {p.get("name") for p in meta.get("policies", [])}
        meta.update(_config_meta(cfg))
        st.write_meta(meta)
    after = {p.name for p in cfg.policies}
    return {
        "ifname": ifname,
        "role": ROLE_NAME,
        "prog_id": prog_id,
        "policies": len(cfg.policies),
        "keys": sorted(cfg.keys),
        "added": sorted(after - before),
        "removed": sorted(before - after),
    }


def detach_pinned(ifname: str) -> dict[str, Any]:
    """Remove netoken's marker filter and pins from IFNAME.

    The clsact qdisc goes only if netoken created it and no other filter is
    left on either of its hooks.  An interface that is gone has taken its
    filters with it; its pins are still cleaned up.
    """
    st = state_of(ifname)
    with state.locked():
        meta = st.read_meta()
        st.check_netns(meta)
        has_state = st.pin_dir.exists() or meta is not None
        try:
            idx: int | None = ifindex(ifname)
        except MarkerError:
            if not has_state:
                raise
            idx = None
        prog_id = None
        if idx is not None:
            prog_id = tc_query(idx, BPF_TC_EGRESS, TC_HANDLE, TC_PRIORITY)
            if prog_id is None and not has_state:
                raise MarkerError(f"no netoken marker on {ifname}")
            if prog_id is not None:
                tc_detach(idx, BPF_TC_EGRESS, TC_HANDLE, TC_PRIORITY)
        clsact = "kept"
        if (
            idx is not None
            and meta
            and meta.get("created_clsact")
            and meta.get("ifindex") == idx
        ):
            clsact = _destroy_clsact_if_empty(ifname, idx)
        st.remove()
    return {
        "ifname": ifname,
        "role": ROLE_NAME,
        "removed_prog_id": prog_id,
        "interface_present": idx is not None,
        "clsact": clsact,
    }


# --------------------------------------------------------------------------
# the marker as a role of the generic status / stats / monitor views


def _bind_names(mask: int) -> list[str]:
    return [n for n, bit in (("saddr", layout.BIND_SADDR), ("sport", layout.BIND_SPORT)) if mask & bit]


def _fmt_ts(ts_ns: int, offset_ns: int) -> str:
    t = _dt.datetime.fromtimestamp((ts_ns + offset_ns) / 1e9, _dt.UTC)
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


class MarkerRole:
    """status/stats/monitor for pinned markers (see state.Role)."""

    name = ROLE_NAME

    def check(self, cfg: Config) -> None:
        check(cfg)

    def apply(self, ifname: str, cfg: Config) -> dict[str, Any]:
        return apply(ifname, cfg)

    def status(self, st: RoleState) -> dict[str, Any]:
        meta = st.read_meta() or {}
        d: dict[str, Any] = {"ifname": st.ifname, "ifindex": None, "role": ROLE_NAME}
        with Program.from_pinned(st.pin(PROG_PIN)) as prog:
            d["prog"] = {"id": prog.id, "tag": prog.tag, "name": prog.name}
        try:
            idx: int | None = ifindex(st.ifname)
        except MarkerError:
            idx = None
        live = tc_query(idx, BPF_TC_EGRESS, TC_HANDLE, TC_PRIORITY) if idx is not None else None
        d["ifindex"] = idx
        d["attach"] = {
            "type": "tc",
            "qdisc": "clsact",
            "hook": "egress",
            "handle": TC_HANDLE,
            "priority": TC_PRIORITY,
            "mode": "direct-action",
        }
        if idx is None:
            d["state"] = "interface missing"
        elif live is None:
            d["state"] = "not attached"
        elif live != d["prog"]["id"]:
            d["state"] = f"filter runs prog {live}, not the pinned one"
        else:
            d["state"] = "attached"
        d["attached"] = d["state"] == "attached"
        d["pinned"] = str(st.pin_dir)
        d["netns"] = meta.get("netns")
        d["config"] = meta.get("config")
        d["attached_at"] = meta.get("attached_at")
        d["applied_at"] = meta.get("applied_at")
        d["created_clsact"] = meta.get("created_clsact")
        with Map.from_pinned(st.pin("nt_config")) as m:
            raw = m.lookup(u32(0))
        cfgv = layout.NtConfig.from_bytes(raw) if raw else layout.NtConfig()
        d["option"] = {"kind": cfgv.kind, "exid": cfgv.exid}
        files = {k.get("id"): k.get("file") for k in meta.get("keys", [])}
        keys = []
        with Map.from_pinned(st.pin("nt_keys")) as m:
            for kid in range(layout.MAX_KEYS):
                raw = m.lookup(u32(kid))
                k = layout.NtKey.from_bytes(raw) if raw else None
                if k is not None and k.window:
                    keys.append(
                        {"id": kid, "window": k.window, "bind": _bind_names(k.bind),
                         "file": files.get(kid)}
                    )
        d["keys"] = keys
        d["policies"] = meta.get("policies", [])
        return d

    def status_lines(self, d: dict[str, Any]) -> list[str]:
        a = d["attach"]
        lines = [
            f"{d['state']}  prog {d['prog']['id']}  tag {d['prog']['tag']}",
            f"tc       {a['hook']} ({a['qdisc']}) handle 0x{a['handle']:x} "
            + f"prio {a['priority']}, {a['mode']}",
            f"pinned   {d['pinned']}",
        ]
        if d.get("config"):
            lines.append(f"config   {d['config']}  (applied {d.get('applied_at') or '?'})")
        o = d["option"]
        lines.append(f"option   kind {o['kind']}  exid 0x{o['exid']:04x}")
        ks = []
        for k in d["keys"]:
            extra = f", bind {'+'.join(k['bind'])}" if k["bind"] else ""
            ks.append(f"{k['id']} (window {k['window']}s{extra})")
        lines.append("keys     " + (", ".join(ks) or "none"))
        if not d["policies"]:
            lines.append("policies none (nothing is marked)")
        width = max((len(str(p.get("name"))) for p in d["policies"]), default=0)
        for p in d["policies"]:
            how = f"mac key {p.get('key')}" if p.get("mode") == "mac" else "static"
            ports = ",".join(str(x) for x in p.get("ports", [])) or "all"
            lines.append(
                f"policy   {p.get('name')!s:<{width}}  {how:<10} ports {ports:<14} "
                + " ".join(p.get("destinations", []))
            )
        return lines

    def stats(self, st: RoleState) -> dict[str, int]:
        with Map.from_pinned(st.pin("nt_mark_stats")) as m:
            return percpu_counters(m, layout.MARK_REASONS)

    def lost_events(self, st: RoleState) -> int:
        return self.stats(st)["events_lost"]

    def open_events(self, st: RoleState, callback: Callable[[dict[str, Any]], None]) -> RingBuffer:
        names = _PolicyNames(st)
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; events show wall-clock time.
        offset = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.monotonic_ns()

        def on_event(data: bytes) -> None:
            e = MarkEvent.from_bytes(data)
            d: dict[str, Any] = {
                "time": _fmt_ts(e.ts_ns, offset),
                "ifname": st.ifname,
                "role": ROLE_NAME,
                "reason": e.reason,
                "policy": names.get(e.policy),
                "policy_id": e.policy,
                "family": e.family,
                "saddr": e.saddr,
                "sport": e.sport,
                "daddr": e.daddr,
                "dport": e.dport,
                "mode": e.mode,
            }
            if e.mode == "mac":
                d.update(key_id=e.key_id, epoch=e.epoch, nonce=e.nonce.hex(), tag=e.tag.hex())
            callback(d)

        with Map.from_pinned(st.pin("nt_mark_events")) as m:
            return RingBuffer(Map.from_fd(os.dup(m.fd)), on_event)

    def event_header(self) -> str:
        return (
            f"{'TIME':<12} {'IFACE':<15} {'POLICY':<12} {'SOURCE':<22} {'DESTINATION':<22} "
            f"{'MODE':<6} {'KEY':>3} {'EPOCH':>10} {'NONCE':<8} TAG"
        )

    def event_line(self, e: dict[str, Any]) -> str:
        def ep(addr: str, port: int) -> str:
            return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"

        t = e["time"][11:23]
        mac = e["mode"] == "mac"
        return (
            f"{t:<12} {e['ifname']:<15} {e['policy'] or e['policy_id']!s:<12} "
            f"{ep(e['saddr'], e['sport']):<22} {ep(e['daddr'], e['dport']):<22} "
            f"{e['mode']:<6} "
            f"{e['key_id'] if mac else '-':>3} {e['epoch'] if mac else '-':>10} "
            f"{e['nonce'] if mac else '-':<8} {e['tag'] if mac else '-'}"
        )


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
            try:
                mtime = self._st.meta_path.stat().st_mtime
            except OSError:
                mtime = -1.0
            if mtime != self._mtime:
                self._mtime = mtime
                meta = self._st.read_meta() or {}
                self._names = [p.get("name") for p in meta.get("policies", [])]
        return self._names[index] if 0 <= index < len(self._names) else None


ROLE = MarkerRole()
