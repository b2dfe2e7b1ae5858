"""`netoken exporter`: real pins, real namespaces, real HTTP scrapes.

A marker on the client's veth and a guard on the server's veth see real
connections (and a few forged SYNs run through the pinned guard program);
one exporter per namespace is scraped over HTTP from inside that namespace
and must agree with `netoken stats --json`.

The exporter runs as `netoken -n NS exporter ARGS` will: a subprocess that
enters the namespace (netoken.netns, what `-n` uses), parses the verb's
arguments with exporter.add_arguments and calls exporter.run.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netoken import __version__, exporter, layout, marker, token
from netoken.guard import RETVALS
from netoken.libbpf import Program
from netoken.netns import netns
from netoken.state import RoleState

from .conftest import TEST_KEY, Lab, Topology, build_topology, run
from .e2e import connect, server
from .pkt import rebuild_with_option, syn
from .test_cli import forget, ok, one_line_error, pin_dir, write_config

PORT = 8080
CONNECTIONS = 3
OTHER_KEY = bytes(range(100, 116))
UNKNOWN_KEY_ID = 7
METRICS_FILE = Path(__file__).resolve().parents[1] / "contrib" / "grafana" / "METRICS"

DRIVER = """
import argparse, sys
from netoken import exporter
from netoken.netns import netns
p = argparse.ArgumentParser(prog="netoken exporter")
exporter.add_arguments(p)
ns, argv = sys.argv[1] or None, sys.argv[2:]
with netns(ns):
    sys.exit(exporter.run(p.parse_args(argv)))
"""

BODY = f"""
[[policy]]
name = "svc"
destinations = ["{{server}}/32"]
ports = [{PORT}]
key = 1

[guard]
action = "drop"

[[guard.protect]]
destinations = ["{{server}}/32"]
ports = [{PORT}]
keys = [1]
"""


def exporter_cmd(ns: str | None, *args: str) -> list[str]:
    return [sys.executable, "-c", DRIVER, ns or "", *args]


def run_exporter(
    ns: str | None, *args: str, pre: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*pre, *exporter_cmd(ns, *args)], capture_output=True, text=True, timeout=30, check=False
    )


@dataclass
class Running:
    url: str
    notes: list[str] = field(default_factory=list)  # stderr lines before it served
    err: str = ""  # the rest of its stderr, once it has exited


@contextmanager
def exporter_running(ns: str | None, *args: str) -> Iterator[Running]:
    """The exporter serving in NS until the block ends; it must then exit 0
    on SIGTERM (what systemd and the kubelet send) without a traceback."""
    proc = subprocess.Popen(
        exporter_cmd(ns, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    running = Running("")
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 15
        while not running.url and time.monotonic() < deadline:
            # Notes may come first; the readiness line names the URL.
            ready, _, _ = select.select([proc.stderr], [], [], 0.5)
            line = proc.stderr.readline() if ready else ""
            lines.append(line)
            if m := re.search(r"serving metrics on (http://\S+/metrics)", line):
                running.url = m.group(1)
            elif ready and not line:
                break  # exited
        assert running.url, f"exporter did not start: {''.join(lines)!r}"
        running.notes = [line for line in lines if line and "serving" not in line]
        yield running
    finally:
        err = stop(proc)
    running.err = err
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
    """Signal PROC, wait for it (killing it if it hangs); its stderr."""
    proc.send_signal(sig)
    try:
        return proc.communicate(timeout=10)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


def scrape(ns: str, url: str) -> str:
    """GET URL with a socket made inside NS (the exporter listens on its loopback)."""
    with netns(ns):
        resp = urllib.request.urlopen(url, timeout=10)
    with resp:
        assert resp.status == 200
        return resp.read().decode()


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def samples(text: str) -> Samples:
    """{sample name: {sorted label items: value}}; also proves TEXT parses."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def families(text: str) -> dict[str, str]:
    """{exposed family name: type} from the # TYPE lines."""
    return {m[1]: m[2] for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)}


def by(s: Samples, name: str, label: str, **fixed: str) -> dict[str, float]:
    """Values of NAME keyed by LABEL, among samples whose labels include FIXED."""
    out = {}
    for labels, value in s.get(name, {}).items():
        d = dict(labels)
        if all(d.get(k) == v for k, v in fixed.items()):
            out[d[label]] = value
    return out


