"""The results of run_all as an aligned plain-text table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _n(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def _table(head: Sequence[str], rows: list[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return (
            "  "
            + "  ".join(
                c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(cells, widths, right)
            ).rstrip()
        )

    return [line(head), *(line(r) for r in rows)]


def _datapath_lines(d: dict[str, Any]) -> list[str]:
    out = ["Datapath: ns per packet under BPF_PROG_TEST_RUN (floor = empty program, same group)"]
    if "error" in d:
        return out + [f"  error: {d['error']}"]
    for g in d["groups"]:
        out.append(f"  {g['title']}, {g['samples']} samples")
        rows = [
            [
                r["name"] + (" (floor)" if r["floor"] is None else ""),
                _n(r["median_ns"], ".1f" if g["repeat"] > 1 else ".0f"),
                _n(r["p99_ns"], ".1f" if g["repeat"] > 1 else ".0f"),
                ""
                if r["over_floor_ns"] is None
                else format(r["over_floor_ns"], "+.1f" if g["repeat"] > 1 else "+.0f"),
                "" if r.get("ratio_to_ref") is None else f"{r['ratio_to_ref']:.2f}x",
            ]
            for r in g["rows"]
        ]
        out += [
            "  " + ln
            for ln in _table(
                ["contender", "median", "p99", "over floor", "vs reference"],
                rows,
                [False, True, True, True, True],
            )
        ]
    note = (
        "XDP programs parked on a veth (repeat>1 without dispatcher swaps)"
        if d.get("xdp_parked")
        else "XDP not parked: few samples"
    )
    out.append(f"  pinned to CPU {d['cpu']}; {note}; replay cache {d['replay_cache']:,} entries")
    out.append(
        f"  first sight: {d.get('first_sight_repeated_tokens', 0)} of the marked SYNs "
        "repeated an earlier token (same flow and epoch, same 48-bit nonce): set aside"
    )
    return out


def _ratio(c: dict[str, Any]) -> str:
    if c.get("ratio") is None:
        return "-"
    return f"{c['ratio']:.3f} ({c['ratio_min']:.3f}-{c['ratio_max']:.3f})"


def _e2e_lines(d: dict[str, Any]) -> list[str]:
    out = ["End to end on veth (namespaces; ratio = per-round median vs 'none', min-max)"]
    if "error" in d:
        return out + [f"  error: {d['error']}"]
    c = d.get("connections")
    if c and "error" not in c:
        out.append(
            f"  connections/s: {c['workers']} clients (connect, 1 byte each way, close), "
            f"{c['rounds']} rounds x {c['seconds']:g}s per configuration"
        )
        rows = [[k, _n(v["median"]), _ratio(v), str(v["failed"])] for k, v in c["configs"].items()]
        out += _table(
            ["configuration", "conn/s", "ratio", "failed"], rows, [False, True, True, True]
        )
        verdicts = ", ".join(f"{k} {v:,}" for k, v in c["guard_verdicts"].items())
        out.append(
            f"  marker marked {c['marker_marked']:,} SYNs; guard verdicts: {verdicts}; "
            f"dropped {c['guard_rejected']:,}"
        )
        for key, what in (("in_situ", "marker + guard"), ("in_situ_tc", "marker + tc guard")):
            ins = c.get(key, {})
            if all(ins.get(k, {}).get("ns_per_run") is not None for k in ("marker", "guard")):
                out.append(
                    f"  on the real path (BPF run-time stats, {what}): "
                    + "; ".join(
                        f"{n} {ins[n]['ns_per_run']:,.0f} ns/run x "
                        f"{ins[n]['runs_per_connection']:.1f} runs = "
                        f"{ins[n]['ns_per_connection']:,.0f} ns per connection"
                        for n in ("marker", "guard")
                    )
                )
    elif c:
        out.append(f"  connections/s: error: {c['error']}")
    ip = d.get("iperf3")
    if ip and "error" not in ip:
        out.append(f"  iperf3, 1 stream, {ip['rounds']} rounds x {ip['seconds']}s")
        rows = [[k, _n(v["median"], ".2f"), _ratio(v)] for k, v in ip["configs"].items()]
        out += _table(["configuration", "Gbit/s", "ratio"], rows, [False, True, True])
        m = ip.get("marker_in_situ")
        if m and m.get("ns_per_run") is not None:
            out.append(
                f"  marker on the bulk path (BPF run-time stats): {m['ns_per_run']:,.0f} "
                f"ns/run x {m['runs_per_s']:,.0f} runs/s = {m['cpu_share']:.2%} of a CPU"
            )
    elif ip:
        out.append(f"  iperf3: error: {ip['error']}")
    fl = d.get("flood")
    if fl and "error" not in fl:
        out.append(
            f"  SYN flood, spoofed sources, {fl['seconds']:g}s each; CPU = busy CPUs "
            f"of {fl['rows'][0].get('cpus', '?')} over the whole machine; guard and "
            "marker ns from BPF run-time stats (the marker: the legitimate client's)"
        )
        rows = []
        errors = []
        for r in fl["rows"]:
            if "error" in r:
                errors.append(f"  {r['tool']}, {r.get('config', '')}: error: {r['error']}")
                continue
            frac = r["guard_drop_fraction"]
            rows.append(
                [
                    r["tool"],
                    r["config"],
                    _n(r["offered_pps"]),
                    _n(r["received_pps"]),
                    "-" if frac is None else f"{frac:.2%}",
                    _n(r["guard_ns_per_packet"], ".0f"),
                    f"{r['cpu']['softirq']:.2f}",
                    _n(r["softirq_ns_per_received"]),
                    _n(r.get("guard_drops_per_cpu_s")),
                    _n(r.get("softirq_ns_per_drop")),
                    _n(r.get("marker_ns_per_run")),
                    f"{r['legit']['ok']}/{r['legit']['ok'] + r['legit']['failed']}",
                    _n(r["legit"]["connect_us_median"]),
                ]
            )
        out += _table(
            [
                "tool",
                "server side",
                "offered/s",
                "received/s",
                "guard drops",
                "guard ns/pkt",
                "softirq CPUs",
                "softirq ns/pkt",
                "drops/CPU-s",
                "softirq ns/drop",
                "marker ns/run",
                "legit ok",
                "connect us",
            ],
            rows,
            [False, False] + [True] * 11,
        )
        out += errors
        cookies = [
            (r["tool"], r["config"], r["tcp"]["TcpExt.SyncookiesSent"])
            for r in fl["rows"]
            if "tcp" in r
        ]
        out.append("  SYN cookies sent: " + ", ".join(f"{t} {c}: {n:,}" for t, c, n in cookies))
    elif fl:
        out.append(f"  flood: error: {fl['error']}")
    return out


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _control_lines(d: dict[str, Any]) -> list[str]:
    out = ["Control plane"]
    if "error" in d:
        return out + [f"  error: {d['error']}"]
    for key, title in (("attach", "marker attach"), ("guard_attach", "guard attach")):
        a = d.get(key)
        if a:
            extra = f", replay cache {a['replay_cache']:,}" if "replay_cache" in a else ""
            out.append(
                f"  {title} (library, median of {a['reps']}{extra}): "
                f"load {a['load']:.1f} ms + configure {a['configure']:.1f} ms + "
                f"attach {a['attach']:.1f} ms = {a['total']:.1f} ms"
            )
    gs = d.get("guard_scale")
    if gs and "error" not in gs:
        out.append(
            f"  guards in one network namespace (replay cache {gs['replay_cache']:,} "
            f"slots of 8 bytes, shared; memory = memlock of netoken's maps)"
        )
        rows = [
            [
                str(p["interfaces"]),
                f"{p['attach_ms']:.0f}",
                f"{p['attach_ms_median']:.0f}",
                _mib(p["shared_bytes"]),
                f"{p['per_interface_bytes'] / 1024:.1f} KiB",
                _mib(p["total_bytes"]),
                _mib(p["replay_cache_bytes"]),
            ]
            for p in gs["points"]
        ]
        out += [
            "  " + ln
            for ln in _table(
                [
                    "interfaces",
                    "last attach ms",
                    "median ms",
                    "shared",
                    "per interface",
                    "total",
                    "of it replay cache",
                ],
                rows,
                [True] * 7,
            )
        ]
    elif gs:
        out.append(f"  guard scale: error: {gs['error']}")
    ap = d.get("apply_10k")
    if ap and "error" not in ap:
        out.append(
            f"  10,000 prefixes in {ap['policies']} policies: load+validate TOML "
            f"{ap['load_config']:.0f} ms; configure empty->10k "
            f"{ap['apply_empty_to_10k']:.0f} ms, same again {ap['apply_same_10k']:.0f} ms,"
            f" 10k over another 10k {ap['apply_10k_replacing_10k']:.0f} ms"
        )
    cli = d.get("cli")
    if cli and "error" not in cli:
        out.append("  cold process (wall time, median / max)")
        rows = [
            [k, _n(v["median_ms"], ".0f"), _n(v["max_ms"], ".0f"), v.get("error", "")]
            for k, v in cli.items()
        ]
        out += [
            "  " + ln
            for ln in _table(["command", "ms", "max", ""], rows, [False, True, True, False])
        ]
    elif cli:
        out.append(f"  CLI: {cli['error']}")
        for k, v in d.get("cli_cold_start", {}).items():
            out.append(f"    {k}: {v['median_ms']:.0f} ms")
    mo = d.get("monitor")
    if mo and "error" not in mo:
        f = mo["flat_out"]
        out.append(
            f"  netoken monitor --json > /dev/null over {f['events']:,} events: "
            f"{f['events_per_s']:,.0f} events/s flat out (producer "
            f"{f['producer_per_s']:,.0f}/s, {f['lost']:,} lost); "
            f"RSS {_n(f['rss_kb_ready'])} KiB at start, {_n(f['rss_kb_last'])} KiB at the "
            f"end, peak {_n(f['rss_kb_peak'])} KiB"
        )
        p = mo["paced"]
        steps = ", ".join(f"{s['achieved_per_s']:,}/s lost {s['lost']:,}" for s in p["steps"])
        bound = ">= " if p.get("lower_bound") else ""
        out.append(
            f"  sustained without loss: {bound}{_n(p['sustained_per_s'])} events/s "
            f"(steps of {p['seconds_per_step']:g}s: {steps})"
        )
    elif mo:
        out.append(f"  monitor: error: {mo['error']}")
    return out


def format_table(results: dict[str, Any]) -> str:
    """RESULTS (from run_all) as an aligned plain-text report."""
    m = results.get("machine", {})
    load = m.get("loadavg_at_start")
    lines = [
        f"netoken bench{' --quick' if results.get('quick') else ''}: {m.get('time', '')}, "
        f"Linux {m.get('kernel', '?')}, {m.get('cpu', '?')} x {m.get('cpus', '?')} CPUs"
        + (f", load {load[0]:.2f} at start" if load else "")
    ]
    for key, fn in (
        ("datapath", _datapath_lines),
        ("e2e", _e2e_lines),
        ("control", _control_lines),
    ):
        if key in results:
            lines += ["", *fn(results[key])]
    if "elapsed_s" in results:
        lines += ["", f"({results['elapsed_s']:.0f} s)"]
    return "\n".join(lines)
