"""`netoken agent`, run as systemd or a DaemonSet runs it: a process per node.

Each "node" is a network namespace with its own agent (`netoken -n NS agent`),
its config on a Kubernetes-style volume where that matters (files are
symlinks through `..data`, and an update renames a new `..data` over the
old one, as the kubelet does for Secrets and ConfigMaps).  Real connections
run between the nodes while configs change; the guard drops every SYN
without a valid token, so a SYN that left unmarked (or with a key the guard
does not take) shows up in its counters.  Latencies are printed (run with
-s to see them); the 2 s and ±1 s bounds are design.md §6 guarantees.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from netoken import layout, marker
from netoken.datapath import realtime_minus_tai_ns, u32
from netoken.libbpf import Map
from netoken.netns import netns

from .conftest import TEST_KEY, Lab, build_topology, patience, run, uid
from .e2e import ConnectionLoop, server
from .test_cli import OTHER_KEY, PORT, forget, ok, pin_dir

NETOKEN = (sys.executable, "-m", "netoken")
METRICS = "127.0.0.1:9917"  # each node is its own namespace: no clash
_LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def logfmt(line: str) -> dict[str, str]:
    return {k: json.loads(v) if v.startswith('"') else v for k, v in _LOGFMT.findall(line)}


class Volume:
    """A Secret/ConfigMap volume as the kubelet lays it out: NAME ->
    ..data/NAME, ..data -> ..vN, and an update is a new ..vN plus one
    rename of ..data (then the old ..vN goes)."""

    def __init__(self, root: Path, files: dict[str, str], mode: int = 0o644) -> None:
        self.root, self.mode, self.n = root, mode, 0
        root.mkdir()
        self.publish(files)

    def publish(self, files: dict[str, str]) -> None:
        self.n += 1
        new = self.root / f"..v{self.n}"
        new.mkdir()
        for name, text in files.items():
            fd = os.open(new / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.mode)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(new.name)
        os.rename(tmp, self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        old = self.root / f"..v{self.n - 1}"
        if old.exists():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def __truediv__(self, name: str) -> Path:
        return self.root / name


class AgentProc:
    """`netoken -n NS agent -c CONFIG ...` in the background, its log parsed."""

    def __init__(self, ns: str, config: Path, log: Path, *extra: str) -> None:
        self.log_path = log
        self.proc = subprocess.Popen(
            [*NETOKEN, "-n", ns, "agent", "-c", str(config), *extra],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )

    def lines(self) -> list[dict[str, str]]:
        return [logfmt(line) for line in self.log_path.read_text().splitlines()]

    def wait_for(self, msg: str, limit: float = 60, after: int = 0, **fields: str) -> dict:
        """The first log line from index AFTER with MSG and FIELDS."""
        deadline = time.monotonic() + patience(limit)
        while True:
            for line in self.lines()[after:]:
                if line.get("msg") == msg and all(line.get(k) == v for k, v in fields.items()):
                    return line
            assert self.proc.poll() is None, f"agent exited {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {msg!r} {fields} in:\n{self.text()}"
            time.sleep(0.02)

    def text(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=patience(20))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def agent(ns: str, config: Path, log: Path, *extra: str) -> Iterator[AgentProc]:
    a = AgentProc(ns, config, log, *extra)
    try:
        a.wait_for("watching")  # started, attached what it selects, timers armed
        yield a
    finally:
        a.kill()


def ts(line: dict[str, str]) -> float:
    """A log line's time as a Unix time."""
    t = line["ts"]
    return (
        time.mktime(time.strptime(t[:19], "%Y-%m-%dT%H:%M:%S"))
        - time.timezone
        + float("0." + t[20:23])
    )


def keys_toml(keys: dict[int, Path], starts: dict[int, str] | None = None) -> str:
    out = ""
    for kid, path in keys.items():
        out += f'[[key]]\nid = {kid}\nfile = "{path}"\n'
        if starts and kid in starts:
            out += f"mark_from = {starts[kid]}\n"
    return out


