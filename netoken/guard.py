"""Library API of the guard: load the XDP or TC program, fill its maps, attach it.

Everything the CLI's `guard` verbs do goes through here, so tests and other
programs get the same behaviour as operators.

Map design (bpf/guard.bpf.c, structs in bpf/netoken.h):

- ``nt_dst_v4`` / ``nt_dst_v6``: LPM tries, destination prefix -> port rules,
  compiled by netoken/rules.py exactly as for the marker; a rule's target is
  an index into ``nt_protect``.
- ``nt_protect``: one ``struct nt_protect`` per ``[[guard.protect]]`` entry:
  its action and the key ids it accepts as a 256-bit bitmap.  Used in two
  halves like the marker's policies (see netoken/entries.py).
- ``nt_keys``: the key slots, shared layout with the marker.
- ``nt_static``: hash set of accepted static tokens, keyed by (protect
  index, token as on the wire), so each entry accepts its own tokens.
- ``nt_replay``: the replay cache, direct-mapped 8-byte slots (nonce and
  part of the tag of an accepted mac token, at a hash of the same; see
  NT_REPLAY_ENTRY in bpf/netoken.h), ``[guard] replay_cache`` rounded up to
  a power of two of them, sized before load.
- ``nt_guard_stats``: per-CPU counters by enum nt_guard_reason;
  ``nt_key_stats``: per-CPU ok/bad counters per key id.
- ``nt_guard_events``: ring buffer of rejected SYNs, rate-limited per CPU
  by a token bucket (``nt_ev_bucket``, rate and burst in the config map).

Hooks (design.md §2 "Hooks", "L3 devices"): one C source, one object per
hook and link layer (OBJECTS; bpf/hook.h).  XDP on Ethernet devices, where it
drops earliest; TC ingress (clsact, direct-action, at netoken's handle and
priority, netoken/tc.py) on veths, where XDP would switch off TSO on the
peer, and on L3 devices (tun, WireGuard, ipip, sit, gre), whose packets
start at the IP header.  Every object has the same maps, so the hook changes
nothing of what the guard shares or counts.

Every guard of a network namespace shares one set of these maps (SHARED_MAPS,
pinned once in the namespace's state directory); only the counters
(``nt_guard_stats``, ``nt_key_stats``) and the program are per interface.

Decisions where docs/design.md is silent:

- The guard config is per network namespace, not per interface: attaching
  or applying a config on one interface applies it to every guard of the
  namespace (the command says so), and ``--mode`` is one override for all of
  them.  A node's interfaces protect the node's destinations, and one
  replay cache only means something under one set of keys and skew; two
  configs would need two caches, the memory this sharing saves.
- The replay cache is sized by the namespace's first guard.  A later
  attach with another ``replay_cache`` resizes it only if it is the
  namespace's only guard (as before); with others it keeps the live size and
  says how to resize.
- Events of all guards come through one ring, each naming its interface;
  ``monitor IFACE`` filters.  The event rate limit is per namespace (per CPU).

- Static tokens come from ``tokens = [...]`` in ``[[guard.protect]]`` and are
  accepted only by that entry; they skip the replay cache (every SYN of a
  static client carries the same token).
- Only tokens whose tag verified are looked up in or added to the replay
  cache, so forged floods cannot evict real entries.  A token stays known
  until another accepted token takes its slot: size ``replay_cache`` well
  above the legitimate SYN rate times (2 * skew + 1) * window (an accepted
  token survives N later ones with probability about e^(-N/slots)).  An
  8-byte slot instead of an LRU hash entry (~90 bytes with its node) and an
  array look-up plus one compare-and-swap instead of an LRU insert keep the
  first sight of a valid SYN about as cheap as a bare MAC check.
- Events cover every rejected SYN, dropped or passed by monitor mode (that is
  what monitor mode is for); ``events + events_suppressed + events_lost ==
  dropped + monitored``.  The rate and burst are per CPU.
- The global ``action`` argument of configure() overrides every entry (the
  CLI's ``--mode``); without it each entry's own action, else ``[guard]
  action``, applies.
- IPv6 Hop-by-Hop, Routing and Destination Options headers and AH (up to
  layout.MAX_IP6_EXT of them, bpf/parsing.h) are walked to reach TCP, so they
  cannot carry a SYN past the guard.
- Packets whose TCP header the guard cannot check (design.md §2 "Fragments",
  "Fail closed"): TCP fragments (``fragment``), IPv6 chains longer than the
  walk or with a header it cannot walk (``ipv6_ext``), chains or TCP headers
  cut short (``bad_header``).  They have no port the guard can trust, so the
  destination address decides: if any protect entry covers it they are
  verdicts, dropped or monitored like rejected SYNs under the first covering
  entry that drops (else the first, all monitoring; ``--mode`` overrides as
  for SYNs), with an event whose ports are 0.  Otherwise, and for fragments
  with ``[guard] fragments = "pass"``, they pass as ``*_passed``.  Non-TCP
  fragments and ESP pass (``fragment_passed``, ``not_tcp``); so does a frame
  without a readable IP header, which the kernel drops itself.
- A SYN to a protected destination whose TCP header is broken (doff < 5,
  options past the IP length or the frame) is ``malformed``.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from . import layout, links, program, state, tc
from .config import DEFAULT_REPLAY_CACHE, Config, ConfigError, Protect
from .datapath import add_keys, event_addr, sync_keys, sync_map, u32
from .entries import PROTECT_HALF, guard_config_value, guard_entries, protect_value
from .errors import NetokenError
from .libbpf import (
    BPF_ANY,
    BPF_PROG_TYPE_SCHED_CLS,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    BPFError,
    Map,
    Program,
    RingBuffer,
    xdp_attach,
    xdp_detach,
    xdp_query,
)
from .program import PinnedProgram, ProgramRole
from .state import PROG_PIN, RoleState

PROG_NAME = "netoken_guard"
MAPS = (
    "nt_guard_config",
    "nt_keys",
    "nt_protect",
    "nt_static",
    "nt_dst_v4",
    "nt_dst_v6",
    "nt_replay",
    "nt_guard_stats",
    "nt_key_stats",
    "nt_guard_events",
    "nt_ev_bucket",
)
# One set per network namespace, reused by every guard there: one replay
# cache (a token accepted on one interface is a replay on all the others),
# one config (keys, protect entries, static tokens, prefixes, action), one
# event ring with one rate limit.  Only the counters are per interface.
SHARED_MAPS = (
    "nt_guard_config",
    "nt_keys",
    "nt_protect",
    "nt_static",
    "nt_dst_v4",
    "nt_dst_v6",
    "nt_replay",
    "nt_guard_events",
    "nt_ev_bucket",
)
OWN_MAPS = tuple(m for m in MAPS if m not in SHARED_MAPS)

# Events per second and bucket depth, per CPU.  Enough to see who is being
# dropped; a flood costs user space at most this much per CPU.
DEFAULT_EVENT_RATE = 100
DEFAULT_EVENT_BURST = 200

ROLE_NAME = "guard"
# Where a resized replay cache waits until its program is attached (bpffs
# refuses dots in names).
REPLAY_PIN_NEW = "nt_replay_new"
# The maps configure() writes: what a failed replace restores for the
# program that keeps running.
CONFIG_MAPS = ("nt_guard_config", "nt_keys", "nt_protect", "nt_static", "nt_dst_v4", "nt_dst_v6")

XdpMode = Literal["native", "generic"]
_MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}

Hook = Literal["xdp", "tc"]
HookRequest = Literal["auto", "xdp", "tc"]
HOOKS = ("auto", "xdp", "tc")
# The object for each (hook, link layer); there is no XDP object for L3
# devices: auto picks TC there.
OBJECTS = {("xdp", "ethernet"): "guard", ("tc", "ethernet"): "guard_tc",
           ("tc", "l3"): "guard_tc_l3"}
# What the program returns for a packet it lets through or drops (TC:
# TC_ACT_UNSPEC, as the u32 BPF_PROG_TEST_RUN reports, and TC_ACT_SHOT).
RETVALS: dict[str, dict[str, int]] = {
    "xdp": {"pass": 2, "drop": 1},
    "tc": {"pass": 0xFFFFFFFF, "drop": 2},
}


class GuardError(NetokenError):
    """A guard operation failed for a reason the user can act on (one line)."""


def check(cfg: Config) -> None:
    """Reject, as a ConfigError, a config the guard cannot run or its maps
    could not hold; run before anything is loaded so a bad config never
    half-applies."""
    guard_entries(cfg)


@dataclass(frozen=True)
class GuardEvent:
    """One rejected SYN (dropped, or passed in monitor mode)."""

    ts_ns: int
    ifindex: int
    protect: int  # index of the [[guard.protect]] entry
    verdict: str  # one of layout.GUARD_VERDICTS, never "ok"
    action: str  # "drop" or "monitor"
    family: int
    mode: str  # "mac", "static", or "" when no option could be read
    key_id: int | None  # mac mode only
    epoch: int | None  # reconstructed full epoch, once the key was known
    saddr: str
    daddr: str
    sport: int
    dport: int
    nonce: bytes
    tag: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> GuardEvent:
        e = layout.NtGuardEvent.from_bytes(data)
        mode = {layout.MODE_MAC: "mac", layout.MODE_STATIC: "static"}.get(e.mode, "")
        mac = mode == "mac"
        return cls(
            ts_ns=e.ts_ns,
            ifindex=e.ifindex,
            protect=e.protect,
            verdict=layout.GUARD_REASONS[e.verdict],
            action=layout.GUARD_ACTIONS[e.action],
            family=e.family,
            mode=mode,
            key_id=e.key_id if mac else None,
            epoch=e.epoch if mac and e.verdict not in _NO_EPOCH else None,
            saddr=event_addr(e.family, e.saddr),
            daddr=event_addr(e.family, e.daddr),
            sport=e.sport,
            dport=e.dport,
            nonce=bytes(e.nonce) if mac else b"",
            tag=bytes(e.tag[: layout.TAG_LEN]) if mac else bytes(e.tag) if mode else b"",
        )


# Verdicts reached before the epoch is reconstructed.
_NO_EPOCH = frozenset(
    layout.GUARD_REASON[v] for v in ("missing", "malformed", "unknown_key")
)


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


def _attached(idx: int) -> tuple[int, str] | None:
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


def _ours_or_fail(ifname: str, prog_id: int, mode: str, verb: str = "replace") -> Program:
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


def _tc_ours_or_fail(ifname: str, prog_id: int, verb: str = "replace") -> None:
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


def attached_tc(ifname: str) -> TcAttachment | None:
    """netoken's guard at IFNAME's TC ingress, or None."""
    idx = Guard.ifindex(ifname)
    prog_id = tc.query(idx, "ingress")
    if prog_id is None:
        return None
    try:
        _tc_ours_or_fail(ifname, prog_id)
    except GuardError:
        return None
    return TcAttachment(idx, prog_id, False)


def attached(ifname: str) -> XdpAttachment | None:
    """netoken's guard on IFNAME, or None (also when a foreign program is there)."""
    idx = Guard.ifindex(ifname)
    cur = _attached(idx)
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
    idx = Guard.ifindex(ifname)
    prog_id = tc.query(idx, "ingress")
    if prog_id is not None:
        _tc_ours_or_fail(ifname, prog_id, "detach")
        tc.detach(idx, "ingress")
        return True
    cur = _attached(idx)
    if cur is None:
        return False
    prog_id, mode = cur
    with _ours_or_fail(ifname, prog_id, mode, "detach") as prog:
        try:
            # old_prog_fd: detach only if it is still this program.
            xdp_detach(idx, _MODE_FLAGS[mode], old_prog_fd=prog)
        except BPFError as e:
            raise GuardError(_detach_problem(ifname, idx, e)) from None
    return True


