"""One guard state per network namespace (issue 16), on 50 guarded veths.

A server namespace with 50 veth pairs to a client namespace, the guard on
every server side with the default replay cache (1,048,576 entries):

- the kernel memory of netoken's maps, from `bpftool map show -j`, is one
  shared set plus a little per interface, and what `status` says;
- a token that passed on one interface is a `replay` on all 49 others (real
  frames, sent into each veth);
- config and key changes applied to all of them, and replacing one guard,
  are hitless for real connections on three of them;
- detaching 49 keeps the last one's replay cache (and the shared pins);
  the last detach removes the shared state.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netoken import config as nconfig
from netoken import guard as nguard
from netoken import marker as nmarker
from netoken import state, token
from netoken.config import DEFAULT_REPLAY_CACHE
from netoken.libbpf import Map
from netoken.netns import netns

from .conftest import TEST_KEY, Lab, run
from .e2e import ConnectionLoop, server
from .pkt import rebuild_with_option, syn
from .test_cli import OTHER_KEY, PORT, netoken, write_config

N = 50
LOOPS = 3  # interfaces with real connections through them
WINDOW = 30
MIB = 1 << 20
# Issue 16's goal: 200 guarded interfaces in one namespace in 64 MiB with
# the default replay cache, and a replay cache of 8-byte slots to come.
GOAL_200 = 64 * MIB
SLOT_BYTES = 8


def ok(*args: str, ns: str) -> str:
    # Generous: the state lock is global, and on a busy machine other
    # netoken processes may hold it for a while.
    r = netoken(*args, ns=ns, timeout=180)
    assert r.returncode == 0, f"netoken {' '.join(args)} failed: {r.stderr}"
    return r.stdout


def body(keys: list[int], mark_key: int) -> str:
    return f"""
[[policy]]
name = "svc"
destinations = ["198.18.0.0/16"]
ports = [{PORT}]
key = {mark_key}

[guard]
skew = 16                       # a token stays fresh for 8 minutes: detaching 49 takes a while