def stats(ns: str, ifname: str) -> dict[str, dict[str, int]]:
    return {d["role"]: d["counters"] for d in json.loads(ok("stats", ifname, "--json", ns=ns))}


def forged_syn(dst: str, key: bytes, key_id: int) -> bytes:
    opt = token.build_mac_option(
        key,
        key_id=key_id,
        epoch=token.epoch_now(30),
        daddr=dst,
        dport=PORT,
        nonce=os.urandom(token.NONCE_LEN),
    )
    return rebuild_with_option(syn(dst=dst, dport=PORT), opt)


# --------------------------------------------------------------------------
# one lab for the read-only tests


@pytest.fixture(scope="module")
def topo(tmp_path_factory) -> Iterator[Topology]:
    """Marker on the client's veth, guard (drop mode) on the server's, after
    CONNECTIONS marked connections and three SYNs the guard rejects: one
    without a token, one whose tag is wrong, one with a key id it does not
    accept."""
    lab = Lab()
    directory = tmp_path_factory.mktemp("exporter")
    t = None
    try:
        t = build_topology(lab)
        cfg = write_config(directory, {1: TEST_KEY}, BODY.format(server=t.server_ip))
        ok("mark", "attach", t.client_if, "-c", str(cfg), ns=t.client)
        ok("guard", "attach", t.server_if, "-c", str(cfg), ns=t.server)
        with server(t.server, PORT):
            for _ in range(CONNECTIONS):
                assert connect(t.client, t.server_ip, PORT).endswith(b"ok")
        with Program.from_pinned(str(pin_dir(t.server_if) / "guard" / "prog")) as prog:
            for frame in (
                syn(dst=t.server_ip, dport=PORT),
                forged_syn(t.server_ip, OTHER_KEY, 1),
                forged_syn(t.server_ip, TEST_KEY, UNKNOWN_KEY_ID),
            ):
                # a veth: the guard runs at TC (TC_ACT_SHOT)
                assert prog.test_run(frame).retval == RETVALS["tc"]["drop"]
        yield t
    finally:
        if t is not None:
            forget(t.client_if, t.server_if)
        lab.close()


# --------------------------------------------------------------------------
# HTTP


