"""Shared fixtures: real kernel, real namespaces, always cleaned up."""

from __future__ import annotations

import itertools
import os
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netoken import config as nconfig

UNIT = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The suite drives the kernel (BPF, tc, XDP, namespaces): it needs root.
    # Fail loudly instead of skipping, so a green run always means "tested";
    # only tests/unit runs as any user.
    kernel = [i for i in items if UNIT not in i.path.parents]
    if kernel and os.geteuid() != 0:
        raise pytest.UsageError(
            f"{len(kernel)} of the selected tests load BPF and build namespaces: they must "
            f"run as root (tests/unit runs as any user)"
        )


_ids = itertools.count()
TEST_KEY = bytes(range(16))


def rounds(n: int) -> int:
    """N iterations for a long randomized loop, or the share of them that
    NETOKEN_TEST_ROUNDS asks for: make test-kernels runs such loops at a tenth
    under emulation, where each costs ~50 times what it does natively."""
    return max(1, round(n * float(os.environ.get("NETOKEN_TEST_ROUNDS", "1"))))


def patience(seconds: float) -> float:
    """How long to wait for something that takes SECONDS at most on real
    hardware: NETOKEN_TEST_PATIENCE times that.  make test-kernels sets it
    under emulation, where every process start costs seconds; a deadline,
    never a performance bound."""
    return seconds * float(os.environ.get("NETOKEN_TEST_PATIENCE", "1"))


def uid(prefix: str) -> str:
    """A name unique to this run and call, short enough for an interface (15)."""
    return f"{prefix}{os.getpid() % 100000:05d}{next(_ids):03d}"[:15]


def run(*cmd: str, ns: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    if ns:
        cmd = ("ip", "netns", "exec", ns, *cmd)
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


@dataclass
class Lab:
    """Namespaces and links created by a test; everything is removed at close."""

    namespaces: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        name = uid(f"nt{role[:2]}")
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "link", "set", "lo", "up", ns=name)
        return name

    def link(self, a: str, b: str) -> tuple[str, str]:
        """A veth pair with one end in namespace A and the other in B."""
        ia, ib = uid("nva"), uid("nvb")
        run("ip", "link", "add", ia, "netns", a, "type", "veth", "peer", "name", ib, "netns", b)
        run("ip", "link", "set", ia, "up", ns=a)
        run("ip", "link", "set", ib, "up", ns=b)
        return ia, ib

    def addr(self, ns: str, dev: str, cidr: str) -> None:
        extra = ("nodad",) if ":" in cidr else ()
        run("ip", "addr", "add", cidr, "dev", dev, *extra, ns=ns)

    def close(self) -> None:
        for name in reversed(self.namespaces):
            # Deleting the namespace deletes its veths and with them any
            # tc filters and XDP programs attached to them.
            run("ip", "netns", "del", name, check=False)
        self.namespaces.clear()


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@dataclass
class Topology:
    """client -- [router --] server, IPv4 and IPv6 on every link."""

    client: str
    server: str
    client_if: str
    server_if: str
    client_ip: str
    server_ip: str
    client_ip6: str
    server_ip6: str
    router: str | None = None
    router_in: str | None = None  # router side facing the client
    router_out: str | None = None  # router side facing the server


def build_topology(lab: Lab, router: bool = False) -> Topology:
    c, s = lab.ns("cl"), lab.ns("sv")
    if not router:
        ci, si = lab.link(c, s)
        lab.addr(c, ci, "198.18.1.1/24")
        lab.addr(s, si, "198.18.1.2/24")
        lab.addr(c, ci, "fd6e:7400:1::1/64")
        lab.addr(s, si, "fd6e:7400:1::2/64")
        return Topology(
            c, s, ci, si, "198.18.1.1", "198.18.1.2", "fd6e:7400:1::1", "fd6e:7400:1::2"
        )
    r = lab.ns("rt")
    ci, ri = lab.link(c, r)
    ro, si = lab.link(r, s)
    lab.addr(c, ci, "198.18.2.1/24")
    lab.addr(r, ri, "198.18.2.254/24")
    lab.addr(r, ro, "198.18.3.254/24")
    lab.addr(s, si, "198.18.3.1/24")
    lab.addr(c, ci, "fd6e:7400:2::1/64")
    lab.addr(r, ri, "fd6e:7400:2::fe/64")
    lab.addr(r, ro, "fd6e:7400:3::fe/64")
    lab.addr(s, si, "fd6e:7400:3::1/64")
    run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=r)
    run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=r)
    run("ip", "route", "add", "default", "via", "198.18.2.254", ns=c)
    run("ip", "route", "add", "default", "via", "198.18.3.254", ns=s)
    run("ip", "-6", "route", "add", "default", "via", "fd6e:7400:2::fe", ns=c)
    run("ip", "-6", "route", "add", "default", "via", "fd6e:7400:3::fe", ns=s)
    # Resolve neighbours now, so no test's first SYN waits on (or is lost to)
    # neighbour discovery and comes back as a retransmission.
    for dst in ("198.18.3.1", "fd6e:7400:3::1"):
        run("ping", "-c", "1", "-W", "3", dst, ns=c)
    return Topology(
        c, s, ci, si, "198.18.2.1", "198.18.3.1", "fd6e:7400:2::1", "fd6e:7400:3::1", r, ri, ro
    )


def write_key(directory: Path, name: str = "1.key", secret: bytes = TEST_KEY) -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    return path


def make_config(
    directory: Path,
    body: str,
    keys: dict[int, bytes] | None = None,
    window: int = 30,
    bind: tuple[str, ...] = (),
) -> nconfig.Config:
    """A Config from a TOML body plus [[key]] tables for KEYS (default: key 1)."""
    keys = {1: TEST_KEY} if keys is None else keys
    parts = []
    for kid, secret in keys.items():
        path = write_key(directory, f"{kid}.key", secret)
        parts.append(
            textwrap.dedent(f"""
            [[key]]
            id = {kid}
            file = "{path}"
            window = {window}
            bind = {list(bind)!r}
        """).replace("'", '"')
        )
    text = "\n".join(parts) + "\n" + textwrap.dedent(body)
    path = directory / "netoken.toml"
    path.write_text(text)
    return nconfig.load(path)
