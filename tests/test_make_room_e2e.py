"""Make room with the kernel's own clients: TCP Fast Open and MPTCP, through
the marker on the client and a dropping guard on the server.

A Linux SYN with a Fast Open cookie or an MPTCP MP_JOIN has 32 bytes of
options: the token only fits once the marker drops the Timestamps option
(design.md §3).  Each scenario runs with make_room off ("before": what a user
had until now) and on ("after"); the figures are printed (pytest -s shows
them), the assertions are about correctness only.

The Fast Open lab routes through a namespace whose egress computes TCP
checksums in software (tx off): the client's SYNs leave CHECKSUM_PARTIAL,
so the checksum the server's TCP verifies is the one the marker's
pseudo-header seed produced.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import ExitStack, contextmanager

from netoken.guard import Guard
from netoken.marker import Marker
from netoken.netns import netns

from .conftest import TEST_KEY, build_topology, make_config, run
from .e2e import capture, counters, tcp_in_csum_errors, verify_syn, wait_captured
from .pkt import parse
from .syn_layouts import option_list

PORT = 8080
REQUEST = b"GET / HTTP/1.0\r\n\r\n"
TFO_CONNECTIONS = 8
BULK = 200_000  # bytes the server sends back on each connection


def config(tmp_path, server_ip: str, make_room: bool):
    return make_config(
        tmp_path,
        f"""
[option]
make_room = {str(make_room).lower()}

[[policy]]
name = "svc"
destinations = ["{server_ip}/32"]
ports = [{PORT}]
key = 1

[guard]
action = "drop"
[[guard.protect]]
destinations = ["{server_ip}/32"]
ports = [{PORT}]
keys = [1]
""",
    )


@contextmanager
def marker_and_guard(t, cfg, client_if: str | None = None):
    """The marker on the client's egress, a dropping guard on the server's XDP."""
    with Marker.load() as m, Guard.load() as g:
        with netns(t.client):
            m.configure(cfg)
            m.attach(client_if or t.client_if)
        with netns(t.server):
            g.configure(cfg)
            g.attach(t.server_if, "native")
        yield m, g


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


class Server:
    """Accepts on a listener (Fast Open or MPTCP), reads a request, answers
    with SIZE bytes and, with HALF_CLOSE, its FIN; keeps the connection until
    the client closes it."""

    def __init__(
        self,
        ns: str,
        proto: int = 0,
        fastopen: bool = False,
        size: int = BULK,
        half_close: bool = True,
    ):
        with netns(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fastopen:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 64)
        self.sock.bind(("0.0.0.0", PORT))
        self.sock.listen(64)
        self.size, self.half_close = size, half_close
        self.requests: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                self.requests.append(conn.recv(4096))
                conn.sendall(b"x" * self.size)
                if self.half_close:
                    conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=5)


@contextmanager
def serving(*args, **kw):
    s = Server(*args, **kw)
    try:
        yield s
    finally:
        s.close()


def receive_all(s: socket.socket, size: int | None = None) -> int:
    """Read until EOF, or until SIZE bytes."""
    n = 0
    while size is None or n < size:
        chunk = s.recv(65536)
        if not chunk:
            break
        n += len(chunk)
    return n


def tfo_connection(ns: str, addr: str, probe=None) -> float:
    """One Fast Open connection (MSG_FASTOPEN: the request rides in the SYN
    once a cookie is cached); seconds until the whole answer was read."""
    with netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        # Blocking for the send (a socket with a timeout is non-blocking
        # underneath, and a Fast Open sendto() would return EINPROGRESS).
        t0 = time.monotonic()
        s.sendto(REQUEST, socket.MSG_FASTOPEN, (addr, PORT))
        s.settimeout(15)
        first = s.recv(1)
        if probe:
            probe(s)
        got = len(first) + receive_all(s)
        elapsed = time.monotonic() - t0
    assert got == BULK
    return elapsed


TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4


def tcp_options(s: socket.socket) -> dict[str, object]:
    """What the kernel negotiated for S (struct tcp_info: tcpi_options, the
    window scale nibbles, tcpi_snd_mss)."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    opts, wscale = info[5], info[6]
    return {
        "ts": bool(opts & TCPI_OPT_TIMESTAMPS),
        "sack": bool(opts & TCPI_OPT_SACK),
        "wscale": (wscale & 0xF, wscale >> 4) if opts & TCPI_OPT_WSCALE else None,
        "mss": int.from_bytes(info[16:20], "little"),
    }


