"""The guard on a real interface: a spoofed SYN flood against real clients.

Topology: client, attacker and server namespaces on one bridge (a switch
namespace), all in 198.18.5.0/24.  The server's default route points at the
switch, so SYN-ACKs to spoofed sources really leave (backscatter).  The
client runs the marker; the server runs the guard on its only interface, at
XDP and at TC ingress (the hook `--hook auto` picks on a veth).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager

import pytest

from netoken import layout
from netoken.demo import hping3_sent, syn_flood_argv
from netoken.guard import Guard
from netoken.marker import Marker
from netoken.netns import netns

from .conftest import Lab, make_config, patience, run
from .e2e import connect, counters, link_stats, server, syn_retransmits

PORT = 8080
SERVER, CLIENT, ATTACKER, GW = "198.18.5.2", "198.18.5.1", "198.18.5.66", "198.18.5.254"
# make test-kernels shortens the floods under emulation (scripts/test-kernels).
FLOOD_SECONDS = float(os.environ.get("NETOKEN_FLOOD_SECONDS", "4"))
LEGIT_CONNECTIONS = 200
# The server's listen backlog.  What makes a flood is more spoofed SYNs than
# it holds, not a rate: hping3 sends ~100 times that in FLOOD_SECONDS here,
# ~6-30 times under make test-kernels' emulation, depending on the load.
BACKLOG = 128

CONFIG = f"""
[[policy]]
name = "svc"
destinations = ["{SERVER}/32"]
ports = [{PORT}]
key = 1

[guard]
action = "drop"
[[guard.protect]]
destinations = ["{SERVER}/32"]
ports = [{PORT}]
keys = [1]
"""


def switched_lab(lab: Lab) -> dict[str, str]:
    sw = lab.ns("sw")
    run("ip", "link", "add", "br0", "type", "bridge", ns=sw)
    run("ip", "link", "set", "br0", "up", ns=sw)
    run("ip", "addr", "add", f"{GW}/24", "dev", "br0", ns=sw)
    hosts = {}
    for role, addr in (("client", CLIENT), ("attacker", ATTACKER), ("server", SERVER)):
        ns = lab.ns(role[:2])
        host_if, sw_if = lab.link(ns, sw)
        run("ip", "link", "set", sw_if, "master", "br0", ns=sw)
        lab.addr(ns, host_if, f"{addr}/24")
        hosts[role], hosts[f"{role}_if"] = ns, host_if
    run("ip", "route", "add", "default", "via", GW, ns=hosts["server"])
    run("ping", "-c", "1", "-W", "3", SERVER, ns=hosts["client"])
    run("ping", "-c", "1", "-W", "3", SERVER, ns=hosts["attacker"])
    return hosts


@contextmanager
def flood(ns: str, seconds: float):
    """hping3 spoofed-source SYN flood; yields a dict filled with 'sent' at exit."""
    result: dict[str, int] = {}
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, *syn_flood_argv(SERVER, PORT, seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield result
    finally:
        out, _ = proc.communicate(timeout=seconds + 10)
        sent = hping3_sent(out)
        assert sent is not None, f"hping3 printed no statistics: {out!r}"
        result["sent"] = sent


def legit_connections(ns: str, n: int, deadline_s: float) -> tuple[int, int]:
    ok = 0
    end = time.monotonic() + patience(deadline_s)
    for _ in range(n):
        try:
            ok += connect(ns, SERVER, PORT, timeout=10).endswith(b"ok")
        except OSError:
            pass
        if time.monotonic() > end:
            break
    return ok, n


def ingress_drops(ns: str, dev: str) -> int:
    """Packets the clsact qdisc of DEV dropped (TC_ACT_SHOT at ingress); 0 without one."""
    qdiscs = json.loads(run("tc", "-s", "-j", "qdisc", "show", "dev", dev, ns=ns).stdout or "[]")
    return sum(q["drops"] for q in qdiscs if q["kind"] == "clsact")


def link_reading(srv_ns: str, srv_if: str) -> dict:
    """The link's counters and, for a guard at TC, its clsact qdisc's drops."""
    return {**link_stats(srv_ns, srv_if), "tc_drops": ingress_drops(srv_ns, srv_if)}


def quiet_reading(srv_ns: str, srv_if: str, guard: Guard | None) -> tuple[dict, dict]:
    """(link stats, guard counters) at one moment: read until no packet
    arrived while the guard's counters were read (stragglers of the flood,
    a retransmitted SYN-ACK's RST, neighbour discovery)."""
    for _ in range(100):
        link = link_reading(srv_ns, srv_if)
        g = guard.stats() if guard is not None else {}
        if link_reading(srv_ns, srv_if) == link:
            return link, g
        time.sleep(0.1)
    raise AssertionError(f"{srv_if} kept receiving for 10 s after the round")


