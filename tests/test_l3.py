"""Marker and guard on L3 devices, whose packets start at the IP header
(TUN, WireGuard, ipip, sit, gre): the objects compiled with -DNT_L3 under
BPF_PROG_TEST_RUN, then real TUN devices through the CLI.

The TUN tests are the issue's reproduction: a real connect() through a TUN
device, its SYN read from the TUN fd, must carry a token that verifies; and
SYNs written into a TUN fd must reach TCP only with a valid token while the
guard runs at its TC ingress.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from netoken import layout, links, token
from netoken.guard import Guard
from netoken.marker import Marker
from netoken.netns import netns

from .conftest import TEST_KEY, make_config, uid
from .e2e import server, verify_syn
from .pkt import (
    DST_MAC,
    LINUX_SYN_OPTS,
    SRC_MAC,
    expected_marked,
    normalize_zero,
    options_of_len,
    parse,
    rebuild_with_option,
    syn,
)
from .test_cli import PORT, forget, netoken, ok, one_line_error, pin_dir, write_config
from .test_guard_datapath import GUARD
from .test_marker_datapath import POLICIES, TC_ACT_UNSPEC
from .tun import Tun, tcp_flags
from .verdicts import MON, V4, V6, mac_option, marked, run, verdict
from .verdicts import write_config as write_guard_config

MACS = bytes.fromhex(DST_MAC.replace(":", "") + SRC_MAC.replace(":", ""))


def strip(frame: bytes) -> bytes:
    """The IP packet of an untagged Ethernet frame: what an L3 device carries."""
    assert frame[12:14] in (b"\x08\x00", b"\x86\xdd")
    return frame[14:]


def framed(packet: bytes) -> bytes:
    """PACKET behind an Ethernet header, for the checkers in tests/pkt.py."""
    return MACS + (b"\x08\x00" if packet[0] >> 4 == 4 else b"\x86\xdd") + packet


# ---------------------------------------------------------------- datapath


@pytest.fixture(scope="module")
def marker_l3(tmp_path_factory):
    m = Marker.load(framing="l3")
    m.configure(make_config(tmp_path_factory.mktemp("cfg"), POLICIES))
    yield m
    m.close()


@pytest.fixture(scope="module")
def guard_l3(tmp_path_factory):
    cfg = write_guard_config(tmp_path_factory.mktemp("gcfg"), GUARD)
    g = Guard.load(replay_cache=cfg.guard.replay_cache, hook="tc", framing="l3")
    g.configure(cfg)
    yield g
    g.close()


def mark(m: Marker, packet: bytes) -> tuple[bytes, dict[str, int]]:
    before = m.stats()
    r = m.prog.test_run(packet)
    after = m.stats()
    assert r.retval == TC_ACT_UNSPEC
    return r.data_out, {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.mark.parametrize("dst", [V4, V6])
@pytest.mark.parametrize("optlen,payload", [(0, b""), (20, b""), (20, b"x" * 300)])
def test_l3_marker_marks_byte_for_byte(marker_l3, dst, optlen, payload):
    before = syn(dst=dst, options=options_of_len(optlen), payload=payload)
    out, counted = mark(marker_l3, strip(before))
    assert counted == {"marked_payload" if payload else "marked": 1}
    after = framed(out)
    p = parse(after)
    assert p.ip_checksum_ok() and p.tcp_checksum_ok() and p.payload == payload
    assert normalize_zero(after) == normalize_zero(expected_marked(before, after, TEST_KEY))


def test_ethernet_marker_marks_nothing_on_an_l3_packet(tmp_path):
    """The issue's symptom, and why the L3 object exists: the Ethernet build
    reads the IP header as a MAC header."""
    with Marker.load() as m:
        m.configure(make_config(tmp_path, POLICIES))
        out, counted = mark(m, strip(syn()))
    assert out == strip(syn()) and counted == {"not_ipv4_or_6": 1}


@pytest.mark.parametrize(
    "packet,reason",
    [
        (bytes(40), "not_ipv4_or_6"),
        (b"\x55" + strip(syn())[1:], "not_ipv4_or_6"),
        (strip(syn(flags="SA")), "not_syn"),
        (strip(syn(dst="203.0.113.5")), "no_policy"),
    ],
    ids=["zeros", "version-5", "syn-ack", "no-policy"],
)
def test_l3_marker_leaves_other_packets_alone(marker_l3, packet, reason):
    out, counted = mark(marker_l3, packet)
    assert out == packet and counted == {reason: 1}


def test_l3_marker_truncated_passes_untouched(marker_l3):
    full = strip(syn(options=options_of_len(20)))
    for cut in range(14, len(full)):  # test_run takes at least an Ethernet header's worth
        out, counted = mark(marker_l3, full[:cut])
        assert out == full[:cut] and "marked" not in counted, cut


def assert_l3_verdict(g: Guard, packet: bytes, want: str, outcome: str | None = None) -> None:
    ret, counted = run(g, packet)
    assert want in counted, counted
    if outcome is None:
        outcome = "pass" if want == "ok" or want in layout.GUARD_PASS_REASONS else "drop"
    assert ret == g.retval(outcome), (want, ret)


def test_l3_guard_verifies_what_the_l3_marker_wrote(guard_l3, marker_l3):
    for dst in (V4, V6):
        out, _ = mark(marker_l3, strip(syn(dst=dst, dport=7050, options=options_of_len(20))))
        assert_l3_verdict(guard_l3, out, "ok")
        assert_l3_verdict(guard_l3, out, "replay")


def test_l3_guard_verdicts(guard_l3):
    assert_l3_verdict(guard_l3, strip(marked()), "ok")
    assert_l3_verdict(guard_l3, strip(marked(V6, 7000)), "ok")
    assert_l3_verdict(guard_l3, strip(syn()), "missing")
    assert_l3_verdict(guard_l3, strip(syn(dst=V6, options=LINUX_SYN_OPTS)), "missing")
    opt = bytearray(mac_option())
    opt[15] ^= 1
    assert_l3_verdict(
        guard_l3, strip(rebuild_with_option(syn(options=LINUX_SYN_OPTS), bytes(opt))), "bad_tag"
    )
    assert_l3_verdict(guard_l3, strip(syn(dst=MON, dport=22)), "missing", "pass")  # monitor
    assert_l3_verdict(guard_l3, strip(syn(dst="192.0.2.99")), "unprotected")
    assert_l3_verdict(guard_l3, strip(syn(flags="SA")), "not_syn")
    assert_l3_verdict(guard_l3, bytes(40), "not_ipv4_or_6")


def test_l3_guard_truncated_packets(guard_l3):
    """As on Ethernet: without a whole IPv4 header the kernel drops it
    itself; a SYN to a protected address cut inside its TCP header fails
    closed; one cut inside its options is malformed."""
    full = strip(marked())
    l4 = (full[0] & 0x0F) * 4
    for cut in range(14, len(full)):
        got = verdict(guard_l3, full[:cut])
        want = "bad_header_passed" if cut < 20 else "bad_header" if cut < l4 + 20 else "malformed"
        assert got == want, cut


def test_link_types():
    def kind(arphrd: int) -> str | None:
        return links.Link(1, "x", None, arphrd, 0, frozenset()).framing

    assert kind(links.ARPHRD_ETHER) == kind(links.ARPHRD_LOOPBACK) == "ethernet"
    # tun/WireGuard, ipip, ip6tnl, sit, gre, ip6gre
    assert {kind(t) for t in (0xFFFE, 768, 769, 776, 778, 823)} == {"l3"}
    assert kind(32) is None and kind(512) is None  # InfiniBand, PPP


# ---------------------------------------------------------------- TUN devices

TUN_CONFIG = """
[[policy]]
name = "over-tun"
destinations = ["{v4}.0/24", "{v6}::/64"]
ports = [{port}]
key = 1

