"""The marker program under BPF_PROG_TEST_RUN, packet by packet.

test_run hands the program a full-checksum skb (not CHECKSUM_PARTIAL), so
these tests prove the incremental checksum updates byte for byte; the
offload path is covered end to end in test_marker_e2e.py.
"""

from __future__ import annotations

import errno
import random
import struct
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Ether

from netoken import layout, token
from netoken.libbpf import BPFError
from netoken.marker import Marker, MarkEvent

from .conftest import TEST_KEY, make_config, rounds
from .pkt import (
    DST_MAC,
    LINUX_SYN_OPTS_RAW,
    SRC_MAC,
    expected_marked,
    ext_chain,
    inet_sum,
    normalize_zero,
    options_of_len,
    parse,
    rebuild_with_option,
    syn,
    syn_with_options,
)
from .syn_layouts import (
    COOKIE16,
    EOL,
    LAYOUTS,
    MD5SIG,
    MP_CAPABLE_V1,
    NOP,
    SOK,
    fastopen,
    mss,
    option_list,
    ts,
    ws,
)

TC_ACT_UNSPEC = 0xFFFFFFFF  # -1 as the u32 test_run reports

POLICIES = """
[[policy]]
name = "web"
destinations = ["198.51.100.0/24", "2001:db8:100::/64"]
ports = [80, 443, "7000-7100"]
mode = "mac"
key = 1

[[policy]]
name = "legacy"
destinations = ["192.0.2.128/25"]
mode = "static"
token = "0x1122334455667788"

[[policy]]
name = "narrow"
destinations = ["198.51.100.64/26"]
ports = [8443]
key = 1
"""


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    m = Marker.load()
    m.configure(make_config(tmp_path_factory.mktemp("cfg"), POLICIES))
    yield m
    m.close()


def run(marker: Marker, data: bytes) -> bytes:
    r = marker.prog.test_run(data)
    assert r.retval == TC_ACT_UNSPEC, "the marker must never decide a verdict"
    return r.data_out


def delta(marker: Marker, fn):
    before = marker.stats()
    out = fn()
    after = marker.stats()
    return out, {k: after[k] - before[k] for k in after if after[k] != before[k]}


def assert_marked(marker, before: bytes, reason="marked", room=False) -> bytes:
    """The marker's output for BEFORE is, byte for byte, what the independent
    construction says (with the Timestamps option removed if ROOM)."""
    after, counted = delta(marker, lambda: run(marker, before))
    assert counted == ({reason: 1, "room_from_ts": 1} if room else {reason: 1})
    p = parse(after)
    assert p.ip_checksum_ok() and p.tcp_checksum_ok()
    assert p.tcp_len <= 60
    assert p.payload == parse(before).payload
    assert normalize_zero(after) == normalize_zero(expected_marked(before, after, TEST_KEY))
    return after


def assert_untouched(marker, data: bytes, reason: str) -> None:
    after, counted = delta(marker, lambda: run(marker, data))
    assert after == data
    assert counted == {reason: 1}


@pytest.mark.parametrize("optlen", [0, 4, 20, 24])
def test_ipv4_syn_gets_a_verifiable_mac_option(marker, optlen):
    assert_marked(marker, syn(options=options_of_len(optlen)))


@pytest.mark.parametrize("optlen", [28, 32, 36, 40])
def test_timestamps_make_room(marker, optlen):
    # optlen + 16 > 40: the token only fits once Timestamps (and the NOPs) go
    after = assert_marked(marker, syn(options=options_of_len(optlen)), room=True)
    assert 8 not in [o[0] for o in option_list(parse(after).options)]


NO_ROOM = {
    "tcp-md5-no-ts": NOP + NOP + MD5SIG + mss() + NOP + NOP + SOK + NOP + ws(7),
    "tfo-16-byte-cookie": mss() + SOK + ts() + NOP + ws(7) + fastopen(COOKIE16) + NOP + NOP,
    "ts-after-eol": mss() + NOP + ws(7) + fastopen(COOKIE16) + EOL + ts() + NOP * 3,
    "40-bytes-no-ts": mss() + SOK + NOP + ws(7) + fastopen(COOKIE16) + MP_CAPABLE_V1 + NOP * 8,
}


@pytest.mark.parametrize("options", NO_ROOM.values(), ids=NO_ROOM.keys())
def test_syn_without_room_even_without_timestamps_passes_unmarked(marker, options):
    assert_untouched(marker, syn_with_options(options), "no_room")


