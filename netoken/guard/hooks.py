"""Where a guard runs: XDP or TC ingress, and whose program is there.

One C source, one object per hook and link layer (program.OBJECTS,
bpf/hook.h).  XDP on Ethernet devices, where it drops earliest; TC ingress
(clsact, direct-action, at netoken's handle and priority, netoken/tc.py) on
veths, where XDP would switch off TSO on the peer, and on L3 devices (tun,
WireGuard, ipip, sit, gre), whose packets start at the IP header
(docs/design.md §2 "Hooks", "L3 devices").  A program is netoken's guard by
its name; anything else at a hook is never replaced or removed.
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from typing import Literal

from .. import links, tc
from ..errors import GuardError
from ..libbpf import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    BPFError,
    Program,
    xdp_attach,
    xdp_detach,
    xdp_query,
)
from ..program import ifindex

PROG_NAME = "netoken_guard"  # what makes a program at a hook netoken's guard

Hook = Literal["xdp", "tc"]
HookRequest = Literal["auto", "xdp", "tc"]
HOOKS = ("auto", "xdp", "tc")
XdpMode = Literal["native", "generic"]
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


@dataclass(frozen=True)
class XdpAttachment:
    """Where a guard program is attached."""

    ifindex: int
    prog_id: int
    mode: XdpMode


@dataclass(frozen=True)
class TcAttachment:
    """A guard program at TC ingress, at netoken's handle and priority."""

    ifindex: int
    prog_id: int
    created_clsact: bool  # this attach created the clsact qdisc
    handle: int = tc.HANDLE
    priority: int = tc.PRIORITY
    mode: None = None  # no XDP mode


def xdp_attached(idx: int) -> tuple[int, str] | None:
    """(prog id, "native" | "generic" | "offload") of IDX's XDP program, or None."""
    info = xdp_query(idx)
    for prog_id, mode in (
        (info.drv_prog_id, "native"),
        (info.skb_prog_id, "generic"),
        (info.hw_prog_id, "offload"),
    ):
        if prog_id:
            return prog_id, mode
    return None


def ours_or_fail(ifname: str, prog_id: int, mode: str, verb: str = "replace") -> Program:
    """The attached program, if it is a netoken guard; GuardError otherwise.

    Ownership is the program name (netoken never installs an offloaded one);
    the tag in the message lets the operator find the other program."""
    try:
        prog = Program.from_id(prog_id)
    except BPFError as e:
        raise GuardError(
            f"{ifname}: cannot inspect the attached XDP program (id {prog_id}): {e.strerror}"
        ) from None
    if prog.name != PROG_NAME or mode == "offload":
        name, tag = prog.name or "?", prog.tag
        prog.close()
        raise GuardError(
            f"{ifname}: XDP program {name!r} (id {prog_id}, tag {tag}) is attached "
            f"and was not installed by netoken; refusing to {verb} it"
        )
    return prog


def tc_ours_or_fail(ifname: str, prog_id: int, verb: str = "replace") -> None:
    """GuardError unless the filter at netoken's place on IFNAME's ingress
    runs a netoken guard (someone else may have used the handle)."""
    try:
        with Program.from_id(prog_id) as prog:
            name, tag = prog.name, prog.tag
    except BPFError as e:
        raise GuardError(
            f"{ifname}: cannot inspect the tc ingress filter's program (id {prog_id}): {e.strerror}"
        ) from None
    if name != PROG_NAME:
        raise GuardError(
            f"{ifname}: the tc ingress filter at netoken's handle 0x{tc.HANDLE:x} prio "
            f"{tc.PRIORITY} runs {name or '?'!r} (id {prog_id}, tag {tag}), not netoken's guard; "
            f"refusing to {verb} it"
        )


def attached(ifname: str) -> XdpAttachment | None:
    """netoken's guard on IFNAME, or None (also when a foreign program is there)."""
    idx = ifindex(ifname, GuardError)
    cur = xdp_attached(idx)
    if cur is None or cur[1] == "offload":
        return None
    try:
        with Program.from_id(cur[0]) as p:
            if p.name != PROG_NAME:
                return None
    except BPFError:
        return None
    return XdpAttachment(idx, cur[0], cur[1])  # type: ignore[arg-type]


