"""`netoken bench`: what netoken costs, measured side by side.

Three parts, each usable on its own and all returned as plain data by
:func:`run_all` (``--json``) and printed by :func:`format_table`:

- **datapath**: the marker and the guard under BPF_PROG_TEST_RUN, each
  contender next to the empty program of its type (the floor: test_run's own
  skb / xdp_buff set-up and timer), interleaved (each round runs every
  contender once, in a freshly shuffled order) so machine noise lands on
  every contender alike.  The marker edits packets, and with
  repeat > 1 the kernel would re-run it on the already edited skb, so its
  contenders take many repeat=1 samples.  Non-mutating paths also run with a
  large repeat, which resolves differences of a few ns; the p99 of such
  samples is that of per-sample averages (machine noise), not a per-packet tail.
- **e2e**: real TCP between namespaces joined by veth pairs that the bench
  creates and always removes: connections per second without netoken, with
  the marker, with the marker and an empty XDP program (what native XDP on a
  veth costs by itself) and with the marker and the guard, in alternating
  rounds; iperf3 bulk throughput in the same configurations; a spoofed SYN
  flood (hping3 and trafgen) against the server with and without the guard,
  with the CPU the kernel spends on it.
- **control**: attach time, applying a 10,000-prefix policy set, cold-process
  latency of the CLI's `status` / `stats`, memory of `monitor` over a long
  event stream and the event rate it follows without loss.

Every figure is a median over rounds or samples taken in the same run;
ratios are per round (this configuration / the baseline of the same round).
bench/README.md explains the method and its caveats.

Modules: common (progress, errors, statistics, config, packets), namespaces
(what the bench creates and removes), datapath_part, e2e_part, control_part
(the three parts), suite (run_all), report (the table), cli (the options).
"""

from __future__ import annotations

import importlib
from typing import Any

# Names load their submodule on first use (PEP 562): the CLI builds its parser,
# bench options included, on every call, and must not pay for the parts.
_WHERE = {
    "BenchError": "common",
    "CONFIGS": "e2e_part",
    "Clients": "e2e_part",
    "Contender": "datapath_part",
    "DATAPATH_CONFIG": "datapath_part",
    "E2E": "e2e_part",
    "E2E_CONFIG": "e2e_part",
    "FLOOD_CONFIGS": "e2e_part",
    "IPERF_PORT": "e2e_part",
    "LEGIT_RATE": "e2e_part",
    "Lab": "namespaces",
    "NET_AS": "e2e_part",
    "NET_CS": "e2e_part",
    "PARTS": "common",
    "PORT": "e2e_part",
    "Progress": "common",
    "ROUND_CYCLE": "e2e_part",
    "Result": "datapath_part",
    "SERVER_A": "e2e_part",
    "SERVER_C": "e2e_part",
    "STATIC_TOKEN": "datapath_part",
    "TC_REPEAT": "datapath_part",
    "V4": "datapath_part",
    "V4_OTHER": "datapath_part",
    "V4_STATIC": "datapath_part",
    "V6": "datapath_part",
    "XDP_REPEAT": "datapath_part",
    "add_arguments": "cli",
    "bench_config": "common",
    "control": "control_part",
    "datapath": "datapath_part",
    "e2e": "e2e_part",
    "e2e_connections": "e2e_part",
    "e2e_flood": "e2e_part",
    "e2e_iperf": "e2e_part",
    "format_table": "report",
    "guard_contenders": "datapath_part",
    "guard_first_sight_contenders": "datapath_part",
    "lab": "namespaces",
    "machine": "suite",
    "main": "cli",
    "marker_contenders": "datapath_part",
    "marker_repeat_contenders": "datapath_part",
    "monitor_bench": "control_part",
    "netoken_cmd": "control_part",
    "run": "cli",
    "run_all": "suite",
    "run_interleaved": "datapath_part",
    "time_cli_verbs": "control_part",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


__all__ = [
    "CONFIGS",
    "DATAPATH_CONFIG",
    "E2E",
    "E2E_CONFIG",
    "FLOOD_CONFIGS",
    "IPERF_PORT",
    "LEGIT_RATE",
    "NET_AS",
    "NET_CS",
    "PARTS",
    "PORT",
    "ROUND_CYCLE",
    "SERVER_A",
    "SERVER_C",
    "STATIC_TOKEN",
    "TC_REPEAT",
    "V4",
    "V4_OTHER",
    "V4_STATIC",
    "V6",
    "XDP_REPEAT",
    "BenchError",
    "Clients",
    "Contender",
    "Lab",
    "Progress",
    "Result",
    "add_arguments",
    "bench_config",
    "control",
    "datapath",
    "e2e",
    "e2e_connections",
    "e2e_flood",
    "e2e_iperf",
    "format_table",
    "guard_contenders",
    "guard_first_sight_contenders",
    "lab",
    "machine",
    "main",
    "marker_contenders",
    "marker_repeat_contenders",
    "monitor_bench",
    "netoken_cmd",
    "run",
    "run_all",
    "run_interleaved",
    "time_cli_verbs",
]
