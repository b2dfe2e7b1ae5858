"""Compile "destination prefixes + ports -> target" rules into LPM trie entries.

The datapath does one LPM lookup on the destination address and then scans a
short list of port ranges (struct nt_port_rules).  design.md §4 says the most
specific prefix wins, then the port.  Taken literally, a SYN to a port that the
most specific prefix does not list would match nothing even when a broader
prefix covers that port, which surprises operators ("10.0.0.0/8 all ports,
10.1.0.0/16 only 443": 10.1.2.3:80 should still be marked).  So each prefix's
list holds its own rules first, then those inherited from every covering
prefix, most specific first.  The first match in the list wins, which gives
"the most specific prefix that has a matching port wins".
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from . import layout

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ALL_PORTS = (0, 65535)


class RuleError(ValueError):
    """The rules do not fit the datapath's limits."""


@dataclass(frozen=True)
class Rule:
    network: Network
    lo: int
    hi: int
    target: int  # policy or protect-entry index


def expand(
    entries: Iterable[tuple[Iterable[Network], Iterable[tuple[int, int]], int]],
) -> list[Rule]:
    """(destinations, port ranges (empty = all), target) triples -> flat rules."""
    rules = []
    for networks, ports, target in entries:
        ranges = list(ports) or [ALL_PORTS]
        for net in networks:
            for lo, hi in ranges:
                rules.append(Rule(net, lo, hi, target))
    return rules


def compile_lpm(rules: list[Rule]) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """Return (v4, v6) dicts of LPM key bytes -> struct nt_port_rules bytes."""
    # Prefixes as (bits, prefixlen, address as int): walking up the supernets
    # with masks is ~6x faster than ipaddress.supernet() at 10,000 prefixes.
    own: dict[tuple[int, int, int], list[Rule]] = {}
    for r in rules:
        n = r.network
        own.setdefault((n.max_prefixlen, n.prefixlen, int(n.network_address)), []).append(r)

    out: tuple[dict[bytes, bytes], dict[bytes, bytes]] = ({}, {})
    for (bits, plen, addr), mine in own.items():
        chain: list[Rule] = list(mine)
        # At most 32/128 dict probes per prefix, most specific first.
        for sup_len in range(plen - 1, -1, -1):
            mask = ((1 << sup_len) - 1) << (bits - sup_len)
            chain.extend(own.get((bits, sup_len, addr & mask), ()))
        if len(chain) > layout.MAX_PORT_RULES:
            raise RuleError(
                f"destination {mine[0].network} has {len(chain)} port rules including those "
                f"inherited from covering prefixes; the datapath holds at most "
                f"{layout.MAX_PORT_RULES}"
            )
        value = layout.NtPortRules(count=len(chain))
        for i, r in enumerate(chain):
            value.rules[i] = layout.NtPortRule(lo=r.lo, hi=r.hi, policy=r.target)
        # struct nt_lpm_v4/v6: host-order prefixlen, then the address as on the wire
        key = plen.to_bytes(4, sys.byteorder) + addr.to_bytes(bits // 8, "big")
        out[0 if bits == 32 else 1][key] = bytes(value)
    return out