def tfo_run(lab, tmp_path, make_room: bool, pcap=None) -> dict:
    t = build_topology(lab, router=True)
    run("ethtool", "-K", t.router_out, "tx", "off", ns=t.router)
    for ns in (t.client, t.server):
        run("sysctl", "-qw", "net.ipv4.tcp_fastopen=3", ns=ns)
    cfg = config(tmp_path, t.server_ip, make_room)
    negotiated: list[dict] = []
    with ExitStack() as stack:
        m, g = stack.enter_context(marker_and_guard(t, cfg))
        srv = stack.enter_context(serving(t.server, fastopen=True))
        cap = (
            stack.enter_context(capture(t.server, t.server_if, pcap, f"tcp port {PORT}"))
            if pcap
            else None
        )
        c0, s0, csum0 = counters(t.client), counters(t.server), tcp_in_csum_errors(t.server)
        times = []
        for i in range(TFO_CONNECTIONS):
            times.append(
                tfo_connection(t.client, t.server_ip, lambda s: negotiated.append(tcp_options(s)))
            )
        if cap:
            wait_captured(cap, TFO_CONNECTIONS * 6)
        c1, s1 = counters(t.client), counters(t.server)
        mstats, gstats = m.stats(), g.stats()
        requests = list(srv.requests)
    return {
        "times": times,
        "client": delta(c0, c1),
        "server": delta(s0, s1),
        "marker": mstats,
        "guard": gstats,
        "csum_errors": tcp_in_csum_errors(t.server) - csum0,
        "negotiated": negotiated,
        "requests": requests,
        "server_ip": t.server_ip,
    }


def _ms(times: list[float]) -> str:
    return " ".join(f"{x * 1000:.1f}" for x in times)


def test_tcp_fast_open_through_marker_and_dropping_guard(lab, tmp_path):
    pcap = tmp_path / "tfo.pcap"
    after = tfo_run(lab, tmp_path, make_room=True, pcap=pcap)
    lab.close()
    before = tfo_run(lab, tmp_path, make_room=False)
    print(
        f"\nTFO connection times, make_room off (ms): {_ms(before['times'])}"
        f"\n  SYN retransmits {before['client']['TcpExt.TCPSynRetrans']}, "
        f"TFO accepted {before['server']['TcpExt.TCPFastOpenPassive']}, "
        f"guard missing {before['guard']['missing']}"
        f"\nTFO connection times, make_room on (ms): {_ms(after['times'])}"
        f"\n  SYN retransmits {after['client']['TcpExt.TCPSynRetrans']}, "
        f"TFO accepted {after['server']['TcpExt.TCPFastOpenPassive']}, "
        f"room_from_ts {after['marker']['room_from_ts']}"
    )

    # Every connection completes without a SYN retransmit; the first fetched
    # the cookie, every later one carried it and its data, and the server
    # took the data from the SYN.
    n = TFO_CONNECTIONS
    assert after["client"]["TcpExt.TCPSynRetrans"] == 0
    assert after["client"]["TcpExt.TCPFastOpenActive"] == n - 1
    assert after["server"]["TcpExt.TCPFastOpenPassive"] == n - 1
    assert after["requests"] == [REQUEST] * n
    assert after["marker"]["marked_payload"] == n - 1 and after["marker"]["marked"] == 1
    assert after["marker"]["room_from_ts"] == n - 1 and after["marker"]["no_room"] == 0
    assert after["guard"]["ok"] == n and after["guard"]["missing"] == 0
    assert after["csum_errors"] == 0

    # On the wire: the cookie request (room to spare) keeps its timestamps;
    # the cookie SYNs lost only those, kept MSS, SACK-permitted, window scale
    # and the cookie in order, carry the data, and verify.
    flows = _flows(pcap)
    assert len(flows) == n
    (first_syn, *_), *later = flows
    assert 8 in _kinds(first_syn) and verify_syn(first_syn, TEST_KEY)
    for syn, *_ in later:
        p = parse(syn)
        assert _kinds(syn) == [2, 4, 3, 34, 253], _kinds(syn)
        assert p.payload == REQUEST and verify_syn(syn, TEST_KEY)

    # Without make-room the cookie SYNs had no room: dropped as missing, the
    # client got in with a retransmitted SYN a second later.
    assert before["marker"]["no_room"] >= 1 and before["guard"]["missing"] >= 1
    assert before["client"]["TcpExt.TCPSynRetrans"] >= 1


