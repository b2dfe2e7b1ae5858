"""Prometheus metrics for every attached marker and guard (`netoken exporter`).

Nothing is cached: each scrape (or textfile write) lists the pinned state
under /sys/fs/bpf/netoken, keeps what belongs to this network namespace (and
to the interfaces asked for), and reads the counters from the pinned maps
through each role's plug-in (netoken.state.Role).  So roles attached after
the exporter started appear at the next scrape, and a role whose pins vanish
(detach) simply disappears from the next one.

The metric names below are a contract with dashboards and alerts
(contrib/grafana/): rename nothing without changing them together.

Two ways to run:

- ``--listen ADDR:PORT`` (default 127.0.0.1:9917) serves /metrics over HTTP.
  Loopback by default because the endpoint has no authentication and tells
  whoever asks which interfaces are protected, which key ids are in use and
  how hard a host is being flooded right now; on a protected server the
  public side is exactly where that must not be offered.  Listening wider is
  one explicit flag (the node's private address, or 0.0.0.0 behind a
  firewall or inside a pod network).
- ``--textfile PATH`` writes the same exposition once (or every
  ``--interval`` seconds) for node_exporter's textfile collector, replacing
  the file atomically.  No process metrics there: they would describe a
  process that has exited, and node_exporter serves its own process_* series,
  which these would collide with.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, layout, state
from .config import parse_listen
from .errors import ExporterError
from .state import RoleState, StateError

DEFAULT_LISTEN = "127.0.0.1:9917"
HELP = "serve Prometheus metrics of every attached marker and guard"
EPILOG = """\
examples:
  netoken exporter                                   # http://127.0.0.1:9917/metrics
  netoken exporter --listen 10.0.0.5:9917 -i eth0
  netoken -n blue exporter --listen 127.0.0.1:9917   # interfaces of namespace blue
  netoken exporter --textfile /var/lib/node_exporter/textfile_collector/netoken.prom \\
      --interval 15
