"""The `netoken` command, run as operators run it: a subprocess per call.

Interfaces live in namespaces from conftest's Lab; the CLI reaches them with
`netoken -n NS` (not `ip netns exec`, which hides /sys/fs/bpf).  bpffs pins
are global, so every test works on uniquely named interfaces and removes
their pins and metadata whatever happens.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netoken import config as nconfig
from netoken import marker, token
from netoken import tc as nt_tc
from netoken.libbpf import BPFError, Map, Program
from netoken.netns import netns
from netoken.state import BPFFS, IFACE_PREFIX, NETNS_PREFIX, RUN_DIR

from .conftest import TEST_KEY, Lab, Topology, build_topology, patience, run, write_key
from .e2e import (
    SYN_ONLY,
    ConnectionLoop,
    capture,
    connect,
    server,
    syn_retransmits,
    syns_at,
    wait_captured,
)
from .pkt import parse, syn

PORT = 8080
OTHER_KEY = bytes(range(100, 116))
EMPTY_OBJ = Path(__file__).resolve().parents[1] / "netoken" / "bpf" / "empty.bpf.o"


def netoken(
    *args: str, ns: str | None = None, pre: tuple[str, ...] = (), timeout: float = 30
) -> subprocess.CompletedProcess:
    netns = ("-n", ns) if ns else ()
    return subprocess.run(
        [*pre, sys.executable, "-m", "netoken", *netns, *args],
        capture_output=True,
        text=True,
        timeout=patience(timeout),
        check=False,
    )


def ok(*args: str, ns: str | None = None) -> str:
    r = netoken(*args, ns=ns)
    assert r.returncode == 0, f"netoken {' '.join(args)} failed: {r.stderr}"
    return r.stdout


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netoken: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


# ifname -> (its pin directory, its /run directory), once seen: state is
# keyed by namespace and ifindex, and test interface names are unique, so
# the metadata that names an interface finds its directories, and they are
# remembered for checking that they are gone later.
_DIRS: dict[str, tuple[Path, Path]] = {}


def _state_dirs(ifname: str) -> tuple[Path, Path] | None:
    for meta in RUN_DIR.glob(f"{NETNS_PREFIX}*/{IFACE_PREFIX}*/*.json"):
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if data.get("ifname") == ifname:
            run_dir = meta.parent
            _DIRS[ifname] = (BPFFS / "netoken" / run_dir.parent.name / run_dir.name, run_dir)
    return _DIRS.get(ifname)


def pin_dir(ifname: str) -> Path:
    """/sys/fs/bpf/netoken/net:COOKIE/if:IFINDEX of the interface netoken
    attached to as IFNAME (a path that does not exist if it never did)."""
    found = _state_dirs(ifname)
    return found[0] if found else BPFFS / "netoken" / "never-attached" / ifname


def run_dir(ifname: str) -> Path:
    found = _state_dirs(ifname)
    return found[1] if found else RUN_DIR / "never-attached" / ifname


def shared_dir(ifname: str, role: str = "guard") -> Path:
    """The state ROLE shares in IFNAME's network namespace."""
    return pin_dir(ifname).parent / role


def forget(*ifnames: str) -> None:
    """Remove the state of the namespaces these interfaces are in (each
    test's namespaces are its own)."""
    for name in ifnames:
        found = _state_dirs(name)
        if found is not None:
            shutil.rmtree(found[0].parent, ignore_errors=True)
            shutil.rmtree(found[1].parent, ignore_errors=True)


def qdiscs(ns: str, dev: str) -> str:
    return run("tc", "qdisc", "show", "dev", dev, ns=ns).stdout


def filters(ns: str, dev: str, hook: str) -> list[dict]:
    return json.loads(run("tc", "-j", "filter", "show", "dev", dev, hook, ns=ns).stdout or "[]")


def assert_nothing_left(ns: str, dev: str) -> None:
    assert not pin_dir(dev).exists()
    assert not run_dir(dev).exists()
    assert not pin_dir(dev).parent.exists()  # nor the namespace's directory
    assert "clsact" not in qdiscs(ns, dev)


