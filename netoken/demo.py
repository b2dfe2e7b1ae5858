"""`netoken demo`: the whole system in a private lab of network namespaces.

Builds client and server namespaces joined by a veth pair, runs a tiny TCP
service in the server, attaches the marker on the client's egress with a
freshly generated key, makes real connections, and shows what crossed the
wire (decoded from a capture on the server side and verified with the key)
and the marker's counters.  Everything it creates is removed at the end,
also on Ctrl-C or an error.  Nothing is pinned: the demo leaves no state.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import config as nconfig
from . import token
from .errors import NetokenError
from .guard import Guard
from .libbpf import interrupt_handler
from .marker import Marker
from .netns import netns

PORT = 8080
CLIENT_IP, SERVER_IP = "198.18.100.1", "198.18.100.2"
ATTACKER_IP, SERVER_IP_AT = "198.18.101.66", "198.18.101.2"
FLOOD_SECONDS = 2
CLIENT_IP6, SERVER_IP6 = "fd6e:7400:100::1", "fd6e:7400:100::2"
ETH_P_ALL = 0x0003


class DemoError(NetokenError):
    pass


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise DemoError(f"{' '.join(cmd)}: {r.stderr.strip()}")


@dataclass
class Lab:
    client: str
    server: str
    attacker: str
    client_if: str
    server_if: str  # faces the client
    server_if_at: str  # faces the attacker
    attacker_if: str


@contextmanager
def lab():
    """Client, server and attacker namespaces (unique names), removed on exit.

    The server has one link to the client and one to the attacker, so the
    guard on the server sees both and the attacker's flood cannot slow the
    client's link itself.
    """
    tag = f"{os.getpid() % 100000:05d}"
    cl, sv, at = (f"ntdemo-{r}-{tag}" for r in ("cl", "sv", "at"))
    l = Lab(cl, sv, at, f"ntd{tag}c", f"ntd{tag}s", f"ntd{tag}t", f"ntd{tag}a")
    created = []
    try:
        for ns in (cl, sv, at):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("link", "set", "lo", "up", ns=ns)
        _ip(
            "link",
            "add",
            l.client_if,
            "netns",
            cl,
            "type",
            "veth",
            "peer",
            "name",
            l.server_if,
            "netns",
            sv,
        )
        _ip(
            "link",
            "add",
            l.attacker_if,
            "netns",
            at,
            "type",
            "veth",
            "peer",
            "name",
            l.server_if_at,
            "netns",
            sv,
        )
        for ns, dev, a4, a6 in (
            (cl, l.client_if, CLIENT_IP, CLIENT_IP6),
            (sv, l.server_if, SERVER_IP, SERVER_IP6),
            (at, l.attacker_if, ATTACKER_IP, None),
            (sv, l.server_if_at, SERVER_IP_AT, None),
        ):
            _ip("addr", "add", f"{a4}/24", "dev", dev, ns=ns)
            if a6:
                _ip("addr", "add", f"{a6}/64", "dev", dev, "nodad", ns=ns)
            _ip("link", "set", dev, "up", ns=ns)
        # SYN-ACKs to the flood's spoofed sources need a way out, as on a real host.
        _ip("route", "add", "default", "via", ATTACKER_IP, ns=sv)
        yield l
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


class _Service:
    """Echo-ish TCP service in the server namespace."""

    def __init__(self, ns: str, family: int, addr: str) -> None:
        with netns(ns):
            self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, PORT))
        self.sock.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        # accept() fails once close() shut the socket down, which ends the thread.
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                with conn, contextlib.suppress(OSError):
                    conn.settimeout(2)
                    conn.sendall(b"hello from the protected service\n")

    def close(self) -> None:
        # close() alone does not wake the thread blocked in accept().
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class _Capture:
    """AF_PACKET capture of SYNs on the server's interface (no tcpdump needed)."""

    def __init__(self, ns: str, ifname: str) -> None:
        with netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []

    def drain(self, seconds: float = 0.3) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                frame, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if addr[2] != socket.PACKET_OUTGOING and _is_syn(frame):
                self.frames.append(frame)

    def close(self) -> None:
        self.sock.close()


