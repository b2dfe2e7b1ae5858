"""The datapath part: the marker and the guard under BPF_PROG_TEST_RUN, each
contender next to the empty program of its type, in interleaved rounds."""

from __future__ import annotations

import os
import random
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..datapath import object_path
from ..layout import MAX_IP6_EXT
from ..libbpf import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    BpfObject,
    Program,
    xdp_attach,
)
from ..netns import netns
from .common import BenchError, Progress, _frame, _median, _p99, _say, bench_config
from .namespaces import _ip, _tag


@dataclass(frozen=True)
class Contender:
    name: str
    prog: Program
    packet: bytes
    repeat: int = 1  # >1 only for paths that never modify the packet
    floor: str | None = None  # name of the contender this one is compared to
    # When set, sample i runs packets[i]: paths that change state per packet
    # (the guard's replay cache) are measured on first sight, not on repeats.
    packets: tuple[bytes, ...] = ()
    ref: str | None = None  # the reference program (bpf/reference.bpf.c) it is held against
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
    ref: str | None = None
    ratio_to_ref: float | None = None  # over floor / the reference's over floor


def run_interleaved(
    contenders: list[Contender],
    samples: int,
    progress: Callable[[int], None] | None = None,
    after_round: Callable[[], None] | None = None,
    seed: int = 0,
) -> list[Result]:
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
    floor = {c.name: c.floor for c in contenders}

    def over(name: str) -> float | None:
        f = floor[name]
        return med[name] - med[f] if f else None

    out = []
    for c in contenders:
        ratio = None
        if c.ref is not None:
            mine, ref = over(c.name), over(c.ref)
            ratio = mine / ref if mine is not None and ref else None
        out.append(
            Result(
                c.name,
                med[c.name],
                _p99(times[c.name]),
                len(times[c.name]),
                c.floor,
                over(c.name),
                c.repeat,
                c.expect,
                c.ref,
                ratio,
            )
        )
    return out


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


REF_APPEND = "reference: static appender (seed)"
REF_VERIFY = "reference: bare SipHash verifier"


@dataclass(frozen=True)
class Listened:
    """A marker whose events a reader follows (program.ListeningRing)."""

    prog: Program
    stats: Callable[[], dict[str, int]]
    before: Callable[[], None]  # what the reader does before each sample


def marker_contenders(
    marker_prog: Program,
    empty_tc: Program,
    stats: Callable[[], dict[str, int]] | None = None,
    listened: Listened | None = None,
    full_ring: Listened | None = None,
    refs: References | None = None,
) -> list[Contender]:
    """The marker's paths at repeat=1, next to the empty TC program.

    MARKER_PROG has no reader, the state of every marker without a `netoken
    monitor` running: it writes no event.  LISTENED is a second marker
    whose events a reader follows: its reader empties the ring before one of
    its SYNs, which then wakes the reader if the ring had been empty
    (irq_work) and lands in a ring holding records for the other one.
    FULL_RING is a third, whose reader listens but reads nothing: its
    events are lost."""
    f = "empty tc"
    ref = REF_APPEND if refs is not None else None
    out = [
        Contender(f, empty_tc, _frame(V4)),
        Contender(
            "marker: IPv4 SYN, mac",
            marker_prog,
            _frame(V4),
            floor=f,
            expect="marked",
            stats=stats,
            ref=ref,
        ),
        Contender(
            "marker: IPv4 SYN, static",
            marker_prog,
            _frame(V4_STATIC),
            floor=f,
            expect="marked",
            stats=stats,
            ref=ref,
        ),
        Contender(
            "marker: IPv6 SYN, mac", marker_prog, _frame(V6), floor=f, expect="marked", stats=stats
        ),
        # 32 bytes of options: the token only fits without the timestamps
        Contender(
            "marker: TFO cookie SYN + 100 B, make room",
            marker_prog,
            _frame(V4, payload=b"x" * 100, cookie=bytes(8)),
            floor=f,
            expect="room_from_ts",
            stats=stats,
        ),
        Contender(
            "marker: SYN, no policy",
            marker_prog,
            _frame(V4_OTHER),
            floor=f,
            expect="no_policy",
            stats=stats,
        ),
        Contender(
            "marker: ACK, no payload",
            marker_prog,
            _frame(V4, "A"),
            floor=f,
            expect="not_syn",
            stats=stats,
        ),
        Contender(
            "marker: 1500-byte ACK",
            marker_prog,
            _frame(V4, "A", ip_len=1500),
            floor=f,
            expect="not_syn",
            stats=stats,
        ),
        Contender(
            "marker: UDP", marker_prog, _frame(V4, udp=True), floor=f, expect="not_tcp", stats=stats
        ),
    ]
    if listened is not None:
        out.insert(
            4,
            Contender(
                "marker: IPv4 SYN, mac, event to a reader",
                listened.prog,
                _frame(V4),
                floor=f,
                expect="marked",
                stats=listened.stats,
                ref=ref,
            ),
        )
        out.insert(
            5,
            Contender(
                "marker: IPv4 SYN, mac, event wakes the reader",
                listened.prog,
                _frame(V4),
                floor=f,
                expect="marked",
                stats=listened.stats,
                before=listened.before,
            ),
        )
    if full_ring is not None:
        out.insert(
            4,
            Contender(
                "marker: IPv4 SYN, mac, event ring full",
                full_ring.prog,
                _frame(V4),
                floor=f,
                expect="events_lost",
                stats=full_ring.stats,
                before=full_ring.before,
            ),
        )
    if refs is not None:
        out.insert(
            1,
            Contender(
                REF_APPEND, refs.append, _frame(V4_STATIC), floor=f, expect="done", stats=refs.stats
            ),
        )
    return out


