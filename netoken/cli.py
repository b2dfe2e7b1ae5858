"""The `netoken` command (design.md §5): object-verb, bpftool-style.

Every verb is a small function over a library call (netoken.marker, netoken.guard,
netoken.state, netoken.config), so tests and other programs get exactly what
operators get.  Errors the user can act on are one line on stderr,
``netoken: ...``, with a non-zero exit; ``--debug`` adds the details
(verifier log, traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import __version__, present, state
from .config import generate_key, key_file_bytes
from .config import load as load_config
from .errors import BPFError, NetokenError
from .present import error_line
from .state import RoleState

if TYPE_CHECKING:
    from .program import ProgramRole

DEFAULT_CONFIG = "/etc/netoken/netoken.toml"

PROG = "netoken"

# Exit codes: 1 for errors, 2 for usage (argparse) and verbs not there yet.
EXIT_ERROR = 1
EXIT_UNAVAILABLE = 2


class CliError(NetokenError):
    """An error message for the user (one line)."""


# --------------------------------------------------------------------------
# output helpers


def _emit_json(obj: Any, pretty: bool) -> None:
    text = json.dumps(obj, indent=2) if pretty else json.dumps(obj, separators=(",", ":"))
    # One write with its newline: print() writes them separately, and a
    # Ctrl-C between the two (monitor, stats --watch) glued two records.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _note(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=True)


def _output(args: argparse.Namespace, doc: Any, text: Callable[[Any], list[str]]) -> int:
    """DOC as JSON with --json, else as TEXT(DOC) says."""
    if args.json:
        _emit_json(doc, args.pretty)
    else:
        _print(text(doc))
    return 0


def _states(ifname: str | None, others: bool = True) -> list[RoleState]:
    """Role states of this network namespace (all roles), of one interface
    with IFNAME (found by the name it was attached under after a rename).
    OTHERS: say which other namespaces have state too (see _note_others)."""
    states = state.all_states(ifname)
    if ifname is not None:
        renamed = {st.ifname for st in states if st.present and st.ifname != ifname}
        if renamed and not _noted[0]:
            _noted[0] = f"{ifname} is called {', '.join(sorted(renamed))} now"
            _note(f"{_noted[0]} (ifindex {states[0].ifindex}; netoken follows interfaces by index)")
        return states
    if others:
        _note_others()
    return states


def _note_others() -> None:
    if not _noted[0]:
        # once: `stats --watch` calls this every interval
        _noted[0] = present.other_netns(state.other_netns()) or "-"
        if _noted[0] != "-":
            _note(_noted[0])


_noted = [""]


def _require_iface_or_state(ifname: str | None, states: list[RoleState]) -> None:
    if ifname is None or states:
        return
    from .program import ifindex

    ifindex(ifname, CliError)  # raises "interface ... does not exist"


def _with_role(states: list[RoleState]) -> list[tuple[RoleState, ProgramRole]]:
    from .roles import role

    out = []
    for st in states:
        r = role(st.role)
        if r is not None and st.exists():
            out.append((st, r))
    return out


# --------------------------------------------------------------------------
# mark


def cmd_mark_attach(args: argparse.Namespace) -> int:
    from . import marker

    state.require_privileges()
    cfg = load_config(args.config)
    if not cfg.policies:
        _note(f"{args.config}: no [[policy]] entries; the marker will mark nothing")
    return _output(args, marker.attach_pinned(args.iface, cfg), present.mark_attached)


def cmd_mark_detach(args: argparse.Namespace) -> int:
    from . import marker

    state.require_privileges()
    return _output(args, marker.detach_pinned(args.iface), present.mark_detached)


def apply(ifname: str, cfg: Any) -> list[dict[str, Any]]:
    """Update every role attached to IFNAME (marker and/or guard) in place.

    Every role checks CFG before any of them changes a map, so a config
    that one of them cannot take changes nothing."""
    states = _states(ifname)
    _require_iface_or_state(ifname, states)
    roles = _with_role(states)
    if not roles:
        raise CliError(
            f"no marker on {ifname} and no guard either; attach one first "
            f"(netoken mark|guard attach {ifname} -c FILE)"
        )
    for _, r in roles:
        r.check_apply(cfg)
    return [r.apply(ifname, cfg) for _, r in roles]


def cmd_apply(args: argparse.Namespace) -> int:
    state.require_privileges()
    cfg = load_config(args.config)
    results = apply(args.iface, cfg)
    several_keys = any(len(p.keys) > 1 for p in cfg.policies)
    _output(
        args,
        results,
        lambda rs: [line for res in rs for line in present.applied(res, args.config, several_keys)],
    )
    if not args.json:
        for res in results:
            for note in res.get("notes", []):
                _note(note)
    return 0


# --------------------------------------------------------------------------
# guard


def cmd_guard_attach(args: argparse.Namespace) -> int:
    from . import guard

    state.require_privileges()
    cfg = load_config(args.config)
    res = guard.attach_pinned(
        args.iface, cfg, action=args.mode, xdp_mode=args.xdp_mode, hook=args.hook
    )
    try:
        doors = guard.side_doors()
    except OSError as e:  # the guard is attached: say what could not be checked
        _note(f"could not list the other ways into this host: {e.strerror or e}")
        doors = []
    res["unguarded"] = [d.to_json() for d in doors]
    for d in doors:
        _note(d.message)
    _output(args, res, present.guard_attached)
    if not args.json:
        for note in res["notes"]:
            _note(note)
    return 0


def cmd_guard_detach(args: argparse.Namespace) -> int:
    from . import guard

    state.require_privileges()
    return _output(args, guard.detach_pinned(args.iface), present.guard_detached)


# --------------------------------------------------------------------------
# status / stats / monitor: generic over roles


def _generic_status(st: RoleState) -> dict[str, Any]:
    """For a role whose module is missing: what the pins alone tell."""
    from .libbpf import Program
    from .roles import role

    why = (
        "incomplete pinned state (no program pin)"
        if role(st.role) is not None
        else "unknown (no support for this role installed)"
    )
    d: dict[str, Any] = {
        "ifname": st.ifname,
        "role": st.role,
        "pinned": str(st.pin_dir),
        "state": why,
    }
    with (
        contextlib.suppress(OSError, ValueError),
        Program.from_pinned(st.pin(state.PROG_PIN)) as prog,
    ):
        d["prog"] = {"id": prog.id, "tag": prog.tag, "name": prog.name}
    return d


def status(ifname: str | None = None, quiet: bool = False) -> list[dict[str, Any]]:
    """What netoken has attached in this network namespace, role by role,
    and netoken programs attached without pinned state (ghosts)."""
    from .roles import ROLES

    states = state.all_states(ifname) if quiet else _states(ifname)
    out = []
    for st in states:
        r = ROLES.get(st.role)
        out.append(r.status(st) if r is not None and st.exists() else _generic_status(st))
    target = states[0].ifindex if states else None
    if ifname is not None and target is None:
        target = _ifindex_or_none(ifname)
    if ifname is None or target is not None:
        for name, r in ROLES.items():
            pinned = {st.ifindex for st in states if st.role == name}
            out += [g for g in r.ghosts(pinned) if ifname is None or g["ifindex"] == target]
    if ifname is not None and not out:
        _require_iface_or_state(ifname, states)
    if out:
        ns = state.this_netns()
        label = {**ns.as_meta(), "name": state.netns_name(ns)}
        for d in out:
            d.setdefault("netns", label)
    guards = [d for d in out if d.get("role") == "guard" and not d.get("ghost")]
    if guards:
        from . import guard

        # Ways in that bypass every guard of this namespace, on each guard's
        # item: what it protects is reachable through them.
        doors = [d.to_json() for d in guard.side_doors()]
        for d in guards:
            d["unguarded"] = doors
    return out


def _ifindex_or_none(ifname: str) -> int | None:
    import socket

    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def status_all_netns() -> list[dict[str, Any]]:
    """status() of every network namespace netoken keeps state for, entered
    one after the other; state whose namespace cannot be found is listed
    from its metadata, with how to remove it."""
    from .netns import entered

    items = status(quiet=True)
    root = state.bpffs(create=False)
    for other in state.other_netns(root):
        found = state.find_netns(other.netns)
        if found is not None:
            try:
                with entered(found[0]):
                    items += status(quiet=True)
                continue
            except (OSError, NetokenError, BPFError) as e:
                # It went away, or its state changed while being read.
                why = f"cannot read: {error_line(e)}"
        else:
            why = "network namespace not found (gone?)"
        run = state.RUN_DIR / other.netns.dirname
        for ifname, role in other.roles:
            items.append(
                {
                    "ifname": ifname,
                    "ifindex": None,
                    "role": role,
                    "attached": False,
                    "state": why,
                    "pinned": str(other.path),
                    "netns": {**other.netns.as_meta(), "name": None},
                    "remove": f"rm -r {other.path} {run}",
                }
            )
    if root is not None:
        for entry in state.old_layout_entries(root):
            path = root / state.ROOT_NAME / entry
            items.append(
                {
                    "ifname": state.decode_ifname(entry),
                    "ifindex": None,
                    "role": None,
                    "attached": False,
                    "pinned": str(path),
                    "netns": None,
                    "state": "left by an older netoken in a namespace it has not run in since "
                    "(moves to this layout when netoken runs there)",
                }
            )
    return items


def cmd_status(args: argparse.Namespace) -> int:
    state.require_privileges(net_admin=False)
    items = status_all_netns() if args.all_netns else status(args.iface)
    if args.json:
        _emit_json(items, args.pretty)
        return 0
    if not items:
        print(f"nothing attached{' to ' + args.iface if args.iface else ''}")
        return 0
    _print(present.status(items, args.all_netns))
    if not args.all_netns and args.iface is None:
        line = present.memory_line(items)
        if line:
            print(line)
    doors: list[dict[str, Any]] = next((d["unguarded"] for d in items if d.get("unguarded")), [])
    if doors:
        _print(present.unguarded(doors))
    return 0


def stats(ifname: str | None = None) -> list[dict[str, Any]]:
    """Counters by reason, summed over CPUs, for every role with state."""
    states = _states(ifname)
    _require_iface_or_state(ifname, states)
    out = []
    for st, r in _with_role(states):
        item: dict[str, Any] = {"ifname": st.ifname, "role": r.name, "counters": r.stats(st)}
        item.update(r.stats_extra(st))
        out.append(item)
    return out


def _rates(prev: list[dict[str, Any]], cur: list[dict[str, Any]], dt: float) -> None:
    before = {(d["ifname"], d["role"]): present.counters(d) for d in prev}
    for d in cur:
        old = before.get((d["ifname"], d["role"]), {})
        d["rates"] = {
            k: round(max(0, v - old.get(k, v)) / dt, 1) if dt > 0 else 0.0
            for k, v in present.counters(d).items()
        }


def watch_stats(
    ifname: str | None, interval: float, emit: Callable[[list[dict[str, Any]], float], None]
) -> None:
    """Call EMIT(stats with rates, now) every INTERVAL seconds until interrupted."""
    prev = stats(ifname)
    t_prev = time.monotonic()
    for d in prev:
        d["rates"] = dict.fromkeys(present.counters(d), 0.0)
    emit(prev, time.time())
    while True:
        time.sleep(interval)
        cur = stats(ifname)
        now = time.monotonic()
        _rates(prev, cur, now - t_prev)
        emit(cur, time.time())
        prev, t_prev = cur, now


def cmd_stats(args: argparse.Namespace) -> int:
    state.require_privileges(net_admin=False)
    if not args.watch:
        return _output(args, stats(args.iface), present.stats)
    if args.interval <= 0:
        raise CliError("--interval must be positive")
    try:
        if args.json:
            watch_stats(
                args.iface,
                args.interval,
                lambda items, now: _emit_json(
                    {"time": present.iso(now), "interval": args.interval, "stats": items},
                    args.pretty,
                ),
            )
        elif sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live

            with Live(console=Console(), auto_refresh=False) as live:
                watch_stats(
                    args.iface,
                    args.interval,
                    lambda items, _now: live.update(
                        present.stats_table(items, args.interval), refresh=True
                    ),
                )
        else:
            watch_stats(
                args.iface,
                args.interval,
                lambda items, now: _print(present.stats_watch_lines(items, now)),
            )
    except KeyboardInterrupt:
        pass
    return 0


def monitor(
    ifname: str | None,
    emit: Callable[[dict[str, Any]], None],
    on_lost: Callable[[dict[str, Any]], None],
    count: int | None = None,
    backlog: bool = False,
    ready: Callable[[list[tuple[RoleState, ProgramRole]]], None] | None = None,
) -> tuple[int, int]:
    """Follow ring-buffer events of every role with state until COUNT events
    (or forever); returns (events seen, events lost meanwhile)."""
    # Other namespaces are named once the rings are open, not before: a
    # monitor started just ahead of the traffic it is for must not miss it.
    states = _states(ifname, others=False)
    _require_iface_or_state(ifname, states)
    roles = _with_role(states)
    if not roles:
        raise CliError(f"nothing attached{' to ' + ifname if ifname else ''}; no events to follow")
    seen = 0
    skipping = not backlog

    class _Done(Exception):
        pass

    # Guards of one namespace share one ring: it is read once, and the
    # events of the namespace's other guards are left out when only some
    # interfaces are asked for.
    others = set()
    if ifname is not None:
        chosen = {(st.role, st.ifindex) for st, _ in roles}
        others = {(st.role, st.ifindex) for st in state.all_states()} - chosen

    def on_event(e: dict[str, Any]) -> None:
        nonlocal seen
        if skipping or (e["role"], e.get("ifindex")) in others:
            return
        emit(e)
        seen += 1
        if count is not None and seen >= count:
            raise _Done

    rbs = []
    # (ifname, role, "lost" | "suppressed") -> the role's counter when last read
    missed: dict[tuple[str, str, str], int] = {}
    lost_total = 0

    def missed_counters() -> dict[tuple[str, str, str], int]:
        out = {}
        for st, r in roles:
            with contextlib.suppress(OSError):
                out[(st.ifname, r.name, "lost")] = r.lost_events(st)
                if r.RATE_LIMITED:
                    out[(st.ifname, r.name, "suppressed")] = r.suppressed_events(st)
        return out

    def check_lost() -> None:
        nonlocal lost_total
        for key, n in missed_counters().items():
            ifname, role, what = key
            if n > missed.get(key, n):
                if what == "lost":
                    lost_total += n - missed[key]
                on_lost(
                    {
                        "time": present.iso(time.time()),
                        "ifname": ifname,
                        "role": role,
                        what: n - missed[key],
                        f"{what}_total": n,
                    }
                )
            missed[key] = n

    try:
        rings: dict[tuple[str, int], Any] = {}
        for st, r in roles:
            key = (r.name, r.events_id(st))
            if key in rings:
                # Read once, but every program writing to it is told
                # that someone listens.
                for m in r.listen_maps(st):
                    rings[key].listen_also(m)
                continue
            rings[key] = rb = r.open_events(st, on_event)
            rbs.append(rb)
        # Records queued while nobody listened may be hours old: skip them
        # unless asked, so the stream shows what happens now.
        for rb in rbs:
            rb.consume()
        skipping = False
        missed.update(missed_counters())
        if ready is not None:
            ready(roles)
        if ifname is None:
            _note_others()
        next_check = time.monotonic() + 1.0
        fds = [rb.fileno() for rb in rbs]
        try:
            while True:
                # The marker wakes readers only when its ring starts to fill
                # (a wake-up per event costs each SYN ~6 us): poll too.
                timeout = min(POLL_INTERVAL, max(0.0, next_check - time.monotonic()))
                select.select(fds, [], [], timeout)
                for rb in rbs:
                    rb.consume()
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 1.0
                    check_lost()
        except (_Done, KeyboardInterrupt):
            pass
        check_lost()  # what was lost since the last check is reported too
    finally:
        for rb in rbs:
            rb.close()
    return seen, lost_total


POLL_INTERVAL = 0.1  # seconds; the latency of `monitor` when no wake-up comes


def cmd_monitor(args: argparse.Namespace) -> int:
    state.require_privileges(net_admin=False)
    headers_done: list[bool] = []
    suppressed: list[int] = []  # empty: no role followed has a rate limit

    def ready(roles: list[tuple[RoleState, ProgramRole]]) -> None:
        where = ", ".join(f"{st.ifname} {r.name}" for st, r in roles)
        _note(f"following events of {where}; Ctrl-C to stop")
        if not args.json:
            _print(list(dict.fromkeys(present.VIEWS[r.name].event_header() for _, r in roles)))
        headers_done.append(True)
        if any(r.RATE_LIMITED for _, r in roles):
            suppressed.append(0)

    def emit(e: dict[str, Any]) -> None:
        if args.json:
            _emit_json(e, args.pretty)
        else:
            print(present.event_line(e), flush=True)

    def on_lost(d: dict[str, Any]) -> None:
        if "suppressed" in d:
            suppressed.append(d["suppressed"])
        if args.json:
            _emit_json(d, args.pretty)
        else:
            print(present.missed_line(d), flush=True)

    seen = lost = 0
    try:
        seen, lost = monitor(
            args.iface, emit, on_lost, count=args.count, backlog=args.backlog, ready=ready
        )
    except KeyboardInterrupt:
        pass
    if headers_done:
        more = f", {sum(suppressed)} suppressed by the rate limit" if suppressed else ""
        _note(f"{seen} event(s) shown, {lost} lost while following{more}")
    return 0


# --------------------------------------------------------------------------
# key


def cmd_key_generate(args: argparse.Namespace) -> int:
    from .token import key_fingerprint

    generate_key(args.file)
    # Read back as every other command will read it: the fingerprint is of
    # the key the file really holds.
    fp = key_fingerprint(key_file_bytes(args.file))
    if args.json:
        _emit_json(
            {"file": os.path.abspath(args.file), "mode": "0600", "bytes": 16, "fingerprint": fp},
            args.pretty,
        )
    else:
        print(f"wrote a new 16-byte key to {args.file} (mode 0600, fingerprint {fp})")
    return 0


# --------------------------------------------------------------------------
# config


def cmd_config_check(args: argparse.Namespace) -> int:
    """Everything `attach` would refuse, without touching the kernel."""
    from .entries import check
    from .schedule import plan

    cfg = load_config(args.file)
    check(cfg)
    agent = cfg.agent
    doc = {
        "file": os.path.abspath(args.file),
        "valid": True,
        "keys": sorted(cfg.keys),
        "policies": len(cfg.policies),
        "protect": len(cfg.guard.protect) if cfg.guard else 0,
        "schedule": plan(cfg, time.time()),
        "agent": None
        if agent is None
        else {"mark": list(agent.mark), "guard": list(agent.guard), "metrics": agent.metrics},
    }
    several_keys = any(len(p.keys) > 1 for p in cfg.policies)
    return _output(args, doc, lambda d: present.config_checked(d, args.file, several_keys))


# --------------------------------------------------------------------------
# verbs other modules provide; each handler is its own function so it can be
# replaced on its own.


def cmd_decode(args: argparse.Namespace) -> int:
    from . import decode

    return decode.run(args)


def cmd_exporter(args: argparse.Namespace) -> int:
    from . import exporter

    return exporter.run(args)


def cmd_agent(args: argparse.Namespace) -> int:
    from . import agent

    return agent.run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args.connections)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.run(args)


# --------------------------------------------------------------------------
# parser

_MAIN_EPILOG = """\
examples:
  netoken key generate /etc/netoken/keys/1.key
  netoken mark attach eth0 -c /etc/netoken/netoken.toml
  netoken guard attach eth1 -c /etc/netoken/netoken.toml --mode monitor
  netoken status
  netoken stats eth0 --watch
  netoken monitor eth0 --json
  netoken apply eth0 -c /etc/netoken/netoken.toml
  netoken mark detach eth0
  netoken guard detach eth1
  netoken -n blue status           # interfaces of network namespace "blue"

