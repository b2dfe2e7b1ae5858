"""Pieces the marker and the guard share on the user-space side."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

from . import layout
from .config import Key, OptionConfig
from .libbpf import Map

BPF_DIR = Path(__file__).parent / "bpf"


def object_path(name: str) -> Path:
    """Path of a compiled BPF object shipped in the package (bpf/NAME.bpf.o)."""
    path = BPF_DIR / f"{name}.bpf.o"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make build` (needs clang-19 and libbpf-dev)")
    return path


def realtime_minus_tai_ns() -> int:
    """CLOCK_REALTIME - CLOCK_TAI, rounded to whole seconds (what the offset is).

    BPF can read CLOCK_TAI but not CLOCK_REALTIME; TAI follows every step of the
    realtime clock, so this offset only changes with the kernel's TAI-UTC value.
    """
    diff = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_TAI)
    return round(diff / 1e9) * 1_000_000_000


def config_value(option: OptionConfig, generation: int = 0) -> bytes:
    return bytes(
        layout.NtConfig(
            kind=option.kind,
            make_room=option.make_room,
            exid=option.exid,
            generation=generation,
            realtime_minus_tai_ns=realtime_minus_tai_ns(),
        )
    )


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


def sync_keys(m: Map, keys: dict[int, Key]) -> None:
    """Write every configured key; zero the slots of keys that were removed."""
    empty = bytes(layout.NtKey())
    for kid in range(layout.MAX_KEYS):
        want = key_value(keys[kid]) if kid in keys else empty
        if m.lookup(u32(kid)) != want:
            m.update(u32(kid), want)


def percpu_counters(m: Map, names: tuple[str, ...]) -> dict[str, int]:
    """Sum a per-CPU u64 array indexed by a reason enum into {name: total}."""
    out = {}
    for i, name in enumerate(names):
        vals = m.lookup_percpu(u32(i)) or []
        out[name] = sum(int.from_bytes(v[:8], "little") for v in vals)
    return out
