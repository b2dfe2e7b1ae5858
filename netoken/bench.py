"""`netoken bench`: what netoken costs, measured side by side.

Three parts, each usable on its own and all returned as plain data by
:func:`run_all` (``--json``) and printed by :func:`format_table`:

- **datapath**: the marker and the guard under BPF_PROG_TEST_RUN, each
  contender next to the empty program of its type (the floor: test_run's own
  skb / xdp_buff set-up and timer), interleaved (each round runs every
  contender once, in a freshly shuffled order) so machine noise lands on
  every contender alike.  The marker edits packets, and with
  repeat > 1 the kernel would re-run it on the already edited skb, so its
  contenders take many repeat=1 samples.  Non-mutating paths also run with a
  large repeat, which resolves differences of a few ns; the p99 of such
  samples is that of per-sample averages (machine noise), not a per-packet tail.
- **e2e**: real TCP between namespaces joined by veth pairs that the bench
  creates and always removes: connections per second without netoken, with
  the marker, with the marker and an empty XDP program (what native XDP on a
  veth costs by itself) and with the marker and the guard, in alternating
  rounds; iperf3 bulk throughput in the same configurations; a spoofed SYN
  flood (hping3 and trafgen) against the server with and without the guard,
  with the CPU the kernel spends on it.
- **control**: attach time, applying a 10,000-prefix policy set, cold-process
  latency of the CLI's `status` / `stats`, memory of `monitor` over a long
  event stream and the event rate it follows without loss.

Every figure is a median over rounds or samples taken in the same run;
ratios are per round (this configuration / the baseline of the same round).
bench/README.md explains the method and its caveats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import config as nconfig
from .datapath import object_path
from .libbpf import (
    BPF_TC_EGRESS,
    BPF_TC_INGRESS,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    BpfObject,
    Program,
    RingBuffer,
    run_time_stats,
    tc_hook_destroy,
    xdp_attach,
    xdp_detach,
)
from .netns import netns

Progress = Callable[[str], None] | None


class BenchError(Exception):
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


# --------------------------------------------------------------------------
# datapath micro-benchmarks


@dataclass(frozen=True)
class Contender:
    name: str
    prog: Program
    packet: bytes
    repeat: int = 1           # >1 only for paths that never modify the packet
    floor: str | None = None  # name of the contender this one is compared to
    # When set, sample i runs packets[i]: paths that change state per packet
    # (the guard's replay cache) are measured on first sight, not on repeats.
    packets: tuple[bytes, ...] = ()
    expect: str | None = None  # the counter reason this path must bump
    stats: Callable[[], dict[str, int]] | None = None  # counters EXPECT is read from
    before: Callable[[], None] | None = None  # untimed set-up before each sample

    def packet_at(self, i: int) -> bytes:
        return self.packets[i % len(self.packets)] if self.packets else self.packet


@dataclass(frozen=True)
class Result:
    name: str
    median_ns: float
    p99_ns: float
    samples: int
    floor: str | None
    over_floor_ns: float | None = None
    repeat: int = 1
    path: str | None = None


def run_interleaved(contenders: list[Contender], samples: int,
                    progress: Callable[[int], None] | None = None,
                    after_round: Callable[[], None] | None = None,
                    seed: int = 0) -> list[Result]:
    """SAMPLES rounds; each round runs every contender once, in an order
    shuffled anew each round: what ran just before a program (and left the
    caches and branch predictors to it) differs from sample to sample, for
    every contender alike."""
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    order = list(contenders)
    rng = random.Random(seed)
    for i in range(samples):
        rng.shuffle(order)
        for c in order:
            if c.before is not None:
                c.before()
            r = c.prog.test_run(c.packet_at(i), repeat=c.repeat)
            times[c.name].append(float(r.duration_ns))
        if after_round is not None:
            after_round()
        if progress and i % 100 == 0:
            progress(i)
    med = {name: _median(t) for name, t in times.items()}
    out = []
    for c in contenders:
        over = med[c.name] - med[c.floor] if c.floor else None
        out.append(Result(c.name, med[c.name], _p99(times[c.name]), len(times[c.name]), c.floor,
                          over, c.repeat, c.expect))
    return out


def _frame(dst: str, flags: str = "S", payload: bytes = b"", dport: int = 443,
           udp: bool = False, ip_len: int | None = None) -> bytes:
    """An Ethernet frame as Linux would send it; IP_LEN pads the payload to
    that IP total length."""
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
    if ip_len is not None:
        payload = b"x" * (ip_len - len(l3 / l4))
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / l3 / l4 / payload)


# Destinations the datapath config marks (mac / static), protects, and leaves alone.
V4, V4_STATIC, V6, V4_OTHER = "198.51.100.7", "198.51.101.7", "2001:db8:100::7", "203.0.113.7"
STATIC_TOKEN = "0x1122334455667788"

DATAPATH_CONFIG = f"""
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
token = "{STATIC_TOKEN}"

[guard]
action = "drop"
skew = 1
replay_cache = 1048576

[[guard.protect]]
destinations = ["198.51.100.0/24", "2001:db8:100::/64"]
ports = [443]
keys = [1]

[[guard.protect]]
destinations = ["198.51.101.0/24"]
ports = [443]
tokens = ["{STATIC_TOKEN}"]
"""

# Repeat counts for the paths that leave the packet alone: enough runs per
# sample that the kernel's ns-resolution average shows few-ns differences.
TC_REPEAT = 1000
XDP_REPEAT = 1000


def marker_contenders(marker_prog: Program, empty_tc: Program,
                      stats: Callable[[], dict[str, int]] | None = None,
                      drain: Callable[[], None] | None = None,
                      full_ring: tuple[Program, Callable[[], dict[str, int]]] | None = None,
                      ) -> list[Contender]:
    """The marker's paths at repeat=1, next to the empty TC program.

    A marked SYN writes an event.  The kernel wakes the ring buffer's reader
    (an irq_work) when the record lands in an empty ring, so that variant is
    measured on its own: DRAIN empties the ring before it, and the ring holds
    that record for the others.  FULL_RING is a second marker whose ring
    nobody reads, the state of every marker without a `monitor` running."""
    f = "empty tc"
    out = [
        Contender(f, empty_tc, _frame(V4)),
        Contender("marker: IPv4 SYN, mac", marker_prog, _frame(V4), floor=f, expect="marked",
                  stats=stats),
        Contender("marker: IPv4 SYN, static", marker_prog, _frame(V4_STATIC), floor=f,
                  expect="marked", stats=stats),
        Contender("marker: IPv6 SYN, mac", marker_prog, _frame(V6), floor=f, expect="marked",
                  stats=stats),
        Contender("marker: SYN, no policy", marker_prog, _frame(V4_OTHER), floor=f,
                  expect="no_policy", stats=stats),
        Contender("marker: ACK, no payload", marker_prog, _frame(V4, "A"), floor=f,
                  expect="not_syn", stats=stats),
        Contender("marker: 1500-byte ACK", marker_prog, _frame(V4, "A", ip_len=1500), floor=f,
                  expect="not_syn", stats=stats),
        Contender("marker: UDP", marker_prog, _frame(V4, udp=True), floor=f, expect="not_tcp",
                  stats=stats),
    ]
    if drain is not None:
        out.insert(4, Contender("marker: IPv4 SYN, mac, event wakes the reader", marker_prog,
                                _frame(V4), floor=f, expect="marked", stats=stats,
                                before=drain))
    if full_ring is not None:
        prog, full_stats = full_ring
        out.insert(4, Contender("marker: IPv4 SYN, mac, event ring full", prog, _frame(V4),
                                floor=f, expect="events_lost", stats=full_stats))
    return out


def marker_repeat_contenders(marker_prog: Program, empty_tc: Program,
                             repeat: int = TC_REPEAT) -> list[Contender]:
    """The marker's non-editing paths (everything but a marked SYN) at a large repeat."""
    f = "empty tc"
    return [
        Contender(f, empty_tc, _frame(V4), repeat),
        Contender("marker: SYN, no policy", marker_prog, _frame(V4_OTHER), repeat, f,
                  expect="no_policy"),
        Contender("marker: ACK, no payload", marker_prog, _frame(V4, "A"), repeat, f,
                  expect="not_syn"),
        Contender("marker: 1500-byte ACK", marker_prog, _frame(V4, "A", ip_len=1500), repeat, f,
                  expect="not_syn"),
        Contender("marker: UDP", marker_prog, _frame(V4, udp=True), repeat, f, expect="not_tcp"),
    ]