class Guard(PinnedProgram):
    """The guard: netoken_guard at XDP or TC ingress, and its maps (see PinnedProgram)."""

    ROLE = ROLE_NAME
    OBJECT = "guard"
    PROG_NAME = PROG_NAME
    MAPS = MAPS
    Error = GuardError
    VERB = "guard"
    CONFIG_MAP = "nt_guard_config"
    CONFIG_STRUCT = layout.NtGuardConfig
    STATS_MAP = "nt_guard_stats"
    REASONS = layout.GUARD_REASONS
    EVENTS_MAP = "nt_guard_events"
    EVENT = GuardEvent
    # A resized replay cache waits as REPLAY_PIN_NEW until its program runs.
    STAGED_MAPS: ClassVar[Mapping[str, str]] = {"nt_replay": REPLAY_PIN_NEW}
    SHARED_MAPS = SHARED_MAPS
    # Guards pinned before the rate limit was shared have no pin for it.
    LATE_MAPS = ("nt_ev_bucket",)

    config: Config | None = None  # what configure() last wrote

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        # A fact of the program, so a guard reopened from its pins knows it too.
        self.hook: Hook = "tc" if self.prog.type == BPF_PROG_TYPE_SCHED_CLS else "xdp"

    @classmethod
    def load(
        cls,
        replay_cache: int = DEFAULT_REPLAY_CACHE,
        reuse: Mapping[str, Map] | None = None,
        hook: Hook = "xdp",
        framing: str = "ethernet",
    ) -> Guard:
        """Load the guard for HOOK ("xdp" or "tc") and a device of FRAMING
        ("ethernet", or "l3": packets start at the IP header; TC only) with a
        replay cache of REPLAY_CACHE entries.

        Maps named in REUSE are shared instead of created, which is how a
        replacement program keeps the live entries, counters and replay cache
        of the one it replaces, at either hook.  The cache size is fixed at
        load: configure() cannot change it."""
        name = OBJECTS.get((hook, framing))
        if name is None:
            raise GuardError(f"no guard for hook {hook!r} on {framing!r} devices "
                             f"(there are: {', '.join(f'{h}/{f}' for h, f in OBJECTS)})")
        g = cls._load_object(reuse, max_entries={"nt_replay": replay_slots(replay_cache)},
                             object_name=name)
        g.framing = framing
        return g

    def retval(self, outcome: Literal["pass", "drop"]) -> int:
        """What this program returns for a packet it lets through or drops."""
        return RETVALS[self.hook][outcome]

    @property
    def replay_cache(self) -> int:
        return self.maps["nt_replay"].max_entries

    def configure(
        self,
        cfg: Config,
        *,
        action: Literal["drop", "monitor"] | None = None,
        event_rate: int = DEFAULT_EVENT_RATE,
        event_burst: int = DEFAULT_EVENT_BURST,
    ) -> None:
        """Make the maps hold exactly CFG's [guard]: keys, entries, tokens, option.

        ACTION, if given, overrides every entry's action (the CLI's --mode).
        Safe on a live, attached guard: each SYN sees the old or the new entry
        for its destination, and a key or token that both configs accept is
        accepted throughout.
        """
        if action not in (None, "drop", "monitor"):
            raise GuardError(f"action must be 'drop' or 'monitor', got {action!r}")
        if not 0 <= event_rate <= layout.MAX_EVENT_RATE:
            raise GuardError(f"event rate {event_rate} is out of range 0..{layout.MAX_EVENT_RATE}")
        if not 0 <= event_burst <= layout.MAX_EVENT_RATE:
            raise GuardError(f"event burst {event_burst} is out of range 0..{layout.MAX_EVENT_RATE}")
        gen = 1 - self._config().generation
        base = gen * PROTECT_HALF
        entries = guard_entries(cfg, base)
        g = cfg.guard
        assert g is not None

        # 1. Everything the new entries refer to, next to the old state.  The
        # settings go first so that a first configure protects nothing until
        # kind and ExID are there; the generation flips only after step 2, so
        # an interrupted configure never leaves the LPM pointing at the half
        # the next one will overwrite.
        conf = self.maps["nt_guard_config"]
        conf.update(u32(0), guard_config_value(cfg, 1 - gen, action, event_rate, event_burst))
        add_keys(self.maps["nt_keys"], cfg.keys)
        for i, entry in enumerate(g.protect):
            self.maps["nt_protect"].update(u32(base + i), protect_value(g, entry, i))
        for k, v in entries.statics.items():
            self.maps["nt_static"].update(k, v)
        # 2. Repoint: prefixes that stay are overwritten in one update each.
        sync_map(self.maps["nt_dst_v4"], entries.v4)
        sync_map(self.maps["nt_dst_v6"], entries.v6)
        conf.update(u32(0), guard_config_value(cfg, gen, action, event_rate, event_burst))
        # 3. Nothing points at the old half any more: drop what only it used.
        sync_map(self.maps["nt_static"], entries.statics)
        sync_keys(self.maps["nt_keys"], cfg.keys)
        self.config = cfg

    def attach(self, ifname: str, mode: XdpMode | None = None) -> XdpAttachment | TcAttachment:
        """Attach to IFNAME's hook: XDP or TC ingress, as loaded.

        At XDP, MODE None lets the kernel choose: native when the driver
        supports XDP, generic otherwise.  A netoken guard already there is
        replaced (atomically when the mode stays); any other XDP program is
        left alone and GuardError is raised.  At TC the guard takes netoken's
        place on the clsact ingress hook (created if missing) in one atomic
        replace; other filters there keep running, after it.
        """
        idx = self.check_device(ifname)
        if self.hook == "tc":
            if mode is not None:
                raise GuardError(f"{ifname}: an XDP mode ({mode}) applies to the XDP hook only")
            prev = tc.query(idx, "ingress")
            if prev is not None:
                _tc_ours_or_fail(ifname, prev)
            created = tc.ensure_clsact(idx)
            try:
                filt = tc.attach(idx, "ingress", self.prog.fd)
            except BPFError as e:
                if created:
                    tc.destroy_clsact_if_empty(ifname, idx)
                raise GuardError(f"{ifname}: cannot attach the guard at tc ingress: "
                                 f"{e.strerror}") from None
            return TcAttachment(idx, filt.prog_id, created)
        if mode is not None and mode not in _MODE_FLAGS:
            raise GuardError(f"XDP mode must be 'native' or 'generic', got {mode!r}")
        cur = _attached(idx)
        flags = _MODE_FLAGS[mode] if mode else 0
        try:
            if cur is None:
                xdp_attach(idx, self.prog, flags | XDP_FLAGS_UPDATE_IF_NOEXIST)
            else:
                prog_id, cur_mode = cur
                with _ours_or_fail(ifname, prog_id, cur_mode) as old:
                    if prog_id == self.prog.id and mode in (None, cur_mode):
                        pass
                    elif mode is None or mode == cur_mode:
                        xdp_attach(idx, self.prog, _MODE_FLAGS[cur_mode], old_prog_fd=old)
                    else:
                        # The kernel keeps one mode per device: switching
                        # leaves a moment with no guard.
                        xdp_detach(idx, _MODE_FLAGS[cur_mode], old_prog_fd=old)
                        xdp_attach(idx, self.prog, flags | XDP_FLAGS_UPDATE_IF_NOEXIST)
        except BPFError as e:
            raise GuardError(_attach_problem(ifname, idx, mode, e)) from None
        now = _attached(idx)
        if now is None or now[0] != self.prog.id:
            raise GuardError(f"{ifname}: XDP attach reported success but the guard is not attached")
        return XdpAttachment(idx, now[0], now[1])  # type: ignore[arg-type]

    def _check_framing(self, ifname: str, framing: str) -> None:
        if self.hook == "xdp" and framing == "l3":
            raise GuardError(_no_xdp_on_l3(ifname))
        super()._check_framing(ifname, framing)

    def key_stats(self) -> dict[int, dict[str, int]]:
        """{key id: {"ok": n, "bad": n}} for every key id seen in a mac option.

        "bad" counts unknown_key, stale, bad_tag and replay verdicts."""
        return _key_stats(self.maps["nt_key_stats"])

    def events(self, callback: Callable[[GuardEvent], object]) -> RingBuffer:
        """A ring buffer that calls CALLBACK(GuardEvent) per rejected SYN."""
        return super().events(callback)