def _flows(pcap) -> list[list[bytes]]:
    """The capture's packets grouped by connection (client port), in order."""
    from scapy.utils import rdpcap

    flows: dict[int, list[bytes]] = {}
    for pkt in rdpcap(str(pcap)):
        raw = bytes(pkt)
        p = parse(raw)
        port = p.sport if p.dport == PORT else p.dport
        flows.setdefault(port, []).append(raw)
    return list(flows.values())


def _kinds(raw: bytes) -> list[int]:
    return [o[0] for o in option_list(parse(raw).options)]


def test_connection_after_make_room_runs_without_timestamps(lab, tmp_path):
    """The client kernel takes the SYN-ACK without timestamps as the answer to
    a SYN without them: the whole connection runs without, nothing else
    changes.  Control: the cookie-request connection (room to spare) keeps
    its timestamps."""
    pcap = tmp_path / "flow.pcap"
    r = tfo_run(lab, tmp_path, make_room=True, pcap=pcap)
    flows = _flows(pcap)
    server = r["server_ip"]
    synacks = []
    for i, flow in enumerate(flows):
        syn = flow[0]
        synack = next(x for x in flow if parse(x).raw[parse(x).l4 + 13] & 0x12 == 0x12)
        synacks.append(synack)
        rest = [x for x in flow if x is not syn and x is not synack]
        data = [x for x in rest if parse(x).payload]
        assert len(data) >= 2
        if i == 0:  # cookie request: 24 bytes of options, room to spare
            assert 8 in _kinds(synack) and all(8 in _kinds(x) for x in rest)
            continue
        assert 8 not in _kinds(syn)
        # SYN-ACK: MSS, SACK-permitted and window scale as negotiated, no TS
        assert set(_kinds(synack)) == {2, 4, 3}, _kinds(synack)
        # every other segment, both directions: no timestamps (no options at
        # all, or SACK blocks)
        assert all(set(_kinds(x)) <= {5} for x in rest), [_kinds(x) for x in rest]
        assert any(parse(x).saddr == socket.inet_aton(server) for x in data)
    # The server offered the same MSS, SACK-permitted and window scale to all
    # (the first SYN-ACK also has timestamps and hands out the cookie).
    offers = {
        tuple(o for o in option_list(parse(x).options) if o[0] not in (8, 34)) for x in synacks
    }
    assert len(offers) == 1, offers
    # The client's kernel agrees: the cookie-request connection negotiated
    # timestamps, the others everything but it; SACK and window scaling the
    # same, and the 12 bytes timestamps took from every segment are payload.
    first, *later = r["negotiated"]
    assert first["ts"] and first["sack"] and first["wscale"]
    for x in later:
        assert x == {**first, "ts": False, "mss": first["mss"] + 12}, r["negotiated"]


# ------------------------------------------------------------------- MPTCP