def test_scrape_serves_every_family_with_the_values_of_netoken_stats(topo: Topology):
    t = topo
    with exporter_running(t.client) as c, exporter_running(t.server) as s:
        assert c.url == "http://127.0.0.1:9917/metrics"  # the default, in each namespace
        before = {
            "marker": stats(t.client, t.client_if)["marker"],
            "guard": stats(t.server, t.server_if)["guard"],
        }
        client_text, server_text = scrape(t.client, c.url), scrape(t.server, s.url)
        after = {
            "marker": stats(t.client, t.client_if)["marker"],
            "guard": stats(t.server, t.server_if)["guard"],
        }
    cs, ss = samples(client_text), samples(server_text)

    want_types = {f.name: f.kind for f in exporter.FAMILIES}
    for text in (client_text, server_text):
        types = families(text)
        assert {k: v for k, v in types.items() if k.startswith("netoken_")} == want_types
        assert "process_cpu_seconds_total" in types  # process metrics are served too
        for f in exporter.FAMILIES:
            assert re.search(rf"^# HELP {f.name} \S.{{20,}}$", text, re.MULTILINE), f.name

    def sandwich(role: str, reason: str, value: float) -> None:
        # Background packets (IPv6 neighbour discovery) may be counted
        # between the two `netoken stats` calls: the scrape lies between.
        assert before[role][reason] <= value <= after[role][reason], (role, reason, value)

    # marker, client namespace only
    packets = by(cs, "netoken_marker_packets_total", "reason", interface=t.client_if)
    # one reason per packet: events (and actions on top of marking) are elsewhere
    assert list(packets) == list(layout.MARK_PACKET_REASONS)
    assert "events_lost" not in packets
    for reason, value in packets.items():
        sandwich("marker", reason, value)
    marked = packets["marked"]
    assert marked >= CONNECTIONS
    assert cs["netoken_syn_marked_total"] == {
        (("interface", t.client_if),): marked + packets["marked_payload"]
    }
    actions = by(cs, "netoken_marker_actions_total", "action", interface=t.client_if)
    assert list(actions) == list(layout.MARK_ACTIONS)
    for action, value in actions.items():
        sandwich("marker", action, value)
    lost = {
        (d["role"], d["result"]): v
        for d, v in ((dict(k), v) for k, v in cs["netoken_events_total"].items())
    }
    assert lost == {("marker", "lost"): after["marker"]["events_lost"]}
    assert cs["netoken_exporter_read_errors_total"] == {(): 0}
    assert cs["netoken_attached"] == {(("interface", t.client_if), ("role", "marker")): 1}
    assert not any(name.startswith("netoken_guard_") for name in cs)

    # guard, server namespace only
    gp = by(ss, "netoken_guard_packets_total", "reason", interface=t.server_if)
    assert list(gp) == list(layout.GUARD_VERDICTS + layout.GUARD_PASS_REASONS)
    for reason, value in gp.items():
        sandwich("guard", reason, value)
    # a sum over reason is packets: every packet the guard saw, once
    assert sum(gp.values()) >= marked + 3
    verdicts = by(ss, "netoken_guard_syn_verdicts_total", "verdict", interface=t.server_if)
    assert verdicts == {v: gp[v] for v in layout.GUARD_VERDICTS}
    # Every SYN the marker marked reached the guard and verified.
    assert verdicts["ok"] == marked
    assert (verdicts["missing"], verdicts["bad_tag"], verdicts["unknown_key"]) == (1, 1, 1)
    assert by(ss, "netoken_guard_actions_total", "action", interface=t.server_if) == {
        "dropped": 3,
        "monitored": 0,
    }
    assert ss["netoken_guard_replay_cache_errors_total"] == {(("interface", t.server_if),): 0}
    events = {
        (d["role"], d["result"]): v
        for d, v in ((dict(k), v) for k, v in ss["netoken_events_total"].items())
    }
    # every rejected SYN is accounted for: written, or suppressed (here:
    # nobody follows the events, so none is written), or lost
    assert events == {("guard", "written"): 0, ("guard", "suppressed"): 3, ("guard", "lost"): 0}
    keys = {
        (d["key_id"], d["result"]): v
        for d, v in ((dict(k), v) for k, v in ss["netoken_guard_key_syns_total"].items())
    }
    assert keys == {
        ("1", "ok"): marked,
        ("1", "bad"): 1,
        (str(UNKNOWN_KEY_ID), "ok"): 0,
        (str(UNKNOWN_KEY_ID), "bad"): 1,
    }
    assert ss["netoken_attached"] == {(("interface", t.server_if), ("role", "guard")): 1}
    assert not any(
        name.startswith("netoken_marker_") or name == "netoken_syn_marked_total" for name in ss
    )

    for s in (cs, ss):
        assert s["netoken_info"] == {(("version", __version__),): 1}


def test_every_name_in_the_grafana_metrics_file_is_served(topo: Topology):
    """contrib/grafana/METRICS is what the dashboard may query (tests/test_contrib.py
    checks the queries against it); here every name in it must be really served,
    with the labels the exporter declares, and nothing netoken_* beyond it."""
    t = topo
    names = METRICS_FILE.read_text().split()
    served: dict[str, set[frozenset[str]]] = {}
    declared: set[str] = set()
    for ns in (t.client, t.server):
        with exporter_running(ns) as e:
            text = scrape(ns, e.url)
            declared |= {n for n in families(text) if n.startswith("netoken_")}
            for name, by_labels in samples(text).items():
                served.setdefault(name, set()).update(
                    frozenset(k for k, _ in labels) for labels in by_labels
                )
    # the agent serves its own families on top (tests/test_agent.py)
    agent = {f.name for f in exporter.AGENT_FAMILIES}
    assert sorted(declared | agent) == sorted(names) and not declared & agent
    for f in exporter.FAMILIES:
        # a family whose counters this kernel object does not have yet has no samples
        assert served.get(f.name, {frozenset(f.labels)}) == {frozenset(f.labels)}, f.name


