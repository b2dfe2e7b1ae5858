"""What every part of the bench shares: progress, errors, statistics, a real
config, test packets, and a part's failure reported in its place."""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import config as nconfig
from ..errors import NetokenError

PARTS = ("datapath", "e2e", "control")

Progress = Callable[[str], None] | None


class BenchError(NetokenError):
    """The benchmark cannot run or would measure the wrong thing (one line)."""


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


# --------------------------------------------------------------------------
# statistics


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return float(s[min(len(s) - 1, round(q * (len(s) - 1)))])


def _p99(xs: Sequence[float]) -> float:
    return _quantile(xs, 0.99)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --------------------------------------------------------------------------
# configuration: a real TOML file and a freshly generated 0600 key


def bench_config(directory: Path, body: str, window: int = 30) -> nconfig.Config:
    """A Config loaded from DIRECTORY/netoken.toml: key 1 (generated, 0600) + BODY."""
    key = directory / "1.key"
    if not key.exists():
        nconfig.generate_key(key)
    path = directory / "netoken.toml"
    path.write_text(f'[[key]]\nid = 1\nfile = "{key}"\nwindow = {window}\n\n{body}')
    return nconfig.load(path)


def _frame(
    dst: str,
    flags: str = "S",
    payload: bytes = b"",
    dport: int = 443,
    udp: bool = False,
    ip_len: int | None = None,
    cookie: bytes = b"",
    ext: int = 0,
    fragment: bool = False,
    windows: bool = False,
) -> bytes:
    """An Ethernet frame as Linux would send it; IP_LEN pads the payload to
    that IP total length; COOKIE makes the SYN a TCP Fast Open SYN.  IPv6:
    behind EXT 8-byte Destination Options headers; IPv4: FRAGMENT makes it a
    first fragment (MF set).  WINDOWS: a SYN with Windows' option layout
    (MSS, NOP, WS, NOP, NOP, SACK permitted) in place of Linux's."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
    from scapy.layers.l2 import Ether

    if ":" in dst:
        l3 = IPv6(src="2001:db8:1::1", dst=dst)
        for _ in range(ext):
            l3 = l3 / IPv6ExtHdrDestOpt()
    else:
        l3 = IP(src="192.0.2.1", dst=dst, flags="MF" if fragment else 0)
    if udp:
        l4 = UDP(sport=40000, dport=dport)
    else:
        opts = (
            [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]
            if flags == "S"
            else [("NOP", None), ("NOP", None), ("Timestamp", (1, 1))]
        )
        if windows:
            opts = [
                ("MSS", 1460),
                ("NOP", None),
                ("WScale", 8),
                ("NOP", None),
                ("NOP", None),
                ("SAckOK", b""),
            ]
        if cookie:
            opts += [(34, cookie), ("NOP", None), ("NOP", None)]
        l4 = TCP(sport=40000, dport=dport, flags=flags, options=opts)
    if ip_len is not None:
        payload = b"x" * (ip_len - len(l3 / l4))
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / l3 / l4 / payload)


def _guarded(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """FN(*ARGS); a failure is reported in its place, so the other parts still run."""
    try:
        return fn(*args)
    except (BenchError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
