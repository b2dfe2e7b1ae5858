"""TUN devices for L3 tests: the packet starts at the IP header (IFF_TUN
with IFF_NO_PI), as on WireGuard, ipip, sit or gre devices."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import time
from collections.abc import Callable

from netoken.netns import netns

from .conftest import Lab, run

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETLINK = 0x400454CD
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
TUN_DEV = "/dev/net/tun"


def tun_device() -> str:
    """TUN_DEV, with the tun module loaded first where nothing has loaded it:
    a booted guest's devtmpfs (make test-kernels) has the node only once the
    module is in, and opening a missing node loads nothing."""
    if not os.path.exists(TUN_DEV):
        subprocess.run(["modprobe", "tun"], check=True, capture_output=True)
    return TUN_DEV


class Tun:
    """A TUN device in namespace NS; reading its fd gets what the kernel
    sends out of it, writing injects what the kernel receives on it.  It
    goes with the fd (and with the namespace)."""

    def __init__(self, lab: Lab, ns: str, name: str, link_type: int | None = None) -> None:
        self.ns, self.name = ns, name
        with netns(ns):
            self.fd = os.open(tun_device(), os.O_RDWR | os.O_CLOEXEC)
            ifr = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            if link_type is not None:  # only while the device is down
                fcntl.ioctl(self.fd, TUNSETLINK, link_type)
        os.set_blocking(self.fd, False)

    def up(self, *cidrs: str) -> Tun:
        for cidr in cidrs:
            extra = ("nodad",) if ":" in cidr else ()
            run("ip", "addr", "add", cidr, "dev", self.name, *extra, ns=self.ns)
        run("ip", "link", "set", self.name, "up", ns=self.ns)
        return self

    def write(self, packet: bytes) -> None:
        os.write(self.fd, packet)

    def read(self, until: float) -> bytes | None:
        """The next packet the kernel sent out, or None at monotonic time UNTIL."""
        while (left := until - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    return os.read(self.fd, 65536)
                except BlockingIOError:
                    continue
        return None

    def collect(self, want: Callable[[bytes], bool], n: int, timeout: float = 5.0) -> list[bytes]:
        """Packets out of the device for which WANT is true, until N of them
        or TIMEOUT seconds."""
        out: list[bytes] = []
        until = time.monotonic() + timeout
        while len(out) < n and (pkt := self.read(until)) is not None:
            if want(pkt):
                out.append(pkt)
        return out

    def close(self) -> None:
        os.close(self.fd)


def tcp_flags(pkt: bytes) -> tuple[int, int, int] | None:
    """(TCP flags, source port, destination port) of an IPv4/IPv6 packet
    without extension headers, or None if it is not TCP."""
    version = pkt[0] >> 4
    if version == 4 and len(pkt) >= 20 and pkt[9] == 6:
        l4 = (pkt[0] & 0x0F) * 4
    elif version == 6 and len(pkt) >= 40 and pkt[6] == 6:
        l4 = 40
    else:
        return None
    if len(pkt) < l4 + 14:
        return None
    sport, dport = struct.unpack("!HH", pkt[l4 : l4 + 4])
    return pkt[l4 + 13], sport, dport
