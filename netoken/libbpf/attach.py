"""Attaching programs: tc filters on a clsact qdisc, XDP."""

from __future__ import annotations

import ctypes
import errno as _errno
from typing import NamedTuple

from .ffi import (
    BPF_TC_EGRESS,
    BPF_TC_F_REPLACE,
    BPF_TC_INGRESS,
    bpf_tc_hook,
    bpf_tc_opts,
    bpf_xdp_attach_opts,
    bpf_xdp_query_opts,
    call,
    capturing,
    error,
    lib,
    make_opts,
)
from .objects import FdLike, as_fd


class TcFilter(NamedTuple):
    handle: int
    priority: int
    prog_id: int


def _tc_hook(ifindex: int, attach_point: int) -> bpf_tc_hook:
    return make_opts(bpf_tc_hook, ifindex=ifindex, attach_point=attach_point)


def _tc_where(ifindex: int, attach_point: int) -> str:
    names = {BPF_TC_INGRESS: "ingress", BPF_TC_EGRESS: "egress"}
    ap = names.get(attach_point, "ingress+egress" if attach_point == 3 else str(attach_point))
    return f"ifindex {ifindex} {ap}"


_NO_CHAIN = "Cannot find specified filter chain"
_NO_QDISC = "Parent Qdisc doesn't exist"  # the kernel's spelling: "exists"


def tc_hook_create(ifindex: int, attach_point: int = BPF_TC_EGRESS) -> bool:
    """Ensure a clsact qdisc exists; True if created, False if already there."""
    hook = _tc_hook(ifindex, attach_point)
    with capturing(quiet=True) as log:
        ret = lib.bpf_tc_hook_create(ctypes.byref(hook))
    if ret == -_errno.EEXIST:
        return False
    log.flush()
    if ret < 0:
        raise error(-ret, f"create tc hook on {_tc_where(ifindex, attach_point)}", log)
    return True


def tc_hook_destroy(ifindex: int, attach_point: int) -> None:
    """With BPF_TC_INGRESS|BPF_TC_EGRESS remove the clsact qdisc; with a
    single attach point libbpf only flushes that hook's filters."""
    hook = _tc_hook(ifindex, attach_point)
    call(
        f"destroy tc hook on {_tc_where(ifindex, attach_point)}",
        lib.bpf_tc_hook_destroy,
        ctypes.byref(hook),
    )


def tc_attach(
    ifindex: int,
    attach_point: int,
    prog_fd: FdLike,
    handle: int,
    priority: int,
    replace: bool = True,
) -> TcFilter:
    """Attach a direct-action cls_bpf filter (hook must exist)."""
    hook = _tc_hook(ifindex, attach_point)
    opts = make_opts(
        bpf_tc_opts,
        prog_fd=as_fd(prog_fd),
        flags=BPF_TC_F_REPLACE if replace else 0,
        handle=handle,
        priority=priority,
    )
    call(
        f"attach tc filter {handle}/{priority} on {_tc_where(ifindex, attach_point)}",
        lib.bpf_tc_attach,
        ctypes.byref(hook),
        ctypes.byref(opts),
    )
    return TcFilter(opts.handle, opts.priority, opts.prog_id)


def tc_detach(ifindex: int, attach_point: int, handle: int, priority: int) -> None:
    """Remove the filter identified by handle/priority."""
    hook = _tc_hook(ifindex, attach_point)
    # libbpf insists prog_fd/prog_id/flags are zero for detach and query.
    opts = make_opts(bpf_tc_opts, handle=handle, priority=priority)
    call(
        f"detach tc filter {handle}/{priority} from {_tc_where(ifindex, attach_point)}",
        lib.bpf_tc_detach,
        ctypes.byref(hook),
        ctypes.byref(opts),
    )


def tc_query(ifindex: int, attach_point: int, handle: int, priority: int) -> int | None:
    """prog id of the filter at handle/priority, or None if there is none."""
    hook = _tc_hook(ifindex, attach_point)
    opts = make_opts(bpf_tc_opts, handle=handle, priority=priority)
    with capturing(quiet=True) as log:
        ret = lib.bpf_tc_query(ctypes.byref(hook), ctypes.byref(opts))
    if ret == -_errno.ENOENT:
        return None
    # With no filter left at that priority (or no clsact qdisc at all) the
    # kernel answers EINVAL instead of ENOENT; only its extack message tells.
    if ret == -_errno.EINVAL and any(_NO_CHAIN in msg or _NO_QDISC in msg for _, msg in log):
        return None
    log.flush()
    if ret < 0:
        raise error(
            -ret,
            f"query tc filter {handle}/{priority} on {_tc_where(ifindex, attach_point)}",
            log,
        )
    return opts.prog_id


# --------------------------------------------------------------------------
# XDP
# --------------------------------------------------------------------------


class XdpInfo(NamedTuple):
    prog_id: int
    drv_prog_id: int
    skb_prog_id: int
    hw_prog_id: int
    attach_mode: int  # XDP_ATTACHED_*


def _xdp_opts(old_prog_fd: FdLike | None) -> bpf_xdp_attach_opts | None:
    # libbpf 1.1.2 adds XDP_FLAGS_REPLACE itself when old_prog_fd != 0.
    if old_prog_fd is None:
        return None
    return make_opts(bpf_xdp_attach_opts, old_prog_fd=as_fd(old_prog_fd))


def xdp_attach(
    ifindex: int, prog_fd: FdLike, flags: int = 0, old_prog_fd: FdLike | None = None
) -> None:
    """Attach an XDP program (netlink); ``old_prog_fd`` makes it an atomic replace."""
    opts = _xdp_opts(old_prog_fd)
    call(
        f"attach xdp program to ifindex {ifindex}",
        lib.bpf_xdp_attach,
        ifindex,
        as_fd(prog_fd),
        flags,
        ctypes.byref(opts) if opts is not None else None,
    )


def xdp_detach(ifindex: int, flags: int = 0, old_prog_fd: FdLike | None = None) -> None:
    """Detach the XDP program in the mode given by ``flags``."""
    opts = _xdp_opts(old_prog_fd)
    call(
        f"detach xdp program from ifindex {ifindex}",
        lib.bpf_xdp_detach,
        ifindex,
        flags,
        ctypes.byref(opts) if opts is not None else None,
    )


def xdp_query(ifindex: int, flags: int = 0) -> XdpInfo:
    """Attached XDP program ids per mode (0 = none)."""
    opts = make_opts(bpf_xdp_query_opts)
    call(
        f"query xdp on ifindex {ifindex}",
        lib.bpf_xdp_query,
        ifindex,
        flags,
        ctypes.byref(opts),
    )
    return XdpInfo(
        opts.prog_id,
        opts.drv_prog_id,
        opts.skb_prog_id,
        opts.hw_prog_id,
        opts.attach_mode,
    )
