"""ctypes mirrors of bpf/netoken.h.

bpf/netoken.h is the single source of truth; this module restates it for
Python and tests/unit/test_layout.py proves, against the BTF that clang emits into
every compiled object, that sizes, field names, offsets and enum values agree.
"""

from __future__ import annotations

import ctypes as C

# The wire format's constants are token.py's, the executable form of the
# format; the header states them again for C (tests/unit/test_layout.py).
from . import token

MAC_OPT_LEN = token.MAC_LEN
STATIC_OPT_LEN = token.STATIC_LEN
TAG_LEN = token.TAG_LEN
NONCE_LEN = token.NONCE_LEN
BIND_SADDR = token.BIND_SADDR
BIND_SPORT = token.BIND_SPORT
MAX_KEYS = 256
MAX_PORT_RULES = 32
MAX_POLICIES = 4096
# NT_MAX_IP6_EXT in bpf/parsing.h: IPv6 extension headers walked to reach TCP.
MAX_IP6_EXT = 16

MODE_MAC = 1
MODE_STATIC = 2
MODES = {"mac": MODE_MAC, "static": MODE_STATIC}

# enum nt_mark_reason, in order.  The names are what users see in `stats`,
# events and metrics, so they are part of the interface.
MARK_REASONS: tuple[str, ...] = (
    "marked",
    "marked_payload",
    "no_policy",
    "no_room",
    "payload",
    "not_ipv4_or_6",
    "not_tcp",
    "not_syn",
    "fragment",
    "ipv6_ext",
    "malformed",
    "no_key",
    "error",
    "events_lost",
    "room_from_ts",
)
MARK_REASON = {name: i for i, name in enumerate(MARK_REASONS)}
# Counted on top of a packet reason rather than instead of one (the enum's
# comments say which), so a sum over MARK_PACKET_REASONS is packets.
MARK_ACTIONS: tuple[str, ...] = tuple(r for r in MARK_REASONS if r == "room_from_ts")
MARK_EVENTS: tuple[str, ...] = ("events_lost",)
MARK_PACKET_REASONS: tuple[str, ...] = tuple(
    r for r in MARK_REASONS if r not in MARK_ACTIONS + MARK_EVENTS
)

# max_entries of the LPM tries nt_dst_v4 / nt_dst_v6 (bpf/dest.h).
LPM_MAX_ENTRIES = 65536
MAX_PROTECT = 4096
MAX_STATIC = 4096
MAX_EVENT_RATE = 1_000_000
KEY_STAT_OK = 0
KEY_STAT_BAD = 1

# enum nt_guard_reason, in order: the verdicts of design.md §2 (the last three
# for packets to a protected address the guard cannot check), then why a
# packet was passed without a verdict, then outcomes counted on top of a
# verdict.
GUARD_VERDICTS: tuple[str, ...] = (
    "ok",
    "missing",
    "malformed",
    "unknown_key",
    "stale",
    "bad_tag",
    "replay",
    "fragment",
    "ipv6_ext",
    "bad_header",
)
GUARD_PASS_REASONS: tuple[str, ...] = (
    "not_syn",
    "unprotected",
    "not_tcp",
    "not_ipv4_or_6",
    "fragment_passed",
    "ipv6_ext_passed",
    "bad_header_passed",
)
GUARD_OUTCOMES: tuple[str, ...] = (
    "dropped",
    "monitored",
    "events",
    "events_suppressed",
    "events_lost",
    "error",
)
GUARD_REASONS = GUARD_VERDICTS + GUARD_PASS_REASONS + GUARD_OUTCOMES
# The outcomes by kind: what happened to a rejected SYN, and its event.
GUARD_ACTIONS_TAKEN: tuple[str, ...] = ("dropped", "monitored")
GUARD_EVENTS: dict[str, str] = {
    "events": "written",
    "events_suppressed": "suppressed",
    "events_lost": "lost",
}
GUARD_REASON = {name: i for i, name in enumerate(GUARD_REASONS)}

# enum nt_guard_fragments: [guard] fragments.
GUARD_FRAGMENTS_MODES: tuple[str, ...] = ("drop", "pass")
GUARD_FRAGMENTS = {name: i for i, name in enumerate(GUARD_FRAGMENTS_MODES)}

# enum nt_guard_action; "entry" only appears in the global override.
GUARD_ACTIONS: tuple[str, ...] = ("entry", "drop", "monitor")
GUARD_ACTION = {name: i for i, name in enumerate(GUARD_ACTIONS)}


class Struct(C.Structure):
    """Base with byte conversion helpers for map keys and values."""

    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes):
        if len(data) < C.sizeof(cls):
            raise ValueError(f"{cls.__name__}: need {C.sizeof(cls)} bytes, got {len(data)}")
        return cls.from_buffer_copy(data[: C.sizeof(cls)])


class NtConfig(Struct):
    _fields_ = [
        ("kind", C.c_uint8),
        ("make_room", C.c_uint8),
        ("exid", C.c_uint16),
        ("generation", C.c_uint32),
        ("realtime_minus_tai_ns", C.c_int64),
    ]


class NtKey(Struct):
    _fields_ = [
        ("k0", C.c_uint64),
        ("k1", C.c_uint64),
        ("window", C.c_uint32),
        ("bind", C.c_uint8),
        ("pad", C.c_uint8 * 3),
    ]


