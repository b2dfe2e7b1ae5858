"""What people and Prometheus read, rendered from documents alone: the
exporter's families from a role's counters, and present.py's lines from
status, stats and event documents shaped as the library returns them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from netoken import exporter, layout, present

MARKER_COUNTERS = {r: i + 1 for i, r in enumerate(layout.MARK_REASONS)}
GUARD_COUNTERS = {r: 100 + i for i, r in enumerate(layout.GUARD_REASONS)}
KEYS = [{"id": 1, "ok": 5, "bad": 2}, {"id": 7, "ok": 0, "bad": 9}]


def render(*roles: str) -> str:
    """The exposition of the families ROLES' counters fill."""
    s = exporter._Samples()
    if "marker" in roles:
        exporter.ROLE_EXPORTS["marker"](s, "eth0", MARKER_COUNTERS, {})
    if "guard" in roles:
        exporter.ROLE_EXPORTS["guard"](s, "eth1", GUARD_COUNTERS, {"keys": KEYS})

    class Fixed:
        def collect(self):
            yield from exporter._families(s)

    reg = CollectorRegistry()
    reg.register(Fixed())
    return exporter.exposition(reg).decode()


def scrape() -> dict[str, list]:
    text = render("marker", "guard")
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, **labels: str) -> float:
    (v,) = [s.value for s in samples if all(s.labels.get(k) == x for k, x in labels.items())]
    return v


def test_every_role_counter_lands_in_its_family():
    got = scrape()
    packets = got["netoken_marker_packets"]  # the parser drops _total
    assert {s.labels["reason"] for s in packets} == set(layout.MARK_PACKET_REASONS)
    assert sum(s.value for s in packets) == sum(
        MARKER_COUNTERS[r] for r in layout.MARK_PACKET_REASONS
    )
    assert value(got["netoken_syn_marked"]) == (
        MARKER_COUNTERS["marked"] + MARKER_COUNTERS["marked_payload"]
    )
    verdicts = got["netoken_guard_syn_verdicts"]
    assert [s.labels["verdict"] for s in verdicts] == list(layout.GUARD_VERDICTS)
    assert value(got["netoken_guard_actions"], action="dropped") == GUARD_COUNTERS["dropped"]
    assert value(got["netoken_guard_key_syns"], key_id="7", result="bad") == 9
    assert (
        value(got["netoken_events"], interface="eth1", result="suppressed")
        == GUARD_COUNTERS["events_suppressed"]
    )


def test_only_declared_families_are_rendered_with_their_type():
    declared = {f.name.removesuffix("_total"): f for f in exporter.FAMILIES}
    for fam in text_string_to_metric_families(render("marker", "guard")):
        assert fam.type == declared[fam.name].kind


# ---------------------------------------------------------------- present.py

ATTACH_TC = {
    "type": "tc",
    "qdisc": "clsact",
    "hook": "egress",
    "handle": 0x6E74,
    "priority": 1,
    "mode": "direct-action",
}
MARKER = {
    "ifname": "eth0",
    "ifindex": 2,
    "role": "marker",
    "state": "attached",
    "prog": {"id": 42, "tag": "abcd", "name": "netoken_mark"},
    "attach": ATTACH_TC,
    "pinned": "/sys/fs/bpf/netoken/net:1/if:2/marker",
    "memory": {"own": 3 << 20},
    "config": "/etc/netoken/netoken.toml",
    "applied_at": "2025-01-01T00:00:00Z",
    "option": {"kind": 253, "exid": 0x6E74, "make_room": True},
    "keys": [{"id": 1, "window": 30, "bind": ["saddr"], "fingerprint": "0123abcd"}],
    "policies": [
        {
            "name": "web",
            "mode": "mac",
            "key": 1,
            "keys": [1, 2],
            "ports": [443],
            "destinations": ["198.51.100.0/24"],
        }
    ],
    "schedule": {},
}


def test_a_marker_status_reads_as_before():
    assert present.status([MARKER], all_netns=False) == [
        "eth0 (ifindex 2)",
        "  marker  attached  prog 42  tag abcd",
        "          tc       egress (clsact) handle 0x6e74 prio 1, direct-action",
        "          pinned   /sys/fs/bpf/netoken/net:1/if:2/marker",
        "          memory   3.0 MiB in maps",
        "          config   /etc/netoken/netoken.toml  (applied 2025-01-01T00:00:00Z)",
        "          option   kind 253  exid 0x6e74  make_room on",
        "          keys     1 (fp 0123abcd, window 30s, bind saddr)",
        "          policy   web  mac key 1 of 1,2 ports 443            198.51.100.0/24",
    ]


def test_stats_flatten_the_guards_key_counters():
    item = {"ifname": "eth1", "role": "guard", "counters": {"ok": 3}, "keys": KEYS}
    assert present.counters(item) == {
        "ok": 3,
        "key1_ok": 5,
        "key1_bad": 2,
        "key7_ok": 0,
        "key7_bad": 9,
    }
    assert present.stats([item])[:3] == [
        "eth1  guard",
        f"  {'ok':<17} {3:>14}",
        f"  {'key1_ok':<17} {5:>14}",
    ]


def test_an_event_of_an_unknown_role_is_its_json():
    assert present.event_line({"role": "newer", "x": 1}) == '{"role": "newer", "x": 1}'