def detach(ifname: str) -> bool:
    """Remove netoken's guard from IFNAME, at either hook; False if none was
    attached.

    Raises GuardError if there is no guard at TC and the XDP program there
    is not netoken's."""
    idx = ifindex(ifname, GuardError)
    prog_id = tc.query(idx, "ingress")
    if prog_id is not None:
        tc_ours_or_fail(ifname, prog_id, "detach")
        tc.detach(idx, "ingress")
        return True
    cur = xdp_attached(idx)
    if cur is None:
        return False
    prog_id, mode = cur
    with ours_or_fail(ifname, prog_id, mode, "detach") as prog:
        try:
            # old_prog_fd: detach only if it is still this program.
            xdp_detach(idx, MODE_FLAGS[mode], old_prog_fd=prog)
        except BPFError as e:
            raise GuardError(detach_problem(ifname, idx, e)) from None
    return True


def no_xdp_on_l3(ifname: str) -> str:
    return (
        f"{ifname} is an L3 device (packets start at the IP header), which the XDP guard "
        f"cannot parse; use --hook tc (what --hook auto picks there)"
    )


def choose_hook(ifname: str, requested: HookRequest, dev: links.Link) -> tuple[Hook, str]:
    """(the hook, why) for REQUESTED on device DEV (design.md §2 "Hooks")."""
    if requested == "xdp":
        if dev.l3:
            raise GuardError(no_xdp_on_l3(ifname))
        return "xdp", "forced (--hook xdp)"
    if requested == "tc":
        return "tc", "forced (--hook tc)"
    if dev.l3:
        return "tc", "auto: L3 device, packets start at the IP header"
    if dev.kind == "veth":
        return "tc", "auto: veth, where XDP would switch off TSO on its peer"
    if dev.kind in links.TC_KINDS:
        return "tc", f"auto: {dev.kind}, which has no native XDP"
    return "xdp", "auto: Ethernet device, XDP drops earliest"


def restore_xdp(idx: int, new_id: int, prev: tuple[int, str] | None) -> None:
    """Undo what a failed attach did to IDX's XDP hook: the previous program
    back, or none.  A change someone else made meanwhile is left alone."""
    cur = xdp_attached(idx)
    if cur == prev or (cur is not None and cur[0] != new_id):
        return
    with contextlib.ExitStack() as stack:
        prev_prog = stack.enter_context(Program.from_id(prev[0])) if prev else None
        if cur is not None:
            cur_prog = stack.enter_context(Program.from_id(cur[0]))
            if prev_prog is not None and prev is not None and cur[1] == prev[1]:
                xdp_attach(idx, prev_prog, MODE_FLAGS[prev[1]], old_prog_fd=cur_prog)
                return
            xdp_detach(idx, MODE_FLAGS[cur[1]], old_prog_fd=cur_prog)
        if prev_prog is not None and prev is not None:
            xdp_attach(idx, prev_prog, MODE_FLAGS[prev[1]] | XDP_FLAGS_UPDATE_IF_NOEXIST)


# The kernel keeps a device's XDP program fixed while a device stacked on it
# (a vxlan using it as underlay, a VLAN, its bond) has one: "Cannot attach
# when an upper device already has a program", as EEXIST, also for detach.
_UPPER_HAS_PROG = "upper device already has a program"


def _upper_problem(ifname: str, idx: int, e: BPFError, doing: str) -> str | None:
    if e.errno != errno.EEXIST or _UPPER_HAS_PROG not in e.log:
        return None
    names = ", ".join(d.ifname for d in links.uppers(idx, links.links()) if d.xdp_prog_ids)
    names = names or "a device on top of it"
    return (
        f"{ifname}: cannot {doing} the guard while {names} (on top of {ifname}) has an XDP "
        f"program, a kernel rule: detach the guard from {names} first, then attach it there "
        f"again (`netoken apply` updates a guard's config without reattaching)"
    )


def detach_problem(ifname: str, idx: int, e: BPFError) -> str:
    return (
        _upper_problem(ifname, idx, e, "detach")
        or f"{ifname}: cannot detach the netoken guard: {e.strerror}"
    )


def attach_problem(ifname: str, idx: int, mode: XdpMode | None, e: BPFError) -> str:
    upper = _upper_problem(ifname, idx, e, "attach or replace")
    if upper is not None:
        return upper
    if e.errno == errno.EOPNOTSUPP and mode == "native":
        return f"{ifname}: the driver does not support native XDP; use generic mode"
    if e.errno in (errno.EBUSY, errno.EEXIST):
        return f"{ifname}: another XDP program was attached meanwhile; not replacing it"
    where = f" in {mode} mode" if mode else ""
    return f"{ifname}: cannot attach the guard{where}: {e.strerror}"
