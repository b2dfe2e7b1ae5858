"""How netoken's results read for people.

The library returns documents: the dicts that ``--json`` prints as they
are (attach and detach results, status items, counters, events).  This
module turns them into the lines the CLI prints, a view per role
(:data:`VIEWS`, keyed like the documents' ``role``).  It imports nothing
that loads libbpf, so it serves the verbs that need no kernel too.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from typing import Any

from . import state
from .errors import BPFError, NetokenError

Doc = dict[str, Any]

# --------------------------------------------------------------------------
# errors


def one_line(text: str) -> str:
    return " ".join(text.split("\n")[0].split()) if text else text


def error_line(e: Exception) -> str:
    """E as the one line a user sees (``netoken: LINE``, or {"error": LINE})."""
    # State directories are used through their fds; say which path they are.
    return state.shown(_error_text(e))


def _error_text(e: Exception) -> str:
    if isinstance(e, NetokenError):
        return one_line(str(e))
    if isinstance(e, BPFError):
        return e.user_message()
    if isinstance(e, FileNotFoundError) and e.filename is None:
        return one_line(str(e))  # ours: object file or namespace missing
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return f"internal error: {type(e).__name__}: {one_line(str(e))} (--debug for a traceback)"


# --------------------------------------------------------------------------
# words and numbers


def policies(n: int) -> str:
    return f"{n} polic{'y' if n == 1 else 'ies'}"


def protects(n: int) -> str:
    return f"{n} protect entr{'y' if n == 1 else 'ies'}"


def keys(ids: list[int]) -> str:
    return f"key id{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}" if ids else "no keys"


def fmt_bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def iso(t: float) -> str:
    """Unix time T as an ISO 8601 UTC time to the second."""
    return (
        _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def schedule_lines(sched: Doc) -> list[str]:
    """The key schedule (schedule.plan) of `status`, `apply` and `config check`."""
    out = []
    for o in sched.get("overdue", []):
        out.append(
            f"schedule {o['policy']} should mark with key {o['key']} since {o['since']}; "
            "only `netoken agent` switches on time (or run `netoken apply`)"
        )
    nxt = sched.get("next_switch")
    if nxt:
        to = ", ".join(f"{n} -> key {k}" for n, k in nxt["policies"].items())
        out.append(
            f"schedule next switch {nxt['at']}: {to} (performed by `netoken agent`; "
            "without it, run `netoken apply` then)"
        )
    return out


def keys_in_use(in_use: dict[str, int]) -> str:
    return ", ".join(f"{n} key {k}" for n, k in in_use.items())


# --------------------------------------------------------------------------
# mark / guard attach, detach; apply


def where(res: Doc) -> str:
    """The interface a detach acted on, and the name it was attached under
    if that differs (renamed since)."""
    was = res.get("attached_as")
    if was and was != res["ifname"] and res["interface_present"]:
        return f"{res['ifname']} (attached as {was}, ifindex {res['ifindex']})"
    return res["ifname"]


def mark_attached(res: Doc) -> list[str]:
    how = f"replaced prog {res['replaced_prog_id']}" if res["replaced_prog_id"] else "new"
    return [
        (
            f"marker attached to {res['ifname']} egress: prog {res['prog_id']} tag {res['tag']}, "
            f"tc handle 0x{res['handle']:x} prio {res['priority']} ({how})"
        ),
        f"  {policies(res['policies'])}, {keys(res['keys'])}; pinned at {res['pinned']}",
    ]


def mark_detached(res: Doc) -> list[str]:
    at = where(res)
    if res["removed_prog_id"] is not None:
        return [
            (
                f"marker detached from {at}: removed prog {res['removed_prog_id']}, "
                f"clsact {res['clsact']}"
            )
        ]
    if not res["interface_present"]:
        return [
            (f"{at} is gone from this network namespace (its filter went with it); pins removed")
        ]
    return [f"no marker filter was attached to {at}; pins removed"]


def guard_attached(res: Doc) -> list[str]:
    if res["replaced_prog_id"] is None:
        how = "new"
    else:
        how = f"replaced prog {res['replaced_prog_id']}"
        if res["hook_switched"]:
            how += f", hook switched {res['hook_switched']}: new one attached, then old removed"
        elif res["mode_switched"]:
            how += ", XDP mode switched: detach + attach"
    cache = res["replay_cache"]
    cache_text = {
        "new": f"replay cache {cache['entries']} entries",
        "kept": f"replay cache kept ({cache['entries']} entries)",
        "resized": f"new replay cache of {cache['entries']} entries "
        f"({cache['copied']} live entries copied)",
    }[cache["state"]]
    at = f"XDP {res['xdp_mode']}" if res["hook"] == "xdp" else "tc ingress"
    return [
        (
            f"guard attached to {res['ifname']} ({at}; hook {res['hook_reason']}): "
            f"prog {res['prog_id']} tag {res['tag']} ({how})"
        ),
        (
            f"  action {res['action']}, skew {res['skew']}, {cache_text}; "
            f"{protects(res['protect'])}, {keys(res['keys'])}; pinned at {res['pinned']}"
        ),
        *_guard_config_lines(res),
    ]


def _guard_config_lines(res: Doc) -> list[str]:
    """What a guard attach or apply says about a sticky --mode and the
    namespace's other guards."""
    lines = []
    if res["action_override"]:
        lines.append(
            f"  action {res['action']} is a --mode override (the config says "
            f"{res['config_action']}); it stays until `netoken guard attach "
            f"{res['ifname']} -c FILE --mode config`"
        )
    if res["shared_by"] > 1:
        n = res["shared_by"] - 1
        others = f"the {n} other guards here run" if n > 1 else "the other guard here runs"
        lines.append(
            f"  config, keys and replay cache are per network namespace: {others} this config too"
        )
    return lines


