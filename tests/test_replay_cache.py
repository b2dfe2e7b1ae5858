"""The guard's replay cache: direct-mapped 8-byte slots (bpf/netoken.h
NT_REPLAY_ENTRY/NT_REPLAY_INDEX, mirrored in netoken/layout.py)."""

from __future__ import annotations

import pytest

from netoken import layout, token
from netoken.guard import Guard, replay_slots
from netoken.libbpf import BPF_ANY
from netoken.marker import Marker

from .pkt import parse, syn
from .verdicts import GUARD_SECTION, run, verdict, write_config

CONFIG = """
[[policy]]
name = "web"
destinations = ["198.51.100.0/24"]
key = 1
""" + GUARD_SECTION.replace("replay_cache = 65536", "replay_cache = 1024")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = write_config(tmp_path_factory.mktemp("cfg"), CONFIG)
    assert c.guard.replay_cache == 1024
    return c


@pytest.fixture
def guard(cfg):
    g = Guard.load(replay_cache=cfg.guard.replay_cache)
    g.configure(cfg)
    yield g
    g.close()


@pytest.fixture(scope="module")
def marker(cfg):
    m = Marker.load()
    m.configure(cfg)
    yield m
    m.close()


def _token(pkt: bytes) -> token.Token:
    (opt,) = token.find_options(parse(pkt).options)
    return token.decode(opt)


def _slot(guard: Guard, tok: token.Token) -> tuple[int, int]:
    entry = layout.replay_entry(tok.nonce, tok.tag)
    idx = layout.replay_index(entry, guard.replay_cache)
    raw = guard.maps["nt_replay"].lookup(idx.to_bytes(4, "little"))
    return entry, int.from_bytes(raw, "little")


def test_sizes_round_up_to_a_power_of_two():
    assert [replay_slots(n) for n in (1024, 1025, 3000, 1 << 20)] == [1024, 2048, 4096, 1 << 20]
    with Guard.load(replay_cache=3000) as g:
        assert g.replay_cache == 4096


def test_python_and_the_guard_agree_on_entry_and_slot(guard, marker):
    for _ in range(50):
        pkt = marker.prog.test_run(syn()).data_out
        assert "ok" in run(guard, pkt)[1]
        entry, stored = _slot(guard, _token(pkt))
        assert stored == entry != 0


def test_a_replayed_token_passes_once(guard, marker):
    pkt = marker.prog.test_run(syn()).data_out
    verdicts = [verdict(guard, pkt) for _ in range(1000)]
    assert verdicts.count("ok") == 1 and verdicts.count("replay") == 999


def test_a_token_is_forgotten_only_when_another_takes_its_slot(guard, marker):
    first = marker.prog.test_run(syn()).data_out
    run(guard, first)
    entry, _ = _slot(guard, _token(first))
    slot = layout.replay_index(entry, guard.replay_cache)
    # Fresh tokens until one lands in the same slot (1 in 1024 does); every
    # one before it leaves FIRST known.
    for _ in range(20 * guard.replay_cache):
        pkt = marker.prog.test_run(syn()).data_out
        tok = _token(pkt)
        other = layout.replay_index(layout.replay_entry(tok.nonce, tok.tag), guard.replay_cache)
        if other != slot:
            continue
        assert "replay" in run(guard, first)[1]
        assert "ok" in run(guard, pkt)[1]
        break
    else:
        pytest.fail("no token landed in the same slot")
    verdicts = [verdict(guard, first) for _ in range(3)]
    assert verdicts == ["ok", "replay", "replay"]


def test_an_empty_slot_value_is_never_a_replay(guard, marker):
    # A slot that holds 0 is empty: a token whose entry is 0 would be
    # indistinguishable from it, so the guard never stores one.
    pkt = marker.prog.test_run(syn()).data_out
    entry, _ = _slot(guard, _token(pkt))
    idx = layout.replay_index(entry, guard.replay_cache)
    guard.maps["nt_replay"].update(idx.to_bytes(4, "little"), bytes(8), BPF_ANY)
    assert "ok" in run(guard, pkt)[1]
