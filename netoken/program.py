"""A loaded BPF program and its maps, pinned per interface and role.

The marker (tc, netoken/marker.py) and the guard (XDP or tc, netoken/guard/)
are both this: an ELF object loaded with some maps shared from the program
it replaces, pinned per network namespace, interface and role with a
metadata file in /run (netoken/state.py), reopened from those pins by any
later process, and shown by the generic status / stats / monitor views.
Maps a role names in SHARED_MAPS are pinned once per namespace and reused by
every instance of it there (the guard's replay cache and config).

What is the same for both lives here, once: loading and pinning
(PinnedProgram), the attach transaction (PinnedProgram.attaching, Attach),
apply and detach (updating, removing), and the role's status, counters and
events (ProgramRole).  Each role specialises it with its object and program
name, its maps, its error class and its CLI verb, and keeps what really
differs (the attach hook, the config maps, the entries, the events) to itself.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar

from . import kernel, layout, links, state
from .config import Config, iso
from .datapath import object_path, percpu_counters, u32
from .libbpf import BpfObject, Map, Program, RingBuffer, unpin
from .state import PROG_PIN, PROG_PIN_NEW, RoleState
from .token import key_fingerprint_int

# Events are written only while a reader listens (bpf/clock.h): each reader
# pushes a deadline this far ahead, at least every BEAT_S while it runs, into
# the nt_listen map of each program it follows.  A reader that dies stops
# events within LISTEN_S; nobody listening costs the datapath nothing.  The
# map is the programs' own, found through them (unpinned): a program from
# before it existed writes events anyway.
LISTEN_MAP = "nt_listen"
LISTEN_S = 5.0
BEAT_S = 1.0


def listen_map(prog: Program) -> Map | None:
    """PROG's heartbeat map, or None for a program that writes events always."""
    return prog.map(LISTEN_MAP)