@pytest.mark.parametrize(
    "layout", [x for x in LAYOUTS if x.expect == "make_room"], ids=lambda x: x.name
)
@pytest.mark.parametrize("where", ["v4", "v6", "v4-vlan", "v6-2vlans"])
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 100, 1000, 1400])
def test_make_room_byte_for_byte(marker, layout, where, size):
    """Timestamps removed, the rest kept in order, NOP padding, the token,
    then the payload (TCP Fast Open data) moved by the net growth of the
    header, which is less than 16 here: lengths and checksums recomputed
    independently."""
    dst = "2001:db8:100::5" if where.startswith("v6") else "198.51.100.7"
    vlans = 2 if "2vlans" in where else 1 if "vlan" in where else 0
    payload = bytes((i * 13 + size) & 0xFF for i in range(size))
    before = syn_with_options(layout.options, dst=dst, vlans=vlans, payload=payload)
    after = assert_marked(marker, before, "marked_payload" if size else "marked", room=True)
    b, a = parse(before), parse(after)
    kept = option_list(a.options)
    assert kept[:-1] == [o for o in option_list(b.options) if o[0] != 8]
    assert token.find_options(kept[-1]) == [kept[-1]]
    assert 0 < a.tcp_len - b.tcp_len < 16 and a.payload == payload


def test_make_room_off_leaves_the_syn_as_it_was(tmp_path):
    with Marker.load() as m:
        m.configure(make_config(tmp_path, "[option]\nmake_room = false\n" + POLICIES))
        for layout in (x for x in LAYOUTS if x.expect == "make_room"):
            assert_untouched(m, syn_with_options(layout.options), "no_room")
        assert_marked(m, syn(options=options_of_len(24)))


def test_static_token_makes_room_too(marker):
    # 36 bytes of options: the 12-byte static token needs Timestamps gone
    before = syn(dst="192.0.2.200", dport=22, options=options_of_len(36))
    after, counted = delta(marker, lambda: run(marker, before))
    assert counted == {"marked": 1, "room_from_ts": 1}
    option = token.encode_static(253, 0x6E74, 0x1122334455667788)
    assert normalize_zero(after) == normalize_zero(rebuild_with_option(before, option))


def test_make_room_event_says_so(marker):
    events: list[MarkEvent] = []
    with marker.events(events.append) as rb:
        rb.consume()
        events.clear()
        run(marker, syn_with_options(LAYOUTS[4].options))
        run(marker, syn())
        assert rb.consume() == 2
    assert [e.room_from_ts for e in events] == [True, False]


def test_static_token_fits_where_mac_does_not(marker):
    before = syn(dst="192.0.2.200", dport=22, options=options_of_len(28))
    after, counted = delta(marker, lambda: run(marker, before))
    assert counted == {"marked": 1}
    option = token.encode_static(253, 0x6E74, 0x1122334455667788)
    assert normalize_zero(after) == normalize_zero(rebuild_with_option(before, option))
    assert parse(after).tcp_len == 60


def test_ipv4_header_with_options(marker):
    from scapy.layers.inet import IPOption_NOP, IPOption_RR

    before = syn(ip_opts=[IPOption_RR(routers=["10.0.0.1"]), IPOption_NOP()])
    assert parse(before).ihl > 20
    assert_marked(marker, before)


def test_ipv6_syn(marker):
    assert_marked(marker, syn(dst="2001:db8:100::5", dport=7050, options=options_of_len(20)))


@pytest.mark.parametrize("vlans", [1, 2])
def test_vlan_tagged_syn(marker, vlans):
    assert_marked(marker, syn(vlans=vlans, options=options_of_len(20)))
    assert_marked(marker, syn(dst="2001:db8:100::5", vlans=vlans))


@pytest.mark.parametrize(
    "ext",
    [IPv6ExtHdrHopByHop(), IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting()],
    ids=["hbh", "hbh-do", "routing"],
)
def test_ipv6_syn_behind_extension_headers_is_marked(marker, ext):
    # The guard skips these headers to reach TCP: a SYN behind them that the
    # marker left alone would be dropped as `missing`.
    before = bytes(
        Ether(src=SRC_MAC, dst=DST_MAC)
        / IPv6(src="2001:db8:1::1", dst="2001:db8:100::5")
        / ext
        / TCP(sport=40000, dport=443, flags="S", options=options_of_len(20))
    )
    assert parse(before).l4 > parse(before).l3 + 40
    assert_marked(marker, before)


