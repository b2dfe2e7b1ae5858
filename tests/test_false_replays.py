"""False replays at a busy destination (design.md §2, "Why 48/32").

With the default bind = [], tokens to one destination and port in one epoch
differ only by their nonces, so the replay cache takes a legitimate SYN for
a replay whenever two nonces collide: about N²/2⁴⁹ among N tokens with wire
format 2 (0.0018 expected among a million; format 1's 32-bit nonce gave
~116).  A million SYNs from N clients behind one NAT (one source address,
random source ports) go through the real marker, then the guard, both under
BPF_PROG_TEST_RUN: every one must be accepted.
"""

from __future__ import annotations

import os
import random
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from netoken.guard import Guard
from netoken.marker import Marker

from .conftest import make_config
from .pkt import LINUX_SYN_OPTS, parse, syn

N = 1_000_000
WINDOW = 86_400  # one epoch for the whole run
DST, NAT = "198.51.100.10", "192.0.2.1"
XDP_PASS = 2
THREADS = max(1, min(4, os.cpu_count() or 1))

CONFIG = f"""
[[policy]]
name = "busy"
destinations = ["{DST}/32"]
ports = [443]
key = 1

[guard]
action = "drop"
replay_cache = 2097152
[[guard.protect]]
destinations = ["{DST}/32"]
ports = [443]
keys = [1]
"""


@pytest.fixture
def progs(tmp_path):
    cfg = make_config(tmp_path, CONFIG, window=WINDOW)
    with Marker.load() as m, Guard.load(replay_cache=cfg.guard.replay_cache) as g:
        m.configure(cfg)
        g.configure(cfg)
        yield m, g


def with_sport(frame: bytearray, l4: int, sport: int) -> None:
    """Rewrite the source port, updating the TCP checksum (RFC 1624)."""
    old = struct.unpack_from("!H", frame, l4)[0]
    csum = struct.unpack_from("!H", frame, l4 + 16)[0]
    s = (~csum & 0xFFFF) + (~old & 0xFFFF) + sport
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", frame, l4, sport)
    struct.pack_into("!H", frame, l4 + 16, ~s & 0xFFFF)


def clients_behind_nat(m: Marker, g: Guard, seed: int, n: int) -> tuple[int, bytes]:
    """N SYNs from random source ports of one address: marker, then guard.
    Returns how many the guard rejected, and the first marked frame."""
    mark, guard = m.prog.test_runner(), g.prog.test_runner()
    frame = bytearray(syn(dst=DST, src=NAT, dport=443, options=LINUX_SYN_OPTS))
    l4 = parse(bytes(frame)).l4
    rng = random.Random(seed)
    rejected, first = 0, b""
    for _ in range(n):
        with_sport(frame, l4, rng.randrange(1024, 65536))
        _, out = mark(bytes(frame))
        first = first or out
        rejected += guard(out)[0] != XDP_PASS
    assert parse(bytes(frame)).tcp_checksum_ok()
    return rejected, first


def test_a_million_fresh_tokens_to_one_service_are_never_replays(progs):
    m, g = progs
    left = WINDOW - time.time() % WINDOW
    if left < 600:  # do not straddle the daily epoch boundary
        time.sleep(left + 1)
    g0 = g.stats()
    t0 = time.monotonic()
    # One thread per CPU (test_run releases the GIL); the replay cache and
    # the counters are shared, as they are between a NIC's queues.
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(
            pool.map(lambda i: clients_behind_nat(m, g, i, N // THREADS), range(THREADS))
        )
    elapsed = time.monotonic() - t0
    g1 = g.stats()
    d = {k: g1[k] - g0[k] for k in g1}
    rejected = sum(r for r, _ in results)
    print(
        f"\n{N:,} fresh tokens to {DST}:443 in one epoch: ok {d['ok']:,}, "
        f"replay {d['replay']}, other rejections {rejected - d['replay']} ({elapsed:.1f} s)"
    )
    assert m.stats()["marked"] == N
    assert (d["ok"], d["replay"], rejected) == (N, 0, 0)
    # That the cache does catch a token it holds, and when a direct-mapped
    # slot forgets one, is tests/test_replay_cache.py's and the test below.


def test_a_captured_token_replayed_1000_times_passes_once(progs):
    m, g = progs
    captured = m.prog.test_run(syn(dst=DST, src=NAT, dport=443, options=LINUX_SYN_OPTS)).data_out
    guard = g.prog.test_runner()
    g0 = g.stats()
    passed = sum(guard(captured)[0] == XDP_PASS for _ in range(1000))
    g1 = g.stats()
    assert passed == 1
    assert (g1["ok"] - g0["ok"], g1["replay"] - g0["replay"]) == (1, 999)
