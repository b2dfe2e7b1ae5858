"""Library API of the guard: load the XDP program, fill its maps, attach it.

Everything the CLI's `guard` verbs do goes through here, so tests and other
programs get the same behaviour as operators.

Map design (bpf/guard.bpf.c, structs in bpf/netoken.h):

- ``nt_dst_v4`` / ``nt_dst_v6``: LPM tries, destination prefix -> port rules,
  compiled by netoken/rules.py exactly as for the marker; a rule's target is
  an index into ``nt_protect``.
- ``nt_protect``: one ``struct nt_protect`` per ``[[guard.protect]]`` entry:
  its action and the key ids it accepts as a 256-bit bitmap.  Used in two
  halves like the marker's policies (see PROTECT_HALF).
- ``nt_keys``: the key slots, shared layout with the marker.
- ``nt_static``: hash set of accepted static tokens, keyed by (protect
  index, token as on the wire), so each entry accepts its own tokens.
- ``nt_replay``: LRU hash of (epoch, key id, tag, nonce) of every accepted
  mac token, sized from ``[guard] replay_cache`` before load.
- ``nt_guard_stats``: per-CPU counters by enum nt_guard_reason;
  ``nt_key_stats``: per-CPU ok/bad counters per key id.
- ``nt_guard_events``: ring buffer of rejected SYNs, rate-limited per CPU
  by a token bucket (``nt_ev_bucket``, rate and burst in the config map).

Decisions where DESIGN is silent:

- Static tokens come from ``tokens = [...]`` in ``[[guard.protect]]`` and are
  accepted only by that entry; they skip the replay cache (every SYN of a
  static client carries the same token).
- Only tokens whose tag verified are looked up in or added to the replay
  cache, so forged floods cannot evict real entries.  An entry covers a SYN
  for as long as the LRU keeps it: size ``replay_cache`` above the legitimate
  SYN rate times (2 * skew + 1) * window.  If the insert itself fails, the
  SYN (whose tag verified) is accepted and ``error`` counted.
- Events cover every rejected SYN, dropped or passed by monitor mode (that is
  what monitor mode is for); ``events + events_suppressed + events_lost ==
  dropped + monitored``.  The rate and burst are per CPU.
- The global ``action`` argument of configure() overrides every entry (the
  CLI's ``--mode``); without it each entry's own action, else ``[guard]
  action``, applies.
- IPv6 Hop-by-Hop, Routing and Destination Options headers (up to 4) are
  skipped to reach TCP, so they cannot carry a SYN past the guard; IPv4 and
  IPv6 fragments pass untouched (counted ``fragment``), as DESIGN requires.
- A SYN to a protected destination whose TCP header is broken (doff < 5,
  options past the IP length or the frame) is ``malformed``; a frame too
  short to show the TCP flags passes as ``bad_header``.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Self

from . import layout
from .config import DEFAULT_REPLAY_CACHE, Config, GuardConfig, Protect
from .datapath import (
    key_value,
    object_path,
    percpu_counters,
    realtime_minus_tai_ns,
    sync_keys,
    sync_map,
    u32,
)
from .libbpf import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    BPFError,
    BpfObject,
    Map,
    Program,
    RingBuffer,
    xdp_attach,
    xdp_detach,
    xdp_query,
)
from .rules import RuleError, compile_lpm, expand

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
)

# Protect entries live in two halves of nt_protect.  configure() writes the
# new entries (and their static tokens) into the idle half, then repoints the
# LPM entries one atomic update at a time, so a SYN always finds a complete
# entry, old or new.
PROTECT_HALF = layout.MAX_PROTECT // 2

# Events per second and bucket depth, per CPU.  Enough to see who is being
# dropped; a flood costs user space at most this much per CPU.
DEFAULT_EVENT_RATE = 100
DEFAULT_EVENT_BURST = 200

XdpMode = Literal["native", "generic"]
_MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


class GuardError(Exception):
    """A guard operation failed for a reason the user can act on (one line)."""


def ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise GuardError(f"interface {ifname!r} does not exist") from None


def _action(name: str) -> int:
    return layout.GUARD_ACTION[name]


def protect_value(cfg: GuardConfig, entry: Protect, index: int) -> bytes:
    v = layout.NtProtect(id=index, action=_action(cfg.action_for(entry)))
    for kid in entry.keys:
        v.keys[kid // 64] |= 1 << (kid % 64)
    return bytes(v)


def static_key(protect: int, token: int) -> bytes:
    k = layout.NtStaticKey(protect=protect)
    k.token[:] = list(token.to_bytes(8, "big"))
    return bytes(k)


def guard_config_value(
    cfg: Config,
    generation: int,
    action: str | None,
    event_rate: int,
    event_burst: int,
) -> bytes:
    assert cfg.guard is not None
    return bytes(
        layout.NtGuardConfig(
            kind=cfg.option.kind,
            skew=cfg.guard.skew,
            exid=cfg.option.exid,
            generation=generation,
            realtime_minus_tai_ns=realtime_minus_tai_ns(),
            event_rate=event_rate,
            event_burst=event_burst,
            action=_action(action or "entry"),
        )
    )


def _addr(family: int, raw) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    return str(ipaddress.IPv6Address(bytes(raw[:16])))


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
            saddr=_addr(e.family, e.saddr),
            daddr=_addr(e.family, e.daddr),
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


def _ours_or_fail(ifname: str, prog_id: int, mode: str) -> Program:
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
            "and was not installed by netoken; refusing to replace it"
        )
    return prog


def attached(ifname: str) -> XdpAttachment | None:
    """netoken's guard on IFNAME, or None (also when a foreign program is there)."""
    idx = ifindex(ifname)
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
    """Remove netoken's guard from IFNAME; False if none was attached.

    Raises GuardError if the XDP program there is not netoken's."""
    idx = ifindex(ifname)
    cur = _attached(idx)
    if cur is None:
        return False
    prog_id, mode = cur
    with _ours_or_fail(ifname, prog_id, mode) as prog:
        try:
            # old_prog_fd: detach only if it is still this program.
            xdp_detach(idx, _MODE_FLAGS[mode], old_prog_fd=prog)
        except BPFError as e:
            raise GuardError(f"{ifname}: cannot detach the netoken guard: {e.strerror}") from None
    return True