@pytest.mark.parametrize("depth", [1, 4, 5, 8, layout.MAX_IP6_EXT])
def test_ipv6_syn_behind_chains_within_the_walk_is_marked(marker, depth):
    before = bytes(
        Ether(src=SRC_MAC, dst=DST_MAC)
        / IPv6(src="2001:db8:1::1", dst="2001:db8:100::5")
        / ext_chain(depth, seed=depth)
        / TCP(sport=40000, dport=443, flags="S", options=options_of_len(20))
    )
    assert_marked(marker, before)


def test_ipv6_syn_behind_longer_chains_or_ah_is_left_alone(marker):
    def v6(ext, nh=None):
        l3 = IPv6(src="2001:db8:1::1", dst="2001:db8:100::5") / ext
        if nh is not None:
            l3.lastlayer().nh = nh
        return Ether(src=SRC_MAC, dst=DST_MAC) / l3

    tcp = bytes(TCP(sport=40000, dport=443, flags="S", options=options_of_len(20)))
    longer = v6(ext_chain(layout.MAX_IP6_EXT + 1)) / TCP(sport=40000, dport=443, flags="S")
    assert_untouched(marker, bytes(longer), "ipv6_ext")
    # AH's integrity check covers the TCP header: editing it would break the
    # connection, so the SYN goes out unmarked.
    ah = bytes([6, 4, 0, 0]) + bytes(8) + b"\xaa" * 12
    assert_untouched(marker, bytes(v6(IPv6ExtHdrHopByHop(), nh=51) / (ah + tcp)), "ipv6_ext")


def test_eol_in_options_becomes_nops_so_the_token_is_seen(marker):
    before = syn(options=[("MSS", 1460), ("EOL", None)])
    assert parse(before).options[4] == 0
    after = assert_marked(marker, before)
    assert len(token.find_options(parse(after).options)) == 1


@pytest.mark.parametrize("size", [1, 15, 16, 17, 100, 1000, 1400])
def test_syn_payload_moves_behind_the_option_intact(marker, size):
    payload = bytes((i * 7 + size) & 0xFF for i in range(size))
    assert_marked(marker, syn(options=options_of_len(20), payload=payload), "marked_payload")
    assert_marked(marker, syn(dst="2001:db8:100::9", payload=payload), "marked_payload")


def test_most_specific_prefix_then_port(marker):
    # /26 only lists 8443; 443 falls through to the covering /24 policy.
    assert_marked(marker, syn(dst="198.51.100.70", dport=8443))
    assert_marked(marker, syn(dst="198.51.100.70", dport=443))
    assert_untouched(marker, syn(dst="198.51.100.70", dport=22), "no_policy")


@pytest.mark.parametrize(
    "data,reason",
    [
        (syn(flags="SA"), "not_syn"),
        (syn(flags="A", payload=b"x" * 1000), "not_syn"),
        (syn(flags="R"), "not_syn"),
        (syn(flags="F"), "not_syn"),
        (syn(dst="203.0.113.9"), "no_policy"),
        (syn(dport=22), "no_policy"),
        (syn(dst="2001:db8:200::1"), "no_policy"),
        (
            bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IP(dst="198.51.100.7") / UDP(dport=443)),
            "not_tcp",
        ),
        (bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IP(dst="198.51.100.7") / ICMP()), "not_tcp"),
        (bytes(Ether(src=SRC_MAC, dst=DST_MAC) / ARP(pdst="198.51.100.7")), "not_ipv4_or_6"),
        (
            bytes(
                Ether(src=SRC_MAC, dst=DST_MAC)
                / IP(dst="198.51.100.7", flags="MF")
                / TCP(dport=443, flags="S")
            ),
            "fragment",
        ),
        (
            bytes(
                Ether(src=SRC_MAC, dst=DST_MAC)
                / IP(dst="198.51.100.7", frag=100, proto=6)
                / (b"\0" * 40)
            ),
            "fragment",
        ),
        (
            bytes(
                Ether(src=SRC_MAC, dst=DST_MAC)
                / IPv6(dst="2001:db8:100::1")
                / IPv6ExtHdrFragment()
                / TCP(dport=443, flags="S")
            ),
            "fragment",
        ),
        (
            bytes(
                Ether(src=SRC_MAC, dst=DST_MAC) / IPv6(dst="2001:db8:100::1", nh=51) / (b"\0" * 40)
            ),
            "ipv6_ext",
        ),
    ],
    ids=[
        "syn-ack",
        "ack-1000",
        "rst",
        "fin",
        "v4-no-policy",
        "port-no-policy",
        "v6-no-policy",
        "udp",
        "icmp",
        "arp",
        "v4-first-fragment",
        "v4-later-fragment",
        "v6-fragment",
        "v6-ah",
    ],
)
def test_non_targets_pass_byte_identical(marker, data, reason):
    assert_untouched(marker, data, reason)


