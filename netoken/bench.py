"""Datapath micro-benchmarks over BPF_PROG_TEST_RUN.

Method: contenders run interleaved (round-robin, one sample each per round),
so machine noise lands on all of them alike; every contender has the empty
program of its type as the floor, measured in the same rounds.  The marker
edits packets and BPF_PROG_TEST_RUN with repeat > 1 would re-run it on the
already-edited skb, so mutating contenders take many repeat=1 samples; the
kernel's duration is then one run's time (ns), including the test_run
harness, which the floor shows.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from .libbpf import Program


@dataclass(frozen=True)
class Contender:
    name: str
    prog: Program
    packet: bytes
    repeat: int = 1          # >1 only for programs that never modify the packet
    floor: str | None = None  # name of the contender this one is compared to


@dataclass(frozen=True)
class Result:
    name: str
    median_ns: float
    p99_ns: float
    samples: int
    floor: str | None
    over_floor_ns: float | None = None


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


def run_interleaved(contenders: list[Contender], samples: int,
                    progress: Callable[[int], None] | None = None) -> list[Result]:
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for i in range(samples):
        for c in contenders:
            r = c.prog.test_run(c.packet, repeat=c.repeat)
            times[c.name].append(float(r.duration_ns))
        if progress and i % 100 == 0:
            progress(i)
    med = {n: statistics.median(t) for n, t in times.items()}
    out = []
    for c in contenders:
        over = med[c.name] - med[c.floor] if c.floor else None
        out.append(Result(c.name, med[c.name], _p99(times[c.name]), len(times[c.name]), c.floor,
                          over))
    return out


def _frame(dst: str, flags: str = "S", payload: bytes = b"", dport: int = 443,
           udp: bool = False) -> bytes:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    l3 = IPv6(src="2001:db8:1::1", dst=dst) if ":" in dst else IP(src="192.0.2.1", dst=dst)
    if udp:
        l4 = UDP(sport=40000, dport=dport)
    else:
        opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None),
                ("WScale", 7)] if flags == "S" else [("NOP", None), ("NOP", None),
                                                       ("Timestamp", (1, 1))]
        l4 = TCP(sport=40000, dport=dport, flags=flags, options=opts)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / l3 / l4 / payload)


# Destinations the benchmark config marks (mac / static) and leaves alone.
BENCH_POLICIES = """
[[policy]]
name = "mac"
destinations = ["198.51.100.0/24", "2001:db8:100::/64"]
ports = [443]
key = 1

[[policy]]
name = "static"
destinations = ["198.51.101.0/24"]
ports = [443]
mode = "static"
token = "0x1122334455667788"
"""


def marker_contenders(marker_prog: Program, empty_tc: Program) -> list[Contender]:
    f = "empty tc"
    return [
        Contender(f, empty_tc, _frame("198.51.100.7")),
        Contender("marker: IPv4 SYN, mac", marker_prog, _frame("198.51.100.7"), floor=f),
        Contender("marker: IPv4 SYN, static", marker_prog, _frame("198.51.101.7"), floor=f),
        Contender("marker: IPv6 SYN, mac", marker_prog, _frame("2001:db8:100::7"), floor=f),
        Contender("marker: SYN, no policy", marker_prog, _frame("203.0.113.7"), floor=f),
        Contender("marker: ACK, no payload", marker_prog, _frame("198.51.100.7", "A"), floor=f),
        Contender("marker: 1000-byte ACK", marker_prog,
                  _frame("198.51.100.7", "A", b"x" * 1000), floor=f),
        Contender("marker: 1500-byte ACK", marker_prog,
                  _frame("198.51.100.7", "A", b"x" * 1434), floor=f),
        Contender("marker: UDP", marker_prog, _frame("198.51.100.7", udp=True), floor=f),
    ]