State is pinned per network namespace and interface under /sys/fs/bpf/netoken/;
attached programs keep running after netoken exits.  Use -n NAME rather than
`ip netns exec NAME`, which hides /sys/fs/bpf.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: the top-level -j/-p must not be overwritten by the defaults
    # of the subcommand's copy.
    p.add_argument(
        "-j",
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="JSON output (compact, bpftool style)",
    )
    p.add_argument(
        "-p",
        "--pretty",
        action="store_true",
        default=argparse.SUPPRESS,
        help="indented JSON (implies --json)",
    )


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=DEFAULT_CONFIG,
        help=f"TOML config (default {DEFAULT_CONFIG})",
    )


def _verb(
    sub: argparse._SubParsersAction,
    name: str,
    help_: str,
    epilog: str,
    func: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help_,
        description=help_,
        epilog="examples:\n" + epilog,
        formatter_class=_Formatter,
    )
    _common(p)
    p.set_defaults(func=func)
    return p


def _object(
    sub: argparse._SubParsersAction, name: str, help_: str, description: str | None, epilog: str
) -> argparse._SubParsersAction:
    """`netoken NAME VERB ...`: an object and the subparsers of its verbs."""
    p = sub.add_parser(
        name,
        help=help_,
        description=description,
        epilog="examples:\n" + epilog,
        formatter_class=_Formatter,
    )
    return p.add_subparsers(dest="verb", metavar="VERB", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Keyed TCP-option watermarks for SYNs: a TC eBPF marker and an XDP or TC guard.",
        epilog=_MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "-n", "--netns", metavar="NAME", help="run in network namespace NAME (as `ip -n NAME`)"
    )
    parser.add_argument(
        "-d", "--debug", action="store_true", help="on errors, print details and the traceback"
    )
    parser.add_argument("-j", "--json", action="store_true", help="JSON output")
    parser.add_argument("-p", "--pretty", action="store_true", help="indented JSON output")
    sub = parser.add_subparsers(dest="object", metavar="OBJECT", required=True)

    msub = _object(
        sub,
        "mark",
        "attach/detach the TC egress marker",
        "The marker: adds a keyed option to selected SYNs.",
        "  netoken mark attach eth0 -c netoken.toml\n  netoken mark detach eth0\n",
    )
    p = _verb(
        msub,
        "attach",
        "load the marker and attach it on IFACE egress (replaces "
        "netoken's own filter atomically, keeps counters)",
        "  netoken mark attach eth0 -c /etc/netoken/netoken.toml\n"
        "  netoken -n client mark attach veth0 -c lab.toml --json\n",
        cmd_mark_attach,
    )
    p.add_argument("iface", metavar="IFACE")
    _config_arg(p)
    p = _verb(
        msub,
        "detach",
        "remove netoken's marker filter and pins from IFACE (other "
        "filters and a shared clsact qdisc stay)",
        "  netoken mark detach eth0\n",
        cmd_mark_detach,
    )
    p.add_argument("iface", metavar="IFACE")

    gsub = _object(
        sub,
        "guard",
        "attach/detach the guard (XDP or TC ingress)",
        "The guard: verifies tokens on ingress SYNs.",
        "  netoken guard attach eth0 -c netoken.toml --mode monitor\n  netoken guard detach eth0\n",
    )
    p = _verb(
        gsub,
        "attach",
        "load the guard and attach it to IFACE at XDP or TC ingress "
        "(--hook auto: TC on veths and L3 devices such as tun and WireGuard, XDP "
        "otherwise); replaces netoken's own guard atomically, keeps counters and the "
        "replay cache; never replaces an XDP program or tc filter netoken did not "
        "install; then name the devices that still let traffic in without a guard "
        "(tunnels, other NICs, pod veths)",
        "  netoken guard attach eth0 -c /etc/netoken/netoken.toml\n"
        "  netoken guard attach eth0 -c netoken.toml --mode monitor   # count, never drop\n"
        "  netoken guard attach eth0 -c netoken.toml --mode config    # back to [guard] action\n"
        "  netoken guard attach wg0 -c netoken.toml                   # L3: TC ingress\n"
        "  netoken -n server guard attach veth0 -c lab.toml --hook xdp --xdp-mode generic\n",
        cmd_guard_attach,
    )
    p.add_argument("iface", metavar="IFACE")
    _config_arg(p)
    p.add_argument(
        "--mode",
        choices=("drop", "monitor", "config"),
        help="drop or monitor: override the action of every protect entry; the "
        "override is sticky (`apply` and a later attach keep it); config: "
        "clear it and use the config's actions",
    )
    p.add_argument(
        "--hook",
        choices=("auto", "xdp", "tc"),
        default=None,
        help="where the guard runs: auto picks tc (clsact ingress) for veths and L3 "
        "devices and xdp otherwise (default: auto, or the hook forced at the "
        "last attach, which is sticky like --mode); switching hooks attaches "
        "the new one before removing the old",
    )
    p.add_argument(
        "--xdp-mode",
        choices=("native", "generic"),
        default=None,
        help="XDP attach mode (default: native if the driver supports it); implies --hook xdp",
    )
    p = _verb(
        gsub,
        "detach",
        "remove netoken's guard and its pins from IFACE, at either "
        "hook (other XDP programs and tc filters stay; the clsact qdisc goes only if "
        "netoken created it and nothing else uses it)",
        "  netoken guard detach eth0\n",
        cmd_guard_detach,
    )
    p.add_argument("iface", metavar="IFACE")

    p = _verb(
        sub,
        "status",
        "show what netoken has attached where (prog ids, tc handle, "
        "XDP mode, policies, protect entries, key ids and fingerprints, memory), "
        "netoken programs that lost their pins and, where a guard runs, the devices "
        "that let traffic in without one",
        "  netoken status\n  netoken status eth0 --json --pretty\n"
        "  netoken status --all-netns      # every network namespace\n",
        cmd_status,
    )
    p.add_argument("iface", metavar="IFACE", nargs="?")
    p.add_argument(
        "--all-netns",
        action="store_true",
        help="every network namespace netoken keeps state for, each under its "
        "`ip netns` name where it has one",
    )

    p = _verb(
        sub,
        "apply",
        "update keys, policies and protect entries of the live marker "
        "and/or guard on IFACE (no reattach; removed entries disappear)",
        "  netoken apply eth0 -c /etc/netoken/netoken.toml\n",
        cmd_apply,
    )
    p.add_argument("iface", metavar="IFACE")
    _config_arg(p)

    p = _verb(
        sub,
        "stats",
        "counters by reason, summed over CPUs",
        "  netoken stats\n  netoken stats eth0 --watch\n"
        "  netoken stats eth0 --watch --json | jq .stats\n",
        cmd_stats,
    )
    p.add_argument("iface", metavar="IFACE", nargs="?")
    p.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help="refresh every interval with per-second rates (Ctrl-C to stop)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="--watch refresh interval (default 1)",
    )

    p = _verb(
        sub,
        "monitor",
        "print events as they happen (ring buffer); lost events are reported",
        "  netoken monitor eth0\n  netoken monitor --json --count 10\n",
        cmd_monitor,
    )
    p.add_argument("iface", metavar="IFACE", nargs="?")
    p.add_argument("--count", type=int, metavar="N", help="exit after N events")
    p.add_argument(
        "--backlog", action="store_true", help="also show events queued before monitor started"
    )

    ksub = _object(
        sub, "key", "manage key files", None, "  netoken key generate /etc/netoken/keys/1.key\n"
    )
    p = _verb(
        ksub,
        "generate",
        "write a new random key file (16 bytes as hex, mode 0600; never overwrites)",
        "  netoken key generate /etc/netoken/keys/2.key\n",
        cmd_key_generate,
    )
    p.add_argument("file", metavar="FILE")

    csub = _object(
        sub,
        "config",
        "check config files",
        None,
        "  netoken config check /etc/netoken/netoken.toml\n",
    )
    p = _verb(
        csub,
        "check",
        "validate a config file and the key files it names, without "
        "touching the kernel (exit 0 if valid, else one line naming file, entry and "
        "problem, exit 1)",
        "  netoken config check /etc/netoken/netoken.toml\n",
        cmd_config_check,
    )
    p.add_argument("file", metavar="FILE", nargs="?", default=DEFAULT_CONFIG)

    p = _verb(
        sub,
        "decode",
        "list netoken options in a capture and verify them with keys",
        "  netoken decode syn.pcap -c netoken.toml\n  netoken decode syn.pcapng --json\n",
        cmd_decode,
    )
    from . import decode

    decode.add_arguments(p)

    from . import exporter

    p = sub.add_parser(
        "exporter",
        help=exporter.HELP,
        description=exporter.HELP,
        epilog=exporter.EPILOG,
        formatter_class=_Formatter,
    )
    p.set_defaults(func=cmd_exporter)
    exporter.add_arguments(p)

    p = _verb(
        sub,
        "agent",
        "node daemon: keep the interfaces [agent] selects attached and "
        "configured as FILE says (interfaces that appear later, config and key file "
        "changes, key schedule, clock), serve /metrics; logfmt lines on stderr",
        "  netoken agent -c /etc/netoken/netoken.toml\n"
        "  netoken agent -c netoken.toml --metrics 10.0.0.5:9917\n"
        "  netoken -n blue agent -c lab.toml --detach-on-exit\n",
        cmd_agent,
    )
    _config_arg(p)
    p.add_argument(
        "--detach-on-exit",
        action="store_true",
        help="on SIGTERM/SIGINT detach what the agent attached (default: leave the "
        "programs running, so restarts and upgrades leave no gap)",
    )
    p.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        default=None,
        help="serve /metrics here, overriding [agent] metrics (e.g. the node's own "
        "address, which differs per node while the config is shared)",
    )

    p = _verb(
        sub,
        "demo",
        "the whole system in a private network-namespace lab",
        "  netoken demo\n  netoken demo --connections 10\n",
        cmd_demo,
    )
    p.add_argument(
        "--connections",
        type=int,
        default=4,
        metavar="N",
        help="connections to make through the marker (default 4)",
    )

    p = _verb(
        sub,
        "bench",
        "datapath, end-to-end and control-plane benchmarks",
        "  netoken bench\n  netoken bench --quick --json\n"
        "  netoken bench --only datapath -o results.json\n",
        cmd_bench,
    )
    from . import bench

    bench.add_arguments(p)
    return parser


