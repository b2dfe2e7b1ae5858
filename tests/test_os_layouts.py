"""SYN option layouts of real operating systems (tests/syn_layouts.py)
through the marker and then the guard, both under BPF_PROG_TEST_RUN.

Each layout is marked (making room where it has to), keeps its other options
byte for byte and in order, carries a token the Python reference verifies,
and gets `ok` from the guard; the ones with no room even without timestamps
pass the marker untouched and are dropped by the guard as `missing`.
"""

from __future__ import annotations

import pytest

from netoken import token
from netoken.guard import Guard
from netoken.marker import Marker

from .conftest import TEST_KEY
from .pkt import expected_marked, normalize_zero, parse, syn_with_options
from .syn_layouts import LAYOUTS, option_list
from .verdicts import GUARD_SECTION, V4, V6, WINDOW, run, write_config

TC_ACT_UNSPEC = 0xFFFFFFFF
XDP_DROP, XDP_PASS = 1, 2

CONFIG = (
    """
[[policy]]
name = "web"
destinations = ["198.51.100.0/24", "2001:db8:100::/64"]
ports = [443]
key = 1
"""
    + GUARD_SECTION
)


@pytest.fixture(scope="module")
def progs(tmp_path_factory):
    cfg = write_config(tmp_path_factory.mktemp("cfg"), CONFIG)
    with Marker.load() as m, Guard.load(replay_cache=cfg.guard.replay_cache) as g:
        m.configure(cfg)
        g.configure(cfg)
        yield m, g


def mark(m: Marker, frame: bytes) -> tuple[bytes, dict[str, int]]:
    before = m.stats()
    r = m.prog.test_run(frame)
    assert r.retval == TC_ACT_UNSPEC
    after = m.stats()
    return r.data_out, {k: after[k] - before[k] for k in after if after[k] != before[k]}


def outcome(m: Marker, g: Guard, layout, dst: str) -> str:
    """What happens to LAYOUT's SYN to DST: "fits", "make_room" or "no_room",
    after checking everything the outcome promises."""
    before = syn_with_options(layout.options, dst=dst)
    after, counted = mark(m, before)
    if counted == {"no_room": 1}:
        assert after == before
        ret, verdicts = run(g, after)
        assert ret == XDP_DROP and "missing" in verdicts
        return "no_room"
    room = counted == {"marked": 1, "room_from_ts": 1}
    assert room or counted == {"marked": 1}, counted
    b, a = parse(before), parse(after)
    assert a.ip_checksum_ok() and a.tcp_checksum_ok() and a.tcp_len <= 60
    assert normalize_zero(after) == normalize_zero(expected_marked(before, after, TEST_KEY))
    # every other option kept, in order, byte for byte; ours last
    kept = option_list(a.options)
    assert kept[:-1] == [o for o in option_list(b.options) if not (room and o[0] == 8)]
    assert token.decode(kept[-1]).mode == "mac"
    # the Python reference verifies the token, and so does the guard
    keys = {1: (TEST_KEY, WINDOW, 0)}
    assert token.verdict(a.options, keys, daddr=a.daddr, dport=a.dport) == "ok"
    ret, verdicts = run(g, after)
    assert ret == XDP_PASS and "ok" in verdicts, verdicts
    return "make_room" if room else "fits"


def test_real_os_syn_layouts(progs):
    m, g = progs
    got = {}
    for layout in LAYOUTS:
        for dst in (V4, V6):
            got[layout.name, dst] = outcome(m, g, layout, dst)
    want = {(x.name, dst): x.expect for x in LAYOUTS for dst in (V4, V6)}
    assert got == want
    counts = {k: sum(1 for x in LAYOUTS if x.expect == k) for k in ("fits", "make_room", "no_room")}
    # tried 23, marked 21 (7 of them by making room), no room 2
    assert (
        len(LAYOUTS),
        counts["fits"] + counts["make_room"],
        counts["make_room"],
        counts["no_room"],
    ) == (23, 21, 7, 2)
