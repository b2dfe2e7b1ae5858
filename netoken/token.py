"""Python reference implementation of the netoken TCP option (design.md §2).

This module is the executable form of the wire-format contract: the BPF marker and
guard are cross-checked against it byte for byte, and the user-space tools
(`netoken decode`, the tests, the demo) use it to build and verify tokens.  It is
deliberately pure Python with no third-party imports so that it can be trusted as an
independent oracle and imported anywhere.

Layout of a mac-mode option, wire format 2 (RFC 6994 shared experimental form,
16 bytes)::

    byte  0     1     2..3   4       5       6..11   12..15
        kind  len=16  ExID  key id  epoch  nonce   tag (first 4 bytes of SipHash-2-4)
                                    & 0xff

Format 1 (a 4-byte nonce and a 6-byte tag in the same 16 bytes) is gone: two
formats cannot be told apart on the wire, and none was ever deployed.

and of a static-mode option (12 bytes)::

    byte  0     1     2..3   4..11
        kind  len=12  ExID  token (be64)
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BIND_SADDR",
    "BIND_SPORT",
    "DEFAULT_EXID",
    "DEFAULT_KIND",
    "KEY_LEN",
    "MAC_LEN",
    "NONCE_LEN",
    "STATIC_LEN",
    "TAG_LEN",
    "VERDICTS",
    "Addr",
    "MalformedOption",
    "Token",
    "Verdict",
    "build_mac_option",
    "compute_tag",
    "decode",
    "encode_mac",
    "encode_static",
    "epoch_now",
    "expand_epoch",
    "find_options",
    "key_fingerprint",
    "key_fingerprint_int",
    "mac_message",
    "siphash24",
    "siphash24_int",
    "verdict",
    "verify",
]

# Values shared with bpf/netoken.h: changing any of them breaks interoperability.
DEFAULT_KIND = 253
DEFAULT_EXID = 0x6E74
MAC_LEN = 16
STATIC_LEN = 12
TAG_LEN = 4
NONCE_LEN = 6
KEY_LEN = 16

# Bitmask of optional MAC inputs ("bind" in the config); BPF uses the same bits.
BIND_SADDR = 1
BIND_SPORT = 2

VERDICTS = ("ok", "missing", "malformed", "unknown_key", "stale", "bad_tag")
Verdict = Literal["ok", "missing", "malformed", "unknown_key", "stale", "bad_tag"]

# Addresses may be given in whatever form the caller has at hand; the MAC only ever
# sees the packed network-order bytes.
Addr = bytes | bytearray | str | ipaddress.IPv4Address | ipaddress.IPv6Address

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1

_TCPOPT_EOL = 0
_TCPOPT_NOP = 1


class MalformedOption(ValueError):
    """Option bytes that do not parse as TCP options or as a netoken option."""


# --------------------------------------------------------------------------- SipHash


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK64


def siphash24_int(k0: int, k1: int, msg: bytes | bytearray | memoryview) -> int:
    """SipHash-2-4 of `msg` under key (k0, k1), as the algorithm's 64-bit integer.

    k0/k1 are the two little-endian u64 halves of the 16-byte key, exactly as the
    reference implementation and the BPF port load them.
    """
    if not (0 <= k0 <= _MASK64 and 0 <= k1 <= _MASK64):
        raise ValueError("k0 and k1 must be unsigned 64-bit integers")
    msg = bytes(msg)
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573

    def rounds(n: int) -> None:
        nonlocal v0, v1, v2, v3
        for _ in range(n):
            v0 = (v0 + v1) & _MASK64
            v1 = _rotl(v1, 13) ^ v0
            v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & _MASK64
            v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & _MASK64
            v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & _MASK64
            v1 = _rotl(v1, 17) ^ v2
            v2 = _rotl(v2, 32)

    full = len(msg) - len(msg) % 8
    for off in range(0, full, 8):
        m = int.from_bytes(msg[off : off + 8], "little")
        v3 ^= m
        rounds(2)
        v0 ^= m
    # Final block: leftover bytes little-endian, length mod 256 in the top byte.
    b = ((len(msg) & 0xFF) << 56) | int.from_bytes(msg[full:], "little")
    v3 ^= b
    rounds(2)
    v0 ^= b
    v2 ^= 0xFF
    rounds(4)
    return v0 ^ v1 ^ v2 ^ v3


def siphash24(key: bytes, msg: bytes | bytearray | memoryview) -> bytes:
    """SipHash-2-4 of `msg` under a 16-byte key, serialized little-endian (8 bytes).

    The little-endian serialization matches the reference implementation's output
    buffer, which is what the tag truncation in §2 is defined on.
    """
    if len(key) != KEY_LEN:
        raise ValueError(f"SipHash key must be {KEY_LEN} bytes, got {len(key)}")
    k0 = int.from_bytes(key[:8], "little")
    k1 = int.from_bytes(key[8:], "little")
    return siphash24_int(k0, k1, msg).to_bytes(8, "little")


# A key's fingerprint: SipHash-2-4 under the key of this fixed label, first 8
# output bytes in hex.  SipHash is a PRF, so the value says nothing about the
# key beyond "same or different", which is what an operator comparing hosts
# needs.  The label is 26 bytes, a length no MAC message has (19, 21, 23, 25,
# 31, 33, 35, 37, 47 or 49 bytes), so a fingerprint can never be a tag.
FINGERPRINT_LABEL = b"netoken key fingerprint v1"


def key_fingerprint_int(k0: int, k1: int) -> str:
    """Fingerprint of the key (k0, k1) as the BPF maps hold it (two LE u64)."""
    return siphash24_int(k0, k1, FINGERPRINT_LABEL).to_bytes(8, "little").hex()


def key_fingerprint(key: bytes) -> str:
    """Fingerprint of a 16-byte key: 16 hex digits, safe to print and compare."""
    return siphash24(key, FINGERPRINT_LABEL).hex()


# ---------------------------------------------------------------------------- epochs


def epoch_now(window: int, now: float | None = None) -> int:
    """Current epoch: floor(Unix time / window), truncated to 32 bits.

    Unix time is CLOCK_REALTIME (time.time), not TAI, because the marker and guard
    on different hosts only agree if they use the same civil clock.  When `now` is
    None the integer nanosecond clock is used so that epoch boundaries fall exactly
    where the kernel's integer arithmetic puts them.
    """
    if window <= 0:
        raise ValueError(f"window must be a positive number of seconds, got {window}")
    if now is None:
        epoch = int(time.time_ns() // (window * 1_000_000_000))
    else:
        epoch = math.floor(now / window)
    return epoch & _MASK32


def expand_epoch(low8: int, current: int) -> int:
    """The 32-bit epoch closest to `current` whose low 8 bits equal `low8`.

    The distance is the signed 8-bit difference ``(int8)(low8 - current)``, which is
    what a BPF implementation naturally computes; an exact tie (difference of 128)
    therefore resolves towards the past (``current - 128``).  The result wraps
    modulo 2**32 like the u32 epoch it stands for.
    """
    if not 0 <= low8 <= 0xFF:
        raise ValueError(f"low8 must be 0..255, got {low8}")
    delta = (low8 - current) & 0xFF
    if delta >= 0x80:
        delta -= 0x100
    return (current + delta) & _MASK32


def _epoch_distance(a: int, b: int) -> int:
    """|a - b| for u32 epochs, measured the short way round the 2**32 wrap."""
    d = (a - b) & _MASK32
    return min(d, (1 << 32) - d)


# ------------------------------------------------------------------------ MAC input


def _addr_bytes(addr: Addr, what: str) -> bytes:
    if isinstance(addr, (bytes, bytearray)):
        packed = bytes(addr)
    elif isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        packed = addr.packed
    elif isinstance(addr, str):
        packed = ipaddress.ip_address(addr).packed
    else:
        kind = type(addr).__name__
        raise TypeError(f"{what}: expected bytes, str or an ipaddress object, not {kind}")
    if len(packed) not in (4, 16):
        raise ValueError(f"{what} must be 4 (IPv4) or 16 (IPv6) bytes, got {len(packed)}")
    return packed


def _check_port(port: int, what: str) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"{what} must be 0..65535, got {port}")


def _check_key_id_nonce(key_id: int, nonce: bytes) -> None:
    if not 0 <= key_id <= 0xFF:
        raise ValueError(f"key_id must be 0..255, got {key_id}")
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes, got {len(nonce)}")


def mac_message(
    exid: int,
    key_id: int,
    epoch: int,
    nonce: bytes,
    daddr: Addr,
    dport: int,
    saddr: Addr | None = None,
    sport: int | None = None,
    bind: int = 0,
) -> bytes:
    """The SipHash input of a mac-mode token (design.md §2), all fields network order.

    ``ExID(2) ‖ key id(1) ‖ epoch(4) ‖ nonce(6) ‖ daddr(4|16) ‖ dport(2)``, then
    ``saddr`` if ``bind & BIND_SADDR`` and ``sport`` if ``bind & BIND_SPORT``.
    `saddr`/`sport` are ignored when their bind bit is clear, so callers can always
    pass the packet's values and let the key's bind decide.
    """
    if not 0 <= exid <= 0xFFFF:
        raise ValueError(f"exid must be 0..0xffff, got {exid:#x}")
    _check_key_id_nonce(key_id, nonce)
    if not 0 <= epoch <= _MASK32:
        raise ValueError(f"epoch must be an unsigned 32-bit integer, got {epoch}")
    if bind & ~(BIND_SADDR | BIND_SPORT):
        raise ValueError(f"unknown bind bits {bind:#x}")
    _check_port(dport, "dport")
    dst = _addr_bytes(daddr, "daddr")

    parts = [
        exid.to_bytes(2, "big"),
        key_id.to_bytes(1, "big"),
        epoch.to_bytes(4, "big"),
        bytes(nonce),
        dst,
        dport.to_bytes(2, "big"),
    ]
    if bind & BIND_SADDR:
        if saddr is None:
            raise ValueError("bind includes saddr but no saddr was given")
        src = _addr_bytes(saddr, "saddr")
        # A v4 source with a v6 destination cannot come from one packet; mixing them
        # would silently produce a MAC that no datapath ever computes.
        if len(src) != len(dst):
            raise ValueError("saddr and daddr are of different address families")
        parts.append(src)
    if bind & BIND_SPORT:
        if sport is None:
            raise ValueError("bind includes sport but no sport was given")
        _check_port(sport, "sport")
        parts.append(sport.to_bytes(2, "big"))
    return b"".join(parts)


def compute_tag(key: bytes, *fields: Any, **named: Any) -> bytes:
    """The 4-byte tag: the first TAG_LEN bytes of SipHash-2-4 under KEY of
    mac_message(*FIELDS, **NAMED), whose arguments they are (ExID, key id,
    epoch, nonce, daddr, dport, and saddr, sport, bind as the key binds)."""
    return siphash24(key, mac_message(*fields, **named))[:TAG_LEN]


# ------------------------------------------------------------------ encode / decode


def _check_kind_exid(kind: int, exid: int) -> None:
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"kind must be 0..255, got {kind}")
    if kind in (_TCPOPT_EOL, _TCPOPT_NOP):
        raise ValueError("kind 0 (EOL) and 1 (NOP) cannot carry data")
    if not 0 <= exid <= 0xFFFF:
        raise ValueError(f"exid must be 0..0xffff, got {exid:#x}")


def encode_mac(kind: int, exid: int, key_id: int, epoch: int, nonce: bytes, tag: bytes) -> bytes:
    """Serialize a 16-byte mac-mode option; only the low 8 bits of `epoch` are sent."""
    _check_kind_exid(kind, exid)
    _check_key_id_nonce(key_id, nonce)
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}")
    if len(tag) != TAG_LEN:
        raise ValueError(f"tag must be {TAG_LEN} bytes, got {len(tag)}")
    return (
        bytes((kind, MAC_LEN))
        + exid.to_bytes(2, "big")
        + bytes((key_id, epoch & 0xFF))
        + bytes(nonce)
        + bytes(tag)
    )


def encode_static(kind: int, exid: int, token: int) -> bytes:
    """Serialize a 12-byte static-mode option carrying `token` as big-endian u64."""
    _check_kind_exid(kind, exid)
    if not 0 <= token <= _MASK64:
        raise ValueError(f"token must be an unsigned 64-bit integer, got {token}")
    return bytes((kind, STATIC_LEN)) + exid.to_bytes(2, "big") + token.to_bytes(8, "big")


def build_mac_option(
    key: bytes,
    *,
    key_id: int,
    epoch: int,
    daddr: Addr,
    dport: int,
    saddr: Addr | None = None,
    sport: int | None = None,
    bind: int = 0,
    nonce: bytes | None = None,
    kind: int = DEFAULT_KIND,
    exid: int = DEFAULT_EXID,
) -> bytes:
    """What the marker writes for one SYN: a complete mac-mode option.

    A fresh random nonce is drawn when none is given, because the design requires
    every SYN (including retransmissions) to carry a different token.
    """
    if nonce is None:
        nonce = os.urandom(NONCE_LEN)
    tag = compute_tag(key, exid, key_id, epoch, nonce, daddr, dport, saddr, sport, bind)
    return encode_mac(kind, exid, key_id, epoch, nonce, tag)


@dataclass(frozen=True)
class Token:
    """A decoded netoken option.

    Fields that do not exist in the option's mode are None: `key_id`, `epoch_low`,
    `nonce` and `tag` for static mode, `token` for mac mode.
    """

    kind: int
    exid: int
    mode: Literal["mac", "static"]
    key_id: int | None
    epoch_low: int | None
    nonce: bytes | None
    tag: bytes | None
    token: int | None
    raw: bytes


def decode(option: bytes | bytearray | memoryview) -> Token:
    """Parse one netoken option (kind, len, ExID, body) into a Token.

    The mode is inferred from the length, which is the only thing on the wire that
    distinguishes them: 16 is mac, 12 is static, anything else is malformed.  The kind
    and ExID are reported, not checked, since both are configurable.
    """
    raw = bytes(option)
    if len(raw) < 4:
        raise MalformedOption(f"option too short ({len(raw)} bytes, need at least 4)")
    kind, length = raw[0], raw[1]
    if length != len(raw):
        raise MalformedOption(f"length byte says {length} but {len(raw)} bytes were given")
    exid = int.from_bytes(raw[2:4], "big")
    if length == MAC_LEN:
        return Token(
            kind=kind,
            exid=exid,
            mode="mac",
            key_id=raw[4],
            epoch_low=raw[5],
            nonce=raw[6 : 6 + NONCE_LEN],
            tag=raw[6 + NONCE_LEN : MAC_LEN],
            token=None,
            raw=raw,
        )
    if length == STATIC_LEN:
        return Token(
            kind=kind,
            exid=exid,
            mode="static",
            key_id=None,
            epoch_low=None,
            nonce=None,
            tag=None,
            token=int.from_bytes(raw[4:12], "big"),
            raw=raw,
        )
    raise MalformedOption(f"length {length} is neither {MAC_LEN} (mac) nor {STATIC_LEN} (static)")


def find_options(
    tcp_options: bytes | bytearray | memoryview,
    kind: int = DEFAULT_KIND,
    exid: int = DEFAULT_EXID,
) -> list[bytes]:
    """Every option in raw TCP option bytes whose kind is `kind` and ExID is `exid`.

    Walks the option list as a receiver must: EOL ends it, NOP is a single byte, every
    other option is kind/len with 2 <= len and the option inside the buffer; anything
    else raises MalformedOption because later options cannot be located reliably.
    An option of the right kind shorter than 4 bytes carries no ExID, so under RFC
    6994 it belongs to no one in particular and is skipped rather than matched.
    """
    data = bytes(tcp_options)
    want = exid.to_bytes(2, "big")
    found: list[bytes] = []
    i = 0
    while i < len(data):
        k = data[i]
        if k == _TCPOPT_EOL:
            break
        if k == _TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= len(data):
            raise MalformedOption(f"option kind {k} at offset {i} has no length byte")
        length = data[i + 1]
        if length < 2:
            raise MalformedOption(f"option kind {k} at offset {i} has length {length} < 2")
        if i + length > len(data):
            raise MalformedOption(
                f"option kind {k} at offset {i} has length {length}, "
                f"past the end of {len(data)} option bytes"
            )
        if k == kind and length >= 4 and data[i + 2 : i + 4] == want:
            found.append(data[i : i + length])
        i += length
    return found


# ------------------------------------------------------------------------- verify


def _mac_fields(tok: Token) -> tuple[int, int, bytes, bytes]:
    """(key id, epoch low byte, nonce, tag) of a mac-mode Token, typed as present."""
    if (
        tok.mode != "mac"
        or tok.key_id is None
        or tok.epoch_low is None
        or tok.nonce is None
        or tok.tag is None
    ):
        raise MalformedOption(f"expected a mac-mode option, got {tok.mode}")
    return tok.key_id, tok.epoch_low, tok.nonce, tok.tag


def verify(
    option: bytes | bytearray | memoryview,
    key: bytes,
    *,
    daddr: Addr,
    dport: int,
    saddr: Addr | None = None,
    sport: int | None = None,
    bind: int = 0,
    window: int = 30,
    now: float | None = None,
    skew: int = 1,
    exid: int = DEFAULT_EXID,
) -> tuple[bool, int]:
    """Check a mac-mode option against one key; return (ok, reconstructed full epoch).

    The full epoch is rebuilt from the option's low 8 bits around the local epoch
    (see expand_epoch), rejected if more than `skew` epochs away, and otherwise fed
    to the MAC.  The key id in the option is not looked up here: the caller chose
    `key`.  Raises MalformedOption if `option` is not a well-formed mac-mode option.
    """
    tok = decode(option)
    key_id, epoch_low, nonce, tag = _mac_fields(tok)
    current = epoch_now(window, now)
    epoch = expand_epoch(epoch_low, current)
    if tok.exid != exid:
        return False, epoch
    if _epoch_distance(epoch, current) > skew:
        return False, epoch
    expected = compute_tag(key, exid, key_id, epoch, nonce, daddr, dport, saddr, sport, bind)
    # Constant-time compare: the tag is the secret-derived part of the token.
    return hmac.compare_digest(expected, tag), epoch


def verdict(
    tcp_options: bytes | bytearray | memoryview,
    keys: Mapping[int, tuple[bytes, int, int]],
    *,
    daddr: Addr,
    dport: int,
    saddr: Addr | None = None,
    sport: int | None = None,
    now: float | None = None,
    skew: int = 1,
    kind: int = DEFAULT_KIND,
    exid: int = DEFAULT_EXID,
    static_tokens: set[int] | frozenset[int] | None = None,
) -> Verdict:
    """The guard's verdict on a SYN's raw TCP option bytes, as design.md §2 defines it.

    `keys` maps key id -> (key bytes, window seconds, bind bitmask), i.e. the keys
    accepted for this destination.  Checks run in the order the design lists them:
    exactly one option with our kind and ExID (none: 'missing'; several or a broken
    option list or length: 'malformed'), then for mac mode a known key id
    ('unknown_key'), an epoch within ±skew ('stale') and a matching tag ('bad_tag');
    a static-mode token is 'ok' only if it is in `static_tokens`.  Replay detection
    needs state across packets and is left to the guard.

    Unusable caller input (e.g. a key that binds saddr when no saddr is given) raises
    ValueError instead of producing a verdict, since it says nothing about the packet.
    """
    try:
        opts = find_options(tcp_options, kind, exid)
        if not opts:
            return "missing"
        if len(opts) > 1:
            return "malformed"
        tok = decode(opts[0])
    except MalformedOption:
        return "malformed"

    if tok.mode == "static":
        return "ok" if static_tokens and tok.token in static_tokens else "bad_tag"

    key_id, epoch_low, nonce, tag = _mac_fields(tok)
    entry = keys.get(key_id)
    if entry is None:
        return "unknown_key"
    key, window, bind = entry
    current = epoch_now(window, now)
    epoch = expand_epoch(epoch_low, current)
    if _epoch_distance(epoch, current) > skew:
        return "stale"
    expected = compute_tag(key, exid, key_id, epoch, nonce, daddr, dport, saddr, sport, bind)
    return "ok" if hmac.compare_digest(expected, tag) else "bad_tag"
