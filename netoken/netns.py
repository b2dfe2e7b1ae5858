"""Run code inside a named network namespace (the `ip netns` kind).

setns(2) switches only the calling thread, so this is safe in a
single-threaded CLI or test; sockets opened inside keep their namespace after
the switch back, which is what the tests and the demo rely on.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


@contextmanager
def netns(name: str | None) -> Iterator[None]:
    """Enter network namespace NAME for the duration of the block (None: stay)."""
    if name is None:
        yield
        return
    path = os.path.join(NETNS_RUN_DIR, name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"network namespace {name!r} does not exist ({path})") from None
    with _switched(target, name):
        yield


@contextmanager
def entered(path: str) -> Iterator[None]:
    """Enter the network namespace file PATH (/run/netns/NAME, /proc/PID/ns/net)
    for the duration of the block."""
    with _switched(os.open(path, os.O_RDONLY | os.O_CLOEXEC), path):
        yield


@contextmanager
def _switched(target: int, what: str) -> Iterator[None]:
    """In the namespace of fd TARGET (closed after) for the block, WHAT in messages."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, what)
        try:
            yield
        finally:
            _setns(home, "original namespace")
    finally:
        os.close(target)
        os.close(home)