@pytest.mark.parametrize("family", ["v4", "v6", "v4-vlan"])
def test_truncated_at_every_layer_passes_untouched(marker, family):
    dst = "2001:db8:100::5" if family == "v6" else "198.51.100.7"
    full = syn(dst=dst, options=options_of_len(20), vlans=1 if family == "v4-vlan" else 0)
    p = parse(full)
    min_l3 = 20 if p.family == 4 else 40
    for cut in range(14, len(full)):
        data = full[:cut]
        try:
            after = run(marker, data)
        except BPFError as e:
            # test_run itself refuses an IP ethertype without a whole IP
            # header; the parser checks it anyway for the real datapath.
            assert e.errno == errno.EINVAL and cut < p.l3 + min_l3, cut
            continue
        assert after == data, f"truncated to {cut} bytes was modified"


def test_bogus_doff_passes_untouched(marker):
    good = bytearray(syn(options=options_of_len(20)))
    p = parse(bytes(good))
    for doff in (0, 4, 15):
        bad = bytearray(good)
        bad[p.l4 + 12] = doff << 4
        assert_untouched(marker, bytes(bad), "malformed")


def test_malformed_options_pass_untouched(marker):
    good = syn(options=options_of_len(20))
    p = parse(good)
    for opts in (b"\x02\x00\x05\xb4", b"\x02\x30\x05\xb4", b"\x01\x01\x01\x08"):
        bad = bytearray(good)
        bad[p.l4 + 20 : p.l4 + 24] = opts
        assert_untouched(marker, bytes(bad), "malformed")


def test_ip_length_beyond_packet_is_malformed(marker):
    data = bytearray(syn())
    p = parse(bytes(data))
    struct.pack_into("!H", data, p.l3 + 2, p.ip_end - p.l3 + 10)
    assert_untouched(marker, bytes(data), "malformed")


def test_trailing_padding_is_dropped_not_shifted(marker):
    # Ethernet padding after the IP packet is not part of the segment.
    before = syn()
    after, counted = delta(marker, lambda: run(marker, before + b"\0" * 6))
    assert counted == {"marked": 1}
    assert normalize_zero(after) == normalize_zero(expected_marked(before, after, TEST_KEY))


def test_every_syn_carries_a_fresh_nonce(marker):
    nonces = {
        token.decode(token.find_options(parse(run(marker, syn())).options)[0]).nonce
        for _ in range(50)
    }
    assert len(nonces) == 50


def test_event_per_marked_syn_matches_the_wire(marker):
    events: list[MarkEvent] = []
    with marker.events(events.append) as rb:
        rb.consume()
        events.clear()
        after = run(marker, syn(src="192.0.2.33", sport=41000, dport=7001))
        assert rb.consume() == 1
    (e,) = events
    opt = token.decode(token.find_options(parse(after).options)[0])
    assert (e.saddr, e.daddr, e.sport, e.dport) == ("192.0.2.33", "198.51.100.7", 41000, 7001)
    assert (e.family, e.mode, e.key_id, e.reason) == (4, "mac", 1, "marked")
    assert e.nonce == opt.nonce and e.tag == opt.tag and e.epoch & 0xFF == opt.epoch_low
    assert e.epoch == token.expand_epoch(opt.epoch_low, token.epoch_now(30))
    assert e.policy == 0


def test_unknown_key_counts_no_key(tmp_path):
    with Marker.load() as m:
        cfg = make_config(tmp_path, POLICIES)
        m.configure(cfg)
        m.maps["nt_keys"].update((1).to_bytes(4, "little"), bytes(layout.NtKey()))
        assert_untouched(m, syn(), "no_key")


# ------------------------------------------------- checksums the marker cannot classify


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _check_error(raw: bytes) -> int:
    """How far the TCP checksum field is from right (ones' complement)."""
    p = parse(raw)
    pseudo = p.saddr + p.daddr + struct.pack("!HH", 6, len(p.tcp))
    return _fold(inet_sum(pseudo + p.tcp))  # 0xFFFF when right


