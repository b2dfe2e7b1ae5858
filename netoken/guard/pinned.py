"""Pinned guards: what `netoken guard attach|detach` and `netoken apply` do.

Decisions:
- `--mode` is part of the attachment, not of the config: it is kept in the
  metadata and is sticky, like the XDP mode: `apply` and attaching again
  without `--mode` keep it (and say so), only `--mode config` clears it.
  An operator who put a guard into monitor mode by hand must not see it
  switch to drop because a unit or the agent re-attached it.
- The replay cache's size is fixed when a program is loaded.  Attaching
  again with a different `replay_cache` gives the new program a new cache,
  filled with the tokens of the old one, each at its slot for the new size
  (slots hold no epoch, so all of them); a second pass after the swap
  copies what the old program accepted meanwhile.  `apply` cannot resize
  it and says so.
- Switching between native and generic XDP needs a detach first (the
  kernel keeps one mode per device), so that replace has a short window
  without a guard; every other replace is atomic.
- The hook is sticky like --mode when forced: attaching again without
  --hook keeps a forced `xdp` or `tc`; `auto` (also the default for a
  first attach) decides from the device every time.  --xdp-mode implies
  --hook xdp.
- Switching hooks (xdp <-> tc) attaches the new program first and removes
  the old one after, so there is no moment without a guard.  Both use the
  namespace's replay cache, so it is kept; a SYN that arrives in the moment
  both run is checked by both, and the second sees the token the first
  just accepted: dropped as a replay, the client retransmits a second
  later with a fresh nonce.  The window is two syscalls wide; the other
  order would leave it unguarded instead.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from typing import Any, Literal

from .. import layout, links, program, state, tc
from ..config import Config, Protect
from ..datapath import sync_map, u32
from ..errors import GuardError
from ..libbpf import BPF_ANY, BPFError, Map, Program, xdp_detach
from ..state import PROG_PIN, RoleState
from .hooks import (
    HOOKS,
    MODE_FLAGS,
    Hook,
    HookRequest,
    TcAttachment,
    XdpAttachment,
    XdpMode,
    choose_hook,
    detach_problem,
    ours_or_fail,
    restore_xdp,
    tc_ours_or_fail,
    xdp_attached,
)
from .program import OWN_MAPS, ROLE_NAME, SHARED_MAPS, Guard, check, replay_slots

# The maps configure() writes: what a failed replace restores for the
# program that keeps running.
CONFIG_MAPS = ("nt_guard_config", "nt_keys", "nt_protect", "nt_static", "nt_dst_v4", "nt_dst_v6")


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
        name: {k: v for k, v in maps[name].items() if isinstance(v, bytes)} for name in CONFIG_MAPS
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
    live = Guard.read_config(maps["nt_guard_config"]).generation
    for k, v in snap["nt_guard_config"].items():
        # The snapshot's half, under a generation newer than any the
        # programs cached destinations under meanwhile.
        conf = layout.NtGuardConfig.from_bytes(v)
        conf.generation = live + 1 + ((live + 1 - conf.generation) & 1) & 0xFFFFFFFF
        maps["nt_guard_config"].update(k, bytes(conf))
    sync_map(maps["nt_static"], snap["nt_static"])


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
            dst.update(
                u32(layout.replay_index(entry, dst.max_entries)),
                entry.to_bytes(8, sys.byteorder),
                BPF_ANY,
            )
            done.add(entry)
            copied += 1
    return copied


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
        if xdp_mode not in MODE_FLAGS:
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
    prev_xdp = xdp_attached(idx)
    prev_tc = tc.query(idx, "ingress")
    if prev_tc is not None:
        try:
            tc_ours_or_fail(ifname, prev_tc)
        except GuardError:
            if chosen == "tc":
                raise
            prev_tc = None
    if prev_xdp is not None:
        try:
            ours_or_fail(ifname, *prev_xdp).close()
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
        base = shared or (
            {n: old.maps[n] for n in SHARED_MAPS if n in old.maps} if old is not None else {}
        )
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
                    f"{live.max_entries} entries (detach them all, then attach, to resize)"
                )
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
        oldp = (
            t.closing.enter_context(Program.from_id(prev_xdp[0]))
            if switch_from == "xdp" and prev_xdp
            else None
        )
        if chosen == "xdp":

            def unattach() -> None:
                with contextlib.suppress(Exception):
                    restore_xdp(idx, new.prog.id, prev_xdp)

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
                xdp_detach(idx, MODE_FLAGS[prev_xdp[1]], old_prog_fd=oldp)
            except BPFError as e:
                raise GuardError(detach_problem(ifname, idx, e)) from None
            t.on_failure(lambda: restore_xdp(idx, 0, prev_xdp))
        elif switch_from == "tc":
            tc.detach(idx, "ingress")
            t.on_failure(lambda: tc.restore(idx, "ingress", prev_tc))
            if tc.netoken_created_clsact(ifname, idx, st.read_meta()):
                clsact = tc.destroy_clsact_if_empty(ifname, idx)
        if source is not None and copied is not None:
            copied += _copy_replay(source, new.maps["nt_replay"], done)
        t.commit(
            {
                "xdp_mode": xdp_mode,
                "hook": chosen,
                "hook_requested": requested,
                "hook_reason": why,
                "link": t.framing,
                "created_clsact": created_clsact,
            },
            {},
        )
        _write_shared_meta(st, cfg, override)
        entries = new.replay_cache
        resized = (
            live is not None and live.id != new.maps["nt_replay"].id and live.max_entries != entries
        )
    # The guard this one took the place of: at the same hook, else the one
    # it switched from.
    prev_same = prev_tc if chosen == "tc" else prev_xdp[0] if prev_xdp else None
    prev_other = prev_xdp[0] if chosen == "tc" and prev_xdp else prev_tc
    return t.result(
        hook=chosen,
        hook_requested=requested,
        hook_reason=why,
        link=t.framing,
        xdp_mode=att.mode,
        tc={
            "hook": "ingress",
            "handle": tc.HANDLE,
            "priority": tc.PRIORITY,
            "created_clsact": created_clsact,
        }
        if chosen == "tc"
        else None,
        replaced_prog_id=prev_same if prev_same is not None else prev_other,
        hook_switched=f"{switch_from}->{chosen}" if switch_from else None,
        clsact=clsact,
        mode_switched=bool(chosen == "xdp" and prev_xdp and prev_xdp[1] != att.mode),
        pinned=str(st.pin_dir),
        shared=str(Guard.shared_state(st).pin_dir),
        shared_by=len(others) + 1,
        action=override or g.action,
        action_override=override is not None,
        config_action=g.action,
        skew=g.skew,
        replay_cache={
            "entries": entries,
            "state": "new" if live is None else "resized" if resized else "kept",
            "copied": copied or 0,
        },
        protect=len(g.protect),
        keys=sorted(cfg.keys),
        notes=notes,
    )


def _write_shared_meta(st: RoleState, cfg: Config, override: str | None) -> None:
    """The namespace's guard config, described once for every guard."""
    state.SharedState(st.netns, ROLE_NAME, st.root).write_meta(
        {
            "version": state.META_VERSION,
            "role": ROLE_NAME,
            "netns": st.netns.as_meta(),
            "action_override": override,
            **_config_meta(cfg),
        }
    )