def test_interface_filter_and_ipv6_listen_on_an_ephemeral_port(topo: Topology):
    t = topo
    with exporter_running(t.client, "--listen", "[::1]:0", "-i", t.client_if, "nosuch0") as e:
        assert re.fullmatch(r"http://\[::1\]:\d+/metrics", e.url) and ":0/" not in e.url
        s = samples(scrape(t.client, e.url))
    assert set(by(s, "netoken_attached", "interface")) == {t.client_if}
    (note,) = e.notes
    assert note.startswith("netoken: note: no interface nosuch0 in this network namespace")
    with exporter_running(t.client, "-i", "nosuch0") as e:
        s = samples(scrape(t.client, e.url))
    assert "netoken_attached" not in s and "netoken_info" in s


def test_port_in_use_is_one_line(topo: Topology):
    t = topo
    with netns(t.client):
        squatter = socket.socket()
    with squatter:
        # Earlier scrapes leave TIME_WAIT behind; the exporter's own
        # SO_REUSEADDR must still refuse a port with a live listener.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 9917))
        squatter.listen()
        r = run_exporter(t.client)
    line = one_line_error(r)
    assert (
        line == "netoken: cannot listen on 127.0.0.1:9917: address already in use "
        "(another exporter?)"
    )


@pytest.mark.parametrize(
    "value,why",
    [
        ("9917", "expected ADDR:PORT"),
        (":9917", "expected ADDR:PORT"),
        ("127.0.0.1:http", "port must be a number"),
        ("127.0.0.1:70000", "port must be a number"),
        ("::1:9917", "put an IPv6 address in brackets"),
        ("[fe80::zz]:9917", "is not an IPv6 address"),
        ("192.0.2.1:9917", "no such address on this host"),
    ],
)
def test_bad_listen_is_one_line(value, why):
    line = one_line_error(run_exporter(None, "--listen", value))
    assert why in line and value in line


@pytest.mark.parametrize(
    "argv,why",
    [
        (["--interval", "5"], "--interval only applies to --textfile"),
        (["--textfile", "/tmp/x.prom", "--interval", "0"], "--interval must be a positive"),
        (["--textfile", "/tmp/x.prom", "--listen", "127.0.0.1:1"], "pick one"),
        (
            ["--textfile", "/nonexistent/dir/netoken.prom"],
            "cannot write /nonexistent/dir/netoken.prom",
        ),
        (["-i", "../nbc0"], "not an interface name"),
        (["-i", "eth0", "an-interface-name-too-long"], "not an interface name"),
    ],
)
def test_bad_flag_combinations_are_one_line(argv, why):
    assert why in one_line_error(run_exporter(None, *argv))


def test_ip_netns_exec_is_refused_with_a_hint(topo: Topology):
    r = run_exporter(None, "--textfile", "/tmp/x.prom", pre=("ip", "netns", "exec", topo.client))
    assert f"netoken -n {topo.client}" in one_line_error(r)


# --------------------------------------------------------------------------
# textfile


def test_textfile_is_written_once_atomically_and_parses(topo: Topology, tmp_path):
    t = topo
    path = tmp_path / "netoken.prom"
    before = stats(t.client, t.client_if)["marker"]
    # as under a systemd unit with UMask=0077
    r = run_exporter(
        t.client, "--textfile", str(path), pre=("sh", "-c", 'umask 077; exec "$@"', "sh")
    )
    after = stats(t.client, t.client_if)["marker"]
    assert (r.returncode, r.stderr) == (0, "")
    assert os.listdir(tmp_path) == ["netoken.prom"]  # no temporary file left behind
    assert os.stat(path).st_mode & 0o777 == 0o644  # node_exporter may not run as root
    text = path.read_text()
    s = samples(text)
    assert {k for k in families(text)} == {f.name for f in exporter.FAMILIES}  # no process_*
    for reason, value in by(s, "netoken_marker_packets_total", "reason").items():
        assert before[reason] <= value <= after[reason]
    assert s["netoken_attached"] == {(("interface", t.client_if), ("role", "marker")): 1}


