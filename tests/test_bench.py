"""The benchmark harness runs and reports what it claims, in the shape it claims.

Structure only: timings depend on the machine, so no figure is asserted on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest

from netoken import bench, layout

SAMPLES = 20


@pytest.fixture(scope="module")
def datapath() -> dict:
    return bench.datapath(samples=SAMPLES)


def _our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [
        ln.split()[0]
        for ln in out.splitlines()
        if ln.startswith(f"ntbench-{os.getpid() % 100000:05d}-")
    ]


def test_every_contender_is_reported_next_to_the_floor_of_its_group(datapath):
    assert len(datapath["groups"]) == 5
    for g in datapath["groups"]:
        rows = g["rows"]
        floors = [r for r in rows if r["floor"] is None]
        assert len(floors) == 1, g["title"]
        floor = floors[0]
        assert floor["name"].startswith("empty ")
        for r in rows:
            assert r["samples"] == g["samples"] == SAMPLES
            assert r["repeat"] == floor["repeat"], "a contender and its floor share the harness"
            if r is not floor:
                assert r["floor"] == floor["name"]
                assert r["path"], f"{r['name']} names the counter its path bumps"
                assert r["over_floor_ns"] == r["median_ns"] - floor["median_ns"]


def test_the_contenders_the_issue_asks_for_are_there(datapath):
    names = {r["name"] for g in datapath["groups"] for r in g["rows"]}
    for want in (
        "marker: IPv4 SYN, mac",
        "marker: IPv4 SYN, static",
        "marker: IPv6 SYN, mac",
        "marker: SYN, no policy",
        "marker: ACK, no payload",
        "marker: 1500-byte ACK",
        "marker: UDP",
        "guard: valid SYN, first sight",
        "guard: valid SYN, seen before (replay)",
        "guard: SYN without token",
        "guard: SYN with bad tag (forged)",
        "guard: ACK to protected port",
        "reference: static appender (seed)",
        "reference: bare SipHash verifier",
        "guard: SYN, unprotected destination",
        "guard: TCP fragment to protected address",
        f"guard: IPv6 SYN behind {layout.MAX_IP6_EXT} extension headers",
        f"guard: IPv6 SYN behind {layout.MAX_IP6_EXT + 1} (fails closed)",
        # the same paths at the other hook
        "tc guard: valid SYN, seen before (replay)",
        "tc guard: SYN without token",
        "tc guard: SYN with bad tag (forged)",
        "tc guard: ACK to protected port",
    ):
        assert want in names


def test_mutating_marker_paths_take_one_run_per_sample(datapath):
    first = datapath["groups"][0]
    assert first["repeat"] == 1
    assert {r["path"] for r in first["rows"]} >= {"marked", "events_lost"}
    first_sight = datapath["groups"][-1]
    assert first_sight["repeat"] == 1


def test_results_are_json_and_render_as_a_table(datapath):
    res = {"machine": bench.machine(), "quick": True, "datapath": datapath}
    assert json.loads(json.dumps(res))["datapath"]["groups"]
    text = bench.format_table(res)
    for g in datapath["groups"]:
        assert g["title"] in text
        for r in g["rows"]:
            assert r["name"] in text


def test_the_datapath_part_leaves_no_namespace_behind(datapath):
    assert _our_namespaces() == []


def test_a_lab_is_removed_when_its_block_fails():
    with pytest.raises(RuntimeError), bench.lab() as lb:
        ns = lb.ns("tt")
        lb.spawn(ns, "sleep", "60")
        assert ns in _our_namespaces()
        raise RuntimeError("boom")
    assert _our_namespaces() == []


def test_cli_options():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--quick", "--only", "datapath", "--only", "control"])
    assert args.quick and args.only == ["datapath", "control"]
    assert parser.parse_args([]).only is None


def test_guard_scale_reports_memory_and_attach_time_per_count(tmp_path):
    from netoken.bench.control_part import guard_scale

    res = guard_scale(tmp_path, counts=(1, 3))
    assert [p["interfaces"] for p in res["points"]] == [1, 3]
    one, three = res["points"]
    # one shared set, whatever the number of interfaces; the rest per interface
    assert one["shared_bytes"] == three["shared_bytes"] > 0
    assert three["own_bytes"] == 3 * one["own_bytes"] > 0
    # the replay cache is shared: 8 bytes a slot, whatever the number of guards
    assert one["replay_cache_bytes"] == three["replay_cache_bytes"] >= 8 * res["replay_cache"]
    assert one["replay_cache_bytes"] < one["shared_bytes"]
    text = bench.format_table({"control": {"guard_scale": res}})
    assert "guards in one network namespace" in text and "per interface" in text
    assert _our_namespaces() == []