def client_config(
    dest: str,
    keys: dict[int, Path],
    policy_keys: list[int],
    iface: str,
    starts: dict[int, str] | None = None,
    extra: str = "",
) -> str:
    return keys_toml(keys, starts) + textwrap.dedent(f"""
        [[policy]]
        name = "svc"
        destinations = ["{dest}/32"]
        ports = [{PORT}]
        keys = {policy_keys}

        [agent]
        mark = ["{iface}"]
        {extra}
        """)


def server_config(
    dest: str, keys: dict[int, Path], accept: list[int], iface: str, extra: str = ""
) -> str:
    return keys_toml(keys) + textwrap.dedent(f"""
        [guard]
        action = "drop"
        replay_cache = 4096

        [[guard.protect]]
        destinations = ["{dest}/32"]
        ports = [{PORT}]
        keys = {accept}

        [agent]
        guard = ["{iface}"]
        {extra}
        """)


def key_file(directory: Path, name: str, secret: bytes) -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    return path


def live_key(ifname: str) -> int:
    """The key the marker's first policy marks with, from the live maps."""
    d = pin_dir(ifname) / "marker"
    with Map.from_pinned(str(d / "nt_config")) as c, Map.from_pinned(str(d / "nt_policies")) as p:
        gen = layout.NtConfig.from_bytes(c.lookup(u32(0))).generation
        return layout.NtPolicy.from_bytes(p.lookup(u32((gen & 1) * marker.POLICY_HALF))).key_id


def wait_key(ifname: str, key: int, limit: float = 60) -> float:
    """Poll until the marker marks with KEY; when it was first seen."""
    deadline = time.monotonic() + limit
    while live_key(ifname) != key:
        assert time.monotonic() < deadline, f"marker on {ifname} still on key {live_key(ifname)}"
        time.sleep(0.005)
    return time.time()


def status(ns: str, iface: str) -> list[dict]:
    return json.loads(ok("status", iface, "--json", ns=ns))


def stats(ns: str, iface: str) -> dict:
    (d,) = json.loads(ok("stats", iface, "--json", ns=ns))
    return d


def scrape(ns: str) -> str:
    with netns(ns):
        return urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5).read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")) == labels:
            return float(m.group(2))
    raise AssertionError(f"no {name}{labels} in the scrape")


def clean_verdicts(d: dict) -> None:
    c = d["counters"]
    rejected = {v: c[v] for v in layout.GUARD_VERDICTS if v != "ok" and c[v]}
    assert not rejected, rejected


@pytest.fixture
def nodes(lab: Lab) -> Iterator:
    t = build_topology(lab)
    try:
        yield t
    finally:
        forget(t.client_if, t.server_if)


# --------------------------------------------------------------------------


