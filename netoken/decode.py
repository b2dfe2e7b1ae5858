"""`netoken decode`: every SYN in a capture, its netoken option, the guard's verdict.

Reads pcap and pcapng files itself rather than through scapy: scapy's readers
end quietly at a packet cut short, and "the capture stops in the middle of
packet 812" is exactly what an operator needs to hear about a capture copied
off a box while tcpdump was still writing.  Frames are parsed by hand too, so
that a broken header in one packet becomes a note on that packet instead of an
exception.

Given a :class:`~netoken.config.Config` with keys, each SYN gets the verdict
the guard would give at the moment the packet was captured (``now`` moves
that moment).  Decisions where docs/design.md is silent:

- With a ``[guard]`` section, a SYN is judged by the ``[[guard.protect]]``
  entry the guard would pick (most specific prefix with a matching port, as
  netoken/rules.py compiles it); SYNs to other destinations are
  ``unprotected``.  Without one, a SYN is judged as by a guard accepting every
  ``[[key]]`` and every static ``token`` of the config's policies, so a
  marker's own config checks what the marker sent.
- ``replay``: a mac token that verified and was already accepted earlier in
  the capture, per capture interface (pcapng interface, or the ifindex of a
  Linux "any" SLL2 capture), because ``tcpdump -i any`` on a router sees every
  forwarded SYN twice.  (The guard's cache is one per network namespace, so
  a token replayed on another interface of that host is a replay there.)
- ``action`` is what the config's ``[guard]`` says for the entry; a live
  guard attached with ``--mode`` overrides it, which only ``netoken status``
  knows.  The summary says so, and names each key's fingerprint, so a capture
  can be matched against ``status`` on the hosts without showing a key.
- Fragments carrying a SYN (the first one, which shows the TCP header) get
  what the guard gives every TCP fragment: ``fragment`` when a protect entry
  covers the destination address (any port), under the entry the guard picks
  (the first in LPM order that drops, else the first), and
  ``fragment_passed`` otherwise or with ``[guard] fragments = "pass"``.
  Likewise a SYN behind more IPv6 extension headers than the guard walks is
  ``ipv6_ext`` (or ``ipv6_ext_passed``).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from . import layout, token
from .config import DEFAULT_SKEW, Config, ConfigError, Protect
from .config import load as load_config
from .errors import NetokenError
from .present import endpoint

__all__ = [
    "FIELDS",
    "CaptureError",
    "TruncatedCapture",
    "add_arguments",
    "decode_capture",
    "format_table",
    "main",
    "run",
    "summary",
]

PROG = "netoken"

# Keys of every record decode_capture returns, in display order; absent
# values are None so `--json` consumers see the same shape for every SYN.
FIELDS = (
    "packet",
    "time",
    "family",
    "src",
    "sport",
    "dst",
    "dport",
    "kind",
    "exid",
    "mode",
    "key_id",
    "key_fingerprint",
    "epoch_low",
    "nonce",
    "tag",
    "token",
    "epoch",
    "epoch_offset",
    "protect",
    "verdict",
    "action",
    "problem",
)

LINKTYPES = {
    0: "NULL",
    1: "EN10MB",
    12: "RAW",
    14: "RAW",
    101: "RAW",
    113: "LINUX_SLL",
    228: "IPV4",
    229: "IPV6",
    276: "LINUX_SLL2",
}

_ETH_IPV4, _ETH_IPV6 = 0x0800, 0x86DD
_VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
_IPV6_SKIPPABLE = (0, 43, 60)  # Hop-by-Hop, Routing, Destination Options
_IPV6_AH = 51  # walked too, in 4-byte units
_IPV6_FRAGMENT = 44
_MAX_RECORD = 1 << 24  # no link layer has frames this large: corruption
_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000),
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"


class CaptureError(NetokenError):
    """A capture that cannot be read (one line, names the file)."""


class TruncatedCapture(CaptureError):
    """The capture ends in the middle of a packet.

    ``syns`` holds the records decoded before the cut, ``packets`` the number
    of complete packets read, so callers can still show them.
    """

    def __init__(self, message: str, syns: list[dict[str, Any]], packets: int) -> None:
        super().__init__(message)
        self.syns = syns
        self.packets = packets


class _Cut(Exception):
    """Raised by the readers at a cut; decode_capture adds the context."""


@dataclass(frozen=True)
class _Frame:
    number: int
    time: float
    linktype: int
    scope: object  # replay-cache scope: the capture interface
    data: bytes


# --------------------------------------------------------------------------- readers


def _read(f: IO[bytes], n: int, what: str) -> bytes:
    """Exactly N bytes, or b"" at a clean end of file; a partial read is a cut."""
    data = f.read(n)
    if data and len(data) < n:
        raise _Cut(f"{what} needs {n} bytes, only {len(data)} left")
    return data


def _frames(f: IO[bytes], path: str) -> Iterator[_Frame]:
    head = f.read(4)
    if head in _PCAP_MAGIC:
        yield from _pcap_frames(f, head, path)
    elif head == _PCAPNG_SHB:
        yield from _pcapng_frames(f, path)
    elif head[:2] == b"\x1f\x8b":
        raise CaptureError(f"{path}: gzip-compressed; gunzip it first")
    elif not head:
        raise CaptureError(f"{path}: empty file, not a capture")
    else:
        raise CaptureError(f"{path}: not a pcap or pcapng file (starts with {head.hex(' ')})")


def _pcap_frames(f: IO[bytes], magic: bytes, path: str) -> Iterator[_Frame]:
    endian, per_second = _PCAP_MAGIC[magic]
    rest = f.read(20)
    if len(rest) < 20:
        raise CaptureError(f"{path}: pcap file header cut short ({4 + len(rest)} of 24 bytes)")
    # The top bits of the link-type word carry FCS flags (pcap spec), not the type.
    linktype = struct.unpack(endian + "I", rest[16:20])[0] & 0xFFFF
    number = 0
    while True:
        hdr = _read(f, 16, f"the record header of packet {number + 1}")
        if not hdr:
            return
        sec, frac, caplen, _wirelen = struct.unpack(endian + "IIII", hdr)
        if caplen > _MAX_RECORD:
            raise CaptureError(
                f"{path}: packet {number + 1} claims {caplen} captured bytes; the file is corrupt"
            )
        data = f.read(caplen)
        if len(data) < caplen:
            raise _Cut(f"packet {number + 1} needs {caplen} bytes, only {len(data)} left")
        number += 1
        yield _Frame(number, sec + frac / per_second, linktype, None, data)


@dataclass
class _Iface:
    linktype: int
    snaplen: int
    per_second: float = 1_000_000.0
    offset: int = 0


def _pcapng_options(body: bytes, endian: str) -> Iterator[tuple[int, bytes]]:
    i = 0
    while i + 4 <= len(body):
        code, length = struct.unpack(endian + "HH", body[i : i + 4])
        if code == 0:  # opt_endofopt
            return
        yield code, body[i + 4 : i + 4 + length]
        i += 4 + length + (-length % 4)


def _pcapng_frames(f: IO[bytes], path: str) -> Iterator[_Frame]:
    endian = "<"
    ifaces: list[_Iface] = []
    section = 0
    number = 0
    pending = _PCAPNG_SHB  # the first block's type, already read by _frames
    while True:
        if pending:
            head, pending = pending + _read(f, 4, "the section header"), b""
        else:
            head = _read(f, 8, f"the block after packet {number}")
        if not head:
            return
        if head[:4] == _PCAPNG_SHB:
            # A new section may switch byte order, so its length can only be
            # read after the byte-order magic that follows it.
            bom = _read(f, 4, "a section header")
            if bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                raise CaptureError(f"{path}: pcapng section header has a bad byte-order magic")
            total = struct.unpack(endian + "I", head[4:8])[0]
            if total < 28 or total % 4 or total > _MAX_RECORD:
                raise CaptureError(f"{path}: pcapng section header has a bad length {total}")
            if len(f.read(total - 12)) < total - 12:
                raise _Cut("a section header is incomplete")
            ifaces = []
            section += 1
            continue
        btype, total = struct.unpack(endian + "II", head)
        if total < 12 or total % 4 or total > _MAX_RECORD:
            raise CaptureError(
                f"{path}: pcapng block of type {btype:#x} after packet {number} "
                f"has a bad length {total}; the file is corrupt"
            )
        what = f"packet {number + 1}" if btype in (2, 3, 6) else f"a block of type {btype:#x}"
        body = f.read(total - 8)
        if len(body) < total - 8:
            raise _Cut(f"{what} needs {total} bytes, only {8 + len(body)} left")
        body = body[:-4]  # the trailing copy of the length
        need = {1: 8, 2: 20, 3: 4, 6: 20}.get(btype, 0)
        if len(body) < need:
            raise CaptureError(
                f"{path}: {what} is shorter than its own header; the file is corrupt"
            )
        if btype == 1:  # Interface Description Block
            linktype, _, snaplen = struct.unpack(endian + "HHI", body[:8])
            iface = _Iface(linktype, snaplen or _MAX_RECORD)
            for code, value in _pcapng_options(body[8:], endian):
                if code == 9 and value:  # if_tsresol
                    r = value[0]
                    iface.per_second = float(2 ** (r & 0x7F) if r & 0x80 else 10**r)
                elif code == 14 and len(value) == 8:  # if_tsoffset
                    iface.offset = struct.unpack(endian + "q", value)[0]
            ifaces.append(iface)
            continue
        if btype == 6:  # Enhanced Packet Block
            ifid, hi, lo, caplen, _ = struct.unpack(endian + "IIIII", body[:20])
            data = body[20 : 20 + caplen]
        elif btype == 3:  # Simple Packet Block: interface 0, no timestamp
            ifid, hi, lo = 0, 0, 0
            wirelen = struct.unpack(endian + "I", body[:4])[0]
            data = body[4 : 4 + min(wirelen, ifaces[0].snaplen if ifaces else wirelen)]
        elif btype == 2:  # obsolete Packet Block
            ifid, _drops, hi, lo, caplen, _ = struct.unpack(endian + "HHIIII", body[:20])
            data = body[20 : 20 + caplen]
        else:
            continue  # statistics, name resolution, custom blocks: nothing to decode
        if ifid >= len(ifaces):
            raise CaptureError(
                f"{path}: {what} refers to interface {ifid}, which the file never describes"
            )
        iface = ifaces[ifid]
        number += 1
        ts = ((hi << 32) | lo) / iface.per_second + iface.offset
        yield _Frame(number, ts, iface.linktype, (section, ifid), data)


# ---------------------------------------------------------------------- dissection


@dataclass
class _Syn:
    family: int
    src: str
    dst: str
    sport: int
    dport: int
    saddr: bytes
    daddr: bytes
    options: bytes | None  # None: cut by the snapshot length
    problem: str | None
    fragment: bool
    deep: bool = False  # behind more IPv6 extension headers than the guard walks


def _network(linktype: int, data: bytes, scope: object) -> tuple[int, int, object] | None:
    """(family 4|6, offset of the IP header, replay scope) or None if not IP."""
    if linktype == 1:
        off = 14
        if len(data) < off:
            return None
        etype = struct.unpack("!H", data[12:14])[0]
        tags = 0
        while etype in _VLAN_TPIDS and tags < 4 and len(data) >= off + 4:
            etype = struct.unpack("!H", data[off + 2 : off + 4])[0]
            off += 4
            tags += 1
    elif linktype == 113:
        if len(data) < 16:
            return None
        off, etype = 16, struct.unpack("!H", data[14:16])[0]
    elif linktype == 276:
        if len(data) < 20:
            return None
        off, etype = 20, struct.unpack("!H", data[0:2])[0]
        scope = (scope, struct.unpack("!I", data[4:8])[0])
    elif linktype in (12, 14, 101, 228, 229):
        if not data:
            return None
        off, etype = 0, {4: _ETH_IPV4, 6: _ETH_IPV6}.get(data[0] >> 4, 0)
    elif linktype == 0:
        if len(data) < 4:
            return None
        # The address family is in the capturing host's byte order.
        afs = {struct.unpack("<I", data[:4])[0], struct.unpack(">I", data[:4])[0]}
        off = 4
        etype = _ETH_IPV4 if 2 in afs else _ETH_IPV6 if afs & {10, 24, 28, 30} else 0
    else:
        raise CaptureError(
            f"link type {linktype} is not supported (supported: "
            f"{', '.join(sorted(set(LINKTYPES.values())))})"
        )
    if etype == _ETH_IPV4:
        return 4, off, scope
    if etype == _ETH_IPV6:
        return 6, off, scope
    return None


def _syn(data: bytes, family: int, off: int) -> _Syn | None:
    """The SYN (not SYN-ACK) in DATA at OFF, or None for anything else."""
    fragment = deep = False
    if family == 4:
        if len(data) < off + 20 or data[off] >> 4 != 4:
            return None
        ihl = (data[off] & 0x0F) * 4
        tot_len, frag, proto = (
            struct.unpack("!H", data[off + 2 : off + 4])[0],
            struct.unpack("!H", data[off + 6 : off + 8])[0],
            data[off + 9],
        )
        if proto != 6 or ihl < 20 or frag & 0x1FFF:
            return None  # not TCP, or a later fragment with no TCP header
        fragment = bool(frag & 0x2000)
        saddr, daddr = data[off + 12 : off + 16], data[off + 16 : off + 20]
        l4, ip_end = off + ihl, off + tot_len
    else:
        if len(data) < off + 40 or data[off] >> 4 != 6:
            return None
        plen, nxt = struct.unpack("!H", data[off + 4 : off + 6])[0], data[off + 6]
        saddr, daddr = data[off + 8 : off + 24], data[off + 24 : off + 40]
        l4, ip_end = off + 40, off + 40 + plen
        walked = 0  # headers the guard walks before TCP or a Fragment header
        while len(data) >= l4 + 2:  # l4 grows every round
            if nxt in _IPV6_SKIPPABLE or nxt == _IPV6_AH:
                unit, extra = (4, 2) if nxt == _IPV6_AH else (8, 1)
                nxt, l4 = data[l4], l4 + (data[l4 + 1] + extra) * unit
                walked += not fragment
            elif nxt == _IPV6_FRAGMENT and len(data) >= l4 + 8:
                if struct.unpack("!H", data[l4 + 2 : l4 + 4])[0] & 0xFFF8:
                    return None
                fragment = True
                nxt, l4 = data[l4], l4 + 8
            else:
                break
        deep = walked > layout.MAX_IP6_EXT
        if nxt != 6:
            return None
    if len(data) < l4 + 14:
        return None  # flags not captured: cannot tell a SYN
    flags = data[l4 + 13]
    if not flags & 0x02 or flags & 0x10:
        return None
    sport, dport = struct.unpack("!HH", data[l4 : l4 + 4])
    doff = (data[l4 + 12] >> 4) * 4
    problem = None
    options: bytes | None = b""
    if doff < 20:
        problem = f"TCP data offset {doff} is below the 20-byte header"
    elif l4 + doff > ip_end:
        problem = f"TCP header ({doff} bytes) runs past the IP packet"
    elif l4 + doff > len(data):
        options, problem = None, "the capture's snapshot length cut the TCP options"
    else:
        options = data[l4 + 20 : l4 + doff]
    return _Syn(
        family,
        str(ipaddress.ip_address(saddr)),
        str(ipaddress.ip_address(daddr)),
        sport,
        dport,
        saddr,
        daddr,
        options,
        problem,
        fragment,
        deep,
    )


# ------------------------------------------------------------------------ judging


def _protect_for(cfg: Config, daddr: bytes, dport: int) -> tuple[int, Protect] | None:
    """The [[guard.protect]] entry (1-based index) the guard picks, or None.

    Most specific prefix that has a matching port; at equal prefixes the
    earlier entry, which is the order netoken/rules.py compiles them in.
    """
    assert cfg.guard is not None
    addr = ipaddress.ip_address(daddr)
    best: tuple[int, int, Protect] | None = None
    for i, entry in enumerate(cfg.guard.protect, 1):
        if entry.ports and not any(dport in r for r in entry.ports):
            continue
        for net in entry.destinations:
            better = best is None or net.prefixlen > best[0]
            if better and addr.version == net.version and addr in net:
                best = (net.prefixlen, i, entry)
    return None if best is None else (best[1], best[2])


def _protect_for_addr(cfg: Config, daddr: bytes) -> tuple[int, Protect] | None:
    """The entry a verdict without a port (fragment, ipv6_ext) falls under,
    or None if no entry covers DADDR: of the covering entries in LPM order
    (most specific prefix first, then config order), the first that drops,
    else the first."""
    assert cfg.guard is not None
    addr = ipaddress.ip_address(daddr)
    covering = sorted(
        (
            (-net.prefixlen, i, entry)
            for i, entry in enumerate(cfg.guard.protect, 1)
            for net in entry.destinations
            if addr.version == net.version and addr in net
        ),
        key=lambda c: c[:2],
    )
    for _, i, entry in covering:
        if cfg.guard.action_for(entry) == "drop":
            return i, entry
    return (covering[0][1], covering[0][2]) if covering else None


class _Judge:
    """The guard's decision for each SYN, including its replay cache."""

    def __init__(self, cfg: Config, now: float | None) -> None:
        self.cfg = cfg
        self.now = now
        self.seen: set[tuple[object, int, int, bytes, bytes]] = set()
        self.all_keys = {k.id: (k.secret, k.window, k.bind_mask) for k in cfg.keys.values()}
        self.all_tokens = frozenset(p.token for p in cfg.policies if p.token is not None)
        self.fingerprints = {k.id: token.key_fingerprint(k.secret) for k in cfg.keys.values()}

    def judge(self, rec: dict[str, Any], syn: _Syn, scope: object, ts: float) -> None:
        cfg = self.cfg
        at = ts if self.now is None else self.now
        skew = DEFAULT_SKEW
        keys: Mapping[int, tuple[bytes, int, int]] = self.all_keys
        tokens = self.all_tokens
        action: str | None = None
        if syn.fragment or syn.deep:
            # The guard cannot verify these: the destination address decides.
            verdict = "ipv6_ext" if syn.deep else "fragment"
            found = None
            if cfg.guard is not None and not (syn.fragment and cfg.guard.fragments == "pass"):
                found = _protect_for_addr(cfg, syn.daddr)
            if found is None:
                if cfg.guard is not None:
                    rec.update(verdict=f"{verdict}_passed", action="pass")
                else:
                    rec["verdict"] = verdict
                return
            assert cfg.guard is not None  # found: an entry covers it
            rec["protect"], entry = found
            rec.update(verdict=verdict, action=cfg.guard.action_for(entry))
            return
        if cfg.guard is not None:
            skew = cfg.guard.skew
            found = _protect_for(cfg, syn.daddr, syn.dport)
            if found is None:
                rec.update(verdict="unprotected", action="pass")
                return
            rec["protect"], entry = found
            keys = {k: self.all_keys[k] for k in entry.keys if k in self.all_keys}
            tokens = frozenset(entry.tokens)
            action = cfg.guard.action_for(entry)
        if syn.options is None:
            return  # cut by the snapshot length: no verdict is honest
        if syn.problem is not None:
            verdict = "malformed"
        else:
            verdict = token.verdict(
                syn.options,
                keys,
                daddr=syn.daddr,
                dport=syn.dport,
                saddr=syn.saddr,
                sport=syn.sport,
                now=at,
                skew=skew,
                kind=cfg.option.kind,
                exid=cfg.option.exid,
                static_tokens=tokens,
            )
        kid = rec["key_id"]
        if rec["mode"] == "mac":
            rec["key_fingerprint"] = self.fingerprints.get(kid)
        if rec["mode"] == "mac" and kid in cfg.keys:
            window = cfg.keys[kid].window
            current = token.epoch_now(window, at)
            epoch = token.expand_epoch(rec["epoch_low"], current)
            rec["epoch"] = epoch
            rec["epoch_offset"] = (epoch - current + (1 << 31)) % (1 << 32) - (1 << 31)
            if verdict == "ok":
                # Like the guard, remember only tokens that verified, so
                # forgeries cannot make a later real token look replayed.
                seen = (scope, kid, epoch, bytes.fromhex(rec["nonce"]), bytes.fromhex(rec["tag"]))
                if seen in self.seen:
                    verdict = "replay"
                self.seen.add(seen)
        rec["verdict"] = verdict
        if cfg.guard is not None:
            rec["action"] = "pass" if verdict == "ok" else action


