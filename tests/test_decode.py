"""`netoken decode` against the real programs: what the marker writes decodes
and verifies, the decoder's verdicts are the guard's, and a real `tcpdump -i
any` capture behind an attached marker (the decoder alone: tests/unit)."""

from __future__ import annotations

import struct
import subprocess

import pytest

from netoken import config as nconfig
from netoken import layout, token
from netoken.decode import decode_capture
from netoken.guard import Guard
from netoken.marker import Marker
from netoken.netns import netns

from .conftest import build_topology
from .e2e import connect, server
from .pkt import LINUX_SYN_OPTS, ext_chain, inet_sum, parse, syn
from .unit.test_decode import CONFIG, ELSEWHERE, _scapy_pcap
from .verdicts import (
    KEY2,
    KEY3,
    MON,
    STATIC,
    V4,
    V6,
    mac_option,
    marked,
    steady_epoch,
    verdict,
    write_config,
)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> nconfig.Config:
    return write_config(tmp_path_factory.mktemp("decode"), CONFIG)


def test_marker_output_decodes_and_verifies(tmp_path, cfg):
    steady_epoch()
    with Marker.load() as m:
        m.configure(cfg)
        out = [
            m.prog.test_run(syn(dst=d, dport=443, options=LINUX_SYN_OPTS)).data_out
            for d in (V4, V6)
        ]
    path = tmp_path / "marker.pcap"
    _scapy_pcap(path, out)
    got = decode_capture(path, cfg)
    assert [r["verdict"] for r in got] == ["ok", "ok"]
    assert all(r["key_id"] == 1 and r["epoch_offset"] == 0 and r["protect"] == 1 for r in got)
    assert all(r["action"] == "pass" for r in got)


# ---------------------------------------------------------------- verdicts


def verdict_frames(epoch: int) -> list[bytes]:
    ok = marked(epoch=epoch)
    opt = mac_option(epoch=epoch)
    flipped = opt[:-1] + bytes([opt[-1] ^ 1])
    return [
        ok,
        ok,  # replay
        marked(V6, 7000, epoch=epoch),
        syn(options=LINUX_SYN_OPTS),  # missing
        marked(option=opt + mac_option(epoch=epoch), before=[]),  # two options: malformed
        marked(option=flipped),  # bad_tag
        marked(epoch=epoch - 3),  # stale
        marked(key=KEY3, key_id=3, epoch=epoch),  # unknown_key here
        marked(key=KEY2, key_id=2, bind=token.BIND_SADDR, epoch=epoch),  # ok, bound
        marked(
            option=mac_option(
                key=KEY2, key_id=2, bind=token.BIND_SADDR, epoch=epoch, src="10.9.9.9"
            )
        ),  # source NATed since
        marked(option=token.encode_static(253, 0x6E74, STATIC)),
        marked(option=token.encode_static(253, 0x6E74, STATIC + 1)),
        marked(dport=8080, epoch=epoch),  # port not protected
        marked(ELSEWHERE, epoch=epoch),  # prefix not protected
        marked(MON, 80, epoch=epoch),
        syn(dst=MON, dport=80),  # monitor entry
        first_fragment(marked(epoch=epoch)),  # fragment, any port
        first_fragment(marked(ELSEWHERE, epoch=epoch)),  # fragment_passed
        marked(
            V6,
            443,
            before=[],
            epoch=epoch,  # deeper than the walk
            ext=ext_chain(layout.MAX_IP6_EXT + 1),
        ),
    ]


def first_fragment(frame: bytes) -> bytes:
    """FRAME's IPv4 packet with MF set: a first fragment that shows the whole
    SYN, as the decoder needs to list it."""
    raw = bytearray(frame)
    p = parse(frame)
    raw[p.l3 + 6] |= 0x20
    raw[p.l3 + 10 : p.l3 + 12] = b"\0\0"
    csum = 0xFFFF - inet_sum(bytes(raw[p.l3 : p.l4]))
    raw[p.l3 + 10 : p.l3 + 12] = csum.to_bytes(2, "big")
    return bytes(raw)


def test_verdicts_agree_with_the_guard(tmp_path, cfg):
    frames = verdict_frames(steady_epoch())
    with Guard.load(replay_cache=cfg.guard.replay_cache) as g:
        g.configure(cfg)
        want = [verdict(g, f) for f in frames]
    path = tmp_path / "verdicts.pcap"
    _scapy_pcap(path, frames)
    got = decode_capture(path, cfg)
    assert (
        [r["verdict"] for r in got]
        == want
        == [
            "ok",
            "replay",
            "ok",
            "missing",
            "malformed",
            "bad_tag",
            "stale",
            "unknown_key",
            "ok",
            "bad_tag",
            "ok",
            "bad_tag",
            "unprotected",
            "unprotected",
            "ok",
            "missing",
            "fragment",
            "fragment_passed",
            "ipv6_ext",
        ]
    )
    # the list above must really cover every verdict (bad_header is for
    # packets cut before the TCP flags, which the decoder cannot call SYNs),
    # or this proves less
    assert set(layout.GUARD_VERDICTS) - {"bad_header"} | {"unprotected"} <= set(want)
    actions = [r["action"] for r in got]
    assert actions[0] == "pass" and actions[1] == "drop" and actions[-4] == "monitor"
    assert actions[-3:] == ["drop", "pass", "drop"]
    assert got[6]["epoch_offset"] == -3
    assert [r["protect"] for r in got[-7:]] == [None, None, 2, 2, 1, None, 1]


# ---------------------------------------------------------------- real capture


def test_real_marked_connections_captured_with_tcpdump_any(lab, tmp_path):
    """A real capture: `tcpdump -i any` (LINUX_SLL2) behind the real marker."""
    t = build_topology(lab)
    body = CONFIG.replace("198.51.100.0/24", "198.18.1.0/24").replace(
        '"2001:db8:100::/64"', '"fd6e:7400:1::/64"'
    )
    cfg = write_config(tmp_path, body)
    pcap = tmp_path / "any.pcap"
    with server(t.server, 443), netns(t.client), Marker.load() as m:
        m.configure(cfg)
        m.attach(t.client_if)
        # -c: tcpdump exits once it has written the SYNs; stopping an "any"
        # capture with a signal instead sometimes loses its last packets.
        dump = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                t.server,
                "tcpdump",
                "-i",
                "any",
                "-n",
                "-U",
                "--immediate-mode",
                "-c",
                "3",
                "-w",
                str(pcap),
                "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while "listening" not in (line := dump.stderr.readline()):
                assert line, "tcpdump did not start"
            for _ in range(3):
                assert connect(t.client, t.server_ip, 443).endswith(b"ok")
            assert dump.wait(timeout=10) == 0
        finally:
            if dump.poll() is None:
                dump.kill()
                dump.wait()
    head = pcap.read_bytes()[:24]
    assert struct.unpack("<I", head[20:24])[0] == 276  # LINUX_SLL2
    got = decode_capture(pcap, cfg)
    assert [r["verdict"] for r in got] == ["ok"] * 3
    assert len({r["nonce"] for r in got}) == 3
