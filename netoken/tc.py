"""netoken's filters on an interface's clsact qdisc: the marker on egress,
the guard (when it runs at TC) on ingress.

Each is one direct-action cls_bpf filter at a fixed handle and priority, so
attach replaces only ours (`tc filter replace` semantics, atomic) and detach
removes only ours; filters anyone else installed on either hook keep
running, after ours (our programs return TC_ACT_UNSPEC for what they let
through).  The qdisc is shared: netoken creates it when it is missing and
removes it only when netoken created it and no filter is left on it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from typing import Literal

from . import state
from .libbpf import (
    BPF_TC_EGRESS,
    BPF_TC_INGRESS,
    Program,
    TcFilter,
    tc_attach,
    tc_detach,
    tc_hook_create,
    tc_hook_destroy,
    tc_query,
)

# A fixed handle and priority on each hook.  Priority 1 runs before filters
# added with tc's defaults (49152 and up).
HANDLE = 0x6E74
PRIORITY = 1

Hook = Literal["ingress", "egress"]
POINTS: dict[str, int] = {"ingress": BPF_TC_INGRESS, "egress": BPF_TC_EGRESS}


def query(idx: int, hook: Hook) -> int | None:
    """The prog id of netoken's filter on IDX's HOOK, or None."""
    return tc_query(idx, POINTS[hook], HANDLE, PRIORITY)


def attach(idx: int, hook: Hook, prog_fd: object) -> TcFilter:
    """Put PROG_FD at netoken's place on HOOK, replacing what netoken had
    there in one step (the clsact qdisc must exist: see ensure_clsact)."""
    return tc_attach(idx, POINTS[hook], prog_fd, HANDLE, PRIORITY, replace=True)  # type: ignore[arg-type]


def detach(idx: int, hook: Hook) -> None:
    tc_detach(idx, POINTS[hook], HANDLE, PRIORITY)


def ensure_clsact(idx: int) -> bool:
    """Create IDX's clsact qdisc if it is missing; True if this created it."""
    return tc_hook_create(idx, BPF_TC_EGRESS)


def restore(idx: int, hook: Hook, prev_prog_id: int | None) -> None:
    """Undo a failed attach: the previous program back at our place, or none."""
    if prev_prog_id is None:
        with contextlib.suppress(Exception):
            detach(idx, hook)
        return
    with contextlib.suppress(Exception), Program.from_id(prev_prog_id) as prev:
        attach(idx, hook, prev.fd)


def filter_count(ifname: str, hook: Hook) -> int | None:
    """Filters on IFNAME's clsact HOOK as `tc` lists them, or None if that
    cannot be told.

    libbpf can only query a filter whose handle and priority are known, so
    "is anything else installed here" needs a dump, which iproute2 does.
    """
    try:
        r = subprocess.run(
            ["tc", "-j", "filter", "show", "dev", ifname, hook],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    try:
        entries = json.loads(r.stdout or "[]")
    except ValueError:
        return None
    if not isinstance(entries, list):
        return None
    # tc lists each priority's chain head and then its filters; only the
    # latter (with "options") are filters.
    return sum(1 for e in entries if isinstance(e, dict) and "options" in e)


def destroy_clsact_if_empty(ifname: str, idx: int) -> str:
    """Remove IFNAME's clsact qdisc if no filter is left on it; what happened."""
    counts = [filter_count(ifname, hook) for hook in ("ingress", "egress")]
    if None in counts:
        return "kept (could not list its filters)"
    left = [f"{c} on {hook}" for c, hook in zip(counts, ("ingress", "egress")) if c]
    if left:
        return f"kept (filters left: {', '.join(left)})"
    try:
        tc_hook_destroy(idx, BPF_TC_INGRESS | BPF_TC_EGRESS)
    except OSError as e:
        return f"kept (removing it failed: {e.strerror})"
    return "removed"


def netoken_created_clsact(ifname: str, idx: int, meta: dict | None = None) -> bool:
    """Whether netoken created the clsact qdisc of IFNAME (ifindex IDX): META
    (the caller's own metadata) or any role's metadata for it says so.

    The marker and the guard share the qdisc, and whichever attaches second
    finds it there: it inherits the first one's word, so the qdisc goes with
    the last of them, not with the first to leave."""
    metas = [meta] if meta is not None else []
    metas += state.interface_metas(idx)
    return any(m and m.get("created_clsact") and m.get("ifindex") == idx for m in metas)