def guard_detached(res: Doc) -> list[str]:
    f = res["foreign_prog"]
    at = where(res)
    if res["removed_prog_id"] is not None:
        how = f"XDP {res['xdp_mode']}" if res["hook"] == "xdp" else "tc ingress"
        qdisc = f", clsact qdisc {res['clsact']}" if res.get("clsact") else ""
        lines = [
            (
                f"guard detached from {at}: removed prog {res['removed_prog_id']} "
                f"({how}{qdisc}); pins removed"
            )
        ]
    elif not res["interface_present"]:
        lines = [
            (
                f"{at} is gone from this network namespace (its guard program went with it); "
                f"pins removed"
            )
        ]
    elif f is not None:
        what = "XDP program" if f["hook"] == "xdp" else "tc ingress filter's program"
        lines = [
            (
                f"{what} {f['name']!r} (id {f['id']}) on {at} was not installed "
                f"by netoken and stays attached; netoken's guard pins removed"
            )
        ]
    else:
        lines = [f"no guard was attached to {at}; pins removed"]
    left = res["guards_left"]
    if left:
        lines.append(
            f"  the shared guard state stays for the {left} other "
            f"guard{'s' if left > 1 else ''} of this network namespace"
        )
    return lines


def applied(res: Doc, path: str, several_keys: bool) -> list[str]:
    """One role's `apply` result; SEVERAL_KEYS: some policy has more than one
    key, so which is in use is worth a line."""
    if res["role"] == "marker":
        lines = [
            (
                f"applied {path} to the marker on {res['ifname']} (prog {res['prog_id']}): "
                f"{policies(res['policies'])}, {keys(res['keys'])}"
            )
        ]
        lines += [f"  {what}: {', '.join(res[what])}" for what in ("added", "removed") if res[what]]
        if several_keys:
            lines.append("  keys in use: " + keys_in_use(res["schedule"]["in_use"]))
        return lines + [f"  {line}" for line in schedule_lines(res["schedule"])]
    if res["role"] == "guard":
        lines = [
            (
                f"applied {path} to the guard on {res['ifname']} (prog {res['prog_id']}): "
                f"{protects(res['protect'])}, {keys(res['keys'])}, action {res['action']}"
            ),
            *_guard_config_lines(res),
        ]
        return lines + [
            f"  keys {what}: {', '.join(map(str, res[f'keys_{what}']))}"
            for what in ("added", "removed")
            if res[f"keys_{what}"]
        ]
    return [f"applied {path} to the {res['role']} on {res['ifname']}"]


# --------------------------------------------------------------------------
# status


def memory_text(mem: Doc) -> str:
    """A status "memory" section for people."""
    text = f"{fmt_bytes(mem['own'])} in maps"
    if mem.get("shared_by"):
        n = mem["shared_by"]
        who = f"by the namespace's {n} guards" if n > 1 else "state (the namespace's only guard)"
        text += f" + {fmt_bytes(mem['shared'])} shared {who}"
    elif "shared" in mem:
        text += " (its own replay cache and config: attach it again to share the namespace's)"
    return text


