"""The guard program under BPF_PROG_TEST_RUN, verdict by verdict, at both
hooks: every test runs against the XDP object and the TC one (one C source,
bpf/hook.h), which must agree on every verdict, counter and event.

Valid tokens come from two independent sources: the real marker program run
through test_run (so marker and guard are proven to agree) and the Python
reference in netoken.token.  The guard never rewrites packets, so every
test also checks that data_out is the input.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from netoken import config as nconfig
from netoken import layout, token
from netoken.guard import Guard, GuardEvent
from netoken.marker import Marker

from .conftest import TEST_KEY, rounds
from .pkt import (
    DST_MAC,
    LINUX_SYN_OPTS,
    LINUX_SYN_OPTS_RAW,
    SRC_MAC,
    ext_chain,
    options_of_len,
    parse,
    rebuild_with_option,
    syn,
)
from .verdicts import (
    GUARD_SECTION,
    KEY2,
    KEY3,
    MON,
    STATIC,
    V4,
    V6,
    WINDOW,
    mac_option,
    marked,
    run,
    steady_epoch,
    verdict,
    write_config,
)

# Outcomes; guard.retval() says what each hook's program returns for them.
DROP, PASS = "drop", "pass"

GUARD = (
    """
[[policy]]
name = "web"
destinations = ["198.51.100.0/24", "2001:db8:100::/64", "203.0.113.0/24"]
key = 1

