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
import errno
import fcntl
import importlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import NetokenError

BPFFS = Path("/sys/fs/bpf")
RUN_ROOT = Path("/run")
ROOT_NAME = "netoken"
RUN_DIR = RUN_ROOT / ROOT_NAME
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
# state directories, checked at every level
#
# bpffs is often mounted mode 1777 and /run may be shared too, so a local user
# could create /sys/fs/bpf/netoken (or a symlink there) before root's first
# attach and then move root's pins or point netoken at maps of their own.
# Every directory netoken keeps state in is therefore opened level by level
# from its anchor (the bpffs mount, /run) without following symlinks, checked
# on the open fd (a real directory, owned by root, not writable by group or
# others), and used only through that fd: names below it are reached with
# *at() calls, or as /proc/self/fd/N/NAME by calls that only take a path
# (libbpf's pin and get), so a directory swapped after the check is never
# the one used.  Missing levels are created 0700 and fixed to exactly that.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# fd -> the path it was opened as, to show paths in messages (see shown()).
_FD_PATHS: dict[int, str] = {}


class StateDir:
    """A checked state directory, held open by fd."""

    def __init__(self, fd: int, path: Path, created: bool = False) -> None:
        self.fd = fd
        self.path = path
        self.created = created
        _FD_PATHS[fd] = str(path)

    def at(self, name: str) -> str:
        """NAME in this directory, as a path that resolves through the fd."""
        return f"/proc/self/fd/{self.fd}/{name}"

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _FD_PATHS.pop(fd, None)
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()


def shown(text: str) -> str:
    """TEXT with /proc/self/fd/N/ paths of open state directories written as
    the paths they stand for (for messages)."""
    return re.sub(r"/proc/self/fd/(\d+)",
                  lambda m: _FD_PATHS.get(int(m.group(1)), m.group(0)), text)


def _trusted_owner(uid: int) -> bool:
    # Root, or the user netoken runs as (with capabilities instead of root,
    # the directories it creates are that user's; trusting them trusts
    # nobody new).
    return uid in (0, os.geteuid())


def _check_anchor(fd: int, path: Path) -> None:
    """The directory netoken's own state lives in (the bpffs mount, /run):
    it may be shared, but then only with the sticky bit, which keeps other
    users from renaming or removing root's entries in it."""
    st = os.fstat(fd)
    if not _trusted_owner(st.st_uid):
        raise StateError(f"{path} is owned by uid {st.st_uid}, not root; netoken keeps its "
                         f"state only below root-owned directories")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise StateError(
            f"{path} is writable by {_who_writes(st.st_mode)} without the sticky bit "
            f"(mode {stat.S_IMODE(st.st_mode):04o}), so anyone could replace netoken's "
            f"state there: chmod +t {path} and retry"
        )


def _who_writes(mode: int) -> str:
    return " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)


