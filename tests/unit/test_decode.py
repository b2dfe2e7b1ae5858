"""`netoken decode` on its own: captures in every format we claim, tokens from
the Python reference, fields, verdicts, errors, the table.

That its verdicts are the real guard's, on the very same frames, and that
what the real marker writes decodes, is tests/test_decode.py (kernel).
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap, wrpcapng

from netoken import config as nconfig
from netoken import decode, token
from netoken.decode import CaptureError, TruncatedCapture, decode_capture

from ..conftest import TEST_KEY
from ..pkt import LINUX_SYN_OPTS, parse, syn
from ..verdicts import (
    GUARD_SECTION,
    KEY3,
    STATIC,
    V4,
    V6,
    WINDOW,
    mac_option,
    marked,
    steady_epoch,
    write_config,
)

ELSEWHERE = "192.0.2.200"

CONFIG = (
    """
[[policy]]
name = "web"
destinations = ["198.51.100.0/24", "2001:db8:100::/64"]
key = 1
"""
    + GUARD_SECTION
)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> nconfig.Config:
    return write_config(tmp_path_factory.mktemp("decode"), CONFIG)


def write_frames(
    path: Path,
    frames: list[bytes],
    *,
    linktype: int = 1,
    endian: str = "<",
    times: list[float] | None = None,
) -> Path:
    """A classic pcap written here, for link types and byte orders scapy does not pick."""
    now = time.time()
    with open(path, "wb") as f:
        f.write(struct.pack(endian + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, linktype))
        for i, raw in enumerate(frames):
            t = times[i] if times else now
            f.write(struct.pack(endian + "IIII", int(t), int(t % 1 * 1e6), len(raw), len(raw)))
            f.write(raw)
    return path


def strip_ether(raw: bytes) -> tuple[int, bytes]:
    """(ethertype, L3 packet) of an untagged Ethernet frame."""
    return struct.unpack("!H", raw[12:14])[0], raw[14:]


# ---------------------------------------------------------------- fields


def sample_frames(epoch: int) -> tuple[list[bytes], list[bytes | None]]:
    """Frames of every shape, and the option each SYN among them carries."""
    opt4 = mac_option(V4, 443, epoch=epoch)
    opt6 = mac_option(V6, 7050, epoch=epoch)
    opt_tfo = mac_option(V4, 443, epoch=epoch, sport=40001)
    static = token.encode_static(token.DEFAULT_KIND, token.DEFAULT_EXID, STATIC)
    frames = [
        marked(option=opt4),
        marked(V6, 7050, vlans=2, option=opt6),
        marked(option=static),
        syn(options=LINUX_SYN_OPTS),  # no token
        syn(flags="SA", options=LINUX_SYN_OPTS),  # not listed
        syn(flags="R"),  # not listed
        marked(sport=40001, option=opt_tfo, payload=b"GET / HTTP/1.1\r\n\r\n"),
    ]
    return frames, [opt4, opt6, static, None, opt_tfo]


def expected_fields(raw: bytes, opt: bytes | None) -> dict:
    p = parse(raw)
    want = {
        "family": p.family,
        "sport": p.sport,
        "dport": p.dport,
        "mode": None,
        "key_id": None,
        "epoch_low": None,
        "nonce": None,
        "tag": None,
        "token": None,
    }
    if opt is not None:
        tok = token.decode(opt)
        want.update(kind=tok.kind, exid=tok.exid, mode=tok.mode)
        if tok.mode == "mac":
            want.update(
                key_id=tok.key_id, epoch_low=tok.epoch_low, nonce=tok.nonce.hex(), tag=tok.tag.hex()
            )
        else:
            want["token"] = f"0x{tok.token:016x}"
    return want


def _scapy_pcap(path: Path, frames: list[bytes]) -> None:
    wrpcap(str(path), [Ether(f) for f in frames])


def _scapy_pcapng(path: Path, frames: list[bytes]) -> None:
    wrpcapng(str(path), [Ether(f) for f in frames])


def _editcap(fmt: str):
    def write(path: Path, frames: list[bytes]) -> None:
        src = path.with_suffix(".src.pcap")
        _scapy_pcap(src, frames)
        subprocess.run(["editcap", "-F", fmt, str(src), str(path)], check=True, capture_output=True)

    return write


def _big_endian(path: Path, frames: list[bytes]) -> None:
    write_frames(path, frames, endian=">")


WRITERS = {
    "pcap": _scapy_pcap,
    "pcapng": _scapy_pcapng,
    "pcap-nsec-editcap": _editcap("nsecpcap"),
    "pcapng-editcap": _editcap("pcapng"),
    "pcap-big-endian": _big_endian,
}


@pytest.mark.parametrize("fmt", WRITERS)
def test_every_syn_is_listed_with_its_option(tmp_path, fmt):
    frames, options = sample_frames(steady_epoch())
    path = tmp_path / f"c.{fmt}"
    WRITERS[fmt](path, frames)
    got = decode_capture(path)
    syns = [f for f in frames if parse(f).raw[parse(f).l4 + 13] & 0x12 == 0x02]
    assert [r["packet"] for r in got] == [1, 2, 3, 4, 7]
    for rec, raw, opt in zip(got, syns, options, strict=True):
        assert set(rec) == set(decode.FIELDS)
        for k, v in expected_fields(raw, opt).items():
            assert rec[k] == v, (fmt, rec["packet"], k)
        assert rec["verdict"] is None and rec["problem"] is None
        assert abs(rec["time"] - time.time()) < 60
    assert got[1]["src"] == "2001:db8:1::1" and got[1]["dst"] == V6


# ---------------------------------------------------------------- verdicts


def test_without_guard_section_every_key_and_policy_token_verifies(tmp_path):
    body = CONFIG.split("[guard]")[0] + (
        '\n[[policy]]\nname = "legacy"\ndestinations = ["192.0.2.0/24"]\n'
        'mode = "static"\ntoken = "0x1122334455667788"\n'
    )
    cfg = write_config(tmp_path, body)
    e = steady_epoch()
    frames = [
        marked(ELSEWHERE, 22, epoch=e),
        marked(key=KEY3, key_id=3, epoch=e),
        marked(option=token.encode_static(253, 0x6E74, STATIC)),
        syn(),
    ]
    got = decode_capture(write_frames(tmp_path / "c.pcap", frames), cfg)
    assert [r["verdict"] for r in got] == ["ok", "ok", "ok", "missing"]
    assert all(r["action"] is None and r["protect"] is None for r in got)


def test_the_epoch_is_judged_at_capture_time(tmp_path, cfg):
    day_ago = time.time() - 86400
    epoch = token.epoch_now(WINDOW, day_ago)
    path = write_frames(tmp_path / "old.pcap", [marked(epoch=epoch)], times=[day_ago])
    (then,) = decode_capture(path, cfg)
    assert then["verdict"] == "ok" and then["epoch_offset"] == 0
    (now,) = decode_capture(path, cfg, now=time.time())
    assert now["verdict"] == "stale"


def test_other_kind_and_exid_follow_the_config(tmp_path):
    cfg = write_config(tmp_path, CONFIG + "\n[option]\nkind = 254\nexid = 0x1234\n")
    e = steady_epoch()
    ours = token.build_mac_option(
        TEST_KEY, key_id=1, epoch=e, daddr=V4, dport=443, kind=254, exid=0x1234
    )
    path = write_frames(tmp_path / "c.pcap", [marked(option=ours), marked(epoch=e)])
    got = decode_capture(path, cfg)
    assert [(r["kind"], r["exid"], r["verdict"]) for r in got] == [
        (254, 0x1234, "ok"),
        (None, None, "missing"),
    ]


# ---------------------------------------------------------------- link types


def sll(ethertype: int, ifindex: int = 2) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\0\0\0\0\x01\0\0", ethertype)


def sll2(ethertype: int, ifindex: int = 2) -> bytes:
    return struct.pack("!HHIHBB8s", ethertype, 0, ifindex, 1, 0, 6, b"\x02\0\0\0\0\x01\0\0")


LINK = {
    "LINUX_SLL": (113, lambda et, l3: sll(et) + l3),
    "LINUX_SLL2": (276, lambda et, l3: sll2(et) + l3),
    "RAW": (101, lambda et, l3: l3),
    "IPV4/IPV6": (None, lambda et, l3: l3),
    "NULL": (0, lambda et, l3: struct.pack("<I", 2 if et == 0x0800 else 10) + l3),
}


@pytest.mark.parametrize("name", LINK)
def test_link_types(tmp_path, cfg, name):
    linktype, wrap = LINK[name]
    e = steady_epoch()
    frames = [marked(epoch=e), marked(V6, 443, epoch=e), syn()]
    paths = []
    for i, f in enumerate(frames):
        et, l3 = strip_ether(f)
        lt = linktype if linktype is not None else (228 if et == 0x0800 else 229)
        paths.append(write_frames(tmp_path / f"{i}.pcap", [wrap(et, l3)], linktype=lt))
    got = [decode_capture(p, cfg)[0] for p in paths]
    assert [r["verdict"] for r in got] == ["ok", "ok", "missing"]
    assert [r["dst"] for r in got] == [V4, V6, V4]


def test_replay_cache_is_per_capture_interface(tmp_path, cfg):
    et, l3 = strip_ether(marked(epoch=steady_epoch()))
    # `tcpdump -i any` on a router: the same SYN in on one interface, out on another
    frames = [sll2(et, 2) + l3, sll2(et, 3) + l3, sll2(et, 2) + l3]
    got = decode_capture(write_frames(tmp_path / "any.pcap", frames, linktype=276), cfg)
    assert [r["verdict"] for r in got] == ["ok", "ok", "replay"]


def test_unsupported_link_type_is_one_line(tmp_path):
    path = write_frames(tmp_path / "wifi.pcap", [b"\0" * 40], linktype=127)
    with pytest.raises(CaptureError, match=r"packet 1: link type 127 is not supported"):
        decode_capture(path)


# ---------------------------------------------------------------- damaged input


def frame_bounds(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each record of a little-endian pcap."""
    data = path.read_bytes()
    off, out = 24, []
    while off < len(data):
        caplen = struct.unpack("<I", data[off + 8 : off + 12])[0]
        out.append((off, off + 16 + caplen))
        off += 16 + caplen
    return out


