"""Where the guard runs: `--hook auto|xdp|tc`, switching between hooks, and
the clsact qdisc the guard (ingress) shares with the marker (egress) and
with other people's filters.  Through the CLI, as operators run it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from netoken import tc as nt_tc

from . import test_cli_guard
from .conftest import TEST_KEY, run
from .e2e import connect, server, syn_retransmits
from .test_cli import EMPTY_OBJ, PORT, netoken, one_line_error, write_config
from .test_cli_guard import BAD_VERDICTS, G, config, connection_loop, refused, valid_syn

# test_cli_guard's fixture: a client and a server namespace, pins removed after.
g = test_cli_guard.g

OURS = (nt_tc.PRIORITY, f"0x{nt_tc.HANDLE:x}")


def egress(g: G, ns: str, dev: str) -> list[dict]:
    out = run("tc", "-j", "filter", "show", "dev", dev, "egress", ns=ns).stdout
    return [f for f in json.loads(out or "[]") if "options" in f]


def qdisc_kinds(ns: str, dev: str) -> list[str]:
    return [
        q["kind"]
        for q in json.loads(run("tc", "-j", "qdisc", "show", "dev", dev, ns=ns).stdout or "[]")
    ]


def test_auto_picks_tc_on_a_veth_and_a_forced_hook_is_sticky(g: G):
    t = g.t
    cfg = g.cfg("g.toml")
    res = g.attach(cfg)
    assert (res["hook"], res["hook_requested"], res["xdp_mode"]) == ("tc", "auto", None)
    assert res["hook_reason"] == "auto: veth, where XDP would switch off TSO on its peer"
    assert g.running() == res["prog_id"] and not g.xdp()
    human = g.srv("status", t.server_if)
    assert "tc       ingress (clsact) handle 0x6e74 prio 1, direct-action; hook auto: veth" in human

    tc_prog = res["prog_id"]
    res = g.attach(cfg, "--hook", "xdp")
    assert (res["hook"], res["hook_switched"], res["replaced_prog_id"]) == (
        "xdp",
        "tc->xdp",
        tc_prog,
    )
    assert g.xdp()["prog"]["id"] == res["prog_id"] and OURS not in g.tc_ingress()
    # forced is sticky: a plain attach keeps XDP, --hook auto decides again
    res = g.attach(cfg)
    assert (res["hook"], res["hook_requested"], res["hook_switched"]) == ("xdp", "xdp", None)
    assert "hook forced (--hook xdp)" in g.srv("status", t.server_if)
    res = g.attach(cfg, "--hook", "auto")
    assert (res["hook"], res["hook_switched"]) == ("tc", "xdp->tc")
    # --xdp-mode means XDP
    res = g.attach(cfg, "--xdp-mode", "generic")
    assert (res["hook"], res["xdp_mode"]) == ("xdp", "generic")
    before = g.status()["prog"]["id"]
    line = one_line_error(
        netoken(
            "guard",
            "attach",
            t.server_if,
            "-c",
            str(cfg),
            "--hook",
            "tc",
            "--xdp-mode",
            "native",
            ns=t.server,
        )
    )
    assert line == "netoken: --xdp-mode applies to the XDP hook, not to --hook tc"
    assert g.status()["prog"]["id"] == before == g.running()


def test_switching_hooks_keeps_the_replay_cache_and_drops_no_connection(g: G):
    """The guard moves tc -> xdp -> tc: the namespace's replay cache stays, so
    a token accepted before is still a replay after each move.  Then it
    moves under a loop of marked connections: the new hook runs before the
    old one goes, so nothing unverified gets in and no connection fails; a
    SYN that arrives while both run is a replay to the second (its client
    retransmits), and nothing else is rejected."""
    from netoken.libbpf import Program

    from .test_cli import pin_dir

    t = g.t
    cfg = g.cfg("g.toml")
    g.mark(cfg)
    g.attach(cfg)
    frame = valid_syn(t)
    prog_pin = str(pin_dir(t.server_if) / "guard" / "prog")
    with Program.from_pinned(prog_pin) as prog:
        assert prog.test_run(frame).retval == g.retval("pass")
    for hook in ("xdp", "tc"):
        res = g.attach(cfg, "--hook", hook)
        assert res["replay_cache"] == {"entries": 4096, "state": "kept", "copied": 0}
        with Program.from_pinned(prog_pin) as prog:
            assert prog.test_run(frame).retval == g.retval("drop")
    assert g.stats()["counters"]["replay"] == 2

    switched: list[dict] = []
    steps = [lambda h=h: switched.append(g.attach(cfg, "--hook", h)) for h in ("xdp", "tc", "xdp")]
    made, failures = connection_loop(t, steps)
    assert not failures, failures[:3]
    assert [r["hook_switched"] for r in switched] == ["tc->xdp", "xdp->tc", "tc->xdp"]
    c = g.stats()["counters"]
    assert c["ok"] >= made and c["dropped"] == c["replay"]
    others = [v for v in BAD_VERDICTS if v != "replay"]
    assert {v: c[v] for v in others} == dict.fromkeys(others, 0)
    print(
        f"\nhook switches tc->xdp->tc->xdp under a connection loop: {made} connections, "
        f"{len(failures)} failed, {c['replay'] - 2} SYNs seen by both hooks and retransmitted"
    )


def test_tc_guard_shares_clsact_with_the_marker_and_foreign_filters(g: G):
    """On one interface: someone's clsact qdisc with a filter on ingress, the
    guard before it (TC_ACT_UNSPEC lets what it passes go on to that filter),
    the marker on egress.  Replacing and removing ours leaves the rest."""
    t = g.t
    ns, dev = t.server, t.server_if
    run("tc", "qdisc", "add", "dev", dev, "clsact", ns=ns)
    run(
        "tc",
        "filter",
        "add",
        "dev",
        dev,
        "ingress",
        "prio",
        "49152",
        "bpf",
        "da",
        "obj",
        str(EMPTY_OBJ),
        "sec",
        "tc",
        ns=ns,
    )
    foreign = {k: v for k, v in g.tc_ingress().items() if k != OURS}
    both = write_config(
        g.dir,
        {1: TEST_KEY},
        config(f"{t.server_ip}/32", guard_dest=f"{t.server_ip}/32"),
        name="both.toml",
    )
    res = g.attach(both)
    assert (res["hook"], res["tc"]["created_clsact"]) == ("tc", False)
    mark = json.loads(g.srv("mark", "attach", dev, "-c", str(both), "--json"))
    assert mark["created_clsact"] is False
    assert refused(t)  # the client has no marker: dropped at the server's ingress
    g.mark(g.cfg("g.toml"))
    retrans = syn_retransmits(t.client)
    with server(t.server, PORT):
        for _ in range(3):
            assert connect(t.client, t.server_ip, PORT).endswith(b"ok")
    retrans = syn_retransmits(t.client) - retrans
    second = g.attach(both)
    assert second["replaced_prog_id"] == res["prog_id"]
    assert g.tc_ingress() == {**foreign, OURS: second["prog_id"]}
    assert [f["options"]["prog"]["id"] for f in egress(g, ns, dev)] == [mark["prog_id"]]
    (c,) = [
        d["counters"] for d in json.loads(g.srv("stats", dev, "--json")) if d["role"] == "guard"
    ]
    assert c["ok"] == 3 + retrans and c["missing"] >= 1
    out = g.srv("guard", "detach", dev)
    assert "tc ingress, clsact qdisc kept" in out
    assert g.tc_ingress() == foreign
    assert [f["options"]["prog"]["id"] for f in egress(g, ns, dev)] == [mark["prog_id"]]
    assert "clsact kept" in g.srv("mark", "detach", dev)
    assert g.tc_ingress() == foreign and qdisc_kinds(ns, dev).count("clsact") == 1


@pytest.mark.parametrize("first", ["guard", "marker"])
def test_the_clsact_qdisc_goes_with_the_last_netoken_filter(g: G, first):
    t = g.t
    ns, dev = t.server, t.server_if
    cfg = write_config(g.dir, {1: TEST_KEY}, config(f"{t.server_ip}/32"), name="both.toml")
    verbs = {
        "guard": ("guard", "attach", dev, "-c", str(cfg)),
        "marker": ("mark", "attach", dev, "-c", str(cfg)),
    }
    gone = {"guard": ("guard", "detach", dev), "marker": ("mark", "detach", dev)}
    second = "marker" if first == "guard" else "guard"
    g.srv(*verbs[first])
    g.srv(*verbs[second])
    out = g.srv(*gone[first])
    assert "kept" in out and "clsact" in qdisc_kinds(ns, dev)
    out = g.srv(*gone[second])
    assert "removed" in out and "clsact" not in qdisc_kinds(ns, dev)


def _iperf(ns: str, addr: str, seconds: int = 2) -> float:
    """Gbit/s the receiver saw (retried while the server starts)."""
    for _ in range(20):
        r = run(
            "iperf3",
            "-c",
            addr,
            "-p",
            str(IPERF_PORT),
            "-t",
            str(seconds),
            "-O",
            "1",
            "-J",
            ns=ns,
            check=False,
            timeout=seconds + 30,
        )
        try:
            d = json.loads(r.stdout)
        except ValueError:
            d = {"error": r.stderr}
        if "error" not in d:
            return d["end"]["sum_received"]["bits_per_second"] / 1e9
        time.sleep(0.2)
    raise AssertionError(f"iperf3 failed: {d['error']}")


IPERF_PORT = 5201


def tso(ns: str, dev: str) -> str:
    out = run("ethtool", "-k", dev, ns=ns).stdout
    (line,) = [ln for ln in out.splitlines() if ln.startswith("tcp-segmentation-offload:")]
    return line.split(":")[1].split()[0]


def test_iperf3_over_a_veth_with_the_guard_attached_by_auto(g: G):
    """Bulk throughput over a veth pair without a guard, with the guard
    `--hook auto` attaches (TC) and with it forced to XDP.  The figures are
    reported, not judged (the bench does that); what is checked is why
    auto picks TC: XDP on a veth switches off its peer's TSO."""
    assert shutil.which("iperf3"), "iperf3 is required (apt-get install iperf3)"
    t = g.t
    cfg = write_config(
        g.dir,
        {1: TEST_KEY},
        config(f"{t.server_ip}/32").replace(f"ports = [{PORT}]", f"ports = [{PORT}, {IPERF_PORT}]"),
        name="iperf.toml",
    )
    g.mark(cfg)
    srv = subprocess.Popen(
        ["ip", "netns", "exec", t.server, "iperf3", "-s", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        gbps = {"none": _iperf(t.client, t.server_ip)}
        res = g.attach(cfg, "--hook", "auto")
        assert res["hook"] == "tc" and tso(t.client, t.client_if) == "on"
        gbps["tc guard (auto)"] = _iperf(t.client, t.server_ip)
        g.attach(cfg, "--hook", "xdp")
        assert tso(t.client, t.client_if) == "off"
        gbps["xdp guard"] = _iperf(t.client, t.server_ip)
    finally:
        srv.kill()
        srv.wait()
    c = g.stats()["counters"]
    # two runs, each with a control and a data connection, all marked
    assert c["ok"] >= 4 and c["dropped"] == 0
    print(
        "\niperf3 over veth, 1 stream: "
        + ", ".join(f"{k} {v:.2f} Gbit/s ({v / gbps['none']:.2f}x)" for k, v in gbps.items())
    )
