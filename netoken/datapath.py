"""Pieces the marker and the guard share on the user-space side.

Importing it loads no libbpf (maps are only passed in), so the kernel-free
verbs can use what is here: the clock offset and key bytes the config
compiles to (netoken/entries.py).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import layout
from .config import Key

if TYPE_CHECKING:
    from .libbpf import Map

BPF_DIR = Path(__file__).parent / "bpf"


def object_path(name: str) -> Path:
    """Path of a compiled BPF object shipped in the package (bpf/NAME.bpf.o)."""
    path = BPF_DIR / f"{name}.bpf.o"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run `make build` (needs clang-19 and libbpf-dev)"
        )
    return path


def realtime_minus_tai_ns() -> int:
    """CLOCK_REALTIME - CLOCK_TAI, rounded to whole seconds (what the offset is).

    BPF can read CLOCK_TAI but not CLOCK_REALTIME; TAI follows every step of the
    realtime clock, so this offset only changes with the kernel's TAI-UTC value.
    """
    diff = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_TAI)
    return round(diff / 1e9) * 1_000_000_000


def key_value(key: Key) -> bytes:
    return bytes(
        layout.NtKey(
            k0=int.from_bytes(key.secret[:8], "little"),
            k1=int.from_bytes(key.secret[8:16], "little"),
            window=key.window,
            bind=key.bind_mask,
        )
    )


def event_addr(family: int, raw) -> str:
    """An address field of an event record (16 bytes, the first 4 for IPv4)."""
    if family == 4:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    return str(ipaddress.IPv6Address(bytes(raw[:16])))


@dataclass(frozen=True)
class SynEvent:
    """What every event record says of its SYN: when, on which interface,
    between which endpoints, and the nonce and tag of its token (empty
    where there is none)."""

    ts_ns: int
    ifindex: int
    family: int
    saddr: str
    daddr: str
    sport: int
    dport: int
    nonce: bytes
    tag: bytes

    @staticmethod
    def flow(e: Any) -> dict[str, Any]:
        """The fields of the record E (a layout struct) that every event has,
        but for its token."""
        return {
            "ts_ns": e.ts_ns,
            "ifindex": e.ifindex,
            "family": e.family,
            "saddr": event_addr(e.family, e.saddr),
            "daddr": event_addr(e.family, e.daddr),
            "sport": e.sport,
            "dport": e.dport,
        }


def u32(i: int) -> bytes:
    return i.to_bytes(4, "little")


def sync_map(m: Map, desired: dict[bytes, bytes]) -> None:
    """Make a hash/LPM map hold exactly DESIRED.

    Updates first, deletions last: every key that stays is overwritten in one
    atomic update, so a lookup never misses during the change.
    """
    for k, v in desired.items():
        m.update(k, v)
    for k in list(m.keys()):
        if k not in desired:
            m.delete(k)


def update_changed(m: Map, entries: Mapping[bytes, bytes]) -> None:
    """Write the ENTRIES that M does not hold as they are (an array's or
    hash's update replaces the value in one step)."""
    for k, v in entries.items():
        if m.lookup(k) != v:
            m.update(k, v)


def add_keys(m: Map, keys: Mapping[int, Key]) -> None:
    """Write the configured KEYS into nt_keys M, before the entries that name
    them; the slots of removed keys stay until sync_keys, after no entry
    points at them any more: a SYN in between must find its key."""
    update_changed(m, {u32(kid): key_value(key) for kid, key in keys.items()})


def sync_keys(m: Map, keys: Mapping[int, Key]) -> None:
    """Write every configured key; zero the slots of keys that were removed."""
    empty = bytes(layout.NtKey())
    update_changed(
        m,
        {
            u32(kid): key_value(keys[kid]) if kid in keys else empty
            for kid in range(layout.MAX_KEYS)
        },
    )


def percpu_counters(m: Map, names: tuple[str, ...]) -> dict[str, int]:
    """Sum a per-CPU u64 array indexed by a reason enum into {name: total}."""
    out = {}
    for i, name in enumerate(names):
        vals = m.lookup_percpu(u32(i)) or []
        out[name] = sum(int.from_bytes(v[:8], "little") for v in vals)
    return out