@pytest.mark.parametrize("where", ["in the record header", "in the packet data"])
def test_truncated_pcap_keeps_what_was_read(tmp_path, cfg, where, capsys):
    e = steady_epoch()
    full = write_frames(tmp_path / "full.pcap", [marked(epoch=e), syn(), marked(epoch=e)])
    start, end = frame_bounds(full)[2]
    cut = start + 7 if where == "in the record header" else end - 10
    path = tmp_path / "cut.pcap"
    path.write_bytes(full.read_bytes()[:cut])
    with pytest.raises(TruncatedCapture) as ei:
        decode_capture(path, cfg)
    assert [r["verdict"] for r in ei.value.syns] == ["ok", "missing"]
    assert ei.value.packets == 2
    assert "cut short after 2 complete packet(s)" in str(ei.value)
    assert "packet 3" in str(ei.value)

    rc = decode.run(
        argparse.Namespace(
            pcap=str(path), config=str(cfg.path), json=False, pretty=False, now=False
        )
    )
    out, err = capsys.readouterr()
    assert rc == 1
    assert len(out.splitlines()) == 5  # header, two SYNs, summary, keys and action source
    assert out.splitlines()[-1].startswith(f"keys in {cfg.path}: 1 fp ")
    assert err.count("\n") == 1 and err.startswith("netoken: ") and "Traceback" not in err