def marker_repeat_contenders(
    marker_prog: Program, empty_tc: Program, repeat: int = TC_REPEAT
) -> list[Contender]:
    """The marker's non-editing paths (everything but a marked SYN) at a large repeat."""
    f = "empty tc"
    return [
        Contender(f, empty_tc, _frame(V4), repeat),
        Contender(
            "marker: SYN, no policy", marker_prog, _frame(V4_OTHER), repeat, f, expect="no_policy"
        ),
        Contender(
            "marker: ACK, no payload", marker_prog, _frame(V4, "A"), repeat, f, expect="not_syn"
        ),
        Contender(
            "marker: 1500-byte ACK",
            marker_prog,
            _frame(V4, "A", ip_len=1500),
            repeat,
            f,
            expect="not_syn",
        ),
        Contender("marker: UDP", marker_prog, _frame(V4, udp=True), repeat, f, expect="not_tcp"),
    ]


def _marked(marker_prog: Program, frame: bytes) -> bytes:
    return marker_prog.test_run(frame).data_out


def guard_contenders(
    guard_prog: Program,
    empty_xdp: Program,
    marker_prog: Program,
    repeat: int = XDP_REPEAT,
    refs: References | None = None,
) -> list[Contender]:
    """The guard's paths at a large repeat, next to the empty XDP program.

    A valid mac token is accepted once; every further run of the same packet
    is a `replay`, which is the guard's most expensive steady path (full MAC
    check and a replay-cache hit).  First sight is measured separately
    (guard_first_sight_contenders)."""
    f = "empty xdp"
    valid = _marked(marker_prog, _frame(V4))
    bad = bytearray(_marked(marker_prog, _frame(V4)))
    bad[-1] ^= 0xFF  # the tag's last byte: the option is the TCP header's tail
    bad_windows = bytearray(_marked(marker_prog, _frame(V4, windows=True)))
    bad_windows[-1] ^= 0xFF
    ref = REF_VERIFY if refs is not None else None
    reference = (
        [Contender(REF_VERIFY, refs.verify, valid, repeat, f, expect="done", stats=refs.stats)]
        if refs
        else []
    )
    return [
        Contender(f, empty_xdp, _frame(V4), repeat),
        *reference,
        Contender(
            "guard: valid SYN, seen before (replay)",
            guard_prog,
            valid,
            repeat,
            f,
            expect="replay",
            ref=ref,
        ),
        Contender(
            "guard: IPv6 valid SYN, seen before",
            guard_prog,
            _marked(marker_prog, _frame(V6)),
            repeat,
            f,
            expect="replay",
        ),
        Contender(
            "guard: valid static-token SYN",
            guard_prog,
            _marked(marker_prog, _frame(V4_STATIC)),
            repeat,
            f,
            expect="ok",
        ),
        Contender("guard: SYN without token", guard_prog, _frame(V4), repeat, f, expect="missing"),
        Contender(
            "guard: SYN with bad tag (forged)",
            guard_prog,
            bytes(bad),
            repeat,
            f,
            expect="bad_tag",
            ref=ref,
        ),
        # Linux's layout is read in three loads (bpf/guard.bpf.c:
        # nt_linux_syn); every other takes the option walk.
        Contender(
            "guard: SYN with bad tag, Windows options",
            guard_prog,
            bytes(bad_windows),
            repeat,
            f,
            expect="bad_tag",
            ref=ref,
        ),
        Contender(
            "guard: ACK to protected port", guard_prog, _frame(V4, "A"), repeat, f, expect="not_syn"
        ),
        Contender(
            "guard: SYN, unprotected destination",
            guard_prog,
            _frame(V4_OTHER),
            repeat,
            f,
            expect="unprotected",
        ),
        Contender("guard: UDP", guard_prog, _frame(V4, udp=True), repeat, f, expect="not_tcp"),
        Contender(
            f"guard: IPv6 SYN behind {MAX_IP6_EXT} extension headers",
            guard_prog,
            _frame(V6, ext=MAX_IP6_EXT),
            repeat,
            f,
            expect="missing",
        ),
        Contender(
            f"guard: IPv6 SYN behind {MAX_IP6_EXT + 1} (fails closed)",
            guard_prog,
            _frame(V6, ext=MAX_IP6_EXT + 1),
            repeat,
            f,
            expect="ipv6_ext",
        ),
        Contender(
            "guard: TCP fragment to protected address",
            guard_prog,
            _frame(V4, fragment=True),
            repeat,
            f,
            expect="fragment",
        ),
    ]