# --------------------------------------------------------------------------
# entry point


@contextlib.contextmanager
def _in_netns(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    from .netns import netns

    try:
        ctx = netns(name)
        ctx.__enter__()
    except PermissionError:
        raise state.StateError(
            f"permission denied entering network namespace {name!r} (run as root)"
        ) from None
    try:
        yield
    finally:
        ctx.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = bool(getattr(args, "json", False) or getattr(args, "pretty", False))
    args.pretty = bool(getattr(args, "pretty", False))
    # libbpf's warnings (e.g. the kernel's extack text) reach the user through
    # the one-line error; the raw log is for --debug.
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.CRITICAL,
        format=f"{PROG}: %(name)s: %(message)s",
    )
    # Ctrl-C during a libbpf call is delivered when the call returns, not
    # lost inside one of its callbacks (see libbpf.interrupt_handler).
    signal.signal(signal.SIGINT, _sigint)
    try:
        with _in_netns(args.netns):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`); not an error, and Python's own
        # flush at exit must not complain either.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - every error becomes one line
        if args.json:
            # bpftool's convention: scripts reading stdout get the error there.
            _emit_json({"error": error_line(e)}, args.pretty)
        else:
            _note(error_line(e))
        if args.debug:
            if isinstance(e, BPFError) and e.detail:
                print(e.detail, file=sys.stderr)
            traceback.print_exc()
        return EXIT_ERROR


def _sigint(signum: int, frame: object) -> None:
    # libbpf is loaded only by the verbs that need it; when it is, its
    # handler keeps a Ctrl-C from being lost inside one of its callbacks.
    lb = sys.modules.get("netoken.libbpf")
    if lb is not None:
        lb.interrupt_handler(signum, frame)
        return
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