def _no_xdp_on_l3(ifname: str) -> str:
    return (f"{ifname} is an L3 device (packets start at the IP header), which the XDP guard "
            f"cannot parse; use --hook tc (what --hook auto picks there)")


def choose_hook(ifname: str, requested: HookRequest, dev: links.Link) -> tuple[Hook, str]:
    """(the hook, why) for REQUESTED on device DEV (design.md §2 "Hooks")."""
    if requested == "xdp":
        if dev.l3:
            raise GuardError(_no_xdp_on_l3(ifname))
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


def _pinned() -> list[tuple[RoleState, int]]:
    """(state, prog id) of netoken's guards pinned for this network namespace."""
    out = []
    for st in state.all_states():
        if st.role == ROLE_NAME and state.in_this_netns(st):
            # Detached meanwhile: then it guards nothing.
            with contextlib.suppress(OSError), Program.from_pinned(
                st.pin(PROG_PIN)
            ) as p:
                out.append((st, p.id))
    return out


def pinned_prog_ids() -> set[int]:
    """Ids of netoken's guard programs pinned for this network namespace."""
    return {prog_id for _, prog_id in _pinned()}


def side_doors() -> list[links.SideDoor]:
    """The devices of this network namespace that let traffic in without
    passing a guard (see netoken/links.py); none without any guard here."""
    pinned = _pinned()
    ids = {prog_id for _, prog_id in pinned}
    # Guards at TC: where the kernel runs one of them at netoken's place.
    at_tc = set()
    for st, prog_id in pinned:
        with contextlib.suppress(OSError):
            if tc.query(st.ifindex, "ingress") == prog_id:
                at_tc.add(st.ifindex)
    return links.side_doors(ids, tc_guarded=frozenset(at_tc))