class NtPolicy(Struct):
    _fields_ = [
        ("id", C.c_uint32),
        ("mode", C.c_uint8),
        ("key_id", C.c_uint8),
        ("pad", C.c_uint8 * 2),
        ("token", C.c_uint8 * 8),
    ]


class NtPortRule(Struct):
    _fields_ = [
        ("lo", C.c_uint16),
        ("hi", C.c_uint16),
        ("policy", C.c_uint32),
    ]


class NtPortRules(Struct):
    _fields_ = [
        ("count", C.c_uint32),
        ("rules", NtPortRule * MAX_PORT_RULES),
    ]


class NtLpmV4(Struct):
    _fields_ = [("prefixlen", C.c_uint32), ("addr", C.c_uint8 * 4)]


class NtLpmV6(Struct):
    _fields_ = [("prefixlen", C.c_uint32), ("addr", C.c_uint8 * 16)]


class NtMarkEvent(Struct):
    _fields_ = [
        ("ts_ns", C.c_uint64),
        ("ifindex", C.c_uint32),
        ("policy", C.c_uint32),
        ("epoch", C.c_uint32),
        ("family", C.c_uint8),
        ("mode", C.c_uint8),
        ("key_id", C.c_uint8),
        ("reason", C.c_uint8),
        ("saddr", C.c_uint8 * 16),
        ("daddr", C.c_uint8 * 16),
        ("sport", C.c_uint16),
        ("dport", C.c_uint16),
        ("nonce", C.c_uint8 * NONCE_LEN),
        ("room_from_ts", C.c_uint8),
        ("pad0", C.c_uint8),
        ("tag", C.c_uint8 * 8),
        ("pad1", C.c_uint8 * 4),
    ]


class NtGuardConfig(Struct):
    _fields_ = [
        ("kind", C.c_uint8),
        ("skew", C.c_uint8),
        ("exid", C.c_uint16),
        ("generation", C.c_uint32),
        ("realtime_minus_tai_ns", C.c_int64),
        ("event_rate", C.c_uint32),
        ("event_burst", C.c_uint32),
        ("action", C.c_uint8),
        ("fragments", C.c_uint8),
        ("pad", C.c_uint8 * 6),
    ]


class NtProtect(Struct):
    _fields_ = [
        ("id", C.c_uint32),
        ("action", C.c_uint8),
        ("pad", C.c_uint8 * 3),
        ("keys", C.c_uint64 * (MAX_KEYS // 64)),
    ]


class NtStaticKey(Struct):
    _fields_ = [
        ("protect", C.c_uint32),
        ("token", C.c_uint8 * 8),
    ]


# NT_REPLAY_ENTRY / NT_REPLAY_INDEX: what a replay-cache slot holds for an
# accepted token, and which slot (tests/test_replay_cache.py checks these
# against the guard's own stores).
REPLAY_HASH_MUL = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1


def replay_entry(nonce: bytes, tag: bytes) -> int:
    return (
        (int.from_bytes(nonce, "little") << 16) | (int.from_bytes(tag, "little") & 0xFFFF)
    ) & _U64


def replay_index(entry: int, slots: int) -> int:
    return (((entry * REPLAY_HASH_MUL) & _U64) >> 32) & (slots - 1)


class NtGuardEvent(Struct):
    _fields_ = [
        ("ts_ns", C.c_uint64),
        ("ifindex", C.c_uint32),
        ("protect", C.c_uint32),
        ("epoch", C.c_uint32),
        ("family", C.c_uint8),
        ("verdict", C.c_uint8),
        ("action", C.c_uint8),
        ("mode", C.c_uint8),
        ("key_id", C.c_uint8),
        ("pad0", C.c_uint8 * 3),
        ("saddr", C.c_uint8 * 16),
        ("daddr", C.c_uint8 * 16),
        ("sport", C.c_uint16),
        ("dport", C.c_uint16),
        ("nonce", C.c_uint8 * NONCE_LEN),
        ("pad1", C.c_uint8 * 2),
        ("tag", C.c_uint8 * 8),
    ]


# struct name in netoken.h -> mirror; the layout test walks this table.
STRUCTS: dict[str, type[Struct]] = {
    "nt_config": NtConfig,
    "nt_key": NtKey,
    "nt_policy": NtPolicy,
    "nt_port_rule": NtPortRule,
    "nt_port_rules": NtPortRules,
    "nt_lpm_v4": NtLpmV4,
    "nt_lpm_v6": NtLpmV6,
    "nt_mark_event": NtMarkEvent,
    "nt_guard_config": NtGuardConfig,
    "nt_protect": NtProtect,
    "nt_static_key": NtStaticKey,
    "nt_guard_event": NtGuardEvent,
}

# enum name in netoken.h -> (C prefix, Python names in value order)
ENUMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "nt_mark_reason": ("NT_MARK_", MARK_REASONS + ("reason_max",)),
    "nt_guard_reason": ("NT_GUARD_", GUARD_REASONS + ("reason_max",)),
    "nt_guard_action": ("NT_ACTION_", GUARD_ACTIONS),
    "nt_guard_fragments": ("NT_FRAGMENTS_", GUARD_FRAGMENTS_MODES),
}
