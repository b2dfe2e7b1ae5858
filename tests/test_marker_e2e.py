"""The marker on real interfaces: real TCP, real captures, both checksum modes.

On a plain veth pair the client's SYN stays CHECKSUM_PARTIAL all the way
and nobody verifies its TCP checksum, so that setup alone would hide a wrong
checksum.  The router setups make the checksum real: with `tx` checksumming
off on the router's egress the kernel computes it in software from the
pseudo-header seed the marker adjusted, and the server's TCP verifies it.
"""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import contextmanager

import pytest
from scapy.layers.inet import IP, TCP

from netoken import token
from netoken.marker import Marker
from netoken.netns import netns

from .conftest import TEST_KEY, build_topology, make_config, run
from .e2e import (
    SYN_ONLY,
    capture,
    connect,
    curl,
    server,
    syn_retransmits,
    syns,
    tcp_in_csum_errors,
    verify_syn,
    wait_captured,
)
from .pkt import parse

PORT = 8080


def policy(dests: list[str], ports=(PORT,)) -> str:
    return f"""
[[policy]]
name = "svc"
destinations = {dests!r}
ports = {list(ports)!r}
key = 1
""".replace("'", '"')


@contextmanager
def marker_on(ns: str, iface: str, cfg):
    with netns(ns):
        m = Marker.load()
        try:
            m.configure(cfg)
            m.attach(iface)
            yield m
        finally:
            m.close()  # the filter holds the program; namespace deletion removes it


def connections(ns: str, addr: str, n: int) -> None:
    for _ in range(n):
        assert connect(ns, addr, PORT).endswith(b"ok")


def test_marked_connections_over_veth(lab, tmp_path):
    t = build_topology(lab)
    cfg = make_config(tmp_path, policy(["198.18.1.0/24"]))
    with (
        server(t.server, PORT) as srv,
        marker_on(t.client, t.client_if, cfg) as m,
        capture(t.server, t.server_if, tmp_path / "v4.pcap", SYN_ONLY) as pcap,
    ):
        retrans = syn_retransmits(t.client)
        connections(t.client, t.server_ip, 20)
        assert curl(t.client, t.server_ip, PORT) == "ok"
        stats = m.stats()
        sent = 21 + syn_retransmits(t.client) - retrans
        wait_captured(pcap, sent)
    got = syns(pcap)
    assert len(got) == sent
    assert all(verify_syn(raw, TEST_KEY) for raw in got)
    assert srv.accepted == 21
    assert stats["marked"] == sent and stats["error"] == 0


def test_marked_connections_over_ipv6(lab, tmp_path):
    t = build_topology(lab)
    cfg = make_config(tmp_path, policy(["fd6e:7400:1::/64"]))
    with (
        server(t.server, PORT, socket.AF_INET6),
        marker_on(t.client, t.client_if, cfg) as m,
        capture(t.server, t.server_if, tmp_path / "v6.pcap", SYN_ONLY) as pcap,
    ):
        connections(t.client, t.server_ip6, 10)
        assert curl(t.client, t.server_ip6, PORT) == "ok"
        assert m.stats()["marked"] == 11
        wait_captured(pcap, 11)
    got = syns(pcap)
    assert len(got) == 11 and all(verify_syn(raw, TEST_KEY) for raw in got)


def test_unselected_port_is_not_marked(lab, tmp_path):
    t = build_topology(lab)
    cfg = make_config(tmp_path, policy(["198.18.1.0/24"], ports=[9999]))
    with (
        server(t.server, PORT),
        marker_on(t.client, t.client_if, cfg) as m,
        capture(t.server, t.server_if, tmp_path / "n.pcap", SYN_ONLY) as pcap,
    ):
        connections(t.client, t.server_ip, 3)
        assert m.stats()["no_policy"] == 3
        wait_captured(pcap, 3)
    assert all(not token.find_options(parse(r).options) for r in syns(pcap))


def send_bad_checksum_syn(ns: str, src: str, dst: str) -> None:
    """A SYN whose TCP checksum is wrong, sent as-is through a raw socket."""
    pkt = IP(src=src, dst=dst) / TCP(sport=33333, dport=PORT, flags="S", chksum=0x1234)
    with netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with s:
        s.sendto(bytes(pkt), (dst, 0))


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_offloaded_checksum_is_right_when_a_router_computes_it(lab, tmp_path, family):
    """Marker on the client (CHECKSUM_PARTIAL); router egress has tx csum off."""
    t = build_topology(lab, router=True)
    run("ethtool", "-K", t.router_out, "tx", "off", ns=t.router)
    v6 = family == "v6"
    dst = t.server_ip6 if v6 else t.server_ip
    cfg = make_config(tmp_path, policy(["fd6e:7400:3::/64" if v6 else "198.18.3.0/24"]))
    errors_before = tcp_in_csum_errors(t.server)
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    with (
        server(t.server, PORT, fam),
        marker_on(t.client, t.client_if, cfg) as m,
        capture(t.server, t.server_if, tmp_path / "r.pcap", SYN_ONLY) as pcap,
    ):
        connections(t.client, dst, 20)
        assert m.stats()["marked"] == 20
        wait_captured(pcap, 20)
    assert tcp_in_csum_errors(t.server) == errors_before
    got = syns(pcap)
    assert len(got) == 20 and all(verify_syn(raw, TEST_KEY) for raw in got)


def test_the_router_path_really_verifies_checksums(lab):
    """Control for the test above: a bad checksum on this path is caught."""
    t = build_topology(lab, router=True)
    run("ethtool", "-K", t.router_out, "tx", "off", ns=t.router)
    with server(t.server, PORT):
        before = tcp_in_csum_errors(t.server)
        send_bad_checksum_syn(t.client, t.client_ip, t.server_ip)
        deadline = time.monotonic() + 3
        while tcp_in_csum_errors(t.server) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tcp_in_csum_errors(t.server) == before + 1


def test_full_checksum_skb_marked_on_a_router(lab, tmp_path):
    """Marker on the router's egress sees forwarded, fully checksummed SYNs
    (client tx csum off): the incremental update path, verified by the server."""
    t = build_topology(lab, router=True)
    run("ethtool", "-K", t.client_if, "tx", "off", ns=t.client)
    cfg = make_config(tmp_path, policy(["198.18.3.0/24"]))
    before = tcp_in_csum_errors(t.server)
    with (
        server(t.server, PORT),
        marker_on(t.router, t.router_out, cfg) as m,
        capture(t.server, t.server_if, tmp_path / "f.pcap", SYN_ONLY) as pcap,
    ):
        connections(t.client, t.server_ip, 20)
        assert m.stats()["marked"] == 20
        wait_captured(pcap, 20)
    assert tcp_in_csum_errors(t.server) == before
    got = syns(pcap)
    assert len(got) == 20 and all(verify_syn(raw, TEST_KEY) for raw in got)


def test_tc_filter_is_visible_to_tc(lab, tmp_path):
    t = build_topology(lab)
    cfg = make_config(tmp_path, policy(["198.18.1.0/24"]))
    with marker_on(t.client, t.client_if, cfg) as m:
        out = subprocess.run(
            ["ip", "netns", "exec", t.client, "tc", "filter", "show", "dev", t.client_if, "egress"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "netoken_mark" in out and f"id {m.prog.id}" in out