"""

_PROG = "netoken"


# --------------------------------------------------------------------------
# the metric families (contract)


@dataclass(frozen=True)
class Family:
    name: str  # as exposed; counters end in _total
    kind: str  # "counter" or "gauge"
    labels: tuple[str, ...]
    help: str


# Each *_packets_total family counts every packet once, under exactly one
# reason, so a sum over `reason` is packets.  What is counted on top of a
# packet reason (what the guard did with a rejected SYN, events) has a family
# of its own.
FAMILIES: tuple[Family, ...] = (
    Family(
        "netoken_marker_packets_total",
        "counter",
        ("interface", "reason"),
        "Egress packets the netoken marker (TC) handled, one reason per packet: marked "
        "and marked_payload got a token, the others say why a packet passed unmarked.",
    ),
    Family(
        "netoken_marker_actions_total",
        "counter",
        ("interface", "action"),
        "What the marker did on top of marking a SYN: room_from_ts removed its "
        "Timestamps option to make room for the token (counted again under marked).",
    ),
    Family(
        "netoken_syn_marked_total",
        "counter",
        ("interface",),
        "SYNs the marker gave a token (reasons marked + marked_payload).",
    ),
    Family(
        "netoken_guard_packets_total",
        "counter",
        ("interface", "reason"),
        "Ingress packets the netoken guard handled, one reason per packet: a SYN verdict "
        "(ok, missing, malformed, unknown_key, stale, bad_tag, replay, ...) or why a "
        "packet passed without one (not_syn, unprotected, ...).",
    ),
    Family(
        "netoken_guard_syn_verdicts_total",
        "counter",
        ("interface", "verdict"),
        "SYNs to protected destinations, by the guard's verdict on their token "
        "(ok = valid; anything else is rejected: dropped, or passed in monitor mode).",
    ),
    Family(
        "netoken_guard_actions_total",
        "counter",
        ("interface", "action"),
        "What the guard did with rejected SYNs: dropped (drop mode) or monitored "
        "(passed and counted, monitor mode).  Sums to the rejected verdicts.",
    ),
    Family(
        "netoken_guard_replay_cache_errors_total",
        "counter",
        ("interface",),
        "Valid SYNs the guard accepted but could not record in its replay cache "
        "(the insert failed), so a replay of them would not be caught.",
    ),
    Family(
        "netoken_guard_key_syns_total",
        "counter",
        ("interface", "key_id", "result"),
        "SYNs with a mac token, by the token's key id: result ok verified, bad was "
        "rejected (unknown_key, stale, bad_tag or replay).",
    ),
    Family(
        "netoken_events_total",
        "counter",
        ("interface", "role", "result"),
        "Ring-buffer events: written, suppressed by the guard's rate limit, or lost "
        "because the buffer was full (the counters stay exact either way).",
    ),
    Family(
        "netoken_attached",
        "gauge",
        ("interface", "role"),
        "1 if netoken's program for this role runs on the interface; 0 if its state "
        "is pinned but the kernel no longer runs it there (filter or XDP program "
        "removed behind netoken's back).",
    ),
    Family(
        "netoken_exporter_read_errors_total",
        "counter",
        (),
        "Attachments this process could not read while collecting metrics (their "
        "series are missing from that scrape); detaches during a scrape do not count.",
    ),
    Family(
        "netoken_key_info",
        "gauge",
        ("interface", "role", "key_id", "fingerprint"),
        "Always 1 per key the program holds; fingerprint is a non-secret hash of the "
        "key bytes the kernel really has, so hosts with different keys under one id "
        "show different values.",
    ),
    Family(
        "netoken_info", "gauge", ("version",), "Always 1; the netoken version of this exporter."
    ),
)

# Only `netoken agent` serves these (next to FAMILIES).
AGENT_FAMILIES: tuple[Family, ...] = (
    Family(
        "netoken_agent_config_errors_total",
        "counter",
        (),
        "Config changes the agent rejected (it kept running on the last good config).",
    ),
    Family(
        "netoken_agent_applies_total",
        "counter",
        ("cause",),
        "Updates the agent applied to an attached program in place, one per interface "
        "and role: cause config (the config or a key file changed) or schedule (a "
        "key's mark_from came).",
    ),
)
APPLY_CAUSES = ("config", "schedule")

# The result label of netoken_guard_key_syns_total: the guard's two key stat
# slots (layout.KEY_STAT_OK, KEY_STAT_BAD), named as `netoken stats` names them.
KEY_RESULTS = ("ok", "bad")


class _Samples:
    """Samples of one collection, by family name."""

    def __init__(self, families: Sequence[Family] = FAMILIES) -> None:
        self.families = tuple(families)
        self.by_family: dict[str, list[tuple[tuple[str, ...], float]]] = {
            f.name: [] for f in self.families
        }

    def add(self, name: str, labels: Sequence[str], value: float) -> None:
        self.by_family[name].append((tuple(labels), value))


def _marker(s: _Samples, ifname: str, counters: dict[str, int], extra: dict[str, Any]) -> None:
    for reason in layout.MARK_PACKET_REASONS:
        s.add("netoken_marker_packets_total", (ifname, reason), counters.get(reason, 0))
    for action in layout.MARK_ACTIONS:
        s.add("netoken_marker_actions_total", (ifname, action), counters.get(action, 0))
    s.add(
        "netoken_syn_marked_total",
        (ifname,),
        counters.get("marked", 0) + counters.get("marked_payload", 0),
    )
    s.add("netoken_events_total", (ifname, "marker", "lost"), counters.get("events_lost", 0))


def _guard(s: _Samples, ifname: str, counters: dict[str, int], extra: dict[str, Any]) -> None:
    for reason in layout.GUARD_VERDICTS + layout.GUARD_PASS_REASONS:
        s.add("netoken_guard_packets_total", (ifname, reason), counters.get(reason, 0))
    for verdict in layout.GUARD_VERDICTS:
        s.add("netoken_guard_syn_verdicts_total", (ifname, verdict), counters.get(verdict, 0))
    for action in layout.GUARD_ACTIONS_TAKEN:
        s.add("netoken_guard_actions_total", (ifname, action), counters.get(action, 0))
    s.add("netoken_guard_replay_cache_errors_total", (ifname,), counters.get("error", 0))
    for k in sorted(extra.get("keys", []), key=lambda k: k["id"]):
        for result in KEY_RESULTS:
            s.add("netoken_guard_key_syns_total", (ifname, str(k["id"]), result), k.get(result, 0))
    for reason, result in layout.GUARD_EVENTS.items():
        s.add("netoken_events_total", (ifname, "guard", result), counters.get(reason, 0))


# Role name -> what it contributes beyond netoken_attached.  A role missing
# here (a newer one) is still reported as attached.
ROLE_EXPORTS = {"marker": _marker, "guard": _guard}


# --------------------------------------------------------------------------
# reading the pinned state


def _add_configured_keys(extra: dict[str, Any], status: dict[str, Any]) -> None:
    """Give every configured key id a per-key series from the start, at 0.

    Key stats only list key ids seen in a SYN; a series that first appears
    at a non-zero value hides its first increase from rate() and increase().
    """
    if not isinstance(extra.get("keys"), list):
        return
    seen = {k["id"] for k in extra["keys"]}
    for k in status.get("keys") or []:
        if isinstance(k, dict) and isinstance(k.get("id"), int) and k["id"] not in seen:
            extra["keys"].append({"id": k["id"], "ok": 0, "bad": 0})


class NetokenCollector:
    """A prometheus-client collector over the pinned state of this network
    namespace (all interfaces, or only INTERFACES).

    Collection runs in the HTTP server's request threads; they inherit the
    network namespace of the thread that started the server, which is what
    makes interface lookups and the netns filter see the right namespace.
    """

    def __init__(self, interfaces: Sequence[str] | None = None) -> None:
        self.interfaces = list(dict.fromkeys(interfaces)) if interfaces else None
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self.read_errors = 0

    def _warn_once(self, msg: str) -> None:
        with self._lock:
            if msg in self._warned:
                return
            self._warned.add(msg)
        print(f"{_PROG}: exporter: {msg}", file=sys.stderr, flush=True)

    def _states(self) -> list[RoleState]:
        if self.interfaces is None:
            states = state.all_states()
        else:
            states = [st for name in self.interfaces for st in state.all_states(name)]
        # State is kept per network namespace: only this one's is listed.
        return states

    def samples(self) -> _Samples:
        """Read everything once; a role that cannot be read is left out."""
        s = _Samples()
        s.add("netoken_info", (__version__,), 1)
        try:
            states = self._states()
        except (OSError, StateError) as e:
            self._warn_once(f"cannot list pinned state: {e}")
            self._read_error(s)
            return s
        from .roles import role

        for st in states:
            r = role(st.role)
            if r is None or not st.exists():
                continue
            try:
                counters = r.stats(st)
                # The sections `netoken stats --json` shows next to the
                # counters, e.g. the guard's keys.
                extra = r.stats_extra(st)
                status = r.status(st)
                _add_configured_keys(extra, status)
            except Exception as e:  # noqa: BLE001 - one bad role must not fail the scrape
                # Detach between listing and reading is routine: the role is
                # gone, so it is just absent.  Anything else is worth a line.
                if st.exists():
                    self._warn_once(f"cannot read {st.ifname} {st.role}: {e}")
                    with self._lock:
                        self.read_errors += 1
                continue
            s.add(
                "netoken_attached", (st.ifname, st.role), 1 if status.get("attached", True) else 0
            )
            for k in status.get("keys") or []:
                if isinstance(k, dict) and k.get("fingerprint"):
                    s.add(
                        "netoken_key_info", (st.ifname, st.role, str(k["id"]), k["fingerprint"]), 1
                    )
            export = ROLE_EXPORTS.get(st.role)
            if export is not None:
                export(s, st.ifname, counters, extra)
        s.add("netoken_exporter_read_errors_total", (), self.read_errors)
        return s

    def _read_error(self, s: _Samples) -> None:
        with self._lock:
            self.read_errors += 1
        s.add("netoken_exporter_read_errors_total", (), self.read_errors)

    def describe(self) -> Iterator[Any]:
        # Lets the registry check names without reading any map.
        yield from _families(_Samples())

    def collect(self) -> Iterator[Any]:
        yield from _families(self.samples())


def _families(s: _Samples) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    for f in s.families:
        fam: CounterMetricFamily | GaugeMetricFamily
        if f.kind == "counter":
            fam = CounterMetricFamily(f.name, f.help, labels=f.labels)
        else:
            fam = GaugeMetricFamily(f.name, f.help, labels=f.labels)
        for labels, value in s.by_family[f.name]:
            fam.add_metric(list(labels), value)
        yield fam


def registry(interfaces: Sequence[str] | None = None, process: bool = False) -> Any:
    """A registry with netoken's collector (and process metrics if PROCESS)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry()
    reg.register(NetokenCollector(interfaces))
    if process:
        ProcessCollector(registry=reg)
    return reg


