"""Where attached netoken programs keep their state, and how the CLI finds it.

Layout: a directory per network namespace, in it one per interface and role,
and the state a role shares between the interfaces of one namespace::

    /sys/fs/bpf/netoken/net:COOKIE/if:IFINDEX/marker/prog       the TC program
    /sys/fs/bpf/netoken/net:COOKIE/if:IFINDEX/marker/nt_config  every map, by name
    /sys/fs/bpf/netoken/net:COOKIE/if:IFINDEX/guard/...         program, counters
    /sys/fs/bpf/netoken/net:COOKIE/guard/...                    shared by all guards
    /run/netoken/net:COOKIE/if:IFINDEX/marker.json              what the maps cannot say
    /run/netoken/net:COOKIE/guard.json

COOKIE is the namespace's cookie (SO_NETNS_COOKIE): unlike its inode it is
never reused while the system runs, and pins do not outlive a boot.  The same
interface name in two namespaces therefore never collides, and every command
only looks at its own namespace's directory.  IFINDEX keys an interface
rather than its name: a rename leaves the state where it is, and the name
shown is always the current one (the metadata keeps the name it had when
netoken attached, so the old name still finds it).

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

bpffs refuses dots in names (they are reserved there), which is why no
directory is named after an interface any more and the staging pins are
``prog_new``, ``nt_replay_new``.

Directories are named by role (``marker``, ``guard``); what each role is
lives in netoken/roles.py.  Nothing here knows more than the names it finds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import NetokenError

BPFFS = Path("/sys/fs/bpf")
RUN_ROOT = Path("/run")
ROOT_NAME = "netoken"
RUN_DIR = RUN_ROOT / ROOT_NAME
PROG_PIN = "prog"
# bpffs refuses dots in names, so the staging pin of a replacement program
# cannot be "prog.new".
PROG_PIN_NEW = "prog_new"
META_VERSION = 2  # 2: per-namespace layout, netns as {cookie, inode}

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
    return re.sub(
        r"/proc/self/fd/(\d+)", lambda m: _FD_PATHS.get(int(m.group(1)), m.group(0)), text
    )


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
        raise StateError(
            f"{path} is owned by uid {st.st_uid}, not root; netoken keeps its "
            f"state only below root-owned directories"
        )
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
        return StateError(
            f"{path} is a symbolic link{target}, not a directory: remove it (rm {path}) and retry"
        )
    return StateError(f"{path} is not a directory: remove it (rm {path}) and retry")


def _check_dir(d: StateDir) -> None:
    st = os.fstat(d.fd)
    if not _trusted_owner(st.st_uid):
        raise StateError(
            f"{d.path} is owned by uid {st.st_uid}, not root: remove it (rm -r {d.path}) and retry"
        )
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


def decode_ifname(name: str) -> str:
    """Interface name of a directory of the old layout, which named them
    after interfaces, percent-encoded (bpffs refuses dots in names)."""
    return name.replace("%2E", ".").replace("%25", "%")


def current_netns() -> str:
    """Our network namespace as the kernel writes it, e.g. ``net:[4026531840]``."""
    return os.readlink("/proc/thread-self/ns/net")


# asm-generic/socket.h (Linux 5.14): the namespace's 64-bit cookie.
SO_NETNS_COOKIE = 71


@dataclass(frozen=True)
class Netns:
    """A network namespace.

    Its state directory is named by its cookie, which the kernel never hands
    out twice while the system runs; bpffs and /run start empty at every
    boot, so a cookie names one namespace for the whole life of the state.
    The inode (what `ip netns identify`, lsns and /proc/PID/ns/net show) is
    recycled once a namespace is gone, so it only helps to find a namespace
    and to name it for people."""

    cookie: int
    inode: int

    @property
    def dirname(self) -> str:
        return f"{NETNS_PREFIX}{self.cookie}"

    @property
    def kernel_name(self) -> str:
        return f"net:[{self.inode}]"

    def as_meta(self) -> dict[str, int]:
        return {"cookie": self.cookie, "inode": self.inode}


# Directory names of the per-namespace layout.  Interface names cannot hold
# ':' (the kernel refuses it), so no directory of the layout before this one
# (one per interface name) can look like these.
NETNS_PREFIX = "net:"
IFACE_PREFIX = "if:"


def this_netns() -> Netns:
    """The network namespace this thread runs in."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError:
        raise StateError(
            "this kernel does not report network namespace cookies (SO_NETNS_COOKIE, "
            "Linux 5.14 or newer), which netoken keys its state by"
        ) from None
    return Netns(int.from_bytes(raw, sys.byteorder), os.stat("/proc/thread-self/ns/net").st_ino)


