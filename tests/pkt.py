"""Packet builders and independent checkers for datapath tests.

The checkers do not trust scapy's or the kernel's idea of a checksum: they
sum the bytes themselves (RFC 1071) so a wrong incremental update shows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import (
    HBHOptUnknown,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

from netoken import token

SRC_MAC, DST_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"


def inet_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@dataclass
class Parsed:
    """Offsets found by a parser that shares no code with the BPF program."""

    raw: bytes
    l3: int
    family: int
    l4: int
    tcp_len: int
    ip_end: int
    proto: int = 6  # IPv4 protocol / IPv6 upper-layer header (after HBH, RH, DO)

    @property
    def ihl(self) -> int:
        return self.l4 - self.l3

    @property
    def tcp(self) -> bytes:
        return self.raw[self.l4 : self.ip_end]

    @property
    def options(self) -> bytes:
        return self.raw[self.l4 + 20 : self.l4 + self.tcp_len]

    @property
    def payload(self) -> bytes:
        return self.raw[self.l4 + self.tcp_len : self.ip_end]

    @property
    def saddr(self) -> bytes:
        return (
            self.raw[self.l3 + 12 : self.l3 + 16]
            if self.family == 4
            else self.raw[self.l3 + 8 : self.l3 + 24]
        )

    @property
    def daddr(self) -> bytes:
        return (
            self.raw[self.l3 + 16 : self.l3 + 20]
            if self.family == 4
            else self.raw[self.l3 + 24 : self.l3 + 40]
        )

    @property
    def sport(self) -> int:
        return struct.unpack("!H", self.raw[self.l4 : self.l4 + 2])[0]

    @property
    def dport(self) -> int:
        return struct.unpack("!H", self.raw[self.l4 + 2 : self.l4 + 4])[0]

    def ip_checksum_ok(self) -> bool:
        return self.family == 6 or inet_sum(self.raw[self.l3 : self.l4]) == 0xFFFF

    def tcp_checksum_ok(self) -> bool:
        seg = self.tcp
        pseudo = self.saddr + self.daddr
        pseudo += (
            struct.pack("!HH", 6, len(seg))
            if self.family == 4
            else struct.pack("!IxxxB", len(seg), 6)
        )
        return inet_sum(pseudo + seg) == 0xFFFF


def parse(raw: bytes) -> Parsed:
    off = 14
    etype = struct.unpack("!H", raw[12:14])[0]
    while etype in (0x8100, 0x88A8):
        etype = struct.unpack("!H", raw[off + 2 : off + 4])[0]
        off += 4
    if etype == 0x0800:
        ihl = (raw[off] & 0x0F) * 4
        ip_end = off + struct.unpack("!H", raw[off + 2 : off + 4])[0]
        l4, family, proto = off + ihl, 4, raw[off + 9]
    else:
        assert etype == 0x86DD
        ip_end = off + 40 + struct.unpack("!H", raw[off + 4 : off + 6])[0]
        l4, family, proto = off + 40, 6, raw[off + 6]
        while proto in (0, 43, 60, 51):  # Hop-by-Hop, Routing, Destination Options, AH
            unit, extra = (4, 2) if proto == 51 else (8, 1)
            proto, l4 = raw[l4], l4 + (raw[l4 + 1] + extra) * unit
    tcp_len = (raw[l4 + 12] >> 4) * 4 if len(raw) > l4 + 12 else 0
    return Parsed(raw, off, family, l4, tcp_len, ip_end, proto)


def syn(
    dst: str = "198.51.100.7",
    dport: int = 443,
    src: str | None = None,
    sport: int = 40000,
    options=(),
    payload: bytes = b"",
    flags: str = "S",
    vlans: int = 0,
    ip_opts=None,
    ext=None,
    **ipkw,
) -> bytes:
    """An Ethernet frame carrying a TCP segment (v4 or v6 by the address;
    IPv6 behind the extension headers EXT, if given)."""
    if ":" in dst:
        l3 = IPv6(src=src or "2001:db8:1::1", dst=dst, **ipkw)
        if ext is not None:
            l3 = l3 / ext
    else:
        l3 = IP(src=src or "192.0.2.1", dst=dst, **ipkw)
        if ip_opts is not None:
            l3.options = ip_opts
    l2 = Ether(src=SRC_MAC, dst=DST_MAC)
    if vlans >= 2:
        l2 = l2 / Dot1AD(vlan=100) / Dot1Q(vlan=200)
    elif vlans == 1:
        l2 = l2 / Dot1Q(vlan=100)
    pkt = (
        l2
        / l3
        / TCP(sport=sport, dport=dport, flags=flags, seq=1000, window=64240, options=list(options))
    )
    if payload:
        pkt = pkt / payload
    return bytes(pkt)


def syn_with_options(options: bytes, payload: bytes = b"", **kw) -> bytes:
    """syn(**kw) whose TCP options are exactly OPTIONS (a multiple of 4 bytes)."""
    assert len(options) % 4 == 0 and len(options) <= 40
    return rebuild_with_option(syn(payload=payload, **kw), options)


LINUX_SYN_OPTS = [
    ("MSS", 1460),
    ("SAckOK", b""),
    ("Timestamp", (123, 0)),
    ("NOP", None),
    ("WScale", 7),
]  # 20 bytes, what Linux sends

# The same layout as raw option bytes (timestamps 0x01020304, 0x05060708).
LINUX_SYN_OPTS_RAW = b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + bytes(range(1, 9)) + b"\x01\x03\x03\x07"


def _skip_opt(n: int) -> HBHOptUnknown:
    return HBHOptUnknown(otype=0x1E, optdata=b"\0" * n)


def ext_chain(depth: int, seed: int = 0):
    """DEPTH IPv6 extension headers the kernel walks to reach TCP: Hop-by-Hop
    first (only there is it allowed), then Destination Options and Routing
    headers (type 0 and 253, segments left 0, which the kernel skips) in
    turn, of lengths that vary with SEED.  Lengths come from an unknown
    option of type 0x1E (RFC 4727: skip if unknown), as Linux refuses more
    than 7 bytes of padding in a row."""
    layers = [IPv6ExtHdrHopByHop(options=[_skip_opt(4 + 8 * (seed % 3))])]
    for i in range(1, depth):
        k = (i + seed) % 4
        if k == 0:
            layers.append(IPv6ExtHdrRouting(type=0, segleft=0, addresses=["2001:db8::99"]))
        elif k == 2:
            layers.append(IPv6ExtHdrRouting(type=253, segleft=0))
        else:
            layers.append(IPv6ExtHdrDestOpt(options=[_skip_opt(4 + 8 * (i % 2))]))
    chain = layers[0]
    for h in layers[1:]:
        chain = chain / h
    return chain


def ipv6_fragments(pkt, first: int, size: int, ident: int) -> list:
    """PKT (an IPv6 packet without extension headers) as fragments: the first
    carrying FIRST bytes of its payload, the others SIZE (multiples of 8)."""
    raw = bytes(pkt)
    head, payload = IPv6(raw[:40]), raw[40:]
    nh = head.nh
    out, off = [], 0
    while off < len(payload):
        n = first if off == 0 else size
        chunk = payload[off : off + n]
        more = off + n < len(payload)
        h = head.copy()
        h.nh, h.plen = 44, None
        out.append(h / IPv6ExtHdrFragment(nh=nh, offset=off // 8, m=int(more), id=ident) / chunk)
        off += n
    return out


def options_of_len(n: int):
    """TCP options totalling exactly N bytes (N multiple of 4, <= 40)."""
    base = {0: [], 20: LINUX_SYN_OPTS}
    if n in base:
        return base[n]
    return LINUX_SYN_OPTS + [("NOP", None)] * (n - 20)


def expected_marked(
    before: bytes,
    after: bytes,
    key: bytes,
    *,
    exid=token.DEFAULT_EXID,
    kind=token.DEFAULT_KIND,
    window=30,
    bind=0,
) -> bytes:
    """What the marker must output for BEFORE, built independently of the BPF code.

    The nonce and epoch come from AFTER (they are random/time-dependent); the
    tag, every length and both checksums are recomputed here from scratch.
    """
    b, a = parse(before), parse(after)
    opts = token.find_options(a.options, kind, exid)
    assert len(opts) == 1, f"expected exactly one netoken option, got {opts}"
    got = token.decode(opts[0])
    epoch = token.expand_epoch(got.epoch_low, token.epoch_now(window))
    tag = token.compute_tag(
        key,
        exid,
        got.key_id,
        epoch,
        got.nonce,
        b.daddr,
        b.dport,
        saddr=b.saddr,
        sport=b.sport,
        bind=bind,
    )
    option = token.encode_mac(kind, exid, got.key_id, epoch, got.nonce, tag)
    return rebuild_with_option(before, option)


def made_room(options: bytes, need: int) -> bytes | None:
    """design.md §3's make-room, built independently of the BPF code: OPTIONS
    without the Timestamps option and without NOP/EOL padding (nothing after
    EOL is an option), every other option byte for byte and in order,
    re-padded with NOPs to a multiple of 4 and to no less than
    len(OPTIONS) - NEED.  None if there is no Timestamps option or NEED more
    bytes still do not fit in 40."""
    kept, i, ts = [], 0, False
    while i < len(options) and options[i] != 0:
        if options[i] == 1:
            i += 1
            continue
        size = options[i + 1]
        if options[i] == 8 and size == 10:
            ts = True
        else:
            kept.append(options[i : i + size])
        i += size
    body = b"".join(kept)
    area = max(-(-len(body) // 4) * 4, len(options) - need)
    if not ts or area + need > 40:
        return None
    return body + b"\x01" * (area - len(body))


def rebuild_with_option(before: bytes, option: bytes) -> bytes:
    """BEFORE with OPTION added as the marker must add it: after the existing
    options (EOL and what follows become NOPs), or, when the TCP header
    would exceed 60 bytes, after the options made_room() leaves."""
    b = parse(before)
    old = bytearray(b.options)
    if b.tcp_len + len(option) > 60:
        room = made_room(bytes(old), len(option))
        assert room is not None, "no room even without timestamps"
        old = bytearray(room)
    # EOL ends the option list: from it on, bytes become NOPs so ours is seen.
    elif 0 in _kinds_until_eol(bytes(old)):
        i = _eol_index(bytes(old))
        old[i:] = b"\x01" * (len(old) - i)
    raw = bytearray(before[: b.l4 + 20] + bytes(old) + option + b.payload)
    grow = len(old) + len(option) - len(b.options)
    new_tcp_len = b.tcp_len + grow
    raw[b.l4 + 12] = (new_tcp_len // 4) << 4 | (raw[b.l4 + 12] & 0x0F)
    if b.family == 4:
        struct.pack_into("!H", raw, b.l3 + 2, b.ip_end - b.l3 + grow)
        struct.pack_into("!H", raw, b.l3 + 10, 0)
        struct.pack_into("!H", raw, b.l3 + 10, 0xFFFF - inet_sum(bytes(raw[b.l3 : b.l4])))
    else:
        struct.pack_into("!H", raw, b.l3 + 4, b.ip_end - b.l3 - 40 + grow)
    struct.pack_into("!H", raw, b.l4 + 16, 0)
    p = parse(bytes(raw))
    seg = p.tcp
    pseudo = p.saddr + p.daddr
    pseudo += (
        struct.pack("!HH", 6, len(seg)) if p.family == 4 else struct.pack("!IxxxB", len(seg), 6)
    )
    csum = 0xFFFF - inet_sum(pseudo + seg)
    struct.pack_into("!H", raw, b.l4 + 16, csum)
    return bytes(raw)


def _eol_index(opts: bytes) -> int:
    i = 0
    while i < len(opts):
        if opts[i] == 0:
            return i
        i += 1 if opts[i] == 1 else max(opts[i + 1], 2)
    return len(opts)


def _kinds_until_eol(opts: bytes) -> list[int]:
    i, kinds = 0, []
    while i < len(opts):
        kinds.append(opts[i])
        if opts[i] == 0:
            break
        i += 1 if opts[i] == 1 else max(opts[i + 1], 2)
    return kinds


def normalize_zero(raw: bytes) -> bytes:
    """Map checksum 0xFFFF to 0x0000 (the two zeros of ones' complement).

    An incremental update (RFC 1624) may legitimately produce either; both
    verify.  Normalising both sides keeps byte-for-byte comparisons honest.
    """
    p = parse(raw)
    out = bytearray(raw)
    offs = [p.l4 + 16] + ([p.l3 + 10] if p.family == 4 else [])
    for off in offs:
        if out[off : off + 2] == b"\xff\xff":
            out[off : off + 2] = b"\0\0"
    return bytes(out)