def write_config(
    directory: Path, keys: dict[int, bytes], body: str, name: str = "netoken.toml"
) -> Path:
    parts = []
    for kid, secret in keys.items():
        path = write_key(directory, f"{kid}-{name}.key", secret)
        parts.append(f'[[key]]\nid = {kid}\nfile = "{path}"\n')
    path = directory / name
    path.write_text("\n".join(parts) + textwrap.dedent(body))
    return path


def policy(dest: str, key: int = 1, name: str = "svc") -> str:
    return f"""
[[policy]]
name = "{name}"
destinations = ["{dest}"]
ports = [{PORT}]
key = {key}
"""


@dataclass
class Setup:
    t: Topology
    cfg: Path
    dir: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return netoken(*args, ns=self.t.client)

    def ok(self, *args: str) -> str:
        return ok(*args, ns=self.t.client)

    def attach(self, cfg: Path | None = None) -> dict:
        return json.loads(
            self.ok("mark", "attach", self.t.client_if, "-c", str(cfg or self.cfg), "--json")
        )

    def status(self) -> dict:
        (d,) = json.loads(self.ok("status", self.t.client_if, "--json"))
        return d

    def counters(self) -> dict[str, int]:
        (d,) = json.loads(self.ok("stats", self.t.client_if, "--json"))
        return d["counters"]


@pytest.fixture
def setup(lab: Lab, tmp_path: Path) -> Iterator[Setup]:
    t = build_topology(lab)
    try:
        yield Setup(t, write_config(tmp_path, {1: TEST_KEY}, policy(f"{t.server_ip}/32")), tmp_path)
    finally:
        forget(t.client_if, t.server_if)


# --------------------------------------------------------------------------
# load: a steady loop of real connections while something changes


def steady_load(
    s: Setup,
    during: Callable[[], None],
    path: Path,
    before: int = 30,
    after: int = 30,
    workers: int = 4,
) -> tuple[list[tuple[float, bytes]], int]:
    """Connect in loops from WORKERS threads, run DURING once BEFORE
    connections succeeded, stop AFTER more; returns (every SYN the server
    saw, with its capture time; connections made).  Several loops make the
    change race many SYNs."""
    with server(s.t.server, PORT), capture(s.t.server, s.t.server_if, path, SYN_ONLY):
        with ConnectionLoop(s.t.client, s.t.server_ip, PORT, workers) as loop:
            loop.wait_for(before, 10)
            during()
            loop.wait_for(loop.done + after, 10)
        wait_captured(path, loop.done)
    assert not loop.failures, loop.failures[:3]
    return syns_at(path), loop.done


def token_of(raw: bytes) -> token.Token | None:
    opts = token.find_options(parse(raw).options)
    return token.decode(opts[0]) if len(opts) == 1 else None


def verifies(raw: bytes, key: bytes, at: float) -> bool:
    """RAW's token verifies under KEY at AT, the time it was captured (a slow
    run checks it later than the epoch window)."""
    p = parse(raw)
    (opt,) = token.find_options(p.options)
    good, _ = token.verify(opt, key, daddr=p.daddr, dport=p.dport, now=at)
    return good


# --------------------------------------------------------------------------
# key


def test_key_generate_writes_a_0600_key_and_never_overwrites(tmp_path):
    path = tmp_path / "1.key"
    out = ok("key", "generate", str(path))
    assert str(path) in out
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(path.read_text().strip())) == 16
    before = path.read_bytes()
    line = one_line_error(netoken("key", "generate", str(path)))
    assert str(path) in line and "refusing to overwrite" in line
    assert path.read_bytes() == before


# --------------------------------------------------------------------------
# the whole lifecycle