def test_a_wrong_checksum_stays_exactly_as_wrong(marker):
    """The marker edits the checksum field in place when it can tell what it
    holds; one that is neither a checksum nor a pseudo-header seed goes to
    the kernel's incremental update, which keeps the error as it was."""
    data = bytearray(syn())
    p = parse(bytes(data))
    struct.pack_into("!H", data, p.l4 + 16, struct.unpack_from("!H", data, p.l4 + 16)[0] ^ 0x0101)
    err = _check_error(bytes(data))
    assert err != 0xFFFF
    after, counted = delta(marker, lambda: run(marker, bytes(data)))
    assert counted == {"marked": 1}
    assert parse(after).ip_checksum_ok()
    assert _check_error(after) == err


def test_a_checksum_that_is_also_a_seed_is_left_to_the_kernel(marker):
    """One SYN in 65536 has a right checksum equal to its pseudo-header sum
    (what the field holds under CHECKSUM_PARTIAL): neither reading can be
    ruled out, so the marker leaves the field to bpf_l4_csum_replace()."""
    data = bytearray(syn())
    p = parse(bytes(data))
    pseudo = _fold(inet_sum(p.saddr + p.daddr + struct.pack("!HH", 6, len(p.tcp))))
    struct.pack_into("!H", data, p.l4 + 16, pseudo)  # the field reads as a seed...
    struct.pack_into("!H", data, p.l4 + 18, 0)
    rest = _fold(
        inet_sum(
            p.saddr + p.daddr + struct.pack("!HH", 6, len(p.tcp)) + bytes(data[p.l4 : p.ip_end])
        )
    )
    struct.pack_into("!H", data, p.l4 + 18, 0xFFFF - rest)  # ...and the segment verifies
    assert _check_error(bytes(data)) == 0xFFFF
    after = assert_marked(marker, bytes(data))
    assert parse(after).tcp_checksum_ok()


# ------------------------------------------------------------------- configuration


def test_a_new_config_is_seen_at_once_by_a_destination_looked_up_before(tmp_path):
    """The marker keeps what it looked up per destination until the next
    configure(): a policy removed or added takes effect with the next SYN."""
    with Marker.load() as m:
        m.configure(make_config(tmp_path, POLICIES))
        assert_marked(m, syn(dport=443))
        m.configure(make_config(tmp_path, POLICIES.replace("ports = [80, 443,", "ports = [80,")))
        assert_untouched(m, syn(dport=443), "no_policy")
        m.configure(make_config(tmp_path, POLICIES))
        assert_marked(m, syn(dport=443))


# ------------------------------------------------------------------- events


def test_events_are_written_only_while_a_reader_listens(tmp_path):
    with Marker.load() as m:
        m.configure(make_config(tmp_path, POLICIES))
        run(m, syn())
        events: list[MarkEvent] = []
        with m.events(events.append) as rb:
            assert rb.consume() == 0  # nothing was queued while nobody listened
            run(m, syn())
            assert rb.consume() == 1
            # A reader that stopped: its deadline passed, the marker writes
            # nothing and clears it.
            listen = m.prog.map("nt_listen")
            assert listen is not None
            with listen:
                listen.update(
                    (0).to_bytes(4, "little"), (time.monotonic_ns() - 10**9).to_bytes(8, "little")
                )
                run(m, syn())
                assert listen.lookup((0).to_bytes(4, "little")) == bytes(8)
            assert rb.consume() == 0
        assert len(events) == 1
        assert m.stats()["marked"] == 3


def _well_framed(opts: bytes) -> bool:
    """Whether a receiver can walk OPTS (the reference's walk, token.find_options)."""
    try:
        token.find_options(opts)
    except token.MalformedOption:
        return False
    return True


def test_options_around_the_linux_syn_layout(marker):
    """Linux's own SYN options (which the guard recognises by three masked
    loads) with every bit of them and of what follows flipped: the marker
    marks exactly the SYNs whose option list is sound."""
    rng = random.Random(3)
    prefix = LINUX_SYN_OPTS_RAW
    tails = [b"", b"\x01" * 4, b"\x00\x05\x06\x07", b"\x02\x00\x05\xb4", b"\x22\x05\x01\x02"]
    cases = [prefix + t for t in tails]
    for _ in range(rounds(300)):
        raw = bytearray(prefix + rng.choice(tails))
        bit = rng.randrange(len(raw) * 8)
        raw[bit // 8] ^= 1 << (bit % 8)
        cases.append(bytes(raw))
    for raw in cases:
        before = syn_with_options(raw)
        assert parse(before).options == raw
        if not _well_framed(raw):
            assert_untouched(marker, before, "malformed")
        else:
            assert_marked(marker, before)
