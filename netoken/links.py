"""The network devices of this network namespace, read over rtnetlink, and
which of them let traffic into the host past the guard.

A guard sees only what arrives on the device it is attached to.  A host that
terminates a tunnel receives the tunnelled SYNs twice: as UDP or GRE on the
underlay NIC, where the guard passes them, and decapsulated on the tunnel
device.  Likewise every other device that receives traffic (another NIC, a
veth from a container, a tun/tap of a VPN daemon) is a way in that the guard
on one interface does not cover.  `guard attach` and `status` name these
"side doors" so the operator can guard them too.

What counts (see docs/operations.md, "Where to attach the guard"):

- Only namespaces that run at least one netoken guard get the list: on a
  client-only host nothing is protected, so nothing is missing.
- A device is guarded when one of netoken's pinned guard programs runs on
  its XDP hook (any mode; a bond's slaves run the bond's program) or at
  its TC ingress.
- Loopback is not a way in from outside, nor is a veth pair with both ends
  in this namespace.  Devices stacked on another one
  (VLAN, macvlan, ipvlan) and masters (bridge, bond, team, VRF) receive
  what their lower devices or ports received first, so those are what must
  be guarded and what is named; dummy, ifb and nlmon receive nothing from
  outside.  Every other device is named, unknown kinds included.

- FOU/GUE receive ports (`ip fou add`) are named when they hand what they
  decapsulate straight to the protocol handlers (GUE, or direct FOU of TCP):
  no device sees those packets, so no guard can.  A direct FOU port of
  ipip/sit/gre feeds a tunnel device, which is named itself.

One RTM_GETLINK dump gives names, kinds, header types and the XDP program
ids of every device at once, a generic-netlink dump the FOU ports; no
pyroute2 or `ip` binary is needed.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

# linux/rtnetlink.h, linux/netlink.h, linux/if_link.h, linux/if_arp.h
NETLINK_ROUTE, NETLINK_GENERIC = 0, 16  # the socket module names only the first
RTM_NEWLINK, RTM_GETLINK = 16, 18
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_LINK_NETNSID, IFLA_XDP = (
    3,
    5,
    10,
    18,
    37,
    43,
)
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VXLAN_LINK = 3
# IFLA_XDP_PROG_ID, then DRV, SKB, HW: every way a program can be reported.
IFLA_XDP_PROG_IDS = (4, 5, 6, 7)
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
IFF_LOOPBACK = 0x8
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772  # an all-zero Ethernet header (eth_header_ops)
# Devices whose packets start at the IP header, at TC and at XDP alike:
# ARPHRD_NONE (tun, WireGuard), ipip, ip6tnl, sit, gre, ip6gre.
ARPHRD_NONE = 0xFFFE
L3_TYPES = frozenset({ARPHRD_NONE, 768, 769, 776, 778, 823})
# What `auto` guards at TC: attaching XDP to a veth turns off TSO on its
# peer (and netkit has no native XDP), which costs more than the guard does.
TC_KINDS = frozenset({"veth", "netkit"})

_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_RTA = struct.Struct("=HH")

# Kinds that decapsulate: what reaches them came in as UDP/GRE/IP on another
# device, where the guard could not see the SYN inside.
TUNNEL_KINDS = frozenset(
    {
        "vxlan",
        "geneve",
        "gre",
        "gretap",
        "ip6gre",
        "ip6gretap",
        "erspan",
        "ip6erspan",
        "ipip",
        "sit",
        "ip6tnl",
        "wireguard",
        "bareudp",
        "gtp",
        "vti",
        "vti6",
        "xfrm",
        "amt",
        "l2tp",
        "macsec",
    }
)
# Kinds whose traffic comes from another network namespace or a local program.
FROM_NAMESPACE_KINDS = frozenset({"veth", "netkit"})
FROM_PROGRAM_KINDS = frozenset({"tun"})
# Kinds that are not a way in of their own (see the module docstring).
_STACKED = frozenset({"vlan", "macvlan", "macvtap", "ipvlan", "ipvtap"})
COVERED_KINDS = frozenset(
    {
        "vlan",
        "macvlan",
        "macvtap",
        "ipvlan",
        "ipvtap",
        "bridge",
        "bond",
        "team",
        "vrf",
        "dummy",
        "ifb",
        "nlmon",
        "openvswitch",
    }
)


@dataclass(frozen=True)
class Link:
    """One network device as rtnetlink describes it."""

    ifindex: int
    ifname: str
    kind: str | None  # IFLA_INFO_KIND; None for physical devices
    arphrd: int  # header type: ARPHRD_ETHER or an L3 type (no Ethernet header)
    flags: int
    xdp_prog_ids: frozenset[int]
    peer_elsewhere: bool = False  # its peer or lower device is in another namespace
    lower: int | None = None  # the device it is stacked on (VLAN, macvlan, vxlan dev)
    master: int | None = None  # its bridge, bond or team

    @property
    def ethernet(self) -> bool:
        return self.arphrd in (ARPHRD_ETHER, ARPHRD_LOOPBACK)

    @property
    def l3(self) -> bool:
        """No link-layer header: packets start at the IP header."""
        return self.arphrd in L3_TYPES

    @property
    def framing(self) -> str | None:
        """ "ethernet", "l3", or None for a link type netoken cannot parse."""
        return "ethernet" if self.ethernet else "l3" if self.l3 else None


def _attrs(data: bytes, off: int = 0) -> Iterator[tuple[int, bytes]]:
    while off + _RTA.size <= len(data):
        length, typ = _RTA.unpack_from(data, off)
        if length < _RTA.size:
            return
        yield typ & NLA_TYPE_MASK, data[off + _RTA.size : off + length]
        off += (length + 3) & ~3


def _link(msg: bytes) -> Link:
    _family, arphrd, index, flags, _change = _IFINFO.unpack_from(msg)
    name, kind, elsewhere = "", None, False
    progs: set[int] = set()
    link = vxlan_link = master = None
    for typ, val in _attrs(msg, _IFINFO.size):
        if typ == IFLA_IFNAME:
            name = val.split(b"\0", 1)[0].decode(errors="replace")
        elif typ == IFLA_LINK:
            link = _u32(val)
        elif typ == IFLA_MASTER:
            master = _u32(val)
        elif typ == IFLA_LINKINFO:
            for t, v in _attrs(val):
                if t == IFLA_INFO_KIND:
                    kind = v.split(b"\0", 1)[0].decode(errors="replace")
                elif t == IFLA_INFO_DATA:
                    vxlan_link = next((_u32(x) for a, x in _attrs(v) if a == IFLA_VXLAN_LINK), None)
        elif typ == IFLA_LINK_NETNSID:
            elsewhere = True
        elif typ == IFLA_XDP:
            progs.update(
                struct.unpack("=I", v)[0]
                for t, v in _attrs(val)
                if t in IFLA_XDP_PROG_IDS and len(v) == 4
            )
    # IFLA_LINK of a veth is its peer, not a lower device.
    lower = vxlan_link if kind == "vxlan" else link if kind in _STACKED else None
    return Link(
        index,
        name,
        kind,
        arphrd,
        flags,
        frozenset(p for p in progs if p),
        elsewhere,
        lower if not elsewhere else None,
        master or None,
    )


def _u32(val: bytes) -> int | None:
    return struct.unpack("=I", val[:4])[0] if len(val) >= 4 else None


def uppers(idx: int, devices: list[Link]) -> list[Link]:
    """The devices stacked on or enslaving device IDX (the kernel's "upper"
    devices: no XDP program of IDX can change while one of them has one)."""
    master = next((d.master for d in devices if d.ifindex == idx), None)
    return [d for d in devices if d.lower == idx or d.ifindex == master]


def _dump(protocol: int, msg_type: int, body: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of every message a netlink dump request answers."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol) as s:
        s.bind((0, 0))
        s.send(
            _NLMSG.pack(_NLMSG.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body
        )
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, typ, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
                if length < _NLMSG.size:
                    raise OSError("netlink: malformed message")
                payload = data[off + _NLMSG.size : off + length]
                off += (length + 3) & ~3
                if typ == NLMSG_DONE:
                    return
                if typ == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0]
                    if err:
                        raise OSError(err, f"netlink dump: {os.strerror(err)}")
                    continue
                yield typ, payload


def links() -> list[Link]:
    """Every network device of the calling thread's network namespace."""
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    out = [_link(p) for t, p in _dump(NETLINK_ROUTE, RTM_GETLINK, body) if t == RTM_NEWLINK]
    return sorted(out, key=lambda link: link.ifindex)