def _marked(marker_prog: Program, frame: bytes) -> bytes:
    return marker_prog.test_run(frame).data_out


def guard_contenders(guard_prog: Program, empty_xdp: Program, marker_prog: Program,
                     repeat: int = XDP_REPEAT) -> list[Contender]:
    """The guard's paths at a large repeat, next to the empty XDP program.

    A valid mac token is accepted once; every further run of the same packet
    is a `replay`, which is the guard's most expensive steady path (full MAC
    check and a replay-cache hit).  First sight is measured separately
    (guard_first_sight_contenders)."""
    f = "empty xdp"
    valid = _marked(marker_prog, _frame(V4))
    bad = bytearray(_marked(marker_prog, _frame(V4)))
    bad[-1] ^= 0xFF  # the tag's last byte: the option is the TCP header's tail
    return [
        Contender(f, empty_xdp, _frame(V4), repeat),
        Contender("guard: valid SYN, seen before (replay)", guard_prog, valid, repeat, f,
                  expect="replay"),
        Contender("guard: IPv6 valid SYN, seen before", guard_prog,
                  _marked(marker_prog, _frame(V6)), repeat, f, expect="replay"),
        Contender("guard: valid static-token SYN", guard_prog,
                  _marked(marker_prog, _frame(V4_STATIC)), repeat, f, expect="ok"),
        Contender("guard: SYN without token", guard_prog, _frame(V4), repeat, f,
                  expect="missing"),
        Contender("guard: SYN with bad tag", guard_prog, bytes(bad), repeat, f,
                  expect="bad_tag"),
        Contender("guard: ACK to protected port", guard_prog, _frame(V4, "A"), repeat, f,
                  expect="not_syn"),
        Contender("guard: SYN, unprotected destination", guard_prog, _frame(V4_OTHER), repeat,
                  f, expect="unprotected"),
        Contender("guard: UDP", guard_prog, _frame(V4, udp=True), repeat, f, expect="not_tcp"),
    ]


def guard_first_sight_contenders(guard_prog: Program, empty_xdp: Program,
                                 marker_prog: Program, n: int,
                                 drain: Callable[[], None]) -> tuple[list[Contender], int]:
    """Valid SYNs the guard has never seen, one run each (each is accepted
    and inserted into the replay cache), next to the empty XDP program and
    to a missing-token SYN at the same repeat=1; and how many marked SYNs
    had to be thrown away as repeats.

    Same flow, same epoch: two tokens differ only by their 32-bit nonce, so
    among n SYNs about n^2 / 2^33 repeat one (the guard would take the
    second for a replay)."""
    f = "empty xdp"
    fresh: list[bytes] = []
    seen: set[bytes] = set()
    repeats = 0
    while len(fresh) < n + 1:  # one more for the path check
        pkt = _marked(marker_prog, _frame(V4))
        if pkt in seen:
            repeats += 1
            continue
        seen.add(pkt)
        fresh.append(pkt)
        if len(fresh) % 1000 == 0:
            drain()
    return [
        Contender(f, empty_xdp, _frame(V4)),
        Contender("guard: valid SYN, first sight", guard_prog, fresh[0], floor=f,
                  packets=tuple(fresh[1:]), expect="ok"),
        Contender("guard: SYN without token", guard_prog, _frame(V4), floor=f,
                  expect="missing"),
    ], repeats


def _check_paths(contenders: list[Contender], stats: Callable[[], dict[str, int]]) -> None:
    """Run each contender once and make sure it takes the path its name says:
    a benchmark of the wrong branch is worse than none."""
    for c in contenders:
        if c.expect is None:
            continue
        counters = c.stats or stats
        if c.before is not None:
            c.before()
        before = counters()
        c.prog.test_run(c.packet)
        after = counters()
        if after[c.expect] - before[c.expect] != 1:
            got = [k for k in after if after[k] != before[k]]
            raise BenchError(f"{c.name}: expected the {c.expect!r} path, counted {got}")


def _tag() -> str:
    """Part of every namespace and interface name: the pid, in 5 digits so
    interface names stay within 15 characters."""
    return f"{os.getpid() % 100000:05d}"


def _fill_ring(marker: Any) -> None:
    """Mark SYNs until MARKER's event ring is full (events_lost starts counting)."""
    pkt = _frame(V4)
    for _ in range(100):
        marker.prog.test_run(pkt, repeat=1)
        if marker.stats()["events_lost"]:
            return
        for _ in range(100):
            marker.prog.test_run(pkt)
    raise BenchError("the marker's event ring never filled up")


@contextmanager
def _xdp_parking(progs: list[Program]) -> Iterator[bool]:
    """Keep PROGS attached (native XDP) to a down veth pair in a private namespace.

    BPF_PROG_TEST_RUN with repeat > 1 puts an XDP program into the kernel's
    XDP dispatcher for the run and takes it out after, two RCU grace periods
    (~20 ms here) per call.  A program that is attached somewhere is already
    in the dispatcher, so the calls cost only their runs; the timed loop is
    the same.  Yields False (and parks nothing) where no namespace can be made.
    """
    if len(progs) > 2:
        raise ValueError("one veth pair parks two programs")
    ns = f"ntbench-{_tag()}-park"
    devs = (f"ntbp{_tag()}a", f"ntbp{_tag()}b")
    made = parked = False
    try:
        made = _ip("netns", "add", ns, check=False).returncode == 0
        if made:
            _ip("link", "add", devs[0], "type", "veth", "peer", "name", devs[1], ns=ns)
            with netns(ns):
                for dev, prog in zip(devs, progs):
                    xdp_attach(socket.if_nametoindex(dev), prog,
                               XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST)
            parked = True
    except (OSError, BenchError):
        parked = False
    try:
        yield parked
    finally:
        if made:
            # Deleting the namespace deletes the veths and detaches the programs.
            _ip("netns", "del", ns, check=False)


@contextmanager
def _pinned_to_one_cpu() -> Iterator[int]:
    """test_run runs on the calling CPU: keep every sample on the same one."""
    before = os.sched_getaffinity(0)
    cpu = max(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def datapath(quick: bool = False, samples: int | None = None,
             progress: Progress = None) -> dict[str, Any]:
    """The datapath micro-benchmarks; SAMPLES overrides every group's sample count."""
    from .guard import Guard
    from .marker import Marker

    n1 = samples or (3000 if quick else 20000)   # repeat=1 groups
    nr = samples or (300 if quick else 3000)     # large-repeat groups
    groups: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="netoken-bench-")))
        cfg = bench_config(tmp, DATAPATH_CONFIG)
        assert cfg.guard is not None
        empty = stack.enter_context(BpfObject.open(object_path("empty")))
        empty.load()
        empty_tc, empty_xdp = empty.program("netoken_empty_tc"), empty.program("netoken_empty_xdp")
        marker = stack.enter_context(Marker.load())
        marker.configure(cfg)
        guard = stack.enter_context(Guard.load(replay_cache=cfg.guard.replay_cache))
        guard.configure(cfg)
        # Events are read (and thrown away) only where a contender says so:
        # how full the ring is decides the marker's path (see marker_contenders).
        mark_ring = stack.enter_context(RingBuffer(marker.maps["nt_mark_events"], lambda _b: None))
        guard_ring = stack.enter_context(RingBuffer(guard.maps["nt_guard_events"],
                                                    lambda _b: None))
        full = stack.enter_context(Marker.load())
        full.configure(cfg)
        _fill_ring(full)

        parked = stack.enter_context(_xdp_parking([empty_xdp, guard.prog]))
        # Without parking every XDP sample costs ~20 ms of harness: fewer samples.
        nx = nr if parked else min(nr, 50)
        cpu = stack.enter_context(_pinned_to_one_cpu())

        def group(title: str, contenders: list[Contender], n: int,
                  stats: Callable[[], dict[str, int]]) -> None:
            _check_paths(contenders, stats)
            _say(progress, f"datapath: {title} ({n} rounds x {len(contenders)})")
            rows = run_interleaved(contenders, n)
            groups.append({"title": title, "samples": n, "repeat": contenders[-1].repeat,
                           "rows": [asdict(r) for r in rows]})

        group("marker (TC egress), one run per sample",
              marker_contenders(marker.prog, empty_tc, marker.stats, mark_ring.consume,
                                (full.prog, full.stats)), n1, marker.stats)
        group(f"marker, paths that leave the packet alone, {TC_REPEAT} runs per sample",
              marker_repeat_contenders(marker.prog, empty_tc), nr, marker.stats)

        gc = guard_contenders(guard.prog, empty_xdp, marker.prog)
        for c in gc:
            if c.expect == "replay":
                c.prog.test_run(c.packet)  # first sight: every later run is a replay

        def spend_event_budget() -> None:
            # Rejected SYNs write events at <= event_rate per second after a
            # burst: spend the burst, so they take the path of a flood (event
            # suppressed), and leave its events in the ring, so the few that
            # get written later wake nobody (the marker group measures that).
            guard_ring.consume()
            guard.prog.test_run(_frame(V4), repeat=1000)

        spend_event_budget()
        group(f"guard (XDP), {XDP_REPEAT} runs per sample", gc, nx, guard.stats)
        first, repeats = guard_first_sight_contenders(guard.prog, empty_xdp, marker.prog, n1,
                                                      mark_ring.consume)
        spend_event_budget()
        before = guard.stats()
        group("guard, valid SYNs on first sight, one run per sample", first, n1, guard.stats)
        after = guard.stats()
        # ok: the path check's packet plus one per sample; anything else would
        # mean the first-sight samples were not first sight.
        if after["ok"] - before["ok"] != n1 + 1 or after["replay"] != before["replay"]:
            raise BenchError("first-sight SYNs were not all accepted on first sight")
    return {"groups": groups, "cpu": cpu, "xdp_parked": parked,
            "replay_cache": cfg.guard.replay_cache, "first_sight_repeated_tokens": repeats}