def mptcp_run(lab, tmp_path, make_room: bool, wait: float = 10.0) -> dict:
    t = build_topology(lab)
    extra = "198.18.1.3"
    lab.addr(t.client, t.client_if, f"{extra}/24")
    for ns in (t.client, t.server):
        run("ip", "mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "2", ns=ns)
    run("ip", "mptcp", "endpoint", "add", extra, "dev", t.client_if, "subflow", ns=t.client)
    cfg = config(tmp_path, t.server_ip, make_room)
    # No FIN from the server until the client is done: MPTCP refuses to
    # open subflows on a connection that is already closing.
    with (
        marker_and_guard(t, cfg) as (m, g),
        serving(t.server, proto=socket.IPPROTO_MPTCP, size=10_000, half_close=False),
    ):
        s0 = counters(t.server)
        with netns(t.client):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
        with c:
            c.settimeout(10)
            c.connect((t.server_ip, PORT))
            c.sendall(REQUEST)
            # The in-kernel path manager opens the second subflow once the
            # connection is established; wait for the server to accept it.
            end = time.monotonic() + wait
            while (
                time.monotonic() < end
                and counters(t.server)["MPTcpExt.MPJoinAckRx"] == s0["MPTcpExt.MPJoinAckRx"]
            ):
                time.sleep(0.05)
            got = receive_all(c, 10_000)
        s1 = counters(t.server)
        mstats, gstats = m.stats(), g.stats()
    d = delta(s0, s1)
    return {
        "joined": d["MPTcpExt.MPJoinAckRx"],
        "join_syns": d["MPTcpExt.MPJoinSynRx"],
        "marker": mstats,
        "guard": gstats,
        "got": got,
        "capable": d["MPTcpExt.MPCapableSYNRX"],
    }


def test_mptcp_second_subflow_joins_through_dropping_guard(lab, tmp_path):
    after = mptcp_run(lab, tmp_path, make_room=True)
    lab.close()
    before = mptcp_run(lab, tmp_path, make_room=False, wait=3.0)
    print(
        f"\nMPTCP joined subflows: make_room off {before['joined']} "
        f"(guard missing {before['guard']['missing']}, marker no_room "
        f"{before['marker']['no_room']}); make_room on {after['joined']} "
        f"(room_from_ts {after['marker']['room_from_ts']})"
    )
    assert after["capable"] == 1 and after["got"] == 10_000
    assert after["joined"] == 1 and after["join_syns"] == 1
    assert after["marker"]["room_from_ts"] == 1 and after["marker"]["no_room"] == 0
    assert after["guard"]["ok"] == 2 and after["guard"]["missing"] == 0
    # Before: the MP_JOIN SYN had no room, the guard dropped it (and its
    # retransmissions): the connection stayed on one subflow.
    assert before["joined"] == 0 and before["got"] == 10_000
    assert before["marker"]["no_room"] >= 1 and before["guard"]["missing"] >= 1


def test_mptcp_join_syn_layout_is_the_one_tested_byte_for_byte(lab, tmp_path):
    """The real kernel's MP_JOIN SYN, as the marker sees it, is the layout the
    datapath tests check byte for byte (tests/syn_layouts.py)."""
    t = build_topology(lab)
    extra = "198.18.1.3"
    lab.addr(t.client, t.client_if, f"{extra}/24")
    for ns in (t.client, t.server):
        run("ip", "mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "2", ns=ns)
    run("ip", "mptcp", "endpoint", "add", extra, "dev", t.client_if, "subflow", ns=t.client)
    pcap = tmp_path / "join.pcap"
    with (
        serving(t.server, proto=socket.IPPROTO_MPTCP, size=1000, half_close=False),
        capture(t.client, t.client_if, pcap, f"tcp port {PORT} and tcp[tcpflags] == tcp-syn"),
    ):
        with netns(t.client):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
        with c:
            c.settimeout(10)
            c.connect((t.server_ip, PORT))
            c.sendall(REQUEST)
            wait_captured(pcap, 2, limit=10)
            receive_all(c, 1000)
    from scapy.utils import rdpcap

    syns = [bytes(p) for p in rdpcap(str(pcap))]
    assert len(syns) >= 2
    capable, join = (option_list(parse(x).options) for x in syns[:2])
    assert [o[0] for o in capable] == [2, 4, 8, 3, 30] and capable[-1][2] >> 4 == 0
    assert [o[0] for o in join] == [2, 4, 8, 3, 30] and join[-1][2] >> 4 == 1
    assert len(parse(syns[1]).options) == 32
