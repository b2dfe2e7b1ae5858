"""`netoken guard ...`, and `status`/`stats`/`monitor`/`apply` over a guard,
run as operators run them: a subprocess per call, `netoken -n NS`.

The client namespace runs the marker on its egress, the server namespace the
guard on its ingress: at TC on these veths by default (`--hook auto`), at XDP
or TC where a test asks for one (`@pytest.mark.parametrize("g", [...],
indirect=True)`).  Pins are global, so the fixture removes the pins and
metadata of both interfaces whatever happens; deleting the namespaces takes
the XDP programs and tc filters with them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netoken import config as nconfig
from netoken import guard as nguard
from netoken import layout, token
from netoken import tc as nt_tc
from netoken.libbpf import BPFError, Map, Program
from netoken.netns import netns

from .conftest import TEST_KEY, Lab, Topology, build_topology, patience, run, uid
from .e2e import ConnectionLoop, connect, server
from .pkt import rebuild_with_option, syn
from .test_cli import (
    EMPTY_OBJ,
    OTHER_KEY,
    PORT,
    forget,
    netoken,
    ok,
    one_line_error,
    pin_dir,
    policy,
    run_dir,
    shared_dir,
    write_config,
)

BAD_VERDICTS = tuple(v for v in layout.GUARD_VERDICTS if v != "ok")
GUARD_PINS = sorted(["prog", *nguard.OWN_MAPS])  # the rest is shared (test_shared_guard.py)
WINDOW = 30


def config(
    dest: str,
    *,
    guard_dest: str | None = None,
    policy_key: int = 1,
    guard_keys: tuple[int, ...] = (1,),
    action: str = "drop",
    skew: int = 1,
    cache: int = 4096,
    extra: str = "",
) -> str:
    """A config body (no [[key]]): a marker policy for DEST:PORT and a
    protect entry for GUARD_DEST (default DEST):PORT."""
    return (
        policy(dest, key=policy_key)
        + f"""
[guard]
action = "{action}"
skew = {skew}
replay_cache = {cache}

[[guard.protect]]
destinations = ["{guard_dest or dest}"]
ports = [{PORT}]
keys = {list(guard_keys)}
{extra}"""
    )


@dataclass
class G:
    t: Topology
    dir: Path
    hook: str | None = None  # --hook for attach(); None: the default (auto)

    def cfg(self, name: str, keys: dict[int, bytes] | None = None, **kw) -> Path:
        keys = keys if keys is not None else {1: TEST_KEY}
        return write_config(self.dir, keys, config(f"{self.t.server_ip}/32", **kw), name=name)

    def srv(self, *args: str) -> str:
        return ok(*args, ns=self.t.server)

    def cli(self, *args: str) -> str:
        return ok(*args, ns=self.t.client)

    def attach(self, cfg: Path, *extra: str) -> dict:
        if self.hook and not {"--hook", "--xdp-mode"} & set(extra):
            extra = ("--hook", self.hook, *extra)
        return json.loads(
            self.srv("guard", "attach", self.t.server_if, "-c", str(cfg), *extra, "--json")
        )

    def mark(self, cfg: Path) -> dict:
        return json.loads(self.cli("mark", "attach", self.t.client_if, "-c", str(cfg), "--json"))

    def status(self) -> dict:
        (d,) = json.loads(self.srv("status", self.t.server_if, "--json"))
        return d

    def stats(self) -> dict:
        (d,) = json.loads(self.srv("stats", self.t.server_if, "--json"))
        return d

    def xdp(self) -> dict:
        (link,) = json.loads(
            run("ip", "-j", "link", "show", "dev", self.t.server_if, ns=self.t.server).stdout
        )
        return link.get("xdp", {})

    def tc_ingress(self) -> dict[tuple[int, str], int]:
        """{(pref, handle): prog id} of the server interface's ingress filters."""
        out = run(
            "tc",
            "-j",
            "filter",
            "show",
            "dev",
            self.t.server_if,
            "ingress",
            ns=self.t.server,
            check=False,
        ).stdout
        return {
            (f["pref"], f["options"]["handle"]): f["options"]["prog"]["id"]
            for f in json.loads(out or "[]")
            if "prog" in f.get("options", {})
        }

    def running(self) -> int | None:
        """The program at netoken's place on either hook, as the kernel reports it."""
        ours = self.tc_ingress().get((nt_tc.PRIORITY, f"0x{nt_tc.HANDLE:x}"))
        return ours or self.xdp().get("prog", {}).get("id")

    def retval(self, outcome: str) -> int:
        """What the attached guard's program returns for OUTCOME ("pass"/"drop")."""
        return nguard.RETVALS[self.status()["attach"]["type"]][outcome]