def memory_line(items: list[Doc]) -> str | None:
    """Total kernel memory of netoken's maps in this namespace, shared state once."""
    mems = [d["memory"] for d in items if isinstance(d.get("memory"), dict)]
    if not mems:
        return None
    own = sum(m["own"] for m in mems)
    shared = max((m.get("shared", 0) for m in mems if m.get("shared_by")), default=0)
    text = f"memory: {fmt_bytes(own + shared)} in netoken's maps here"
    if shared:
        text += (
            f" ({fmt_bytes(own)} per interface in total, {fmt_bytes(shared)} shared guard state)"
        )
    return text


def keys_line(keys: list[Doc]) -> str:
    ks = []
    for k in keys:
        extra = f", bind {'+'.join(k['bind'])}" if k["bind"] else ""
        ks.append(f"{k['id']} (fp {k['fingerprint']}, window {k['window']}s{extra})")
    return "keys     " + (", ".join(ks) or "none")


def _status_head(d: Doc, attach_line: str) -> list[str]:
    """The first status lines of a role: state, ATTACH_LINE, pins, config, option."""
    lines = [
        f"{d['state']}  prog {d['prog']['id']}  tag {d['prog']['tag']}",
        attach_line,
        f"pinned   {d['pinned']}",
        f"memory   {memory_text(d['memory'])}",
    ]
    if d.get("config"):
        lines.append(f"config   {d['config']}  (applied {d.get('applied_at') or '?'})")
    o = d["option"]
    room = "" if "make_room" not in o else f"  make_room {'on' if o['make_room'] else 'off'}"
    lines.append(f"option   kind {o['kind']}  exid 0x{o['exid']:04x}{room}")
    return lines


def _item_lines(d: Doc) -> list[str]:
    """The status lines of one item: a role's own view, a ghost, or what the
    pins alone tell (state of an unknown role, or of another namespace)."""
    view = VIEWS.get(d.get("role") or "")
    if d.get("ghost"):
        head = (
            f"ghost  prog {d['prog']['id']}  tag {d['prog']['tag']}: netoken's "
            f"program runs here without pinned state"
        )
        return [head, f"remove it with: {d['remove']}"]
    if view is not None and "attach" in d:
        return view.status_lines(d)
    lines = [f"{d['state']}", f"pinned   {d['pinned']}"]
    if d.get("prog"):
        lines[0] = f"prog {d['prog']['id']}  {d['state']}"
    if d.get("remove"):
        lines.append(f"remove   {d['remove']}")
    return lines


def _netns_header(ns: Doc | None) -> str:
    if ns is None:
        return "state of an older netoken"
    name = f"{ns['name']} " if ns.get("name") else ""
    return f"network namespace {name}(net:[{ns['inode']}], cookie {ns['cookie']})"


def status(items: list[Doc], all_netns: bool) -> list[str]:
    """`netoken status` for people: interface by interface, role by role
    (grouped by network namespace with ALL_NETNS)."""
    out = []
    last: tuple[Any, Any] | None = None
    ns_last: Any = ()
    for d in items:
        ns = d.get("netns")
        key = ns.get("cookie") if isinstance(ns, dict) else None
        if all_netns and key != ns_last:
            out.append(_netns_header(ns))
            ns_last, last = key, None
        indent = "  " if all_netns else ""
        if (d["ifname"], key) != last:
            idx = d.get("ifindex")
            was = d.get("attached_as")
            extra = f" (ifindex {idx}" + (f", attached as {was})" if was else ")") if idx else ""
            out.append(f"{indent}{d['ifname']}{extra}")
            last = (d["ifname"], key)
        lines = _item_lines(d)
        role = d.get("role") or "?"
        out.append(f"{indent}  {role:<7} {lines[0]}")
        out += [f"{indent}  {'':<7} {line}" for line in lines[1:]]
    return out


def unguarded(doors: list[Doc]) -> list[str]:
    """The devices that let traffic in past every guard, as `status` ends."""
    return [
        "",
        "not guarded (traffic enters this host past every guard):",
        *(f"  {door['message']}" for door in doors),
    ]


def other_netns(others: list[state.OtherNetns], limit: int = 4) -> str:
    """One line naming the other namespaces with netoken state, and what is there."""
    others = [o for o in others if o.roles]
    if not others:
        return ""
    parts = []
    for o in others[:limit]:
        what = ", ".join(f"{ifname} {role}" for ifname, role in o.roles)
        parts.append(f"{state.netns_label(o.netns)} ({what})")
    more = f" and {len(others) - limit} more" if len(others) > limit else ""
    n = sum(len(o.roles) for o in others)
    return (
        f"{n} attachment(s) in other network namespaces not shown: {'; '.join(parts)}{more} "
        f"(netoken -n NAME ..., or status --all-netns)"
    )