def run_flood_round(hosts, guard: Guard | None = None) -> dict:
    """One flood with concurrent legit connections; returns the figures."""
    srv_ns, srv_if = hosts["server"], hosts["server_if"]
    before_tcp, before_retrans = counters(srv_ns), syn_retransmits(hosts["client"])
    before_link, g0 = quiet_reading(srv_ns, srv_if, guard)
    results = {}
    # A fresh listener per round: half-open requests of an earlier flood
    # belong to the old one and cannot spill cookies into this round.
    with server(srv_ns, PORT) as srv, flood(hosts["attacker"], FLOOD_SECONDS) as sent:
        srv.sock.listen(BACKLOG)
        time.sleep(0.5)  # let the flood reach full rate first
        results["legit"] = legit_connections(hosts["client"], LEGIT_CONNECTIONS, FLOOD_SECONDS * 3)
    after_tcp, after_retrans = counters(srv_ns), syn_retransmits(hosts["client"])
    after_link, g1 = quiet_reading(srv_ns, srv_if, guard)
    d_tcp = {k: after_tcp[k] - before_tcp.get(k, 0) for k in after_tcp}
    d_link = {k: after_link[k] - before_link.get(k, 0) for k in after_link}
    d_guard = {k: g1[k] - g0[k] for k in g1}
    return {
        "sent": sent["sent"],
        "tcp": d_tcp,
        "link": d_link,
        "guard": d_guard,
        "syn_retrans": after_retrans - before_retrans,
        **results,
    }