[guard]
action = "drop"

[[guard.protect]]
destinations = ["{v4}.0/24", "{v6}::/64"]
ports = [{port}]
keys = [1]
"""


def tun_config(tmp_path, v4: str, v6: str):
    return write_config(tmp_path, {1: TEST_KEY}, TUN_CONFIG.format(v4=v4, v6=v6, port=PORT))


def is_syn(pkt: bytes) -> bool:
    f = tcp_flags(pkt)
    return f is not None and f[0] & 0x12 == 0x02 and f[2] == PORT


def test_marker_on_tun_marks_real_connects(lab, tmp_path):
    ns = lab.ns("tm")
    name = uid("ntun")
    tun = Tun(lab, ns, name).up("198.18.41.1/24", "fd6e:7400:41::1/64")
    try:
        cfg = tun_config(tmp_path, "198.18.41", "fd6e:7400:41")
        res = json.loads(ok("mark", "attach", name, "-c", str(cfg), "--json", ns=ns))
        assert res["link"] == "l3"
        assert "IP header" in ok("status", name, ns=ns)
        seen = []
        for peer in ("198.18.41.2", "fd6e:7400:41::2"):
            family = socket.AF_INET6 if ":" in peer else socket.AF_INET
            for _ in range(5):
                with netns(ns):
                    s = socket.socket(family, socket.SOCK_STREAM)
                with s:
                    s.setblocking(False)
                    s.connect_ex((peer, PORT))
                    (pkt,) = tun.collect(is_syn, 1)
                seen.append(pkt)
        for pkt in seen:
            frame = framed(pkt)
            assert parse(frame).tcp_checksum_ok() and parse(frame).ip_checksum_ok()
            assert verify_syn(frame, TEST_KEY)
        (d,) = json.loads(ok("stats", name, "--json", ns=ns))
        c = d["counters"]
        assert c["marked"] == len(seen) == 10 and c["not_ipv4_or_6"] == 0
        print(
            f"\nTUN marker: {len(seen)}/10 SYNs of real connect()s read from the TUN fd "
            f"carried a verifying token"
        )
    finally:
        tun.close()
        forget(name)


def spoofable_syn(src: str, dst: str, sport: int, option: bytes | None) -> bytes:
    """A Linux-like SYN from SRC:SPORT to DST:PORT as an L3 device carries it,
    with OPTION (a token) after the usual options, or none."""
    frame = syn(dst=dst, dport=PORT, src=src, sport=sport, options=LINUX_SYN_OPTS)
    return strip(rebuild_with_option(frame, option) if option else frame)


def test_guard_at_tc_ingress_on_tun(lab, tmp_path):
    ns = lab.ns("tg")
    name = uid("ntun")
    tun = Tun(lab, ns, name).up("198.18.42.1/24", "fd6e:7400:42::1/64")
    n = 10
    try:
        cfg = tun_config(tmp_path, "198.18.42", "fd6e:7400:42")
        res = json.loads(ok("guard", "attach", name, "-c", str(cfg), "--json", ns=ns))
        assert (res["hook"], res["link"], res["xdp_mode"]) == ("tc", "l3", None)
        assert "L3 device" in res["hook_reason"]
        with server(ns, PORT), server(ns, PORT, socket.AF_INET6):
            marked_ports, unmarked_ports = set(), set()
            for i in range(n):
                src, dst = (
                    ("198.18.42.2", "198.18.42.1")
                    if i % 2
                    else ("fd6e:7400:42::2", "fd6e:7400:42::1")
                )
                good, bad = 41000 + i, 42000 + i
                opt = token.build_mac_option(
                    TEST_KEY,
                    key_id=1,
                    epoch=token.epoch_now(30),
                    daddr=dst,
                    dport=PORT,
                    saddr=src,
                    sport=good,
                    nonce=os.urandom(token.NONCE_LEN),
                )
                tun.write(spoofable_syn(src, dst, good, opt))
                tun.write(spoofable_syn(src, dst, bad, None))
                marked_ports.add(good)
                unmarked_ports.add(bad)

            def syn_ack(pkt: bytes) -> bool:
                f = tcp_flags(pkt)
                return f is not None and f[0] & 0x12 == 0x12 and f[1] == PORT

            answered = {tcp_flags(p)[2] for p in tun.collect(syn_ack, 2 * n, timeout=3)}
        assert answered == marked_ports  # TCP saw the marked SYNs and nothing else
        (d,) = json.loads(ok("stats", name, "--json", ns=ns))
        c = d["counters"]
        assert (c["ok"], c["missing"], c["dropped"]) == (n, n, n)
        assert "tc       ingress" in ok("status", name, ns=ns)
        print(
            f"\nTUN guard at tc ingress: {len(answered & marked_ports)}/{n} marked SYNs "
            f"answered, {len(answered & unmarked_ports)}/{n} unmarked SYNs answered "
            f"(dropped {c['dropped']})"
        )
        ok("guard", "detach", name, ns=ns)
        assert not pin_dir(name).exists()
    finally:
        tun.close()
        forget(name)


def test_marker_and_guard_on_two_tuns_carry_real_connections(lab, tmp_path):
    """Two namespaces joined by a user-space wire between two TUN devices
    (what a VPN daemon is): marker on one, guard on the other, real TCP
    through both; SYNs injected without a token never reach the server."""
    import threading

    cl, sv = lab.ns("t1"), lab.ns("t2")
    a_name, b_name = uid("ntun"), uid("ntun")
    a = Tun(lab, cl, a_name).up("198.18.43.1/24")
    b = Tun(lab, sv, b_name).up("198.18.43.2/24")
    stop = threading.Event()
    syns: list[bytes] = []

    def wire() -> None:
        while not stop.is_set():
            for src, dst in ((a, b), (b, a)):
                pkt = src.read(time.monotonic() + 0.01)
                if pkt is None:
                    continue
                if src is a and is_syn(pkt):
                    syns.append(pkt)
                dst.write(pkt)

    th = threading.Thread(target=wire, daemon=True)
    try:
        cfg = tun_config(tmp_path, "198.18.43", "fd6e:7400:43")
        ok("mark", "attach", a_name, "-c", str(cfg), ns=cl)
        ok("guard", "attach", b_name, "-c", str(cfg), ns=sv)
        th.start()
        from .e2e import connect

        with server(sv, PORT) as srv:
            for _ in range(10):
                assert connect(cl, "198.18.43.2", PORT).endswith(b"ok")
            for i in range(10):
                b.write(spoofable_syn("198.18.43.1", "198.18.43.2", 43000 + i, None))
            time.sleep(0.5)
            assert srv.accepted == 10
        (d,) = json.loads(ok("stats", b_name, "--json", ns=sv))
        c = d["counters"]
        assert c["ok"] == len(syns) == 10 and c["missing"] == c["dropped"] == 10
        assert all(verify_syn(framed(p), TEST_KEY) for p in syns)
    finally:
        stop.set()
        th.join(timeout=5)
        a.close()
        b.close()
        forget(a_name, b_name)


def test_unsupported_link_type_is_one_line_at_attach(lab, tmp_path):
    """A link type that is neither Ethernet nor IP without a link layer
    (here a TUN turned into PPP with TUNSETLINK) is refused at attach by
    marker and guard, with nothing left behind."""
    ns = lab.ns("tp")
    name = uid("ntun")
    tun = Tun(lab, ns, name, link_type=512).up()
    try:
        cfg = tun_config(tmp_path, "198.18.44", "fd6e:7400:44")
        for verb in ("mark", "guard"):
            line = one_line_error(netoken(verb, "attach", name, "-c", str(cfg), ns=ns))
            assert line == (
                f"netoken: {name} (tun) has link type 512, neither Ethernet nor IP "
                f"without a link-layer header: netoken cannot parse its packets"
            )
            assert not pin_dir(name).exists()
    finally:
        tun.close()
        forget(name)
