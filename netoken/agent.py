"""`netoken agent`: one daemon per node that keeps it equal to its config (design.md §6).

What it watches, and how it notices (all in one poll loop, one thread; the
metrics endpoint, when configured, serves from its own threads):

- **Interfaces**: a netlink socket subscribed to link events (RTMGRP_LINK).
  Any link message (new, gone, renamed, moved, an XDP program removed) makes
  the agent compare the interfaces of the namespace with ``[agent]`` and
  attach or clean up; the messages themselves are not parsed, so nothing
  can be missed by parsing them wrong, and a burst is handled once.
- **Files**: inotify on the directory of the config and of every key file,
  both where the config names them and where their symlinks lead.  A
  directory watch sees in-place writes, rename-replace (editors,
  configuration management) and Kubernetes' Secret/ConfigMap update, which
  renames a new ``..data`` symlink over the old one in the volume's top
  directory.  Events are coalesced for DEBOUNCE seconds, then the config is
  loaded and validated in full; an unchanged result is a no-op.
- **The key schedule and the clock**: a timerfd on CLOCK_REALTIME, armed
  absolute at the next ``mark_from`` switch with TFD_TIMER_CANCEL_ON_SET.
  It fires at the instant (a clock step moves the instant with it), and the
  kernel cancels it whenever the realtime clock is set or the TAI offset
  changes, which is exactly when the REALTIME-TAI offset in the programs'
  config maps may have gone stale.
- **Safety net**: every TICK seconds the agent re-checks attachments (a
  program removed behind its back), the offsets, the files' stat
  signatures (a directory that did not exist when the watches were set) and
  the schedule.  None of these is the normal path.

Decisions where design.md is silent:

- The agent manages the (interface, role) pairs that ``[agent]`` selects.
  It marks their metadata ``"managed_by": "agent"`` so that after a restart
  it still knows which ones it attached.  Pairs that stop being selected
  (the config changed) or whose interface disappeared are detached and
  their pins removed; attachments it did not make are left alone unless the
  config selects them, in which case it takes them over (an atomic replace).
- On start every selected pair is attached with ``attach_pinned``: an atomic
  replace where a program is already there, so an upgraded agent brings its
  own BPF build without a gap.  Later config changes go through ``apply``
  (maps updated in place, no SYN unmarked); guards are updated before
  markers.
- A config that cannot be loaded at start is an error (exit 1, one line):
  there is no last good config to keep.  Later, a config that fails
  validation is logged once per change, counted, and the last good one
  stays in force.
- SIGHUP reloads at once; SIGTERM and SIGINT stop the loop (exit 0).
- Logs are logfmt lines on stderr, one per action: ``ts=... level=info
  msg=attached iface=eth0 role=marker prog=42``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import config as nconfig
from . import state
from .config import Config
from .errors import NetokenError
from .present import error_line
from .schedule import iso

if TYPE_CHECKING:
    from .program import ProgramRole

# Coalesce a burst of file events (a `..data` swap is several) into one load.
DEBOUNCE = 0.1
# The safety-net period; the normal paths are events.
TICK = 5.0
# With no key switch ahead the clock timer is still armed (far ahead) so that
# a clock set still cancels it.
IDLE_TIMER = 86400.0

ROLES = ("guard", "marker")  # the order config changes are applied in
MANAGED_BY = "agent"


# --------------------------------------------------------------------------
# logfmt


def _value(v: object) -> str:
    s = str(v)
    if s and not any(c in s for c in ' "=\\') and s.isprintable():
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Log:
    """One logfmt line per call: ts, level, msg, then the fields given."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._lock = threading.Lock()

    def __call__(self, msg: str, level: str = "info", **fields: object) -> None:
        ts = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
        parts = [f"ts={stamp}", f"level={level}", f"msg={_value(msg)}"]
        parts += [f"{k}={_value(v)}" for k, v in fields.items() if v is not None]
        with self._lock:
            print(" ".join(parts), file=self.out, flush=True)