def _l4(frame: bytes) -> tuple[int, int, bytes, bytes] | None:
    """(family, l4 offset, saddr, daddr) of a TCP frame, else None."""
    etype = int.from_bytes(frame[12:14], "big")
    if etype == 0x0800 and frame[23] == 6:
        ihl = (frame[14] & 0x0F) * 4
        return 4, 14 + ihl, frame[26:30], frame[30:34]
    if etype == 0x86DD and frame[20] == 6:
        return 6, 54, frame[22:38], frame[38:54]
    return None


def _is_syn(frame: bytes) -> bool:
    hdr = _l4(frame)
    return hdr is not None and frame[hdr[1] + 13] & 0x12 == 0x02


def describe(frame: bytes, key: bytes, window: int) -> dict:
    hdr = _l4(frame)
    assert hdr is not None  # a SYN (_is_syn)
    _, l4, saddr, daddr = hdr
    doff = (frame[l4 + 12] >> 4) * 4
    sport = int.from_bytes(frame[l4 : l4 + 2], "big")
    dport = int.from_bytes(frame[l4 + 2 : l4 + 4], "big")
    addr = ipaddress.ip_address
    row = {"flow": f"{addr(saddr)}:{sport} -> {addr(daddr)}:{dport}", "options": doff - 20}
    opts = token.find_options(frame[l4 + 20 : l4 + doff])
    if len(opts) != 1:
        return row | {"token": "none", "verified": False}
    t = token.decode(opts[0])
    assert t.nonce is not None and t.tag is not None  # the demo marks in mac mode
    ok, epoch = token.verify(opts[0], key, daddr=daddr, dport=dport, window=window)
    return row | {
        "token": f"key {t.key_id} epoch {epoch} nonce {t.nonce.hex()} tag {t.tag.hex()}",
        "verified": ok,
    }


def _connect(ns: str, addr: str, timeout: float) -> bool:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with netns(ns):
        c = socket.socket(family, socket.SOCK_STREAM)
    with c:
        c.settimeout(timeout)
        try:
            c.connect((addr, PORT))
            return bool(c.recv(100))
        except OSError:
            return False


def interrupted_after(seconds: float, cmd: list[str]) -> list[str]:
    """CMD stopped by SIGINT after SECONDS, as ^C would: flood tools print
    how many packets they sent only then; -k kills one whose blocked send
    ignores it."""
    return ["timeout", "-s", "INT", "-k", "3", f"{seconds}", *cmd]


def syn_flood_argv(dst: str, port: int, seconds: float) -> list[str]:
    """hping3's spoofed-source SYN flood at DST:PORT for SECONDS: the one the
    demo, the bench and the tests run (hping3_sent reads its count)."""
    return interrupted_after(
        seconds, ["hping3", "--flood", "--rand-source", "-S", "-p", str(port), dst]
    )


def hping3_sent(output: str) -> int | None:
    """How many packets hping3 says it sent, from its closing statistics."""
    m = re.search(r"(\d+) packets transmitted", output)
    return int(m.group(1)) if m else None


def _flood(ns: str, seconds: float) -> subprocess.Popen | None:
    """The flood from NS, if hping3 is installed."""
    try:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *syn_flood_argv(SERVER_IP_AT, PORT, seconds)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return None