class AgentCollector:
    """The agent's own counters (AGENT_FAMILIES), read from AGENT at scrape
    time: an int read is atomic, so no lock is shared with the agent loop."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def samples(self) -> _Samples:
        s = _Samples(AGENT_FAMILIES)
        s.add("netoken_agent_config_errors_total", (), self.agent.config_errors)
        for cause in APPLY_CAUSES:
            s.add("netoken_agent_applies_total", (cause,), self.agent.applies.get(cause, 0))
        return s

    def describe(self) -> Iterator[Any]:
        yield from _families(_Samples(AGENT_FAMILIES))

    def collect(self) -> Iterator[Any]:
        yield from _families(self.samples())


def agent_registry(agent: Any) -> Any:
    """What `netoken agent` serves: every attachment's metrics, the agent's
    own counters and the process metrics."""
    reg = registry(process=True)
    reg.register(AgentCollector(agent))
    return reg


def exposition(reg: Any) -> bytes:
    """The text exposition format (0.0.4) of REG."""
    from prometheus_client import generate_latest

    return generate_latest(reg)


# --------------------------------------------------------------------------
# textfile mode


def write_textfile(path: Path, data: bytes) -> None:
    """Replace PATH with DATA atomically: node_exporter reads the file at any
    moment and must never see half of it.  The temporary file sits in the same
    directory (rename is only atomic within a filesystem) and does not end in
    .prom, so the textfile collector never reads it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            # node_exporter usually runs unprivileged: readable whatever the
            # umask (systemd units often set 0077).
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            # Without it a crash after the rename can leave an empty file on
            # disk, which reads as "no netoken metrics" rather than stale ones.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _run_textfile(reg: Any, path: Path, interval: float | None) -> int:
    if not path.name.endswith(".prom"):
        print(
            f"{_PROG}: note: node_exporter's textfile collector only reads *.prom files",
            file=sys.stderr,
            flush=True,
        )
    try:
        write_textfile(path, exposition(reg))
    except OSError as e:
        raise ExporterError(f"cannot write {path}: {e.strerror or e}") from None
    if interval is None:
        return 0
    print(
        f"{_PROG}: rewriting {path} every {interval:g}s; Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    failing = False
    with _stop_on_sigterm():
        while True:
            time.sleep(interval)
            try:
                write_textfile(path, exposition(reg))
            except OSError as e:
                # Keep trying: the directory may come back (remount, cleanup
                # job); node_exporter's file mtime metric shows the gap.
                if not failing:
                    print(
                        f"{_PROG}: cannot write {path}: {e.strerror or e}; retrying",
                        file=sys.stderr,
                        flush=True,
                    )
                failing = True
            else:
                failing = False
    return 0


# --------------------------------------------------------------------------
# HTTP mode


def _server_classes() -> tuple[type, type]:
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Handler(WSGIRequestHandler):
        # A client that connects and sends nothing would otherwise hold a
        # thread forever; enough of them exhaust the process.
        timeout = 30

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per scrape would drown the journal

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        allow_reuse_address = True  # restart within TIME_WAIT; a live listener still wins

        def server_bind(self) -> None:
            # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup
            # that can hang for seconds at boot or in a namespace without DNS.
            socketserver.TCPServer.server_bind(self)
            host, self.server_port = self.server_address[:2]
            self.server_name = str(host)
            self.setup_environ()

    return Server, Handler


def make_server(listen: str, reg: Any) -> Any:
    """A bound, listening WSGI server of REG's /metrics on LISTEN (not serving yet)."""
    from prometheus_client import make_wsgi_app

    host, port = parse_listen(listen)
    try:
        infos = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise ExporterError(f"--listen {listen!r}: cannot resolve {host!r}: {e.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    server_cls, handler = _server_classes()
    server_cls = type("NetokenMetricsServer", (server_cls,), {"address_family": family})
    try:
        server = server_cls(sockaddr, handler)
    except OSError as e:
        why = {
            errno.EADDRINUSE: "address already in use (another exporter?)",
            errno.EADDRNOTAVAIL: "no such address on this host (or network namespace)",
            errno.EACCES: "permission denied",
        }.get(e.errno or 0, e.strerror or str(e))
        raise ExporterError(f"cannot listen on {listen}: {why}") from None
    server.set_app(make_wsgi_app(reg))
    return server


def metrics_url(server: Any) -> str:
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/metrics"


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (systemd, kubelet) ends the loop like Ctrl-C: a clean exit 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)


def serve(listen: str, interfaces: Sequence[str] | None = None) -> None:
    """Serve /metrics on LISTEN until interrupted (SIGINT/SIGTERM)."""
    server = make_server(listen, registry(interfaces, process=True))
    try:
        where = ", ".join(interfaces) if interfaces else "every interface in this network namespace"
        print(
            f"{_PROG}: serving metrics on {metrics_url(server)} ({where}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        with _stop_on_sigterm():
            server.serve_forever()
    finally:
        server.server_close()


# --------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `netoken exporter` flags."""
    parser.add_argument(
        "--listen",
        metavar="ADDR:PORT",
        default=None,
        help=f"serve /metrics here (default {DEFAULT_LISTEN}: loopback only, because the "
        "endpoint is unauthenticated and shows interfaces, key ids and attack rates; "
        "use the node's private address or 0.0.0.0 deliberately)",
    )
    parser.add_argument(
        "--textfile",
        metavar="PATH",
        type=Path,
        default=None,
        help="instead of serving, write the metrics to PATH (atomically: temporary file "
        "+ rename) for node_exporter's textfile collector, and exit; PATH should "
        "end in .prom",
    )
    parser.add_argument(
        "--interval",
        metavar="SECONDS",
        type=float,
        default=None,
        help="with --textfile: keep rewriting the file every SECONDS",
    )
    parser.add_argument(
        "-i",
        "--interface",
        dest="interfaces",
        metavar="IFACE",
        action="extend",
        nargs="+",
        default=None,
        help="only these interfaces (repeatable; default: every interface netoken is "
        "attached to in this network namespace, including ones attached later)",
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.textfile is not None and args.listen is not None:
        raise ExporterError("--listen and --textfile are alternatives; pick one")
    if args.interval is not None:
        if args.textfile is None:
            raise ExporterError(
                "--interval only applies to --textfile (Prometheus decides "
                "how often to scrape --listen)"
            )
        if not args.interval > 0:
            raise ExporterError("--interval must be a positive number of seconds")
    if args.listen is not None:
        parse_listen(args.listen)
    for name in args.interfaces or []:
        # The name becomes a path under bpffs: never let it climb out.
        if (
            not 0 < len(name) <= 15
            or name in (".", "..")
            or any(c == "/" or c.isspace() for c in name)
        ):
            raise ExporterError(f"-i {name!r}: not an interface name")


def _note_missing(interfaces: Iterable[str]) -> None:
    for name in interfaces:
        try:
            socket.if_nametoindex(name)
        except OSError:
            print(
                f"{_PROG}: note: no interface {name} in this network namespace (yet); its "
                f"metrics appear once netoken attaches to it",
                file=sys.stderr,
                flush=True,
            )


def run(args: argparse.Namespace) -> int:
    """`netoken exporter`: returns the exit code.  Problems the user can fix
    are printed as one line (``netoken: ...``) and give exit code 1."""
    try:
        _check_args(args)
        state.require_privileges(net_admin=False)
        # Under `ip netns exec` bpffs is hidden, and a state directory
        # someone planted is refused: say so now, not at every scrape.  Not
        # mounted at all is fine: nothing is attached yet.
        state.all_states()
        if args.interfaces:
            _note_missing(args.interfaces)
        if args.textfile is not None:
            return _run_textfile(registry(args.interfaces), args.textfile, args.interval)
        serve(args.listen or DEFAULT_LISTEN, args.interfaces)
        return 0
    except (ExporterError, StateError) as e:
        print(f"{_PROG}: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