# --------------------------------------------------------------------------
# stats


def counters(d: Doc) -> dict[str, int]:
    """A `stats` item's counters and the per-key ones of a guard (key1_ok,
    key1_bad, ...) as one flat name -> count, for lines, tables and rates."""
    out = dict(d["counters"])
    for k in d.get("keys", []):
        out[f"key{k['id']}_ok"] = k["ok"]
        out[f"key{k['id']}_bad"] = k["bad"]
    return out


def stats(items: list[Doc]) -> list[str]:
    out = [] if items else ["nothing attached"]
    for d in items:
        out.append(f"{d['ifname']}  {d['role']}")
        out += [f"  {k:<17} {v:>14}" for k, v in counters(d).items()]
    return out


def stats_watch_lines(items: list[Doc], now: float) -> list[str]:
    """Piped `stats --watch`: one self-contained line per role and interval."""
    out = []
    for d in items:
        parts = [f"{k}={v} ({d['rates'].get(k, 0):g}/s)" for k, v in counters(d).items() if v]
        out.append(f"{iso(now)} {d['ifname']} {d['role']} " + (" ".join(parts) or "all zero"))
    return out


def stats_table(items: list[Doc], interval: float) -> Any:
    """`stats --watch` on a terminal: a rich table, rates in bold, zeros dim."""
    from rich.table import Table

    t = Table(title=f"netoken stats (every {interval:g}s, Ctrl-C to quit)", title_justify="left")
    for col, just in (
        ("IFACE", "left"),
        ("ROLE", "left"),
        ("REASON", "left"),
        ("COUNT", "right"),
        ("RATE/s", "right"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for d in items:
        for k, v in counters(d).items():
            rate = d.get("rates", {}).get(k, 0.0)
            style = "bold" if rate else ("dim" if not v else None)
            t.add_row(d["ifname"], d["role"], k, f"{v:,}", f"{rate:,.1f}", style=style)
    return t


# --------------------------------------------------------------------------
# monitor


def event_line(e: Doc) -> str:
    view = VIEWS.get(e["role"])
    if view is None:
        import json

        return json.dumps(e)
    return view.event_line(e)


def missed_line(d: Doc) -> str:
    """Events a role could not queue (ring full) or withheld (rate limit)."""
    if "suppressed" in d:
        return (
            f"-- {d['suppressed']} event(s) suppressed on {d['ifname']} {d['role']} "
            f"(rate limit; {d['suppressed_total']} since attach) --"
        )
    return (
        f"-- {d['lost']} event(s) lost on {d['ifname']} {d['role']} "
        f"(ring buffer full; {d['lost_total']} lost since attach) --"
    )


# --------------------------------------------------------------------------
# the roles' own views


# An event column: its title, its format spec, and its value in an event.
Column = tuple[str, str, Callable[[Doc], object]]


def _dash(v: object) -> object:
    return "-" if v is None else v


# The first and the address columns of every role's events.
_TIME: Column = ("TIME", "<12", lambda e: e["time"][11:23])
_IFACE: Column = ("IFACE", "<15", lambda e: e["ifname"])
_SOURCE: Column = ("SOURCE", "<22", lambda e: endpoint(e["saddr"], e["sport"]))
_DESTINATION: Column = ("DESTINATION", "<22", lambda e: endpoint(e["daddr"], e["dport"]))


class View:
    """How one role's documents read: its status lines and its events, a
    column each (EVENT_COLUMNS)."""

    EVENT_COLUMNS: tuple[Column, ...]

    def status_lines(self, d: Doc) -> list[str]:
        raise NotImplementedError

    def event_header(self) -> str:
        return " ".join(format(title, spec) for title, spec, _ in self.EVENT_COLUMNS)

    def event_line(self, e: Doc) -> str:
        return " ".join(format(value(e), spec) for _, spec, value in self.EVENT_COLUMNS)


def _tc_line(a: Doc) -> str:
    return (
        f"tc       {a['hook']} ({a['qdisc']}) handle 0x{a['handle']:x} "
        f"prio {a['priority']}, {a['mode']}"
    )


class MarkerView(View):
    EVENT_COLUMNS = (
        _TIME,
        _IFACE,
        ("POLICY", "<12", lambda e: str(e["policy"] or e["policy_id"])),
        _SOURCE,
        _DESTINATION,
        ("MODE", "<6", lambda e: e["mode"]),
        ("KEY", ">3", lambda e: e["key_id"] if e["mode"] == "mac" else "-"),
        ("EPOCH", ">10", lambda e: e["epoch"] if e["mode"] == "mac" else "-"),
        ("NONCE", "<12", lambda e: e["nonce"] if e["mode"] == "mac" else "-"),
        ("TAG", "", lambda e: e["tag"] if e["mode"] == "mac" else "-"),
    )

    def status_lines(self, d: Doc) -> list[str]:
        l3 = ", L3 device (packets start at the IP header)" if d.get("link") == "l3" else ""
        lines = _status_head(d, _tc_line(d["attach"]) + l3)
        lines.append(keys_line(d["keys"]))
        if not d["policies"]:
            lines.append("policies none (nothing is marked)")
        width = max((len(str(p.get("name"))) for p in d["policies"]), default=0)
        for p in d["policies"]:
            how = "static"
            if p.get("mode") == "mac":
                how = f"mac key {p.get('key')}"
                if len(p.get("keys") or []) > 1:
                    how += f" of {','.join(map(str, p['keys']))}"
            ports = ",".join(str(x) for x in p.get("ports", [])) or "all"
            lines.append(
                f"policy   {p.get('name')!s:<{width}}  {how:<10} ports {ports:<14} "
                + " ".join(p.get("destinations", []))
            )
        lines.extend(schedule_lines(d.get("schedule") or {}))
        return lines


class GuardView(View):
    EVENT_COLUMNS = (
        _TIME,
        _IFACE,
        ("VERDICT", "<11", lambda e: e["verdict"]),
        ("ACTION", "<7", lambda e: e["action"]),
        _SOURCE,
        _DESTINATION,
        ("KEY", ">3", lambda e: _dash(e["key_id"])),
        ("EPOCH", ">10", lambda e: _dash(e["epoch"])),
        ("PROTECT", "", lambda e: f"#{e['protect']}"),
    )

    def status_lines(self, d: Doc) -> list[str]:
        a = d["attach"]
        if a["type"] == "tc":
            at = _tc_line(a)
        else:
            how = "kernel's choice" if a["requested"] == "auto" else "forced"
            at = f"xdp      {a['mode'] or '-'} ({how})"
        if a.get("reason"):
            at += f"; hook {a['reason']}"
        lines = _status_head(d, at)
        src = "config"
        if d["action_override"]:
            says = d.get("config_action")
            src = f"--mode; the config says {says}" if says else "--mode"
        ev = d["events"]
        lines.append(
            f"action   {d['action']} ({src})  fragments {d['fragments']}  skew ±{d['skew']}  "
            f"replay cache {d['replay_cache']['entries']} entries  "
            f"events ≤{ev['rate']}/s burst {ev['burst']} per CPU"
        )
        lines.append(keys_line(d["keys"]))
        if not d["protect"]:
            lines.append("protect  none (nothing is checked)")
        for p in d["protect"]:
            ks = ",".join(map(str, p["keys"])) or "-"
            if p["tokens"]:
                ks += f" +{p['tokens']} static"
            ports = ",".join(str(x) for x in p["ports"] or []) or (
                "all" if p["ports"] == [] else "?"
            )
            dests = " ".join(p["destinations"] or ["?"])
            lines.append(
                f"protect  #{p['id']:<3} {p['action']:<7} keys {ks:<10} ports {ports:<14} {dests}"
            )
        return lines


# Role name (a document's "role") -> its view.  A role missing here (state of
# a newer netoken) is shown by what its pins tell, and its events as JSON.
VIEWS: dict[str, View] = {"marker": MarkerView(), "guard": GuardView()}


# --------------------------------------------------------------------------
# config check


def config_checked(d: Doc, path: str, several_keys: bool) -> list[str]:
    """`config check` of a valid config at PATH: what it holds, the key
    schedule, what the agent would manage."""
    lines = [
        (f"{path}: valid: {keys(d['keys'])}, {policies(d['policies'])}, {protects(d['protect'])}")
    ]
    if several_keys:
        lines.append("  keys in use now: " + keys_in_use(d["schedule"]["in_use"]))
    lines += [f"  {line}" for line in schedule_lines(d["schedule"])]
    agent = d["agent"]
    if agent is not None:
        lines.append(
            f"  agent: marker on {' '.join(agent['mark']) or 'nothing'}, guard on "
            f"{' '.join(agent['guard']) or 'nothing'}, metrics {agent['metrics'] or 'off'}"
        )
    return lines