def apply(ifname: str, cfg: Config) -> dict[str, Any]:
    """Make the live maps of the guard on IFNAME, and so of every guard of
    its network namespace, hold CFG; no reattach."""
    check(cfg)
    assert cfg.guard is not None
    with state.locked():
        st = Guard.state_of(ifname)
        if not st.exists():
            raise GuardError(
                f"no guard on {ifname} (run `netoken guard attach {ifname} -c FILE` first)"
            )
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
        how = (
            f"detach the namespace's {len(others) + 1} guards and attach them again"
            if others
            else f"`netoken guard attach {st.ifname}`"
        )
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
                    tc_ours_or_fail(name, cur_tc, "detach")
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
            cur = xdp_attached(idx) if removed is None else None
            if cur is None and removed is None and foreign is None and not r.has_state:
                raise GuardError(f"no netoken guard on {name}")
            if cur is not None:
                try:
                    prog = ours_or_fail(name, *cur, "detach")
                except GuardError:
                    if not r.has_state:
                        raise
                    foreign = {**_prog_desc(cur[0]), "mode": cur[1], "hook": "xdp"}
                else:
                    with prog:
                        try:
                            xdp_detach(idx, MODE_FLAGS[cur[1]], old_prog_fd=prog)
                        except BPFError as e:
                            raise GuardError(detach_problem(name, idx, e)) from None
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


def _pinned() -> list[tuple[RoleState, int]]:
    """(state, prog id) of netoken's guards pinned for this network namespace."""
    out = []
    for st in state.all_states():
        if st.role == ROLE_NAME and state.in_this_netns(st):
            # Detached meanwhile: then it guards nothing.
            with contextlib.suppress(OSError), Program.from_pinned(st.pin(PROG_PIN)) as p:
                out.append((st, p.id))
    return out


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
