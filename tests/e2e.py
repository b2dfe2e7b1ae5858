"""Real traffic between namespaces: a tiny server, clients, and captures."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from scapy.utils import rdpcap

from netoken import token
from netoken.netns import netns

from .conftest import patience
from .pkt import parse

RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class Server:
    """Answers every connection with a fixed HTTP response (curl-friendly)."""

    def __init__(self, ns: str, port: int, family: int = socket.AF_INET) -> None:
        with netns(ns):
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            self.sock.listen(1024)
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(4096)
                    conn.sendall(RESPONSE)
                    self.accepted += 1
                except OSError:
                    pass

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept(); shutdown does.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=5)


@contextmanager
def server(ns: str, port: int, family: int = socket.AF_INET) -> Iterator[Server]:
    s = Server(ns, port, family)
    try:
        yield s
    finally:
        s.close()


def connect(ns: str, addr: str, port: int, timeout: float = 5.0) -> bytes:
    """One real TCP connection from namespace NS; returns the response."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with netns(ns):
        s = socket.socket(family, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        s.connect((addr, port))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


class ConnectionLoop:
    """Real connections from NS to ADDR:PORT, one after the other on each of
    WORKERS threads, while the block runs; counts the ones that succeeded
    (done) and keeps the errors of the others (failures)."""

    def __init__(self, ns: str, addr: str, port: int, workers: int = 4) -> None:
        self.ns, self.addr, self.port = ns, addr, port
        self.done = 0
        self.failures: list[Exception] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(workers)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                # A dropped SYN would come back as a retransmission after a
                # second, not as a failure: the guard's counters show those.
                connect(self.ns, self.addr, self.port, timeout=patience(3))
                with self._lock:
                    self.done += 1
            except OSError as e:
                self.failures.append(e)

    def wait_for(self, n: int, limit: float, stop_at_failure: bool = False) -> None:
        """Wait until N connections succeeded; fail if LIMIT seconds pass
        first (or, with STOP_AT_FAILURE, once one failed)."""
        deadline = time.monotonic() + patience(limit)
        while (
            self.done < n
            and time.monotonic() < deadline
            and not (stop_at_failure and self.failures)
        ):
            time.sleep(0.01)
        assert self.done >= n, f"only {self.done} connections ({self.failures[:3]})"

    def __enter__(self) -> Self:
        for th in self._threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(timeout=10)


def curl(ns: str, addr: str, port: int) -> str:
    host = f"[{addr}]" if ":" in addr else addr
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "5", f"http://{host}:{port}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, f"curl failed: {out.stderr.strip()}"
    return out.stdout


# libpcap's tcp[] only reaches IPv4; for IPv6 (no extension headers) the
# flags are at byte 40 + 13, and only if the next header is TCP.
SYN_ONLY = (
    "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"
    " or (ip6 and ip6[6] == 6 and ip6[53] & 0x12 == 0x02)"
)


@contextmanager
def capture(ns: str, iface: str, path: Path, bpf_filter: str = "tcp") -> Iterator[Path]:
    """tcpdump on IFACE inside NS while the block runs.

    Call wait_captured(path, n) inside the block when the number of packets
    is known: tcpdump stops at SIGINT without reading what is still queued
    on its socket, which on a busy machine is most of a burst.  The kernel's
    drop count is checked, so a capture that lost packets fails loudly.
    """
    proc = subprocess.Popen(
        # --immediate-mode: without it packets sit in a TPACKET_V3 block for
        # up to a second; -B: a burst of SYNs fits in the ring.
        [
            "ip",
            "netns",
            "exec",
            ns,
            "tcpdump",
            "-i",
            iface,
            "-U",
            "-n",
            "--immediate-mode",
            "-B",
            "65536",
            "-w",
            str(path),
            bpf_filter,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    err = ""
    try:
        line = proc.stderr.readline()  # "listening on ..." once the socket is bound
        assert "listening" in line, f"tcpdump did not start: {line}"
        yield path
        _wait_until_quiet(path)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "0 packets dropped by kernel" in err, err


def pcap_records(path: Path) -> int:
    """Packets in a pcap file so far (walks the 16-byte record headers)."""
    data = path.read_bytes() if path.exists() else b""
    n, off = 0, 24
    while off + 16 <= len(data):
        caplen = int.from_bytes(data[off + 8 : off + 12], "little")
        if off + 16 + caplen > len(data):
            break
        n, off = n + 1, off + 16 + caplen
    return n


def wait_captured(path: Path, n: int, limit: float = 10.0) -> None:
    """Wait until the capture holds N packets (or LIMIT seconds passed)."""
    deadline = time.monotonic() + patience(limit)
    while pcap_records(path) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_until_quiet(path: Path, quiet: float = 0.4, limit: float = 5.0) -> None:
    """Return once the capture file has stopped growing for QUIET seconds."""
    end = time.monotonic() + patience(limit)
    last, since = -1, time.monotonic()
    while time.monotonic() < end:
        size = path.stat().st_size if path.exists() else 0
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def syns(path: Path) -> list[bytes]:
    """Raw frames of every SYN (not SYN-ACK) in a capture."""
    return [raw for _, raw in syns_at(path)]


def syns_at(path: Path) -> list[tuple[float, bytes]]:
    """(capture time, raw frame) of every SYN (not SYN-ACK) in a capture."""
    out = []
    for pkt in rdpcap(str(path)):
        raw = bytes(pkt)
        p = parse(raw)
        if p.proto != 6:
            continue
        flags = raw[p.l4 + 13]
        if flags & 0x02 and not flags & 0x10:
            out.append((float(pkt.time), raw))
    return out


def verify_syn(raw: bytes, key: bytes, window: int = 30, bind: int = 0) -> bool:
    p = parse(raw)
    opts = token.find_options(p.options)
    if len(opts) != 1:
        return False
    ok, _ = token.verify(
        opts[0],
        key,
        daddr=p.daddr,
        dport=p.dport,
        saddr=p.saddr,
        sport=p.sport,
        bind=bind,
        window=window,
    )
    return ok


def counters(ns: str) -> dict[str, int]:
    """The namespace's SNMP counters as {"Tcp.InCsumErrors": n, "TcpExt.ListenDrops": n, ...}."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/snmp", "/proc/net/netstat"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    result = {}
    for head, vals in zip(lines[::2], lines[1::2]):
        names, values = head.split(), vals.split()
        group = names[0].rstrip(":")
        result.update({f"{group}.{n}": int(v) for n, v in zip(names[1:], values[1:])})
    return result


def syn_retransmits(ns: str) -> int:
    """SYNs NS's TCP sent again for want of a SYN-ACK in time (1 s, then
    doubling).  A test that counts SYNs adds them to its connections: an
    emulated kernel on a loaded host can stall that long, and TCP then rightly
    sends the SYN again, which the marker marks with a fresh token."""
    return counters(ns)["TcpExt.TCPSynRetrans"]


def tcp_in_csum_errors(ns: str) -> int:
    return counters(ns)["Tcp.InCsumErrors"]


def link_stats(ns: str, dev: str) -> dict[str, int]:
    """rx/tx packet counters of DEV plus its ethtool -S counters (veth XDP stats)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ethtool", "-S", dev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stats = {}
    for line in out.splitlines()[1:]:
        name, _, value = line.strip().partition(":")
        if value.strip().lstrip("-").isdigit():
            stats[name.strip()] = int(value)
    for what in ("rx", "tx"):
        path = f"/sys/class/net/{dev}/statistics/{what}_packets"
        stats[f"{what}_packets"] = int(
            subprocess.run(
                ["ip", "netns", "exec", ns, "cat", path], capture_output=True, text=True, check=True
            ).stdout
        )
    return stats