def test_attach_status_stats_monitor_detach(setup: Setup):
    s, t = setup, setup.t
    res = s.attach()
    assert (res["ifname"], res["replaced_prog_id"], res["created_clsact"]) == (
        t.client_if,
        None,
        True,
    )
    pins = sorted(os.listdir(pin_dir(t.client_if) / "marker"))
    assert pins == sorted(
        [
            "prog",
            "nt_config",
            "nt_keys",
            "nt_policies",
            "nt_dst_v4",
            "nt_dst_v6",
            "nt_mark_stats",
            "nt_mark_events",
        ]
    )

    # status from a fresh process agrees with what tc reports
    d = s.status()
    (ours,) = [f for f in filters(t.client, t.client_if, "egress") if "options" in f]
    assert ours["options"]["prog"]["id"] == d["prog"]["id"] == res["prog_id"]
    assert int(ours["options"]["handle"], 16) == d["attach"]["handle"] == 0x6E74
    assert ours["pref"] == d["attach"]["priority"] == 1
    assert d["state"] == "attached" and d["attached"] is True
    assert d["ifindex"] == res["ifindex"]
    assert d["config"] == str(s.cfg)
    assert [k["id"] for k in d["keys"]] == [1]
    assert d["policies"] == [
        {
            "name": "svc",
            "destinations": [f"{t.server_ip}/32"],
            "ports": [PORT],
            "mode": "mac",
            "keys": [1],
            "key": 1,
        }
    ]
    assert d["schedule"] == {"next_switch": None, "overdue": []}
    human = s.ok("status")
    for text in (t.client_if, f"prog {res['prog_id']}", "handle 0x6e74 prio 1", "svc", "attached"):
        assert text in human
    for out in (human, json.dumps(d)):
        assert TEST_KEY.hex() not in out  # never key bytes

    # monitor (JSON lines) sees the SYNs made after it started
    mon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "netoken",
            "-n",
            t.client,
            "monitor",
            t.client_if,
            "--json",
            "--count",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "following events" in mon.stderr.readline()
        with server(t.server, PORT):
            for _ in range(3):
                assert connect(t.client, t.server_ip, PORT).endswith(b"ok")
        out, err = mon.communicate(timeout=patience(10))
    finally:
        mon.kill()
    assert mon.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 3
    for e in events:
        assert (e["role"], e["policy"], e["daddr"], e["dport"], e["key_id"], e["mode"]) == (
            "marker",
            "svc",
            t.server_ip,
            PORT,
            1,
            "mac",
        )
        assert len(bytes.fromhex(e["tag"])) == 4 and len(bytes.fromhex(e["nonce"])) == 6
    assert "3 event(s) shown, 0 lost" in err

    counters = s.counters()
    assert counters["marked"] >= 3 and counters["error"] == 0
    human = s.ok("stats", t.client_if)
    assert "marked" in human and "events_lost" in human

    out = s.ok("mark", "detach", t.client_if)
    assert f"removed prog {res['prog_id']}" in out and "clsact removed" in out
    assert_nothing_left(t.client, t.client_if)
    assert "nothing attached" in s.ok("status")