# The kernel keeps a device's XDP program fixed while a device stacked on it
# (a vxlan using it as underlay, a VLAN, its bond) has one: "Cannot attach
# when an upper device already has a program", as EEXIST, also for detach.
_UPPER_HAS_PROG = "upper device already has a program"


def _upper_problem(ifname: str, idx: int, e: BPFError, doing: str) -> str | None:
    if e.errno != errno.EEXIST or _UPPER_HAS_PROG not in e.log:
        return None
    names = ", ".join(d.ifname for d in links.uppers(idx, links.links()) if d.xdp_prog_ids)
    names = names or "a device on top of it"
    return (f"{ifname}: cannot {doing} the guard while {names} (on top of {ifname}) has an XDP "
            f"program, a kernel rule: detach the guard from {names} first, then attach it there "
            f"again (`netoken apply` updates a guard's config without reattaching)")


def _detach_problem(ifname: str, idx: int, e: BPFError) -> str:
    return (_upper_problem(ifname, idx, e, "detach")
            or f"{ifname}: cannot detach the netoken guard: {e.strerror}")


def _attach_problem(ifname: str, idx: int, mode: XdpMode | None, e: BPFError) -> str:
    upper = _upper_problem(ifname, idx, e, "attach or replace")
    if upper is not None:
        return upper
    if e.errno == errno.EOPNOTSUPP and mode == "native":
        return f"{ifname}: the driver does not support native XDP; use generic mode"
    if e.errno in (errno.EBUSY, errno.EEXIST):
        return f"{ifname}: another XDP program was attached meanwhile; not replacing it"
    where = f" in {mode} mode" if mode else ""
    return f"{ifname}: cannot attach the guard{where}: {e.strerror}"


def _key_stats(m: Map) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for kid in range(layout.MAX_KEYS):
        ok, bad = (
            sum(int.from_bytes(v[:8], "little") for v in m.lookup_percpu(u32(kid * 2 + s)) or [])
            for s in (layout.KEY_STAT_OK, layout.KEY_STAT_BAD)
        )
        if ok or bad:
            out[kid] = {"ok": ok, "bad": bad}
    return out


# --------------------------------------------------------------------------
# pinned lifecycle: what `netoken guard attach|detach` and `netoken apply` do
#
# Decisions:
# - `--mode` is part of the attachment, not of the config: it is kept in the
#   metadata and is sticky, like the XDP mode: `apply` and attaching again
#   without `--mode` keep it (and say so), only `--mode config` clears it.
#   An operator who put a guard into monitor mode by hand must not see it
#   switch to drop because a unit or the agent re-attached it.
# - The replay cache's size is fixed when a program is loaded.  Attaching
#   again with a different `replay_cache` gives the new program a new cache,
#   filled with the tokens of the old one, each at its slot for the new size
#   (slots hold no epoch, so all of them); a second pass after the swap
#   copies what the old program accepted meanwhile.  `apply` cannot resize
#   it and says so.
# - Switching between native and generic XDP needs a detach first (the
#   kernel keeps one mode per device), so that replace has a short window
#   without a guard; every other replace is atomic.
# - The hook is sticky like --mode when forced: attaching again without
#   --hook keeps a forced `xdp` or `tc`; `auto` (also the default for a
#   first attach) decides from the device every time.  --xdp-mode implies
#   --hook xdp.
# - Switching hooks (xdp <-> tc) attaches the new program first and removes
#   the old one after, so there is no moment without a guard.  Both use the
#   namespace's replay cache, so it is kept; a SYN that arrives in the moment
#   both run is checked by both, and the second sees the token the first
#   just accepted: dropped as a replay, the client retransmits a second
#   later with a fresh nonce.  The window is two syscalls wide; the other
#   order would leave it unguarded instead.


def _ports_meta(p: Protect) -> list[int | str]:
    return [r.lo if r.lo == r.hi else str(r) for r in p.ports]


def _config_meta(cfg: Config) -> dict[str, Any]:
    g = cfg.guard
    assert g is not None
    return {
        **program.config_meta(cfg),
        "guard": {
            "action": g.action,
            "skew": g.skew,
            "replay_cache": g.replay_cache,
            # Static tokens are credentials like keys: only their number.
            "protect": [
                {
                    "destinations": [str(n) for n in p.destinations],
                    "ports": _ports_meta(p),
                    "keys": list(p.keys),
                    "action": g.action_for(p),
                    "tokens": len(p.tokens),
                }
                for p in g.protect
            ],
        },
    }