def _refuse_entry(parent: int, name: str, path: Path) -> StateError:
    """Why NAME in PARENT cannot be opened as a state directory."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError as e:
        return StateError(f"{path}: {e.strerror}")
    if stat.S_ISLNK(st.st_mode):
        try:
            target = f" (to {os.readlink(name, dir_fd=parent)})"
        except OSError:
            target = ""
        return StateError(f"{path} is a symbolic link{target}, not a directory: "
                          f"remove it (rm {path}) and retry")
    return StateError(f"{path} is not a directory: remove it (rm {path}) and retry")


def _check_dir(d: StateDir) -> None:
    st = os.fstat(d.fd)
    if not _trusted_owner(st.st_uid):
        raise StateError(f"{d.path} is owned by uid {st.st_uid}, not root: "
                         f"remove it (rm -r {d.path}) and retry")
    if st.st_mode & 0o022:
        raise StateError(
            f"{d.path} is writable by {_who_writes(st.st_mode)} "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): make it private (chmod 0700 {d.path}) "
            f"and retry"
        )


def _open_below(parent: StateDir, name: str, create: bool) -> StateDir | None:
    """NAME in PARENT, checked; None if missing and not CREATE."""
    path = parent.path / name
    created = False
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
    except FileNotFoundError:
        if not create:
            return None
        try:
            os.mkdir(name, 0o700, dir_fd=parent.fd)
            created = True
        except FileExistsError:
            pass  # someone was quicker: what it is gets checked below
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
        except OSError:
            raise _refuse_entry(parent.fd, name, path) from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse_entry(parent.fd, name, path) from None
        raise StateError(f"{path}: {e.strerror}") from None
    d = StateDir(fd, path, created)
    if created:
        # mkdir's mode went through the umask: make it exactly 0700.
        os.fchmod(fd, 0o700)
    _check_dir(d)
    return d


def open_dirs(anchor: Path, parts: Sequence[str], create: bool = False) -> list[StateDir]:
    """ANCHOR and each directory of PARTS below it, opened and checked level
    by level (created with CREATE).  Stops at the first missing level, so
    the result is shorter than PARTS + 1 when something does not exist."""
    try:
        fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT and not create:
            return []
        raise StateError(f"{anchor}: {e.strerror}") from None
    chain = [StateDir(fd, anchor)]
    _check_anchor(fd, anchor)
    for name in parts:
        d = _open_below(chain[-1], name, create)
        if d is None:
            break
        chain.append(d)
    return chain


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
    run = open_dirs(RUN_ROOT, [ROOT_NAME], create=True)[-1]
    fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=run.fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# per-interface, per-role state


@dataclass(frozen=True)
class RoleState:
    """The pins and metadata of one role on one interface.

    The paths (``pin_dir``, ``meta_path``) are for people; every access goes
    through checked directory fds (see open_dirs), opened on first use and
    kept for the life of this object."""

    ifname: str
    role: str
    root: Path = BPFFS
    # "pin" / "run" -> the open chain of directories, anchor first
    _dirs: dict[str, list[StateDir]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def iface_dir(self) -> Path:
        return self.root / ROOT_NAME / encode_ifname(self.ifname)

    @property
    def pin_dir(self) -> Path:
        return self.iface_dir / self.role

    @property
    def meta_path(self) -> Path:
        return RUN_DIR / encode_ifname(self.ifname) / f"{self.role}.json"

    def _chain(self, which: str, create: bool = False) -> list[StateDir]:
        parts = ([ROOT_NAME, encode_ifname(self.ifname), self.role] if which == "pin"
                 else [ROOT_NAME, encode_ifname(self.ifname)])
        chain = self._dirs.get(which)
        if chain is None:
            anchor = self.root if which == "pin" else RUN_ROOT
            chain = open_dirs(anchor, parts, create)
            if len(chain) == len(parts) + 1:
                self._dirs[which] = chain
        return chain

    def _dir(self, which: str, create: bool = False) -> StateDir | None:
        chain = self._chain(which, create)
        return chain[-1] if len(chain) == (4 if which == "pin" else 3) else None

    def _forget(self) -> None:
        for chain in self._dirs.values():
            for d in chain:
                d.close()
        self._dirs.clear()

    def check(self) -> None:
        """Check every level of this state's directories that exists."""
        self._chain("pin")
        self._chain("run")

    def has_pin_dir(self) -> bool:
        return self._dir("pin") is not None

    def pin(self, name: str) -> str:
        """The path of pin NAME, through the checked pin directory."""
        d = self._dir("pin")
        if d is None:
            raise FileNotFoundError(errno.ENOENT, "no pinned state", str(self.pin_dir / name))
        return d.at(name)

    def exists(self) -> bool:
        d = self._dir("pin")
        return d is not None and _lexists(d, PROG_PIN)

    def pins(self) -> list[str]:
        d = self._dir("pin")
        return sorted(os.listdir(d.fd)) if d is not None else []

    def make_dir(self) -> bool:
        """Create the pin directory (private to root); True if it was created."""
        d = self._dir("pin", create=True)
        assert d is not None
        return d.created

    def read_meta(self) -> dict[str, Any] | None:
        d = self._dir("run")
        if d is None:
            return None
        try:
            fd = os.open(f"{self.role}.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=d.fd)
            with os.fdopen(fd) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def meta_mtime(self) -> float | None:
        """When the metadata was last written (None: there is none)."""
        d = self._dir("run")
        try:
            return os.stat(f"{self.role}.json", dir_fd=d.fd, follow_symlinks=False).st_mtime \
                if d is not None else None
        except OSError:
            return None

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Replace the metadata file atomically (readers never see half a file)."""
        d = self._dir("run", create=True)
        assert d is not None
        name = f"{self.role}.json"
        tmp = f"{name}.tmp{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=d.fd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=d.fd)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, name, src_dir_fd=d.fd, dst_dir_fd=d.fd)

    def check_netns(self, meta: dict[str, Any] | None = None) -> None:
        """Refuse to act on state that an interface of the same name in another
        network namespace created: pins are global, interface names are not.
        Metadata without pins is a leftover (a crash, pins removed by hand)
        and claims nothing."""
        if not self.has_pin_dir():
            return
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
        pins = self._chain("pin")
        run = self._chain("run")
        self._dirs.clear()
        # Deepest first: a level goes only once what is below it has gone.
        if len(pins) == 4:
            shutil.rmtree(self.role, dir_fd=pins[2].fd, ignore_errors=True)
        for i in (2, 1):  # the interface's directory, then netoken's
            if len(pins) > i:
                with contextlib.suppress(OSError):
                    os.rmdir(pins[i].path.name, dir_fd=pins[i - 1].fd)
        if len(run) == 3:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.role}.json", dir_fd=run[2].fd)
            with contextlib.suppress(OSError):
                os.rmdir(run[2].path.name, dir_fd=run[1].fd)
        for d in (*pins, *run):
            d.close()

    def __del__(self) -> None:
        self._forget()


def _lexists(d: StateDir, name: str) -> bool:
    try:
        os.stat(name, dir_fd=d.fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def check_roots(root: Path | None = None) -> None:
    """Check the top state directories that exist (bpffs and /run), so that
    every command refuses a planted one, also before it would read it."""
    for anchor in (root, RUN_ROOT):
        if anchor is not None:
            for d in open_dirs(anchor, [ROOT_NAME]):
                d.close()


def all_states(ifname: str | None = None, root: Path | None = None) -> list[RoleState]:
    """Every role state with pins, optionally only for IFNAME.  Every
    directory on the way is checked (StateError if one is not safe)."""
    root = root if root is not None else bpffs(create=False)
    check_roots(root)
    if root is None:
        return []
    base = open_dirs(root, [ROOT_NAME])
    if len(base) < 2:
        return []
    top = base[-1]
    names = [encode_ifname(ifname)] if ifname is not None else os.listdir(top.fd)
    out = []
    for enc in sorted(names):
        iface = _open_below(top, enc, create=False)
        if iface is None:
            continue
        for role in sorted(os.listdir(iface.fd)):
            d = _open_below(iface, role, create=False)
            if d is not None:
                out.append(RoleState(decode_ifname(enc), role, root))
                d.close()
        iface.close()
    for d in base:
        d.close()
    return out


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