def test_truncated_pcapng(tmp_path):
    full = tmp_path / "full.pcapng"
    _scapy_pcapng(full, [syn(), syn(), syn()])
    data = full.read_bytes()
    for cut in (len(data) - 5, len(data) - 40, 30):
        path = tmp_path / "cut.pcapng"
        path.write_bytes(data[:cut])
        with pytest.raises(TruncatedCapture, match="cut short"):
            decode_capture(path)
    # a cut exactly between blocks is just a shorter capture
    ends, off = [], 0
    while off < len(data):
        off += struct.unpack("<I", data[off + 4 : off + 8])[0]
        ends.append(off)
    path.write_bytes(data[: ends[-2]])
    assert len(decode_capture(path)) == 2


def test_cut_on_a_record_boundary_is_not_an_error(tmp_path):
    full = write_frames(tmp_path / "full.pcap", [syn(), syn(), syn()])
    _, end = frame_bounds(full)[1]
    path = tmp_path / "two.pcap"
    path.write_bytes(full.read_bytes()[:end])
    assert len(decode_capture(path)) == 2


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty file, not a capture"),
        (b"hello world\n", "not a pcap or pcapng file (starts with 68 65 6c 6c)"),
        (b"\x1f\x8b\x08\x00rest", "gzip-compressed; gunzip it first"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "pcap file header cut short"),
    ],
)
def test_not_a_capture(tmp_path, content, message, capsys):
    path = tmp_path / "x.pcap"
    path.write_bytes(content)
    with pytest.raises(CaptureError) as ei:
        decode_capture(path)
    assert str(ei.value) == f"{path}: {message}" or str(ei.value).startswith(f"{path}: {message}")
    rc = decode.run(
        argparse.Namespace(pcap=str(path), config=None, json=True, pretty=False, now=False)
    )
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and err.count("\n") == 1


