"""Side doors: devices that let traffic into a guarded host past the guard.

A server that terminates VXLAN receives the client's SYNs inside UDP on its
underlay NIC, where the guard passes them, and decapsulated on the vxlan
device.  `guard attach` and `status` must name such devices, and the guard
must work on them: with it on both, spoofed SYNs encapsulated by hand
(scapy, sent on the underlay) never reach TCP while a marked client gets
through the tunnel every time.  All of it through the CLI, as operators run
it (`netoken -n NS`).
"""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from netoken.netns import netns

from .conftest import TEST_KEY, Lab, run, uid
from .e2e import connect, server
from .test_cli import PORT, forget, netoken, ok, one_line_error, write_config

VNI = 4242
VXLAN_PORT = 4789
UNDERLAY = ("198.18.10.1", "198.18.10.2")
OVERLAY = ("198.18.20.1", "198.18.20.2")  # client, server (the protected address)
SPOOFED = 20
CONNECTIONS = 20

CONFIG = f"""
[[policy]]
name = "tunnelled"
destinations = ["{OVERLAY[1]}/32"]
ports = [{PORT}]
key = 1

[guard]
action = "drop"

[[guard.protect]]
destinations = ["{OVERLAY[1]}/32"]
ports = [{PORT}]
keys = [1]
"""


def tunnel_warning(dev: str) -> str:
    return f"{dev} (vxlan) terminates a tunnel into this host and has no guard: attach one"


@dataclass
class Vx:
    """client and server joined by a veth underlay, with a VXLAN tunnel
    between them (VNI 4242, port 4789) carrying the overlay addresses."""

    client: str
    server: str
    cu: str  # underlay ends
    su: str
    cv: str  # vxlan devices
    sv: str
    cfg: Path

    def srv(self, *args: str) -> str:
        return ok(*args, ns=self.server)

    def attach_guard(self, dev: str, *extra: str) -> subprocess.CompletedProcess:
        r = netoken("guard", "attach", dev, "-c", str(self.cfg), "--json", *extra, ns=self.server)
        assert r.returncode == 0, r.stderr
        return r

    def guard_stats(self, dev: str) -> dict[str, int]:
        (d,) = json.loads(self.srv("stats", dev, "--json"))
        return d["counters"]

    def status(self) -> list[dict]:
        """status --json of this test's interfaces (pins are global: state
        of other tests' namespaces may show while they attach)."""
        mine = (self.cu, self.su, self.cv, self.sv)
        return [d for d in json.loads(self.srv("status", "--json")) if d["ifname"] in mine]


@pytest.fixture
def vx(lab: Lab, tmp_path: Path) -> Iterator[Vx]:
    c, s = lab.ns("cl"), lab.ns("sv")
    cu, su = lab.link(c, s)
    lab.addr(c, cu, f"{UNDERLAY[0]}/24")
    lab.addr(s, su, f"{UNDERLAY[1]}/24")
    cv, sv = uid("nvx"), uid("nvx")
    for ns, dev, under, local, remote, addr in (
        (c, cv, cu, *UNDERLAY, OVERLAY[0]),
        (s, sv, su, *UNDERLAY[::-1], OVERLAY[1]),
    ):
        run(
            "ip",
            "link",
            "add",
            dev,
            "type",
            "vxlan",
            "id",
            str(VNI),
            "dstport",
            str(VXLAN_PORT),
            "local",
            local,
            "remote",
            remote,
            "dev",
            under,
            ns=ns,
        )
        lab.addr(ns, dev, f"{addr}/24")
        run("ip", "link", "set", dev, "up", ns=ns)
    # Neighbours resolved now: no SYN of the test waits on ARP.
    run("ping", "-c", "1", "-W", "3", OVERLAY[1], ns=c)
    try:
        yield Vx(c, s, cu, su, cv, sv, write_config(tmp_path, {1: TEST_KEY}, CONFIG))
    finally:
        forget(cu, su, cv, sv)


def mac(ns: str, dev: str) -> str:
    (link,) = json.loads(run("ip", "-j", "link", "show", "dev", dev, ns=ns).stdout)
    return link["address"]