def test_textfile_interval_keeps_replacing_the_file(topo: Topology, tmp_path):
    t = topo
    path = tmp_path / "netoken.prom"
    proc = subprocess.Popen(
        exporter_cmd(t.client, "--textfile", str(path), "--interval", "0.1"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "rewriting" in proc.stderr.readline()

        def marked() -> tuple[float, int]:
            # Every read is a whole exposition: the file is only ever renamed in.
            text = path.read_text()
            assert text.rstrip().endswith(f'netoken_info{{version="{__version__}"}} 1.0')
            return by(samples(text), "netoken_marker_packets_total", "reason")["marked"], os.stat(
                path
            ).st_ino

        start, inode = marked()
        with Program.from_pinned(str(pin_dir(t.client_if) / "marker" / "prog")) as prog:
            for _ in range(5):
                prog.test_run(syn(dst=t.server_ip, dport=PORT))
        inodes = {inode}
        deadline = time.monotonic() + 10
        while (now := marked())[0] != start + 5 and time.monotonic() < deadline:
            inodes.add(now[1])
            time.sleep(0.05)
        assert now[0] == start + 5
        assert len(inodes | {now[1]}) > 1  # replaced by rename, not rewritten in place
    finally:
        err = stop(proc, signal.SIGINT)  # Ctrl-C; SIGTERM is covered by exporter_running
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["netoken.prom"]


# --------------------------------------------------------------------------
# roles that come and go


@pytest.fixture
def lone(lab: Lab, tmp_path) -> Iterator[tuple[str, str, Path]]:
    """(namespace, interface, config) of a veth with nothing attached yet."""
    ns, peer = lab.ns("ex"), lab.ns("ey")
    ifname, _ = lab.link(ns, peer)
    lab.addr(ns, ifname, "198.18.8.1/24")
    cfg = write_config(tmp_path, {1: TEST_KEY}, BODY.format(server="198.18.8.2"))
    try:
        yield ns, ifname, cfg
    finally:
        forget(ifname)


def test_roles_appear_and_disappear_between_scrapes(lone):
    ns, ifname, cfg = lone
    with exporter_running(ns) as e:
        assert "netoken_attached" not in samples(scrape(ns, e.url))

        ok("mark", "attach", ifname, "-c", str(cfg), ns=ns)
        s = samples(scrape(ns, e.url))
        assert s["netoken_attached"] == {(("interface", ifname), ("role", "marker")): 1}
        assert len(s["netoken_marker_packets_total"]) == len(layout.MARK_PACKET_REASONS)

        # Someone removes the filter behind netoken's back: the pins stay,
        # the counters freeze, and the gauge says so.
        run("tc", "filter", "del", "dev", ifname, "egress", ns=ns)
        s = samples(scrape(ns, e.url))
        assert s["netoken_attached"] == {(("interface", ifname), ("role", "marker")): 0}
        assert "netoken_syn_marked_total" in s

        ok("mark", "detach", ifname, ns=ns)
        s = samples(scrape(ns, e.url))
        assert "netoken_attached" not in s and "netoken_marker_packets_total" not in s
        assert s["netoken_info"]
    assert e.err == ""  # a detach is routine, not worth a warning


def test_pins_vanishing_mid_scrape_drop_the_role_silently(lone, capsys):
    ns, ifname, cfg = lone
    ok("mark", "attach", ifname, "-c", str(cfg), ns=ns)
    real_stats = marker.ROLE.stats

    def detach_then_read(st: RoleState) -> dict[str, int]:
        # The race: listed (pins there), then detached before the maps are read.
        ok("mark", "detach", ifname, ns=ns)
        return real_stats(st)

    with netns(ns), mock.patch.object(marker.ROLE, "stats", detach_then_read):
        s = exporter.NetokenCollector().samples()
    assert s.by_family["netoken_attached"] == []
    assert s.by_family["netoken_info"] == [((__version__,), 1)]
    assert capsys.readouterr().err == ""


def test_unreadable_role_is_left_out_with_one_warning(lone, capsys):
    ns, ifname, cfg = lone
    ok("mark", "attach", ifname, "-c", str(cfg), ns=ns)

    def broken(st: RoleState) -> dict[str, int]:
        raise PermissionError(1, "Operation not permitted")

    collector = exporter.NetokenCollector()
    with netns(ns), mock.patch.object(marker.ROLE, "stats", broken):
        for _ in range(3):
            assert collector.samples().by_family["netoken_attached"] == []
    want = f"netoken: exporter: cannot read {ifname} marker: [Errno 1] Operation not permitted"
    assert capsys.readouterr().err.splitlines() == [want]
    # counted at every scrape, warned once; a readable role adds nothing
    assert collector.samples().by_family["netoken_exporter_read_errors_total"] == [((), 3)]
