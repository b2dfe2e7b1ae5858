"""Prefix + port rules compile into LPM entries whose lists inherit from
covering prefixes, most specific first (netoken/rules.py)."""

from __future__ import annotations

import ipaddress

import pytest

from netoken import layout
from netoken.rules import RuleError, compile_lpm, expand

N = ipaddress.ip_network


def rules_of(value: bytes) -> list[tuple[int, int, int]]:
    v = layout.NtPortRules.from_bytes(value)
    return [(r.lo, r.hi, r.policy) for r in v.rules[: v.count]]


def key4(net: str) -> bytes:
    n = N(net)
    k = layout.NtLpmV4(prefixlen=n.prefixlen)
    k.addr[:] = list(n.network_address.packed)
    return bytes(k)


def key6(net: str) -> bytes:
    n = N(net)
    k = layout.NtLpmV6(prefixlen=n.prefixlen)
    k.addr[:] = list(n.network_address.packed)
    return bytes(k)


def test_narrow_prefix_inherits_the_rules_of_every_covering_prefix():
    v4, v6 = compile_lpm(
        expand(
            [
                ([N("10.0.0.0/8")], [], 0),  # all ports
                ([N("10.1.0.0/16")], [(443, 443)], 1),
                ([N("10.1.2.0/24")], [(8000, 8100)], 2),
                ([N("2001:db8::/32")], [(80, 80)], 3),
                ([N("2001:db8:1::/48")], [], 4),
            ]
        )
    )
    assert rules_of(v4[key4("10.1.2.0/24")]) == [(8000, 8100, 2), (443, 443, 1), (0, 65535, 0)]
    assert rules_of(v4[key4("10.1.0.0/16")]) == [(443, 443, 1), (0, 65535, 0)]
    assert rules_of(v4[key4("10.0.0.0/8")]) == [(0, 65535, 0)]
    assert rules_of(v6[key6("2001:db8:1::/48")]) == [(0, 65535, 4), (80, 80, 3)]
    assert set(v6) == {key6("2001:db8::/32"), key6("2001:db8:1::/48")}


def test_too_many_rules_for_one_prefix_is_an_error():
    ports = [(p, p) for p in range(1, layout.MAX_PORT_RULES + 2)]
    with pytest.raises(RuleError, match="at most 32"):
        compile_lpm(expand([([N("10.0.0.0/8")], ports, 0)]))
