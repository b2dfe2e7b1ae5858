"""Namespaces, links and processes the bench owns, and their clean-up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .common import BenchError


def _tag() -> str:
    """Part of every namespace and interface name: the pid, in 5 digits so
    interface names stay within 15 characters."""
    return f"{os.getpid() % 100000:05d}"


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and r.returncode:
        raise BenchError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def _in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


class Lab:
    """Namespaces, veth pairs and processes; close() removes them all.

    Names carry the pid, so two benches (or a bench and the test suite) on
    one machine never collide.  Processes are killed before the namespaces
    go: a namespace with a process in it would outlive `ip netns del`.
    """

    def __init__(self) -> None:
        self.tag = _tag()
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._links = 0

    def ns(self, role: str) -> str:
        name = f"ntbench-{self.tag}-{role}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("link", "set", "lo", "up", ns=name)
        return name

    def link(self, a: str, b: str, a_cidr: str, b_cidr: str) -> tuple[str, str]:
        """A veth pair, one end in A and one in B, addressed and up."""
        self._links += 1
        ia, ib = f"ntb{self.tag}{self._links}a", f"ntb{self.tag}{self._links}b"
        _ip("link", "add", ia, "netns", a, "type", "veth", "peer", "name", ib, "netns", b)
        for ns, dev, cidr in ((a, ia, a_cidr), (b, ib, b_cidr)):
            _ip("addr", "add", cidr, "dev", dev, ns=ns)
            _ip("link", "set", dev, "up", ns=ns)
        return ia, ib

    def spawn(self, ns: str, *cmd: str, **kw: Any) -> subprocess.Popen:
        """CMD in namespace NS, in a process group of its own, so close() can
        end it with every child it forked (trafgen's workers outlive their
        parent when it fails)."""
        p = subprocess.Popen(_in_ns(ns, *cmd), start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        self.procs.clear()
        for name in reversed(self.namespaces):
            _ip("netns", "del", name, check=False)
        self.namespaces.clear()


@contextmanager
def lab() -> Iterator[Lab]:
    lb = Lab()
    try:
        yield lb
    finally:
        lb.close()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM gets the clean-up of Ctrl-C (namespaces, pins, processes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)