class ListeningRing(RingBuffer):
    """A RingBuffer that keeps the programs of LISTEN (their nt_listen maps,
    closed with the ring) writing events while it is used: it moves their
    deadline on when created and, once BEAT_S has passed, on every poll()
    and consume().  poll() waits in steps of at most BEAT_S, so that a long
    wait keeps listening."""

    def __init__(
        self, ring: Map, callback: Callable[[bytes], object], listen: list[Map] | None = None
    ) -> None:
        self._listen: list[Map] = []
        super().__init__(ring, callback)
        self._next = 0.0
        for m in listen or []:
            self.listen_also(m)

    def listen_also(self, m: Map) -> None:
        """Keep M's program writing events too (another program on the same ring)."""
        self._listen.append(m)
        self._next = 0.0
        self._beat()

    def beat(self) -> None:
        """Keep listening without reading (as poll() and consume() do)."""
        self._beat()

    def _beat(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + BEAT_S
        until = (time.monotonic_ns() + int(LISTEN_S * 1e9)).to_bytes(8, "little")
        for m in self._listen:
            m.update(u32(0), until)

    def poll(self, timeout_ms: int = -1) -> int:
        end = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
        while True:
            self._beat()
            left = BEAT_S if end is None else min(BEAT_S, max(0.0, end - time.monotonic()))
            n = super().poll(int(left * 1000))
            if n or (end is not None and time.monotonic() >= end):
                return n

    def consume(self) -> int:
        self._beat()
        return super().consume()

    def close(self) -> None:
        super().close()
        listen, self._listen = self._listen, []
        for m in listen:
            m.close()


def ifindex(ifname: str, error: type[Exception]) -> int:
    """IFNAME's index; ERROR("interface ... does not exist") if there is none."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise error(f"interface {ifname!r} does not exist") from None


def state_of(role: str, ifname: str, error: type[Exception], create: bool = False) -> RoleState:
    """ROLE's pinned state for interface IFNAME of this network namespace
    (bpffs mounted first with CREATE), its directories that exist already
    checked (StateError if one is not safe).

    IFNAME is the interface's name now or, after a rename or once it is
    gone, the name netoken attached under: the state is keyed by ifindex,
    and ``st.ifname`` / ``st.present`` say what it is called now.  ERROR("interface
    ... does not exist") when neither finds anything."""
    root = state.bpffs(create=create) or state.BPFFS
    found = state.all_states(ifname, root)
    idx = found[0].ifindex if found else None
    if idx is None:
        idx = ifindex(ifname, error)
    st = RoleState(state.this_netns(), idx, role, root)
    st.check()
    return st


def existing(ifname: str, error: type[Exception]) -> int:
    """IFNAME's index, for attaching.  If IFNAME is the name of an interface
    netoken attached to that has been renamed since, the error says what
    it is called now."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        pass
    found = state.all_states(ifname) if state.bpffs(create=False) else []
    if found and found[0].present:
        st = found[0]
        raise error(
            f"interface {ifname!r} does not exist; netoken attached to it under that name and it "
            f"is {st.ifname} now (ifindex {st.ifindex}): use {st.ifname}"
        )
    return ifindex(ifname, error)


class PinnedProgram:
    """A loaded program and its maps (not necessarily attached).

    Either fresh from the ELF object (a subclass's ``load``) or reopened from
    its pins by another process (:meth:`from_pins`); both behave the same.
    Subclasses set the class attributes below.
    """

    ROLE: ClassVar[str]  # role name: pin directory, metadata file, messages
    OBJECT: ClassVar[str]  # netoken/bpf/OBJECT.bpf.o (subclasses may load variants)
    PROG_NAME: ClassVar[str]
    MAPS: ClassVar[tuple[str, ...]]
    Error: ClassVar[type[Exception]]  # one-line errors the user can act on
    VERB: ClassVar[str]  # `netoken VERB attach|detach`
    CONFIG_MAP: ClassVar[str]  # a one-entry array of CONFIG_STRUCT
    CONFIG_STRUCT: ClassVar[type[layout.Struct]]
    STATS_MAP: ClassVar[str]  # per-CPU counters indexed by REASONS
    REASONS: ClassVar[tuple[str, ...]]
    EVENTS_MAP: ClassVar[str]  # ring buffer of EVENT records
    EVENT: ClassVar[Any]  # a class with from_bytes(bytes)
    # Maps a replacement program may bring instead of reusing the pinned
    # one, and the name each is pinned under until commit_pin().
    STAGED_MAPS: ClassVar[Mapping[str, str]] = {}

    framing = "ethernet"  # the link layer the loaded object parses (a subclass's load)

    def __init__(
        self,
        obj: BpfObject | None = None,
        *,
        prog: Program | None = None,
        maps: dict[str, Map] | None = None,
    ) -> None:
        self.obj = obj
        if obj is not None:
            prog = obj.program(self.PROG_NAME)
            maps = {name: obj.map(name) for name in self.MAPS}
        if prog is None or maps is None:
            raise TypeError(f"{type(self).__name__} needs a BpfObject or a program and its maps")
        self.prog: Program = prog
        self.maps: dict[str, Map] = maps

    # Maps pinned once per network namespace (state.SharedState) and reused
    # by every instance of the role there; the others are per interface.
    SHARED_MAPS: ClassVar[tuple[str, ...]] = ()
    # Maps of MAPS that state pinned by an older netoken may lack: opened
    # if pinned, else the next load creates them.
    LATE_MAPS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def state_of(cls, ifname: str, create: bool = False) -> RoleState:
        return state_of(cls.ROLE, ifname, cls.Error, create)

    @classmethod
    def ifindex(cls, ifname: str) -> int:
        return ifindex(ifname, cls.Error)

    @classmethod
    def framing_of(cls, ifname: str, dev: links.Link | None) -> str:
        """IFNAME's link layer as the objects know it ("ethernet" or "l3"),
        or a one-line Error: a program that cannot parse a device's packets
        would attach and check or mark nothing."""
        try:
            return links.framing_of(ifname, dev)
        except ValueError as e:
            raise cls.Error(str(e)) from None

    @classmethod
    def shared_state(cls, st: RoleState) -> state.SharedState:
        """The role's shared state in ST's namespace, kept with ST: pin
        paths go through its directory fds, which live as long as it."""
        return st.shared()

    @classmethod
    def map_pin(cls, st: RoleState, name: str) -> str | None:
        """Where map NAME of ST's program is pinned: its own directory first
        (all maps were there before maps were shared, and such a program
        keeps its own until it is attached again), else the namespace's
        shared one; None if neither has it."""
        if st.has_pin(name):
            return st.pin(name)
        if name in cls.SHARED_MAPS:
            sh = cls.shared_state(st)
            if sh.has_pin(name):
                return sh.pin(name)
        return None

    @classmethod
    def open_shared(cls, st: RoleState) -> dict[str, Map]:
        """The namespace's shared maps of this role ({} when there are none)."""
        sh = cls.shared_state(st)
        if not all(sh.has_pin(n) for n in cls.SHARED_MAPS):
            return {}
        maps: dict[str, Map] = {}
        try:
            for name in cls.SHARED_MAPS:
                maps[name] = Map.from_pinned(sh.pin(name))
        except BaseException:
            for m in maps.values():
                m.close()
            raise
        return maps

    @classmethod
    def siblings(cls, st: RoleState) -> list[RoleState]:
        """The other interfaces of ST's namespace with this role pinned."""
        return [
            o
            for o in state.netns_states(st.netns, st.root)
            if o.role == cls.ROLE and o.ifindex != st.ifindex
        ]

    @classmethod
    def _check_compatible(cls, want: Map, have: Map) -> None:
        # libbpf's reuse_fd adopts the existing map's shape without comparing, so
        # maps pinned by a different netoken build would be silently misread.
        a = (want.type, want.key_size, want.value_size, want.max_entries)
        b = (have.type, have.key_size, have.value_size, have.max_entries)
        if a != b:
            raise cls.Error(
                f"pinned map {have.name} does not match this netoken's {cls.ROLE} "
                f"(type/key/value/entries {b} vs {a}); detach the old {cls.ROLE} first"
            )

    @classmethod
    def _load_object(
        cls,
        reuse: Mapping[str, Map] | None = None,
        max_entries: Mapping[str, int] | None = None,
        object_name: str | None = None,
    ) -> Self:
        """Open the ELF object (OBJECT_NAME, default OBJECT), size the maps
        in MAX_ENTRIES, share those in REUSE instead of creating them, and
        load it."""
        kernel.require(cls.Error)
        obj = BpfObject.open(str(object_path(object_name or cls.OBJECT)))
        try:
            for name, n in (max_entries or {}).items():
                obj.set_map_max_entries(name, n)
            for name, m in (reuse or {}).items():
                cls._check_compatible(obj.map(name), m)
                obj.reuse_map(name, m)
            obj.load()
        except BaseException:
            obj.close()
            raise
        return cls(obj)

    @classmethod
    def from_pins(cls, ifname: str, st: RoleState | None = None) -> Self:
        """Open the program pinned for IFNAME (the program and every map)."""
        st = st or cls.state_of(ifname)
        if not st.exists():
            raise cls.Error(
                f"no {cls.ROLE} on {ifname} (run `netoken {cls.VERB} attach {ifname} -c FILE` first)"
            )
        paths = {n: cls.map_pin(st, n) for n in cls.MAPS}
        paths = {n: p for n, p in paths.items() if p is not None or n not in cls.LATE_MAPS}
        missing = [n for n, path in paths.items() if path is None]
        if missing:
            raise cls.Error(
                f"pinned {cls.ROLE} state in {st.pin_dir} is incomplete (missing {', '.join(missing)}); "
                f"run `netoken {cls.VERB} detach {ifname}` and attach again"
            )
        maps: dict[str, Map] = {}
        try:
            for name, path in paths.items():
                assert path is not None
                maps[name] = Map.from_pinned(path)
            prog = Program.from_pinned(st.pin(PROG_PIN))
        except BaseException:
            for m in maps.values():
                m.close()
            raise
        return cls(prog=prog, maps=maps)

    def check_device(self, ifname: str) -> int:
        """IFNAME's index, if this program can run there (it was loaded for
        the device's link layer); a one-line Error otherwise."""
        idx = self.ifindex(ifname)
        self._check_framing(ifname, self.framing_of(ifname, links.link(idx)))
        return idx

    def _check_framing(self, ifname: str, framing: str) -> None:
        if framing != self.framing:
            raise self.Error(
                f"{ifname} is an {framing} device; this {self.ROLE} was loaded for "
                f"{self.framing} ({type(self).__name__}.load(framing={framing!r}))"
            )

    @classmethod
    def _home(cls, st: RoleState, name: str) -> state.PinnedState:
        """Where map NAME of ST's program is pinned from now on."""
        return cls.shared_state(st) if name in cls.SHARED_MAPS else st

    def pin(self, st: RoleState) -> None:
        """Pin every map not pinned yet (SHARED_MAPS in the namespace's
        shared directory), and this program as PROG_PIN_NEW.

        The program becomes PROG_PIN (:meth:`commit_pin`) only once it runs,
        so the pins never name a program that is not attached.  A map of
        STAGED_MAPS that differs from the pinned one is staged the same way:
        the programs still run on the pinned one until the swap."""
        st.make_dir()
        for name, m in self.maps.items():
            home = self._home(st, name)
            home.make_dir()
            path = home.pin(name)
            if os.path.exists(path):
                with Map.from_pinned(path) as pinned:
                    if pinned.id == m.id:
                        continue
                if name not in self.STAGED_MAPS:
                    raise self.Error(
                        f"{home.pin_dir / name} is pinned but is not this {self.ROLE}'s map"
                    )
                path = home.pin(self.STAGED_MAPS[name])
                unpin(path)
            m.pin(path)
        unpin(st.pin(PROG_PIN_NEW))
        self.prog.pin(st.pin(PROG_PIN_NEW))

    def commit_pin(self, st: RoleState) -> None:
        """Make the staged pins the current ones (renames are atomic), and
        drop the program's own pins of maps it now shares (state pinned
        before maps were shared)."""
        os.replace(st.pin(PROG_PIN_NEW), st.pin(PROG_PIN))
        for name, staged in self.STAGED_MAPS.items():
            home = self._home(st, name)
            if home.has_pin(staged):
                os.replace(home.pin(staged), home.pin(name))
        for name in self.SHARED_MAPS:
            unpin(st.pin(name))

    @classmethod
    def unpin_staged(cls, st: RoleState) -> None:
        """Remove what :meth:`pin` staged and :meth:`commit_pin` did not take."""
        if not st.has_pin_dir():
            return
        unpin(st.pin(PROG_PIN_NEW))
        for name, staged in cls.STAGED_MAPS.items():
            home = cls._home(st, name)
            if home.has_pin_dir():
                unpin(home.pin(staged))

    def close(self) -> None:
        if self.obj is not None:
            self.obj.close()
        else:
            self.prog.close()
            for m in self.maps.values():
                m.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def read_config(cls, m: Map) -> Any:
        """The CONFIG_STRUCT in M (a CONFIG_MAP), zeroed if there is none."""
        raw = m.lookup(u32(0))
        return cls.CONFIG_STRUCT.from_bytes(raw) if raw else cls.CONFIG_STRUCT()

    def _config(self) -> Any:
        return self.read_config(self.maps[self.CONFIG_MAP])

    @classmethod
    def sync_clock(cls, st: RoleState, want: int) -> int | None:
        """Make the REALTIME-TAI offset in ST's config map WANT (it changes
        only with the kernel's TAI-UTC offset); the old value if it was not.
        A guard's config map is the namespace's, shared by all its guards."""
        path = cls.map_pin(st, cls.CONFIG_MAP)
        if path is None:
            return None
        with Map.from_pinned(path) as m:
            if cls.read_config(m).realtime_minus_tai_ns == want:
                return None
            # Read again under the lock: an `apply` may be flipping the generation.
            with state.locked():
                cur = cls.read_config(m)
                old: int = cur.realtime_minus_tai_ns
                if old == want:
                    return None
                cur.realtime_minus_tai_ns = want
                m.update(u32(0), bytes(cur))
        return old

    def stats(self) -> dict[str, int]:
        """Counters by REASONS, summed over CPUs."""
        return percpu_counters(self.maps[self.STATS_MAP], self.REASONS)

    def events(self, callback: Callable[[Any], object]) -> ListeningRing:
        """A ring buffer that calls CALLBACK(EVENT) per event record; the
        program writes events while it is in use (ListeningRing)."""
        listen = listen_map(self.prog)
        return ListeningRing(
            self.maps[self.EVENTS_MAP],
            lambda b: callback(self.EVENT.from_bytes(b)),
            [listen] if listen is not None else [],
        )

    # ----------------------------------------------------------------------
    # pinned lifecycle: the shape of attach_pinned / apply / detach_pinned

    @classmethod
    @contextlib.contextmanager
    def attaching(cls, ifname: str) -> Iterator[Attach[Self]]:
        """One attach_pinned on IFNAME (see Attach), under the state lock,
        its state directories created."""
        idx = existing(ifname, cls.Error)
        dev = links.link(idx)
        framing = cls.framing_of(ifname, dev)
        assert dev is not None
        with state.locked():
            st = cls.state_of(ifname, create=True)
            with Attach(cls, ifname, st, dev, framing) as t:
                yield t

    @classmethod
    @contextlib.contextmanager
    def updating(cls, ifname: str) -> Iterator[tuple[Self, dict[str, Any], RoleState]]:
        """(the program pinned for IFNAME, its metadata, its state) under
        the state lock; the metadata is written back if the block succeeds."""
        with state.locked():
            st = cls.state_of(ifname)
            meta = st.read_meta() or {}
            with cls.from_pins(st.ifname, st) as p:
                yield p, meta, st
            st.write_meta(meta)

    @classmethod
    @contextlib.contextmanager
    def removing(cls, ifname: str) -> Iterator[Removal]:
        """IFNAME's state, under the state lock, to detach; the pins and the
        metadata are removed if the block succeeds.  IFNAME may be the name
        the role was attached under (the state is found by ifindex, and
        Removal.ifname is the name now); an interface that is gone
        (Removal.idx None) is an error only without state to remove."""
        with state.locked():
            st = cls.state_of(ifname)
            meta = st.read_meta()
            has_state = st.has_pin_dir() or meta is not None
            idx = st.ifindex if st.present else None
            yield Removal(st, meta, has_state, idx, st.ifname)
            st.remove()


@dataclass(frozen=True)
class Removal:
    """What detach_pinned works with (see PinnedProgram.removing)."""

    st: RoleState
    meta: dict[str, Any] | None
    has_state: bool
    idx: int | None
    ifname: str  # the interface's name now (the one attached under, if gone)


P = TypeVar("P", bound=PinnedProgram)


class Attach(Generic[P]):
    """One attach_pinned, from the state lock to the metadata: where
    (``ifname``, ``idx``, ``dev``, ``framing``, its state ``st`` and the
    metadata ``old_meta`` it had), the program pinned there before
    (``old``), the one that replaces it (``new``), and how a failure half way
    is undone.

    Creating it opens the old program (after removing a pin directory that
    a crash left without a program pin).  If the block fails, the undo steps
    registered with :meth:`on_failure` run (last first), the staged pins go,
    and then either all of ST goes (there was no old program) or, once a new
    program was loaded, :attr:`restore_old` gives the old program back the
    contents of the maps they share.  Then what :attr:`closing` holds is
    closed, and both programs are, either way.  The block ends with
    :meth:`commit`.
    """

    def __init__(
        self, kind: type[P], ifname: str, st: RoleState, dev: links.Link, framing: str
    ) -> None:
        self.kind = kind
        self.ifname = ifname
        self.idx = dev.ifindex
        self.dev = dev
        self.framing = framing
        self.st = st
        self.old_meta = st.read_meta()
        if not st.exists() and st.has_pin_dir():
            st.remove()  # a crash between mkdir and the first pin left it
        self.old: P | None = kind.from_pins(ifname, st) if st.exists() else None
        self.new: P | None = None
        self.restore_old: Callable[[P], object] | None = None
        # Kept open for the whole attach, also for the undo steps.
        self.closing = contextlib.ExitStack()
        self._undo: list[Callable[[], object]] = []
        self.prog_id: int | None = None  # the new program's, once committed
        self.tag: str | None = None

    def on_failure(self, undo: Callable[[], object]) -> None:
        self._undo.append(undo)

    def commit(self, attachment: dict[str, Any], config: dict[str, Any]) -> None:
        """The new program runs: its pins become the current ones, and the
        metadata says how it is attached (ATTACHMENT) and what config it
        runs (CONFIG, see config_meta)."""
        assert self.new is not None
        self.new.commit_pin(self.st)
        self.st.write_meta(attach_meta(self.kind.ROLE, self.ifname, self.idx, attachment, config))
        self.prog_id, self.tag = self.new.prog.id, self.new.prog.tag

    def result(self, **fields: Any) -> dict[str, Any]:
        """What a committed attach returns: where, which program now runs
        there, then FIELDS."""
        return {
            "ifname": self.ifname,
            "ifindex": self.idx,
            "role": self.kind.ROLE,
            "prog_id": self.prog_id,
            "tag": self.tag,
            **fields,
        }

    def __enter__(self) -> Self:
        return self

    def __exit__(self, typ: type[BaseException] | None, *exc: object) -> None:
        try:
            if typ is not None:
                for undo in reversed(self._undo):
                    undo()
                self.kind.unpin_staged(self.st)
                if self.old is None:
                    self.st.remove()
                elif self.new is not None and self.restore_old is not None:
                    with contextlib.suppress(Exception):
                        self.restore_old(self.old)
        finally:
            self.closing.close()
            if self.new is not None:
                self.new.close()
            if self.old is not None:
                self.old.close()


# --------------------------------------------------------------------------
# metadata


def attach_meta(
    role: str, ifname: str, idx: int, attachment: dict[str, Any], config: dict[str, Any]
) -> dict[str, Any]:
    """The metadata of a fresh attachment: who and where, how it is attached
    (ATTACHMENT), when, and what config it runs (CONFIG, see config_meta)."""
    return {
        "version": state.META_VERSION,
        "role": role,
        "ifname": ifname,
        "ifindex": idx,
        "netns": state.this_netns().as_meta(),
        **attachment,
        "attached_at": state.now_iso(),
        **config,
    }


def config_meta(cfg: Config) -> dict[str, Any]:
    """What the metadata says about CFG for every role (never key bytes)."""
    return {
        "config": os.path.abspath(cfg.path),
        "applied_at": state.now_iso(),
        "option": {"kind": cfg.option.kind, "exid": cfg.option.exid},
        "keys": [
            {
                "id": k.id,
                "window": k.window,
                "bind": list(k.bind),
                "file": str(k.file),
                "mark_from": None if k.mark_from is None else iso(k.mark_from),
            }
            for k in sorted(cfg.keys.values(), key=lambda k: k.id)
        ],
    }


# --------------------------------------------------------------------------
# a pinned program as a role of the generic status / stats / monitor views


def bind_names(mask: int) -> list[str]:
    return [
        n for n, bit in (("saddr", layout.BIND_SADDR), ("sport", layout.BIND_SPORT)) if mask & bit
    ]


def fmt_ts(ts_ns: int, offset_ns: int) -> str:
    t = _dt.datetime.fromtimestamp((ts_ns + offset_ns) / 1e9, _dt.UTC)
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def live_keys(path: str, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The keys in the nt_keys pinned at PATH (never their bytes), with the files
    the metadata names for them and the fingerprint of what the kernel
    really holds (a key file changed since does not show here)."""
    files = {k.get("id"): k.get("file") for k in meta.get("keys", [])}
    keys = []
    with Map.from_pinned(path) as m:
        for kid in range(layout.MAX_KEYS):
            raw = m.lookup(u32(kid))
            k = layout.NtKey.from_bytes(raw) if raw else None
            if k is not None and k.window:
                keys.append(
                    {
                        "id": kid,
                        "window": k.window,
                        "bind": bind_names(k.bind),
                        "file": files.get(kid),
                        "fingerprint": key_fingerprint_int(k.k0, k.k1),
                    }
                )
    return keys


class ProgramRole:
    """One role (marker, guard) as the CLI, the agent and the exporter drive
    it: attach, apply and detach on an interface, and the status, counters
    and events of what is pinned (netoken/roles.py lists them).

    Subclasses name their PinnedProgram, implement the lifecycle, and say
    how to find what runs on the hook (:meth:`attachment`), what else their
    status holds (:meth:`status_details`) and what their events carry
    (:meth:`event_fields`).  Everything else has a default here, so callers
    never ask a role whether it has a method.
    """

    name: str
    PROGRAM: ClassVar[type[PinnedProgram]]
    # What runs another program: "filter" (tc), "XDP"; an attachment may
    # say otherwise ("runs" in its status section).
    RUNS: ClassVar[str]
    # Whether the role's events pass an in-kernel rate limit, whose
    # withheld events `monitor` reports (see suppressed_events).
    RATE_LIMITED: ClassVar[bool] = False

    def __init__(self) -> None:
        # netns cookie -> (when, shared bytes, instances): see memory()
        self._shared_memory: dict[int, tuple[float, int, int]] = {}

    # -- lifecycle ----------------------------------------------------------

    def check(self, cfg: Config) -> None:
        """Raise ConfigError if CFG cannot be attached in this role (no kernel access)."""
        raise NotImplementedError

    def check_apply(self, cfg: Config) -> None:
        """Raise ConfigError if CFG cannot be applied to this role where it
        is attached already (no kernel access)."""
        self.check(cfg)

    def attach(self, ifname: str, cfg: Config, **opts: Any) -> dict[str, Any]:
        """Load, configure, pin and attach on IFNAME (atomic replace)."""
        raise NotImplementedError

    def apply(self, ifname: str, cfg: Config, now: float | None = None) -> dict[str, Any]:
        """Make the live maps of IFNAME's pinned program hold CFG (key
        schedule as of NOW); no reattach."""
        raise NotImplementedError

    def detach(self, ifname: str) -> dict[str, Any]:
        """Remove the program and its pins from IFNAME."""
        raise NotImplementedError

    def state_of(self, ifname: str) -> RoleState:
        return self.PROGRAM.state_of(ifname)

    # -- status, counters, events -------------------------------------------

    def attachment(
        self, idx: int | None, meta: dict[str, Any]
    ) -> tuple[int | None, dict[str, Any]]:
        """(id of the program on IDX's hook or None, the status "attach" section)."""
        raise NotImplementedError

    def status_details(self, st: RoleState, meta: dict[str, Any], d: dict[str, Any]) -> None:
        """Add the role's own sections to the status D."""
        raise NotImplementedError

    def event_fields(self, st: RoleState) -> Callable[[Any], dict[str, Any]]:
        """A function from one EVENT to its JSON-able fields (after time,
        ifname and role)."""
        raise NotImplementedError

    def meta(self, st: RoleState) -> dict[str, Any]:
        """ST's metadata as status reads it (a role with shared state adds
        what is described once for the namespace)."""
        return st.read_meta() or {}

    def status(self, st: RoleState) -> dict[str, Any]:
        meta = self.meta(st)
        d: dict[str, Any] = {"ifname": st.ifname, "ifindex": st.ifindex, "role": self.name}
        attached_as = st.attached_as()
        if attached_as and attached_as != st.ifname:
            d["attached_as"] = attached_as
        with Program.from_pinned(st.pin(PROG_PIN)) as prog:
            d["prog"] = {"id": prog.id, "tag": prog.tag, "name": prog.name}
        idx = st.ifindex if st.present else None
        live, attach = self.attachment(idx, meta)
        d["attach"] = attach
        if idx is None:
            d["state"] = "interface missing"
        elif live is None:
            d["state"] = "not attached"
        elif live != d["prog"]["id"]:
            d["state"] = f"{attach.get('runs') or self.RUNS} runs prog {live}, not the pinned one"
        else:
            d["state"] = "attached"
        d["attached"] = d["state"] == "attached"
        d["pinned"] = str(st.pin_dir)
        d["netns"] = {**st.netns.as_meta(), "name": state.netns_name(st.netns)}
        d["memory"] = self.memory(st)
        d["config"] = meta.get("config")
        d["attached_at"] = meta.get("attached_at")
        d["applied_at"] = meta.get("applied_at")
        self.status_details(st, meta, d)
        return d

    def memory(self, st: RoleState) -> dict[str, Any]:
        """Kernel memory of ST's maps (memlock, as `bpftool map show`):
        its own, and what it shares with the role's other instances in the
        namespace (counted once there, not in "own")."""
        own = st.memlock()
        if not self.PROGRAM.SHARED_MAPS:
            return {"own": own}
        if any(st.has_pin(n) for n in self.PROGRAM.SHARED_MAPS):
            return {"own": own, "shared": 0, "shared_by": 0}
        # The same for every instance of the namespace: read once a second,
        # not once per interface (status and each scrape list them all).
        key = st.netns.cookie
        now = time.monotonic()
        hit = self._shared_memory.get(key)
        if hit is None or now - hit[0] > 1.0:
            users = state.role_count(st.netns, self.name, st.root)
            hit = (now, self.PROGRAM.shared_state(st).memlock(), users)
            self._shared_memory[key] = hit
        return {"own": own, "shared": hit[1], "shared_by": hit[2]}

    def map_path(self, st: RoleState, name: str) -> str:
        path = self.PROGRAM.map_pin(st, name)
        if path is None:
            raise self.PROGRAM.Error(f"pinned {self.name} state in {st.pin_dir} has no {name}")
        return path

    def pinned_config(self, st: RoleState) -> Any:
        """The CONFIG_STRUCT of ST's pinned CONFIG_MAP."""
        with Map.from_pinned(self.map_path(st, self.PROGRAM.CONFIG_MAP)) as m:
            return self.PROGRAM.read_config(m)

    def stats(self, st: RoleState) -> dict[str, int]:
        with Map.from_pinned(st.pin(self.PROGRAM.STATS_MAP)) as m:
            return percpu_counters(m, self.PROGRAM.REASONS)

    def stats_extra(self, st: RoleState) -> dict[str, Any]:
        """More JSON sections next to "counters" in `stats` (none by default)."""
        return {}

    def lost_events(self, st: RoleState) -> int:
        return self.stats(st)["events_lost"]

    def suppressed_events(self, st: RoleState) -> int:
        """Events withheld on purpose by the in-kernel rate limit (the
        packets were still counted); 0 for a role without one."""
        return 0

    def events_id(self, st: RoleState) -> int:
        """The id of ST's event ring: instances that share one have one reader."""
        with Map.from_pinned(self.map_path(st, self.PROGRAM.EVENTS_MAP)) as m:
            return m.id

    def open_events(
        self, st: RoleState, callback: Callable[[dict[str, Any]], None]
    ) -> ListeningRing:
        """A reader of ST's event ring.  A ring of ST alone names ST's
        interface in every event; a ring the namespace's instances share
        names the interface the event happened on (by its name now)."""
        fields = self.event_fields(st)
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; events show wall-clock time.
        offset = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.monotonic_ns()
        event_type = self.PROGRAM.EVENT
        shared = self.PROGRAM.EVENTS_MAP in self.PROGRAM.SHARED_MAPS and not st.has_pin(
            self.PROGRAM.EVENTS_MAP
        )
        names: dict[int, str] = {st.ifindex: st.ifname}

        def name(idx: int) -> str:
            if not shared:
                return st.ifname
            if idx not in names:
                try:
                    names[idx] = socket.if_indextoname(idx)
                except OSError:
                    names[idx] = f"ifindex {idx}"
            return names[idx]

        def on_event(data: bytes) -> None:
            e = event_type.from_bytes(data)
            callback(
                {
                    "time": fmt_ts(e.ts_ns, offset),
                    "ifname": name(e.ifindex),
                    "ifindex": e.ifindex,
                    "role": self.name,
                    **fields(e),
                }
            )

        with Map.from_pinned(self.map_path(st, self.PROGRAM.EVENTS_MAP)) as m:
            return ListeningRing(Map.from_fd(os.dup(m.fd)), on_event, self.listen_maps(st))

    def listen_maps(self, st: RoleState) -> list[Map]:
        """The heartbeat map of ST's pinned program, if it has one."""
        with Program.from_pinned(st.pin(PROG_PIN)) as prog:
            m = listen_map(prog)
        return [m] if m is not None else []

    def ghosts(self, pinned: set[int]) -> list[dict[str, Any]]:
        """netoken programs of this role attached in this namespace to an
        interface without pinned state (not in PINNED, a set of ifindexes):
        pins removed by hand, or lost to a crash or an old bug.  Found by
        the hook netoken uses and the program's name."""
        out = []
        for idx, ifname in socket.if_nameindex():
            if idx in pinned:
                continue
            with contextlib.suppress(Exception):
                live, attach = self.attachment(idx, {})
                if live is None:
                    continue
                with Program.from_id(live) as prog:
                    if prog.name != self.PROGRAM.PROG_NAME:
                        continue
                    out.append(
                        {
                            "ifname": ifname,
                            "ifindex": idx,
                            "role": self.name,
                            "state": "ghost",
                            "attached": True,
                            "ghost": True,
                            "pinned": None,
                            "prog": {"id": prog.id, "tag": prog.tag, "name": prog.name},
                            "attach": attach,
                            "remove": f"netoken {self.PROGRAM.VERB} detach {ifname}",
                        }
                    )
        return out