def test_kubernetes_volumes_swaps_broken_config_metrics_and_exit(nodes, tmp_path):
    """The client node's config and keys live on kubelet-style volumes.  A
    config that names a key the Secret does not have yet is refused, and
    applied the moment the Secret update lands; the marker switches keys
    within 2 s with no SYN unmarked; a broken config is survived; /metrics
    serves the new families; SIGTERM leaves the marker, --detach-on-exit
    takes the guard away."""
    t = nodes
    skeys = tmp_path / "server-keys"
    skeys.mkdir()
    server_keys = {1: key_file(skeys, "1.key", TEST_KEY), 2: key_file(skeys, "2.key", OTHER_KEY)}
    scfg = tmp_path / "server.toml"
    scfg.write_text(server_config(t.server_ip, server_keys, [1, 2], t.server_if))

    keys = Volume(tmp_path / "keys", {"1.key": TEST_KEY.hex() + "\n"}, mode=0o400)
    both = {1: keys / "1.key", 2: keys / "2.key"}
    conf = Volume(
        tmp_path / "config",
        {
            "netoken.toml": client_config(
                t.server_ip, {1: keys / "1.key"}, [1], t.client_if, extra=f'metrics = "{METRICS}"'
            )
        },
    )

    with (
        agent(t.server, scfg, tmp_path / "server.log", "--detach-on-exit") as sa,
        agent(t.client, conf / "netoken.toml", tmp_path / "client.log") as ca,
    ):
        sa.wait_for("attached", iface=t.server_if, role="guard")
        ca.wait_for("attached", iface=t.client_if, role="marker")
        (m,) = status(t.client, t.client_if)
        assert m["role"] == "marker" and m["attached"] and m["config"] == str(conf / "netoken.toml")
        (g,) = status(t.server, t.server_if)
        assert g["role"] == "guard" and g["attached"]
        assert live_key(t.client_if) == 1

        with server(t.server, PORT), ConnectionLoop(t.client, t.server_ip, PORT) as loop:
            loop.wait_for(30, 15)
            # 1. the ConfigMap lands before the Secret: key 2's file is missing
            n = len(ca.lines())
            conf.publish(
                {
                    "netoken.toml": client_config(
                        t.server_ip, both, [2], t.client_if, extra=f'metrics = "{METRICS}"'
                    )
                }
            )
            err = ca.wait_for("config rejected; keeping the last good one", after=n)
            assert "2.key does not exist" in err["error"] and err["level"] == "error"
            assert live_key(t.client_if) == 1
            loop.wait_for(loop.done + 20, 15)
            # 2. the Secret update lands: the agent applies the waiting config
            t0 = time.time()
            keys.publish({"1.key": TEST_KEY.hex() + "\n", "2.key": OTHER_KEY.hex() + "\n"})
            t1 = wait_key(t.client_if, 2)
            print(f"\nSecret ..data swap -> marker on key 2: {(t1 - t0) * 1000:.0f} ms")
            ca.wait_for("applied", after=n, iface=t.client_if, role="marker", keys="1,2")
            loop.wait_for(loop.done + 30, 15)
            # 3. a broken config: one line, counted, the last good one stays
            n = len(ca.lines())
            conf.publish({"netoken.toml": "[[policy]\nname = 'oops'\n"})
            err = ca.wait_for("config rejected; keeping the last good one", after=n)
            assert "invalid TOML" in err["error"]
            loop.wait_for(loop.done + 30, 15)
            assert live_key(t.client_if) == 2 and ca.proc.poll() is None
            # 4. fixed again: back to key 1 through a ConfigMap swap alone
            t0 = time.time()
            conf.publish(
                {
                    "netoken.toml": client_config(
                        t.server_ip, both, [2, 1], t.client_if, extra=f'metrics = "{METRICS}"'
                    )
                }
            )
            t1 = wait_key(t.client_if, 1)
            print(f"ConfigMap ..data swap -> marker on key 1: {(t1 - t0) * 1000:.0f} ms")
            loop.wait_for(loop.done + 30, 15)
        assert not loop.failures, loop.failures[:3]
        print(f"{loop.done} connections, none failed")
        g = stats(t.server, t.server_if)
        clean_verdicts(g)
        assert g["counters"]["ok"] >= loop.done
        by_key = {k["id"]: k for k in g["keys"]}
        assert by_key[1]["ok"] > 0 and by_key[2]["ok"] > 0
        assert by_key[1]["bad"] == by_key[2]["bad"] == 0
        c = stats(t.client, t.client_if)["counters"]
        assert c["no_key"] == c["error"] == c["no_room"] == 0
        rejected = [line for line in ca.lines() if line["msg"].startswith("config rejected")]
        assert len(rejected) == 2

        text = scrape(t.client)
        assert sample(text, "netoken_agent_config_errors_total") == 2
        assert sample(text, "netoken_agent_applies_total", cause="config") == 2
        assert sample(text, "netoken_agent_applies_total", cause="schedule") == 0
        assert sample(text, "netoken_exporter_read_errors_total") == 0
        assert sample(text, "netoken_attached", interface=t.client_if, role="marker") == 1
        assert (
            sample(
                text, "netoken_events_total", interface=t.client_if, role="marker", result="lost"
            )
            == c["events_lost"]
        )
        assert (
            sample(text, "netoken_marker_packets_total", interface=t.client_if, reason="marked")
            >= loop.done
        )
        assert "process_cpu_seconds_total" in text

        assert ca.stop() == 0
        assert sa.stop(signal.SIGINT) == 0
    assert ca.lines()[-1]["msg"] == "programs stay attached"
    (m,) = status(t.client, t.client_if)
    assert m["attached"]
    assert [line["iface"] for line in sa.lines() if line["msg"] == "detached"] == [t.server_if]
    assert not pin_dir(t.server_if).exists()
    assert status(t.server, t.server_if) == []