def tcp_in_segs(ns: str) -> int:
    out = run("nstat", "-saz", "TcpInSegs", ns=ns).stdout
    (line,) = [ln for ln in out.splitlines() if ln.startswith("TcpInSegs")]
    return int(line.split()[1])


def send_encapsulated_syns(vx: Vx, n: int) -> None:
    """N spoofed SYNs to the protected address and port, each inside
    UDP/VXLAN as the client's tunnel endpoint would send it, put on the
    client's underlay NIC (so they reach the server's underlay first)."""
    outer = Ether(src=mac(vx.client, vx.cu), dst=mac(vx.server, vx.su)) / IP(
        src=UNDERLAY[0], dst=UNDERLAY[1]
    )
    inner_dst = mac(vx.server, vx.sv)
    frames = []
    for i in range(n):
        inner = (
            Ether(src="02:00:00:00:00:99", dst=inner_dst)
            / IP(src=f"198.18.20.{100 + i}", dst=OVERLAY[1])
            / TCP(
                sport=random.randint(1024, 65535),
                dport=PORT,
                flags="S",
                seq=random.getrandbits(32),
                options=[("MSS", 1410)],
            )
        )
        frames.append(
            bytes(
                outer
                / UDP(sport=random.randint(49152, 65535), dport=VXLAN_PORT)
                / VXLAN(vni=VNI, flags=0x08)
                / inner
            )
        )
    with netns(vx.client):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with s:
        s.bind((vx.cu, 0))
        for f in frames:
            s.send(f)