def _cookie_at(path: str) -> int | None:
    """The cookie of the network namespace file PATH (entered for a moment)."""
    from .netns import entered

    try:
        with entered(path):
            return this_netns().cookie
    except (OSError, StateError):
        return None


def _netns_files(inode: int, processes: bool = True) -> Iterator[tuple[str, str | None]]:
    """(path, `ip netns` name or None) of namespace files with INODE: named
    namespaces first, then (with PROCESSES) those only processes hold."""
    from .netns import NETNS_RUN_DIR

    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(NETNS_RUN_DIR)):
            path = os.path.join(NETNS_RUN_DIR, name)
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    yield path, name
    if not processes:
        return
    with contextlib.suppress(OSError):
        for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
            path = f"/proc/{pid}/ns/net"
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    yield path, None


def find_netns(ns: Netns) -> tuple[str, str | None] | None:
    """(a path that enters NS, its `ip netns` name or None), or None when no
    named namespace or process has it (it is gone, or only something netoken
    does not look at, such as a bind mount elsewhere, holds it)."""
    for path, name in _netns_files(ns.inode):
        if _cookie_at(path) == ns.cookie:
            return path, name
    return None


def netns_name(ns: Netns) -> str | None:
    """NS's `ip netns` name, if it has one."""
    if ns.cookie == this_netns().cookie:
        # Ours: the inode is alive and unique, no need to enter anything.
        return next((name for _, name in _netns_files(ns.inode, processes=False)), None)
    for path, name in _netns_files(ns.inode, processes=False):
        if _cookie_at(path) == ns.cookie:
            return name
    return None