# --------------------------------------------------------------------------
# the kernel's notification fds (ctypes: no dependency for three syscalls)

_libc = ctypes.CDLL(None, use_errno=True)

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000  # the watch is gone (its directory was deleted)
IN_ONLYDIR = 0x01000000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; name follows
_DIR_EVENTS = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class DirWatch:
    """inotify on a set of directories; any change in them is one signal."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")
        self.wds: dict[str, int] = {}

    def watch(self, dirs: Iterable[str]) -> None:
        """Watch exactly DIRS (those that exist; the safety net covers the rest)."""
        want = set(dirs)
        for d in sorted(want - set(self.wds)):
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(d), _DIR_EVENTS)
            if wd >= 0:
                self.wds[d] = wd
        for d in set(self.wds) - want:
            wd = self.wds.pop(d)
            # Two paths of one directory share a watch descriptor.
            if wd not in self.wds.values():
                _libc.inotify_rm_watch(self.fd, wd)

    def drain(self) -> bool:
        """Read every pending event; True if there was any."""
        seen = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            if not buf:
                return seen
            seen = True
            off = 0
            while off + _EVENT.size <= len(buf):
                wd, mask, _, length = _EVENT.unpack_from(buf, off)
                off += _EVENT.size + length
                if mask & IN_IGNORED:
                    # Forget it, so that a directory of the same name made
                    # later (a config directory replaced whole) is watched anew.
                    self.wds = {d: w for d, w in self.wds.items() if w != wd}

    def close(self) -> None:
        os.close(self.fd)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


TFD_TIMER_ABSTIME = 1
TFD_TIMER_CANCEL_ON_SET = 2


class ClockTimer:
    """An absolute CLOCK_REALTIME timerfd that the kernel cancels whenever the
    realtime clock is set or the TAI offset changes (TFD_TIMER_CANCEL_ON_SET)."""

    def __init__(self) -> None:
        self.fd = _check(
            _libc.timerfd_create(time.CLOCK_REALTIME, os.O_NONBLOCK | os.O_CLOEXEC),
            "timerfd_create",
        )

    def arm(self, at: float) -> None:
        spec = _Itimerspec()
        sec = int(at)
        spec.it_value.tv_sec, spec.it_value.tv_nsec = sec, int((at - sec) * 1e9)
        _check(
            _libc.timerfd_settime(
                self.fd, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, ctypes.byref(spec), None
            ),
            "timerfd_settime",
        )

    def read(self) -> str | None:
        """ "expired", "clock-set", or None if nothing happened."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.ECANCELED:
                return "clock-set"
            raise
        return "expired"

    def close(self) -> None:
        os.close(self.fd)


RTMGRP_LINK = 1


class LinkEvents:
    """Link notifications of this network namespace (rtnetlink, RTMGRP_LINK)."""

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0
        )  # NETLINK_ROUTE
        # Container churn comes in bursts; an overrun only costs a rescan.
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, RTMGRP_LINK))

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        seen = False
        while True:
            try:
                if not self.sock.recv(65536):
                    return seen
                seen = True
            except BlockingIOError:
                return seen
            except OSError as e:
                if e.errno != errno.ENOBUFS:  # overrun: messages lost, rescan anyway
                    raise
                seen = True

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------
# roles, as the agent drives them


def _role(name: str) -> ProgramRole:
    from .roles import ROLES

    return ROLES[name]


def _running(st: state.RoleState, role: str) -> bool:
    """Whether ST's pinned program is the one on its interface's hook."""
    from .libbpf import Program

    try:
        idx = socket.if_nametoindex(st.ifname)
        with Program.from_pinned(st.pin(state.PROG_PIN)) as prog:
            pid = prog.id
        live, _ = _role(role).attachment(idx, st.read_meta() or {})
    except (OSError, NetokenError):
        return False
    return live == pid


