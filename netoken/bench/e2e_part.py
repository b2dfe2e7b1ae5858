"""The end-to-end part: real TCP between namespaces joined by veth pairs
(connections/s, iperf3, spoofed SYN floods), in alternating rounds."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..datapath import object_path
from ..demo import hping3_sent, interrupted_after, syn_flood_argv
from ..libbpf import (
    BPF_TC_EGRESS,
    BPF_TC_INGRESS,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    BpfObject,
    run_time_stats,
    tc_hook_destroy,
    xdp_attach,
    xdp_detach,
)
from ..netns import netns
from .common import BenchError, Progress, _guarded, _median, _say, bench_config
from .namespaces import Lab, _in_ns, _ip, lab

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
        self.procs = [
            lb.spawn(
                ns,
                sys.executable,
                "-c",
                _CRR_WORKER,
                addr,
                str(PORT),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(n)
        ]
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
        return {
            "cps": ok / seconds,
            "ok": ok,
            "failed": fail,
            "connect_us_median": one.get("connect_us_median"),
            "connect_us_p99": one.get("connect_us_p99"),
        }

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
NET_CS, NET_AS = "198.18.210", "198.18.211"  # client-server and attacker-server links
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

# Configuration name -> (marker on the client, program on the server's
# ingress: None, "empty" / "guard" at XDP, "empty tc" / "guard tc" at TC).
# "none, again" is the baseline measured twice: its ratio to "none" is what
# the rounds' noise alone makes of nothing.
CONFIGS: dict[str, tuple[bool, str | None]] = {
    "none": (False, None),
    "none, again": (False, None),
    "marker": (True, None),
    "marker + empty xdp": (True, "empty"),
    "marker + guard": (True, "guard"),
    "marker + empty tc": (True, "empty tc"),
    "marker + tc guard": (True, "guard tc"),
}
# The order within a round (rotated every round): the repeated baseline sits
# as far from "none" as the other configurations do, so its ratio carries the
# same drift.
ROUND_CYCLE = (
    "none",
    "marker",
    "marker + empty xdp",
    "marker + guard",
    "none, again",
    "marker + empty tc",
    "marker + tc guard",
)
# The flood runs with the marker on, for the legitimate client.
FLOOD_CONFIGS: dict[str, tuple[bool, str | None]] = {
    "no XDP": (True, None),
    "empty XDP": (True, "empty"),
    "guard": (True, "guard"),
    "empty TC": (True, "empty tc"),
    "tc guard": (True, "guard tc"),
}


class E2E:
    """The lab for the end-to-end figures, and its switchable configurations.

    client ──veth── server ──veth── attacker
    marker on the client's egress; guard (or an empty program of its
    type, the floor) on both of the server's interfaces, at native XDP
    or at TC ingress (the hook `--hook auto` picks on a veth).
    """

    def __init__(self, stack: ExitStack, tmp: Path) -> None:
        from ..guard import Guard
        from ..marker import Marker

        self.lab = stack.enter_context(lab())
        self.cl, self.sv, self.at = self.lab.ns("cl"), self.lab.ns("sv"), self.lab.ns("at")
        self.cl_if, self.sv_c = self.lab.link(self.cl, self.sv, f"{NET_CS}.1/24", f"{SERVER_C}/24")
        self.at_if, self.sv_a = self.lab.link(self.at, self.sv, f"{NET_AS}.1/24", f"{SERVER_A}/24")
        # SYN-ACKs to spoofed sources really leave (backscatter is part of
        # what a flood costs the server) and die in the attacker namespace.
        _ip("route", "add", "default", "via", f"{NET_AS}.1", ns=self.sv)
        for src in (self.cl, self.at):
            subprocess.run(
                _in_ns(src, "ping", "-c", "1", "-W", "2", SERVER_C if src == self.cl else SERVER_A),
                capture_output=True,
                check=False,
            )
        self.cfg = bench_config(tmp, E2E_CONFIG)
        assert self.cfg.guard is not None
        self.marker = stack.enter_context(Marker.load())
        self.marker.configure(self.cfg)
        self.guard = stack.enter_context(Guard.load(replay_cache=self.cfg.guard.replay_cache))
        self.guard.configure(self.cfg)
        # The TC ingress build, on the same maps: one config, one set of counters.
        self.guard_tc = stack.enter_context(
            Guard.load(replay_cache=self.cfg.guard.replay_cache, reuse=self.guard.maps, hook="tc")
        )
        empty = stack.enter_context(BpfObject.open(object_path("empty")))
        empty.load()
        self.empty_xdp = empty.program("netoken_empty_xdp")
        self.empty_tc = empty.program("netoken_empty_tc")
        self.current: tuple[bool, str | None] = (False, None)  # a fresh lab
        self.servers: list[subprocess.Popen] = []

    # -- configurations ---------------------------------------------------

    def _server(self, what: str | None) -> None:
        from .. import tc

        with netns(self.sv):
            for dev in (self.sv_c, self.sv_a):
                idx = socket.if_nametoindex(dev)
                with contextlib.suppress(OSError):
                    xdp_detach(idx, XDP_FLAGS_DRV_MODE)
                # No clsact qdisc left behind: an empty one still costs
                # every packet a classify call.
                with contextlib.suppress(OSError):
                    tc_hook_destroy(idx, BPF_TC_INGRESS | BPF_TC_EGRESS)
                if what == "guard":
                    self.guard.attach(dev, "native")
                elif what == "empty":
                    xdp_attach(
                        idx, self.empty_xdp, XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST
                    )
                elif what == "guard tc":
                    self.guard_tc.attach(dev)
                elif what == "empty tc":
                    tc.ensure_clsact(idx)
                    tc.attach(idx, "ingress", self.empty_tc.fd)

    def guard_prog(self) -> Any:
        """The guard program the current configuration runs (XDP or TC)."""
        return self.guard_tc.prog if self.current[1] == "guard tc" else self.guard.prog

    def _marker(self, on: bool) -> None:
        from .. import marker as marker_mod

        with netns(self.cl):
            if on:
                self.marker.attach(self.cl_if)
                return
            marker_mod.detach(self.cl_if)
            # An empty clsact qdisc still costs every packet a classify call:
            # the baseline has none.
            with contextlib.suppress(OSError):
                tc_hook_destroy(socket.if_nametoindex(self.cl_if), BPF_TC_INGRESS | BPF_TC_EGRESS)

    def use(self, marker: bool, server: str | None) -> None:
        """Marker on the client or not; on the server's ingress: None,
        "empty", "guard" (XDP), "empty tc", "guard tc"."""
        if self.current[0] != marker:
            self._marker(marker)
        if self.current[1] != server:
            self._server(server)
        self.current = (marker, server)

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
            p = self.lab.spawn(
                self.sv,
                sys.executable,
                "-c",
                _CRR_SERVER,
                str(PORT),
                stdout=subprocess.PIPE,
                text=True,
            )
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
        out[cfg] = {
            "rounds": xs,
            "median": _median(xs),
            "ratio": _median(ratios) if ratios else None,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
        }
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
    from .. import layout

    _say(progress, "e2e: connections/s, marker + guard with BPF run-time stats")
    return {
        "workers": workers,
        "seconds": seconds,
        "rounds": rounds,
        "configs": out,
        "marker_marked": m1["marked"] - m0["marked"],
        "guard_verdicts": {k: g1[k] - g0[k] for k in layout.GUARD_VERDICTS if g1[k] != g0[k]},
        "guard_rejected": g1["dropped"] - g0["dropped"],
        "in_situ": _in_situ(e, clients, max(1.0, seconds * 2), "guard"),
        "in_situ_tc": _in_situ(e, clients, max(1.0, seconds * 2), "guard tc"),
    }


def _in_situ(e: E2E, clients: Clients, seconds: float, server: str) -> dict[str, Any]:
    """What the programs cost on the real path, per run and per connection,
    from the kernel's run-time stats (a separate burst: the stats add two
    clock reads to every run, which the rounds above should not carry), with
    the guard at SERVER ("guard": XDP, "guard tc": TC ingress)."""
    e.use(True, server)
    progs = (("marker", e.marker.prog), ("guard", e.guard_prog()))
    with run_time_stats():
        before = {n: p.run_stats() for n, p in progs}
        res = clients.burst(seconds)
        after = {n: p.run_stats() for n, p in progs}
    out: dict[str, Any] = {"connections": res["ok"], "seconds": seconds, "hook": server}
    for n, b in before.items():
        runs = after[n].run_cnt - b.run_cnt
        ns = after[n].run_time_ns - b.run_time_ns
        out[n] = {
            "runs_per_connection": runs / res["ok"] if res["ok"] else None,
            "ns_per_run": ns / runs if runs else None,
            "ns_per_connection": ns / res["ok"] if res["ok"] else None,
        }
    return out


def e2e_iperf(e: E2E, rounds: int, seconds: int, progress: Progress) -> dict[str, Any]:
    if shutil.which("iperf3") is None:
        return {"error": "iperf3 is not installed"}
    e.lab.spawn(
        e.sv,
        "iperf3",
        "-s",
        "-p",
        str(IPERF_PORT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
    in_situ = {
        "gbps": gbps,
        "runs_per_s": runs / (seconds + omit),
        "ns_per_run": ns / runs if runs else None,
        "cpu_share": ns / 1e9 / (seconds + omit),
    }
    return {
        "seconds": seconds,
        "warmup_seconds": omit,
        "rounds": rounds,
        "streams": 1,
        "configs": _paired(per),
        "marker_in_situ": in_situ,
    }


def _iperf_once(e: E2E, seconds: int, omit: int) -> float:
    """Gbit/s the receiver saw; retried while the server is still starting."""
    err = ""
    for _ in range(20):
        r = subprocess.run(
            _in_ns(
                e.cl,
                "iperf3",
                "-c",
                SERVER_C,
                "-p",
                str(IPERF_PORT),
                "-t",
                str(seconds),
                "-O",
                str(omit),
                "-J",
            ),
            capture_output=True,
            text=True,
            check=False,
            timeout=seconds + omit + 30,
        )
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
    return {
        "rx_packets": d["rx"]["packets"],
        "rx_dropped": d["rx"]["dropped"],
        "tx_packets": d["tx"]["packets"],
        "tx_dropped": d["tx"]["dropped"],
    }


def _snmp(ns: str) -> dict[str, int]:
    out = subprocess.run(
        _in_ns(ns, "cat", "/proc/net/snmp", "/proc/net/netstat"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
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
        return syn_flood_argv(SERVER_A, PORT, seconds)
    mac = json.loads(_ip("-j", "link", "show", e.sv_a, ns=e.sv).stdout)[0]["address"]
    # Random source address, port and sequence number per packet; trafgen
    # recomputes the IP and TCP checksums of fields that change.
    cfg_file.write_text(
        f"{{ eth(da={mac}, type=0x0800), ipv4(saddr=drnd(), daddr={SERVER_A}, ttl=64), "
        f"tcp(sport=drnd(), dport={PORT}, syn, seq=drnd()) }}\n"
    )
    # One worker on the qdisc path: once a native-XDP veth pushes back,
    # trafgen's TX-ring path fails with EAGAIN and leaves its other workers
    # spinning.
    return interrupted_after(
        seconds, ["trafgen", "-o", e.at_if, "-c", str(cfg_file), "--qdisc-path", "--cpus", "1"]
    )


def _flood_sent(tool: str, out: str) -> int | None:
    if tool == "hping3":
        return hping3_sent(out)
    m = re.search(r"(\d+) packets outgoing", out)
    return int(m.group(1)) if m else None


def e2e_flood(
    e: E2E, seconds: float, tools: Sequence[str], tmp: Path, progress: Progress
) -> dict[str, Any]:
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
            row = _guarded(_flood_once, e, tool, cfg, seconds, tmp / "syn.trafgen", hz, ncpu, legit)
            legit.close()
            rows.append({"tool": tool, "config": cfg, **row})
    best = max((r for r in rows if "error" not in r), key=lambda r: r["offered_pps"], default=None)
    return {
        "seconds": seconds,
        "rows": rows,
        "max_offered_pps": best["offered_pps"] if best else None,
        "max_tool": best["tool"] if best else None,
    }


LEGIT_RATE = 200  # connections per second during a flood


def _flood_once(
    e: E2E,
    tool: str,
    cfg: str,
    seconds: float,
    cfg_file: Path,
    hz: int,
    ncpu: int,
    legit_clients: Clients,
) -> dict[str, Any]:
    cmd = _flood_cmd(e, tool, seconds, cfg_file)
    snmp0, link0, peer0 = _snmp(e.sv), _link(e.sv, e.sv_a), _link(e.at, e.at_if)
    g0 = e.guard.stats()
    guard_prog = e.guard_prog()
    guarded = cfg in ("guard", "tc guard")
    with run_time_stats():
        r0, m0 = guard_prog.run_stats(), e.marker.prog.run_stats()
        cpu0, t0 = _cpu_ticks(), time.monotonic()
        flood = e.lab.spawn(e.at, *cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        r1, m1 = guard_prog.run_stats(), e.marker.prog.run_stats()
    legit = legit_clients.collect(legit_s)
    g1 = e.guard.stats()
    snmp1, link1, peer1 = _snmp(e.sv), _link(e.sv, e.sv_a), _link(e.at, e.at_if)
    # The tool's own count; if it died before printing it (trafgen, rarely,
    # under a stopped queue), what the attacker's interface passed on.
    sent = _flood_sent(tool, out)
    counted_by = tool
    if sent is None:
        sent = peer1["tx_packets"] - peer0["tx_packets"] + peer1["tx_dropped"] - peer0["tx_dropped"]
        counted_by = "interface"
    rx = link1["rx_packets"] - link0["rx_packets"]
    dcpu = {k: (cpu1[k] - cpu0[k]) / hz / elapsed for k in _CPU_FIELDS}
    gd = {k: g1[k] - g0[k] for k in g1}
    runs = r1.run_cnt - r0.run_cnt
    marker_runs = m1.run_cnt - m0.run_cnt
    drops_per_s = gd["dropped"] / elapsed if guarded else None
    tcp = {
        k: snmp1.get(k, 0) - snmp0.get(k, 0)
        for k in (
            "TcpExt.SyncookiesSent",
            "TcpExt.ListenOverflows",
            "TcpExt.ListenDrops",
            "Tcp.InSegs",
            "Tcp.PassiveOpens",
        )
    }
    return {
        "tool": tool,
        "config": cfg,
        "seconds": round(elapsed, 2),
        "sent": sent,
        "offered_pps": sent / seconds,
        "counted_by": counted_by,
        "received": rx,
        "received_pps": rx / elapsed,
        "sender_dropped": peer1["tx_dropped"] - peer0["tx_dropped"],
        "server_tx_packets": link1["tx_packets"] - link0["tx_packets"],
        "guard_ok": gd["ok"] if guarded else None,
        "guard_dropped": gd["dropped"] if guarded else None,
        # Of what the attacker link delivered (the flood; the marked client
        # comes in on the other link and is counted in guard_ok).
        "guard_drop_fraction": gd["dropped"] / rx if guarded and rx else None,
        "guard_ns_per_packet": (r1.run_time_ns - r0.run_time_ns) / runs
        if runs and guarded
        else None,
        # Flood capacity: SYNs the guard drops per second of one CPU's
        # softirq time (the whole receive path, not the program alone), and
        # that time per dropped SYN.
        "guard_drops_per_s": drops_per_s,
        "guard_drops_per_cpu_s": drops_per_s / dcpu["softirq"]
        if drops_per_s and dcpu["softirq"]
        else None,
        "softirq_ns_per_drop": dcpu["softirq"] * 1e9 / drops_per_s if drops_per_s else None,
        # The legitimate client's marker meanwhile (its SYNs and the rest of
        # its packets), from the kernel's run-time stats.
        "marker_runs": marker_runs,
        "marker_ns_per_run": (m1.run_time_ns - m0.run_time_ns) / marker_runs
        if marker_runs
        else None,
        "cpu": {k: round(v, 3) for k, v in dcpu.items()},
        "cpus": ncpu,
        "softirq_ns_per_received": dcpu["softirq"] * 1e9 / (rx / elapsed) if rx else None,
        "tcp": tcp,
        "legit": legit,
    }


def e2e(
    quick: bool = False,
    progress: Progress = None,
    parts: Sequence[str] = ("connections", "iperf3", "flood"),
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="netoken-bench-")))
        _say(progress, "e2e: building the lab (client, server, attacker namespaces)")
        e = E2E(stack, tmp)
        e.start_servers(max(1, len(os.sched_getaffinity(0))))
        for part, fn in (
            (
                "connections",
                lambda: e2e_connections(e, 4 if quick else 20, 0.3 if quick else 0.5, progress),
            ),
            ("iperf3", lambda: e2e_iperf(e, 1 if quick else 5, 1 if quick else 2, progress)),
            (
                "flood",
                lambda: e2e_flood(e, 1.5 if quick else 3.0, ("hping3", "trafgen"), tmp, progress),
            ),
        ):
            if part in parts:
                out[part] = _guarded(fn)
    return out
