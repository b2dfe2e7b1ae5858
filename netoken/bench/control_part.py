"""The control-plane part: attach, a 10,000-prefix apply, the CLI from a cold
process, and `netoken monitor` over a long event stream."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .. import config as nconfig
from ..libbpf import Program
from ..netns import netns
from ..state import RoleState
from .common import BenchError, Progress, _frame, _guarded, _median, _say, bench_config
from .e2e_part import PORT
from .namespaces import lab


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
    d: dict[str, Any] = {
        "median_ms": _median(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "reps": reps,
    }
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
        out.append(
            f'[[policy]]\nname = "p{p}"\ndestinations = [{", ".join(dests)}]\n'
            f'ports = [443, "8000-8100"]\nkey = 1\n'
        )
    return "\n".join(out)


def control(quick: bool = False, progress: Progress = None) -> dict[str, Any]:
    reps = 3 if quick else 5
    out: dict[str, Any] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="netoken-bench-")))
        lb = stack.enter_context(lab())
        ns, peer = lb.ns("cp"), lb.ns("cq")
        dev, _ = lb.link(ns, peer, "198.18.212.1/24", "198.18.212.2/24")
        cfg = bench_config(
            tmp,
            '[[policy]]\nname = "p"\ndestinations = ["198.18.212.2/32"]\n'
            "key = 1\n\n[guard]\n[[guard.protect]]\n"
            'destinations = ["198.18.212.2/32"]\nkeys = [1]\n',
        )

        _say(progress, "control: attach")
        out["attach"] = _guarded(lambda: _time_attach(ns, dev, cfg, reps))
        out["guard_attach"] = _guarded(lambda: _time_guard_attach(ns, dev, cfg, reps))

        _say(progress, "control: guards on 1, 10 and 100 interfaces of one namespace")
        out["guard_scale"] = _guarded(lambda: guard_scale(tmp))

        _say(progress, "control: applying 10,000 prefixes")
        out["apply_10k"] = _guarded(lambda: _time_apply(tmp))

        # The CLI's own state: pins under /sys/fs/bpf/netoken/, removed below.
        n = netoken_cmd()
        stack.callback(_detach_pinned, ns, dev)
        r = subprocess.run(
            [*n, "-n", ns, "mark", "attach", dev, "-c", str(cfg.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode:
            out["cli"] = {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
            out["cli_cold_start"] = {
                "python -c pass": _timed([sys.executable, "-c", "pass"], reps),
                "import netoken.marker": _timed(
                    [sys.executable, "-c", "import netoken.marker"], reps
                ),
            }
            return out
        _say(progress, "control: CLI latency from a cold process")
        out["cli"] = time_cli_verbs(ns, dev, 5 if quick else 10)
        out["cli"]["netoken mark attach (replace)"] = _timed(
            [*n, "-n", ns, "mark", "attach", dev, "-c", str(cfg.path)], reps
        )
        big = tmp / "big"
        big.mkdir()
        big_cfg = bench_config(big, _policy_set(10_000, 100, 0))
        out["cli"]["netoken apply (10,000 prefixes)"] = _timed(
            [*n, "-n", ns, "apply", dev, "-c", str(big_cfg.path)], 2 if quick else 3
        )
        subprocess.run(
            [*n, "-n", ns, "apply", dev, "-c", str(cfg.path)], capture_output=True, check=False
        )

        _say(progress, "control: monitor")
        out["monitor"] = _guarded(
            lambda: monitor_bench(ns, dev, 100_000 if quick else 1_000_000, quick, progress)
        )
    return out


def _detach_pinned(ns: str, dev: str) -> None:
    from .. import marker as marker_mod

    with contextlib.suppress(Exception), netns(ns):
        marker_mod.detach_pinned(dev)


def _time_attach(ns: str, dev: str, cfg: nconfig.Config, reps: int) -> dict[str, Any]:
    from .. import marker as marker_mod
    from ..marker import Marker

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
        for k, v in (
            ("load", t1 - t0),
            ("configure", t2 - t1),
            ("attach", t3 - t2),
            ("total", t3 - t0),
        ):
            phases[k].append(v * 1e3)
    return {k: _median(v) for k, v in phases.items()} | {"reps": reps, "unit": "ms"}


def _time_guard_attach(ns: str, dev: str, cfg: nconfig.Config, reps: int) -> dict[str, Any]:
    from ..guard import Guard, detach

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
        for k, v in (
            ("load", t1 - t0),
            ("configure", t2 - t1),
            ("attach", t3 - t2),
            ("total", t3 - t0),
        ):
            phases[k].append(v * 1e3)
    return {k: _median(v) for k, v in phases.items()} | {
        "reps": reps,
        "unit": "ms",
        "replay_cache": cfg.guard.replay_cache,
    }


def guard_scale(tmp: Path, counts: tuple[int, ...] = (1, 10, 100)) -> dict[str, Any]:
    """The guard on more and more veths of one namespace, as `netoken guard
    attach` does it (attach_pinned, default replay cache): the time of each
    attach, and at each of COUNTS interfaces the kernel memory of netoken's
    maps (memlock, as `bpftool map show`): shared by the namespace (the
    replay cache's part of it apart), and per interface."""
    from .. import guard as guard_mod
    from .. import state

    home = tmp / "scale"
    home.mkdir(exist_ok=True)
    cfg = bench_config(
        home, '[guard]\n[[guard.protect]]\ndestinations = ["198.18.0.0/16"]\nkeys = [1]\n'
    )
    assert cfg.guard is not None
    n = max(counts)
    with lab() as lb:
        ns = lb.ns("gs")
        batch = home / "links"
        batch.write_text(
            "".join(
                f"link add g{i} type veth peer name g{i}p\nlink set g{i} up\nlink set g{i}p up\n"
                for i in range(n)
            )
        )
        subprocess.run(["ip", "-n", ns, "-batch", str(batch)], check=True, capture_output=True)
        with netns(ns):
            me = state.this_netns()
        top = state.BPFFS / state.ROOT_NAME / me.dirname
        try:
            points, times = [], []
            for i in range(n):
                with netns(ns):
                    t = time.perf_counter()
                    guard_mod.attach_pinned(f"g{i}", cfg)
                    times.append((time.perf_counter() - t) * 1e3)
                if i + 1 in counts:
                    own, shared, replay = _scale_memory(top)
                    points.append(
                        {
                            "interfaces": i + 1,
                            "attach_ms": times[-1],
                            "attach_ms_median": _median(times),
                            "shared_bytes": shared,
                            "own_bytes": own,
                            "per_interface_bytes": own / (i + 1),
                            "total_bytes": own + shared,
                            "replay_cache_bytes": replay,
                        }
                    )
        finally:
            for d in (top, state.RUN_DIR / me.dirname):
                subprocess.run(["rm", "-rf", str(d)], check=False)
    return {"replay_cache": cfg.guard.replay_cache, "points": points}


def _scale_memory(top: Path) -> tuple[int, int, int]:
    """(bytes of per-interface maps, of shared maps, of the replay cache) below TOP."""
    from .. import state

    own = shared = replay = 0
    for d, _, files in os.walk(top):
        for name in files:
            try:
                b = state.memlock(os.path.join(d, name))
            except (OSError, ValueError):
                continue  # a program
            if os.path.basename(d) == "guard" and os.path.dirname(d) == str(top):
                shared += b
                replay += b if name == "nt_replay" else 0
            else:
                own += b
    return own, shared, replay


def _time_apply(tmp: Path) -> dict[str, Any]:
    """10,000 /24 prefixes in 100 policies: parse, first apply, same again,
    and a different 10,000 over them (every entry replaced and deleted)."""
    from ..marker import Marker

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
    return {
        "prefixes": 10_000,
        "policies": 100,
        "unit": "ms",
        "load_config": (t1 - t0) * 1e3,
        "apply_empty_to_10k": (t3 - t2) * 1e3,
        "apply_same_10k": (t4 - t3) * 1e3,
        "apply_10k_replacing_10k": (t5 - t4) * 1e3,
    }


# -- monitor --------------------------------------------------------------


class _Producer:
    """Marked SYNs through the attached marker's own program (test_run), so
    the events are the real ones and go to the real ring buffer."""

    def __init__(self, st: RoleState) -> None:
        from ..libbpf import Map

        # Through the checked state directories, as every verb reads them.
        self.prog = Program.from_pinned(st.pin("prog"))
        self.stats_map = Map.from_pinned(st.pin("nt_mark_stats"))
        self.packet = _frame("198.18.212.2", dport=PORT)

    def stats(self) -> dict[str, int]:
        from .. import layout
        from ..datapath import percpu_counters

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


def monitor_bench(
    ns: str, dev: str, events: int, quick: bool, progress: Progress
) -> dict[str, Any]:
    """`netoken monitor --json` (output to /dev/null) following the marker.

    1. Flat out: the producer outruns the monitor, the monitor exits after
       EVENTS events; its rate then is what it can follow, and its memory
       (sampled every 2000 produced events) is that of a run that long.
    2. Paced: the producer holds a rate for a while, stepping from half of
       that to 1.3 times it; the highest step with no event lost is what it
       sustains (a lower bound when even the last step lost nothing).
    """
    from ..marker import Marker

    with netns(ns):
        prod = _Producer(Marker.state_of(dev))
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
        flat = {
            "events": events,
            "seconds": round(elapsed, 2),
            "events_per_s": events / elapsed,
            "produced": produced,
            "producer_per_s": produced / elapsed,
            "lost": c1["events_lost"] - c0["events_lost"],
            "exit": mon.returncode,
            "rss_kb_ready": ready[0] if ready else None,
            "rss_kb_last": last[0] if last else None,
            "rss_kb_peak": last[1] if last else None,
        }
        _say(progress, f"control: monitor followed {flat['events_per_s']:,.0f} events/s flat out")
        paced = _paced(
            prod, ns, dev, flat["events_per_s"], 1.0 if quick else 2.0, 4 if quick else 8
        )
    finally:
        if mon is not None:
            _stop(mon)
        prod.close()
    return {"flat_out": flat, "paced": paced}


def _paced(
    prod: _Producer, ns: str, dev: str, capacity: float, seconds: float, steps: int
) -> dict[str, Any]:
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
            rows.append(
                {
                    "target_per_s": round(rate),
                    "achieved_per_s": round(achieved),
                    "events": c1["marked"] - c0["marked"],
                    "lost": c1["events_lost"] - c0["events_lost"],
                }
            )
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
    return {
        "steps": rows,
        "seconds_per_step": seconds,
        "sustained_per_s": max(ok) if ok else None,
        "lower_bound": len(ok) == len(rows),
    }