def _describe(rec: dict[str, Any], syn: _Syn, kind: int, exid: int) -> None:
    """Fill the option fields of REC from the SYN's option bytes."""
    if syn.options is None or syn.problem is not None:
        return
    try:
        found = token.find_options(syn.options, kind, exid)
        if len(found) > 1:
            rec["problem"] = f"{len(found)} netoken options (the guard accepts exactly one)"
        if not found:
            return
        tok = token.decode(found[0])
    except token.MalformedOption as e:
        rec["problem"] = str(e)
        return
    rec.update(kind=tok.kind, exid=tok.exid, mode=tok.mode)
    if tok.mode == "mac":
        assert tok.nonce is not None and tok.tag is not None
        rec.update(
            key_id=tok.key_id, epoch_low=tok.epoch_low, nonce=tok.nonce.hex(), tag=tok.tag.hex()
        )
    else:
        assert tok.token is not None
        rec["token"] = f"0x{tok.token:016x}"


# ------------------------------------------------------------------------- public


def decode_capture(
    path: str | os.PathLike[str],
    config: Config | str | os.PathLike[str] | None = None,
    *,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """Every SYN (not SYN-ACK) in the pcap/pcapng file at PATH, in capture order.

    Each record has the keys in FIELDS.  With CONFIG (a Config or a path to
    one), ``verdict`` is what the guard would decide at the packet's capture
    time, or at NOW (Unix seconds) if given; ``epoch_offset`` is the token's
    epoch minus the epoch at that moment, which shows clock skew at a glance.
    Without CONFIG the verdict fields are None.

    Raises CaptureError for unreadable files and TruncatedCapture (with the
    SYNs read so far) when the file ends in the middle of a packet.
    """
    return _decode(path, config, now)[0]


def _decode(
    path: str | os.PathLike[str],
    config: Config | str | os.PathLike[str] | None,
    now: float | None,
) -> tuple[list[dict[str, Any]], int]:
    """decode_capture, plus the number of packets read (for the summary line)."""
    if config is not None and not isinstance(config, Config):
        config = load_config(config)
    kind = config.option.kind if config else token.DEFAULT_KIND
    exid = config.option.exid if config else token.DEFAULT_EXID
    judge = _Judge(config, now) if config else None
    name = str(path)
    out: list[dict[str, Any]] = []
    packets = 0
    try:
        with open(path, "rb") as f:
            try:
                for frame in _frames(f, name):
                    packets = frame.number
                    rec = _record(frame, name, kind, exid, judge)
                    if rec is not None:
                        out.append(rec)
            except _Cut as e:
                raise TruncatedCapture(
                    f"{name}: capture cut short after {packets} complete packet(s) ({e}); "
                    f"showing the {len(out)} SYN(s) before the cut",
                    out,
                    packets,
                ) from None
    except OSError as e:
        raise CaptureError(f"{name}: {e.strerror or e}") from None
    return out, packets


def _record(
    frame: _Frame, name: str, kind: int, exid: int, judge: _Judge | None
) -> dict[str, Any] | None:
    try:
        net = _network(frame.linktype, frame.data, frame.scope)
    except CaptureError as e:
        raise CaptureError(f"{name}: packet {frame.number}: {e}") from None
    if net is None:
        return None
    family, off, scope = net
    syn = _syn(frame.data, family, off)
    if syn is None:
        return None
    rec: dict[str, Any] = dict.fromkeys(FIELDS)
    rec.update(
        packet=frame.number,
        time=round(frame.time, 9),
        family=family,
        src=syn.src,
        sport=syn.sport,
        dst=syn.dst,
        dport=syn.dport,
        problem=syn.problem,
    )
    _describe(rec, syn, kind, exid)
    if judge is not None:
        judge.judge(rec, syn, scope, frame.time)
    return rec


# ---------------------------------------------------------------------------- CLI

_COLUMNS = (
    ("NO", "packet"),
    ("TIME", "time"),
    ("SOURCE", "src"),
    ("DESTINATION", "dst"),
    ("MODE", "mode"),
    ("KEY", "key_id"),
    ("EPOCH", "epoch_low"),
    ("SKEW", "epoch_offset"),
    ("NONCE", "nonce"),
    ("TAG/TOKEN", "tag"),
    ("VERDICT", "verdict"),
    ("ACTION", "action"),
    ("NOTE", "problem"),
)


def _cell(rec: dict[str, Any], field: str) -> str:
    v = rec.get(field)
    if field == "time":
        assert v is not None
        t = time.gmtime(v)
        return time.strftime("%H:%M:%S", t) + f".{int(v * 1e6) % 1_000_000:06d}"
    if field in ("src", "dst"):
        assert v is not None
        return endpoint(v, rec["sport" if field == "src" else "dport"])
    if field == "mode" and v is None:
        return "-" if rec["problem"] is None else "?"
    if field == "tag" and v is None:
        v = rec["token"]
    if field == "epoch_offset" and v is not None:
        return f"{v:+d}"
    return "" if v is None else str(v)


def format_table(records: list[dict[str, Any]], config: Config | None) -> list[str]:
    """Aligned columns (bcc-tools style); verdict columns only when they can be filled."""
    skip = set()
    if not any(r["problem"] for r in records):
        skip.add("problem")
    if config is None:
        skip |= {"epoch_offset", "verdict", "action"}
    elif config.guard is None:
        skip.add("action")
    cols = [(h, f) for h, f in _COLUMNS if f not in skip]
    rows = [[h for h, _ in cols]] + [[_cell(r, f) for _, f in cols] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def summary(records: list[dict[str, Any]], packets: int | None = None) -> str:
    """One line: how many SYNs, and how many of each verdict (or option mode)."""
    counts: dict[str, int] = {}
    for r in records:
        k = r["verdict"] or r["mode"] or ("malformed" if r["problem"] else "no option")
        counts[k] = counts.get(k, 0) + 1
    what = f"{len(records)} SYN(s)"
    if packets is not None:
        what += f" in {packets} packet(s)"
    detail = ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{what}: {detail}" if detail else what


def config_line(cfg: Config) -> str:
    """Where keys and actions come from: the config's key fingerprints (to
    compare with `netoken status` on each host) and the action's source."""
    fps = (
        ", ".join(
            f"{k.id} fp {token.key_fingerprint(k.secret)}"
            for k in sorted(cfg.keys.values(), key=lambda k: k.id)
        )
        or "none"
    )
    line = f"keys in {cfg.path}: {fps}"
    if cfg.guard is not None:
        line += (
            f"; ACTION is what [guard] in {cfg.path} says, not what a live guard does "
            f"(a --mode override shows in `netoken status`)"
        )
    return line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `netoken decode`: PCAP, -c/--config, --now, -j/--json, -p/--pretty.

    -j/-p are skipped when PARSER already has them (the main CLI adds them to
    every verb); run() reads them with getattr, defaulting to False.
    """
    parser.add_argument("pcap", metavar="PCAP", help="pcap or pcapng capture file")
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="TOML config whose keys (and [guard]) judge the tokens",
    )
    parser.add_argument(
        "--now",
        action="store_true",
        help="judge epochs against the current clock instead of each packet's capture time",
    )
    for flags, help_ in (
        (("-j", "--json"), "JSON list, one object per SYN"),
        (("-p", "--pretty"), "indented JSON (implies --json)"),
    ):
        try:
            parser.add_argument(*flags, action="store_true", help=help_)
        except argparse.ArgumentError:
            pass


def _note(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run `netoken decode` for parsed ARGS; returns the exit code.

    Errors are one line on stderr.  A truncated capture still prints what was
    read before the cut, then the error, and exits 1.
    """
    pretty = bool(getattr(args, "pretty", False))
    as_json = pretty or bool(getattr(args, "json", False))
    cfg = None
    packets: int | None = None
    error: str | None = None
    try:
        if getattr(args, "config", None):
            cfg = load_config(args.config)
        now = time.time() if getattr(args, "now", False) else None
        records, packets = _decode(args.pcap, cfg, now)
    except TruncatedCapture as e:
        records, packets, error = e.syns, e.packets, str(e)
    except (CaptureError, ConfigError) as e:
        _note(str(e))
        return 1
    if as_json:
        print(
            json.dumps(
                records, indent=2 if pretty else None, separators=None if pretty else (",", ":")
            ),
            flush=True,
        )
    else:
        if records:
            print("\n".join(format_table(records, cfg)))
        print(summary(records, packets), flush=True)
        if cfg is not None:
            print(config_line(cfg), flush=True)
    if error:
        _note(error)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m netoken.decode`: the verb on its own, until the CLI wires it."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} decode",
        description="List every SYN in a capture with its netoken option and verdict.",
        epilog="examples:\n  netoken decode syn.pcap\n  netoken decode syn.pcapng -c "
        "/etc/netoken/netoken.toml --json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