def _snapshot(maps: Mapping[str, Map]) -> dict[str, dict[bytes, bytes]]:
    return {
        name: {k: v for k, v in maps[name].items() if isinstance(v, bytes)}
        for name in CONFIG_MAPS
    }


def _restore(maps: Mapping[str, Map], snap: dict[str, dict[bytes, bytes]]) -> None:
    """Put SNAP back into MAPS, in the order configure() writes them."""
    for name in ("nt_keys", "nt_protect"):
        m = maps[name]
        for k, v in snap[name].items():
            if m.lookup(k) != v:
                m.update(k, v)
    for k, v in snap["nt_static"].items():
        maps["nt_static"].update(k, v)
    sync_map(maps["nt_dst_v4"], snap["nt_dst_v4"])
    sync_map(maps["nt_dst_v6"], snap["nt_dst_v6"])
    for k, v in snap["nt_guard_config"].items():
        maps["nt_guard_config"].update(k, v)
    sync_map(maps["nt_static"], snap["nt_static"])


def replay_slots(entries: int) -> int:
    """The replay cache's real size: ENTRIES rounded up to a power of two (the
    guard masks a hash to find a token's slot)."""
    return 1 << max(entries - 1, 0).bit_length()


def _copy_replay(src: Map, dst: Map, done: set[int]) -> int:
    """Move the tokens SRC holds into DST, a cache of another size.

    A slot holds no epoch or key, so every token is copied: one that can no
    longer be a replay (stale epoch, removed key) is rejected before the cache
    is consulted and only takes a slot a fresh token will claim anyway."""
    copied = 0
    for _, values, _n in src.batches():
        for entry in memoryview(values).cast("Q"):  # the slots, u64 in host order
            if not entry or entry in done:
                continue
            dst.update(u32(layout.replay_index(entry, dst.max_entries)),
                       entry.to_bytes(8, sys.byteorder), BPF_ANY)
            done.add(entry)
            copied += 1
    return copied


def _restore_xdp(idx: int, new_id: int, prev: tuple[int, str] | None) -> None:
    """Undo what a failed attach did to IDX's XDP hook: the previous program
    back, or none.  A change someone else made meanwhile is left alone."""
    cur = _attached(idx)
    if cur == prev or (cur is not None and cur[0] != new_id):
        return
    with contextlib.ExitStack() as stack:
        prev_prog = stack.enter_context(Program.from_id(prev[0])) if prev else None
        if cur is not None:
            cur_prog = stack.enter_context(Program.from_id(cur[0]))
            if prev_prog is not None and prev is not None and cur[1] == prev[1]:
                xdp_attach(idx, prev_prog, _MODE_FLAGS[prev[1]], old_prog_fd=cur_prog)
                return
            xdp_detach(idx, _MODE_FLAGS[cur[1]], old_prog_fd=cur_prog)
        if prev_prog is not None and prev is not None:
            xdp_attach(idx, prev_prog, _MODE_FLAGS[prev[1]] | XDP_FLAGS_UPDATE_IF_NOEXIST)


Mode = Literal["drop", "monitor", "config"]


def override_after(mode: Mode | None, current: str | None) -> str | None:
    """The --mode override once MODE is given (None: keep CURRENT)."""
    if mode is None:
        return current
    if mode not in ("drop", "monitor", "config"):
        raise GuardError(f"--mode must be 'drop', 'monitor' or 'config', got {mode!r}")
    return None if mode == "config" else mode


def _requested_hook(
    hook: HookRequest | None, xdp_mode: XdpMode | None, old_meta: dict[str, Any] | None, idx: int
) -> HookRequest:
    """What the caller asks for: HOOK, else the hook forced at the last
    attach (sticky), else auto; --xdp-mode means XDP."""
    if hook is not None and hook not in HOOKS:
        raise GuardError(f"hook must be 'auto', 'xdp' or 'tc', got {hook!r}")
    if xdp_mode is not None:
        if xdp_mode not in _MODE_FLAGS:
            raise GuardError(f"XDP mode must be 'native' or 'generic', got {xdp_mode!r}")
        if hook == "tc":
            raise GuardError("--xdp-mode applies to the XDP hook, not to --hook tc")
        return "xdp"
    if hook is not None:
        return hook
    sticky = (old_meta or {}).get("hook_requested")
    if sticky in ("xdp", "tc") and (old_meta or {}).get("ifindex") == idx:
        return sticky
    return "auto"


def _previous(ifname: str, idx: int, chosen: Hook) -> tuple[tuple[int, str] | None, int | None]:
    """netoken's guard at IDX's XDP hook (prog id, mode) and at its TC ingress
    (prog id) before an attach at CHOSEN.  Checked before anything is loaded
    or a shared map is touched: what runs at the hook taken must be ours
    (GuardError otherwise); at the other one a program not ours is left
    alone, as if none were there."""
    prev_xdp = _attached(idx)
    prev_tc = tc.query(idx, "ingress")
    if prev_tc is not None:
        try:
            _tc_ours_or_fail(ifname, prev_tc)
        except GuardError:
            if chosen == "tc":
                raise
            prev_tc = None
    if prev_xdp is not None:
        try:
            _ours_or_fail(ifname, *prev_xdp).close()
        except GuardError:
            if chosen == "xdp":
                raise
            prev_xdp = None
    return prev_xdp, prev_tc