[[policy]]
name = "legacy"
destinations = ["198.51.100.200/32"]
mode = "static"
token = "0x1122334455667788"
"""
    + GUARD_SECTION
)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> nconfig.Config:
    return write_config(tmp_path_factory.mktemp("cfg"), GUARD)


@pytest.fixture(scope="module", params=["xdp", "tc"])
def hook(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def guard(cfg, hook):
    g = Guard.load(replay_cache=cfg.guard.replay_cache, hook=hook)
    g.configure(cfg)
    yield g
    g.close()


@pytest.fixture(scope="module")
def marker(cfg):
    m = Marker.load()
    m.configure(cfg)
    yield m
    m.close()


def with_options(raw: bytes, dst=V4, dport=443, src=None, sport=40000, vlans=0) -> bytes:
    """A SYN whose option bytes are exactly RAW (padded with EOL to a word)."""
    raw = raw + b"\0" * (-len(raw) % 4)
    return rebuild_with_option(syn(dst=dst, dport=dport, src=src, sport=sport, vlans=vlans), raw)


def assert_verdict(guard: Guard, data: bytes, want: str, outcome: str | None = None) -> dict:
    ret, counted = run(guard, data)
    assert want in counted, counted
    if outcome is None:
        outcome = PASS if want == "ok" or want in layout.GUARD_PASS_REASONS else DROP
    assert ret == guard.retval(outcome), (want, ret)
    if outcome == DROP:
        assert counted.get("dropped") == 1
    return counted


# ---------------------------------------------------------------- ok


@pytest.mark.parametrize("optlen", [0, 4, 20, 24])
def test_marker_output_verifies(guard, marker, optlen):
    out = marker.prog.test_run(syn(options=options_of_len(optlen))).data_out
    assert len(token.find_options(parse(out).options)) == 1
    assert_verdict(guard, out, "ok")


@pytest.mark.parametrize("dst,vlans", [(V4, 1), (V4, 2), (V6, 0), (V6, 2)])
def test_marker_output_verifies_v6_and_vlan(guard, marker, dst, vlans):
    out = marker.prog.test_run(
        syn(dst=dst, dport=7050, vlans=vlans, options=options_of_len(20))
    ).data_out
    assert_verdict(guard, out, "ok")


def test_marker_output_with_syn_payload_verifies(guard, marker):
    out = marker.prog.test_run(syn(options=options_of_len(20), payload=b"x" * 500)).data_out
    assert_verdict(guard, out, "ok")


def test_marker_static_token_verifies(guard, marker):
    out = marker.prog.test_run(syn(dst="198.51.100.200", options=options_of_len(20))).data_out
    assert token.decode(token.find_options(parse(out).options)[0]).mode == "static"
    # a static token is the same on every SYN: no replay check applies
    assert_verdict(guard, out, "ok")
    assert_verdict(guard, out, "ok")


def test_reference_token_verifies(guard):
    assert_verdict(guard, marked(), "ok")
    assert_verdict(guard, marked(V6, 7000), "ok")
    assert_verdict(guard, marked(before=[]), "ok")


def test_ipv4_header_options(guard):
    from scapy.layers.inet import IPOption_NOP, IPOption_RR

    base = syn(options=LINUX_SYN_OPTS, ip_opts=[IPOption_RR(routers=["10.0.0.1"]), IPOption_NOP()])
    assert parse(base).ihl > 20
    assert_verdict(guard, rebuild_with_option(base, mac_option()), "ok")


def test_epoch_within_skew_is_accepted(guard):
    e = steady_epoch()
    assert_verdict(guard, rebuild_with_option(syn(), mac_option(epoch=e - 1)), "ok")
    assert_verdict(guard, rebuild_with_option(syn(), mac_option(epoch=e + 1)), "ok")


def test_ipv6_extension_headers_do_not_bypass(guard):
    # A Hop-by-Hop header in front of the TCP header must not walk a SYN
    # past the guard: the headers are skipped and the SYN still verified.
    for ext in (IPv6ExtHdrHopByHop(), IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()):
        bare = bytes(
            Ether(src=SRC_MAC, dst=DST_MAC)
            / IPv6(src="2001:db8:1::1", dst=V6)
            / ext
            / TCP(sport=40000, dport=443, flags="S")
        )
        assert_verdict(guard, bare, "missing")
        # ... and the same SYN with a token behind the headers is accepted
        token_syn = rebuild_with_option(bare, mac_option(V6, 443, src="2001:db8:1::1"))
        assert_verdict(guard, token_syn, "ok")


# ---------------------------------------------------------------- rejections


def test_missing(guard):
    assert_verdict(guard, syn(), "missing")
    assert_verdict(guard, syn(options=LINUX_SYN_OPTS), "missing")
    assert_verdict(guard, syn(dst=V6, options=LINUX_SYN_OPTS), "missing")
    opt = mac_option()
    other_exid = opt[:2] + b"\x12\x34" + opt[4:]
    other_kind = b"\xfe" + opt[1:]
    assert_verdict(guard, with_options(other_exid), "missing")
    assert_verdict(guard, with_options(other_kind), "missing")
    # too short to carry an ExID: nobody's option under RFC 6994
    assert_verdict(guard, with_options(b"\xfd\x03\x6e"), "missing")
    # after EOL, nothing counts
    assert_verdict(guard, with_options(b"\x02\x04\x05\xb4\x00\x00\x00\x00" + opt), "missing")


def test_malformed(guard):
    opt = mac_option()
    opt2 = mac_option()
    cases = {
        "two netoken options": opt + opt2,
        "bad length 8": opt[:1] + b"\x08" + opt[2:8],
        "bad length 14": opt[:1] + b"\x0e" + opt[2:14],
        "length 0": b"\x02\x00" + opt,
        "length past the header": b"\x01\x01" + opt[:1] + b"\x18" + opt[2:],
        "kind without length": b"\x01\x01\x01" + b"\x08",
    }
    for name, raw in cases.items():
        pkt = with_options(raw)
        p = parse(pkt)
        ref = token.verdict(p.options, {1: (TEST_KEY, WINDOW, 0)}, daddr=p.daddr, dport=p.dport)
        assert ref == "malformed", name
        assert verdict(guard, pkt) == "malformed", name


def test_bogus_doff_and_lengths_are_malformed(guard):
    good = bytearray(marked())
    p = parse(bytes(good))
    for doff in (0, 4):
        bad = bytearray(good)
        bad[p.l4 + 12] = doff << 4 | (bad[p.l4 + 12] & 0x0F)
        assert_verdict(guard, bytes(bad), "malformed")
    # IP length ends inside the TCP options
    bad = bytearray(good)
    struct.pack_into("!H", bad, p.l3 + 2, p.l4 - p.l3 + 24)
    assert_verdict(guard, bytes(bad), "malformed")


def test_unknown_key(guard):
    assert_verdict(guard, rebuild_with_option(syn(), mac_option(key=KEY3, key_id=3)), "unknown_key")
    assert_verdict(guard, rebuild_with_option(syn(), mac_option(key_id=9)), "unknown_key")


def test_stale(guard):
    e = steady_epoch()
    for epoch in (e - 2, e + 2, e - 5, e - 100, e + 127):
        assert_verdict(guard, rebuild_with_option(syn(), mac_option(epoch=epoch)), "stale")


def test_token_from_256_epochs_ago_is_bad_tag(guard):
    # Same low 8 bits as now: the guard rebuilds today's epoch, and the MAC,
    # which covers all 32 bits, fails.
    e = steady_epoch()
    assert_verdict(guard, rebuild_with_option(syn(), mac_option(epoch=e - 256)), "bad_tag")


def test_bad_tag(guard):
    opt = bytearray(mac_option())
    opt[15] ^= 1
    assert_verdict(guard, with_options(bytes(opt)), "bad_tag")
    assert_verdict(guard, with_options(mac_option(key=KEY3)), "bad_tag")
    # a token for another destination port
    assert_verdict(guard, with_options(mac_option(dport=443), dport=7000), "bad_tag")
    assert_verdict(guard, with_options(mac_option(dst="198.51.100.8"), dst=V4), "bad_tag")


def test_static_token_rules(guard):
    good = token.encode_static(253, 0x6E74, STATIC)
    assert_verdict(guard, with_options(good), "ok")
    assert_verdict(guard, with_options(token.encode_static(253, 0x6E74, STATIC + 1)), "bad_tag")
    # the monitor entry accepts no static token
    assert_verdict(guard, with_options(good, dst=MON), "bad_tag", PASS)


def test_replay_of_the_same_syn(guard):
    pkt = marked()
    assert_verdict(guard, pkt, "ok")
    assert_verdict(guard, pkt, "replay")


def test_saddr_bound_key(guard):
    opt = mac_option(key=KEY2, key_id=2, src="192.0.2.50", bind=token.BIND_SADDR)
    assert_verdict(guard, with_options(opt, src="192.0.2.51"), "bad_tag")  # NAT rewrote it
    assert_verdict(guard, with_options(opt, src="192.0.2.50"), "ok")
    opt6 = mac_option(dst=V6, key=KEY2, key_id=2, src="2001:db8:1::50", bind=token.BIND_SADDR)
    assert_verdict(guard, with_options(opt6, dst=V6, src="2001:db8:1::50"), "ok")


def test_sport_bound_key(tmp_path, hook):
    cfg = write_config(
        tmp_path,
        GUARD.replace("keys = [1, 2]", "keys = [1]"),
        keys={1: (TEST_KEY, ("saddr", "sport"))},
    )
    with Guard.load(hook=hook) as g:
        g.configure(cfg)
        opt = mac_option(src="192.0.2.9", sport=5555, bind=token.BIND_SADDR | token.BIND_SPORT)
        assert verdict(g, with_options(opt, src="192.0.2.9", sport=5556)) == "bad_tag"
        assert verdict(g, with_options(opt, src="192.0.2.9", sport=5555)) == "ok"


# ---------------------------------------------------------------- actions


def test_monitor_entry_counts_and_passes(guard):
    counted = assert_verdict(guard, syn(dst=MON, dport=22), "missing", PASS)
    assert counted.get("monitored") == 1 and "dropped" not in counted
    assert_verdict(guard, syn(dst=MON, dport=22, options=LINUX_SYN_OPTS), "missing", PASS)
    assert_verdict(guard, marked(MON, 22), "ok")


def test_global_override(tmp_path, hook):
    cfg = write_config(tmp_path, GUARD)
    with Guard.load(hook=hook) as g:
        g.configure(cfg, action="monitor")
        assert_verdict(g, syn(), "missing", PASS)
        g.configure(cfg, action="drop")
        assert_verdict(g, syn(dst=MON), "missing", DROP)
        g.configure(cfg)
        assert_verdict(g, syn(), "missing", DROP)
        assert_verdict(g, syn(dst=MON), "missing", PASS)


def test_config_action_monitor_with_drop_entry(tmp_path, hook):
    body = GUARD.replace('action = "drop"\nskew', 'action = "monitor"\nskew')
    body = body.replace(
        'tokens = ["0x1122334455667788"]', 'tokens = ["0x1122334455667788"]\naction = "drop"'
    )
    cfg = write_config(tmp_path, body)
    with Guard.load(hook=hook) as g:
        g.configure(cfg)
        assert_verdict(g, syn(), "missing", DROP)
        cfg2 = write_config(tmp_path, GUARD.replace('action = "monitor"', ""))
        g.configure(cfg2)
        assert_verdict(g, syn(dst=MON), "missing", DROP)


# ---------------------------------------------------------------- pass-through


@pytest.mark.parametrize(
    "data,reason",
    [
        (syn(flags="SA"), "not_syn"),
        (syn(flags="A", payload=b"x" * 1000), "not_syn"),
        (syn(flags="R"), "not_syn"),
        (syn(flags="SA", dst=V6), "not_syn"),
        (syn(dst="192.0.2.99"), "unprotected"),
        (syn(dport=22), "unprotected"),
        (syn(dst="2001:db8:200::1"), "unprotected"),
        (bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IP(dst=V4) / UDP(dport=443)), "not_tcp"),
        (bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IP(dst=V4) / ICMP()), "not_tcp"),
        (bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IPv6(dst=V6) / UDP(dport=443)), "not_tcp"),
        (bytes(Ether(src=SRC_MAC, dst=DST_MAC) / ARP(pdst=V4)), "not_ipv4_or_6"),
        (bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IPv6(dst=V6, nh=50) / (b"\0" * 40)), "not_tcp"),
    ],
    ids=[
        "syn-ack",
        "ack-1000",
        "rst",
        "v6-syn-ack",
        "v4-unprotected",
        "port-unprotected",
        "v6-unprotected",
        "udp",
        "icmp",
        "udp6",
        "arp",
        "v6-esp",
    ],
)
def test_non_targets_pass(guard, data, reason):
    assert_verdict(guard, data, reason, PASS)


def test_truncated_frames_never_break_the_guard(guard):
    full = marked(vlans=1)
    p = parse(full)
    for cut in range(14, len(full)):
        try:
            ret, counted = run(guard, full[:cut])
        except OSError:
            continue  # test_run refuses an IP ethertype without an IP header
        if cut < p.l3 + 20:  # no IPv4 header: the kernel drops it
            assert ret == guard.retval(PASS) and "bad_header_passed" in counted, cut
        elif cut < p.l4 + 20:  # TCP header cut short, to a protected address
            assert ret == guard.retval(DROP) and "bad_header" in counted, cut
        else:  # a SYN to a protected port with its options cut off
            assert ret == guard.retval(DROP) and "malformed" in counted, cut


# ---------------------------------------------------------------- fragments


def frame(l3) -> bytes:
    return bytes(Ether(src=SRC_MAC, dst=DST_MAC) / l3)


def v6_frag(dst=V6, nh=6, offset=0, m=1, before=None) -> bytes:
    head = IPv6(src="2001:db8:1::1", dst=dst)
    if before is not None:
        head = head / before
    return frame(head / IPv6ExtHdrFragment(nh=nh, offset=offset, m=m, id=7) / (b"\0" * 16))


def v4_frag(dst=V4, proto=6, **kw) -> bytes:
    return frame(IP(src="192.0.2.1", dst=dst, proto=proto, **kw) / (b"\0" * 16))


@pytest.mark.parametrize(
    "data",
    [
        frame(IP(src="192.0.2.1", dst=V4, flags="MF") / TCP(dport=443, flags="S")),
        v4_frag(frag=100),
        v4_frag(frag=3),  # the last piece of a SYN: offset, no MF
        v4_frag(flags="MF"),
        v4_frag(dst="198.51.100.99", frag=2),  # same entry, another address in it
        frame(IP(src="192.0.2.1", dst=V4, flags="MF") / TCP(dport=22, flags="S")),
        v6_frag(),
        v6_frag(offset=3, m=0),
        v6_frag(m=0),  # atomic fragment: the kernel takes it whole
        v6_frag(nh=60),  # Destination Options, then maybe TCP
        v6_frag(nh=51),
        v6_frag(before=IPv6ExtHdrHopByHop()),
        v6_frag(before=IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()),
        v6_frag(dst="2001:db8:100::1234"),
    ],
    ids=[
        "v4-first",
        "v4-later",
        "v4-last",
        "v4-mf-raw",
        "v4-other-addr",
        "v4-other-port",
        "v6-first",
        "v6-last",
        "v6-atomic",
        "v6-then-dstopts",
        "v6-then-ah",
        "v6-after-hbh",
        "v6-after-hbh-do",
        "v6-other-addr",
    ],
)
def test_tcp_fragments_to_protected_addresses_are_dropped(guard, data):
    # Any port: a fragment may not show one, and the SYN it completes could
    # be for any port the address has.
    assert_verdict(guard, data, "fragment", DROP)


@pytest.mark.parametrize(
    "data",
    [
        frame(IP(src="192.0.2.1", dst=V4, flags="MF") / UDP(dport=443) / (b"\0" * 16)),
        v4_frag(proto=17, frag=5),
        v4_frag(proto=1, flags="MF"),
        v4_frag(proto=50, flags="MF"),
        v6_frag(nh=17),
        v6_frag(nh=58, offset=4, m=0),
        v6_frag(nh=50),  # ESP: IPsec's to check, as unfragmented
        v4_frag(dst="192.0.2.99", frag=1),
        frame(IP(src="192.0.2.1", dst="192.0.2.99", flags="MF") / TCP(dport=443, flags="S")),
        v6_frag(dst="2001:db8:200::1"),
    ],
    ids=[
        "v4-udp",
        "v4-udp-later",
        "v4-icmp",
        "v4-esp",
        "v6-udp",
        "v6-icmp6",
        "v6-esp",
        "v4-unprotected",
        "v4-unprotected-syn",
        "v6-unprotected",
    ],
)
def test_other_fragments_pass(guard, data):
    assert_verdict(guard, data, "fragment_passed", PASS)


def test_fragment_to_monitored_address_is_counted_and_passed(guard):
    counted = assert_verdict(guard, v4_frag(dst=MON, frag=1), "fragment", PASS)
    assert counted.get("monitored") == 1 and "dropped" not in counted


def test_fragments_pass_setting_and_mode_override(tmp_path, hook):
    with Guard.load(hook=hook) as g:
        g.configure(
            write_config(tmp_path, GUARD.replace("skew = 1", 'skew = 1\nfragments = "pass"'))
        )
        for data in (v4_frag(frag=1), v6_frag(), v4_frag(dst=MON, frag=1)):
            assert_verdict(g, data, "fragment_passed", PASS)
        # the other fail-closed verdicts do not depend on it
        assert_verdict(g, frame(IPv6(dst=V6, nh=135) / (b"\0" * 40)), "ipv6_ext", DROP)
        g.configure(write_config(tmp_path, GUARD), action="monitor")
        assert_verdict(g, v4_frag(frag=1), "fragment", PASS)
        g.configure(write_config(tmp_path, GUARD), action="drop")
        assert_verdict(g, v4_frag(dst=MON, frag=1), "fragment", DROP)


def test_address_verdicts_take_the_dropping_entry(tmp_path, hook):
    """Two entries on one address, one monitoring port 22 (listed first, so
    first in the LPM's list), one dropping 443: a fragment, which has no
    port to choose by, is dropped under the dropping entry."""
    body = """
[guard]
action = "drop"
[[guard.protect]]
destinations = ["198.51.100.7/32"]
ports = [22]
keys = [1]
action = "monitor"
[[guard.protect]]
destinations = ["198.51.100.0/24"]
ports = [443]
keys = [1]
[[guard.protect]]
destinations = ["203.0.113.0/24"]
keys = [1]
action = "monitor"
"""
    with Guard.load(hook=hook) as g:
        g.configure(write_config(tmp_path, body))
        events: list[GuardEvent] = []
        with g.events(events.append) as rb:
            assert_verdict(g, v4_frag(frag=1), "fragment", DROP)
            # all covering entries monitor: monitored under the first
            assert_verdict(g, v4_frag(dst=MON, frag=1), "fragment", PASS)
            assert rb.consume() == 2
        drop, mon = events
        assert (drop.verdict, drop.action, drop.protect) == ("fragment", "drop", 1)
        assert (drop.saddr, drop.daddr, drop.sport, drop.dport) == ("192.0.2.1", V4, 0, 0)
        assert (drop.mode, drop.key_id, drop.epoch) == ("", None, None)
        assert (mon.verdict, mon.action, mon.protect) == ("fragment", "monitor", 2)


# ---------------------------------------------------------------- fail closed


def v6_syn(dst=V6, ext=None, dport=443, options=()) -> bytes:
    head = IPv6(src="2001:db8:1::1", dst=dst)
    if ext is not None:
        head = head / ext
    return frame(head / TCP(sport=40000, dport=dport, flags="S", options=list(options)))


AH = bytes([6, 4, 0, 0]) + (0x1000).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\xaa" * 12


def behind_ah(dst=V6, before=None) -> bytes:
    """A bare IPv6 SYN behind an AH header (24 bytes: 12 of ICV)."""
    head = IPv6(src="2001:db8:1::1", dst=dst, nh=51)
    if before is not None:
        head = IPv6(src="2001:db8:1::1", dst=dst) / before
        head.lastlayer().nh = 51
    return frame(head / Raw(AH + bytes(TCP(sport=40000, dport=443, flags="S"))))


@pytest.mark.parametrize("depth", range(1, layout.MAX_IP6_EXT + 1))
def test_every_chain_within_the_walk_is_verified(guard, depth):
    bare = v6_syn(ext=ext_chain(depth, seed=depth))
    assert_verdict(guard, bare, "missing")
    token_syn = rebuild_with_option(bare, mac_option(V6, 443, src="2001:db8:1::1"))
    assert_verdict(guard, token_syn, "ok")


@pytest.mark.parametrize("depth", [1, 2, 8, layout.MAX_IP6_EXT])
def test_marker_output_behind_extension_headers_verifies(guard, marker, depth):
    # One walk for both programs: what the marker marks, the guard reaches.
    out = marker.prog.test_run(
        v6_syn(ext=ext_chain(depth, seed=depth), options=LINUX_SYN_OPTS)
    ).data_out
    assert len(token.find_options(parse(out).options)) == 1
    assert_verdict(guard, out, "ok")


def test_chains_past_the_walk_fail_closed(guard):
    for depth in (layout.MAX_IP6_EXT + 1, layout.MAX_IP6_EXT + 5, 64):
        bare = v6_syn(ext=ext_chain(depth))
        token_syn = rebuild_with_option(bare, mac_option(V6, 443, src="2001:db8:1::1"))
        assert_verdict(guard, token_syn, "ipv6_ext", DROP)
        # any port of a protected address, SYN or not: the guard cannot see
        assert_verdict(guard, v6_syn(ext=ext_chain(depth), dport=22), "ipv6_ext", DROP)
        assert_verdict(
            guard, v6_syn(dst="2001:db8:200::1", ext=ext_chain(depth)), "ipv6_ext_passed", PASS
        )


def test_syn_behind_ah_is_verified(guard):
    bare = behind_ah()
    assert parse(bare).proto == 6
    assert_verdict(guard, bare, "missing")
    assert_verdict(guard, rebuild_with_option(bare, mac_option(V6, 443, src="2001:db8:1::1")), "ok")
    hbh_ah = behind_ah(before=IPv6ExtHdrHopByHop())
    assert_verdict(guard, hbh_ah, "missing")


@pytest.mark.parametrize("nh", [135, 139, 140, 253, 254])
def test_headers_it_cannot_walk_fail_closed(guard, nh):
    data = frame(IPv6(src="2001:db8:1::1", dst=V6, nh=nh) / (b"\0" * 40))
    assert_verdict(guard, data, "ipv6_ext", DROP)
    after_hbh = frame(IPv6(src="2001:db8:1::1", dst=V6) / IPv6ExtHdrHopByHop(nh=nh) / (b"\0" * 40))
    assert_verdict(guard, after_hbh, "ipv6_ext", DROP)
    other = frame(IPv6(src="2001:db8:1::1", dst="2001:db8:200::1", nh=nh) / (b"\0" * 40))
    assert_verdict(guard, other, "ipv6_ext_passed", PASS)


def test_truncated_chains_fail_closed(guard):
    full = v6_syn(ext=ext_chain(4), options=LINUX_SYN_OPTS)
    p = parse(full)
    other = v6_syn(dst="2001:db8:200::1", ext=ext_chain(4), options=LINUX_SYN_OPTS)
    for cut in range(p.l3 + 40, p.l4 + 20):
        assert_verdict(guard, full[:cut], "bad_header", DROP)
        assert_verdict(guard, other[:cut], "bad_header_passed", PASS)
    # a length that points past the frame, and a Fragment header cut short
    hbh = bytearray(v6_syn(ext=IPv6ExtHdrHopByHop()))
    hbh[14 + 40 + 1] = 200
    assert_verdict(guard, bytes(hbh), "bad_header", DROP)
    assert_verdict(guard, v6_frag()[: 14 + 40 + 4], "bad_header", DROP)


def test_truncated_tcp_header_fails_closed_for_protected_addresses(guard):
    for dst, port in ((V4, 22), (V6, 443), (MON, 80)):
        full = syn(dst=dst, dport=port)
        p = parse(full)
        want = "bad_header"
        retval = PASS if dst == MON else DROP
        for cut in (p.l4, p.l4 + 13, p.l4 + 14, p.l4 + 19):
            assert_verdict(guard, full[:cut], want, retval)
    for dst in ("192.0.2.99", "2001:db8:200::1"):
        full = syn(dst=dst)
        assert_verdict(guard, full[: parse(full).l4 + 10], "bad_header_passed", PASS)


def test_bad_ipv4_header_passes_for_the_kernel_to_drop(guard):
    bad = bytearray(syn())
    bad[14] = 0x44  # IHL 4
    assert_verdict(guard, bytes(bad), "bad_header_passed", PASS)


def test_ipv6_ext_event_has_addresses_and_no_ports(tmp_path, hook):
    with Guard.load(hook=hook) as g:
        g.configure(write_config(tmp_path, GUARD))
        events: list[GuardEvent] = []
        with g.events(events.append) as rb:
            assert verdict(g, v6_syn(ext=ext_chain(layout.MAX_IP6_EXT + 1))) == "ipv6_ext"
            assert rb.consume() == 1
        (e,) = events
        assert (e.verdict, e.action, e.protect, e.family) == ("ipv6_ext", "drop", 0, 6)
        assert (e.saddr, e.daddr, e.sport, e.dport) == ("2001:db8:1::1", V6, 0, 0)


# ---------------------------------------------------------------- attacks


def test_forged_tags_never_pass(guard):
    """100,000 random tags (and nonces) with a valid key id and epoch."""
    n = rounds(100_000)
    e = steady_epoch()
    template = bytearray(with_options(mac_option(epoch=e)))
    off = parse(bytes(template)).l4 + 20 + 6  # nonce, then tag
    rng = random.Random(0x6E74)
    before = guard.stats()
    t0 = time.monotonic()
    passed = 0
    for _ in range(n):
        # The epoch is stamped per frame: on a slow (emulated) kernel the loop
        # outlasts the skew, and every frame must fail on its tag, not go stale.
        template[off - 1] = token.epoch_now(WINDOW) & 0xFF
        template[off : off + 10] = rng.randbytes(10)
        if guard.prog.test_run(bytes(template)).retval != guard.retval(DROP):
            passed += 1
    elapsed = time.monotonic() - t0
    after = guard.stats()
    assert passed == 0
    assert after["bad_tag"] - before["bad_tag"] == n
    assert after["ok"] == before["ok"]
    print(f"\n{n} forged tags judged in {elapsed:.1f} s")


def test_captured_syn_replayed_1000_times_passes_at_most_once(guard, marker):
    captured = marker.prog.test_run(syn(options=options_of_len(20))).data_out
    before = guard.stats()
    passes = sum(guard.prog.test_run(captured).retval == guard.retval(PASS) for _ in range(1000))
    after = guard.stats()
    assert passes == 1
    assert after["ok"] - before["ok"] == 1
    assert after["replay"] - before["replay"] == 999
    # in one test_run call, too (the guard keeps no per-packet state)
    again = marker.prog.test_run(syn(options=options_of_len(20))).data_out
    r = guard.prog.test_run(again, repeat=1000)
    assert r.retval == guard.retval(DROP)
    assert guard.stats()["replay"] - after["replay"] == 999


def test_removed_key_makes_its_tokens_unknown_key(tmp_path, hook):
    cfg = write_config(tmp_path, GUARD)
    with Guard.load(hook=hook) as g:
        g.configure(cfg)
        opt = mac_option(key=KEY3, key_id=3)
        assert verdict(g, with_options(opt)) == "unknown_key"
        # rotation: accept key 3 here, then retire it
        g.configure(write_config(tmp_path, GUARD.replace("keys = [1, 2]", "keys = [1, 2, 3]")))
        assert verdict(g, with_options(opt)) == "ok"
        assert verdict(g, with_options(mac_option(key=KEY3, key_id=3))) == "ok"
        g.configure(write_config(tmp_path, GUARD.replace("keys = [1, 2]", "keys = [1]")))
        assert verdict(g, with_options(mac_option(key=KEY3, key_id=3))) == "unknown_key"
        assert (
            verdict(g, with_options(mac_option(key=KEY2, key_id=2, bind=token.BIND_SADDR)))
            == "unknown_key"
        )
        # and gone from [[key]] entirely
        keys = {1: (TEST_KEY, ())}
        g.configure(write_config(tmp_path, GUARD.replace("keys = [1, 2]", "keys = [1]"), keys))
        assert (
            verdict(g, with_options(mac_option(key=KEY2, key_id=2, bind=token.BIND_SADDR)))
            == "unknown_key"
        )
        assert verdict(g, marked()) == "ok"


def test_reconfigure_keeps_one_generation_of_entries(tmp_path, hook):
    cfg = write_config(tmp_path, GUARD)
    with Guard.load(hook=hook) as g:
        for _ in range(3):
            g.configure(cfg)
            assert verdict(g, with_options(token.encode_static(253, 0x6E74, STATIC))) == "ok"
            assert verdict(g, marked()) == "ok"
        assert len(list(g.maps["nt_static"].keys())) == 1


def test_a_new_config_is_seen_at_once_by_a_destination_looked_up_before(tmp_path, hook):
    """The guard keeps what it looked up per destination until the next
    configure(): protection removed or added takes effect with the next SYN."""
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    on = write_config(tmp_path / "on", GUARD)
    off = write_config(
        tmp_path / "off", GUARD.replace('ports = [443, "7000-7100"]', 'ports = ["7000-7100"]')
    )
    with Guard.load(hook=hook) as g:
        g.configure(on)
        assert verdict(g, syn()) == "missing"
        g.configure(off)
        assert verdict(g, syn()) == "unprotected"
        g.configure(on)
        assert verdict(g, syn()) == "missing"


# ---------------------------------------------------------------- counters, events


def test_key_stats(tmp_path, hook):
    with Guard.load(hook=hook) as g:
        g.configure(write_config(tmp_path, GUARD))
        verdict(g, marked())
        pkt = marked()
        verdict(g, pkt)
        verdict(g, pkt)  # replay
        verdict(g, with_options(mac_option(key=KEY3, key_id=3)))  # unknown_key
        verdict(g, syn())  # missing: no key id
        assert g.key_stats() == {1: {"ok": 2, "bad": 1}, 3: {"ok": 0, "bad": 1}}


def test_event_describes_the_dropped_syn(tmp_path, hook):
    with Guard.load(hook=hook) as g:
        g.configure(write_config(tmp_path, GUARD))
        events: list[GuardEvent] = []
        e = steady_epoch()
        opt = bytearray(mac_option(epoch=e, src="192.0.2.77", sport=41000, dport=7001))
        opt[12] ^= 0xFF
        with g.events(events.append) as rb:
            assert (
                verdict(g, with_options(bytes(opt), src="192.0.2.77", sport=41000, dport=7001))
                == "bad_tag"
            )
            verdict(g, syn(dst=MON, dport=80))
            assert rb.consume() == 2
        bad, mon = events
        tok = token.decode(bytes(opt))
        assert (bad.verdict, bad.action, bad.protect, bad.family) == ("bad_tag", "drop", 0, 4)
        assert (bad.saddr, bad.daddr, bad.sport, bad.dport) == ("192.0.2.77", V4, 41000, 7001)
        assert (bad.mode, bad.key_id, bad.epoch) == ("mac", 1, e)
        assert bad.nonce == tok.nonce and bad.tag == tok.tag
        assert (mon.verdict, mon.action, mon.protect, mon.mode, mon.key_id) == (
            "missing",
            "monitor",
            1,
            "",
            None,
        )


def test_events_are_rate_limited_and_accounted(tmp_path, hook):
    with Guard.load(hook=hook) as g:
        g.configure(write_config(tmp_path, GUARD), event_rate=10, event_burst=5)
        events: list[GuardEvent] = []
        with g.events(events.append) as rb:
            t0 = time.monotonic()
            r = g.prog.test_run(syn(), repeat=1000)
            for _ in range(200):
                g.prog.test_run(syn(dst=V6))
            elapsed = time.monotonic() - t0
            rb.consume()
        assert r.retval == g.retval(DROP)
        s = g.stats()
        assert s["dropped"] == 1200 and s["missing"] == 1200
        assert s["events"] == len(events)
        assert s["events"] + s["events_suppressed"] + s["events_lost"] == s["dropped"]
        # per CPU: the burst plus what the rate refilled, on each CPU used
        assert 5 <= len(events) <= os.cpu_count() * (5 + 10 * elapsed + 1)
        assert s["events_suppressed"] >= 1200 - len(events)


def test_events_disabled_with_rate_zero(tmp_path, hook):
    with Guard.load(hook=hook) as g:
        g.configure(write_config(tmp_path, GUARD), event_rate=0, event_burst=0)
        g.prog.test_run(syn(), repeat=100)
        s = g.stats()
        assert (s["events"], s["events_suppressed"], s["dropped"]) == (0, 100, 100)


# ---------------------------------------------------------------- the reference agrees


def test_guard_agrees_with_the_reference_on_mutated_options(guard):
    """Random option lists around a real token: same verdict as token.verdict."""
    rng = random.Random(1)
    # what entry 0 accepts, as the reference takes it
    keys = {1: (TEST_KEY, WINDOW, 0), 2: (KEY2, WINDOW, token.BIND_SADDR)}
    e = steady_epoch()
    pieces = [
        b"\x01",
        b"\x00",
        b"\x02\x04\x05\xb4",
        b"\x04\x02",
        b"\x03\x03\x07",
        b"\x08\x0a" + bytes(8),
        b"\xfd\x04\x6e\x74",
        b"\xfd\x06\x12\x34\x00\x00",
    ]
    seen: dict[str, int] = {}
    for _ in range(rounds(3000)):
        # Epoch by epoch: the reference reads the clock before the guard
        # does, so no case may straddle a boundary.
        e = steady_epoch()
        if rng.random() < 0.1:
            opt = bytearray(token.encode_static(253, 0x6E74, rng.choice((STATIC, STATIC ^ 1))))
        else:
            kid = rng.choice((1, 1, 1, 2, 3))
            key = {1: TEST_KEY, 2: KEY2, 3: KEY3}[kid]
            opt = bytearray(
                mac_option(
                    epoch=e + rng.choice((0, 0, 0, 1, -1, 2, -3)),
                    key=key,
                    key_id=kid,
                    bind=keys.get(kid, (0, 0, 0))[2],
                )
            )
        if rng.random() < 0.2:
            opt[rng.randrange(len(opt))] ^= 1 << rng.randrange(8)
        parts = [rng.choice(pieces) for _ in range(rng.randrange(4))]
        parts.insert(rng.randrange(len(parts) + 1), bytes(opt))
        if rng.random() < 0.1:
            parts.append(bytes(mac_option(epoch=e)))
        raw = b"".join(parts)[: rng.choice((40, 40, 40, 20, 17))]
        if len(raw) + (-len(raw) % 4) > 40:
            continue
        pkt = with_options(raw)
        p = parse(pkt)
        want = token.verdict(
            p.options,
            keys,
            daddr=p.daddr,
            dport=p.dport,
            saddr=p.saddr,
            sport=p.sport,
            skew=1,
            static_tokens={STATIC},
        )
        got = verdict(guard, pkt)
        assert got == want, (raw.hex(), got, want)
        seen[want] = seen.get(want, 0) + 1
    assert set(seen) == set(token.VERDICTS), seen


def test_guard_agrees_with_the_reference_around_the_linux_syn_layout(guard):
    """The guard reads Linux's own SYN options (MSS, SACK permitted,
    timestamps, NOP, window scale) with three masked loads instead of the
    walk: every bit of that prefix and of what follows it, flipped, must get
    the verdict the reference gives, whichever way the guard took."""
    rng = random.Random(2)
    keys = {1: (TEST_KEY, WINDOW, 0)}
    e = steady_epoch()
    prefix = LINUX_SYN_OPTS_RAW
    assert len(prefix) == 20
    static = token.encode_static(253, 0x6E74, STATIC)
    # Each a function: a mac token is accepted once, then it is a replay.
    tails: list[Callable[[], bytes]] = [
        lambda: b"",
        lambda: mac_option(epoch=e),
        lambda: static,
        lambda: b"\x01" * 4 + mac_option(epoch=e),
        lambda: mac_option(epoch=e)[:8],
        lambda: static + b"\x01\x01\x01\x01",
        lambda: b"\x00" + mac_option(epoch=e)[1:],
        lambda: static[:1] + b"\x14" + static[2:] + bytes(8),
        lambda: b"\x02\x04\x05\xb4",
    ]
    seen: dict[str, int] = {}
    cases: list[tuple[bytes, int | None]] = [(prefix + t(), None) for t in tails]
    for _ in range(rounds(1500)):
        raw = bytearray(prefix + rng.choice(tails)())
        bit = rng.randrange(len(raw) * 8)
        raw[bit // 8] ^= 1 << (bit % 8)
        cases.append((bytes(raw), bit))
    for raw, bit in cases:
        if len(raw) > 40:
            continue
        steady_epoch()  # the tokens' epoch must still be the guard's
        pkt = with_options(raw)
        p = parse(pkt)
        want = token.verdict(
            p.options, keys, daddr=p.daddr, dport=p.dport, skew=1, static_tokens={STATIC}
        )
        assert verdict(guard, pkt) == want, (raw.hex(), bit, want)
        seen[want] = seen.get(want, 0) + 1
    assert {"ok", "missing", "malformed", "bad_tag"} <= set(seen), seen