def test_interfaces_appearing_later_get_marker_and_guard(lab: Lab, tmp_path):
    ns = lab.ns("ag")
    base = uid("ag")[:10]
    key = key_file(tmp_path, "1.key", TEST_KEY)
    cfg = tmp_path / "netoken.toml"
    cfg.write_text(
        keys_toml({1: key})
        + textwrap.dedent(f"""
        [[policy]]
        name = "p"
        destinations = ["192.0.2.0/24"]
        key = 1
        [guard]
        [[guard.protect]]
        destinations = ["192.0.2.0/24"]
        keys = [1]
        [agent]
        mark = ["{base}*"]
        guard = ["{base}[xz]"]
        """)
    )
    names = (base + "x", base + "y")  # x gets both roles, its peer y the marker
    try:
        with agent(ns, cfg, tmp_path / "agent.log", "--detach-on-exit") as a:
            t0 = time.time()
            run("ip", "-n", ns, "link", "add", names[0], "type", "veth", "peer", "name", names[1])
            both = [a.wait_for("attached", iface=names[0], role=r) for r in ("guard", "marker")]
            worst = max(ts(line) for line in both) - t0
            print(f"\nveth created -> marker and guard on it: {worst * 1000:.0f} ms")
            a.wait_for("attached", iface=names[1], role="marker")
            states = {(d["ifname"], d["role"]): d["attached"] for i in names for d in status(ns, i)}
            assert states == {
                (names[0], "marker"): True,
                (names[0], "guard"): True,
                (names[1], "marker"): True,
            }

            # something detaches behind the agent's back: it is put back
            n = len(a.lines())
            ok("guard", "detach", names[0], ns=ns)
            a.wait_for("attached", after=n, iface=names[0], role="guard")

            # the interface goes: so do its pins
            n = len(a.lines())
            run("ip", "-n", ns, "link", "del", names[0])
            for i, r in states:
                a.wait_for("detached", after=n, iface=i, role=r, reason="interface gone")
            for i in names:
                assert not pin_dir(i).exists()
            assert a.stop() == 0
    finally:
        forget(*names)


def test_mark_from_switches_on_time_and_guards_take_both_keys(nodes, tmp_path):
    """A fleet rotation driven by config files alone, on two nodes: one push
    adds key 2 with mark_from a few seconds ahead everywhere; the guard takes
    it at once, the marker switches at that instant."""
    t = nodes
    kdir = tmp_path / "keys"
    kdir.mkdir()
    keys = {1: key_file(kdir, "1.key", TEST_KEY), 2: key_file(kdir, "2.key", OTHER_KEY)}
    ccfg, scfg = tmp_path / "client.toml", tmp_path / "server.toml"
    ccfg.write_text(client_config(t.server_ip, {1: keys[1]}, [1], t.client_if))
    scfg.write_text(server_config(t.server_ip, {1: keys[1]}, [1], t.server_if))
    with (
        agent(t.server, scfg, tmp_path / "server.log") as sa,
        agent(t.client, ccfg, tmp_path / "client.log") as ca,
    ):
        sa.wait_for("attached", iface=t.server_if)
        ca.wait_for("attached", iface=t.client_if)
        with server(t.server, PORT), ConnectionLoop(t.client, t.server_ip, PORT) as loop:
            loop.wait_for(30, 15)
            before = stats(t.server, t.server_if)
            switch = int(time.time()) + 5
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(switch))
            n_s, n_c = len(sa.lines()), len(ca.lines())
            scfg.write_text(server_config(t.server_ip, keys, [1, 2], t.server_if))
            ccfg.write_text(client_config(t.server_ip, keys, [1, 2], t.client_if, {2: at}))
            sa.wait_for("applied", after=n_s, iface=t.server_if, keys="1,2")
            ca.wait_for("applied", after=n_c, iface=t.client_if, keys="1,2")
            assert live_key(t.client_if) == 1
            mid = stats(t.server, t.server_if)
            seen = wait_key(t.client_if, 2, limit=15)
            line = ca.wait_for("key switched", after=n_c, iface=t.client_if)
            loop.wait_for(loop.done + 30, 15)
    print(
        f"\nmark_from {at}: marker seen on key 2 {(seen - switch) * 1000:+.0f} ms, "
        f"logged {(ts(line) - switch) * 1000:+.0f} ms after the instant"
    )
    # Not before the instant (a guard may not take key 2 yet); how late is
    # printed above, not asserted: under load the agent waits for the state lock.
    assert seen >= switch - 0.1 and line["cause"] == "mark_from"
    assert line["policies"] == "svc:1->2"
    assert not loop.failures, loop.failures[:3]
    after = stats(t.server, t.server_if)
    clean_verdicts(after)

    def per_key(d: dict) -> dict[int, int]:
        return {k["id"]: k["ok"] for k in d["keys"]}

    # key 1 marked until the instant, key 2 after it, both verified throughout
    assert per_key(mid).get(2, 0) == 0 < per_key(after)[2]
    assert per_key(after)[1] > per_key(before)[1]
    print(
        f"{loop.done} connections, none failed; guard ok {before['counters']['ok']} -> "
        f"{after['counters']['ok']}, per key before {per_key(before)}, after {per_key(after)}"
    )


