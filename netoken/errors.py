"""The errors netoken raises for its users, and nothing else.

Every error a user can act on is a :class:`NetokenError` whose message is one
line; the CLI prints it as ``netoken: MESSAGE`` (or ``{"error": MESSAGE}``
under ``--json``) and exits 1.  Anything else reaching the CLI is a bug and
says so.  This module imports nothing heavy, so ``--help``, ``decode``, ``key``
and ``config check`` work on a machine without libbpf.
"""

from __future__ import annotations

import errno as _errno
import os


class NetokenError(Exception):
    """An error message for the user (its first line is what gets printed)."""


class MarkerError(NetokenError):
    """A marker operation failed for a reason the user can act on."""


class GuardError(NetokenError):
    """A guard operation failed for a reason the user can act on."""


class ExporterError(NetokenError):
    """A problem with the metrics endpoint the user can fix (bad flag, address in use)."""


class BPFError(OSError):
    """A failed libbpf/bpf() call.

    ``errno`` is the positive error number, ``op`` names the operation and
    object, ``log`` holds the libbpf (and verifier) output captured during the
    call; the tail of it is included in ``str()``.
    """

    def __init__(self, errno: int, op: str, log: str = "", detail: str = "") -> None:
        errno = abs(errno) or _errno.EINVAL
        super().__init__(errno, os.strerror(errno))
        self.op = op
        self.log = log
        self.detail = detail

    def __str__(self) -> str:
        s = f"{self.op}: {self.strerror}"
        if self.detail:
            s += "\n" + self.detail
        return s

    def __reduce__(self):  # OSError's default would call __init__(errno, strerror)
        return (type(self), (self.errno, self.op, self.log, self.detail))

    def user_message(self) -> str:
        """One line, with the likely cause for the errors users actually hit."""
        msg = f"{self.op}: {self.strerror}"
        verifier = "verifier log" in (self.detail or "")
        if self.errno in (_errno.EPERM, _errno.EACCES) and not verifier:
            msg += " (BPF needs root: CAP_BPF and CAP_NET_ADMIN)"
        elif self.errno == _errno.ENOSYS:
            msg += " (BPF is not available in this kernel)"
        elif verifier:
            msg += " (the kernel verifier rejected the program; --debug shows its log)"
        return msg