def netns_label(ns: Netns) -> str:
    """How messages name NS: its `ip netns` name, else the kernel's net:[inode];
    one whose inode is unknown (its pins outlived it) by its cookie."""
    if not ns.inode:
        return f"a gone namespace ({ns.dirname})"
    return netns_name(ns) or ns.kernel_name


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Serialize commands that change state (attach, apply, detach).

    One global lock: per-interface lock files could not be removed safely and
    these commands take milliseconds.  Reentrant within a process (the
    migration of old state runs under it, inside commands that hold it).
    """
    if _LOCK_DEPTH[0]:
        _LOCK_DEPTH[0] += 1
        try:
            yield
        finally:
            _LOCK_DEPTH[0] -= 1
        return
    run = open_dirs(RUN_ROOT, [ROOT_NAME], create=True)[-1]
    fd = os.open(
        "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=run.fd
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _LOCK_DEPTH[0] = 1
        yield
    finally:
        _LOCK_DEPTH[0] = 0
        os.close(fd)


_LOCK_DEPTH = [0]


# --------------------------------------------------------------------------
# pinned state: one directory in bpffs, one metadata file in /run


def memlock(path: str) -> int:
    """Kernel memory charged to the BPF map pinned at PATH (what `bpftool map
    show` reports as memlock), from the fdinfo of a fresh fd on it."""
    from .libbpf import Map

    with Map.from_pinned(path) as m, open(f"/proc/self/fdinfo/{m.fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


class PinnedState:
    """The pins of one program or shared set of maps, and their metadata.

    PARTS are the directories below the namespace's one; the last is the pin
    directory and names the metadata file (``PARTS[-1].json``) in the
    matching /run directory.  Paths (``pin_dir``, ``meta_path``) are for
    people; every access goes through checked directory fds (see
    open_dirs), opened on first use and kept for the life of the object."""

    def __init__(self, netns: Netns, parts: tuple[str, ...], root: Path = BPFFS) -> None:
        self.netns = netns
        self.parts = parts
        self.root = root
        # "pin" / "run" -> the open chain of directories, anchor first
        self._dirs: dict[str, list[StateDir]] = {}

    @property
    def _pin_parts(self) -> list[str]:
        return [ROOT_NAME, self.netns.dirname, *self.parts]

    @property
    def _run_parts(self) -> list[str]:
        return [ROOT_NAME, self.netns.dirname, *self.parts[:-1]]

    @property
    def _meta_name(self) -> str:
        return f"{self.parts[-1]}.json"

    @property
    def pin_dir(self) -> Path:
        return self.root.joinpath(*self._pin_parts)

    @property
    def meta_path(self) -> Path:
        return RUN_ROOT.joinpath(*self._run_parts, self._meta_name)

    def _chain(self, which: str, create: bool = False) -> list[StateDir]:
        parts = self._pin_parts if which == "pin" else self._run_parts
        chain = self._dirs.get(which)
        if chain is None:
            anchor = self.root if which == "pin" else RUN_ROOT
            chain = open_dirs(anchor, parts, create)
            if len(chain) == len(parts) + 1:
                self._dirs[which] = chain
        return chain

    def _dir(self, which: str, create: bool = False) -> StateDir | None:
        chain = self._chain(which, create)
        full = len(self._pin_parts if which == "pin" else self._run_parts) + 1
        return chain[-1] if len(chain) == full else None

    def forget(self) -> None:
        """Close the directory fds (they are reopened on next use)."""
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

    def has_pin(self, name: str) -> bool:
        d = self._dir("pin")
        return d is not None and _lexists(d, name)

    def exists(self) -> bool:
        """Whether a program is pinned here (shared state has none)."""
        return self.has_pin(PROG_PIN)

    def pins(self) -> list[str]:
        d = self._dir("pin")
        return sorted(os.listdir(d.fd)) if d is not None else []

    def make_dir(self) -> bool:
        """Create the pin directory (private to root); True if it was created."""
        d = self._dir("pin", create=True)
        assert d is not None
        return d.created

    def memlock(self) -> int:
        """Bytes of kernel memory the maps pinned here hold."""
        total = 0
        for name in self.pins():
            with contextlib.suppress(OSError, ValueError):
                total += memlock(self.pin(name))
        return total

    def read_meta(self) -> dict[str, Any] | None:
        d = self._dir("run")
        return _read_json(d, self._meta_name) if d is not None else None

    def meta_mtime(self) -> float | None:
        """When the metadata was last written (None: there is none)."""
        d = self._dir("run")
        try:
            return (
                os.stat(self._meta_name, dir_fd=d.fd, follow_symlinks=False).st_mtime
                if d is not None
                else None
            )
        except OSError:
            return None

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Replace the metadata file atomically (readers never see half a file)."""
        d = self._dir("run", create=True)
        assert d is not None
        name = self._meta_name
        tmp = f"{name}.tmp{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=d.fd)
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=d.fd,
        )
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, name, src_dir_fd=d.fd, dst_dir_fd=d.fd)

    def remove(self) -> None:
        """Unpin everything here and drop the metadata; parent directories
        go too once empty (the namespace's, netoken's in bpffs), everything
        else stays."""
        pins = self._chain("pin")
        run = self._chain("run")
        self._dirs.clear()
        # Deepest first: a level goes only once what is below it has gone.
        if len(pins) == len(self._pin_parts) + 1:
            shutil.rmtree(pins[-1].path.name, dir_fd=pins[-2].fd, ignore_errors=True)
        for i in range(min(len(pins), len(self._pin_parts)) - 1, 0, -1):
            with contextlib.suppress(OSError):
                os.rmdir(pins[i].path.name, dir_fd=pins[i - 1].fd)
        if len(run) == len(self._run_parts) + 1:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._meta_name, dir_fd=run[-1].fd)
        # /run/netoken itself stays: it holds the lock.
        for i in range(min(len(run), len(self._run_parts) + 1) - 1, 1, -1):
            with contextlib.suppress(OSError):
                os.rmdir(run[i].path.name, dir_fd=run[i - 1].fd)
        for d in (*pins, *run):
            d.close()

    def __del__(self) -> None:
        self.forget()