def link(idx: int) -> Link | None:
    """Device IDX of the calling thread's network namespace, or None.

    From rtnetlink, not /sys/class/net: sysfs shows the namespace it was
    mounted in, not the one `netoken -n NS` switched this thread to."""
    return next((d for d in links() if d.ifindex == idx), None)


def framing_of(ifname: str, d: Link | None) -> str:
    """D's framing ("ethernet" or "l3"), or ValueError with the one line
    that says why netoken cannot parse IFNAME's packets."""
    if d is None:
        raise ValueError(f"interface {ifname!r} does not exist")
    if d.framing is None:
        raise ValueError(
            f"{ifname} ({d.kind or 'device'}) has link type {d.arphrd}, neither Ethernet nor "
            f"IP without a link-layer header: netoken cannot parse its packets"
        )
    return d.framing


# --------------------------------------------------------------------------
# FOU/GUE receive ports (linux/fou.h, linux/genetlink.h)

GENL_ID_CTRL, CTRL_CMD_GETFAMILY = 16, 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
FOU_CMD_GET = 3
FOU_ATTR_PORT, FOU_ATTR_AF, FOU_ATTR_IPPROTO, FOU_ATTR_TYPE = 1, 2, 3, 4
FOU_ENCAP_DIRECT, FOU_ENCAP_GUE = 1, 2
_GENL = struct.Struct("=BBxx")
# What direct FOU hands to a tunnel device (ipip, IPv6-in-IPv4, GRE); that
# device is named on its own.
_TO_DEVICE = frozenset({4, 41, 47})