def test_clock_offset_is_put_right_when_the_clock_is_set(lab: Lab, tmp_path):
    """A stale REALTIME-TAI offset in the marker's config map (as after a
    TAI-offset change) is corrected when the kernel says the clock was set:
    here a set to the current time, which steps nothing."""
    ns = lab.ns("ck")
    iface = uid("ck")
    run("ip", "-n", ns, "link", "add", iface, "type", "veth", "peer", "name", iface + "p")
    run("ip", "-n", ns, "link", "set", iface, "up")
    key = key_file(tmp_path, "1.key", TEST_KEY)
    cfg = tmp_path / "netoken.toml"
    cfg.write_text(
        keys_toml({1: key})
        + textwrap.dedent(f"""
        [[policy]]
        name = "p"
        destinations = ["192.0.2.0/24"]
        key = 1
        [agent]
        mark = ["{iface}"]
        """)
    )
    try:
        with agent(ns, cfg, tmp_path / "agent.log") as a:
            a.wait_for("attached", iface=iface)
            right = realtime_minus_tai_ns()
            pin = str(pin_dir(iface) / "marker" / "nt_config")
            with Map.from_pinned(pin) as m:
                c = layout.NtConfig.from_bytes(m.lookup(u32(0)))
                assert c.realtime_minus_tai_ns == right
                c.realtime_minus_tai_ns = right - 37_000_000_000
                m.update(u32(0), bytes(c))
            n = len(a.lines())
            t0 = time.time()
            time.clock_settime_ns(time.CLOCK_REALTIME, time.clock_gettime_ns(time.CLOCK_REALTIME))
            a.wait_for("clock set", after=n)
            line = a.wait_for("clock offset corrected", after=n, iface=iface)
            print(f"\nclock set -> offset corrected: {(ts(line) - t0) * 1000:.0f} ms")
            assert line["cause"] == "clock-set"
            assert float(line["was"]) == (right - 37_000_000_000) / 1e9
            assert float(line["now"]) == right / 1e9
            with Map.from_pinned(pin) as m:
                assert layout.NtConfig.from_bytes(m.lookup(u32(0))).realtime_minus_tai_ns == right
            assert a.stop() == 0
    finally:
        forget(iface)


def test_startup_errors_are_one_line(tmp_path, lab: Lab):
    ns = lab.ns("er")
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nmark = [1]\n")
    for args, want in (
        (("-c", str(bad)), f"netoken: {bad}: [agent]: mark must hold interface names"),
        (("-c", str(tmp_path / "none.toml")), "cannot read config"),
        (("-c", str(bad), "--metrics", "nowhere"), "netoken: --listen 'nowhere': expected"),
    ):
        r = subprocess.run(
            [*NETOKEN, "-n", ns, "agent", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and want in lines[0] and "Traceback" not in r.stderr, r.stderr