def at_tc(
    contenders: list[Contender],
    guard_xdp: Program,
    guard_tc: Program,
    empty_xdp: Program,
    empty_tc: Program,
) -> list[Contender]:
    """CONTENDERS (the XDP guard's) with the TC ingress guard in its place,
    next to the empty TC program: the same packets and paths at the other
    hook.  The reference verifier is an XDP program and stays out."""
    out = []
    for c in contenders:
        if c.prog is empty_xdp:
            out.append(replace(c, name="empty tc", prog=empty_tc))
        elif c.prog is guard_xdp:
            out.append(replace(c, name=f"tc {c.name}", prog=guard_tc, floor="empty tc", ref=None))
    return out


def guard_first_sight_contenders(
    guard_prog: Program,
    empty_xdp: Program,
    marker_prog: Program,
    n: int,
    refs: References | None = None,
) -> tuple[list[Contender], int]:
    """Valid SYNs the guard has never seen, one run each (each is accepted
    and inserted into the replay cache), next to the empty XDP program and
    to a missing-token SYN at the same repeat=1; and how many marked SYNs
    had to be thrown away as repeats.

    Same flow, same epoch: two tokens differ only by their 48-bit nonce, so
    among n SYNs about n^2 / 2^49 repeat one (the guard would take the
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
    ref = REF_VERIFY if refs is not None else None
    reference = (
        [
            Contender(
                REF_VERIFY,
                refs.verify,
                fresh[0],
                floor=f,
                packets=tuple(fresh[1:]),
                expect="done",
                stats=refs.stats,
            )
        ]
        if refs
        else []
    )
    return [
        Contender(f, empty_xdp, _frame(V4)),
        *reference,
        Contender(
            "guard: valid SYN, first sight",
            guard_prog,
            fresh[0],
            floor=f,
            packets=tuple(fresh[1:]),
            expect="ok",
            ref=ref,
        ),
        Contender("guard: SYN without token", guard_prog, _frame(V4), floor=f, expect="missing"),
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


def _fill_ring(marker: Any) -> None:
    """Mark SYNs until MARKER's event ring is full (events_lost starts
    counting); a reader must be listening, or it writes none."""
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
    ns = f"ntbench-{_tag()}-park"
    devs = [f"ntbp{_tag()}{i}" for i in range(len(progs) + len(progs) % 2)]
    made = parked = False
    try:
        made = _ip("netns", "add", ns, check=False).returncode == 0
        if made:
            for a, b in zip(devs[::2], devs[1::2]):
                _ip("link", "add", a, "type", "veth", "peer", "name", b, ns=ns)
            with netns(ns):
                for dev, prog in zip(devs, progs):
                    xdp_attach(
                        socket.if_nametoindex(dev),
                        prog,
                        XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST,
                    )
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


@dataclass(frozen=True)
class References:
    """bpf/reference.bpf.c loaded: the two programs and their one counter map."""

    append: Program
    verify: Program
    stats: Callable[[], dict[str, int]]  # "done" (edited/accepted) and "passed" (not)


def _references(stack: ExitStack, cfg: Any) -> References:
    """The reference programs, loaded, with key 1 of CFG and the clock offset."""
    from .. import layout
    from ..datapath import key_value, realtime_minus_tai_ns

    ref = stack.enter_context(BpfObject.open(object_path("reference")))
    ref.load()
    zero = (0).to_bytes(4, "little")
    ref.map("nt_ref_key").update(zero, key_value(cfg.keys[1]))
    ref.map("nt_ref_clock").update(zero, realtime_minus_tai_ns().to_bytes(8, "little", signed=True))
    assert layout.MAC_OPT_LEN == 16  # the reference takes the option as the header's tail
    counters = ref.map("nt_ref_stats")

    def stats() -> dict[str, int]:
        return {
            name: sum(
                int.from_bytes(v, "little")
                for v in counters.lookup_percpu(i.to_bytes(4, "little")) or []
            )
            for i, name in enumerate(("done", "passed"))
        }

    return References(ref.program("netoken_ref_append"), ref.program("netoken_ref_verify"), stats)


def datapath(
    quick: bool = False, samples: int | None = None, progress: Progress = None
) -> dict[str, Any]:
    """The datapath micro-benchmarks; SAMPLES overrides every group's sample count."""
    from ..guard import Guard
    from ..marker import Marker

    n1 = samples or (3000 if quick else 20000)  # repeat=1 groups
    nr = samples or (300 if quick else 3000)  # large-repeat groups
    groups: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="netoken-bench-")))
        cfg = bench_config(tmp, DATAPATH_CONFIG)
        assert cfg.guard is not None
        empty = stack.enter_context(BpfObject.open(object_path("empty")))
        empty.load()
        empty_tc, empty_xdp = empty.program("netoken_empty_tc"), empty.program("netoken_empty_xdp")
        refs = _references(stack, cfg)
        marker = stack.enter_context(Marker.load())
        marker.configure(cfg)
        guard = stack.enter_context(Guard.load(replay_cache=cfg.guard.replay_cache))
        guard.configure(cfg)
        # The TC ingress build of the same source, on the same maps.
        guard_tc = stack.enter_context(
            Guard.load(replay_cache=cfg.guard.replay_cache, reuse=guard.maps, hook="tc")
        )
        # The marker and the guard have no reader, as on a node where no
        # `netoken monitor` runs.  Two more markers have one: events are read
        # (and thrown away) only where a contender says so, since how full
        # the ring is decides the path (see marker_contenders).
        listened = stack.enter_context(Marker.load())
        listened.configure(cfg)
        ring = stack.enter_context(listened.events(lambda _e: None))
        full = stack.enter_context(Marker.load())
        full.configure(cfg)
        full_ring = stack.enter_context(full.events(lambda _e: None))
        _fill_ring(full)

        parked = stack.enter_context(_xdp_parking([empty_xdp, guard.prog, refs.verify]))
        # Without parking every XDP sample costs ~20 ms of harness: fewer samples.
        nx = nr if parked else min(nr, 50)
        cpu = stack.enter_context(_pinned_to_one_cpu())

        def group(
            title: str, contenders: list[Contender], n: int, stats: Callable[[], dict[str, int]]
        ) -> None:
            _check_paths(contenders, stats)
            _say(progress, f"datapath: {title} ({n} rounds x {len(contenders)})")
            rows = run_interleaved(contenders, n)
            groups.append(
                {
                    "title": title,
                    "samples": n,
                    "repeat": contenders[-1].repeat,
                    "rows": [asdict(r) for r in rows],
                }
            )

        group(
            "marker (TC egress), one run per sample",
            marker_contenders(
                marker.prog,
                empty_tc,
                marker.stats,
                Listened(listened.prog, listened.stats, ring.consume),
                Listened(full.prog, full.stats, full_ring.beat),
                refs,
            ),
            n1,
            marker.stats,
        )
        group(
            f"marker, paths that leave the packet alone, {TC_REPEAT} runs per sample",
            marker_repeat_contenders(marker.prog, empty_tc),
            nr,
            marker.stats,
        )

        gc = guard_contenders(guard.prog, empty_xdp, marker.prog, refs=refs)
        for c in gc:
            if c.expect == "replay":
                c.prog.test_run(c.packet)  # first sight: every later run is a replay
        # Rejected SYNs take the path of a node without a reader: no event
        # (counted as suppressed).
        group(f"guard (XDP), {XDP_REPEAT} runs per sample", gc, nx, guard.stats)
        group(
            f"guard (TC ingress), {XDP_REPEAT} runs per sample",
            at_tc(gc, guard.prog, guard_tc.prog, empty_xdp, empty_tc),
            nr,
            guard.stats,
        )
        first, repeats = guard_first_sight_contenders(guard.prog, empty_xdp, marker.prog, n1, refs)
        before = guard.stats()
        group("guard, valid SYNs on first sight, one run per sample", first, n1, guard.stats)
        after = guard.stats()
        # ok: the path check's packet plus one per sample; anything else would
        # mean the first-sight samples were not first sight.
        if after["ok"] - before["ok"] != n1 + 1 or after["replay"] != before["replay"]:
            raise BenchError("first-sight SYNs were not all accepted on first sight")
    return {
        "groups": groups,
        "cpu": cpu,
        "xdp_parked": parked,
        "replay_cache": cfg.guard.replay_cache,
        "first_sight_repeated_tokens": repeats,
    }