def attach_pinned(
    ifname: str,
    cfg: Config,
    *,
    action: Mode | None = None,
    xdp_mode: XdpMode | None = None,
    hook: HookRequest | None = None,
) -> dict[str, Any]:
    """Load, configure, pin and attach the guard on IFNAME at HOOK.

    HOOK "auto" picks TC ingress for veths and L3 devices and XDP otherwise
    (choose_hook); None keeps a hook forced at an earlier attach, else auto.
    The new program uses the namespace's shared maps (replay cache, config,
    events; created by the namespace's first guard) and, with a guard
    already pinned on IFNAME, that one's counters: an atomic replace, where
    the maps get the new config while the old program still runs and one XDP
    or tc replace swaps the programs.  A switch between hooks attaches the
    new one before it removes the old (see the notes above).  The config
    applies to every guard of the namespace.  An XDP program or tc filter
    netoken did not install is never replaced.  On any failure the previous
    program and map contents are put back and whatever this call created is
    removed.
    """
    check(cfg)
    g = cfg.guard
    assert g is not None
    override_after(action, None)  # bad values fail before anything is touched
    _requested_hook(hook, xdp_mode, None, 0)
    notes: list[str] = []
    copied: int | None = None
    created_clsact = False
    clsact = None
    with Guard.attaching(ifname) as t:
        idx, st = t.idx, t.st
        requested = _requested_hook(hook, xdp_mode, t.old_meta, idx)
        chosen, why = choose_hook(ifname, requested, t.dev)
        prev_xdp, prev_tc = _previous(ifname, idx, chosen)
        switch_from: Hook | None = (
            "xdp" if chosen == "tc" and prev_xdp else "tc" if chosen == "xdp" and prev_tc else None
        )
        others = [o for o in Guard.siblings(st) if o.exists()]
        shared = Guard.open_shared(st)
        for m in shared.values():
            t.closing.callback(m.close)
        old = t.old
        # What the new program shares: the namespace's maps; a guard
        # pinned before maps were shared brings its own if there are
        # none yet (they become the namespace's).  Its counters stay.
        base = shared or ({n: old.maps[n] for n in SHARED_MAPS if n in old.maps}
                          if old is not None else {})
        reuse = dict(base)
        if old is not None:
            reuse.update({n: old.maps[n] for n in OWN_MAPS})
        live = reuse.get("nt_replay")
        cache = replay_slots(g.replay_cache)
        if live is not None and live.max_entries != cache:
            if others:
                notes.append(
                    f"replay_cache {cache}: the replay cache is shared by the "
                    f"{len(others) + 1} guards of this network namespace and keeps its "
                    f"{live.max_entries} entries (detach them all, then attach, to resize)")
                cache = live.max_entries
            else:
                del reuse["nt_replay"]
        if "nt_guard_config" in reuse:
            current = live_override_of(reuse["nt_guard_config"])
            # The maps the running guards use get the new config before
            # the swap: a failure gives them their own back, whether or
            # not this interface had a guard.
            snap = _snapshot(reuse)
            t.on_failure(lambda: _restore(reuse, snap))
        else:
            current = None
        override = override_after(action, current)
        if not shared:
            # Created here: gone again if this attach fails.
            t.on_failure(lambda: Guard.shared_state(st).remove())
        t.new = new = Guard.load(cache, reuse=reuse, hook=chosen, framing=t.framing)
        new.configure(cfg, action=override)  # type: ignore[arg-type]
        # Tokens the old program accepted into a cache the new one does
        # not use (resized, or its own before sharing) are still replays.
        source = old.maps["nt_replay"] if old is not None else None
        if source is not None and source.id == new.maps["nt_replay"].id:
            source = None
        done: set[int] = set()
        if source is not None:
            copied = _copy_replay(source, new.maps["nt_replay"], done)
        new.pin(st)
        # The program a switch removes, opened now: the moment both
        # hooks run (see the notes above) should be as short as can be.
        oldp = t.closing.enter_context(Program.from_id(prev_xdp[0])) \
            if switch_from == "xdp" and prev_xdp else None
        if chosen == "xdp":

            def unattach() -> None:
                with contextlib.suppress(Exception):
                    _restore_xdp(idx, new.prog.id, prev_xdp)

            t.on_failure(unattach)
            att: XdpAttachment | TcAttachment = new.attach(ifname, xdp_mode)
        else:
            owned = tc.netoken_created_clsact(ifname, idx, st.read_meta())
            att = new.attach(ifname)
            created_clsact = att.created_clsact  # type: ignore[union-attr]
            if created_clsact:
                t.on_failure(lambda: tc.destroy_clsact_if_empty(ifname, idx))
            t.on_failure(lambda: tc.restore(idx, "ingress", prev_tc))
            created_clsact = created_clsact or owned
        # The new guard runs: now the old hook's goes.
        if switch_from == "xdp":
            assert prev_xdp is not None and oldp is not None
            try:
                xdp_detach(idx, _MODE_FLAGS[prev_xdp[1]], old_prog_fd=oldp)
            except BPFError as e:
                raise GuardError(_detach_problem(ifname, idx, e)) from None
            t.on_failure(lambda: _restore_xdp(idx, 0, prev_xdp))
        elif switch_from == "tc":
            tc.detach(idx, "ingress")
            t.on_failure(lambda: tc.restore(idx, "ingress", prev_tc))
            if tc.netoken_created_clsact(ifname, idx, st.read_meta()):
                clsact = tc.destroy_clsact_if_empty(ifname, idx)
        if source is not None and copied is not None:
            copied += _copy_replay(source, new.maps["nt_replay"], done)
        t.commit({"xdp_mode": xdp_mode, "hook": chosen, "hook_requested": requested,
                  "hook_reason": why, "link": t.framing, "created_clsact": created_clsact}, {})
        _write_shared_meta(st, cfg, override)
        prog_id, tag = new.prog.id, new.prog.tag
        entries = new.replay_cache
        resized = live is not None and live.id != new.maps["nt_replay"].id \
            and live.max_entries != entries
    # The guard this one took the place of: at the same hook, else the one
    # it switched from.
    prev_same = prev_tc if chosen == "tc" else prev_xdp[0] if prev_xdp else None
    prev_other = prev_xdp[0] if chosen == "tc" and prev_xdp else prev_tc
    return {
        "ifname": ifname,
        "ifindex": idx,
        "role": ROLE_NAME,
        "prog_id": prog_id,
        "tag": tag,
        "hook": chosen,
        "hook_requested": requested,
        "hook_reason": why,
        "link": t.framing,
        "xdp_mode": att.mode,
        "tc": {"hook": "ingress", "handle": tc.HANDLE, "priority": tc.PRIORITY,
               "created_clsact": created_clsact} if chosen == "tc" else None,
        "replaced_prog_id": prev_same if prev_same is not None else prev_other,
        "hook_switched": f"{switch_from}->{chosen}" if switch_from else None,
        "clsact": clsact,
        "mode_switched": bool(chosen == "xdp" and prev_xdp and prev_xdp[1] != att.mode),
        "pinned": str(st.pin_dir),
        "shared": str(Guard.shared_state(st).pin_dir),
        "shared_by": len(others) + 1,
        "action": override or g.action,
        "action_override": override is not None,
        "config_action": g.action,
        "skew": g.skew,
        "replay_cache": {
            "entries": entries,
            "state": "new" if live is None else "resized" if resized else "kept",
            "copied": copied or 0,
        },
        "protect": len(g.protect),
        "keys": sorted(cfg.keys),
        "notes": notes,
    }


def _write_shared_meta(st: RoleState, cfg: Config, override: str | None) -> None:
    """The namespace's guard config, described once for every guard."""
    state.SharedState(st.netns, ROLE_NAME, st.root).write_meta({
        "version": state.META_VERSION,
        "role": ROLE_NAME,
        "netns": st.netns.as_meta(),
        "action_override": override,
        **_config_meta(cfg),
    })


