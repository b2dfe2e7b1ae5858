"""Where attached netoken programs keep their state, and how the CLI finds it.

Layout (one directory per interface and role; roles are ``marker``, ``guard``)::

    /sys/fs/bpf/netoken/IFACE/marker/prog         the TC program
    /sys/fs/bpf/netoken/IFACE/marker/nt_config    every map, under its own name
    ...
    /sys/fs/bpf/netoken/IFACE/guard/...
    /run/netoken/IFACE/marker.json                what the maps cannot say

The pins are the state: they keep the maps alive after the CLI exits (the TC
filter or XDP link keeps the program alive), and a fresh process opens them to
apply, read counters or follow events.

The metadata file (policy names, config path, key files, tc handle/priority,
whether netoken created the clsact qdisc, times) lives in /run, not in a map:
bpffs only holds BPF objects, and a map for a variable-length document would
need a size chosen up front, a schema shared with the BPF objects and a way to
grow it.  /run is a tmpfs like bpffs, so both vanish together at reboot, and
the file can be read with ``cat``.  It is only a description: everything
``status`` needs to be correct (prog id, attachment, keys, counters) is read
from the kernel, so a lost or stale file degrades names, never facts.  It never
holds key bytes.

Interface names may contain dots, which bpffs refuses in names (dots are
reserved there), so directory names are percent-encoded: ``eth0.100`` is
``eth0%2E100``.

Roles are pluggable: a role module exposes ``ROLE``, an object with the
methods of :class:`Role`, and is listed in :data:`ROLE_MODULES`.  ``status``,
``stats`` and ``monitor`` iterate over whatever roles have state, so a new role
appears in them without touching the CLI.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import importlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import NetokenError

BPFFS = Path("/sys/fs/bpf")
RUN_DIR = Path("/run/netoken")
ROOT_NAME = "netoken"
PROG_PIN = "prog"
# bpffs refuses dots in names, so the staging pin of a replacement program
# cannot be "prog.new".
PROG_PIN_NEW = "prog_new"
META_VERSION = 1

# Role name -> module exposing ROLE.  Roles whose module does not exist (yet)
# are skipped by the generic views; their pins are still listed.
ROLE_MODULES: dict[str, str] = {"marker": "netoken.marker", "guard": "netoken.guard"}

# linux/capability.h bit numbers.
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39


class StateError(NetokenError):
    """The pinned state cannot be used; the message is one line for the user."""


# --------------------------------------------------------------------------
# privileges and bpffs


def _cap_eff() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def require_privileges(net_admin: bool = True) -> None:
    """Fail with one line unless we can load BPF (and, with NET_ADMIN, attach it)."""
    caps = _cap_eff()
    has_bpf = bool(caps & (1 << CAP_BPF) or caps & (1 << CAP_SYS_ADMIN))
    has_net = bool(caps & (1 << CAP_NET_ADMIN)) or not net_admin
    if has_bpf and has_net:
        return
    need = "CAP_BPF and CAP_NET_ADMIN" if net_admin else "CAP_BPF"
    who = "not running as root" if os.geteuid() != 0 else "root lacks capabilities"
    raise StateError(f"permission denied: {who}; netoken needs {need} (run as root)")


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) of every mount in our mount namespace."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if len(fields) < 5 or len(rfields) < 2:
                    continue
                mnt = fields[4].replace("\\040", " ")
                out.append((mnt, rfields[0], rfields[1]))
    except OSError:
        pass
    return out


def _bpffs_mounted(mounts: list[tuple[str, str, str]]) -> bool:
    return any(mnt == str(BPFFS) and fstype == "bpf" for mnt, fstype, _ in mounts)


def _inside_ip_netns_exec(mounts: list[tuple[str, str, str]]) -> str | None:
    """The namespace name if we run under `ip netns exec NAME`.

    That command unshares the mount namespace and mounts a fresh sysfs on /sys
    with NAME as its source, which hides /sys/fs/bpf.
    """
    for mnt, fstype, source in reversed(mounts):
        if mnt == "/sys":
            if fstype == "sysfs" and source != "sysfs" and Path("/run/netns", source).exists():
                return source
            return None
    return None


def bpffs(create: bool = True) -> Path | None:
    """The bpffs mount, mounted now if missing and CREATE; None if absent.

    Inside `ip netns exec` a bpffs mounted here would live in that command's
    private mount namespace and take every pin with it when the command exits,
    so netoken refuses and points at `netoken -n NAME` (which switches only the
    network namespace) instead.
    """
    mounts = _mountinfo()
    if _bpffs_mounted(mounts):
        return BPFFS
    ns = _inside_ip_netns_exec(mounts)
    if ns is not None:
        raise StateError(
            f"/sys/fs/bpf is hidden under `ip netns exec {ns}` (it remounts /sys) and pins made "
            f"there would vanish when the command exits; run `netoken -n {ns} ...` instead"
        )
    if not create:
        return None
    try:
        BPFFS.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, check=False
        )
    except OSError as e:
        raise StateError(f"bpffs is not mounted at {BPFFS} and mounting it failed: {e}") from None
    if r.returncode != 0 or not _bpffs_mounted(_mountinfo()):
        why = (r.stderr.strip().splitlines() or ["mount failed"])[-1]
        raise StateError(
            f"bpffs is not mounted at {BPFFS} and mounting it failed ({why}); "
            f"mount it with: mount -t bpf bpf {BPFFS}"
        )
    return BPFFS


# --------------------------------------------------------------------------
# names and network namespaces


def encode_ifname(ifname: str) -> str:
    """Interface name -> bpffs-safe directory name (reversible)."""
    return ifname.replace("%", "%25").replace(".", "%2E")


def decode_ifname(name: str) -> str:
    return name.replace("%2E", ".").replace("%25", "%")


def current_netns() -> str:
    """Identity of our network namespace, e.g. ``net:[4026531840]``."""
    return os.readlink("/proc/thread-self/ns/net")


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Serialize commands that change state (attach, apply, detach).

    One global lock: per-interface lock files could not be removed safely and
    these commands take milliseconds.
    """
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(RUN_DIR / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# per-interface, per-role state


@dataclass(frozen=True)
class RoleState:
    """The pins and metadata of one role on one interface."""

    ifname: str
    role: str
    root: Path = BPFFS

    @property
    def iface_dir(self) -> Path:
        return self.root / ROOT_NAME / encode_ifname(self.ifname)

    @property
    def pin_dir(self) -> Path:
        return self.iface_dir / self.role

    @property
    def meta_path(self) -> Path:
        return RUN_DIR / encode_ifname(self.ifname) / f"{self.role}.json"

    def pin(self, name: str) -> str:
        return str(self.pin_dir / name)

    def exists(self) -> bool:
        return (self.pin_dir / PROG_PIN).exists()

    def pins(self) -> list[str]:
        try:
            return sorted(os.listdir(self.pin_dir))
        except FileNotFoundError:
            return []

    def make_dir(self) -> bool:
        """Create the pin directory (private to root); True if it was created."""
        if self.pin_dir.is_dir():
            return False
        self.pin_dir.mkdir(mode=0o700, parents=True)
        return True

    def read_meta(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Replace the metadata file atomically (readers never see half a file)."""
        self.meta_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.meta_path.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, self.meta_path)

    def check_netns(self, meta: dict[str, Any] | None = None) -> None:
        """Refuse to act on state that an interface of the same name in another
        network namespace created: pins are global, interface names are not."""
        meta = self.read_meta() if meta is None else meta
        if not meta or not meta.get("netns"):
            return
        here = current_netns()
        if meta["netns"] != here:
            raise StateError(
                f"{self.pin_dir} belongs to {self.ifname} in another network namespace "
                f"({meta['netns']}, this is {here}); run netoken there (netoken -n NAME ...)"
            )

    def remove(self) -> None:
        """Unpin everything of this role and drop its metadata; empty parent
        directories go too, other roles' state stays."""
        if self.pin_dir.is_dir():
            shutil.rmtree(self.pin_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.meta_path.unlink()
        for d in (self.iface_dir, self.iface_dir.parent, self.meta_path.parent):
            with contextlib.suppress(OSError):
                d.rmdir()


def all_states(ifname: str | None = None, root: Path | None = None) -> list[RoleState]:
    """Every role state with pins, optionally only for IFNAME."""
    root = root if root is not None else bpffs(create=False)
    if root is None:
        return []
    base = root / ROOT_NAME
    names = [encode_ifname(ifname)] if ifname is not None else _listdir(base)
    out = []
    for enc in sorted(names):
        for role in _listdir(base / enc):
            st = RoleState(decode_ifname(enc), role, root)
            if st.pin_dir.is_dir():
                out.append(st)
    return out


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def in_this_netns(st: RoleState) -> bool:
    meta = st.read_meta()
    return not meta or not meta.get("netns") or meta["netns"] == current_netns()


# --------------------------------------------------------------------------
# role plug-ins


class Role(Protocol):
    """What a role module's ``ROLE`` object provides to the generic views."""

    name: str

    def status(self, st: RoleState) -> dict[str, Any]:
        """JSON-able description: ids, attachment, configuration (no secrets)."""

    def status_lines(self, status: dict[str, Any]) -> list[str]:
        """The same for humans, a few indented lines."""

    def stats(self, st: RoleState) -> dict[str, int]:
        """Counters by reason, summed over CPUs."""

    def open_events(self, st: RoleState, callback: Callable[[dict[str, Any]], None]) -> Any:
        """A RingBuffer-like object (poll/consume/fileno/close) that calls
        CALLBACK with one JSON-able dict per event."""

    def lost_events(self, st: RoleState) -> int:
        """How many events the BPF side could not queue."""

    def event_header(self) -> str:
        """Column header for :meth:`event_line`."""

    def event_line(self, event: dict[str, Any]) -> str:
        """One event as an aligned human-readable line."""

    def check(self, config: Any) -> None:
        """Raise ConfigError if CONFIG cannot be applied to this role (no kernel access)."""

    def apply(self, ifname: str, config: Any) -> dict[str, Any]:
        """Make the live maps of IFNAME's pinned role hold CONFIG; no reattach."""


# Optional Role methods, looked up with getattr by the views:
#   stats_extra(st) -> dict          more JSON sections next to "counters"
#   extra_counters(item) -> dict     those sections as flat name -> count, for
#                                    the line and table views (--watch rates)
#   suppressed_events(st) -> int     events withheld on purpose (rate limit),
#                                    reported by `monitor` like lost ones


def role(name: str) -> Role | None:
    """The plug-in for role NAME, or None if its module is not there."""
    module = ROLE_MODULES.get(name)
    if module is None:
        return None
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(mod, "ROLE", None)