class Guard:
    """A loaded guard program and its maps (not necessarily attached)."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.prog: Program = obj.program(PROG_NAME)
        self.maps: dict[str, Map] = {name: obj.map(name) for name in MAPS}
        self.config: Config | None = None

    @classmethod
    def load(cls, replay_cache: int = DEFAULT_REPLAY_CACHE) -> Guard:
        """Load the guard with a replay cache of REPLAY_CACHE entries.

        The cache size is fixed at load: configure() cannot change it."""
        obj = BpfObject.open(str(object_path("guard")))
        try:
            obj.set_map_max_entries("nt_replay", replay_cache)
            obj.load()
        except BaseException:
            obj.close()
            raise
        return cls(obj)

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def replay_cache(self) -> int:
        return self.maps["nt_replay"].max_entries

    def _config(self) -> layout.NtGuardConfig:
        raw = self.maps["nt_guard_config"].lookup(u32(0))
        return layout.NtGuardConfig.from_bytes(raw) if raw else layout.NtGuardConfig()

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
        g = cfg.guard
        if action not in (None, "drop", "monitor"):
            raise GuardError(f"action must be 'drop' or 'monitor', got {action!r}")
        if g is None:
            raise GuardError(f"{cfg.path}: no [guard] section")
        if len(g.protect) > PROTECT_HALF:
            raise GuardError(f"{cfg.path}: {len(g.protect)} protect entries; the guard holds at most {PROTECT_HALF}")
        if not 0 <= event_rate <= layout.MAX_EVENT_RATE:
            raise GuardError(f"event rate {event_rate} is out of range 0..{layout.MAX_EVENT_RATE}")
        if not 0 <= event_burst <= layout.MAX_EVENT_RATE:
            raise GuardError(f"event burst {event_burst} is out of range 0..{layout.MAX_EVENT_RATE}")
        gen = 1 - self._config().generation
        base = gen * PROTECT_HALF
        statics = {
            static_key(base + i, tok): u32(1)
            for i, entry in enumerate(g.protect)
            for tok in entry.tokens
        }
        if len(statics) > layout.MAX_STATIC // 2:
            raise GuardError(
                f"{cfg.path}: {len(statics)} static tokens; the guard holds at most "
                f"{layout.MAX_STATIC // 2}"
            )
        try:
            v4, v6 = compile_lpm(
                expand(
                    (p.destinations, [(r.lo, r.hi) for r in p.ports], base + i)
                    for i, p in enumerate(g.protect)
                )
            )
        except RuleError as e:
            raise GuardError(f"{cfg.path}: guard: {e}") from None

        # 1. Everything the new entries refer to, next to the old state.  The
        # settings go first so that a first configure protects nothing until
        # kind and ExID are there; the generation flips only after step 2, so
        # an interrupted configure never leaves the LPM pointing at the half
        # the next one will overwrite.
        conf = self.maps["nt_guard_config"]
        conf.update(u32(0), guard_config_value(cfg, 1 - gen, action, event_rate, event_burst))
        keys = self.maps["nt_keys"]
        for kid, key in cfg.keys.items():
            if keys.lookup(u32(kid)) != key_value(key):
                keys.update(u32(kid), key_value(key))
        for i, entry in enumerate(g.protect):
            self.maps["nt_protect"].update(u32(base + i), protect_value(g, entry, i))
        for k, v in statics.items():
            self.maps["nt_static"].update(k, v)
        # 2. Repoint: prefixes that stay are overwritten in one update each.
        sync_map(self.maps["nt_dst_v4"], v4)
        sync_map(self.maps["nt_dst_v6"], v6)
        conf.update(u32(0), guard_config_value(cfg, gen, action, event_rate, event_burst))
        # 3. Nothing points at the old half any more: drop what only it used.
        sync_map(self.maps["nt_static"], statics)
        sync_keys(keys, cfg.keys)
        self.config = cfg

    def sync_clock(self) -> None:
        """Refresh the REALTIME-TAI offset (changes only with the TAI-UTC offset)."""
        cur = self._config()
        cur.realtime_minus_tai_ns = realtime_minus_tai_ns()
        self.maps["nt_guard_config"].update(u32(0), bytes(cur))

    def attach(self, ifname: str, mode: XdpMode | None = None) -> XdpAttachment:
        """Attach to IFNAME's XDP hook.

        MODE None lets the kernel choose: native when the driver supports
        XDP, generic otherwise.  A netoken guard already there is replaced
        (atomically when the mode stays); any other XDP program is left alone
        and GuardError is raised.
        """
        if mode is not None and mode not in _MODE_FLAGS:
            raise GuardError(f"XDP mode must be 'native' or 'generic', got {mode!r}")
        idx = ifindex(ifname)
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
            raise GuardError(_attach_problem(ifname, mode, e)) from None
        now = _attached(idx)
        if now is None or now[0] != self.prog.id:
            raise GuardError(f"{ifname}: XDP attach reported success but the guard is not attached")
        return XdpAttachment(idx, now[0], now[1])  # type: ignore[arg-type]

    def detach(self, ifname: str) -> bool:
        """Remove netoken's guard from IFNAME (see the module-level detach)."""
        return detach(ifname)

    def stats(self) -> dict[str, int]:
        """Counters by layout.GUARD_REASONS, summed over CPUs."""
        return percpu_counters(self.maps["nt_guard_stats"], layout.GUARD_REASONS)

    def key_stats(self) -> dict[int, dict[str, int]]:
        """{key id: {"ok": n, "bad": n}} for every key id seen in a mac option.

        "bad" counts unknown_key, stale, bad_tag and replay verdicts."""
        m = self.maps["nt_key_stats"]
        out: dict[int, dict[str, int]] = {}
        for kid in range(layout.MAX_KEYS):
            ok, bad = (
                sum(int.from_bytes(v[:8], "little") for v in m.lookup_percpu(u32(kid * 2 + s)) or [])
                for s in (layout.KEY_STAT_OK, layout.KEY_STAT_BAD)
            )
            if ok or bad:
                out[kid] = {"ok": ok, "bad": bad}
        return out

    def events(self, callback: Callable[[GuardEvent], object]) -> RingBuffer:
        """A ring buffer that calls CALLBACK(GuardEvent) per rejected SYN."""
        return RingBuffer(self.maps["nt_guard_events"], lambda b: callback(GuardEvent.from_bytes(b)))


def _attach_problem(ifname: str, mode: XdpMode | None, e: BPFError) -> str:
    if e.errno == errno.EOPNOTSUPP and mode == "native":
        return f"{ifname}: the driver does not support native XDP; use generic mode"
    if e.errno in (errno.EBUSY, errno.EEXIST):
        return f"{ifname}: another XDP program was attached meanwhile; not replacing it"
    where = f" in {mode} mode" if mode else ""
    return f"{ifname}: cannot attach the guard{where}: {e.strerror}"
