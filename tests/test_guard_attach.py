"""Guard.attach/detach on real veths: modes, replacement, and other people's XDP."""

from __future__ import annotations

import pytest

from netoken import libbpf as lb
from netoken.datapath import object_path
from netoken.guard import Guard, GuardError, attached, detach
from netoken.netns import netns

from .conftest import run
from .test_guard_datapath import GUARD
from .verdicts import write_config


@pytest.fixture
def veth(lab):
    """(namespace, interface) of one end of a veth pair, with IPv4 on both ends."""
    a, b = lab.ns("ga"), lab.ns("gb")
    ia, ib = lab.link(a, b)
    lab.addr(a, ia, "198.18.9.1/24")
    lab.addr(b, ib, "198.18.9.2/24")
    return a, ia, b


@pytest.fixture
def guard(tmp_path):
    g = Guard.load(replay_cache=4096)
    g.configure(write_config(tmp_path, GUARD))
    yield g
    g.close()


def test_attach_picks_native_on_veth_and_detach_removes_it(veth, guard):
    ns, ifname, _ = veth
    with netns(ns):
        a = guard.attach(ifname)
        assert (a.mode, a.prog_id) == ("native", guard.prog.id)
        assert attached(ifname) == a
        assert guard.attach(ifname) == a  # again: nothing to do
        assert detach(ifname) is True
        assert attached(ifname) is None
        assert detach(ifname) is False


def test_attached_guard_sees_traffic(veth, guard):
    ns, ifname, peer = veth
    with netns(ns):
        guard.attach(ifname, mode="generic")
    run("ping", "-c", "2", "-i", "0.2", "-W", "1", "198.18.9.1", ns=peer)
    s = guard.stats()
    assert s["not_tcp"] >= 2


def test_forced_generic_and_mode_switch(veth, guard, tmp_path):
    ns, ifname, _ = veth
    with netns(ns):
        assert guard.attach(ifname, mode="generic").mode == "generic"
        with Guard.load(replay_cache=4096) as g2:
            g2.configure(write_config(tmp_path, GUARD))
            # a newer guard replaces ours in place, keeping the mode
            a = g2.attach(ifname)
            assert (a.mode, a.prog_id) == ("generic", g2.prog.id)
            a = g2.attach(ifname, mode="native")
            assert (a.mode, a.prog_id) == ("native", g2.prog.id)
            info = lb.xdp_query(a.ifindex)
            assert info.skb_prog_id == 0 and info.drv_prog_id == g2.prog.id
            assert detach(ifname)


def test_native_mode_without_driver_support_is_one_line(lab, guard):
    ns = lab.ns("gl")
    with netns(ns), pytest.raises(GuardError) as e:
        guard.attach("lo", mode="native")
    assert "\n" not in str(e.value) and "native" in str(e.value)


def test_foreign_xdp_program_is_never_replaced_or_removed(veth, guard):
    ns, ifname, _ = veth
    with lb.BpfObject.open(object_path("empty")) as obj:
        obj.load()
        foreign = obj.program("netoken_empty_xdp")
        with netns(ns):
            idx = guard.attach(ifname).ifindex
            detach(ifname)
            lb.xdp_attach(idx, foreign, lb.XDP_FLAGS_SKB_MODE)
            try:
                with pytest.raises(GuardError) as e:
                    guard.attach(ifname)
                msg = str(e.value)
                assert (
                    "\n" not in msg
                    and "netoken_empty_x" in msg
                    and "not installed by netoken" in msg
                )
                with pytest.raises(GuardError):
                    detach(ifname)
                assert attached(ifname) is None
                assert lb.xdp_query(idx).skb_prog_id == foreign.id
            finally:
                lb.xdp_detach(idx, lb.XDP_FLAGS_SKB_MODE)