def _fingerprint(paths: Iterable[Path]) -> tuple[Any, ...]:
    out: list[Any] = []
    for p in paths:
        try:
            s = os.stat(p)
            out.append(
                (
                    str(p),
                    os.path.realpath(p),
                    s.st_dev,
                    s.st_ino,
                    s.st_mtime_ns,
                    s.st_size,
                    s.st_mode,
                )
            )
        except OSError as e:
            out.append((str(p), None, e.errno))
    return tuple(out)


def _dirs(paths: Iterable[Path]) -> set[str]:
    """Where a change to PATHS shows up: each path's directory as named (a
    rename or `..data` swap there) and as resolved (a write to the file)."""
    out = set()
    for p in paths:
        out.add(os.path.dirname(os.path.abspath(p)))
        out.add(os.path.dirname(os.path.realpath(p)))
    return out


def selected(cfg: Config, names: Iterable[str]) -> set[tuple[str, str]]:
    """The (interface, role) pairs [agent] selects among NAMES."""
    a = cfg.agent
    if a is None:
        return set()
    out = set()
    for name in names:
        for role, patterns in (("marker", a.mark), ("guard", a.guard)):
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                out.add((name, role))
    return out


def _order(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(pairs, key=lambda p: (ROLES.index(p[1]), p[0]))


# --------------------------------------------------------------------------
# the agent


class Agent:
    """The node agent; :meth:`run` is the daemon."""

    def __init__(
        self,
        config: str | os.PathLike[str],
        *,
        detach_on_exit: bool = False,
        metrics: str | None = None,
        out: TextIO = sys.stderr,
    ) -> None:
        self.path = Path(config)
        self.detach_on_exit = detach_on_exit
        self.metrics_override = metrics
        self.log = Log(out)
        self.cfg: Config | None = None
        self.managed: set[tuple[str, str]] = set()
        self.failing: dict[tuple[str, str], str] = {}  # pair -> error last logged
        # pair -> (the config, the keys in use) its maps were last given
        self.applied: dict[tuple[str, str], tuple[Config, dict[str, int] | None]] = {}
        self.config_errors = 0
        self.applies: dict[str, int] = {"config": 0, "schedule": 0}
        self.stop_signal: int | None = None
        self.reload_at: float | None = None
        self.fingerprint: tuple[Any, ...] = ()
        self.last_error: str | None = None
        self.metrics_listen: str | None = None
        self.server: Any = None
        self.watch: DirWatch | None = None
        self.timer: ClockTimer | None = None
        self.links: LinkEvents | None = None

    # -- config ------------------------------------------------------------

    def _check(self, cfg: Config) -> None:
        """Everything a role would refuse, before any map is touched."""
        a = cfg.agent
        if a is not None and a.mark:
            _role("marker").check(cfg)
        if a is not None and a.guard:
            _role("guard").check(cfg)

    def _files(self) -> list[Path]:
        keys = [k.file for k in self.cfg.keys.values()] if self.cfg is not None else []
        return [self.path, *keys]

    def _rewatch(self) -> None:
        files = self._files()
        self.fingerprint = _fingerprint(files)
        if self.watch is not None:
            self.watch.watch(_dirs(files))

    def reload(self, cause: str) -> None:
        """Load the config; apply it if it changed and is valid."""
        self.reload_at = None
        try:
            new = nconfig.load(self.path)
            self._check(new)
        except NetokenError as e:
            msg = str(e)
            # once per change, not once per event of the same bad file
            if msg != self.last_error:
                self.config_errors += 1
                self.last_error = msg
                self.log(
                    "config rejected; keeping the last good one",
                    level="error",
                    error=msg,
                    cause=cause,
                )
            self._rewatch()
            return
        self.last_error = None
        if new == self.cfg:
            self._rewatch()
            return
        self.cfg = new
        self._rewatch()
        self.log(
            "config loaded",
            config=self.path,
            cause=cause,
            keys=_ids(new.keys),
            policies=len(new.policies),
            protect=len(new.guard.protect) if new.guard else 0,
            next_switch=self._next_switch(),
        )
        want = self._selected()
        self._update(want, "file")
        self._reconcile(want)
        self._serve_metrics()
        self._arm()

    # -- attach / apply / detach ----------------------------------------------

    def _selected(self) -> set[tuple[str, str]]:
        assert self.cfg is not None
        return selected(self.cfg, [name for _, name in socket.if_nameindex()])

    def _fail(self, pair: tuple[str, str], action: str, e: Exception) -> None:
        msg = error_line(e)
        if self.failing.get(pair) != msg:
            self.failing[pair] = msg
            self.log(f"{action} failed", level="error", iface=pair[0], role=pair[1], error=msg)

    def _desired(self, pair: tuple[str, str], now: float) -> tuple[Config, dict[str, int] | None]:
        assert self.cfg is not None
        return self.cfg, self.cfg.marking_keys(now) if pair[1] == "marker" else None

    def _update(self, want: set[tuple[str, str]], cause: str) -> None:
        """Bring the maps of every attached pair to the config and, for
        markers, the keys in use now; a pair whose update failed is retried
        at the next call (every TICK at the latest)."""
        now = time.time()
        for pair in _order(self.managed & want):
            cfg, in_use = desired = self._desired(pair, now)
            old_cfg, old_in_use = self.applied.get(pair, (None, None))
            if old_cfg is cfg and old_in_use == in_use:
                continue
            ifname, role = pair
            try:
                res = _role(role).apply(ifname, cfg, now)
            except Exception as e:  # noqa: BLE001 - one interface must not stop the others
                self._fail(pair, "apply", e)
                continue
            self.failing.pop(pair, None)
            self.applied[pair] = desired
            if old_cfg is not cfg:
                self.applies["config"] += 1
                self.log(
                    "applied",
                    iface=ifname,
                    role=role,
                    prog=res["prog_id"],
                    keys=_ids(res["keys"]),
                    cause=cause,
                )
            else:
                self.applies["schedule"] += 1
                assert in_use is not None and old_in_use is not None
                self.log(
                    "key switched",
                    iface=ifname,
                    role=role,
                    cause=cause,
                    policies=" ".join(
                        f"{n}:{old_in_use.get(n)}->{k}"
                        for n, k in in_use.items()
                        if old_in_use.get(n) != k
                    ),
                )

    def _attach(self, pair: tuple[str, str]) -> None:
        ifname, role = pair
        assert self.cfg is not None
        # Taken before: a mark_from passing during the attach is caught by
        # the next _update, not recorded as done.
        desired = self._desired(pair, time.time())
        try:
            # Guards where they cost least: TC on veths (pods) and L3
            # devices, XDP on NICs (design.md §2 "Hooks").  The agent owns
            # what it manages, so auto also undoes a hook forced by hand.
            kw = {"hook": "auto"} if role == "guard" else {}
            res = _role(role).attach(ifname, self.cfg, **kw)
            st = _role(role).state_of(ifname)
            with state.locked():
                meta = st.read_meta() or {}
                meta["managed_by"] = MANAGED_BY
                st.write_meta(meta)
        except Exception as e:  # noqa: BLE001
            self._fail(pair, "attach", e)
            return
        self.failing.pop(pair, None)
        self.managed.add(pair)
        self.applied[pair] = desired
        extra = {"hook": res["hook"]} if role == "guard" else {}
        self.log(
            "attached",
            iface=ifname,
            role=role,
            prog=res["prog_id"],
            replaced=res["replaced_prog_id"],
            keys=_ids(res["keys"]),
            **extra,
        )

    def _detach(self, pair: tuple[str, str], reason: str) -> None:
        ifname, role = pair
        try:
            res = _role(role).detach(ifname)
        except Exception as e:  # noqa: BLE001
            self._fail(pair, "detach", e)
            return
        self.managed.discard(pair)
        self.failing.pop(pair, None)
        self.applied.pop(pair, None)
        self.log("detached", iface=ifname, role=role, prog=res["removed_prog_id"], reason=reason)

    def _reconcile(self, want: set[tuple[str, str]] | None = None, fresh: bool = False) -> None:
        """Attach what [agent] selects and is not running; detach what it
        attached and no longer selects.  FRESH: (re)attach everything."""
        if self.cfg is None:
            return
        want = self._selected() if want is None else want
        names = {name for _, name in socket.if_nameindex()}
        for pair in _order(self.managed - want):
            self._detach(pair, "interface gone" if pair[0] not in names else "not in [agent]")
        for pair in _order(want):
            if fresh or pair not in self.managed or not _running(self._state(pair), pair[1]):
                self._attach(pair)

    def _state(self, pair: tuple[str, str]) -> state.RoleState:
        return _role(pair[1]).state_of(pair[0])

    def _adopt(self) -> None:
        """What an earlier agent attached in this namespace is ours to manage."""
        for st in state.all_states():
            meta = st.read_meta() or {}
            if (
                st.role in ROLES
                and meta.get("managed_by") == MANAGED_BY
                and state.in_this_netns(st)
            ):
                self.managed.add((st.ifname, st.role))

    # -- key schedule and clock ------------------------------------------------

    def _arm(self) -> None:
        if self.cfg is None or self.timer is None:
            return
        now = time.time()
        at = self.cfg.next_switch(now)
        self.timer.arm(at if at is not None else now + IDLE_TIMER)

    def _next_switch(self) -> str | None:
        at = self.cfg.next_switch(time.time()) if self.cfg is not None else None
        return None if at is None else iso(at)

    def _schedule(self, cause: str) -> None:
        """Switch marker keys whose mark_from has come, and re-arm the timer."""
        if self.cfg is not None:
            self._update(self._selected(), cause)
        self._arm()

    def _clock(self, cause: str) -> None:
        from .datapath import realtime_minus_tai_ns

        want = realtime_minus_tai_ns()
        for pair in _order(self.managed):
            try:
                old = _role(pair[1]).PROGRAM.sync_clock(self._state(pair), want)
            except Exception as e:  # noqa: BLE001
                self._fail(pair, "clock offset update", e)
                continue
            if old is not None:
                self.log(
                    "clock offset corrected",
                    iface=pair[0],
                    role=pair[1],
                    cause=cause,
                    was=old / 1e9,
                    now=want / 1e9,
                )

    # -- metrics -----------------------------------------------------------------

    def _serve_metrics(self, fatal: bool = False) -> None:
        listen = self.metrics_override or (
            self.cfg.agent.metrics if self.cfg and self.cfg.agent else None
        )
        if listen == self.metrics_listen:
            return
        self._stop_metrics()
        if listen is None:
            return
        from . import exporter

        try:
            server = exporter.make_server(listen, exporter.agent_registry(self))
        except NetokenError as e:
            if fatal:
                raise
            self.log("metrics endpoint failed", level="error", error=str(e))
            self.metrics_listen = None
            return
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self.server, self.metrics_listen = server, listen
        self.log("serving metrics", url=exporter.metrics_url(server))

    def _stop_metrics(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.server, self.metrics_listen = None, None

    # -- the loop ----------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload_at = 0.0
        else:
            self.stop_signal = signum

    @contextlib.contextmanager
    def _signals(self) -> Iterator[int]:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        old = {
            s: signal.signal(s, self._on_signal)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        try:
            yield r.fileno()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_fd)
            r.close()
            w.close()

    def run(self) -> int:
        state.require_privileges()
        if self.metrics_override is not None:
            from .config import parse_listen

            parse_listen(self.metrics_override)
        state.bpffs(create=True)
        cfg = nconfig.load(self.path)
        self._check(cfg)
        self.cfg = cfg
        # libbpf and the role modules load now, not on the first interface
        # that appears (whose attach must take well under 2 s).
        _role("marker")
        with contextlib.ExitStack() as stack, self._signals() as wake:
            self.links = links = LinkEvents()
            stack.callback(links.close)
            self.watch = DirWatch()
            stack.callback(self.watch.close)
            self.timer = ClockTimer()
            stack.callback(self.timer.close)
            stack.callback(self._stop_metrics)
            self._rewatch()
            a = cfg.agent
            self.log(
                "started",
                config=self.path,
                pid=os.getpid(),
                mark=" ".join(a.mark) if a else "",
                guard=" ".join(a.guard) if a else "",
                keys=_ids(cfg.keys),
            )
            if a is None or not (a.mark or a.guard):
                self.log("no interfaces selected: [agent] mark and guard are empty", level="warn")
            self._serve_metrics(fatal=True)
            self._adopt()
            self._reconcile(fresh=True)
            self._arm()  # before the offsets are read: a clock set from now on is seen
            self._clock("start")
            self.log("watching", attached=len(self.managed), next_switch=self._next_switch())
            poller = select.poll()
            handlers = {
                wake: lambda: _drain_socket(wake),
                links.fileno(): self._links,
                self.watch.fd: self._files_changed,
                self.timer.fd: self._timer,
            }
            for fd in handlers:
                poller.register(fd, select.POLLIN)
            next_tick = time.monotonic() + TICK
            while self.stop_signal is None:
                now = time.monotonic()
                deadline = next_tick if self.reload_at is None else min(next_tick, self.reload_at)
                for fd, _ in poller.poll(max(0.0, deadline - now) * 1000):
                    self._guarded(handlers[fd])
                if self.stop_signal is not None:
                    break
                now = time.monotonic()
                if self.reload_at is not None and now >= self.reload_at:
                    self._guarded(
                        functools.partial(
                            self.reload, "signal" if self.reload_at == 0.0 else "file"
                        )
                    )
                if now >= next_tick:
                    next_tick = now + TICK
                    self._guarded(self._tick)
            self.log(
                "stopping", signal=signal.Signals(self.stop_signal).name, detach=self.detach_on_exit
            )
            if self.detach_on_exit:
                for pair in _order(self.managed):
                    self._detach(pair, "exit")
            else:
                self.log("programs stay attached", attached=len(self.managed))
        return 0

    def _guarded(self, step: Any) -> None:
        """Run one step of the loop; a bug in it is logged, not fatal: the
        programs keep running either way, and the next event or tick retries."""
        try:
            step()
        except Exception as e:  # noqa: BLE001
            self.reload_at = None
            self.log("internal error", level="error", error=f"{type(e).__name__}: {e}")

    def _links(self) -> None:
        if self.links is not None and self.links.drain():
            self._reconcile()

    def _files_changed(self) -> None:
        assert self.watch is not None
        if self.watch.drain() and self.reload_at is None:
            self.reload_at = time.monotonic() + DEBOUNCE

    def _timer(self) -> None:
        assert self.timer is not None
        what = self.timer.read()
        if what == "clock-set":
            self.log("clock set")
            self._clock("clock-set")
            self._schedule("clock-set")
        elif what == "expired":
            self._schedule("mark_from")

    def _tick(self) -> None:
        if _fingerprint(self._files()) != self.fingerprint:
            self.reload("poll")
        self._reconcile()
        self._clock("periodic")
        self._schedule("periodic")


def _drain_socket(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while os.read(fd, 4096):
            pass


def _ids(keys: Iterable[int]) -> str:
    return ",".join(str(k) for k in sorted(keys))


def run(args: Any) -> int:
    """`netoken agent`: the CLI verb."""
    return Agent(args.config, detach_on_exit=args.detach_on_exit, metrics=args.metrics).run()
