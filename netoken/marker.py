"""Library API of the marker: load the TC program, fill its maps, attach it.

Everything the CLI's `mark` verbs do goes through here, so tests and other
programs get the same behaviour as operators.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Self

from . import layout
from .config import Config, Policy
from .datapath import (
    config_value,
    object_path,
    percpu_counters,
    realtime_minus_tai_ns,
    sync_keys,
    sync_map,
    u32,
)
from .libbpf import (
    BPF_TC_EGRESS,
    BpfObject,
    Map,
    Program,
    RingBuffer,
    TcFilter,
    tc_attach,
    tc_detach,
    tc_hook_create,
    tc_query,
)
from .rules import compile_lpm, expand

# netoken's own filter on the egress hook: a fixed handle and priority, so
# attach replaces only ours and detach removes only ours.  Priority 1 runs
# before filters added with tc's defaults (49152 and up).
TC_HANDLE = 0x6E74
TC_PRIORITY = 1

# The policy array is used in two halves.  `apply` writes the new policies to
# the idle half and then repoints the LPM entries one atomic update at a time,
# so a SYN never sees a prefix that points at a half-written policy.
POLICY_HALF = layout.MAX_POLICIES // 2

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


class Marker:
    """A loaded marker program and its maps (not necessarily attached)."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.prog: Program = obj.program(PROG_NAME)
        self.maps: dict[str, Map] = {name: obj.map(name) for name in MAPS}
        self.policies: tuple[Policy, ...] = ()

    @classmethod
    def load(cls) -> Marker:
        obj = BpfObject.open(str(object_path("marker")))
        try:
            obj.load()
        except BaseException:
            obj.close()
            raise
        return cls(obj)

    def close(self) -> None:
        self.obj.close()

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
        if len(cfg.policies) > POLICY_HALF:
            raise MarkerError(f"{len(cfg.policies)} policies; the marker holds at most {POLICY_HALF}")
        gen = 1 - self._generation()
        base = gen * POLICY_HALF
        # Keys first: a new policy may name a key that did not exist before.
        sync_keys(self.maps["nt_keys"], cfg.keys)
        for i, policy in enumerate(cfg.policies):
            self.maps["nt_policies"].update(u32(base + i), policy_value(policy, i))
        v4, v6 = compile_lpm(
            expand(
                (p.destinations, [(r.lo, r.hi) for r in p.ports], base + i)
                for i, p in enumerate(cfg.policies)
            )
        )
        sync_map(self.maps["nt_dst_v4"], v4)
        sync_map(self.maps["nt_dst_v6"], v6)
        self.maps["nt_config"].update(u32(0), config_value(cfg.option, gen))
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
