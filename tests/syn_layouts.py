"""TCP option layouts of real operating systems' SYNs, byte for byte.

Sources: p0f 3's fingerprint database (p0f.fp, [tcp:request]: Linux,
Windows, Mac OS X/iOS with its trailing `eol+1`, FreeBSD, OpenBSD), the
option writers of the stacks themselves (Linux tcp_options_write and
mptcp_options_write: `sok,ts` packing, NOP,NOP before a Fast Open option's
padding, MPTCP last; NetBSD tcp_output: SACK-permitted followed by NOP,NOP;
XNU tcp_output: MPTCP before the timestamps, EOL padding; FreeBSD
tcp_addoptions: EOL padding after a Fast Open cookie), and RFC 7413 (Fast
Open), RFC 8684 (MPTCP v1) and RFC 6824 (MPTCP v0, what iOS speaks).
"""

from __future__ import annotations

from dataclasses import dataclass

NOP, EOL = b"\x01", b"\x00"
SOK = b"\x04\x02"


def mss(v: int = 1460) -> bytes:
    return b"\x02\x04" + v.to_bytes(2, "big")


def ws(shift: int) -> bytes:
    return bytes((3, 3, shift))


def ts(val: int = 0x0A0B0C0D, ecr: int = 0) -> bytes:
    return b"\x08\x0a" + val.to_bytes(4, "big") + ecr.to_bytes(4, "big")


def fastopen(cookie: bytes = b"") -> bytes:
    return bytes((34, 2 + len(cookie))) + cookie


COOKIE8 = bytes.fromhex("5a1f0c3e9b7d2468")
COOKIE16 = bytes.fromhex("00112233445566778899aabbccddeeff")
MP_CAPABLE_V1 = bytes((30, 4, 0x01, 0x01))  # SYN: version 1, HMAC-SHA256
MP_JOIN = bytes((30, 12, 0x10, 0x02)) + bytes.fromhex("3c5a7e11") + bytes.fromhex("d00dfeed")
MP_CAPABLE_V0 = bytes((30, 12, 0x00, 0x81)) + bytes.fromhex("0123456789abcdef")  # key
MD5SIG = bytes((19, 18)) + bytes(range(16))


@dataclass(frozen=True)
class Layout:
    name: str
    options: bytes
    expect: str  # "fits", "make_room" (Timestamps removed) or "no_room"


LAYOUTS = [
    # Linux (and Android: the same stack)
    Layout("linux", mss() + SOK + ts() + NOP + ws(7), "fits"),
    Layout("linux-no-ts", mss() + NOP + NOP + SOK + NOP + ws(7), "fits"),
    Layout("linux-no-sack", mss() + NOP + NOP + ts() + NOP + ws(7), "fits"),
    Layout(
        "linux-tfo-cookie-request",
        mss() + SOK + ts() + NOP + ws(7) + fastopen() + NOP + NOP,
        "fits",
    ),
    Layout(
        "linux-tfo-cookie",
        mss() + SOK + ts() + NOP + ws(7) + fastopen(COOKIE8) + NOP + NOP,
        "make_room",
    ),
    Layout(
        "linux-tfo-cookie-no-ts",
        mss() + NOP + NOP + SOK + NOP + ws(7) + fastopen(COOKIE8) + NOP + NOP,
        "fits",
    ),
    Layout(
        "linux-tfo-16-byte-cookie",
        mss() + SOK + ts() + NOP + ws(7) + fastopen(COOKIE16) + NOP + NOP,
        "no_room",
    ),
    Layout("linux-mptcp-mp-capable", mss() + SOK + ts() + NOP + ws(7) + MP_CAPABLE_V1, "fits"),
    Layout("linux-mptcp-mp-join", mss() + SOK + ts() + NOP + ws(7) + MP_JOIN, "make_room"),
    Layout(
        "linux-mptcp-mp-join-no-sack", mss() + NOP + NOP + ts() + NOP + ws(7) + MP_JOIN, "make_room"
    ),
    Layout(
        "linux-mptcp-tfo",
        mss() + SOK + ts() + NOP + ws(7) + fastopen(COOKIE8) + NOP + NOP + MP_CAPABLE_V1,
        "make_room",
    ),
    Layout("linux-tcp-md5", NOP + NOP + MD5SIG + mss() + NOP + NOP + SOK + NOP + ws(7), "no_room"),
    Layout("android", mss(1400) + SOK + ts() + NOP + ws(9), "fits"),
    # Windows 10/11: no timestamps by default; with them when enabled
    Layout("windows", mss() + NOP + ws(8) + NOP + NOP + SOK, "fits"),
    Layout("windows-ts", mss() + NOP + ws(8) + NOP + NOP + ts() + NOP + NOP + SOK, "fits"),
    # macOS / iOS: EOL padding
    Layout("macos", mss() + NOP + ws(6) + NOP + NOP + ts() + SOK + EOL + EOL, "fits"),
    Layout("ios", mss() + NOP + ws(4) + NOP + NOP + ts() + SOK + EOL + EOL, "fits"),
    Layout(
        "macos-tfo-cookie",
        mss() + NOP + ws(6) + NOP + NOP + ts() + SOK + fastopen(COOKIE8),
        "make_room",
    ),
    Layout(
        "ios-mptcp-v0",
        mss() + NOP + ws(4) + MP_CAPABLE_V0 + NOP + NOP + ts() + SOK + EOL + EOL,
        "make_room",
    ),
    # the BSDs
    Layout("freebsd", mss() + NOP + ws(6) + SOK + ts(), "fits"),
    Layout(
        "freebsd-tfo-cookie",
        mss() + NOP + ws(6) + SOK + ts() + fastopen(COOKIE8) + EOL + EOL,
        "make_room",
    ),
    Layout("openbsd", mss() + NOP + NOP + SOK + NOP + ws(6) + NOP + NOP + ts(), "fits"),
    Layout("netbsd", mss() + NOP + ws(3) + SOK + NOP + NOP + NOP + NOP + ts(), "fits"),
]

for _l in LAYOUTS:
    assert len(_l.options) % 4 == 0 and len(_l.options) <= 40, _l.name


def option_list(options: bytes) -> list[bytes]:
    """The options (not NOP/EOL padding, nothing after EOL), each as its bytes."""
    out, i = [], 0
    while i < len(options) and options[i] != 0:
        if options[i] == 1:
            i += 1
            continue
        out.append(options[i : i + options[i + 1]])
        i += options[i + 1]
    return out