class RoleState(PinnedState):
    """One role (marker, guard) on one interface of a network namespace,
    keyed by the interface's index: a rename does not move it.

    ``ifname`` is the interface's name now, or, once it is gone, the name
    it had when the role was attached (``present`` says which)."""

    def __init__(
        self, netns: Netns, ifindex: int, role: str, root: Path = BPFFS, here: bool = True
    ) -> None:
        super().__init__(netns, (f"{IFACE_PREFIX}{ifindex}", role), root)
        self.ifindex = ifindex
        self.role = role
        self._shared: SharedState | None = None
        name = None
        if here:  # interface names are only known inside the namespace
            with contextlib.suppress(OSError):
                name = socket.if_indextoname(ifindex)
        self.present = name is not None
        self.ifname: str = name or self.attached_as() or f"ifindex {ifindex}"

    def shared(self) -> SharedState:
        """What this role shares in this namespace (see SharedState)."""
        if self._shared is None:
            self._shared = SharedState(self.netns, self.role, self.root)
        return self._shared

    def attached_as(self) -> str | None:
        """The interface's name when the role was attached (metadata)."""
        name = (self.read_meta() or {}).get("ifname")
        return name if isinstance(name, str) else None

    def __repr__(self) -> str:
        return f"<RoleState {self.role} on {self.ifname} (ifindex {self.ifindex}) in {self.netns}>"


class SharedState(PinnedState):
    """What every instance of a role in one network namespace shares (the
    guard's replay cache, keys and config), pinned once beside them."""

    def __init__(self, netns: Netns, role: str, root: Path = BPFFS) -> None:
        super().__init__(netns, (role,), root)
        self.role = role


def _read_json(d: StateDir, name: str) -> dict[str, Any] | None:
    """The JSON object in file NAME of D; None if there is none, or no object."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
        with os.fdopen(fd) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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


def _ifindex_of(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _ifindex_present(idx: int) -> bool:
    try:
        socket.if_indextoname(idx)
    except OSError:
        return False
    return True


def netns_states(
    ns: Netns, root: Path, here: bool = True, ifindex: int | None = None
) -> list[RoleState]:
    """Every per-interface role state of namespace NS (only interface
    IFINDEX's, if given), checked level by level (StateError if a directory
    is not safe).  HERE: NS is the namespace this thread runs in, so
    interface names are looked up."""
    base = open_dirs(root, [ROOT_NAME, ns.dirname])
    out: list[RoleState] = []
    try:
        if len(base) < 3:
            return []
        top = base[-1]
        entries = [
            e
            for e in os.listdir(top.fd)
            if e.startswith(IFACE_PREFIX)
            and e[len(IFACE_PREFIX) :].isdigit()
            and (ifindex is None or e == f"{IFACE_PREFIX}{ifindex}")
        ]
        for entry in sorted(entries, key=lambda e: int(e[len(IFACE_PREFIX) :])):
            iface = _open_below(top, entry, create=False)
            if iface is None:
                continue
            idx = int(entry[len(IFACE_PREFIX) :])
            for role in sorted(os.listdir(iface.fd)):
                d = _open_below(iface, role, create=False)
                if d is not None:
                    d.close()
                    out.append(RoleState(ns, idx, role, root, here))
            iface.close()
    finally:
        for d in base:
            d.close()
    return out


def role_count(ns: Netns, role: str, root: Path) -> int:
    """How many interfaces of NS have ROLE pinned (cheaper than netns_states)."""
    base = open_dirs(root, [ROOT_NAME, ns.dirname])
    try:
        if len(base) < 3:
            return 0
        top = base[-1]
        n = 0
        for entry in os.listdir(top.fd):
            if entry.startswith(IFACE_PREFIX):
                with contextlib.suppress(OSError):
                    os.stat(f"{entry}/{role}", dir_fd=top.fd, follow_symlinks=False)
                    n += 1
        return n
    finally:
        for d in base:
            d.close()


def interface_metas(idx: int) -> list[dict[str, Any]]:
    """The metadata of every role on interface IDX of this network namespace
    (what an unsafe or missing directory hides is left out)."""
    try:
        run = open_dirs(RUN_ROOT, [ROOT_NAME, this_netns().dirname, f"{IFACE_PREFIX}{idx}"])
    except (StateError, OSError):
        return []
    try:
        if len(run) < 4:
            return []
        names = sorted(n for n in os.listdir(run[-1].fd) if n.endswith(".json"))
        return [m for m in (_read_json(run[-1], n) for n in names) if m is not None]
    finally:
        for d in run:
            d.close()


def all_states(ifname: str | None = None, root: Path | None = None) -> list[RoleState]:
    """Every role state with pins in this network namespace, optionally only
    for interface IFNAME: the interface that has that name now, or, if none
    has, the one netoken attached to under that name (renamed or gone since).
    Every directory on the way is checked (StateError if one is not safe);
    state left by an older netoken is moved to this layout first."""
    root = root if root is not None else bpffs(create=False)
    check_roots(root)
    if root is None:
        return []
    ns = this_netns()
    migrate_old_layout(root, ns)
    if ifname is None:
        return netns_states(ns, root)
    idx = _ifindex_of(ifname)
    if idx is not None:  # only its directory is opened
        return netns_states(ns, root, ifindex=idx)
    known = [st for st in netns_states(ns, root) if st.attached_as() == ifname]
    return [st for st in known if st.ifindex == known[0].ifindex]


def in_this_netns(st: PinnedState) -> bool:
    """Whether ST is this namespace's (all_states lists no other)."""
    return st.netns.cookie == this_netns().cookie