# --------------------------------------------------------------------------
# namespaces, links and processes the bench owns


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and r.returncode:
        raise BenchError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def _in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


class Lab:
    """Namespaces, veth pairs and processes; close() removes them all.

    Names carry the pid, so two benches (or a bench and the test suite) on
    one machine never collide.  Processes are killed before the namespaces
    go: a namespace with a process in it would outlive `ip netns del`.
    """

    def __init__(self) -> None:
        self.tag = _tag()
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._links = 0

    def ns(self, role: str) -> str:
        name = f"ntbench-{self.tag}-{role}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("link", "set", "lo", "up", ns=name)
        return name

    def link(self, a: str, b: str, a_cidr: str, b_cidr: str) -> tuple[str, str]:
        """A veth pair, one end in A and one in B, addressed and up."""
        self._links += 1
        ia, ib = f"ntb{self.tag}{self._links}a", f"ntb{self.tag}{self._links}b"
        _ip("link", "add", ia, "netns", a, "type", "veth", "peer", "name", ib, "netns", b)
        for ns, dev, cidr in ((a, ia, a_cidr), (b, ib, b_cidr)):
            _ip("addr", "add", cidr, "dev", dev, ns=ns)
            _ip("link", "set", dev, "up", ns=ns)
        return ia, ib

    def spawn(self, ns: str, *cmd: str, **kw: Any) -> subprocess.Popen:
        """CMD in namespace NS, in a process group of its own, so close() can
        end it with every child it forked (trafgen's workers outlive their
        parent when it fails)."""
        p = subprocess.Popen(_in_ns(ns, *cmd), start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        self.procs.clear()
        for name in reversed(self.namespaces):
            _ip("netns", "del", name, check=False)
        self.namespaces.clear()


@contextmanager
def lab() -> Iterator[Lab]:
    lb = Lab()
    try:
        yield lb
    finally:
        lb.close()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM gets the clean-up of Ctrl-C (namespaces, pins, processes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


# --------------------------------------------------------------------------
# end to end: workers (run as `python -c` inside a namespace)

# Connect, one byte each way, close.  SO_LINGER 0 makes the close an RST, so
# neither side keeps TIME_WAIT sockets and ports never run out; every
# connection still makes the full handshake the marker and guard act on.
# Each stdin line "SECONDS RATE" is one burst (RATE 0: as fast as it can);
# the worker stays up between bursts, so a round costs no process start.
_CRR_WORKER = r"""
import json, socket, struct, sys, time
addr, port = sys.argv[1], int(sys.argv[2])
linger = struct.pack("ii", 1, 0)
print("ready", flush=True)
for line in sys.stdin:
    seconds, rate = (float(x) for x in line.split())
    ok = fail = 0
    lat = []
    start = time.monotonic()
    end = start + seconds
    while (t0 := time.monotonic()) < end:
        if rate:
            wait = start + (ok + fail) / rate - t0
            if wait > 0:
                time.sleep(min(wait, end - t0))
                continue
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.settimeout(1.0)
        try:
            s.connect((addr, port))
            lat.append(time.monotonic() - t0)
            s.sendall(b"x")
            if s.recv(1) == b"x":
                ok += 1
            else:
                fail += 1
        except OSError:
            fail += 1
        finally:
            s.close()
    lat.sort()
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6) if lat else None
    print(json.dumps({"ok": ok, "fail": fail, "seconds": time.monotonic() - start,
                      "connect_us_median": q(0.5), "connect_us_p99": q(0.99)}), flush=True)
"""


class Clients:
    """Connection workers in a namespace, one process each, kept between bursts."""

    def __init__(self, lb: Lab, ns: str, addr: str, n: int) -> None:
        self.procs = [lb.spawn(ns, sys.executable, "-c", _CRR_WORKER, addr, str(PORT),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for _ in range(n)]
        for p in self.procs:
            if _readline(p, 15) != "ready":
                raise BenchError("a connection worker did not start")

    def start(self, seconds: float, rate: float = 0.0) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(f"{seconds} {rate}\n")
            p.stdin.flush()

    def collect(self, seconds: float) -> dict[str, Any]:
        """Connections/s over the burst started last, summed over the workers."""
        ok = fail = 0
        runs = []
        for p in self.procs:
            line = _readline(p, seconds + 30)
            try:
                d = json.loads(line)
            except ValueError:
                raise BenchError(f"a connection worker failed: {line!r}") from None
            ok += d["ok"]
            fail += d["fail"]
            runs.append(d)
        one = runs[0] if len(runs) == 1 else {}
        return {"cps": ok / seconds, "ok": ok, "failed": fail,
                "connect_us_median": one.get("connect_us_median"),
                "connect_us_p99": one.get("connect_us_p99")}

    def burst(self, seconds: float, rate: float = 0.0) -> dict[str, Any]:
        self.start(seconds, rate)
        return self.collect(seconds)

    def close(self) -> None:
        """End of input: the workers exit (Lab.close kills any that do not)."""
        for p in self.procs:
            with contextlib.suppress(OSError):
                if p.stdin is not None:
                    p.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


def _readline(p: subprocess.Popen, timeout: float) -> str:
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline().strip() if ready else ""


_CRR_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.settimeout(1.0)
        if c.recv(1):
            c.sendall(b"x")
    except OSError:
        pass
    finally:
        c.close()
"""

PORT = 8080
IPERF_PORT = 5201
NET_CS, NET_AS = "198.18.210", "198.18.211"   # client-server and attacker-server links
SERVER_C, SERVER_A = f"{NET_CS}.2", f"{NET_AS}.2"

E2E_CONFIG = f"""
[[policy]]
name = "bench"
destinations = ["{SERVER_C}/32", "{SERVER_A}/32"]
key = 1

[guard]
action = "drop"
replay_cache = 1048576

[[guard.protect]]
destinations = ["{SERVER_C}/32", "{SERVER_A}/32"]
ports = [{PORT}, {IPERF_PORT}]
keys = [1]
"""

# Configuration name -> (marker on the client, XDP program on the server).
# "none, again" is the baseline measured twice: its ratio to "none" is what
# the rounds' noise alone makes of nothing.
CONFIGS: dict[str, tuple[bool, str | None]] = {
    "none": (False, None),
    "none, again": (False, None),
    "marker": (True, None),
    "marker + empty xdp": (True, "empty"),
    "marker + guard": (True, "guard"),
}
# The order within a round (rotated every round): the repeated baseline sits
# as far from "none" as the other configurations do, so its ratio carries the
# same drift.
ROUND_CYCLE = ("none", "marker", "none, again", "marker + empty xdp", "marker + guard")
# The flood runs with the marker on, for the legitimate client.
FLOOD_CONFIGS: dict[str, tuple[bool, str | None]] = {
    "no XDP": (True, None),
    "empty XDP": (True, "empty"),
    "guard": (True, "guard"),
}


class E2E:
    """The lab for the end-to-end figures, and its switchable configurations.

        client ──veth── server ──veth── attacker
        marker on the client's egress; guard (or an empty XDP program, the
        floor) on both of the server's interfaces, native mode.
    """

    def __init__(self, stack: ExitStack, tmp: Path) -> None:
        from .guard import Guard
        from .marker import Marker

        self.lab = stack.enter_context(lab())
        self.cl, self.sv, self.at = self.lab.ns("cl"), self.lab.ns("sv"), self.lab.ns("at")
        self.cl_if, self.sv_c = self.lab.link(self.cl, self.sv, f"{NET_CS}.1/24",
                                              f"{SERVER_C}/24")
        self.at_if, self.sv_a = self.lab.link(self.at, self.sv, f"{NET_AS}.1/24",
                                              f"{SERVER_A}/24")
        # SYN-ACKs to spoofed sources really leave (backscatter is part of
        # what a flood costs the server) and die in the attacker namespace.
        _ip("route", "add", "default", "via", f"{NET_AS}.1", ns=self.sv)
        for src in (self.cl, self.at):
            subprocess.run(_in_ns(src, "ping", "-c", "1", "-W", "2",
                                  SERVER_C if src == self.cl else SERVER_A),
                           capture_output=True, check=False)
        self.cfg = bench_config(tmp, E2E_CONFIG)
        assert self.cfg.guard is not None
        self.marker = stack.enter_context(Marker.load())
        self.marker.configure(self.cfg)
        self.guard = stack.enter_context(Guard.load(replay_cache=self.cfg.guard.replay_cache))
        self.guard.configure(self.cfg)
        empty = stack.enter_context(BpfObject.open(object_path("empty")))
        empty.load()
        self.empty_xdp = empty.program("netoken_empty_xdp")
        self.current: tuple[bool, str | None] = (False, None)  # a fresh lab
        self.servers: list[subprocess.Popen] = []

    # -- configurations ---------------------------------------------------

    def _xdp(self, what: str | None) -> None:
        with netns(self.sv):
            for dev in (self.sv_c, self.sv_a):
                idx = socket.if_nametoindex(dev)
                with contextlib.suppress(OSError):
                    xdp_detach(idx, XDP_FLAGS_DRV_MODE)
                if what == "guard":
                    self.guard.attach(dev, "native")
                elif what == "empty":
                    xdp_attach(idx, self.empty_xdp,
                               XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST)

    def _marker(self, on: bool) -> None:
        from . import marker as marker_mod

        with netns(self.cl):
            if on:
                self.marker.attach(self.cl_if)
                return
            marker_mod.detach(self.cl_if)
            # An empty clsact qdisc still costs every packet a classify call:
            # the baseline has none.
            with contextlib.suppress(OSError):
                tc_hook_destroy(socket.if_nametoindex(self.cl_if),
                                BPF_TC_INGRESS | BPF_TC_EGRESS)

    def use(self, marker: bool, xdp: str | None) -> None:
        """Marker on the client or not; XDP on the server: None, "empty", "guard"."""
        if self.current[0] != marker:
            self._marker(marker)
        if self.current[1] != xdp:
            self._xdp(xdp)
        self.current = (marker, xdp)

    # -- servers and workers ----------------------------------------------

    def start_servers(self, n: int) -> None:
        """N listeners (SO_REUSEPORT) in the server namespace, replacing any
        earlier ones: a new listener starts with an empty SYN queue."""
        for p in self.servers:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self.servers = []
        for _ in range(n):
            p = self.lab.spawn(self.sv, sys.executable, "-c", _CRR_SERVER, str(PORT),
                               stdout=subprocess.PIPE, text=True)
            if _readline(p, 15) != "ready":
                raise BenchError("the benchmark's TCP server did not start")
            self.servers.append(p)


def _rounds_order(configs: Sequence[str], r: int) -> list[str]:
    k = r % len(configs)
    return list(configs[k:]) + list(configs[:k])


def _paired(per_round: dict[str, list[float]], base: str = "none") -> dict[str, Any]:
    """Median per configuration and the median of per-round ratios to BASE."""
    out: dict[str, Any] = {}
    for cfg, xs in per_round.items():
        ratios = [x / b for x, b in zip(xs, per_round[base]) if b]
        out[cfg] = {"rounds": xs, "median": _median(xs),
                    "ratio": _median(ratios) if ratios else None,
                    "ratio_min": min(ratios) if ratios else None,
                    "ratio_max": max(ratios) if ratios else None}
    return out


def e2e_connections(e: E2E, rounds: int, seconds: float, progress: Progress) -> dict[str, Any]:
    workers = max(1, len(os.sched_getaffinity(0)))
    clients = Clients(e.lab, e.cl, SERVER_C, workers)
    per: dict[str, list[float]] = {c: [] for c in CONFIGS}
    failed: dict[str, int] = dict.fromkeys(CONFIGS, 0)
    g0, m0 = e.guard.stats(), e.marker.stats()
    for r in range(rounds):
        _say(progress, f"e2e: connections/s, round {r + 1}/{rounds}")
        for cfg in _rounds_order(ROUND_CYCLE, r):
            e.use(*CONFIGS[cfg])
            res = clients.burst(seconds)
            per[cfg].append(res["cps"])
            failed[cfg] += int(res["failed"])
    g1, m1 = e.guard.stats(), e.marker.stats()
    out = _paired(per)
    for cfg in CONFIGS:
        out[cfg]["failed"] = failed[cfg]
    from . import layout

    _say(progress, "e2e: connections/s, marker + guard with BPF run-time stats")
    return {"workers": workers, "seconds": seconds, "rounds": rounds, "configs": out,
            "marker_marked": m1["marked"] - m0["marked"],
            "guard_verdicts": {k: g1[k] - g0[k] for k in layout.GUARD_VERDICTS
                               if g1[k] != g0[k]},
            "guard_rejected": g1["dropped"] - g0["dropped"],
            "in_situ": _in_situ(e, clients, max(1.0, seconds * 2))}


def _in_situ(e: E2E, clients: Clients, seconds: float) -> dict[str, Any]:
    """What the programs cost on the real path, per run and per connection,
    from the kernel's run-time stats (a separate burst: the stats add two
    clock reads to every run, which the rounds above should not carry)."""
    e.use(True, "guard")
    with run_time_stats():
        before = {n: p.run_stats() for n, p in (("marker", e.marker.prog),
                                                 ("guard", e.guard.prog))}
        res = clients.burst(seconds)
        after = {n: p.run_stats() for n, p in (("marker", e.marker.prog),
                                                ("guard", e.guard.prog))}
    out: dict[str, Any] = {"connections": res["ok"], "seconds": seconds}
    for n, b in before.items():
        runs = after[n].run_cnt - b.run_cnt
        ns = after[n].run_time_ns - b.run_time_ns
        out[n] = {"runs_per_connection": runs / res["ok"] if res["ok"] else None,
                  "ns_per_run": ns / runs if runs else None,
                  "ns_per_connection": ns / res["ok"] if res["ok"] else None}
    return out


def e2e_iperf(e: E2E, rounds: int, seconds: int, progress: Progress) -> dict[str, Any]:
    if shutil.which("iperf3") is None:
        return {"error": "iperf3 is not installed"}
    e.lab.spawn(e.sv, "iperf3", "-s", "-p", str(IPERF_PORT), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
    # iperf3 runs OMIT seconds of warm-up (slow start, GRO settling) before
    # the SECONDS it reports.
    omit = 1
    per: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for r in range(rounds):
        _say(progress, f"e2e: iperf3, round {r + 1}/{rounds}")
        for cfg in _rounds_order(ROUND_CYCLE, r):
            e.use(*CONFIGS[cfg])
            per[cfg].append(_iperf_once(e, seconds, omit))
    # The marker's own cost on bulk traffic, from the kernel's run-time stats
    # (a separate run: the stats add two clock reads to every run).
    e.use(True, None)
    with run_time_stats():
        r0 = e.marker.prog.run_stats()
        gbps = _iperf_once(e, seconds, omit)
        r1 = e.marker.prog.run_stats()
    runs, ns = r1.run_cnt - r0.run_cnt, r1.run_time_ns - r0.run_time_ns
    in_situ = {"gbps": gbps, "runs_per_s": runs / (seconds + omit),
               "ns_per_run": ns / runs if runs else None,
               "cpu_share": ns / 1e9 / (seconds + omit)}
    return {"seconds": seconds, "warmup_seconds": omit, "rounds": rounds, "streams": 1,
            "configs": _paired(per), "marker_in_situ": in_situ}


def _iperf_once(e: E2E, seconds: int, omit: int) -> float:
    """Gbit/s the receiver saw; retried while the server is still starting."""
    err = ""
    for _ in range(20):
        r = subprocess.run(_in_ns(e.cl, "iperf3", "-c", SERVER_C, "-p", str(IPERF_PORT),
                                  "-t", str(seconds), "-O", str(omit), "-J"),
                           capture_output=True, text=True, check=False,
                           timeout=seconds + omit + 30)
        try:
            d = json.loads(r.stdout)
        except ValueError:
            d = {"error": r.stderr.strip() or "no output"}
        if "error" not in d:
            return d["end"]["sum_received"]["bits_per_second"] / 1e9
        err = str(d["error"])
        time.sleep(0.2)
    raise BenchError(f"iperf3 failed: {err}")


# --------------------------------------------------------------------------
# flood

_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _cpu_ticks() -> dict[str, int]:
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return dict(zip(_CPU_FIELDS, (int(x) for x in parts[1:9])))


def _link(ns: str, dev: str) -> dict[str, int]:
    d = json.loads(_ip("-s", "-j", "link", "show", dev, ns=ns).stdout)[0]["stats64"]
    return {"rx_packets": d["rx"]["packets"], "rx_dropped": d["rx"]["dropped"],
            "tx_packets": d["tx"]["packets"], "tx_dropped": d["tx"]["dropped"]}


def _snmp(ns: str) -> dict[str, int]:
    out = subprocess.run(_in_ns(ns, "cat", "/proc/net/snmp", "/proc/net/netstat"),
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    res: dict[str, int] = {}
    for head, vals in zip(lines[::2], lines[1::2]):
        names, values = head.split(), vals.split()
        group = names[0].rstrip(":")
        res.update({f"{group}.{n}": int(v) for n, v in zip(names[1:], values[1:])})
    return res


def _flood_cmd(e: E2E, tool: str, seconds: float, cfg_file: Path) -> list[str]:
    """The command line after `ip netns exec ATTACKER` (Lab.spawn adds it)."""
    if tool == "hping3":
        return ["timeout", "-s", "INT", "-k", "3", f"{seconds}", "hping3", "--flood",
                "--rand-source", "-S", "-p", str(PORT), SERVER_A]
    mac = json.loads(_ip("-j", "link", "show", e.sv_a, ns=e.sv).stdout)[0]["address"]
    # Random source address, port and sequence number per packet; trafgen
    # recomputes the IP and TCP checksums of fields that change.
    cfg_file.write_text(
        f"{{ eth(da={mac}, type=0x0800), ipv4(saddr=drnd(), daddr={SERVER_A}, ttl=64), "
        f"tcp(sport=drnd(), dport={PORT}, syn, seq=drnd()) }}\n")
    # One worker on the qdisc path: once a native-XDP veth pushes back,
    # trafgen's TX-ring path fails with EAGAIN and leaves its other workers
    # spinning.
    return ["timeout", "-s", "INT", "-k", "3", f"{seconds}", "trafgen", "-o", e.at_if, "-c",
            str(cfg_file), "--qdisc-path", "--cpus", "1"]


def _flood_sent(tool: str, out: str) -> int | None:
    pat = r"(\d+) packets transmitted" if tool == "hping3" else r"(\d+) packets outgoing"
    m = re.search(pat, out)
    return int(m.group(1)) if m else None


def e2e_flood(e: E2E, seconds: float, tools: Sequence[str], tmp: Path,
              progress: Progress) -> dict[str, Any]:
    """Spoofed SYN floods from the attacker namespace at the server's port.

    The flood tools send as fast as they can; "offered" is what they
    counted, "received" what the server's interface took in.  CPU figures are
    /proc/stat deltas over the whole machine (every CPU): on veth the
    receive path runs in softirq on the sending CPU, so `softirq` is the
    server kernel's work.  A legitimate client (marked) connects meanwhile.
    """
    rows = []
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    for tool in tools:
        if shutil.which(tool) is None:
            rows.append({"tool": tool, "error": f"{tool} is not installed"})
            continue
        for cfg, setup in FLOOD_CONFIGS.items():
            _say(progress, f"e2e: SYN flood with {tool}, {cfg}")
            e.use(*setup)
            # Half-open requests of the previous flood die with their listener.
            e.start_servers(len(e.servers) or 1)
            legit = Clients(e.lab, e.cl, SERVER_C, 1)
            row = _guarded(_flood_once, e, tool, cfg, seconds, tmp / "syn.trafgen", hz, ncpu,
                           legit)
            legit.close()
            rows.append({"tool": tool, "config": cfg, **row})
    best = max((r for r in rows if "error" not in r), key=lambda r: r["offered_pps"],
               default=None)
    return {"seconds": seconds, "rows": rows,
            "max_offered_pps": best["offered_pps"] if best else None,
            "max_tool": best["tool"] if best else None}


LEGIT_RATE = 200  # connections per second during a flood


def _flood_once(e: E2E, tool: str, cfg: str, seconds: float, cfg_file: Path, hz: int,
                ncpu: int, legit_clients: Clients) -> dict[str, Any]:
    cmd = _flood_cmd(e, tool, seconds, cfg_file)
    snmp0, link0, peer0 = _snmp(e.sv), _link(e.sv, e.sv_a), _link(e.at, e.at_if)
    g0 = e.guard.stats()
    with run_time_stats():
        r0 = e.guard.prog.run_stats()
        cpu0, t0 = _cpu_ticks(), time.monotonic()
        flood = e.lab.spawn(e.at, *cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
        # A marked client at a modest, fixed rate meanwhile, over the middle
        # of the flood: does it still get in, and how long does connect() take?
        legit_s = max(0.5, seconds - 1.0)
        time.sleep(0.5)
        legit_clients.start(legit_s, LEGIT_RATE)
        try:
            out, _ = flood.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            os.killpg(flood.pid, signal.SIGKILL)
            raise
        elapsed, cpu1 = time.monotonic() - t0, _cpu_ticks()
        r1 = e.guard.prog.run_stats()
    legit = legit_clients.collect(legit_s)
    g1 = e.guard.stats()
    snmp1, link1, peer1 = _snmp(e.sv), _link(e.sv, e.sv_a), _link(e.at, e.at_if)
    # The tool's own count; if it died before printing it (trafgen, rarely,
    # under a stopped queue), what the attacker's interface passed on.
    sent = _flood_sent(tool, out)
    counted_by = tool
    if sent is None:
        sent = (peer1["tx_packets"] - peer0["tx_packets"]
                + peer1["tx_dropped"] - peer0["tx_dropped"])
        counted_by = "interface"
    rx = link1["rx_packets"] - link0["rx_packets"]
    dcpu = {k: (cpu1[k] - cpu0[k]) / hz / elapsed for k in _CPU_FIELDS}
    gd = {k: g1[k] - g0[k] for k in g1}
    runs = r1.run_cnt - r0.run_cnt
    tcp = {k: snmp1.get(k, 0) - snmp0.get(k, 0) for k in
           ("TcpExt.SyncookiesSent", "TcpExt.ListenOverflows", "TcpExt.ListenDrops",
            "Tcp.InSegs", "Tcp.PassiveOpens")}
    return {
        "tool": tool, "config": cfg, "seconds": round(elapsed, 2),
        "sent": sent, "offered_pps": sent / seconds, "counted_by": counted_by,
        "received": rx, "received_pps": rx / elapsed,
        "sender_dropped": peer1["tx_dropped"] - peer0["tx_dropped"],
        "server_tx_packets": link1["tx_packets"] - link0["tx_packets"],
        "guard_ok": gd["ok"] if cfg == "guard" else None,
        "guard_dropped": gd["dropped"] if cfg == "guard" else None,
        # Of what the attacker link delivered (the flood; the marked client
        # comes in on the other link and is counted in guard_ok).
        "guard_drop_fraction": gd["dropped"] / rx if cfg == "guard" and rx else None,
        "guard_ns_per_packet": (r1.run_time_ns - r0.run_time_ns) / runs
        if runs and cfg == "guard" else None,
        "cpu": {k: round(v, 3) for k, v in dcpu.items()},
        "cpus": ncpu,
        "softirq_ns_per_received": dcpu["softirq"] * 1e9 / (rx / elapsed) if rx else None,
        "tcp": tcp,
        "legit": legit,
    }


def e2e(quick: bool = False, progress: Progress = None,
        parts: Sequence[str] = ("connections", "iperf3", "flood")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="netoken-bench-")))
        _say(progress, "e2e: building the lab (client, server, attacker namespaces)")
        e = E2E(stack, tmp)
        e.start_servers(max(1, len(os.sched_getaffinity(0))))
        for part, fn in (
            ("connections", lambda: e2e_connections(e, 4 if quick else 20, 0.3 if quick else 0.5,
                                                    progress)),
            ("iperf3", lambda: e2e_iperf(e, 1 if quick else 5, 1 if quick else 2, progress)),
            ("flood", lambda: e2e_flood(e, 1.5 if quick else 3.0, ("hping3", "trafgen"), tmp,
                                        progress)),
        ):
            if part in parts:
                out[part] = _guarded(fn)
    return out


def _guarded(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """FN(*ARGS); a failure is reported in its place, so the other parts still run."""
    try:
        return fn(*args)
    except (BenchError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------
# control plane


def netoken_cmd() -> list[str]:
    """The installed `netoken` script next to this interpreter, else `python -m netoken`."""
    script = Path(sys.executable).with_name("netoken")
    return [str(script)] if script.exists() else [sys.executable, "-m", "netoken"]


def _timed(cmd: list[str], reps: int) -> dict[str, Any]:
    """Wall time of REPS cold runs of CMD (a new process each time)."""
    times, rc, err = [], 0, ""
    for _ in range(reps):
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - t)
        if r.returncode:
            rc, err = r.returncode, (r.stderr.strip().splitlines() or [""])[-1]
    d: dict[str, Any] = {"median_ms": _median(times) * 1e3, "max_ms": max(times) * 1e3,
                         "reps": reps}
    if rc:
        d["error"] = f"exit {rc}: {err}"
    return d


def time_cli_verbs(ns: str, ifname: str, reps: int) -> dict[str, Any]:
    """Cold-process latency of the read-only CLI verbs against IFNAME's marker,
    next to the cost of starting Python and importing netoken."""
    n = netoken_cmd()
    return {
        "python -c pass": _timed([sys.executable, "-c", "pass"], reps),
        "import netoken.marker": _timed([sys.executable, "-c", "import netoken.marker"], reps),
        "netoken status": _timed([*n, "-n", ns, "status", ifname], reps),
        "netoken status --json": _timed([*n, "-n", ns, "status", ifname, "--json"], reps),
        "netoken stats": _timed([*n, "-n", ns, "stats", ifname], reps),
        "netoken stats --json": _timed([*n, "-n", ns, "stats", ifname, "--json"], reps),
    }


def _policy_set(n: int, per_policy: int, second: int) -> str:
    """N distinct prefixes in policies of PER_POLICY each; SECOND picks
    another address block, so applying one set over the other replaces all."""
    out = []
    for p in range(n // per_policy):
        dests = []
        for i in range(per_policy):
            k = p * per_policy + i
            dests.append(f'"{10 + second}.{k // 256}.{k % 256}.0/24"')
        out.append(f'[[policy]]\nname = "p{p}"\ndestinations = [{", ".join(dests)}]\n'
                   f'ports = [443, "8000-8100"]\nkey = 1\n')
    return "\n".join(out)


def control(quick: bool = False, progress: Progress = None) -> dict[str, Any]:
    reps = 3 if quick else 5
    out: dict[str, Any] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="netoken-bench-")))
        lb = stack.enter_context(lab())
        ns, peer = lb.ns("cp"), lb.ns("cq")
        dev, _ = lb.link(ns, peer, "198.18.212.1/24", "198.18.212.2/24")
        cfg = bench_config(tmp, '[[policy]]\nname = "p"\ndestinations = ["198.18.212.2/32"]\n'
                                'key = 1\n\n[guard]\n[[guard.protect]]\n'
                                'destinations = ["198.18.212.2/32"]\nkeys = [1]\n')

        _say(progress, "control: attach")
        out["attach"] = _guarded(lambda: _time_attach(ns, dev, cfg, reps))
        out["guard_attach"] = _guarded(lambda: _time_guard_attach(ns, dev, cfg, reps))

        _say(progress, "control: applying 10,000 prefixes")
        out["apply_10k"] = _guarded(lambda: _time_apply(tmp))

        # The CLI's own state: pins under /sys/fs/bpf/netoken/DEV, removed below.
        n = netoken_cmd()
        stack.callback(_detach_pinned, ns, dev)
        r = subprocess.run([*n, "-n", ns, "mark", "attach", dev, "-c", str(cfg.path)],
                           capture_output=True, text=True, check=False)
        if r.returncode:
            out["cli"] = {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
            out["cli_cold_start"] = {
                "python -c pass": _timed([sys.executable, "-c", "pass"], reps),
                "import netoken.marker": _timed([sys.executable, "-c", "import netoken.marker"],
                                                reps)}
            return out
        _say(progress, "control: CLI latency from a cold process")
        out["cli"] = time_cli_verbs(ns, dev, 5 if quick else 10)
        out["cli"]["netoken mark attach (replace)"] = _timed(
            [*n, "-n", ns, "mark", "attach", dev, "-c", str(cfg.path)], reps)
        big = tmp / "big"
        big.mkdir()
        big_cfg = bench_config(big, _policy_set(10_000, 100, 0))
        out["cli"]["netoken apply (10,000 prefixes)"] = _timed(
            [*n, "-n", ns, "apply", dev, "-c", str(big_cfg.path)], 2 if quick else 3)
        subprocess.run([*n, "-n", ns, "apply", dev, "-c", str(cfg.path)],
                       capture_output=True, check=False)

        _say(progress, "control: monitor")
        out["monitor"] = _guarded(lambda: monitor_bench(ns, dev, 100_000 if quick else 1_000_000,
                                                        quick, progress))
    return out


def _detach_pinned(ns: str, dev: str) -> None:
    from . import marker as marker_mod

    with contextlib.suppress(Exception), netns(ns):
        marker_mod.detach_pinned(dev)


def _time_attach(ns: str, dev: str, cfg: nconfig.Config, reps: int) -> dict[str, Any]:
    from . import marker as marker_mod
    from .marker import Marker

    phases: dict[str, list[float]] = {"load": [], "configure": [], "attach": [], "total": []}
    for _ in range(reps):
        with netns(ns):
            t0 = time.perf_counter()
            m = Marker.load()
            try:
                t1 = time.perf_counter()
                m.configure(cfg)
                t2 = time.perf_counter()
                m.attach(dev)
                t3 = time.perf_counter()
                marker_mod.detach(dev)
            finally:
                m.close()
        for k, v in (("load", t1 - t0), ("configure", t2 - t1), ("attach", t3 - t2),
                     ("total", t3 - t0)):
            phases[k].append(v * 1e3)
    return {k: _median(v) for k, v in phases.items()} | {"reps": reps, "unit": "ms"}


def _time_guard_attach(ns: str, dev: str, cfg: nconfig.Config, reps: int) -> dict[str, Any]:
    from .guard import Guard, detach

    assert cfg.guard is not None
    phases: dict[str, list[float]] = {"load": [], "configure": [], "attach": [], "total": []}
    for _ in range(reps):
        with netns(ns):
            t0 = time.perf_counter()
            g = Guard.load(replay_cache=cfg.guard.replay_cache)
            try:
                t1 = time.perf_counter()
                g.configure(cfg)
                t2 = time.perf_counter()
                g.attach(dev, "native")
                t3 = time.perf_counter()
                detach(dev)
            finally:
                g.close()
        for k, v in (("load", t1 - t0), ("configure", t2 - t1), ("attach", t3 - t2),
                     ("total", t3 - t0)):
            phases[k].append(v * 1e3)
    return ({k: _median(v) for k, v in phases.items()}
            | {"reps": reps, "unit": "ms", "replay_cache": cfg.guard.replay_cache})


def _time_apply(tmp: Path) -> dict[str, Any]:
    """10,000 /24 prefixes in 100 policies: parse, first apply, same again,
    and a different 10,000 over them (every entry replaced and deleted)."""
    from .marker import Marker

    a_dir, b_dir = tmp / "a", tmp / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    t0 = time.perf_counter()
    a = bench_config(a_dir, _policy_set(10_000, 100, 0))
    t1 = time.perf_counter()
    b = bench_config(b_dir, _policy_set(10_000, 100, 1))
    with Marker.load() as m:
        t2 = time.perf_counter()
        m.configure(a)
        t3 = time.perf_counter()
        m.configure(a)
        t4 = time.perf_counter()
        m.configure(b)
        t5 = time.perf_counter()
        entries = sum(1 for _ in m.maps["nt_dst_v4"])
    if entries != 10_000:
        raise BenchError(f"applied 10,000 prefixes, the LPM trie holds {entries}")
    return {"prefixes": 10_000, "policies": 100, "unit": "ms",
            "load_config": (t1 - t0) * 1e3, "apply_empty_to_10k": (t3 - t2) * 1e3,
            "apply_same_10k": (t4 - t3) * 1e3, "apply_10k_replacing_10k": (t5 - t4) * 1e3}


# -- monitor --------------------------------------------------------------


class _Producer:
    """Marked SYNs through the attached marker's own program (test_run), so
    the events are the real ones and go to the real ring buffer."""

    def __init__(self, pin_dir: str) -> None:
        from .libbpf import Map

        self.prog = Program.from_pinned(f"{pin_dir}/prog")
        self.stats_map = Map.from_pinned(f"{pin_dir}/nt_mark_stats")
        self.packet = _frame("198.18.212.2", dport=PORT)

    def stats(self) -> dict[str, int]:
        from . import layout
        from .datapath import percpu_counters

        return percpu_counters(self.stats_map, layout.MARK_REASONS)

    def run(self, n: int) -> None:
        run, pkt = self.prog.test_run, self.packet
        for _ in range(n):
            run(pkt)

    def close(self) -> None:
        self.prog.close()
        self.stats_map.close()


def _start_monitor(ns: str, dev: str, count: int | None) -> subprocess.Popen:
    cmd = [*netoken_cmd(), "-n", ns, "monitor", dev, "--json"]
    if count is not None:
        cmd += ["--count", str(count)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    ready, _, _ = select.select([p.stderr], [], [], 15)
    line = p.stderr.readline() if ready else ""
    if "following" not in line:
        p.kill()
        p.wait()
        raise BenchError(f"netoken monitor did not start: {line.strip()!r}")
    return p


def _memory_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of PID in KiB.  VmHWM is the peak of the process's own
    memory since its exec; wait4's ru_maxrss is not usable here, it also
    counts the bench's pages that the child had between fork and exec."""
    got: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    got[line[:5]] = int(line.split()[1])
    except OSError:
        return None
    return (got["VmRSS"], got["VmHWM"]) if len(got) == 2 else None


def _stop(p: subprocess.Popen) -> None:
    if p.returncode is None:
        with contextlib.suppress(OSError):
            p.kill()
        with contextlib.suppress(ChildProcessError):
            p.wait()


def monitor_bench(ns: str, dev: str, events: int, quick: bool,
                  progress: Progress) -> dict[str, Any]:
    """`netoken monitor --json` (output to /dev/null) following the marker.

    1. Flat out: the producer outruns the monitor, the monitor exits after
       EVENTS events; its rate then is what it can follow, and its memory
       (sampled every 2000 produced events) is that of a run that long.
    2. Paced: the producer holds a rate for a while, stepping from half of
       that to 1.3 times it; the highest step with no event lost is what it
       sustains (a lower bound when even the last step lost nothing).
    """
    from .state import BPFFS, encode_ifname

    pin_dir = str(BPFFS / "netoken" / encode_ifname(dev) / "marker")
    prod = _Producer(pin_dir)
    mon: subprocess.Popen | None = None
    try:
        c0 = prod.stats()
        mon = _start_monitor(ns, dev, events)
        ready = _memory_kb(mon.pid)
        last = ready
        t0 = time.monotonic()
        while mon.poll() is None:
            prod.run(2000)
            last = _memory_kb(mon.pid) or last
            if time.monotonic() - t0 > 600:
                raise BenchError("netoken monitor did not finish in 10 minutes")
        elapsed = time.monotonic() - t0
        c1 = prod.stats()
        produced = c1["marked"] - c0["marked"]
        flat = {"events": events, "seconds": round(elapsed, 2), "events_per_s": events / elapsed,
                "produced": produced, "producer_per_s": produced / elapsed,
                "lost": c1["events_lost"] - c0["events_lost"], "exit": mon.returncode,
                "rss_kb_ready": ready[0] if ready else None,
                "rss_kb_last": last[0] if last else None,
                "rss_kb_peak": last[1] if last else None}
        _say(progress, f"control: monitor followed {flat['events_per_s']:,.0f} events/s flat out")
        paced = _paced(prod, ns, dev, flat["events_per_s"], 1.0 if quick else 2.0,
                       4 if quick else 8)
    finally:
        if mon is not None:
            _stop(mon)
        prod.close()
    return {"flat_out": flat, "paced": paced}


def _paced(prod: _Producer, ns: str, dev: str, capacity: float, seconds: float,
           steps: int) -> dict[str, Any]:
    mon = _start_monitor(ns, dev, None)
    rows = []
    try:
        rate = capacity * 0.5
        factor = 2.6 ** (1 / max(1, steps - 1))
        for _ in range(steps):
            c0 = prod.stats()
            n = int(rate * seconds)
            t0 = time.monotonic()
            for i in range(0, n, 64):
                prod.run(min(64, n - i))
                ahead = t0 + (i + 64) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            achieved = n / (time.monotonic() - t0)
            time.sleep(0.2)  # let the monitor catch up before counting losses
            c1 = prod.stats()
            rows.append({"target_per_s": round(rate), "achieved_per_s": round(achieved),
                         "events": c1["marked"] - c0["marked"],
                         "lost": c1["events_lost"] - c0["events_lost"]})
            rate *= factor
    finally:
        mon.send_signal(signal.SIGINT)
        try:
            mon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _stop(mon)
    # Sustained: up to the first step that lost anything (a lucky lossless
    # step above a lossy one does not count).
    ok = []
    for r in rows:
        if r["lost"]:
            break
        ok.append(r["achieved_per_s"])
    return {"steps": rows, "seconds_per_step": seconds,
            "sustained_per_s": max(ok) if ok else None,
            "lower_bound": len(ok) == len(rows)}


# --------------------------------------------------------------------------
# everything


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpu": model, "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(), "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


PARTS = ("datapath", "e2e", "control")


def run_all(quick: bool = False, progress: Progress = None,
            parts: Sequence[str] = PARTS) -> dict[str, Any]:
    """Every benchmark; a part that fails reports {"error": ...} in its place."""
    if os.geteuid() != 0:
        raise BenchError("netoken bench needs root (it loads BPF and builds namespaces)")
    t0 = time.monotonic()
    res: dict[str, Any] = {"machine": machine(), "quick": quick}
    with _sigterm_as_interrupt():
        if "datapath" in parts:
            res["datapath"] = _guarded(lambda: datapath(quick, progress=progress))
        if "e2e" in parts:
            res["e2e"] = _guarded(lambda: e2e(quick, progress))
        if "control" in parts:
            res["control"] = _guarded(lambda: control(quick, progress))
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    return res


# --------------------------------------------------------------------------
# the table


def _n(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def _table(head: Sequence[str], rows: list[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(c.rjust(w) if rj else c.ljust(w)
                                for c, w, rj in zip(cells, widths, right)).rstrip()
    return [line(head), *(line(r) for r in rows)]


def _datapath_lines(d: dict[str, Any]) -> list[str]:
    out = ["Datapath: ns per packet under BPF_PROG_TEST_RUN (floor = empty program, same group)"]
    if "error" in d:
        return out + [f"  error: {d['error']}"]
    for g in d["groups"]:
        out.append(f"  {g['title']}, {g['samples']} samples")
        rows = [[r["name"] + (" (floor)" if r["floor"] is None else ""),
                 _n(r["median_ns"], ".1f" if g["repeat"] > 1 else ".0f"),
                 _n(r["p99_ns"], ".1f" if g["repeat"] > 1 else ".0f"),
                 "" if r["over_floor_ns"] is None else format(r["over_floor_ns"], "+.1f"
                                                                if g["repeat"] > 1 else "+.0f")]
                for r in g["rows"]]
        out += ["  " + ln for ln in _table(["contender", "median", "p99", "over floor"], rows,
                                           [False, True, True, True])]
    note = "XDP programs parked on a veth (repeat>1 without dispatcher swaps)" \
        if d.get("xdp_parked") else "XDP not parked: few samples"
    out.append(f"  pinned to CPU {d['cpu']}; {note}; replay cache {d['replay_cache']:,} entries")
    out.append(f"  first sight: {d.get('first_sight_repeated_tokens', 0)} of the marked SYNs "
               "repeated an earlier token (same flow and epoch, same 32-bit nonce): set aside")
    return out


def _ratio(c: dict[str, Any]) -> str:
    if c.get("ratio") is None:
        return "-"
    return f"{c['ratio']:.3f} ({c['ratio_min']:.3f}-{c['ratio_max']:.3f})"


def _e2e_lines(d: dict[str, Any]) -> list[str]:
    out = ["End to end on veth (namespaces; ratio = per-round median vs 'none', min-max)"]
    if "error" in d:
        return out + [f"  error: {d['error']}"]
    c = d.get("connections")
    if c and "error" not in c:
        out.append(f"  connections/s: {c['workers']} clients (connect, 1 byte each way, close), "
                   f"{c['rounds']} rounds x {c['seconds']:g}s per configuration")
        rows = [[k, _n(v["median"]), _ratio(v), str(v["failed"])]
                for k, v in c["configs"].items()]
        out += _table(["configuration", "conn/s", "ratio", "failed"], rows,
                      [False, True, True, True])
        verdicts = ", ".join(f"{k} {v:,}" for k, v in c["guard_verdicts"].items())
        out.append(f"  marker marked {c['marker_marked']:,} SYNs; guard verdicts: {verdicts}; "
                   f"dropped {c['guard_rejected']:,}")
        ins = c.get("in_situ", {})
        if all(k in ins for k in ("marker", "guard")):
            out.append("  on the real path (BPF run-time stats, marker + guard): " + "; ".join(
                f"{n} {ins[n]['ns_per_run']:,.0f} ns/run x {ins[n]['runs_per_connection']:.1f} "
                f"runs = {ins[n]['ns_per_connection']:,.0f} ns per connection"
                for n in ("marker", "guard")))
    elif c:
        out.append(f"  connections/s: error: {c['error']}")
    ip = d.get("iperf3")
    if ip and "error" not in ip:
        out.append(f"  iperf3, 1 stream, {ip['rounds']} rounds x {ip['seconds']}s")
        rows = [[k, _n(v["median"], ".2f"), _ratio(v)] for k, v in ip["configs"].items()]
        out += _table(["configuration", "Gbit/s", "ratio"], rows, [False, True, True])
        m = ip.get("marker_in_situ")
        if m and m.get("ns_per_run") is not None:
            out.append(f"  marker on the bulk path (BPF run-time stats): {m['ns_per_run']:,.0f} "
                       f"ns/run x {m['runs_per_s']:,.0f} runs/s = {m['cpu_share']:.2%} of a CPU")
    elif ip:
        out.append(f"  iperf3: error: {ip['error']}")
    fl = d.get("flood")
    if fl and "error" not in fl:
        out.append(f"  SYN flood, spoofed sources, {fl['seconds']:g}s each; CPU = busy CPUs "
                   f"of {fl['rows'][0].get('cpus', '?')} over the whole machine")
        rows = []
        errors = []
        for r in fl["rows"]:
            if "error" in r:
                errors.append(f"  {r['tool']}, {r.get('config', '')}: error: {r['error']}")
                continue
            frac = r["guard_drop_fraction"]
            rows.append([
                r["tool"], r["config"], _n(r["offered_pps"]), _n(r["received_pps"]),
                "-" if frac is None else f"{frac:.2%}",
                _n(r["guard_ns_per_packet"], ".0f"),
                f"{r['cpu']['softirq']:.2f}", _n(r["softirq_ns_per_received"]),
                f"{r['legit']['ok']}/{r['legit']['ok'] + r['legit']['failed']}",
                _n(r["legit"]["connect_us_median"]),
            ])
        out += _table(["tool", "server side", "offered/s", "received/s", "guard drops",
                       "guard ns/pkt", "softirq CPUs", "softirq ns/pkt", "legit ok",
                       "connect us"], rows,
                      [False, False, True, True, True, True, True, True, True, True])
        out += errors
        cookies = [(r["tool"], r["config"], r["tcp"]["TcpExt.SyncookiesSent"])
                   for r in fl["rows"] if "tcp" in r]
        out.append("  SYN cookies sent: " + ", ".join(f"{t} {c}: {n:,}" for t, c, n in cookies))
    elif fl:
        out.append(f"  flood: error: {fl['error']}")
    return out


def _control_lines(d: dict[str, Any]) -> list[str]:
    out = ["Control plane"]
    if "error" in d:
        return out + [f"  error: {d['error']}"]
    for key, title in (("attach", "marker attach"), ("guard_attach", "guard attach")):
        a = d.get(key)
        if a:
            extra = f", replay cache {a['replay_cache']:,}" if "replay_cache" in a else ""
            out.append(f"  {title} (library, median of {a['reps']}{extra}): "
                       f"load {a['load']:.1f} ms + configure {a['configure']:.1f} ms + "
                       f"attach {a['attach']:.1f} ms = {a['total']:.1f} ms")
    ap = d.get("apply_10k")
    if ap and "error" not in ap:
        out.append(f"  10,000 prefixes in {ap['policies']} policies: load+validate TOML "
                   f"{ap['load_config']:.0f} ms; configure empty->10k "
                   f"{ap['apply_empty_to_10k']:.0f} ms, same again {ap['apply_same_10k']:.0f} ms,"
                   f" 10k over another 10k {ap['apply_10k_replacing_10k']:.0f} ms")
    cli = d.get("cli")
    if cli and "error" not in cli:
        out.append("  cold process (wall time, median / max)")
        rows = [[k, _n(v["median_ms"], ".0f"), _n(v["max_ms"], ".0f"), v.get("error", "")]
                for k, v in cli.items()]
        out += ["  " + ln for ln in _table(["command", "ms", "max", ""], rows,
                                           [False, True, True, False])]
    elif cli:
        out.append(f"  CLI: {cli['error']}")
        for k, v in d.get("cli_cold_start", {}).items():
            out.append(f"    {k}: {v['median_ms']:.0f} ms")
    mo = d.get("monitor")
    if mo and "error" not in mo:
        f = mo["flat_out"]
        out.append(f"  netoken monitor --json > /dev/null over {f['events']:,} events: "
                   f"{f['events_per_s']:,.0f} events/s flat out (producer "
                   f"{f['producer_per_s']:,.0f}/s, {f['lost']:,} lost); "
                   f"RSS {_n(f['rss_kb_ready'])} KiB at start, {_n(f['rss_kb_last'])} KiB at the "
                   f"end, peak {_n(f['rss_kb_peak'])} KiB")
        p = mo["paced"]
        steps = ", ".join(f"{s['achieved_per_s']:,}/s lost {s['lost']:,}" for s in p["steps"])
        bound = ">= " if p.get("lower_bound") else ""
        out.append(f"  sustained without loss: {bound}{_n(p['sustained_per_s'])} events/s "
                   f"(steps of {p['seconds_per_step']:g}s: {steps})")
    elif mo:
        out.append(f"  monitor: error: {mo['error']}")
    return out


def format_table(results: dict[str, Any]) -> str:
    """RESULTS (from run_all) as an aligned plain-text report."""
    m = results.get("machine", {})
    load = m.get("loadavg_at_start")
    lines = [f"netoken bench{' --quick' if results.get('quick') else ''}: {m.get('time', '')}, "
             f"Linux {m.get('kernel', '?')}, {m.get('cpu', '?')} x {m.get('cpus', '?')} CPUs"
             + (f", load {load[0]:.2f} at start" if load else "")]
    for key, fn in (("datapath", _datapath_lines), ("e2e", _e2e_lines),
                    ("control", _control_lines)):
        if key in results:
            lines += ["", *fn(results[key])]
    if "elapsed_s" in results:
        lines += ["", f"({results['elapsed_s']:.0f} s)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `netoken bench` (the CLI adds -j/--json itself)."""
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples and shorter rounds (under 2 minutes)")
    parser.add_argument("--only", action="append", choices=PARTS, metavar="PART",
                        help=f"run only this part ({', '.join(PARTS)}); repeatable")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="also write the results as JSON to FILE")


def run(args: argparse.Namespace) -> int:
    """`netoken bench`: the table (or JSON) on stdout, progress on stderr."""
    def progress(msg: str) -> None:
        print(f"netoken bench: {msg}", file=sys.stderr, flush=True)

    try:
        res = run_all(quick=args.quick, progress=progress, parts=args.only or PARTS)
    except BenchError as e:
        print(f"netoken: {e}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2) + "\n")
    if getattr(args, "json", False):
        print(json.dumps(res, indent=2 if getattr(args, "pretty", False) else None))
    else:
        print(format_table(res))
    failed = [k for k in PARTS if isinstance(res.get(k), dict) and "error" in res[k]]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    import logging

    # As the CLI does: libbpf's warnings reach the user through our errors.
    logging.basicConfig(level=logging.CRITICAL)
    parser = argparse.ArgumentParser(prog="netoken bench",
                                     description="datapath, end-to-end and control-plane "
                                                 "benchmarks")
    parser.add_argument("-j", "--json", action="store_true", help="JSON output")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("netoken: bench interrupted; lab removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
