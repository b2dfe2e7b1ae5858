"""netoken.libbpf against the running kernel (needs root, clang-19, iproute2)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from netoken import libbpf as lb

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_BPF/CAP_NET_ADMIN)"),
    pytest.mark.skipif(shutil.which("clang-19") is None, reason="needs clang-19"),
]

BPF_SRC = r"""
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u64);
} arr SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} pcpu SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, __u32);
    __type(value, __u32);
} hmap SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 4096);
} events SEC(".maps");

struct event {
    __u32 len;
    __u32 magic;
};

SEC("tc")
int count_tc(struct __sk_buff *skb)
{
    __u32 k = 0;
    __u64 *v = bpf_map_lookup_elem(&pcpu, &k);
    if (v)
        *v += 1;
    struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (e) {
        e->len = skb->len;
        e->magic = 0xfeedbeef;
        bpf_ringbuf_submit(e, 0);
    }
    return TC_ACT_OK;
}

SEC("xdp")
int pass_xdp(struct xdp_md *ctx)
{
    return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
"""

# Reads packet data without a bounds check: the verifier must reject it.
BAD_SRC = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("tc")
int oob_read(struct __sk_buff *skb)
{
    unsigned char *data = (void *)(long)skb->data;
    return data[100];
}

char LICENSE[] SEC("license") = "GPL";
"""

# Ethernet + IPv4 + UDP, 60 bytes; content is irrelevant to the programs.
PACKET = (
    bytes.fromhex("0200000000020200000000010800")
    + bytes.fromhex("4500002e00000000401100000a0000010a000002")
    + bytes.fromhex("303930390000001a0000")
    + bytes(16)
)
MAGIC = 0xFEEDBEEF


def _compile(src: str, out: Path) -> Path:
    c = out.with_suffix(".c")
    c.write_text(src)
    subprocess.run(
        [
            "clang-19",
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-I/usr/include/x86_64-linux-gnu",
            "-c",
            str(c),
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def obj_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(BPF_SRC, tmp_path_factory.mktemp("bpf") / "tiny.bpf.o")


@pytest.fixture
def obj(obj_path: Path):
    with lb.BpfObject.open(obj_path) as o:
        o.load()
        yield o


@pytest.fixture
def pin_path():
    path = f"/sys/fs/bpf/nt-test-{uuid.uuid4().hex[:12]}"
    try:
        yield path
    finally:
        lb.unpin(path)


@pytest.fixture
def veth():
    name = f"nt-{uuid.uuid4().hex[:8]}"
    peer = name + "p"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer], check=True)
    try:
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        subprocess.run(["ip", "link", "set", peer, "up"], check=True)
        yield name, socket.if_nametoindex(name)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def u32(n: int) -> bytes:
    return struct.pack("=I", n)


def u64(n: int) -> bytes:
    return struct.pack("=Q", n)


# -- objects ------------------------------------------------------------------


def test_open_load_close(obj_path: Path) -> None:
    o = lb.BpfObject.open(obj_path)
    assert not o.loaded
    assert {p.name for p in o.programs} == {"count_tc", "pass_xdp"}
    assert {"arr", "pcpu", "hmap", "events"} <= {m.name for m in o.maps}
    arr = o.map("arr")
    # Map attributes are known before load (from the ELF)...
    assert (arr.type, arr.key_size, arr.value_size, arr.max_entries) == (
        lb.BPF_MAP_TYPE_ARRAY,
        4,
        8,
        4,
    )
    with pytest.raises(ValueError, match="not loaded"):
        _ = arr.fd
    o.load()
    assert o.loaded
    prog = o.program("count_tc")
    assert prog.fd >= 0 and prog.id > 0
    assert prog.type == lb.BPF_PROG_TYPE_SCHED_CLS
    assert o.program("pass_xdp").type == lb.BPF_PROG_TYPE_XDP
    assert arr.fd >= 0 and arr.id > 0
    with pytest.raises(KeyError):
        o.map("nope")
    with pytest.raises(KeyError):
        o.program("nope")
    with pytest.raises(ValueError, match="already loaded"):
        o.set_map_max_entries("hmap", 10)
    o.close()
    o.close()  # idempotent
    assert o.closed
    # ...and borrowed fds die with the object.
    with pytest.raises(ValueError, match="closed"):
        _ = arr.fd


def test_open_missing_file(tmp_path: Path) -> None:
    with pytest.raises(lb.BPFError) as ei:
        lb.BpfObject.open(tmp_path / "missing.bpf.o")
    assert ei.value.errno == 2
    assert "open bpf object" in str(ei.value) and "missing.bpf.o" in str(ei.value)


def test_set_max_entries(obj_path: Path) -> None:
    with lb.BpfObject.open(obj_path) as o:
        o.set_map_max_entries("hmap", 128)
        o.load()
        m = o.map("hmap")
        assert m.max_entries == 128
        with lb.Map.from_id(m.id) as standalone:
            assert standalone.max_entries == 128


def test_verifier_rejection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _compile(BAD_SRC, tmp_path / "bad.bpf.o")
    caplog.set_level(logging.WARNING, logger="netoken.libbpf")
    with lb.BpfObject.open(bad) as o, pytest.raises(lb.BPFError) as ei:
        o.load()
    err = ei.value
    assert err.errno == 13  # EACCES
    assert str(err).startswith("load bpf object bad.bpf.o: Permission denied")
    assert "invalid access to packet" in str(err)
    assert "BEGIN PROG LOAD LOG" in err.log
    # Also routed into logging.
    assert any("invalid access to packet" in r.getMessage() for r in caplog.records)


# -- maps ---------------------------------------------------------------------


def test_map_crud_and_iterate(obj) -> None:
    h = obj.map("hmap")
    assert not h.is_percpu
    assert list(h.keys()) == []
    for i in range(5):
        h.update(u32(i), u32(i * 10))
    assert h.lookup(u32(3)) == u32(30)
    assert h.lookup(u32(99)) is None
    assert sorted(h.keys()) == sorted(u32(i) for i in range(5))
    assert dict(h.items()) == {u32(i): u32(i * 10) for i in range(5)}
    with pytest.raises(lb.BPFError) as ei:
        h.update(u32(1), u32(0), flags=lb.BPF_NOEXIST)
    assert ei.value.errno == 17  # EEXIST
    assert h.delete(u32(3)) is True
    assert h.delete(u32(3)) is False
    assert h.lookup(u32(3)) is None
    assert len(list(h.keys())) == 4

    a = obj.map("arr")
    a.update(u32(2), u64(0xDEADBEEF))
    assert a.lookup(u32(2)) == u64(0xDEADBEEF)
    assert a.lookup(u32(0)) == u64(0)
    assert a.lookup(u32(4)) is None  # out of range
    assert len(list(a.keys())) == 4


def test_map_size_checks(obj) -> None:
    h = obj.map("hmap")
    with pytest.raises(ValueError, match="key is 2 bytes, key_size is 4"):
        h.lookup(b"ab")
    with pytest.raises(ValueError, match="value is 8 bytes, value_size is 4"):
        h.update(u32(1), u64(1))
    with pytest.raises(TypeError):
        h.lookup(4)
    with pytest.raises(TypeError, match="lookup_percpu"):
        obj.map("pcpu").lookup(u32(0))


def test_percpu(obj) -> None:
    p = obj.map("pcpu")
    assert p.is_percpu
    n = lb.num_possible_cpus()
    assert n >= 1
    vals = p.lookup_percpu(u32(0))
    assert len(vals) == n and all(v == u64(0) for v in vals)
    p.update_percpu(u32(0), [u64(i + 1) for i in range(n)])
    got = p.lookup_percpu(u32(0))
    assert sum(struct.unpack("=Q", v)[0] for v in got) == n * (n + 1) // 2
    with pytest.raises(ValueError, match="one per possible CPU"):
        p.update_percpu(u32(0), [u64(1)] * (n + 1))
    assert dict(p.items())[u32(0)] == got


def test_pin_and_reopen(obj, obj_path: Path, pin_path: str) -> None:
    a = obj.map("arr")
    a.update(u32(1), u64(42))
    a.pin(pin_path)
    assert os.path.exists(pin_path)
    with lb.Map.from_pinned(pin_path) as m:
        assert m.id == a.id
        assert (m.name, m.key_size, m.value_size, m.max_entries) == ("arr", 4, 8, 4)
        assert m.lookup(u32(1)) == u64(42)
        m.update(u32(1), u64(43))
    assert a.lookup(u32(1)) == u64(43)

    # A second object reuses the pinned map instead of creating its own.
    pinned = lb.Map.from_pinned(pin_path)
    with lb.BpfObject.open(obj_path) as o2:
        o2.reuse_map("arr", pinned)
        pinned.close()  # libbpf dup'ed the fd
        o2.load()
        assert o2.map("arr").id == a.id
        assert o2.map("arr").lookup(u32(1)) == u64(43)
        assert o2.map("hmap").id != obj.map("hmap").id

    with pytest.raises(ValueError, match="not a BPF prog"):
        lb.Program.from_pinned(pin_path)
    lb.unpin(pin_path)
    lb.unpin(pin_path)  # missing is fine
    with pytest.raises(lb.BPFError) as ei:
        lb.Map.from_pinned(pin_path)
    assert ei.value.errno == 2


def test_program_pin_and_ids(obj, pin_path: str) -> None:
    prog = obj.program("pass_xdp")
    prog.pin(pin_path)
    with lb.Program.from_pinned(pin_path) as p:
        assert p.id == prog.id
        assert p.type == lb.BPF_PROG_TYPE_XDP
        assert p.name == "pass_xdp"
    with lb.Program.from_id(prog.id) as p:
        assert p.tag == prog.tag
    fd = lb.obj_get(pin_path)
    with lb.Program.from_fd(fd) as p:
        assert p.id == prog.id
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the owning Program


# -- test_run + ring buffer ---------------------------------------------------


def _pcpu_total(obj) -> int:
    return sum(struct.unpack("=Q", v)[0] for v in obj.map("pcpu").lookup_percpu(u32(0)))


def test_test_run_and_ringbuf(obj) -> None:
    records: list[bytes] = []
    with lb.RingBuffer(obj.map("events"), records.append) as rb:
        assert rb.fileno() >= 0
        before = _pcpu_total(obj)
        res = obj.program("count_tc").test_run(PACKET, repeat=3)
        assert res.retval == 0  # TC_ACT_OK
        assert res.data_out == PACKET
        assert res.ctx_out is None
        assert _pcpu_total(obj) == before + 3
        assert rb.poll(100) == 3
        assert rb.consume() == 0
    assert records == [struct.pack("=II", len(PACKET), MAGIC)] * 3

    xdp = obj.program("pass_xdp").test_run(PACKET)
    assert xdp.retval == 2  # XDP_PASS
    assert xdp.data_out == PACKET


def test_test_runner_reuses_its_buffers(obj) -> None:
    run = obj.program("pass_xdp").test_runner(max_size=256)
    for data in (PACKET, PACKET[:60], PACKET):
        assert run(data) == (2, data)  # XDP_PASS, unchanged
    with pytest.raises(ValueError, match="256-byte test runner"):
        run(bytes(257))
    with pytest.raises(lb.BPFError) as ei:
        run(b"")  # test_run wants at least an Ethernet header
    assert ei.value.errno == 22  # EINVAL


def test_test_run_small_out_buffer(obj) -> None:
    with pytest.raises(lb.BPFError) as ei:
        obj.program("pass_xdp").test_run(PACKET, data_out_size=10)
    assert ei.value.errno == 28  # ENOSPC


def test_ringbuf_callback_exception(obj) -> None:
    seen: list[bytes] = []

    def cb(data: bytes) -> None:
        seen.append(data)
        raise RuntimeError("boom")

    with lb.RingBuffer(obj.map("events"), cb) as rb:
        obj.program("count_tc").test_run(PACKET, repeat=2)
        with pytest.raises(RuntimeError, match="boom"):
            rb.consume()
        assert len(seen) == 1
        seen.clear()
        # The failing record was consumed; the next one is still there.
        with pytest.raises(RuntimeError):
            rb.consume()
        assert len(seen) == 1
        assert rb.consume() == 0

    with pytest.raises(lb.BPFError):
        lb.RingBuffer(obj.map("arr"), seen.append)


# -- TC -----------------------------------------------------------------------


def _tc_show(dev: str) -> str:
    return subprocess.run(
        ["tc", "filter", "show", "dev", dev, "egress"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _qdiscs(dev: str) -> str:
    return subprocess.run(
        ["tc", "qdisc", "show", "dev", dev], check=True, capture_output=True, text=True
    ).stdout


def test_tc_lifecycle(obj, veth) -> None:
    dev, ifindex = veth
    prog = obj.program("count_tc")
    both = lb.BPF_TC_INGRESS | lb.BPF_TC_EGRESS
    assert lb.tc_hook_create(ifindex, lb.BPF_TC_EGRESS) is True
    try:
        assert lb.tc_hook_create(ifindex, lb.BPF_TC_EGRESS) is False
        assert "clsact" in _qdiscs(dev)
        assert lb.tc_query(ifindex, lb.BPF_TC_EGRESS, 1, 1) is None

        f = lb.tc_attach(ifindex, lb.BPF_TC_EGRESS, prog.fd, handle=1, priority=1)
        assert f == lb.TcFilter(1, 1, prog.id)
        assert lb.tc_query(ifindex, lb.BPF_TC_EGRESS, 1, 1) == prog.id
        shown = _tc_show(dev)
        assert f"id {prog.id}" in shown and "count_tc" in shown
        assert "direct-action" in shown

        # replace=True swaps the program in place; replace=False refuses.
        lb.tc_attach(ifindex, lb.BPF_TC_EGRESS, prog, handle=1, priority=1)
        with pytest.raises(lb.BPFError) as ei:
            lb.tc_attach(ifindex, lb.BPF_TC_EGRESS, prog, 1, 1, replace=False)
        assert ei.value.errno == 17

        lb.tc_detach(ifindex, lb.BPF_TC_EGRESS, 1, 1)
        assert lb.tc_query(ifindex, lb.BPF_TC_EGRESS, 1, 1) is None
        assert f"id {prog.id}" not in _tc_show(dev)
        with pytest.raises(lb.BPFError) as ei:
            lb.tc_detach(ifindex, lb.BPF_TC_EGRESS, 1, 1)
        assert "detach tc filter 1/1" in str(ei.value)
    finally:
        lb.tc_hook_destroy(ifindex, both)
    assert "clsact" not in _qdiscs(dev)


def test_tc_filter_survives_object_close(obj_path: Path, veth) -> None:
    _dev, ifindex = veth
    lb.tc_hook_create(ifindex, lb.BPF_TC_EGRESS)
    try:
        with lb.BpfObject.open(obj_path) as o:
            o.load()
            prog_id = lb.tc_attach(ifindex, lb.BPF_TC_EGRESS, o.program("count_tc"), 7, 3).prog_id
        # The kernel filter holds its own reference to the program.
        assert lb.tc_query(ifindex, lb.BPF_TC_EGRESS, 7, 3) == prog_id
        with lb.Program.from_id(prog_id) as p:
            assert p.name == "count_tc"
    finally:
        lb.tc_hook_destroy(ifindex, lb.BPF_TC_INGRESS | lb.BPF_TC_EGRESS)


# -- XDP ----------------------------------------------------------------------


def test_xdp_generic(obj, veth) -> None:
    dev, ifindex = veth
    prog = obj.program("pass_xdp")
    assert lb.xdp_query(ifindex) == lb.XdpInfo(0, 0, 0, 0, lb.XDP_ATTACHED_NONE)
    lb.xdp_attach(ifindex, prog.fd, lb.XDP_FLAGS_SKB_MODE)
    try:
        info = lb.xdp_query(ifindex)
        assert info.prog_id == prog.id
        assert info.skb_prog_id == prog.id
        assert info.drv_prog_id == 0
        assert info.attach_mode == lb.XDP_ATTACHED_SKB
        link = subprocess.run(
            ["ip", "link", "show", "dev", dev],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert "xdpgeneric" in link and f"id {prog.id}" in link

        # Refuses to clobber with UPDATE_IF_NOEXIST; replaces with old_prog_fd.
        with pytest.raises(lb.BPFError):
            lb.xdp_attach(ifindex, prog, lb.XDP_FLAGS_SKB_MODE | lb.XDP_FLAGS_UPDATE_IF_NOEXIST)
        lb.xdp_attach(ifindex, prog, lb.XDP_FLAGS_SKB_MODE, old_prog_fd=prog)
        assert lb.xdp_query(ifindex).skb_prog_id == prog.id
    finally:
        lb.xdp_detach(ifindex, lb.XDP_FLAGS_SKB_MODE)
    assert lb.xdp_query(ifindex) == lb.XdpInfo(0, 0, 0, 0, lb.XDP_ATTACHED_NONE)