@dataclass(frozen=True)
class FouPort:
    """A UDP port on which the kernel decapsulates FOU or GUE."""

    port: int
    family: int
    ipproto: int  # direct FOU: the protocol inside; GUE: 0 (each packet says)
    gue: bool

    @property
    def to_stack(self) -> bool:
        """Whether what it decapsulates goes straight to the protocol
        handlers (TCP among them), past every device: GUE packets name any
        protocol, direct FOU the configured one."""
        return self.gue or self.ipproto not in _TO_DEVICE


def _genl_family(name: str) -> int | None:
    # A dump, not a lookup by name: that would load the module if missing.
    for _, payload in _dump(NETLINK_GENERIC, GENL_ID_CTRL, _GENL.pack(CTRL_CMD_GETFAMILY, 1)):
        attrs = dict(_attrs(payload, _GENL.size))
        if attrs.get(CTRL_ATTR_FAMILY_NAME, b"").split(b"\0", 1)[0] == name.encode():
            return struct.unpack("=H", attrs[CTRL_ATTR_FAMILY_ID][:2])[0]
    return None


def parse_fou(payload: bytes) -> FouPort:
    """One FOU_CMD_GET answer (generic netlink header and attributes)."""
    attrs = dict(_attrs(payload, _GENL.size))

    def u8(attr: int) -> int:
        return attrs[attr][0] if attrs.get(attr) else 0

    port = struct.unpack("!H", attrs[FOU_ATTR_PORT][:2])[0] if FOU_ATTR_PORT in attrs else 0
    return FouPort(port, u8(FOU_ATTR_AF), u8(FOU_ATTR_IPPROTO), u8(FOU_ATTR_TYPE) == FOU_ENCAP_GUE)