def test_human_monitor_has_aligned_columns(setup: Setup):
    s, t = setup, setup.t
    s.attach()
    mon = subprocess.Popen(
        [sys.executable, "-m", "netoken", "-n", t.client, "monitor", "--count", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = mon.stderr.readline()
        if "in other network namespaces not shown" in line:  # other tests' state
            line = mon.stderr.readline()
        assert "following events" in line
        with server(t.server, PORT):
            for _ in range(2):
                connect(t.client, t.server_ip, PORT)
        out, _ = mon.communicate(timeout=patience(10))
    finally:
        mon.kill()
    header, *lines = out.splitlines()
    assert header.split()[:5] == ["TIME", "IFACE", "POLICY", "SOURCE", "DESTINATION"]
    assert len(lines) == 2
    col = header.index("DESTINATION")
    for line in lines:
        assert line[col:].startswith(f"{t.server_ip}:{PORT}")
        assert " svc " in line


def test_monitor_reports_lost_events(setup: Setup):
    s, t = setup, setup.t
    s.attach()
    out_file = s.dir / "monitor.out"
    with out_file.open("w") as out_w:  # a file, not a pipe: 2500 lines would block it
        mon = subprocess.Popen(
            [sys.executable, "-m", "netoken", "-n", t.client, "monitor", t.client_if, "--json"],
            stdout=out_w,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        assert "following events" in mon.stderr.readline()
        # A stalled consumer: the pinned program, run on the pinned maps,
        # fills the 256 KiB ring and the rest of the records are lost.
        mon.send_signal(signal.SIGSTOP)
        frame = syn(dst=t.server_ip, dport=PORT)
        with Program.from_pinned(str(pin_dir(t.client_if) / "marker" / "prog")) as prog:
            for _ in range(5000):
                prog.test_run(frame)
        mon.send_signal(signal.SIGCONT)
        time.sleep(1.5)  # the monitor checks the lost counter every second
        mon.send_signal(signal.SIGINT)
        _, err = mon.communicate(timeout=patience(10))
    finally:
        mon.kill()
    assert mon.returncode == 0, err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    lost = sum(r["lost"] for r in records if "lost" in r)
    events = [r for r in records if "lost" not in r]
    counters = s.counters()
    assert lost > 0 and lost == counters["events_lost"]
    assert len(events) + lost == counters["marked"] == 5000
    assert f"{len(events)} event(s) shown, {lost} lost while following" in err


def test_stats_watch_piped_prints_lines_and_ctrl_c_exits_0(setup: Setup):
    s, t = setup, setup.t
    s.attach()
    proc = subprocess.Popen(
        [sys.executable, "-m", "netoken", "-n", t.client, "stats", "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()
    with server(t.server, PORT):
        connect(t.client, t.server_ip, PORT)
    time.sleep(0.5)
    proc.send_signal(2)
    out, err = proc.communicate(timeout=patience(10))
    assert proc.returncode == 0, err
    lines = [first, *out.splitlines()]
    assert len(lines) >= 3
    assert all(f" {t.client_if} marker " in line for line in lines)
    assert any("marked=1 (" in line for line in lines)


# --------------------------------------------------------------------------
# attach twice, apply, coexistence


def test_key_schedule_in_apply_and_status(setup: Setup, tmp_path):
    """apply uses the schedule as of now and says when the next switch is
    due; status shows the key in use and a switch nobody performed."""
    s, t = setup, setup.t

    def config(start: float) -> tuple[Path, str]:
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
        return write_config(
            tmp_path,
            {1: TEST_KEY, 2: OTHER_KEY},
            f"""
[[key]]
id = 3
file = "{write_key(tmp_path, "3.key", OTHER_KEY)}"
mark_from = {at}
"""
            + policy(f"{t.server_ip}/32").replace("key = 1", "keys = [1, 3]")
            + policy("192.0.2.0/24", key=2, name="other"),
            name="sched.toml",
        ), at

    s.attach()
    cfg, at = config(time.time() + 3600)
    out = s.ok("apply", t.client_if, "-c", str(cfg))
    assert "keys in use: svc key 1, other key 2" in out
    assert f"next switch {at}: svc -> key 3 (performed by `netoken agent`" in out
    res = json.loads(s.ok("apply", t.client_if, "-c", str(cfg), "--json"))
    assert res[0]["schedule"] == {
        "in_use": {"svc": 1, "other": 2},
        "next_switch": {"at": at, "policies": {"svc": 3}},
    }
    d = s.status()
    assert [(p["name"], p["keys"], p["key"]) for p in d["policies"]] == [
        ("svc", [1, 3], 1),
        ("other", [2], 2),
    ]
    assert d["schedule"] == {"next_switch": {"at": at, "policies": {"svc": 3}}, "overdue": []}
    human = s.ok("status", t.client_if)
    assert "policy   svc    mac key 1 of 1,3" in human and f"next switch {at}" in human

    # nobody switches without the agent: status says so once the instant passed
    start = int(time.time()) + 4
    cfg, at = config(start)
    s.ok("apply", t.client_if, "-c", str(cfg))
    time.sleep(max(0.0, start - time.time()))
    d = s.status()
    assert d["schedule"] == {
        "next_switch": None,
        "overdue": [{"policy": "svc", "key": 3, "since": at}],
    }
    assert f"svc should mark with key 3 since {at}" in s.ok("status", t.client_if)
    res = json.loads(s.ok("apply", t.client_if, "-c", str(cfg), "--json"))
    assert res[0]["schedule"] == {"in_use": {"svc": 3, "other": 2}, "next_switch": None}
    d = s.status()
    assert [p["key"] for p in d["policies"]] == [3, 2] and d["schedule"]["overdue"] == []


def test_attach_twice_replaces_atomically_and_counters_persist(setup: Setup, tmp_path):
    s, t = setup, setup.t
    first = s.attach()
    retrans = syn_retransmits(t.client)
    with server(t.server, PORT):
        for _ in range(3):
            connect(t.client, t.server_ip, PORT)
    assert s.counters()["marked"] == 3 + syn_retransmits(t.client) - retrans

    second: dict = {}
    captured, made = steady_load(s, lambda: second.update(s.attach()), tmp_path / "re.pcap")
    assert second["replaced_prog_id"] == first["prog_id"]
    assert second["prog_id"] != first["prog_id"]
    assert s.status()["prog"]["id"] == second["prog_id"]
    assert len(captured) >= made
    unmarked = [raw for _, raw in captured if token_of(raw) is None]
    assert not unmarked, f"{len(unmarked)} of {len(captured)} SYNs unmarked during re-attach"
    assert all(verifies(raw, TEST_KEY, at) for at, raw in captured)
    assert s.counters()["marked"] >= 3 + len(captured)  # counters carried over
    # still exactly one netoken filter, the clsact still counts as ours
    assert len([f for f in filters(t.client, t.client_if, "egress") if "options" in f]) == 1
    assert "clsact removed" in s.ok("mark", "detach", t.client_if)


def test_apply_switches_tokens_with_zero_unmarked_syns(setup: Setup, tmp_path):
    s, t = setup, setup.t
    s.attach()
    new = write_config(
        tmp_path, {2: OTHER_KEY}, policy(f"{t.server_ip}/32", key=2), name="rotated.toml"
    )
    applied: list[str] = []
    captured, made = steady_load(
        s,
        lambda: applied.append(s.ok("apply", t.client_if, "-c", str(new))),
        tmp_path / "apply.pcap",
    )
    assert "applied" in applied[0]
    assert len(captured) >= made
    tokens = [token_of(raw) for _, raw in captured]
    assert None not in tokens, (
        f"{tokens.count(None)} of {len(captured)} SYNs unmarked; "
        f"marker counters {s.counters()}; unmarked: "
        f"{[r.hex() for (_, r), tk in zip(captured, tokens) if tk is None]}"
    )
    by_key: dict[int, list[tuple[float, bytes]]] = {1: [], 2: []}
    for seen, tok in zip(captured, tokens, strict=True):
        by_key[tok.key_id].append(seen)
    assert by_key[1] and by_key[2], {k: len(v) for k, v in by_key.items()}
    assert all(verifies(raw, TEST_KEY, at) for at, raw in by_key[1])
    assert all(verifies(raw, OTHER_KEY, at) for at, raw in by_key[2])
    d = s.status()
    assert [k["id"] for k in d["keys"]] == [2]  # key 1 is gone from the live map
    assert d["config"] == str(new)


def test_apply_removes_entries_that_disappeared(setup: Setup, tmp_path):
    s, t = setup, setup.t
    two = write_config(
        tmp_path,
        {1: TEST_KEY},
        policy(f"{t.server_ip}/32")
        + policy("192.0.2.0/24", name="gone")
        + policy("2001:db8::/64", name="gone6"),
        name="two.toml",
    )
    s.attach(two)
    v4 = pin_dir(t.client_if) / "marker" / "nt_dst_v4"
    v6 = pin_dir(t.client_if) / "marker" / "nt_dst_v6"
    with Map.from_pinned(str(v4)) as m4, Map.from_pinned(str(v6)) as m6:
        assert (len(list(m4.keys())), len(list(m6.keys()))) == (2, 1)
        out = s.ok("apply", t.client_if, "-c", str(s.cfg))
        assert "removed: gone, gone6" in out
        assert (len(list(m4.keys())), len(list(m6.keys()))) == (1, 0)
    assert [p["name"] for p in s.status()["policies"]] == ["svc"]
    with server(t.server, PORT):
        connect(t.client, t.server_ip, PORT)
    assert s.counters()["marked"] == 1


@pytest.mark.parametrize("hook", ["egress", "ingress"])
def test_foreign_filter_is_left_alone(setup: Setup, hook):
    s, t = setup, setup.t
    run("tc", "qdisc", "add", "dev", t.client_if, "clsact", ns=t.client)
    run(
        "tc",
        "filter",
        "add",
        "dev",
        t.client_if,
        hook,
        "prio",
        "49152",
        "bpf",
        "da",
        "obj",
        str(EMPTY_OBJ),
        "sec",
        "tc",
        ns=t.client,
    )
    foreign = filters(t.client, t.client_if, hook)
    res = s.attach()
    assert res["created_clsact"] is False
    with server(t.server, PORT):
        assert connect(t.client, t.server_ip, PORT).endswith(b"ok")
    assert s.counters()["marked"] == 1
    s.attach()  # the replace must not touch the foreign filter either
    out = s.ok("mark", "detach", t.client_if)
    assert "clsact kept" in out
    assert filters(t.client, t.client_if, hook) == foreign
    assert "clsact" in qdiscs(t.client, t.client_if)
    assert not pin_dir(t.client_if).exists()


def test_clsact_netoken_created_stays_while_others_use_it(setup: Setup):
    s, t = setup, setup.t
    assert s.attach()["created_clsact"] is True
    run(
        "tc",
        "filter",
        "add",
        "dev",
        t.client_if,
        "ingress",
        "prio",
        "49152",
        "bpf",
        "da",
        "obj",
        str(EMPTY_OBJ),
        "sec",
        "tc",
        ns=t.client,
    )
    assert "clsact kept" in s.ok("mark", "detach", t.client_if)
    assert "clsact" in qdiscs(t.client, t.client_if)
    assert len(filters(t.client, t.client_if, "ingress")) == 2  # prio header + filter


def test_interface_names_with_dots_and_global_json_flag(setup: Setup):
    s, t = setup, setup.t
    vlan = f"ntd{os.getpid() % 10000}.7"
    run("ip", "link", "add", vlan, "type", "veth", "peer", "name", f"{vlan}p", ns=t.client)
    try:
        res = json.loads(s.ok("mark", "attach", vlan, "-c", str(s.cfg), "-j"))
        assert (pin_dir(vlan) / "marker" / "prog").exists()
        # keyed by ifindex: bpffs refuses dots in names, and names change
        assert pin_dir(vlan).name == f"if:{res['ifindex']}"
        (d,) = json.loads(s.ok("-j", "status", vlan))
        assert (d["ifname"], d["prog"]["id"], d["state"]) == (vlan, res["prog_id"], "attached")
        s.ok("mark", "detach", vlan)
        assert not pin_dir(vlan).exists()
    finally:
        forget(vlan)


def test_detach_after_the_interface_vanished_cleans_pins(setup: Setup):
    s, t = setup, setup.t
    s.attach()
    run("ip", "link", "del", t.client_if, ns=t.client)
    out = s.ok("status")
    assert "interface missing" in out
    assert "is gone" in s.ok("mark", "detach", t.client_if)
    assert not pin_dir(t.client_if).exists()


def test_missing_bpffs_is_mounted(setup: Setup):
    s, t = setup, setup.t
    # A private mount namespace without bpffs: netoken mounts one there (and
    # its pins vanish with that namespace, which is what this test wants).
    script = (
        f"umount /sys/fs/bpf && {sys.executable} -m netoken -n {t.client} mark attach "
        f"{t.client_if} -c {s.cfg} && grep -c ' /sys/fs/bpf .* - bpf ' /proc/self/mountinfo"
    )
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "marker attached" in r.stdout and r.stdout.strip().endswith("1")
    assert not pin_dir(t.client_if).exists()  # the host's bpffs was never touched


def _failing_tc_attach(*args, **kw):
    raise BPFError(errno.EBUSY, "attach tc filter (injected)")


def test_failed_first_attach_leaves_nothing(setup: Setup, monkeypatch):
    s, t = setup, setup.t
    monkeypatch.setattr(nt_tc, "tc_attach", _failing_tc_attach)
    with netns(t.client), pytest.raises(BPFError):
        marker.attach_pinned(t.client_if, nconfig.load(s.cfg))
    assert_nothing_left(t.client, t.client_if)


def test_failed_replace_keeps_the_running_marker(setup: Setup, tmp_path, monkeypatch):
    s, t = setup, setup.t
    first = s.attach()
    other = write_config(
        tmp_path, {2: OTHER_KEY}, policy(f"{t.server_ip}/32", key=2), name="other.toml"
    )
    monkeypatch.setattr(nt_tc, "tc_attach", _failing_tc_attach)
    with netns(t.client), pytest.raises(BPFError):
        marker.attach_pinned(t.client_if, nconfig.load(other))
    d = s.status()
    assert (d["prog"]["id"], d["state"]) == (first["prog_id"], "attached")
    assert [k["id"] for k in d["keys"]] == [1]  # the old config was put back
    assert sorted(os.listdir(pin_dir(t.client_if) / "marker")).count("prog_new") == 0
    with server(t.server, PORT):
        connect(t.client, t.server_ip, PORT)
    assert s.counters()["marked"] == 1


# --------------------------------------------------------------------------
# errors: one line, non-zero, nothing left behind


def test_missing_interface_is_one_line(setup: Setup):
    line = one_line_error(setup.cli("mark", "attach", "ntnosuch0", "-c", str(setup.cfg)))
    assert "'ntnosuch0' does not exist" in line
    assert not pin_dir("ntnosuch0").exists()
    line = one_line_error(setup.cli("mark", "detach", "ntnosuch0"))
    assert "does not exist" in line
    line = one_line_error(setup.cli("apply", setup.t.client_if, "-c", str(setup.cfg)))
    assert "no marker on" in line


def test_not_root_is_one_line(setup: Setup):
    # nobody, with only CAP_DAC_READ_SEARCH (ambient, so it survives the
    # exec): enough to import netoken from a checkout under a root-only
    # directory (a clone in `mktemp -d`), nothing that loads or attaches.
    pre = (
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all,+dac_read_search",
        "--ambient-caps=-all,+dac_read_search",
    )
    r = netoken("mark", "attach", setup.t.client_if, "-c", str(setup.cfg), pre=pre)
    assert "not running as root" in one_line_error(r)
    r = netoken("status", pre=pre)
    assert "permission denied" in one_line_error(r)


def test_ip_netns_exec_is_refused_with_a_hint(setup: Setup):
    r = subprocess.run(
        ["ip", "netns", "exec", setup.t.client, sys.executable, "-m", "netoken", "status"],
        capture_output=True,
        text=True,
        check=False,
    )
    line = one_line_error(r)
    assert f"netoken -n {setup.t.client}" in line


KEYS = '[[key]]\nid = 1\nfile = "{key}"\n'
POLICY = '[[policy]]\nname = "p"\ndestinations = ["{dest}"]\nports = [{ports}]\nkey = 1\n'


def _key(directory: Path, text: str | None = None, mode: int = 0o600) -> Path:
    path = directory / "k.key"
    if text is not None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, mode)
    return path


GOOD_KEY = TEST_KEY.hex()

# (id, config text with {key}, key file text, key mode, ENTRY, PROBLEM fragment)
BAD = [
    (
        "unknown-key",
        KEYS + '[[policy]]\nname = "p"\ndestinations = ["10.0.0.0/8"]\nkey = 1\ncolour = "red"\n',
        GOOD_KEY,
        0o600,
        'policy "p"',
        'unknown key "colour"',
    ),
    (
        "bad-cidr",
        KEYS + POLICY.format(dest="10.0.0.0/33", ports=80),
        GOOD_KEY,
        0o600,
        'policy "p"',
        "not an IPv4 or IPv6 prefix",
    ),
    (
        "host-bits",
        KEYS + POLICY.format(dest="10.0.0.1/24", ports=80),
        GOOD_KEY,
        0o600,
        'policy "p"',
        "host bits set",
    ),
    (
        "port-0",
        KEYS + POLICY.format(dest="10.0.0.0/8", ports=0),
        GOOD_KEY,
        0o600,
        'policy "p"',
        "port 0",
    ),
    (
        "port-65536",
        KEYS + POLICY.format(dest="10.0.0.0/8", ports=65536),
        GOOD_KEY,
        0o600,
        'policy "p"',
        "port 65536",
    ),
    (
        "reversed-range",
        KEYS + POLICY.format(dest="10.0.0.0/8", ports='"90-80"'),
        GOOD_KEY,
        0o600,
        'policy "p"',
        "reversed",
    ),
    (
        "duplicate-name",
        KEYS
        + POLICY.format(dest="10.0.0.0/8", ports=80)
        + POLICY.format(dest="10.1.0.0/16", ports=80),
        GOOD_KEY,
        0o600,
        'policy "p"',
        "duplicate policy name",
    ),
    (
        "overlap",
        KEYS
        + POLICY.format(dest="10.0.0.0/8", ports=80)
        + POLICY.replace('"p"', '"q"').format(dest="10.0.0.0/8", ports='"70-90"'),
        GOOD_KEY,
        0o600,
        'policy "q"',
        "overlaps",
    ),
    (
        "key-missing",
        KEYS + POLICY.format(dest="10.0.0.0/8", ports=80),
        None,
        0o600,
        "key 1",
        "does not exist",
    ),
    (
        "key-unreadable",
        KEYS + POLICY.format(dest="10.0.0.0/8", ports=80),
        GOOD_KEY,
        0o200,
        "key 1",
        "cannot be read",
    ),
    (
        "key-short",
        KEYS + POLICY.format(dest="10.0.0.0/8", ports=80),
        GOOD_KEY[:30],
        0o600,
        "key 1",
        "30 hex characters",
    ),
    (
        "key-not-hex",
        KEYS + POLICY.format(dest="10.0.0.0/8", ports=80),
        "zz" * 16,
        0o600,
        "key 1",
        "not hex",
    ),
    (
        "key-world-readable",
        KEYS + POLICY.format(dest="10.0.0.0/8", ports=80),
        GOOD_KEY,
        0o644,
        "key 1",
        "readable by group/others",
    ),
    (
        "unknown-key-id",
        KEYS + POLICY.format(dest="10.0.0.0/8", ports=80).replace("key = 1", "key = 7"),
        GOOD_KEY,
        0o600,
        'policy "p"',
        "refers to key 7",
    ),
    (
        "static-token-65-bit",
        KEYS + '[[policy]]\nname = "p"\ndestinations = ["10.0.0.0/8"]\n'
        'mode = "static"\ntoken = "0x1_0000_0000_0000_0000"\n',
        GOOD_KEY,
        0o600,
        'policy "p"',
        "does not fit in 64 bits",
    ),
    ("kind-252", "[option]\nkind = 252\n" + KEYS, GOOD_KEY, 0o600, "[option]", "253 or 254"),
    (
        "exid-17-bit",
        "[option]\nexid = 0x10000\n" + KEYS,
        GOOD_KEY,
        0o600,
        "[option]",
        "out of range",
    ),
]


@pytest.fixture(scope="module")
def spare_iface() -> Iterator[tuple[str, str]]:
    lab = Lab()
    try:
        a, b = lab.ns("cl"), lab.ns("sv")
        ia, _ = lab.link(a, b)
        yield a, ia
    finally:
        forget(ia)
        lab.close()


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_config_is_one_line_and_nothing_is_attached(case, spare_iface, tmp_path):
    _, text, key_text, mode, entry, problem = case
    ns, dev = spare_iface
    key = _key(tmp_path, key_text, mode)
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text.format(key=key))
    # root reads any file; without DAC override an owner-write-only key is unreadable
    pre = (
        (
            "setpriv",
            "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search",
        )
        if mode == 0o200
        else ()
    )
    for verb in (["mark", "attach", dev], ["apply", dev]):
        r = netoken(*verb, "-c", str(cfg), ns=ns, pre=pre)
        line = one_line_error(r)
        assert line.startswith(f"netoken: {cfg}: {entry}: "), line
        assert problem in line, line
    assert_nothing_left(ns, dev)
