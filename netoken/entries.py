"""A config compiled into what the marker's and the guard's maps hold.

Both programs look a SYN's destination up the same way (bpf/dest.h: an LPM
trie of prefixes -> port rules, netoken/rules.py) and keep what a rule
points at, policies or protect entries, in two halves of an array: a
configure on a live program writes the idle half, then repoints the
prefixes one atomic update at a time, so a SYN always finds a complete
entry, old or new.

Everything a map could not hold is a ConfigError here, before any object
is loaded, so a bad config never half-applies.  Nothing here touches the
kernel: `netoken config check` runs the same compile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from . import layout
from .config import Config, ConfigError, GuardConfig, OptionConfig, Policy, Protect
from .datapath import realtime_minus_tai_ns, u32
from .rules import RuleError, compile_lpm, expand

# The halves of nt_policies and nt_protect (see above), and of nt_static,
# whose tokens follow their protect entry's half.
POLICY_HALF = layout.MAX_POLICIES // 2
PROTECT_HALF = layout.MAX_PROTECT // 2
STATIC_HALF = layout.MAX_STATIC // 2

Lpm = dict[bytes, bytes]


@dataclass(frozen=True)
class Entries:
    """The LPM tries of one half (key -> struct nt_port_rules) and, for the
    guard, its static tokens (struct nt_static_key -> 1)."""

    v4: Lpm
    v6: Lpm
    statics: dict[bytes, bytes] = field(default_factory=dict)


def _destinations(
    cfg: Config, section: str | None, entries: Sequence[Policy | Protect], base: int
) -> tuple[Lpm, Lpm]:
    """ENTRIES' destinations and ports as LPM tries whose rules point at
    BASE + the entry's index."""
    try:
        return compile_lpm(
            expand(
                (p.destinations, [(r.lo, r.hi) for r in p.ports], base + i)
                for i, p in enumerate(entries)
            )
        )
    except RuleError as e:
        raise ConfigError(cfg.path, section, str(e)) from None


def _fits(cfg: Config, section: str | None, role: str, n: int, most: int, what: str) -> None:
    if n > most:
        raise ConfigError(cfg.path, section, f"{n} {what}; the {role} holds at most {most}")


def _lpm_fits(cfg: Config, section: str | None, role: str, v4: Lpm, v6: Lpm) -> None:
    for family, lpm in (("IPv4", v4), ("IPv6", v6)):
        _fits(
            cfg,
            section,
            role,
            len(lpm),
            layout.LPM_MAX_ENTRIES,
            f"distinct {family} destination prefixes",
        )


# --------------------------------------------------------------------------
# the marker


def marker_config_value(option: OptionConfig, generation: int = 0) -> bytes:
    return bytes(
        layout.NtConfig(
            kind=option.kind,
            make_room=option.make_room,
            exid=option.exid,
            generation=generation,
            realtime_minus_tai_ns=realtime_minus_tai_ns(),
        )
    )


def policy_value(policy: Policy, index: int, key_id: int | None = None) -> bytes:
    """POLICY at INDEX as the marker reads it; KEY_ID is the key its key
    schedule has in use (mac mode)."""
    v = layout.NtPolicy(id=index, mode=layout.MODES[policy.mode])
    if policy.mode == "mac":
        assert key_id is not None and key_id in policy.keys
        v.key_id = key_id
    else:
        assert policy.token is not None
        v.token[:] = list(policy.token.to_bytes(8, "big"))
    return bytes(v)


def marker_entries(cfg: Config, base: int = 0) -> Entries:
    """CFG's policies compiled for the half at BASE; ConfigError for what
    the marker's maps could not hold."""
    _fits(cfg, None, "marker", len(cfg.policies), POLICY_HALF, "policies")
    v4, v6 = _destinations(cfg, None, cfg.policies, base)
    _lpm_fits(cfg, None, "marker", v4, v6)
    return Entries(v4, v6)


# --------------------------------------------------------------------------
# the guard


def protect_value(cfg: GuardConfig, entry: Protect, index: int) -> bytes:
    v = layout.NtProtect(id=index, action=layout.GUARD_ACTION[cfg.action_for(entry)])
    for kid in entry.keys:
        v.keys[kid // 64] |= 1 << (kid % 64)
    return bytes(v)


def static_key(protect: int, token: int) -> bytes:
    k = layout.NtStaticKey(protect=protect)
    k.token[:] = list(token.to_bytes(8, "big"))
    return bytes(k)


def guard_config_value(
    cfg: Config, generation: int, action: str | None, event_rate: int, event_burst: int
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
            action=layout.GUARD_ACTION[action or "entry"],
            fragments=layout.GUARD_FRAGMENTS[cfg.guard.fragments],
        )
    )


def guard_entries(cfg: Config, base: int = 0) -> Entries:
    """CFG's [guard] compiled for the half at BASE; ConfigError for a config
    the guard cannot run or its maps could not hold."""
    g = cfg.guard
    if g is None:
        raise ConfigError(
            cfg.path, None, "no [guard] section; the guard needs one with [[guard.protect]] entries"
        )
    _fits(cfg, "guard", "guard", len(g.protect), PROTECT_HALF, "protect entries")
    statics = {
        static_key(base + i, tok): u32(1)
        for i, entry in enumerate(g.protect)
        for tok in entry.tokens
    }
    _fits(cfg, "guard", "guard", len(statics), STATIC_HALF, "static tokens")
    v4, v6 = _destinations(cfg, "guard", g.protect, base)
    _lpm_fits(cfg, "guard", "guard", v4, v6)
    return Entries(v4, v6, statics)


def check(cfg: Config) -> None:
    """What attaching CFG would refuse, for every role it configures (a
    guard only with a [guard] section); `netoken config check`."""
    marker_entries(cfg)
    if cfg.guard is not None:
        guard_entries(cfg)