@pytest.mark.parametrize("hook,xdp_mode", [("xdp", "native"), ("tc", None)])
def test_flood_dies_at_the_guard_and_clients_connect(lab, tmp_path, hook, xdp_mode):
    hosts = switched_lab(lab)
    cfg = make_config(tmp_path, CONFIG)
    with Marker.load() as marker:
        with netns(hosts["client"]):
            marker.configure(cfg)
            marker.attach(hosts["client_if"])
        # Baseline without the guard: the same flood reaches TCP.
        without = run_flood_round(hosts)
        with Guard.load(hook=hook) as guard:
            with netns(hosts["server"]):
                guard.configure(cfg)
                guard.attach(hosts["server_if"], xdp_mode)
            with_guard = run_flood_round(hosts, guard)
    gd = with_guard["guard"]

    # Without the guard the flood reaches TCP: the SYN queue overflows into
    # cookies and SYN-ACKs go out to the spoofed sources (the server sends
    # the clients the same either way).
    assert without["sent"] > BACKLOG
    assert (
        without["tcp"]["TcpExt.SyncookiesSent"] > 0 or without["tcp"]["TcpExt.ListenOverflows"] > 0
    )
    assert without["link"]["tx_packets"] > with_guard["link"]["tx_packets"] + BACKLOG

    # With it: every client connection succeeds ...
    ok, total = with_guard["legit"]
    assert ok == total == LEGIT_CONNECTIONS
    # ... the guard saw every packet the interface received, dropped exactly
    # the SYNs without a token, and passed the clients' ...
    seen = sum(gd[k] for k in layout.GUARD_VERDICTS + layout.GUARD_PASS_REASONS)
    link = with_guard["link"]
    received, dropped = (
        (link["rx_queue_0_xdp_packets"], link["rx_queue_0_xdp_drops"])
        if hook == "xdp"
        else (link["rx_packets"], link["tc_drops"])
    )
    assert seen == received
    assert gd["missing"] > BACKLOG
    assert gd["dropped"] == gd["missing"] == dropped
    assert gd["ok"] >= LEGIT_CONNECTIONS
    # ... and nothing but the clients reached TCP.  A client that waited a
    # second for its SYN-ACK (an emulated kernel under the flood) sends its
    # SYN again with a fresh token: the guard passes both, TCP opens once.
    tcp = with_guard["tcp"]
    assert tcp["Tcp.PassiveOpens"] + with_guard["syn_retrans"] == gd["ok"]
    assert tcp["TcpExt.SyncookiesSent"] == 0
    assert tcp["TcpExt.ListenOverflows"] == 0 and tcp["TcpExt.ListenDrops"] == 0
    print(
        f"\nflood figures, guard at {hook}: offered {with_guard['sent']} SYNs "
        f"in {FLOOD_SECONDS}s "
        f"({with_guard['sent'] / FLOOD_SECONDS:.0f}/s), guard dropped {gd['missing']}, "
        f"clients {ok}/{total} ({with_guard['syn_retrans']} SYNs retransmitted); "
        f"without guard: syncookies "
        f"{without['tcp']['TcpExt.SyncookiesSent']}, server tx {without['link']['tx_packets']}"
    )


NAT_RULES = """
table ip nt_nat {{
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{out}" masquerade
    }}
}}
table inet nt_clamp {{
    chain clamp {{
        type filter hook forward priority mangle; policy accept;
        tcp flags syn tcp option maxseg size set 1200
    }}
}}
"""


def nat_config(tmp_path, bind=()):
    return make_config(
        tmp_path,
        """
[[policy]]
name = "svc"
destinations = ["198.18.3.0/24"]
ports = [8080]
key = 1

[guard]
action = "drop"
[[guard.protect]]
destinations = ["198.18.3.0/24"]
ports = [8080]
keys = [1]
""",
        bind=bind,
    )


@pytest.mark.parametrize("bind,verdict", [((), "ok"), (("saddr",), "bad_tag")])
def test_marks_survive_nat_and_mss_clamping_unless_bound_to_saddr(lab, tmp_path, bind, verdict):
    from .conftest import build_topology
    from .e2e import capture, syns
    from .pkt import parse

    t = build_topology(lab, router=True)
    rules = NAT_RULES.format(out=t.router_out)
    subprocess.run(
        ["ip", "netns", "exec", t.router, "nft", "-f", "-"],
        input=rules,
        text=True,
        check=True,
        capture_output=True,
    )
    cfg = nat_config(tmp_path, bind)
    with server(t.server, PORT), Marker.load() as marker, Guard.load() as guard:
        with netns(t.client):
            marker.configure(cfg)
            marker.attach(t.client_if)
        with netns(t.server):
            # monitor: the saddr-bound case must count bad_tag, not hang clients
            guard.configure(cfg, action="monitor" if bind else None)
            guard.attach(t.server_if)
        with capture(t.server, t.server_if, tmp_path / "nat.pcap") as pcap:
            for _ in range(10):
                assert connect(t.client, t.server_ip, PORT).endswith(b"ok")
        stats = guard.stats()
    seen = syns(pcap)
    assert len(seen) == 10
    for raw in seen:
        p = parse(raw)
        assert p.saddr == bytes([198, 18, 3, 254]), "the router did not masquerade"
        assert b"\x02\x04\x04\xb0" in p.options, "the router did not clamp the MSS to 1200"
    assert stats[verdict] == 10
    assert stats["ok" if verdict == "bad_tag" else "bad_tag"] == 0
