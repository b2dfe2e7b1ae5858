"""The guard as a loaded program: its object, its maps, configure, attach, events."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .. import layout, tc
from ..config import DEFAULT_REPLAY_CACHE, Config
from ..datapath import SynEvent, add_keys, sync_keys, sync_map, u32
from ..entries import PROTECT_HALF, guard_config_value, guard_entries, protect_value
from ..errors import GuardError
from ..libbpf import (
    BPF_PROG_TYPE_SCHED_CLS,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    BPFError,
    Map,
    xdp_attach,
    xdp_detach,
)
from ..program import ListeningRing, PinnedProgram
from .hooks import (
    MODE_FLAGS,
    PROG_NAME,
    Hook,
    TcAttachment,
    XdpAttachment,
    XdpMode,
    attach_problem,
    no_xdp_on_l3,
    ours_or_fail,
    tc_ours_or_fail,
    xdp_attached,
)

ROLE_NAME = "guard"
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

# Only the counters are per interface.  The rest is one set per network
# namespace, reused by every guard there: one replay cache (a token accepted
# on one interface is a replay on all the others), one config (keys, protect
# entries, static tokens, prefixes, action), one event ring with one rate limit.
OWN_MAPS = ("nt_guard_stats", "nt_key_stats")
SHARED_MAPS = tuple(m for m in MAPS if m not in OWN_MAPS)

# Events per second and bucket depth, per CPU.  Enough to see who is being
# dropped; a flood costs user space at most this much per CPU.
DEFAULT_EVENT_RATE = 100
DEFAULT_EVENT_BURST = 200

# Where a resized replay cache waits until its program is attached (bpffs
# refuses dots in names).
REPLAY_PIN_NEW = "nt_replay_new"

# The object for each (hook, link layer); there is no XDP object for L3
# devices: auto picks TC there.
OBJECTS = {
    ("xdp", "ethernet"): "guard",
    ("tc", "ethernet"): "guard_tc",
    ("tc", "l3"): "guard_tc_l3",
}

# What the program returns for a packet it lets through or drops (TC:
# TC_ACT_UNSPEC, as the u32 BPF_PROG_TEST_RUN reports, and TC_ACT_SHOT).
RETVALS: dict[str, dict[str, int]] = {
    "xdp": {"pass": 2, "drop": 1},
    "tc": {"pass": 0xFFFFFFFF, "drop": 2},
}


def check(cfg: Config) -> None:
    """Reject, as a ConfigError, a config the guard cannot run or its maps
    could not hold; run before anything is loaded so a bad config never
    half-applies."""
    guard_entries(cfg)


@dataclass(frozen=True)
class GuardEvent(SynEvent):
    """One rejected SYN (dropped, or passed in monitor mode)."""

    protect: int  # index of the [[guard.protect]] entry
    verdict: str  # one of layout.GUARD_VERDICTS, never "ok"
    action: str  # "drop" or "monitor"
    mode: str  # "mac", "static", or "" when no option could be read
    key_id: int | None  # mac mode only
    epoch: int | None  # reconstructed full epoch, once the key was known

    @classmethod
    def from_bytes(cls, data: bytes) -> GuardEvent:
        e = layout.NtGuardEvent.from_bytes(data)
        mode = {layout.MODE_MAC: "mac", layout.MODE_STATIC: "static"}.get(e.mode, "")
        mac = mode == "mac"
        return cls(
            **SynEvent.flow(e),
            nonce=bytes(e.nonce) if mac else b"",
            tag=bytes(e.tag[: layout.TAG_LEN]) if mac else bytes(e.tag) if mode else b"",
            protect=e.protect,
            verdict=layout.GUARD_REASONS[e.verdict],
            action=layout.GUARD_ACTIONS[e.action],
            mode=mode,
            key_id=e.key_id if mac else None,
            epoch=e.epoch if mac and e.verdict not in _NO_EPOCH else None,
        )


# Verdicts reached before the epoch is reconstructed.
_NO_EPOCH = frozenset(layout.GUARD_REASON[v] for v in ("missing", "malformed", "unknown_key"))


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
            raise GuardError(
                f"no guard for hook {hook!r} on {framing!r} devices "
                f"(there are: {', '.join(f'{h}/{f}' for h, f in OBJECTS)})"
            )
        g = cls._load_object(
            reuse, max_entries={"nt_replay": replay_slots(replay_cache)}, object_name=name
        )
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
            raise GuardError(
                f"event burst {event_burst} is out of range 0..{layout.MAX_EVENT_RATE}"
            )
        # A new generation: its low bit picks the half written now, and the
        # program's destination cache forgets what it looked up before.
        old = self._config().generation
        gen = old + 1 & 0xFFFFFFFF
        base = (gen & 1) * PROTECT_HALF
        entries = guard_entries(cfg, base)
        g = cfg.guard
        assert g is not None

        # 1. Everything the new entries refer to, next to the old state.  The
        # settings go first so that a first configure protects nothing until
        # kind and ExID are there; the generation flips only after step 2, so
        # an interrupted configure never leaves the LPM pointing at the half
        # the next one will overwrite.
        conf = self.maps["nt_guard_config"]
        conf.update(u32(0), guard_config_value(cfg, old, action, event_rate, event_burst))
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
                tc_ours_or_fail(ifname, prev)
            created = tc.ensure_clsact(idx)
            try:
                filt = tc.attach(idx, "ingress", self.prog.fd)
            except BPFError as e:
                if created:
                    tc.destroy_clsact_if_empty(ifname, idx)
                raise GuardError(
                    f"{ifname}: cannot attach the guard at tc ingress: {e.strerror}"
                ) from None
            return TcAttachment(idx, filt.prog_id, created)
        if mode is not None and mode not in MODE_FLAGS:
            raise GuardError(f"XDP mode must be 'native' or 'generic', got {mode!r}")
        cur = xdp_attached(idx)
        flags = MODE_FLAGS[mode] if mode else 0
        try:
            if cur is None:
                xdp_attach(idx, self.prog, flags | XDP_FLAGS_UPDATE_IF_NOEXIST)
            else:
                prog_id, cur_mode = cur
                with ours_or_fail(ifname, prog_id, cur_mode) as old:
                    if prog_id == self.prog.id and mode in (None, cur_mode):
                        pass
                    elif mode is None or mode == cur_mode:
                        xdp_attach(idx, self.prog, MODE_FLAGS[cur_mode], old_prog_fd=old)
                    else:
                        # The kernel keeps one mode per device: switching
                        # leaves a moment with no guard.
                        xdp_detach(idx, MODE_FLAGS[cur_mode], old_prog_fd=old)
                        xdp_attach(idx, self.prog, flags | XDP_FLAGS_UPDATE_IF_NOEXIST)
        except BPFError as e:
            raise GuardError(attach_problem(ifname, idx, mode, e)) from None
        now = xdp_attached(idx)
        if now is None or now[0] != self.prog.id:
            raise GuardError(f"{ifname}: XDP attach reported success but the guard is not attached")
        return XdpAttachment(idx, now[0], now[1])  # type: ignore[arg-type]

    def _check_framing(self, ifname: str, framing: str) -> None:
        if self.hook == "xdp" and framing == "l3":
            raise GuardError(no_xdp_on_l3(ifname))
        super()._check_framing(ifname, framing)

    def key_stats(self) -> dict[int, dict[str, int]]:
        """{key id: {"ok": n, "bad": n}} for every key id seen in a mac option.

        "bad" counts unknown_key, stale, bad_tag and replay verdicts."""
        return read_key_stats(self.maps["nt_key_stats"])

    def events(self, callback: Callable[[GuardEvent], object]) -> ListeningRing:
        """A ring buffer that calls CALLBACK(GuardEvent) per rejected SYN."""
        return super().events(callback)


def read_key_stats(m: Map) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for kid in range(layout.MAX_KEYS):
        ok, bad = (
            sum(int.from_bytes(v[:8], "little") for v in m.lookup_percpu(u32(kid * 2 + s)) or [])
            for s in (layout.KEY_STAT_OK, layout.KEY_STAT_BAD)
        )
        if ok or bad:
            out[kid] = {"ok": ok, "bad": bad}
    return out


def replay_slots(entries: int) -> int:
    """The replay cache's real size: ENTRIES rounded up to a power of two (the
    guard masks a hash to find a token's slot)."""
    return 1 << max(entries - 1, 0).bit_length()