def test_missing_file_and_bad_config_are_one_line(tmp_path, capsys):
    assert decode.run(argparse.Namespace(pcap=str(tmp_path / "nope.pcap"), config=None)) == 1
    assert (
        capsys.readouterr().err == f"netoken: {tmp_path / 'nope.pcap'}: No such file or directory\n"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[guard]\nskew = 99\n")
    path = write_frames(tmp_path / "c.pcap", [syn()])
    assert decode.run(argparse.Namespace(pcap=str(path), config=str(bad))) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"netoken: {bad}: guard: ") and err.count("\n") == 1


def test_options_cut_by_the_snapshot_length(tmp_path, cfg):
    raw = marked(epoch=steady_epoch())
    path = write_frames(tmp_path / "snap.pcap", [raw[:64]])
    (rec,) = decode_capture(path, cfg)
    assert rec["verdict"] is None and "snapshot length" in rec["problem"]


def test_broken_tcp_header_is_malformed(tmp_path, cfg):
    raw = bytearray(marked(epoch=steady_epoch()))
    p = parse(bytes(raw))
    raw[p.l4 + 12] = 4 << 4  # data offset 16 bytes: below the fixed header
    (rec,) = decode_capture(write_frames(tmp_path / "c.pcap", [bytes(raw)]), cfg)
    assert rec["verdict"] == "malformed" and "data offset" in rec["problem"]


# ---------------------------------------------------------------- CLI


def test_table_columns_line_up_and_json_matches(tmp_path, cfg, capsys):
    e = steady_epoch()
    path = write_frames(
        tmp_path / "c.pcap",
        [
            marked(epoch=e),
            marked(V6, 7000, epoch=e),
            syn(),
            marked(option=token.encode_static(253, 0x6E74, STATIC)),
        ],
    )
    args = argparse.Namespace(
        pcap=str(path), config=str(cfg.path), json=False, pretty=False, now=False
    )
    assert decode.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rows, summary, source = lines[0], lines[1:-2], lines[-2], lines[-1]
    assert len(rows) == 4
    for col in ("SOURCE", "DESTINATION", "MODE", "VERDICT", "ACTION"):
        at = header.index(col)
        assert all(r[at - 1] == " " and r[at] != " " for r in rows), col
    assert [r[header.index("VERDICT") :].split()[0] for r in rows] == ["ok", "ok", "missing", "ok"]
    assert summary == "4 SYN(s) in 4 packet(s): ok 3, missing 1"
    # where the verdicts' keys and actions come from, without a key byte
    assert source.startswith(f"keys in {cfg.path}: 1 fp {token.key_fingerprint(TEST_KEY)}")
    assert "ACTION is what [guard]" in source and TEST_KEY.hex() not in source

    args.json = True
    assert decode.run(args) == 0
    assert json.loads(capsys.readouterr().out) == decode_capture(path, cfg)
    args.pretty = True
    assert decode.run(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("[\n  {\n") and json.loads(out) == decode_capture(path, cfg)


def test_add_arguments_fits_a_parser_that_has_json_already():
    p = argparse.ArgumentParser()
    p.add_argument("-j", "--json", action="store_true", default=argparse.SUPPRESS)
    p.add_argument("-p", "--pretty", action="store_true", default=argparse.SUPPRESS)
    decode.add_arguments(p)
    args = p.parse_args(["x.pcap", "-c", "n.toml", "--now", "-j"])
    assert (args.pcap, args.config, args.now, args.json) == ("x.pcap", "n.toml", True, True)
    alone = argparse.ArgumentParser()
    decode.add_arguments(alone)
    assert alone.parse_args(["x.pcap"]).json is False


def test_python_m_entry_point(tmp_path):
    path = write_frames(tmp_path / "c.pcap", [syn()])
    r = subprocess.run(
        [sys.executable, "-m", "netoken.decode", str(path), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert [x["dst"] for x in json.loads(r.stdout)] == [V4]