def wait(cond, limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_vxlan_side_door_is_named_and_closed_by_guarding_the_tunnel(vx: Vx):
    # 1. Guard on the underlay NIC only: the tunnel device is named, by the
    # attach, by status and by status --json.
    r = vx.attach_guard(vx.su)
    assert r.stderr.splitlines() == [f"netoken: {tunnel_warning(vx.sv)}"]
    res = json.loads(r.stdout)
    assert (res["hook"], res["xdp_mode"]) == ("tc", None)  # a veth: TC ingress
    assert [(d["ifname"], d["kind"], d["path"], d["message"]) for d in res["unguarded"]] == [
        (vx.sv, "vxlan", "tunnel", tunnel_warning(vx.sv))
    ]
    text = vx.srv("status")
    assert text.rstrip().endswith(
        f"not guarded (traffic enters this host past every guard):\n  {tunnel_warning(vx.sv)}"
    )
    (item,) = vx.status()
    assert [d["ifname"] for d in item["unguarded"]] == [vx.sv]
    assert item["unguarded"][0]["ifindex"] == socket_ifindex(vx.server, vx.sv)
    # The client has no guard: nothing is protected there, nothing is named.
    ok("mark", "attach", vx.cv, "-c", str(vx.cfg), ns=vx.client)
    client_status = ok("status", ns=vx.client)
    assert "not guarded" not in client_status
    assert [
        d.get("unguarded")
        for d in json.loads(ok("status", "--json", ns=vx.client))
        if d["ifname"] == vx.cv
    ] == [None]

    with server(vx.server, PORT) as srv:
        # The side door is real: spoofed SYNs inside the tunnel reach TCP.
        before = tcp_in_segs(vx.server)
        send_encapsulated_syns(vx, SPOOFED)
        wait(lambda: tcp_in_segs(vx.server) - before >= SPOOFED)
        reached_nic_only = tcp_in_segs(vx.server) - before
        assert reached_nic_only == SPOOFED

        # 2. Guard on the tunnel device too (XDP, generic: vxlan has no
        # native XDP): nothing is named any more, and nothing gets through.
        r = vx.attach_guard(vx.sv)
        assert r.stderr == ""
        res = json.loads(r.stdout)
        assert (res["hook"], res["xdp_mode"], res["unguarded"]) == ("xdp", "generic", [])
        assert "not guarded" not in vx.srv("status")
        assert [d["unguarded"] for d in vx.status()] == [[], []]

        dropped = vx.guard_stats(vx.sv)["missing"]
        before = tcp_in_segs(vx.server)
        send_encapsulated_syns(vx, SPOOFED)
        assert wait(lambda: vx.guard_stats(vx.sv)["missing"] - dropped == SPOOFED)
        reached_both = tcp_in_segs(vx.server) - before
        assert reached_both == 0

        # A marked client connects through the tunnel every time.
        done = 0
        for _ in range(CONNECTIONS):
            connect(vx.client, OVERLAY[1], PORT, timeout=5)
            done += 1
        assert done == CONNECTIONS
        assert wait(lambda: srv.accepted == CONNECTIONS)
        stats = vx.guard_stats(vx.sv)
        assert stats["ok"] == CONNECTIONS
        assert stats["missing"] - dropped == SPOOFED  # no legit SYN dropped or retried
    print(
        f"\nVXLAN side door: {reached_nic_only}/{SPOOFED} spoofed SYNs reached TCP with the "
        f"guard on the NIC only, {reached_both}/{SPOOFED} with it on NIC and tunnel; "
        f"marked client: {done}/{CONNECTIONS} connections"
    )


def socket_ifindex(ns: str, dev: str) -> int:
    with netns(ns):
        return socket.if_nametoindex(dev)


def test_vxlan_has_no_native_xdp_and_says_so(vx: Vx):
    vx.attach_guard(vx.su)
    r = netoken("guard", "attach", vx.sv, "-c", str(vx.cfg), "--xdp-mode", "native", ns=vx.server)
    assert one_line_error(r) == (
        f"netoken: {vx.sv}: the driver does not support native XDP; use generic mode"
    )
    (item,) = vx.status()
    assert [d["ifname"] for d in item["unguarded"]] == [vx.sv]


def test_which_devices_are_named(lab: Lab, tmp_path: Path):
    """What counts as a way in, next to a guarded NIC: tunnels, veths from
    other namespaces, tun/tap of local programs.  Loopback, a veth pair with
    both ends here, and devices stacked on or enslaving others do not.  An
    L3 device (tun) is guarded at TC ingress, and then no longer named."""
    s, pod = lab.ns("sv"), lab.ns("po")
    nic, _ = lab.link(s, pod)
    pod_host, _ = lab.link(s, pod)
    lab.link(s, s)  # a veth pair with both ends here: not a way in
    tun, tap, mv, br = uid("ntun"), uid("ntap"), uid("nmv"), uid("nbr")
    run("ip", "tuntap", "add", tun, "mode", "tun", ns=s)
    run("ip", "tuntap", "add", tap, "mode", "tap", ns=s)
    run("ip", "link", "add", mv, "link", nic, "type", "macvlan", ns=s)
    run("ip", "link", "add", br, "type", "bridge", ns=s)
    cfg = write_config(tmp_path, {1: TEST_KEY}, CONFIG)
    try:
        # Nothing guarded: nothing named.
        mine = (nic, pod_host, tun, tap)
        assert not [d for d in json.loads(ok("status", "--json", ns=s)) if d["ifname"] in mine]
        r = netoken("guard", "attach", nic, "-c", str(cfg), ns=s)
        assert r.returncode == 0, r.stderr
        local = "delivers traffic from a local program (VPN, tun/tap) into this host"
        assert r.stderr.splitlines() == [
            (
                f"netoken: {pod_host} (veth) delivers traffic from another network namespace "
                "into this host and has no guard: attach one"
            ),
            f"netoken: {tun} (tun) {local} and has no guard: attach one",
            f"netoken: {tap} (tun) {local} and has no guard: attach one",
        ]
        # the L3 tun at TC ingress, the veth at TC, the tap (Ethernet) at XDP
        for dev, hook in ((tun, "tc"), (pod_host, "tc"), (tap, "xdp")):
            res = json.loads(ok("guard", "attach", dev, "-c", str(cfg), "--json", ns=s))
            assert res["hook"] == hook, dev
        named = {
            tuple(d["ifname"] for d in item["unguarded"])
            for item in json.loads(ok("status", "--json", ns=s))
            if item["ifname"] in mine
        }
        assert named == {()}
    finally:
        forget(nic, pod_host, tun, tap)


def test_fou_ports_are_read_without_loading_the_module(lab: Lab):
    """FOU/GUE ports come from a generic-netlink dump of the families (a
    lookup by name would load the fou module); this kernel has no fou, so
    a namespace has none, while the dump itself finds the controller."""
    from netoken import links

    ns = lab.ns("fo")
    with netns(ns):
        assert links._genl_family("nlctrl") == links.GENL_ID_CTRL
        assert links._genl_family("fou") is None
        assert links.fou_ports() == []


def test_fou_answers_are_parsed_as_the_kernel_writes_them():
    """FOU_CMD_GET answers as fou_fill_info() builds them (linux/fou.h): the
    port in network order, then family, protocol and encapsulation type."""
    from netoken import links

    def attr(typ: int, val: bytes) -> bytes:
        return (struct.pack("=HH", 4 + len(val), typ) + val).ljust((4 + len(val) + 3) & ~3, b"\0")

    def answer(port: int, ipproto: int, encap: int) -> bytes:
        return (
            struct.pack("=BBxx", links.FOU_CMD_GET, 1)
            + attr(links.FOU_ATTR_AF, bytes([socket.AF_INET]))
            + attr(links.FOU_ATTR_PORT, struct.pack("!H", port))
            + attr(links.FOU_ATTR_IPPROTO, bytes([ipproto]))
            + attr(links.FOU_ATTR_TYPE, bytes([encap]))
        )

    gue = links.parse_fou(answer(5555, 0, links.FOU_ENCAP_GUE))
    ipip = links.parse_fou(answer(5556, 4, links.FOU_ENCAP_DIRECT))
    tcp = links.parse_fou(answer(5557, 6, links.FOU_ENCAP_DIRECT))
    assert (gue.port, gue.gue, gue.to_stack) == (5555, True, True)
    assert (ipip.port, ipip.ipproto, ipip.to_stack) == (5556, 4, False)  # tunl0 is named
    assert tcp.to_stack
    doors = links.side_doors(
        {7}, devices=[links.Link(2, "eth0", None, 1, 0, frozenset({7}))], fou=[gue, ipip, tcp]
    )
    assert [d.message for d in doors] == [
        f"udp/{p} ({k}) hands decapsulated packets straight to this host's stack, past every "
        f"device: no guard can run there; remove it (ip fou del port {p}) unless it is needed"
        for p, k in ((5555, "gue"), (5557, "fou"))
    ]


def test_underlay_guard_changes_only_while_the_tunnel_has_none(vx: Vx):
    """The kernel keeps a device's XDP program fixed while a device stacked
    on it has one (vxlan over its underlay): attach, replace and detach of
    the underlay's guard at XDP say so in one line and change nothing;
    `apply` still updates it.  (At TC, the default on this veth underlay,
    the rule does not apply.)"""

    def upper_rule(doing: str) -> str:
        return (
            f"netoken: {vx.su}: cannot {doing} the guard while {vx.sv} (on top of "
            f"{vx.su}) has an XDP program, a kernel rule: detach the guard from {vx.sv} "
            f"first, then attach it there again (`netoken apply` updates a guard's config "
            f"without reattaching)"
        )

    vx.attach_guard(vx.sv)
    r = netoken("guard", "attach", vx.su, "-c", str(vx.cfg), "--hook", "xdp", ns=vx.server)
    assert one_line_error(r) == upper_rule("attach or replace")
    assert [d["ifname"] for d in vx.status()] == [vx.sv]  # nothing of the failed attach left
    assert "xdp" not in json.loads(run("ip", "-j", "link", "show", vx.su, ns=vx.server).stdout)[0]

    vx.srv("guard", "detach", vx.sv)
    vx.attach_guard(vx.su, "--hook", "xdp")  # underlay first, then the tunnel
    vx.attach_guard(vx.sv)
    (before,) = [d["prog"]["id"] for d in vx.status() if d["ifname"] == vx.su]
    r = netoken("guard", "attach", vx.su, "-c", str(vx.cfg), ns=vx.server)
    assert one_line_error(r) == upper_rule("attach or replace")
    r = netoken("guard", "detach", vx.su, ns=vx.server)
    assert one_line_error(r) == upper_rule("detach")
    assert [
        (d["ifname"], d["prog"]["id"] if d["ifname"] == vx.su else 0, d["state"])
        for d in vx.status()
    ] == [(vx.su, before, "attached"), (vx.sv, 0, "attached")]
    vx.srv("apply", vx.su, "-c", str(vx.cfg))
    vx.srv("guard", "detach", vx.sv)
    vx.srv("guard", "detach", vx.su)
