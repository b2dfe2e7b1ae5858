"""The key schedule (design.md §4): which key a policy marks with, and when that changes.

Of a policy's keys, the marker uses the one whose ``mark_from`` passed last;
a key without one has always passed, and a tie goes to the key listed last.
Everything here works on plain values (key id -> start as a Unix time, -inf
for "always"), so the same rules serve a loaded config, the metadata `status`
reads back, and `config check` on a machine without libbpf.  Only
`netoken agent` switches at the instant; `apply` and `attach` use the
schedule as of the moment they run.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def scheduled_key(ids: Sequence[int], starts: Mapping[int, float], now: float) -> int:
    """The key of IDS that marks at NOW, given each key's start: the latest
    start that has passed, a tie to the key listed last; if none has passed
    (the clock went back behind every start), the key that starts first."""
    started = [(starts[k], i, k) for i, k in enumerate(ids) if starts[k] <= now]
    if started:
        return max(started)[2]
    return min((starts[k], i, k) for i, k in enumerate(ids))[2]


def next_switch(
    schedules: Iterable[Sequence[int]], starts: Mapping[int, float], now: float
) -> float | None:
    """The first instant after NOW at which one of SCHEDULES (key id lists)
    changes its key, or None.  A start that changes nothing (a later key
    already marks) is no switch."""
    schedules = [tuple(s) for s in schedules]
    later = sorted({starts[k] for s in schedules for k in s if starts[k] > now})
    before = [scheduled_key(s, starts, now) for s in schedules]
    for t in later:
        if [scheduled_key(s, starts, t) for s in schedules] != before:
            return t
    return None


def iso(t: float | _dt.datetime) -> str:
    """A Unix time or aware datetime as RFC 3339 UTC, e.g. 2026-12-02T00:00:00Z."""
    d = t if isinstance(t, _dt.datetime) else _dt.datetime.fromtimestamp(t, _dt.UTC)
    return d.astimezone(_dt.UTC).isoformat().replace("+00:00", "Z")


def plan(cfg: Any, now: float) -> dict[str, Any]:
    """CFG's schedule as of NOW: the key each mac policy marks with, and the
    next switch (which policies change to which key), or None."""
    in_use = cfg.marking_keys(now)
    at = cfg.next_switch(now)
    nxt = None
    if at is not None:
        nxt = {
            "at": iso(at),
            "policies": {n: k for n, k in cfg.marking_keys(at).items() if k != in_use[n]},
        }
    return {"in_use": in_use, "next_switch": nxt}


def _starts(meta: dict[str, Any]) -> dict[int, float]:
    out = {}
    for k in meta.get("keys", []):
        t = k.get("mark_from")
        out[k.get("id")] = -math.inf if t is None else _dt.datetime.fromisoformat(t).timestamp()
    return out


def from_meta(meta: dict[str, Any], policies: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """What the schedule in a marker's metadata says as of NOW, next to the
    keys POLICIES really use (their "key", read from the live map): the next
    switch, and switches whose instant passed without anyone applying them."""
    starts = _starts(meta)
    mac = [p for p in policies if p.get("mode") == "mac" and p.get("keys")]
    try:
        due = {p["name"]: scheduled_key(p["keys"], starts, now) for p in mac}
        at = next_switch([p["keys"] for p in mac], starts, now)
        then = {p["name"]: scheduled_key(p["keys"], starts, at) for p in mac} if at else {}
    except (KeyError, TypeError):
        return {"next_switch": None, "overdue": []}  # metadata from an older netoken
    overdue = [
        {"policy": p["name"], "key": due[p["name"]], "since": iso(starts[due[p["name"]]])}
        for p in mac
        if "key" in p and p["key"] != due[p["name"]]
    ]
    nxt = None
    if at is not None:
        nxt = {"at": iso(at), "policies": {n: k for n, k in then.items() if k != due[n]}}
    return {"next_switch": nxt, "overdue": overdue}