def run(connections: int = 4, out=None) -> int:
    """Run the demo; returns the number of connections whose SYN verified."""
    from .ui import Console

    ui = out or Console()
    with ExitStack() as stack:
        # SIGTERM gets the same clean-up as Ctrl-C, and neither may land
        # inside a libbpf callback, where it would be lost.
        for sig in (signal.SIGINT, signal.SIGTERM):
            stack.callback(signal.signal, sig, signal.signal(sig, interrupt_handler))

        ui.step("building a private lab: client, server and attacker namespaces on veth")
        lab_ = stack.enter_context(lab())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="netoken-demo-")))
        key_path = tmp / "1.key"
        nconfig.generate_key(key_path)
        cfg_path = tmp / "netoken.toml"
        cfg_path.write_text(f"""
[[key]]
id = 1
file = "{key_path}"
window = 30

[[policy]]
name = "demo-service"
destinations = ["{SERVER_IP}/32", "{SERVER_IP6}/128"]
ports = [{PORT}]
key = 1

[guard]
action = "drop"
[[guard.protect]]
destinations = ["{SERVER_IP}/32", "{SERVER_IP_AT}/32", "{SERVER_IP6}/128"]
ports = [{PORT}]
keys = [1]
""")
        cfg = nconfig.load(cfg_path)
        key = cfg.keys[1].secret
        ui.step(
            f"generated key 1 ({key_path.name}, mode 0600); policy and guard: "
            f"{SERVER_IP}, {SERVER_IP6} port {PORT}"
        )

        services = [
            _Service(lab_.server, socket.AF_INET, "0.0.0.0"),
            _Service(lab_.server, socket.AF_INET6, SERVER_IP6),
        ]
        for s in services:
            stack.callback(s.close)
        cap = _Capture(lab_.server, lab_.server_if)
        stack.callback(cap.close)

        with netns(lab_.client):
            marker = stack.enter_context(Marker.load())
            marker.configure(cfg)
            filt = marker.attach(lab_.client_if)
        ui.step(
            f"marker attached on the client's {lab_.client_if} egress "
            f"(prog id {filt.prog_id}, tc handle {filt.handle:#x} priority {filt.priority})"
        )
        with netns(lab_.server):
            guard = stack.enter_context(Guard.load())
            guard.configure(cfg)
            for dev in (lab_.server_if, lab_.server_if_at):
                # XDP goes away with the veth when the lab is removed
                att = guard.attach(dev)
        ui.step(
            f"guard attached on the server's {lab_.server_if} and {lab_.server_if_at} "
            f"(XDP {att.mode}, prog id {att.prog_id}), action drop"
        )

        ok_conns = sum(
            _connect(lab_.client, SERVER_IP6 if i % 2 else SERVER_IP, 3) for i in range(connections)
        )
        cap.drain()
        rows = [describe(f, key, 30) for f in cap.frames]
        ui.table(
            "SYNs the client sent, as the server's interface saw them",
            rows,
            ["flow", "options", "token", "verified"],
        )
        verified = sum(r["verified"] for r in rows)
        ui.step(
            f"{ok_conns}/{connections} marked connections succeeded; "
            f"{verified}/{len(rows)} SYNs carried a token that verifies with key 1"
        )

        unmarked = _connect(lab_.attacker, SERVER_IP_AT, 1)
        ui.step(
            f"an unmarked connection from the attacker namespace: "
            f"{'succeeded (unexpected!)' if unmarked else 'dropped by the guard'}"
        )

        flood = _flood(lab_.attacker, FLOOD_SECONDS)
        during = 0
        if flood:
            ui.step(
                f"attacker floods {SERVER_IP_AT}:{PORT} with spoofed SYNs (hping3) for "
                f"{FLOOD_SECONDS}s while the client keeps connecting"
            )
            time.sleep(0.3)
            n = 20
            during = sum(_connect(lab_.client, SERVER_IP, 3) for _ in range(n))
            flood.wait()
            ui.step(f"{during}/{n} client connections succeeded during the flood")
        else:
            ui.warn("hping3 is not installed: skipping the flood part (apt-get install hping3)")

        mstats = {k: v for k, v in marker.stats().items() if v}
        gstats = {k: v for k, v in guard.stats().items() if v}
        ui.table(
            "counters",
            [{"program": "marker", "reason": k, "packets": v} for k, v in mstats.items()]
            + [{"program": "guard", "reason": k, "packets": v} for k, v in gstats.items()],
            ["program", "reason", "packets"],
        )
        ui.step("removing the lab")
    good = verified == ok_conns == connections and not unmarked
    return good


def main(connections: int = 4) -> int:
    try:
        good = run(connections)
    except KeyboardInterrupt:
        print("netoken: demo interrupted; lab removed")
        return 130
    except (DemoError, OSError) as e:
        print(f"netoken: demo failed: {e}")
        return 1
    return 0 if good else 1