@dataclass(frozen=True)
class OtherNetns:
    """Another namespace's state, as its directories and metadata tell
    (interface names are those at attach time)."""

    netns: Netns
    roles: list[tuple[str, str]]  # (ifname, role)
    path: Path


def other_netns(root: Path | None = None) -> list[OtherNetns]:
    """The state of every other network namespace netoken keeps state for."""
    root = root if root is not None else bpffs(create=False)
    if root is None:
        return []
    me = this_netns()
    base = open_dirs(root, [ROOT_NAME])
    try:
        if len(base) < 2:
            return []
        names = sorted(os.listdir(base[-1].fd))
    finally:
        for d in base:
            d.close()
    out = []
    for entry in names:
        cookie = entry[len(NETNS_PREFIX) :]
        if not entry.startswith(NETNS_PREFIX) or not cookie.isdigit() or int(cookie) == me.cookie:
            continue
        probe = Netns(int(cookie), 0)
        states = netns_states(probe, root, here=False)
        inode = 0
        for st in states:
            ns_meta = (st.read_meta() or {}).get("netns")
            if isinstance(ns_meta, dict) and isinstance(ns_meta.get("inode"), int):
                inode = ns_meta["inode"]
                break
        ns = Netns(int(cookie), inode)
        out.append(
            OtherNetns(ns, [(st.ifname, st.role) for st in states], root / ROOT_NAME / entry)
        )
    return out


# --------------------------------------------------------------------------
# the layout before per-namespace state
#
# Up to this version state lived in /sys/fs/bpf/netoken/IFNAME/ROLE and
# /run/netoken/IFNAME/ROLE.json, IFNAME percent-encoded, with the owning
# namespace only in the metadata ("netns": "net:[inode]").  Each namespace
# moves its own entries when netoken first runs there: a rename of the role
# directory within bpffs, which the running programs do not notice (pins
# are references).  Entries of other namespaces wait for netoken to run in
# theirs (`status --all-netns` lists them).


def old_layout_entries(root: Path) -> list[str]:
    """Top-level directories of the layout before per-namespace state."""
    base = open_dirs(root, [ROOT_NAME])
    try:
        if len(base) < 2:
            return []
        return sorted(n for n in os.listdir(base[-1].fd) if not n.startswith(NETNS_PREFIX))
    finally:
        for d in base:
            d.close()