[[guard.protect]]
destinations = ["198.18.0.0/16"]
ports = [{PORT}]
keys = {keys}
"""


@dataclass
class Fleet:
    client: str
    server: str
    cookie: int
    cfg: Path
    dir: Path

    def srv(self, i: int) -> str:
        return f"s{i}"

    def ip(self, i: int) -> str:
        return f"198.18.{100 + i}.2"

    @property
    def pins(self) -> Path:
        return state.BPFFS / "netoken" / f"net:{self.cookie}"

    def stats(self, i: int) -> dict[str, int]:
        (d,) = json.loads(ok("stats", self.srv(i), "--json", ns=self.server))
        return d["counters"]

    def send(self, i: int, frame: bytes) -> None:
        """FRAME into the guarded interface s<i>, from its peer."""
        with netns(self.client):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with s:
            s.bind((f"c{i}", 0))
            s.send(frame)


@pytest.fixture
def fleet(lab: Lab, tmp_path: Path) -> Iterator[Fleet]:
    c, s = lab.ns("fc"), lab.ns("fs")
    cmds = []
    for i in range(N):
        cmds += [f"link add c{i} netns {c} type veth peer name s{i} netns {s}"]
    (tmp_path / "links").write_text("\n".join(cmds) + "\n")
    run("ip", "-batch", str(tmp_path / "links"))
    for ns, side, host in ((c, "c", 1), (s, "s", 2)):
        batch = []
        for i in range(N):
            batch += [
                f"addr add 198.18.{100 + i}.{host}/24 dev {side}{i}",
                f"link set {side}{i} up",
            ]
        (tmp_path / f"addr-{side}").write_text("\n".join(batch) + "\n")
        run("ip", "-batch", str(tmp_path / f"addr-{side}"), ns=ns)
    with netns(s):
        cookie = state.this_netns().cookie
    cfg = write_config(tmp_path, {1: TEST_KEY, 2: OTHER_KEY}, body([1], 1))
    f = Fleet(c, s, cookie, cfg, tmp_path)
    try:
        yield f
    finally:
        with netns(c):
            cc = state.this_netns().cookie
        for ck in (cookie, cc):
            for top in (state.BPFFS / "netoken", state.RUN_DIR):
                subprocess.run(["rm", "-rf", str(top / f"net:{ck}")], check=False)


def netoken_map_ids(top: Path) -> dict[int, str]:
    """Every map pinned below TOP (a namespace's state directory): id -> pin."""
    out = {}
    for d, _, files in os.walk(top):
        for name in files:
            path = os.path.join(d, name)
            try:
                with Map.from_pinned(path) as m:
                    out[m.id] = path
            except (OSError, ValueError):
                continue  # the programs
    return out


def bpftool_memlock(ids: set[int]) -> dict[int, int]:
    maps = json.loads(
        subprocess.run(
            ["bpftool", "map", "show", "-j"], capture_output=True, text=True, check=True
        ).stdout
    )
    return {m["id"]: m["bytes_memlock"] for m in maps if m["id"] in ids}


def fresh_syn(f: Fleet, i: int, key: bytes = TEST_KEY, key_id: int = 1) -> bytes:
    frame = syn(dst=f.ip(i), dport=PORT, src=f"198.18.{100 + i}.1", sport=40000)
    opt = token.build_mac_option(
        key, key_id=key_id, epoch=token.epoch_now(WINDOW), daddr=f.ip(i), dport=PORT
    )
    return rebuild_with_option(frame, opt)


def wait_counter(f: Fleet, i: int, name: str, want: int) -> dict[str, int]:
    deadline = time.monotonic() + 5
    while True:
        c = f.stats(i)
        if c[name] >= want or time.monotonic() > deadline:
            return c
        time.sleep(0.05)


def test_fifty_guards_share_one_state(fleet: Fleet, capsys):
    f = fleet
    cfg = nconfig.load(f.cfg)
    times = []
    with netns(f.server):
        for i in range(N):
            t0 = time.perf_counter()
            res = nguard.attach_pinned(f.srv(i), cfg)
            times.append(time.perf_counter() - t0)
            assert res["shared_by"] == i + 1
            assert res["replay_cache"]["entries"] == DEFAULT_REPLAY_CACHE

    # -- memory, as bpftool sees it ------------------------------------------
    ids = netoken_map_ids(f.pins)
    mem = bpftool_memlock(set(ids))
    assert set(mem) == set(ids)
    shared_top = str(f.pins / "guard")
    shared = {i: b for i, b in mem.items() if ids[i].startswith(shared_top + "/")}
    own = {i: b for i, b in mem.items() if i not in shared}
    replay = next(b for i, b in shared.items() if ids[i].endswith("/nt_replay"))
    assert len(shared) == len(nguard.SHARED_MAPS)  # one set for the namespace
    assert len(own) == N * len(nguard.OWN_MAPS)
    per_iface = sum(own.values()) / N
    total = sum(mem.values())
    budget = GOAL_200 * N // 200
    with capsys.disabled():
        print(
            f"\n{N} guards: {total / MIB:.1f} MiB of maps ({replay / MIB:.1f} MiB replay "
            f"cache of {SLOT_BYTES}-byte slots, {(sum(shared.values()) - replay) / MIB:.2f} "
            f"MiB other shared, {per_iface / 1024:.1f} KiB per interface; goal scaled to "
            f"{N}: {budget / MIB:.0f} MiB); attach: first {times[0] * 1e3:.0f} ms, "
            f"last {times[-1] * 1e3:.0f} ms"
        )
    assert replay <= SLOT_BYTES * DEFAULT_REPLAY_CACHE * 1.01  # the slots, nothing per entry
    assert total <= budget
    # status says the same
    items = json.loads(ok("status", "--json", ns=f.server))
    assert len(items) == N
    assert sum(d["memory"]["own"] for d in items) == sum(own.values())
    assert {(d["memory"]["shared"], d["memory"]["shared_by"]) for d in items} == {
        (sum(shared.values()), N)
    }
    assert "MiB shared guard state" in ok("status", ns=f.server).splitlines()[-1]

    # -- a token accepted on one interface is a replay on every other --------
    frame = fresh_syn(f, 0)
    f.send(0, frame)
    assert wait_counter(f, 0, "ok", 1)["ok"] == 1
    for i in range(1, N):
        f.send(i, frame)
    for i in range(1, N):
        c = wait_counter(f, i, "replay", 1)
        assert (c["ok"], c["replay"], c["dropped"]) == (0, 1, 1), (i, c)

    # -- config and key changes on all of them stay hitless ------------------
    with netns(f.client):
        for i in range(LOOPS):
            nmarker.attach_pinned(f"c{i}", cfg)
    before = [f.stats(i) for i in range(LOOPS)]
    rotate = write_config(f.dir, {1: TEST_KEY, 2: OTHER_KEY}, body([1, 2], 1), name="r1.toml")
    marked2 = write_config(f.dir, {1: TEST_KEY, 2: OTHER_KEY}, body([1, 2], 2), name="r2.toml")
    only2 = write_config(f.dir, {2: OTHER_KEY}, body([2], 2), name="r3.toml")
    steps = [
        lambda: ok("apply", f.srv(7), "-c", str(rotate), ns=f.server),  # reaches all 50
        lambda: [ok("apply", f"c{i}", "-c", str(marked2), ns=f.client) for i in range(LOOPS)],
        lambda: ok("guard", "attach", f.srv(1), "-c", str(marked2), ns=f.server),
        lambda: ok("apply", f.srv(N - 1), "-c", str(only2), ns=f.server),
    ]
    with server(f.server, PORT):
        loops = [ConnectionLoop(f.client, f.ip(i), PORT, workers=2) for i in range(LOOPS)]
        for lp in loops:
            lp.__enter__()
        try:
            for step in steps:
                for lp in loops:
                    lp.wait_for(lp.done + 10, 20, stop_at_failure=True)
                step()
            for lp in loops:
                lp.wait_for(lp.done + 10, 20, stop_at_failure=True)
        finally:
            for lp in loops:
                lp.__exit__(None, None, None)
    for i, lp in enumerate(loops):
        assert not lp.failures, lp.failures[:3]
        c = f.stats(i)
        bad = {
            v: c[v] - before[i][v]
            for v in ("missing", "unknown_key", "stale", "bad_tag", "replay", "dropped")
        }
        assert bad == dict.fromkeys(bad, 0), (i, bad)
        assert c["ok"] - before[i]["ok"] >= lp.done
    keys = {
        (k["id"], k["fingerprint"])
        for d in json.loads(ok("status", "--json", ns=f.server))
        for k in d["keys"]
    }
    assert keys == {(2, token.key_fingerprint(OTHER_KEY))}  # every guard runs the last config

    # -- detaching 49 keeps the last one's replay cache ----------------------
    last = N - 1
    seen = fresh_syn(f, last, OTHER_KEY, 2)
    f.send(last, seen)
    assert wait_counter(f, last, "ok", 1)["ok"] >= 1
    ok_before = f.stats(last)["ok"]
    for i in range(last):
        out = ok("guard", "detach", f.srv(i), ns=f.server)
        assert "shared guard state stays" in out
    assert (f.pins / "guard" / "nt_replay").exists()
    replays = f.stats(last)["replay"]
    f.send(last, seen)  # accepted before the 49 detaches: still a replay
    c = wait_counter(f, last, "replay", replays + 1)
    assert c["replay"] == replays + 1, c
    again = fresh_syn(f, last, OTHER_KEY, 2)
    f.send(last, again)
    f.send(last, again)
    c = wait_counter(f, last, "replay", replays + 2)
    assert (c["ok"], c["replay"]) == (ok_before + 1, replays + 2)
    out = ok("guard", "detach", f.srv(last), ns=f.server)
    assert "shared guard state stays" not in out
    assert not f.pins.exists() and not (state.RUN_DIR / f"net:{f.cookie}").exists()