def fou_ports() -> list[FouPort]:
    """The FOU/GUE receive ports of this network namespace; none when the
    kernel has no fou (module not loaded, or not built)."""
    family = _genl_family("fou")
    if family is None:
        return []
    return [parse_fou(p) for _, p in _dump(NETLINK_GENERIC, family, _GENL.pack(FOU_CMD_GET, 1))]


_WHAT = {
    "tunnel": "terminates a tunnel into this host",
    "namespace": "delivers traffic from another network namespace into this host",
    "program": "delivers traffic from a local program (VPN, tun/tap) into this host",
    "device": "receives traffic into this host",
}


@dataclass(frozen=True)
class SideDoor:
    """A way into this host that no guard covers: a device, or a FOU/GUE
    port that hands packets to the stack without one."""

    name: str  # interface name, or "udp/PORT"
    ifindex: int | None
    kind: str
    why: str  # a key of _WHAT, or "fou"
    guardable: bool  # whether `netoken guard attach` can run there

    @classmethod
    def of_link(cls, link: Link, why: str) -> SideDoor:
        return cls(
            link.ifname, link.ifindex, link.kind or "physical", why, link.framing is not None
        )

    @classmethod
    def of_fou(cls, fou: FouPort) -> SideDoor:
        return cls(f"udp/{fou.port}", None, "gue" if fou.gue else "fou", "fou", False)

    @property
    def message(self) -> str:
        if self.why == "fou":
            port = self.name.removeprefix("udp/")
            return (
                f"{self.name} ({self.kind}) hands decapsulated packets straight to this "
                f"host's stack, past every device: no guard can run there; remove it "
                f"(ip fou del port {port}) unless it is needed"
            )
        fix = (
            "attach one"
            if self.guardable
            else "netoken cannot guard it (neither Ethernet nor IP without a link layer)"
        )
        return f"{self.name} ({self.kind}) {_WHAT[self.why]} and has no guard: {fix}"

    def to_json(self) -> dict[str, object]:
        return {
            "ifname": self.name,
            "ifindex": self.ifindex,
            "kind": self.kind,
            "path": self.why,
            "guardable": self.guardable,
            "message": self.message,
        }


def way_in(link: Link) -> str | None:
    """Why LINK lets traffic into the host on its own ("tunnel", ...), or
    None if it does not (loopback, stacked devices, masters)."""
    if link.flags & IFF_LOOPBACK or link.kind in COVERED_KINDS:
        return None
    if link.kind in TUNNEL_KINDS:
        return "tunnel"
    if link.kind in FROM_NAMESPACE_KINDS:
        # A pair with both ends here carries only this host's own traffic.
        return "namespace" if link.peer_elsewhere else None
    if link.kind in FROM_PROGRAM_KINDS:
        return "program"
    return "device"


def side_doors(
    guard_prog_ids: set[int],
    devices: list[Link] | None = None,
    fou: list[FouPort] | None = None,
    tc_guarded: frozenset[int] = frozenset(),
) -> list[SideDoor]:
    """The ways into this namespace that bypass every guard, given the ids
    of netoken's guard programs and the devices (TC_GUARDED, ifindexes)
    where one of them runs at TC ingress; none when no device here runs one."""
    devices = links() if devices is None else devices

    def guarded(link: Link) -> bool:
        return bool(link.xdp_prog_ids & guard_prog_ids) or link.ifindex in tc_guarded

    if not any(guarded(link) for link in devices):
        return []
    out = []
    for link in devices:
        why = way_in(link)
        if why is not None and not guarded(link):
            out.append(SideDoor.of_link(link, why))
    fou = fou_ports() if fou is None else fou
    out += [SideDoor.of_fou(f) for f in fou if f.to_stack]
    return out
