"""The oldest kernel netoken runs on, and the check made before loading.

netoken needs Linux 6.1: the youngest BPF helper its programs call is
bpf_ktime_get_tai_ns (6.1), the clock both derive the Unix-time epoch from
(netoken.h, realtime_minus_tai_ns).  HELPERS lists every helper they call
that is numbered from bpf_ringbuf_reserve (131, Linux 5.8) on; helper numbers
are handed out in order, so all the others are older than 5.8, and so are
the other features the programs rely on (global functions 5.6, bounded
loops 5.3).  tests/test_kernel.py keeps HELPERS equal to what the compiled
objects call.

The kernel is probed, not its version string read: distribution kernels
(RHEL 9's 5.14, for one) carry backported BPF features their version does
not tell, and a kernel without one would otherwise fail deep in a verifier
log.  `make test-kernels` runs the tests on 6.1 and 6.12 to keep this true.
"""

from __future__ import annotations

import functools
import os

from . import libbpf as lb

MINIMUM = "6.1"

# (helper, BPF_FUNC_ number, a program type that calls it, first Linux with it)
HELPERS = (
    ("bpf_ktime_get_tai_ns", 208, lb.BPF_PROG_TYPE_SCHED_CLS, "6.1"),  # marker, guard
    ("bpf_ktime_get_coarse_ns", 160, lb.BPF_PROG_TYPE_XDP, "5.11"),  # guard's event limit
    ("bpf_ringbuf_query", 134, lb.BPF_PROG_TYPE_SCHED_CLS, "5.8"),  # events of both
    ("bpf_ringbuf_submit", 132, lb.BPF_PROG_TYPE_SCHED_CLS, "5.8"),
    ("bpf_ringbuf_reserve", 131, lb.BPF_PROG_TYPE_SCHED_CLS, "5.8"),
)


@functools.cache
def missing(helpers: tuple[tuple[str, int, int, str], ...] = HELPERS) -> str | None:
    """One line naming what of HELPERS this kernel lacks, or None if nothing."""
    absent = [
        f"{name} (Linux {since})"
        for name, helper, prog_type, since in helpers
        if not lb.probe_helper(prog_type, helper)
    ]
    if not absent:
        return None
    return (
        f"this kernel ({os.uname().release}) lacks the BPF helper{'s' * (len(absent) > 1)} "
        f"{', '.join(absent)}; netoken needs Linux {MINIMUM} or newer"
    )


def require(error: type[Exception]) -> None:
    """Raise ERROR with missing()'s line if this kernel lacks a feature."""
    line = missing(HELPERS)
    if line:
        raise error(line)