def apply(ifname: str, cfg: Config) -> dict[str, Any]:
    """Make the live maps of the guard on IFNAME, and so of every guard of
    its network namespace, hold CFG; no reattach."""
    check(cfg)
    assert cfg.guard is not None
    with state.locked():
        st = Guard.state_of(ifname)
        if not st.exists():
            raise GuardError(f"no guard on {ifname} (run `netoken guard attach {ifname} -c FILE` "
                             f"first)")
        others = [o for o in Guard.siblings(st) if o.exists()]
        configured: set[int] = set()
        shared_done = False
        before: set[int] = set()
        override: str | None = None
        # One configure per set of maps: the shared one, and the own ones of
        # guards pinned before maps were shared (until they are attached again).
        for gst in [st, *others]:
            own = gst.has_pin("nt_guard_config")
            if gst is not st and not own and shared_done:
                continue
            with Guard.from_pins(gst.ifname, gst) as gd:
                cid = gd.maps["nt_guard_config"].id
                shared_done = shared_done or not own
                if cid in configured:
                    continue
                configured.add(cid)
                if gst is st:
                    before = _live_key_ids(gd.maps["nt_keys"])
                    prog_id, cache = gd.prog.id, gd.replay_cache
                    override = live_override(gd)
                kept = live_override(gd)
                gd.configure(cfg, action=kept)  # type: ignore[arg-type]
                if own:
                    meta = gst.read_meta() or {}
                    meta.update(_config_meta(cfg))
                    gst.write_meta(meta)
                else:
                    _write_shared_meta(gst, cfg, kept)
    notes = []
    if replay_slots(cfg.guard.replay_cache) != cache:
        how = (f"detach the namespace's {len(others) + 1} guards and attach them again" if others
               else f"`netoken guard attach {st.ifname}`")
        notes.append(
            f"replay_cache {cfg.guard.replay_cache} takes effect at the next {how}; "
            f"the live cache keeps {cache} entries"
        )
    return {
        "ifname": st.ifname,
        "role": ROLE_NAME,
        "prog_id": prog_id,
        "protect": len(cfg.guard.protect),
        "keys": sorted(cfg.keys),
        "keys_added": sorted(set(cfg.keys) - before),
        "keys_removed": sorted(before - set(cfg.keys)),
        "action": override or cfg.guard.action,
        "action_override": override is not None,
        "config_action": cfg.guard.action,
        "replay_cache": cache,
        "shared_by": len(others) + 1,
        "notes": notes,
    }


def live_override_of(m: Map) -> str | None:
    """The --mode override in the nt_guard_config M (None: the entries' actions)."""
    a = Guard.read_config(m).action
    name = layout.GUARD_ACTIONS[a] if a < len(layout.GUARD_ACTIONS) else "entry"
    return None if name == "entry" else name


def live_override(gd: Guard) -> str | None:
    """The --mode override the kernel runs with (None: the entries' actions)."""
    return live_override_of(gd.maps["nt_guard_config"])


def _live_key_ids(m: Map) -> set[int]:
    out = set()
    for kid in range(layout.MAX_KEYS):
        raw = m.lookup(u32(kid))
        if raw and layout.NtKey.from_bytes(raw).window:
            out.add(kid)
    return out


def _prog_desc(prog_id: int) -> dict[str, Any]:
    try:
        with Program.from_id(prog_id) as p:
            return {"id": prog_id, "name": p.name, "tag": p.tag}
    except BPFError:
        return {"id": prog_id, "name": None, "tag": None}


def detach_pinned(ifname: str) -> dict[str, Any]:
    """Remove netoken's guard and its pins from IFNAME (its name now, or
    the one the guard was attached under).

    An XDP program netoken did not install stays attached: without netoken
    state on IFNAME that is an error, with it only the pins go.  At TC only
    netoken's filter goes, and the clsact qdisc only if netoken created it
    and no filter is left on it.  An interface that is gone has taken its
    program with it; its pins are still removed.  The namespace's shared
    guard state goes with its last guard.
    """
    with state.locked(), Guard.removing(ifname) as r:
        idx, name = r.idx, r.ifname
        removed: dict[str, Any] | None = None
        foreign: dict[str, Any] | None = None
        clsact = None
        if idx is not None:
            cur_tc = tc.query(idx, "ingress")
            if cur_tc is not None:
                try:
                    _tc_ours_or_fail(name, cur_tc, "detach")
                except GuardError:
                    if not r.has_state:
                        raise
                    foreign = {**_prog_desc(cur_tc), "hook": "tc"}
                else:
                    tc.detach(idx, "ingress")
                    removed = {"id": cur_tc, "hook": "tc", "mode": None}
                    clsact = "kept"
                    if tc.netoken_created_clsact(name, idx, r.meta):
                        clsact = tc.destroy_clsact_if_empty(name, idx)
            cur = _attached(idx) if removed is None else None
            if cur is None and removed is None and foreign is None and not r.has_state:
                raise GuardError(f"no netoken guard on {name}")
            if cur is not None:
                try:
                    prog = _ours_or_fail(name, *cur, "detach")
                except GuardError:
                    if not r.has_state:
                        raise
                    foreign = {**_prog_desc(cur[0]), "mode": cur[1], "hook": "xdp"}
                else:
                    with prog:
                        try:
                            xdp_detach(idx, _MODE_FLAGS[cur[1]], old_prog_fd=prog)
                        except BPFError as e:
                            raise GuardError(
                                _detach_problem(name, idx, e)
                            ) from None
                    removed = {"id": cur[0], "hook": "xdp", "mode": cur[1]}
        others = Guard.siblings(r.st)
        if not others:
            Guard.shared_state(r.st).remove()
    return {
        "ifname": name,
        "ifindex": r.st.ifindex,
        "attached_as": (r.meta or {}).get("ifname"),
        "role": ROLE_NAME,
        "removed_prog_id": removed["id"] if removed else None,
        "hook": removed["hook"] if removed else None,
        "xdp_mode": removed["mode"] if removed else None,
        "clsact": clsact,
        "interface_present": idx is not None,
        "foreign_prog": foreign,
        "shared_state": "kept" if others else "removed",
        "guards_left": len(others),
    }


# --------------------------------------------------------------------------
# the guard as a role of the generic status / stats / monitor / apply views


def _protect_ids_from_lpm(paths: list[str], base: int) -> list[int]:
    """Entry indices the live LPM tries (pinned at PATHS) point at: what is
    protected, when the metadata that names it is gone."""
    ids: set[int] = set()
    for path in paths:
        with Map.from_pinned(path) as m:
            for k in list(m.keys()):
                raw = m.lookup(k)
                if raw:
                    r = layout.NtPortRules.from_bytes(raw)
                    ids.update(r.rules[j].policy - base for j in range(min(r.count, layout.MAX_PORT_RULES)))
    return sorted(i for i in ids if 0 <= i < PROTECT_HALF)