@pytest.fixture
def g(request, lab: Lab, tmp_path: Path) -> Iterator[G]:
    t = build_topology(lab)
    try:
        yield G(t, tmp_path, getattr(request, "param", None))
    finally:
        forget(t.client_if, t.server_if)


BOTH_HOOKS = pytest.mark.parametrize("g", ["xdp", "tc"], indirect=True)
XDP_ONLY = pytest.mark.parametrize("g", ["xdp"], indirect=True)


def follow(ns: str, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen:
    """`netoken monitor` in the background, once it follows the ring buffers.
    Give a file as `stdout` when more than a pipe's 64 KiB may be printed
    before the test reads: a monitor blocked in write() and then stopped by
    SIGINT shows fewer events than the ring held."""
    mon = subprocess.Popen(
        [sys.executable, "-m", "netoken", "-n", ns, "monitor", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    # Attachments of other tests' namespaces are announced first.
    while "following events" not in (line := mon.stderr.readline()):
        seen += line
        if not line:
            mon.kill()
            raise AssertionError(f"monitor did not start: {seen}")
    return mon


def refused(t: Topology) -> bool:
    """An unmarked connection attempt; True if it timed out (SYN dropped)."""
    try:
        connect(t.client, t.server_ip, PORT, timeout=1.5)
    except TimeoutError:
        return True
    return False


def connection_loop(
    t: Topology, steps: list[Callable[[], object]], between: int = 25, workers: int = 4
) -> tuple[int, list[Exception]]:
    """Connect in loops from WORKERS threads; run each step after BETWEEN
    more connections succeeded, and let BETWEEN more through after the last.
    Returns (connections made, failures)."""
    with server(t.server, PORT), ConnectionLoop(t.client, t.server_ip, PORT, workers) as loop:
        for step in steps:
            loop.wait_for(loop.done + between, 15, stop_at_failure=True)
            step()
        loop.wait_for(loop.done + between, 15, stop_at_failure=True)
    return loop.done, loop.failures


def valid_syn(t: Topology, key: bytes = TEST_KEY, key_id: int = 1) -> bytes:
    """A SYN from the client carrying a fresh reference token."""
    opt = token.build_mac_option(
        key,
        key_id=key_id,
        epoch=token.epoch_now(WINDOW),
        daddr=t.server_ip,
        dport=PORT,
        saddr=t.client_ip,
        sport=40000,
    )
    return rebuild_with_option(syn(dst=t.server_ip, dport=PORT, src=t.client_ip), opt)


# --------------------------------------------------------------------------
# the whole lifecycle


@BOTH_HOOKS
def test_guard_attach_status_stats_monitor_detach(g: G):
    t = g.t
    cfg = g.cfg(
        "g.toml",
        extra="""
[[guard.protect]]
destinations = ["192.0.2.0/24", "2001:db8::/64"]
keys = [1]
action = "monitor"
""",
    )
    res = g.attach(cfg)
    xdp_mode = "native" if g.hook == "xdp" else None
    assert (res["ifname"], res["hook"], res["xdp_mode"], res["replaced_prog_id"]) == (
        t.server_if,
        g.hook,
        xdp_mode,
        None,
    )
    assert res["replay_cache"] == {"entries": 4096, "state": "new", "copied": 0}
    assert sorted(os.listdir(pin_dir(t.server_if) / "guard")) == GUARD_PINS
    meta = run_dir(t.server_if) / "guard.json"
    assert json.loads(meta.read_text())["ifname"] == t.server_if
    # the config is described once per namespace, next to the shared maps
    shared_meta = run_dir(t.server_if).parent / "guard.json"
    assert json.loads(shared_meta.read_text())["config"] == str(cfg)
    assert (shared_dir(t.server_if) / "nt_replay").exists()

    # status from a fresh process agrees with what the kernel reports
    d = g.status()
    assert d["prog"]["id"] == res["prog_id"] == g.running()
    assert d["prog"]["name"] == "netoken_guard"
    why = {"selected": "forced", "reason": f"forced (--hook {g.hook})", "link": "ethernet"}
    attach = (
        {"type": "xdp", "mode": "native", "requested": "auto", **why}
        if g.hook == "xdp"
        else {
            "type": "tc",
            "qdisc": "clsact",
            "hook": "ingress",
            "handle": 0x6E74,
            "priority": 1,
            "mode": "direct-action",
            "runs": "filter",
            **why,
        }
    )
    assert (d["state"], d["attached"], d["attach"]) == ("attached", True, attach)
    assert (d["action"], d["action_override"], d["skew"]) == ("per entry", None, 1)
    assert d["replay_cache"] == {"entries": 4096}
    assert d["option"] == {"kind": 253, "exid": 0x6E74}
    assert [k["id"] for k in d["keys"]] == [1]
    assert d["protect"] == [
        {
            "id": 1,
            "destinations": [f"{t.server_ip}/32"],
            "ports": [PORT],
            "keys": [1],
            "tokens": 0,
            "action": "drop",
        },
        {
            "id": 2,
            "destinations": ["192.0.2.0/24", "2001:db8::/64"],
            "ports": [],
            "keys": [1],
            "tokens": 0,
            "action": "monitor",
        },
    ]
    human = g.srv("status")
    where = "xdp      native" if g.hook == "xdp" else "tc       ingress (clsact) handle 0x6e74"
    for text in (
        t.server_if,
        f"prog {res['prog_id']}",
        where,
        "skew ±1",
        "replay cache 4096",
        "#1   drop    keys 1",
        f"{t.server_ip}/32",
        "monitor",
    ):
        assert text in human, (text, human)
    for out in (human, json.dumps(d), meta.read_text(), shared_meta.read_text()):
        assert TEST_KEY.hex() not in out  # never key bytes

    with server(t.server, PORT):
        g.mark(cfg)
        for _ in range(3):
            assert connect(t.client, t.server_ip, PORT).endswith(b"ok")
        g.cli("mark", "detach", t.client_if)
        # monitor shows the unmarked SYN the guard drops (and its retransmission)
        mon = follow(t.server, t.server_if, "--json", "--count", "1")
        try:
            assert refused(t)
            out, err = mon.communicate(timeout=patience(10))
        finally:
            mon.kill()
    assert mon.returncode == 0, err
    (e,) = [json.loads(line) for line in out.splitlines()]
    assert (e["role"], e["ifname"], e["verdict"], e["action"], e["protect"]) == (
        "guard",
        t.server_if,
        "missing",
        "drop",
        1,
    )
    assert (e["saddr"], e["daddr"], e["dport"], e["key_id"], e["epoch"]) == (
        t.client_ip,
        t.server_ip,
        PORT,
        None,
        None,
    )
    assert "1 event(s) shown, 0 lost while following, 0 suppressed by the rate limit" in err

    s = g.stats()
    c = s["counters"]
    assert c["ok"] == 3 and c["missing"] >= 1 and c["dropped"] == c["missing"]
    assert sum(c[v] for v in BAD_VERDICTS) == c["missing"]
    assert s["keys"] == [{"id": 1, "ok": 3, "bad": 0}]
    human = g.srv("stats", t.server_if)
    assert f"{t.server_if}  guard" in human and "key1_ok" in human and "dropped" in human

    out = g.srv("guard", "detach", t.server_if)
    where = "XDP native" if g.hook == "xdp" else "tc ingress, clsact qdisc removed"
    assert f"removed prog {res['prog_id']} ({where})" in out
    assert not pin_dir(t.server_if).exists() and not meta.exists()
    # the namespace's last guard takes the shared state with it
    assert not shared_dir(t.server_if).exists() and not shared_meta.exists()
    assert (
        g.running() is None
        and "clsact" not in run("tc", "qdisc", "show", "dev", t.server_if, ns=t.server).stdout
    )
    assert "nothing attached" in g.srv("status")


def test_human_monitor_shows_guard_columns(g: G):
    t = g.t
    g.attach(g.cfg("g.toml"))
    with server(t.server, PORT):
        mon = follow(t.server, "--count", "1")
        try:
            assert refused(t)
            out, _ = mon.communicate(timeout=patience(10))
        finally:
            mon.kill()
    header, line = out.splitlines()
    assert header.split() == [
        "TIME",
        "IFACE",
        "VERDICT",
        "ACTION",
        "SOURCE",
        "DESTINATION",
        "KEY",
        "EPOCH",
        "PROTECT",
    ]
    assert line[header.index("VERDICT") :].startswith("missing")
    assert line[header.index("DESTINATION") :].startswith(f"{t.server_ip}:{PORT}")
    assert line.endswith("#1")


def test_monitor_reports_suppressed_events(g: G, tmp_path: Path):
    t = g.t
    g.attach(g.cfg("g.toml"))
    log = tmp_path / "monitor.json"
    with log.open("w") as f:
        mon = follow(t.server, t.server_if, "--json", stdout=f)
        try:
            # 1000 unmarked SYNs through the pinned program at once: the token
            # bucket (burst 200 per CPU) lets only the first ones become events.
            frame = syn(dst=t.server_ip, dport=PORT, src=t.client_ip)
            with Program.from_pinned(str(pin_dir(t.server_if) / "guard" / "prog")) as prog:
                drop = g.retval("drop")
                for _ in range(1000):
                    assert prog.test_run(frame).retval == drop
            time.sleep(1.5)  # the monitor reads the counters every second
            mon.send_signal(signal.SIGINT)
            _, err = mon.communicate(timeout=patience(10))
        finally:
            mon.kill()
    out = log.read_text()
    assert mon.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    events = [r for r in records if "verdict" in r]
    suppressed = sum(r.get("suppressed", 0) for r in records)
    c = g.stats()["counters"]
    assert suppressed > 0 and suppressed == c["events_suppressed"]
    assert len(events) + suppressed == c["dropped"] == 1000, err
    assert f"{len(events)} event(s) shown, 0 lost while following, {suppressed} suppressed" in err


# --------------------------------------------------------------------------
# attach again, apply, rotation


@BOTH_HOOKS
def test_attach_again_replaces_atomically_and_keeps_counters(g: G):
    t = g.t
    cfg = g.cfg("g.toml")
    g.mark(cfg)
    first = g.attach(cfg)
    replay_pin = str(shared_dir(t.server_if) / "nt_replay")
    with Map.from_pinned(replay_pin) as m:
        replay_id = m.id
    second: dict = {}
    made, failures = connection_loop(t, [lambda: second.update(g.attach(cfg))])
    assert not failures, failures[:3]
    assert second["replaced_prog_id"] == first["prog_id"] != second["prog_id"]
    assert second["replay_cache"]["state"] == "kept"
    with Map.from_pinned(replay_pin) as m:
        assert m.id == replay_id  # the same cache, with everything it saw
    s = g.stats()
    c = s["counters"]
    assert c["ok"] >= made and c["dropped"] == 0  # counted across both programs
    assert sum(c[v] for v in BAD_VERDICTS) == 0
    assert g.status()["prog"]["id"] == second["prog_id"] == g.running()


@BOTH_HOOKS
def test_resized_replay_cache_still_knows_what_it_saw(g: G):
    t = g.t
    g.attach(g.cfg("small.toml", cache=2048))
    frame = valid_syn(t)
    prog_pin = str(pin_dir(t.server_if) / "guard" / "prog")
    with Program.from_pinned(prog_pin) as prog:
        assert prog.test_run(frame).retval == g.retval("pass")
        assert prog.test_run(frame).retval == g.retval("drop")  # replay
    res = g.attach(g.cfg("big.toml", cache=8192))
    assert res["replay_cache"] == {"entries": 8192, "state": "resized", "copied": 1}
    assert g.status()["replay_cache"] == {"entries": 8192}
    with Program.from_pinned(prog_pin) as prog:
        assert prog.test_run(frame).retval == g.retval("drop")  # the new cache knows it
    c = g.stats()["counters"]
    assert (c["ok"], c["replay"]) == (1, 2)
    assert sorted(os.listdir(pin_dir(t.server_if) / "guard")) == GUARD_PINS
    # apply cannot resize a live cache: it says so and changes nothing else
    r = netoken("apply", t.server_if, "-c", str(g.cfg("small.toml", cache=2048)), ns=t.server)
    assert r.returncode == 0, r.stderr
    assert "takes effect at the next `netoken guard attach" in r.stderr
    assert g.status()["replay_cache"] == {"entries": 8192}


def test_apply_updates_the_guard_in_place(g: G):
    t = g.t
    res = g.attach(g.cfg("one.toml"))
    two = g.cfg(
        "two.toml",
        keys={1: TEST_KEY, 2: OTHER_KEY},
        guard_keys=(2,),
        skew=2,
        action="monitor",
        extra="""
[[guard.protect]]
destinations = ["2001:db8::/64"]
ports = [443, "7000-7100"]
keys = [1]
action = "drop"
""",
    )
    out = g.srv("apply", t.server_if, "-c", str(two))
    assert f"to the guard on {t.server_if} (prog {res['prog_id']})" in out
    assert "2 protect entries" in out and "keys added: 2" in out
    d = g.status()
    assert d["prog"]["id"] == res["prog_id"] and d["state"] == "attached"
    assert (d["skew"], d["action"], d["config"]) == (2, "per entry", str(two))
    assert [k["id"] for k in d["keys"]] == [1, 2]
    assert [(p["keys"], p["action"], p["ports"]) for p in d["protect"]] == [
        ([2], "monitor", [PORT]),
        ([1], "drop", [443, "7000-7100"]),
    ]
    v6 = shared_dir(t.server_if) / "nt_dst_v6"
    with Map.from_pinned(str(v6)) as m:
        assert len(list(m.keys())) == 1
        out = g.srv("apply", t.server_if, "-c", str(g.cfg("one.toml")))
        assert "keys removed: 2" in out
        assert len(list(m.keys())) == 0  # the entry that disappeared is gone
    d = g.status()
    assert [(p["keys"], p["action"]) for p in d["protect"]] == [([1], "drop")]
    assert [k["id"] for k in d["keys"]] == [1]


def test_apply_updates_marker_and_guard_on_one_interface(g: G):
    t = g.t
    # A host that both makes marked connections and is guarded.
    cfg = write_config(
        g.dir,
        {1: TEST_KEY},
        config(f"{t.server_ip}/32", guard_dest=f"{t.client_ip}/32"),
        name="both.toml",
    )
    g.cli("mark", "attach", t.client_if, "-c", str(cfg))
    g.cli("guard", "attach", t.client_if, "-c", str(cfg))
    status = json.loads(g.cli("status", "--json"))
    assert [(d["ifname"], d["role"], d["state"]) for d in status] == [
        (t.client_if, "guard", "attached"),
        (t.client_if, "marker", "attached"),
    ]
    res = json.loads(g.cli("apply", t.client_if, "-c", str(cfg), "--json"))
    assert sorted(r["role"] for r in res) == ["guard", "marker"]
    stats = json.loads(g.cli("stats", t.client_if, "--json"))
    assert sorted(d["role"] for d in stats) == ["guard", "marker"]
    g.cli("guard", "detach", t.client_if)
    assert [d["role"] for d in json.loads(g.cli("status", "--json"))] == ["marker"]
    g.cli("mark", "detach", t.client_if)


def test_key_rotation_under_a_connection_loop(g: G):
    """Issue 4 item 3: the guard accepts the new key before the marker uses
    it and retires the old one after; no legitimate SYN is rejected."""
    t = g.t
    both = {1: TEST_KEY, 2: OTHER_KEY}
    start = g.cfg("start.toml")
    accept_both = g.cfg("a.toml", keys=both, policy_key=1, guard_keys=(1, 2))
    mark_with_2 = g.cfg("b.toml", keys=both, policy_key=2, guard_keys=(1, 2))
    only_2 = g.cfg("c.toml", keys={2: OTHER_KEY}, policy_key=2, guard_keys=(2,))
    g.mark(start)
    g.attach(start)
    steps = [
        lambda: g.srv("apply", t.server_if, "-c", str(accept_both)),
        lambda: g.cli("apply", t.client_if, "-c", str(mark_with_2)),
        lambda: g.srv("apply", t.server_if, "-c", str(only_2)),
    ]
    made, failures = connection_loop(t, steps)
    assert not failures, failures[:3]
    s = g.stats()
    c = s["counters"]
    assert c["ok"] >= made >= 100
    assert {v: c[v] for v in BAD_VERDICTS} == dict.fromkeys(BAD_VERDICTS, 0)
    assert c["dropped"] == c["monitored"] == 0
    keys = {k["id"]: k for k in s["keys"]}
    assert keys[1]["ok"] > 0 and keys[2]["ok"] > 0
    assert keys[1]["bad"] == keys[2]["bad"] == 0
    assert keys[1]["ok"] + keys[2]["ok"] == c["ok"]
    d = g.status()
    assert [k["id"] for k in d["keys"]] == [2] and d["protect"][0]["keys"] == [2]
    # and key 1 is really retired: its tokens are unknown_key now
    with Program.from_pinned(str(pin_dir(t.server_if) / "guard" / "prog")) as prog:
        assert prog.test_run(valid_syn(t, TEST_KEY, 1)).retval == g.retval("drop")
    assert g.stats()["counters"]["unknown_key"] == 1


# --------------------------------------------------------------------------
# modes


@BOTH_HOOKS
def test_monitor_mode_passes_and_counts(g: G):
    t = g.t
    res = g.attach(g.cfg("g.toml"), "--mode", "monitor")
    assert (res["action"], res["action_override"]) == ("monitor", True)
    with server(t.server, PORT):
        for _ in range(2):  # unmarked, and still connected
            assert connect(t.client, t.server_ip, PORT).endswith(b"ok")
    c = g.stats()["counters"]
    assert (c["missing"], c["monitored"], c["dropped"], c["ok"]) == (2, 2, 0, 0)
    d = g.status()
    assert (d["action"], d["action_override"]) == ("monitor", "monitor")
    assert {p["action"] for p in d["protect"]} == {"monitor"}
    assert "action   monitor (--mode; the config says drop)" in g.srv("status")
    # the override is sticky: apply and a plain re-attach keep it, and say so
    out = g.srv("apply", t.server_if, "-c", str(g.cfg("g.toml")))
    assert "action monitor is a --mode override (the config says drop)" in out
    assert "--mode config" in out
    assert g.status()["action"] == "monitor"
    res = g.attach(g.cfg("g.toml"))
    assert (res["action"], res["action_override"], res["config_action"]) == (
        "monitor",
        True,
        "drop",
    )
    with server(t.server, PORT):
        assert refused(t) is False
        # --mode config clears it: back to the config's drop, and drops again
        res = g.attach(g.cfg("g.toml"), "--mode", "config")
        assert (res["action"], res["action_override"]) == ("drop", False)
        assert (g.status()["action"], g.status()["action_override"]) == ("drop", None)
        assert "override" not in g.srv("apply", t.server_if, "-c", str(g.cfg("g.toml")))
        assert refused(t) is True
        # the round trip by override alone: monitor, then drop
        g.attach(g.cfg("g.toml"), "--mode", "monitor")
        assert refused(t) is False
        g.attach(g.cfg("g.toml"), "--mode", "drop")
        assert g.status()["action_override"] == "drop"
        assert refused(t) is True


def test_generic_xdp_mode_shows_in_status(g: G):
    t = g.t
    res = g.attach(g.cfg("g.toml"), "--xdp-mode", "generic")
    assert (res["hook"], res["xdp_mode"]) == ("xdp", "generic")  # --xdp-mode means XDP
    d = g.status()
    assert d["attach"] == {
        "type": "xdp",
        "mode": "generic",
        "requested": "generic",
        "selected": "forced",
        "reason": "forced (--hook xdp)",
        "link": "ethernet",
    }
    assert g.xdp()["mode"] == 2  # XDP_ATTACHED_SKB
    assert "xdp      generic (forced)" in g.srv("status", t.server_if)
    res = g.attach(g.cfg("g.toml"))  # the mode it runs in is kept by a plain replace
    assert (res["xdp_mode"], res["mode_switched"]) == ("generic", False)
    res = g.attach(g.cfg("g.toml"), "--xdp-mode", "native")
    assert (res["xdp_mode"], res["mode_switched"]) == ("native", True)
    assert g.status()["attach"]["mode"] == "native"


# --------------------------------------------------------------------------
# other people's XDP, errors, failures


@XDP_ONLY
def test_foreign_xdp_program_is_refused_and_left_alone(g: G):
    t = g.t
    run(
        "ip",
        "link",
        "set",
        "dev",
        t.server_if,
        "xdpgeneric",
        "obj",
        str(EMPTY_OBJ),
        "sec",
        "xdp",
        ns=t.server,
    )
    foreign = g.xdp()["prog"]["id"]
    r = netoken(
        "guard", "attach", t.server_if, "-c", str(g.cfg("g.toml")), "--hook", "xdp", ns=t.server
    )
    line = one_line_error(r)
    assert f"'netoken_empty_x' (id {foreign}" in line and "not installed by netoken" in line
    assert "refusing to replace" in line
    assert not pin_dir(t.server_if).exists()
    assert not run_dir(t.server_if).exists()
    line = one_line_error(netoken("guard", "detach", t.server_if, ns=t.server))
    assert f"id {foreign}" in line and "refusing to detach" in line
    assert g.xdp()["prog"]["id"] == foreign
    # The guard at TC leaves it alone and runs next to it.
    res = json.loads(
        g.srv("guard", "attach", t.server_if, "-c", str(g.cfg("g.toml")), "--hook", "tc", "--json")
    )
    assert g.running() == res["prog_id"] and g.xdp()["prog"]["id"] == foreign
    g.srv("guard", "detach", t.server_if)
    assert g.xdp()["prog"]["id"] == foreign


@XDP_ONLY
def test_foreign_program_over_ours_keeps_it_and_detach_only_removes_pins(g: G):
    t = g.t
    g.attach(g.cfg("g.toml"))
    run(
        "ip",
        "-force",
        "link",
        "set",
        "dev",
        t.server_if,
        "xdp",
        "obj",
        str(EMPTY_OBJ),
        "sec",
        "xdp",
        ns=t.server,
    )
    foreign = g.xdp()["prog"]["id"]
    assert g.status()["state"] == f"XDP runs prog {foreign}, not the pinned one"
    line = one_line_error(
        netoken("guard", "attach", t.server_if, "-c", str(g.cfg("g.toml")), ns=t.server)
    )
    assert f"id {foreign}" in line
    out = g.srv("guard", "detach", t.server_if)
    assert "was not installed by netoken and stays attached" in out
    assert not pin_dir(t.server_if).exists()
    assert g.xdp()["prog"]["id"] == foreign


BAD = [
    ("no-guard", "", "no [guard] section"),
    (
        "unknown-key-in-protect",
        '[guard]\n[[guard.protect]]\ndestinations = ["10.0.0.0/8"]\nkeys = [1, 7]\n',
        "guard.protect #1: keys refers to key 7",
    ),
    (
        "bad-fragments",
        '[guard]\nfragments = "maybe"\n[[guard.protect]]\ndestinations = ["10.0.0.0/8"]\nkeys = [1]\n',
        'guard: fragments must be "drop" or "pass", got string "maybe"',
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_config_is_one_line_and_nothing_is_pinned(g: G, case):
    _, body, problem = case
    t = g.t
    cfg = write_config(g.dir, {1: TEST_KEY}, body, name="bad.toml")
    line = one_line_error(netoken("guard", "attach", t.server_if, "-c", str(cfg), ns=t.server))
    assert line.startswith(f"netoken: {cfg}: ") and problem in line, line
    assert not pin_dir(t.server_if).exists()
    assert not run_dir(t.server_if).exists()
    assert g.running() is None


def test_apply_without_guard_section_leaves_the_guard_alone(g: G):
    t = g.t
    res = g.attach(g.cfg("g.toml"))
    cfg = write_config(g.dir, {2: OTHER_KEY}, "", name="noguard.toml")
    line = one_line_error(netoken("apply", t.server_if, "-c", str(cfg), ns=t.server))
    assert "no [guard] section, but a guard is attached" in line
    d = g.status()
    assert (d["prog"]["id"], [k["id"] for k in d["keys"]]) == (res["prog_id"], [1])
    line = one_line_error(netoken("apply", t.client_if, "-c", str(cfg), ns=t.client))
    assert "no marker on" in line and "no guard either" in line


def test_native_mode_where_the_driver_has_none_is_one_line(g: G):
    # A bridge has no native XDP: the attach fails and leaves nothing behind.
    br = uid("ntbr")
    run("ip", "link", "add", br, "type", "bridge", ns=g.t.server)
    try:
        line = one_line_error(
            netoken(
                "guard",
                "attach",
                br,
                "-c",
                str(g.cfg("g.toml")),
                "--xdp-mode",
                "native",
                ns=g.t.server,
            )
        )
        assert "does not support native XDP" in line
        assert not pin_dir(br).exists()
    finally:
        forget(br)


def _failing_xdp_attach(*args, **kw):
    raise BPFError(16, "attach xdp (injected)")  # EBUSY


def _fail_attach(g: G, monkeypatch) -> None:
    """Make the next attach at G's hook fail as the kernel would (EBUSY)."""
    if g.hook == "xdp":
        monkeypatch.setattr(nguard.program, "xdp_attach", _failing_xdp_attach)
    else:
        monkeypatch.setattr(nt_tc, "tc_attach", _failing_xdp_attach)


@BOTH_HOOKS
def test_failed_first_attach_leaves_nothing(g: G, monkeypatch):
    t = g.t
    _fail_attach(g, monkeypatch)
    with netns(t.server), pytest.raises(nguard.GuardError):
        nguard.attach_pinned(t.server_if, nconfig.load(g.cfg("g.toml")), hook=g.hook)
    assert not pin_dir(t.server_if).exists()
    assert not run_dir(t.server_if).exists()
    assert g.running() is None
    assert "clsact" not in run("tc", "qdisc", "show", "dev", t.server_if, ns=t.server).stdout


@BOTH_HOOKS
def test_failed_replace_keeps_the_running_guard_and_its_config(g: G, monkeypatch):
    t = g.t
    first = g.attach(g.cfg("g.toml"))
    other = g.cfg("other.toml", keys={2: OTHER_KEY}, policy_key=2, guard_keys=(2,), skew=3)
    _fail_attach(g, monkeypatch)
    with netns(t.server), pytest.raises(nguard.GuardError):
        nguard.attach_pinned(t.server_if, nconfig.load(other), hook=g.hook)
    d = g.status()
    assert (d["prog"]["id"], d["state"]) == (first["prog_id"], "attached")
    assert [k["id"] for k in d["keys"]] == [1] and d["skew"] == 1  # the maps were put back
    assert d["protect"][0]["keys"] == [1]
    assert sorted(os.listdir(pin_dir(t.server_if) / "guard")) == GUARD_PINS
    with Program.from_pinned(str(pin_dir(t.server_if) / "guard" / "prog")) as prog:
        assert prog.test_run(valid_syn(t)).retval == g.retval("pass")


def test_detach_after_the_interface_vanished_cleans_pins(g: G):
    t = g.t
    g.attach(g.cfg("g.toml"))
    run("ip", "link", "del", t.server_if, ns=t.server)
    assert "interface missing" in g.srv("status")
    assert "is gone" in g.srv("guard", "detach", t.server_if)
    assert not pin_dir(t.server_if).exists()
    line = one_line_error(netoken("guard", "detach", t.server_if, ns=t.server))
    assert "does not exist" in line