def _old_entries_here(root: Path, ns: Netns) -> bool:
    """Whether an entry of the old layout may be this namespace's."""
    entries = old_layout_entries(root)
    if not entries:
        return False
    run = open_dirs(RUN_ROOT, [ROOT_NAME])
    try:
        run_top = run[-1] if len(run) == 2 else None
        base = open_dirs(root, [ROOT_NAME])
        try:
            for enc in entries:
                old = _open_below(base[-1], enc, create=False)
                if old is None:
                    continue
                roles = os.listdir(old.fd)
                old.close()
                for role in roles:
                    meta = _old_meta(run_top, enc, role)
                    if meta is None and _ifindex_of(decode_ifname(enc)) is not None:
                        return True
                    if meta is not None and meta.get("netns") in (None, ns.kernel_name):
                        return True
        finally:
            for d in base:
                d.close()
    finally:
        for d in run:
            d.close()
    return False


def _old_meta(run_top: StateDir | None, enc: str, role: str) -> dict[str, Any] | None:
    if run_top is None:
        return None
    d = _open_below(run_top, enc, create=False)
    if d is None:
        return None
    try:
        return _read_json(d, f"{role}.json")
    finally:
        d.close()


def migrate_old_layout(root: Path, ns: Netns) -> list[str]:
    """Move this namespace's state of the old layout to the per-namespace
    one; returns what moved ("IFNAME ROLE").  Entries of other namespaces
    are only looked at (without the lock, which every command would
    otherwise take while any of them is left)."""
    if not _old_entries_here(root, ns):
        return []
    moved = []
    with locked():
        base = open_dirs(root, [ROOT_NAME])
        run = open_dirs(RUN_ROOT, [ROOT_NAME])
        run_top = run[-1] if len(run) == 2 else None
        try:
            if len(base) < 2:
                return []
            top = base[-1]
            for enc in sorted(n for n in os.listdir(top.fd) if not n.startswith(NETNS_PREFIX)):
                old = _open_below(top, enc, create=False)
                if old is None:
                    continue
                try:
                    for role in sorted(os.listdir(old.fd)):
                        if _migrate_one(root, ns, old, run_top, enc, role):
                            moved.append(f"{decode_ifname(enc)} {role}")
                finally:
                    old.close()
                with contextlib.suppress(OSError):
                    os.rmdir(enc, dir_fd=top.fd)
                if run_top is not None:
                    with contextlib.suppress(OSError):
                        os.rmdir(enc, dir_fd=run_top.fd)
        finally:
            for d in (*base, *run):
                d.close()
    return moved


def _migrate_one(
    root: Path, ns: Netns, old: StateDir, run_top: StateDir | None, enc: str, role: str
) -> bool:
    meta = _old_meta(run_top, enc, role)
    ifname = decode_ifname(enc)
    if meta is not None and meta.get("netns") not in (None, ns.kernel_name):
        return False  # another namespace's: it moves when netoken runs there
    idx = meta.get("ifindex") if meta is not None else None
    if not isinstance(idx, int) or not _ifindex_present(idx):
        # Without metadata the old netoken took the state for its own in
        # any namespace; here only one with an interface of that name does.
        by_name = _ifindex_of(ifname)
        if by_name is None and not isinstance(idx, int):
            return False
        idx = by_name if by_name is not None else idx
    assert isinstance(idx, int)
    new = RoleState(ns, idx, role, root)
    if new.has_pin_dir():
        return False  # attached again meanwhile: the old entry stays for the operator
    chain = open_dirs(root, new._pin_parts[:-1], create=True)
    try:
        os.rename(role, role, src_dir_fd=old.fd, dst_dir_fd=chain[-1].fd)
    finally:
        for d in chain:
            d.close()
    new.forget()
    if meta is not None:
        meta["netns"] = ns.as_meta()
        meta["ifindex"] = idx
        meta.setdefault("ifname", ifname)
        new.write_meta(meta)
        if run_top is not None:
            old_run = _open_below(run_top, enc, create=False)
            if old_run is not None:
                with contextlib.suppress(OSError):
                    os.unlink(f"{role}.json", dir_fd=old_run.fd)
                old_run.close()
    return True