class GuardRole(ProgramRole):
    """The guard as netoken/roles.py lists it (see program.ProgramRole)."""

    name = ROLE_NAME
    PROGRAM = Guard
    RUNS = "XDP"  # "filter" for a guard at TC (see attachment())

    RATE_LIMITED = True

    def check(self, cfg: Config) -> None:
        check(cfg)

    def check_apply(self, cfg: Config) -> None:
        if cfg.guard is None:
            raise ConfigError(
                cfg.path, None, "no [guard] section, but a guard is attached here; add one, "
                "or stop guarding first with `netoken guard detach IFACE`"
            )
        check(cfg)

    def attach(self, ifname: str, cfg: Config, **opts: Any) -> dict[str, Any]:
        return attach_pinned(ifname, cfg, **opts)

    def apply(self, ifname: str, cfg: Config, now: float | None = None) -> dict[str, Any]:
        return apply(ifname, cfg)

    def detach(self, ifname: str) -> dict[str, Any]:
        return detach_pinned(ifname)

    def meta(self, st: RoleState) -> dict[str, Any]:
        # The config is described once for the namespace, unless this guard
        # still runs on maps of its own (pinned before maps were shared).
        own = st.read_meta() or {}
        if st.has_pin("nt_guard_config"):
            return own
        return {**(Guard.shared_state(st).read_meta() or {}), **own}

    def attachment(self, idx: int | None, meta: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
        why = {"selected": "auto" if meta.get("hook_requested", "auto") == "auto" else "forced",
               "reason": meta.get("hook_reason"), "link": meta.get("link", "ethernet")}
        hook = meta.get("hook")
        if hook is None and idx is not None:
            # No metadata to say (a ghost, or a guard from before hooks):
            # netoken's place at TC first, else XDP.
            hook = "tc" if tc.query(idx, "ingress") is not None else "xdp"
        if hook == "tc":
            return tc.query(idx, "ingress") if idx is not None else None, {
                "type": "tc",
                "qdisc": "clsact",
                "hook": "ingress",
                "handle": tc.HANDLE,
                "priority": tc.PRIORITY,
                "mode": "direct-action",
                "runs": "filter",
                **why,
            }
        live = _attached(idx) if idx is not None else None
        return live[0] if live else None, {
            "type": "xdp",
            "mode": live[1] if live else None,
            "requested": meta.get("xdp_mode") or "auto",
            **why,
        }

    def status_details(self, st: RoleState, meta: dict[str, Any], d: dict[str, Any]) -> None:
        cfgv = self.pinned_config(st)
        d["option"] = {"kind": cfgv.kind, "exid": cfgv.exid}
        override = layout.GUARD_ACTIONS[cfgv.action] if cfgv.action < len(layout.GUARD_ACTIONS) else "drop"
        d["action"] = None  # filled in below, from the entries
        d["action_override"] = override if override != "entry" else None
        d["skew"] = cfgv.skew
        d["fragments"] = layout.GUARD_FRAGMENTS_MODES[cfgv.fragments] \
            if cfgv.fragments < len(layout.GUARD_FRAGMENTS_MODES) else "drop"
        with Map.from_pinned(self.map_path(st, "nt_replay")) as m:
            d["replay_cache"] = {"entries": m.max_entries}
        d["events"] = {"rate": cfgv.event_rate, "burst": cfgv.event_burst, "per": "cpu"}

        d["keys"] = program.live_keys(self.map_path(st, "nt_keys"), meta)

        # What each entry accepts and does comes from the live half of
        # nt_protect; only destinations and ports come from the metadata.
        base = cfgv.generation * PROTECT_HALF
        described = meta.get("guard", {}).get("protect")
        ids = range(len(described)) if described is not None else _protect_ids_from_lpm(
            [self.map_path(st, n) for n in ("nt_dst_v4", "nt_dst_v6")], base)
        tokens: dict[int, int] = {}
        with Map.from_pinned(self.map_path(st, "nt_static")) as m:
            for k in list(m.keys()):
                sk = layout.NtStaticKey.from_bytes(k)
                tokens[sk.protect - base] = tokens.get(sk.protect - base, 0) + 1
        protect = []
        with Map.from_pinned(self.map_path(st, "nt_protect")) as m:
            for i in ids:
                raw = m.lookup(u32(base + i))
                p = layout.NtProtect.from_bytes(raw) if raw else layout.NtProtect()
                act = d["action_override"] or (
                    "monitor" if p.action == layout.GUARD_ACTION["monitor"] else "drop")
                info = described[i] if described is not None else {}
                protect.append({
                    "id": i + 1,  # as config errors name it: guard.protect #N
                    "destinations": info.get("destinations"),
                    "ports": info.get("ports"),
                    "keys": [kid for kid in range(layout.MAX_KEYS)
                             if (p.keys[kid // 64] >> (kid % 64)) & 1],
                    "tokens": tokens.get(i, 0),
                    "action": act,
                })
        d["protect"] = protect
        d["config_action"] = meta.get("guard", {}).get("action")
        actions = {p["action"] for p in protect}
        d["action"] = d["action_override"] or (actions.pop() if len(actions) == 1 else "per entry")

    def stats_extra(self, st: RoleState) -> dict[str, Any]:
        """Per key id: SYNs whose option named it, verified (ok) or not (bad)."""
        with Map.from_pinned(st.pin("nt_key_stats")) as m:
            ks = _key_stats(m)
        return {"keys": [{"id": kid, **v} for kid, v in sorted(ks.items())]}

    def suppressed_events(self, st: RoleState) -> int:
        """Events the in-kernel rate limit withheld (the SYNs were still counted)."""
        return self.stats(st)["events_suppressed"]

    def event_fields(self, st: RoleState) -> Callable[[GuardEvent], dict[str, Any]]:
        def fields(e: GuardEvent) -> dict[str, Any]:
            d: dict[str, Any] = {
                "verdict": e.verdict,
                "action": e.action,
                "protect": e.protect + 1,
                "family": e.family,
                "saddr": e.saddr,
                "sport": e.sport,
                "daddr": e.daddr,
                "dport": e.dport,
                "mode": e.mode or None,
                "key_id": e.key_id,
                "epoch": e.epoch,
            }
            if e.mode == "mac":
                d.update(nonce=e.nonce.hex(), tag=e.tag.hex())
            return d

        return fields


ROLE = GuardRole()
