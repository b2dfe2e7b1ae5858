"""Property test: for any generated packet the marker either outputs exactly the
reference marking or leaves the packet byte-identical, and never breaks a
checksum.  Keys, option kind/ExID, bindings and flows are random too."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IPOption_NOP

from netoken import config as nconfig
from netoken import token
from netoken.marker import Marker

from .conftest import make_config
from .pkt import expected_marked, made_room, normalize_zero, parse, syn

V4_NET = ipaddress.ip_network("198.51.100.0/24")
V6_NET = ipaddress.ip_network("2001:db8:100::/64")
PORTS = (443, 8000, 8001)

# TCP Fast Open cookies (34) and MPTCP MP_JOIN (30) fill the header enough
# that the token only fits once the Timestamps option makes room.
OPT_SIZES = {
    "NOP": 1,
    "MSS": 4,
    "SAckOK": 2,
    "WScale": 3,
    "Timestamp": 10,
    "SAck": 10,
    34: 10,
    30: 12,
}
opt_items = st.sampled_from(
    [
        ("NOP", None),
        ("MSS", 1460),
        ("SAckOK", b""),
        ("WScale", 7),
        ("Timestamp", (7, 0)),
        ("SAck", (1, 2)),
        (34, bytes(range(8))),
        (30, bytes(range(16, 26))),
    ]
)
# scapy pads the list with EOL to a multiple of 4; the header holds 40 bytes
option_lists = st.lists(opt_items, max_size=12).filter(
    lambda opts: sum(OPT_SIZES[o[0]] for o in opts) <= 40
)


@pytest.fixture(scope="module")
def marker_for_props(tmp_path_factory):
    cfg = make_config(
        tmp_path_factory.mktemp("props"),
        f"""
[[policy]]
name = "p"
destinations = ["{V4_NET}", "{V6_NET}"]
ports = {list(PORTS)}
key = 1
""",
    )
    m = Marker.load()
    m.policies_cfg = cfg
    m.configure(cfg)
    yield m
    m.close()


@st.composite
def packets(draw):
    v6 = draw(st.booleans())
    inside = draw(st.booleans())
    if v6:
        host = draw(st.integers(1, 2**64 - 1))
        dst = str((V6_NET if inside else ipaddress.ip_network("2001:db8:999::/64"))[host])
        src = str(ipaddress.ip_network("2001:db8:1::/64")[draw(st.integers(1, 2**32))])
    else:
        host = draw(st.integers(1, 254))
        dst = str((V4_NET if inside else ipaddress.ip_network("203.0.113.0/24"))[host])
        src = str(ipaddress.ip_network("192.0.2.0/24")[draw(st.integers(1, 254))])
    opts = draw(option_lists)
    flags = draw(st.sampled_from(["S", "S", "S", "SA", "A", "R", "FA", "SE", "SC", "PA"]))
    kw = {}
    if not v6 and draw(st.booleans()):
        kw["ip_opts"] = [IPOption_NOP()] * draw(st.integers(1, 40))
    return syn(
        dst=dst,
        src=src,
        dport=draw(st.sampled_from(PORTS + (22,))),
        sport=draw(st.integers(1, 65535)),
        options=opts,
        flags=flags,
        payload=draw(st.binary(max_size=1500)),
        vlans=draw(st.integers(0, 2)),
        **kw,
    )


def should_mark(raw: bytes, make_room: bool) -> bool:
    p = parse(raw)
    flags = raw[p.l4 + 13]
    dst = ipaddress.ip_address(p.daddr)
    room = p.tcp_len + 16 <= 60 or (make_room and made_room(p.options, 16) is not None)
    return (
        bool(flags & 0x02)
        and not flags & 0x10
        and dst in (V4_NET if p.family == 4 else V6_NET)
        and p.dport in PORTS
        and room
    )


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pkt=packets(),
    key=st.binary(min_size=16, max_size=16),
    kind=st.sampled_from([253, 254]),
    exid=st.integers(0, 0xFFFF),
    bind=st.sampled_from([(), ("saddr",), ("sport",), ("saddr", "sport")]),
    window=st.sampled_from([1, 30, 3600]),
    make_room=st.booleans(),
)
def test_marker_output_is_reference_or_untouched(
    marker_for_props, pkt, key, kind, exid, bind, window, make_room
):
    m: Marker = marker_for_props
    cfg = m.policies_cfg
    keys = {1: nconfig.Key(id=1, file=cfg.keys[1].file, secret=key, window=window, bind=bind)}
    option = nconfig.OptionConfig(kind=kind, exid=exid, make_room=make_room)
    m.configure(nconfig.Config(cfg.path, option, keys, cfg.policies, None))

    out = m.prog.test_run(pkt).data_out
    before, after = parse(pkt), parse(out)
    if not should_mark(pkt, make_room):
        event("untouched")
        assert out == pkt
        return
    room = before.tcp_len + 16 > 60
    event(("made room, " if room else "") + ("marked with payload" if before.payload else "marked"))
    mask = sum({"saddr": token.BIND_SADDR, "sport": token.BIND_SPORT}[b] for b in bind)
    assert normalize_zero(out) == normalize_zero(
        expected_marked(pkt, out, key, exid=exid, kind=kind, window=window, bind=mask)
    )
    assert after.ip_checksum_ok() and after.tcp_checksum_ok()
    assert after.payload == before.payload and after.tcp_len <= 60
