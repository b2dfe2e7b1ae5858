"""Maps, programs and ELF objects: the fds netoken works with.

A :class:`BpfObject` owns every map/program fd it created; they are closed by
:meth:`BpfObject.close` (``bpf_object__close``).  :class:`Map` and
:class:`Program` instances obtained from an object *borrow* those fds: they
keep the Python object alive, but once the object is closed explicitly their
``fd`` raises ``ValueError``.  Their ``close()`` only drops the borrow.  To
keep a map/program beyond the object, pin it or use ``from_id``.  Instances
created with ``from_pinned`` / ``from_id`` / ``from_fd(owned=True)`` own
their fd and close it in ``close()`` (or on garbage collection).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import functools
import os
from collections.abc import Callable, Iterator
from ctypes import Structure, c_uint32, sizeof
from typing import Any, ClassVar, NamedTuple, Self, TypeVar, Union, cast

from ..errors import BPFError
from .ffi import (
    BPF_ANY,
    BPF_OBJ_NAME_LEN,
    PERCPU_MAP_TYPES,
    bpf_map_info,
    bpf_prog_info,
    bpf_test_run_opts,
    call,
    call_ptr,
    error,
    lib,
    make_opts,
)

FdLike = Union[int, "Map", "Program"]


def as_fd(obj: FdLike) -> int:
    if isinstance(obj, (Map, Program)):
        return obj.fd
    if isinstance(obj, bool) or not isinstance(obj, int):
        raise TypeError(f"expected an fd, Map or Program, got {type(obj).__name__}")
    return obj


def _as_bytes(what: str, b: object) -> bytes:
    # bytes(int) would silently make a zero buffer of that length.
    if isinstance(b, int):
        raise TypeError(f"{what} must be bytes-like, not int")
    return bytes(b)  # type: ignore[call-overload]


def _fd_kind(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _check_kind(fd: int, expect: str, what: str) -> None:
    kind = _fd_kind(fd)
    if kind is not None and kind != f"anon_inode:bpf-{expect}":
        raise ValueError(f"{what} is not a BPF {expect} ({kind})")


def _get_info(fd: int, struct: type[Structure], what: str) -> Structure:
    info = struct()
    n = c_uint32(sizeof(info))
    call(
        f"get info of {what}",
        lib.bpf_obj_get_info_by_fd,
        fd,
        ctypes.byref(info),
        ctypes.byref(n),
    )
    return info


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


@functools.cache
def num_possible_cpus() -> int:
    """Number of possible CPUs (sizes per-CPU map values)."""
    return call("get number of possible CPUs", lib.libbpf_num_possible_cpus)


def probe_helper(prog_type: int, helper_id: int) -> bool:
    """Whether this kernel lets programs of PROG_TYPE call BPF helper
    HELPER_ID (libbpf loads a two-instruction program and reads the verifier's
    answer), so that features are found, not inferred from version strings."""
    return bool(
        call(
            f"probe BPF helper #{helper_id}",
            lib.libbpf_probe_bpf_helper,
            prog_type,
            helper_id,
            None,
        )
    )


BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type


@contextlib.contextmanager
def run_time_stats() -> Iterator[None]:
    """Have the kernel count runs and run time of every BPF program while the
    block runs (``Program.run_stats``).

    BPF_ENABLE_STATS hands back an fd and the accounting stays on only while
    some such fd is open, so an interrupted caller cannot leave it on (unlike
    the kernel.bpf_stats_enabled sysctl).  It costs two clock reads per run.
    """
    fd = call("enable BPF run-time stats", lib.bpf_enable_stats, BPF_STATS_RUN_TIME)
    try:
        yield
    finally:
        _close_fd(fd)


class ProgStats(NamedTuple):
    """Runs and total run time the kernel counted (see run_time_stats)."""

    run_cnt: int
    run_time_ns: int


def _round8(n: int) -> int:
    return (n + 7) & ~7


def obj_pin(fd: FdLike, path: str) -> None:
    """Pin a map/program fd at ``path`` on bpffs."""
    call(f"pin fd at {path}", lib.bpf_obj_pin, as_fd(fd), os.fsencode(path))


def obj_get(path: str) -> int:
    """Open a pinned object; the caller owns the returned fd."""
    return call(f"open pinned object {path}", lib.bpf_obj_get, os.fsencode(path))


def unpin(path: str) -> None:
    """Remove a bpffs pin; a missing pin is not an error."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------


def _decode_name(raw: bytes | None) -> str:
    return (raw or b"").decode()


def _attr(
    from_ptr: Callable[[int], object],
    field: str,
    convert: Callable[[Any], object] = lambda v: v,
    doc: str = "",
) -> property:
    """An attribute libbpf knows for a borrowed object (``from_ptr``) and the
    kernel's info struct knows (``field``) for an fd opened on its own."""

    def get(self: _KernelObject) -> object:
        if self._ptr is not None:
            return convert(from_ptr(self._ptr))
        return convert(getattr(self._loaded_info(), field))

    return property(get, doc=doc)


class Closing:
    """Closed when a with block ends, or when garbage collected."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class _KernelObject(Closing):
    """What maps and programs share: an fd that is either borrowed from a
    :class:`BpfObject` (``ptr`` set) or owned, and the kernel's info for it.

    Subclasses name their kind and the libbpf accessors for it (class
    keywords, see __init_subclass__)."""

    _KIND: ClassVar[str]
    _NOUN: ClassVar[str]
    _INFO: ClassVar[type[Structure]]
    _fd_by_id: ClassVar[Callable[[int], int]]
    _ptr_fd: ClassVar[Callable[[int], int]]

    def __init_subclass__(
        cls,
        *,
        kind: str,
        noun: str,
        info: type[Structure],
        fd_by_id: Callable[[int], int],
        ptr_fd: Callable[[int], int],
        **kw: Any,
    ) -> None:
        """KIND as in the fd's anon-inode name ("map", "prog"), NOUN for
        messages, the kernel's INFO struct, and libbpf's FD_BY_ID (the fd of
        an id) and PTR_FD (the fd of an object's map or program)."""
        super().__init_subclass__(**kw)
        cls._KIND, cls._NOUN, cls._INFO = kind, noun, info
        cls._fd_by_id = staticmethod(fd_by_id)
        cls._ptr_fd = staticmethod(ptr_fd)

    def __init__(
        self,
        fd: int,
        *,
        owned: bool,
        obj: BpfObject | None = None,
        ptr: int | None = None,
    ) -> None:
        # Private: use BpfObject.map()/program(), from_fd(), from_pinned() or from_id().
        self._fd = fd
        self._owned = owned
        self._obj = obj  # keeps the owning bpf_object alive
        self._ptr = ptr  # struct bpf_map/bpf_program * when borrowed from an object
        self._info = None
        if ptr is None:
            try:
                self._info = _get_info(fd, self._INFO, f"{self._NOUN} fd {fd}")
            except BaseException:
                if owned:
                    _close_fd(fd)
                raise

    # -- construction -------------------------------------------------------

    @classmethod
    def from_fd(cls, fd: int, owned: bool = True) -> Self:
        """Wrap an existing fd; with ``owned`` the wrapper closes it."""
        _check_kind(fd, cls._KIND, f"fd {fd}")
        return cls(fd, owned=owned)

    @classmethod
    def from_pinned(cls, path: str) -> Self:
        """Open an object of this kind pinned on bpffs."""
        fd = call(f"open pinned {cls._NOUN} {path}", lib.bpf_obj_get, os.fsencode(path))
        try:
            _check_kind(fd, cls._KIND, path)
        except ValueError:
            _close_fd(fd)
            raise
        return cls(fd, owned=True)

    @classmethod
    def from_id(cls, obj_id: int) -> Self:
        """Open by kernel id (needs CAP_SYS_ADMIN)."""
        fd = call(f"open {cls._NOUN} id {obj_id}", cls._fd_by_id, obj_id)
        return cls(fd, owned=True)

    # -- attributes ---------------------------------------------------------

    def _label(self) -> str:
        try:
            return f"{self._NOUN} '{self.name}'"
        except ValueError:
            return self._NOUN

    name: str  # each subclass defines it with _attr()

    @property
    def fd(self) -> int:
        """The fd (borrowed from the object unless this wrapper owns it)."""
        if self._obj is not None and self._obj.closed:
            raise ValueError(f"{self._label()}: its BpfObject is closed")
        if self._ptr is not None and self._fd < 0:
            fd = type(self)._ptr_fd(self._ptr)
            if fd < 0:
                raise ValueError(f"{self._label()}: BpfObject not loaded yet")
            self._fd = fd
        if self._fd < 0:
            raise ValueError(f"{self._NOUN} is closed")
        return self._fd

    def _loaded_info(self) -> Any:  # bpf_map_info or bpf_prog_info
        if self._info is None:
            self._info = _get_info(self.fd, self._INFO, self._label())
        return self._info

    @property
    def id(self) -> int:
        return self._loaded_info().id

    # -- lifetime -----------------------------------------------------------

    def pin(self, path: str) -> None:
        """Pin at ``path`` on bpffs."""
        call(f"pin {self._label()} at {path}", lib.bpf_obj_pin, self.fd, os.fsencode(path))

    def close(self) -> None:
        """Close an owned fd; for a borrowed one just drop the borrow."""
        fd, self._fd = self._fd, -1
        if self._owned and fd >= 0:
            _close_fd(fd)
        self._owned = False
        self._obj = None
        self._ptr = None


class Map(
    _KernelObject,
    kind="map",
    noun="map",
    info=bpf_map_info,
    fd_by_id=lib.bpf_map_get_fd_by_id,
    ptr_fd=lib.bpf_map__fd,
):
    """A BPF map, either borrowed from a :class:`BpfObject` or owning its fd.

    Keys and values are raw bytes (any bytes-like object, e.g. a ctypes
    structure, is accepted) and must match ``key_size``/``value_size``.
    """

    name = _attr(lib.bpf_map__name, "name", _decode_name)
    type = _attr(lib.bpf_map__type, "type", doc="enum bpf_map_type.")
    key_size = _attr(lib.bpf_map__key_size, "key_size")
    value_size = _attr(
        lib.bpf_map__value_size,
        "value_size",
        doc="Size of one value (for per-CPU maps: of one CPU's value).",
    )
    max_entries = _attr(lib.bpf_map__max_entries, "max_entries")

    @property
    def is_percpu(self) -> bool:
        return self.type in PERCPU_MAP_TYPES

    # -- element access -----------------------------------------------------

    def _key(self, key: object) -> bytes:
        k = _as_bytes("key", key)
        if len(k) != self.key_size:
            raise ValueError(f"{self._label()}: key is {len(k)} bytes, key_size is {self.key_size}")
        return k

    def _value(self, value: object) -> bytes:
        v = _as_bytes("value", value)
        if len(v) != self.value_size:
            raise ValueError(
                f"{self._label()}: value is {len(v)} bytes, value_size is {self.value_size}"
            )
        return v

    def _require_percpu(self, percpu: bool) -> None:
        if self.is_percpu != percpu:
            hint = "lookup_percpu/update_percpu" if self.is_percpu else "lookup/update"
            raise TypeError(f"{self._label()}: use {hint} for this map type")

    def lookup(self, key: bytes) -> bytes | None:
        """Value for ``key``, or None if absent."""
        self._require_percpu(False)
        k = self._key(key)
        buf = ctypes.create_string_buffer(self.value_size)
        ret = lib.bpf_map_lookup_elem(self.fd, k, buf)
        if ret == -_errno.ENOENT:
            return None
        if ret < 0:
            raise BPFError(-ret, f"lookup in {self._label()}")
        return buf.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """Create or update an element (``flags``: BPF_ANY/NOEXIST/EXIST/F_LOCK)."""
        self._require_percpu(False)
        k, v = self._key(key), self._value(value)
        ret = lib.bpf_map_update_elem(self.fd, k, v, flags)
        if ret < 0:
            raise BPFError(-ret, f"update {self._label()}")

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was absent."""
        k = self._key(key)
        ret = lib.bpf_map_delete_elem(self.fd, k)
        if ret == -_errno.ENOENT:
            return False
        if ret < 0:
            raise BPFError(-ret, f"delete from {self._label()}")
        return True

    def keys(self) -> Iterator[bytes]:
        """Iterate keys.  Deleting while iterating a hash map may restart the
        walk from the beginning; materialize with list() first."""
        fd = self.fd
        ks = self.key_size
        nxt = ctypes.create_string_buffer(ks)
        prev: bytes | None = None
        while True:
            ret = lib.bpf_map_get_next_key(fd, prev, nxt)
            if ret == -_errno.ENOENT:
                return
            if ret < 0:
                raise BPFError(-ret, f"iterate {self._label()}")
            prev = nxt.raw
            yield prev

    def items(self) -> Iterator[tuple[bytes, bytes | list[bytes]]]:
        """Iterate (key, value); per-CPU maps yield a list of per-CPU values.
        Keys deleted concurrently are skipped."""
        get = self.lookup_percpu if self.is_percpu else self.lookup
        for k in self.keys():
            v = get(k)
            if v is not None:
                yield k, v

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    def batches(self, chunk: int = 65536) -> Iterator[tuple[bytes, bytes, int]]:
        """(keys, values, n) of every entry, N at a time, each as one buffer of
        N keys and one of N values, read by BPF_MAP_LOOKUP_BATCH: a million-
        entry array in a few dozen syscalls instead of a million lookups.
        Arrays come in key order.  Not for per-CPU maps."""
        self._require_percpu(False)
        ks, vs = self.key_size, self.value_size
        keys = ctypes.create_string_buffer(ks * chunk)
        vals = ctypes.create_string_buffer(vs * chunk)
        # The batch position is opaque to user space; a key-sized buffer holds it.
        pos_in, pos_out = ctypes.create_string_buffer(ks), ctypes.create_string_buffer(ks)
        first = True
        while True:
            count = c_uint32(chunk)
            ret = lib.bpf_map_lookup_batch(
                self.fd, None if first else pos_in, pos_out, keys, vals, ctypes.byref(count), None
            )
            if ret < 0 and ret != -_errno.ENOENT:
                raise BPFError(-ret, f"batch lookup in {self._label()}")
            n = count.value
            if n:
                yield keys.raw[: n * ks], vals.raw[: n * vs], n
            if ret == -_errno.ENOENT:  # that was the last batch
                return
            ctypes.memmove(pos_in, pos_out, ks)
            first = False

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """One value per possible CPU for ``key``, or None if absent."""
        self._require_percpu(True)
        k = self._key(key)
        vs, stride, n = self.value_size, _round8(self.value_size), num_possible_cpus()
        buf = ctypes.create_string_buffer(stride * n)
        ret = lib.bpf_map_lookup_elem(self.fd, k, buf)
        if ret == -_errno.ENOENT:
            return None
        if ret < 0:
            raise BPFError(-ret, f"lookup in {self._label()}")
        raw = buf.raw
        return [raw[i * stride : i * stride + vs] for i in range(n)]

    def update_percpu(self, key: bytes, values: list[bytes], flags: int = BPF_ANY) -> None:
        """Set each CPU's value; ``values`` must have num_possible_cpus() items."""
        self._require_percpu(True)
        k = self._key(key)
        n = num_possible_cpus()
        if len(values) != n:
            raise ValueError(
                f"{self._label()}: got {len(values)} values, need one per possible CPU ({n})"
            )
        stride = _round8(self.value_size)
        blob = b"".join(self._value(v).ljust(stride, b"\0") for v in values)
        ret = lib.bpf_map_update_elem(self.fd, k, blob, flags)
        if ret < 0:
            raise BPFError(-ret, f"update {self._label()}")

    def __repr__(self) -> str:
        try:
            return (
                f"<Map {self.name!r} type={self.type} key={self.key_size} "
                f"value={self.value_size} max={self.max_entries} fd={self._fd}>"
            )
        except Exception:  # noqa: BLE001 - repr must not fail
            return f"<Map fd={self._fd}>"


# --------------------------------------------------------------------------
# programs
# --------------------------------------------------------------------------


class TestRun(NamedTuple):
    """Result of :meth:`Program.test_run` (``duration_ns`` is per repetition)."""

    retval: int
    data_out: bytes
    duration_ns: int
    ctx_out: bytes | None


TestRun.__test__ = False  # type: ignore[attr-defined]  # not a pytest class


class Program(
    _KernelObject,
    kind="prog",
    noun="program",
    info=bpf_prog_info,
    fd_by_id=lib.bpf_prog_get_fd_by_id,
    ptr_fd=lib.bpf_program__fd,
):
    """A loaded BPF program, borrowed from a :class:`BpfObject` or owning its fd."""

    # Full name for object programs; kernel names are cut to 15 chars.
    name = _attr(lib.bpf_program__name, "name", _decode_name)
    type = _attr(lib.bpf_program__type, "type", doc="enum bpf_prog_type.")

    @property
    def tag(self) -> str:
        return bytes(self._loaded_info().tag).hex()

    def run_stats(self) -> ProgStats:
        """Runs and run time so far; counted only while run_time_stats() is on."""
        info = _get_info(self.fd, bpf_prog_info, self._label())
        return ProgStats(info.run_cnt, info.run_time_ns)

    def map_ids(self) -> list[int]:
        """Ids of the maps the program uses."""
        n = _get_info(self.fd, bpf_prog_info, self._label()).nr_map_ids
        ids = (c_uint32 * max(n, 1))()
        info = bpf_prog_info(nr_map_ids=n, map_ids=ctypes.addressof(ids))
        size = c_uint32(sizeof(info))
        call(
            f"get info of {self._label()}",
            lib.bpf_obj_get_info_by_fd,
            self.fd,
            ctypes.byref(info),
            ctypes.byref(size),
        )
        return list(ids[: min(n, info.nr_map_ids)])

    def map(self, name: str) -> Map | None:
        """The map called NAME (kernel names are cut to 15 chars) that the
        program uses, opened by id; None if it uses none of that name."""
        for map_id in self.map_ids():
            m = Map.from_id(map_id)
            if m.name == name[: BPF_OBJ_NAME_LEN - 1]:
                return m
            m.close()
        return None

    def test_run(
        self,
        data: bytes,
        repeat: int = 1,
        ctx: bytes | None = None,
        data_out_size: int | None = None,
    ) -> TestRun:
        """Run the program on ``data`` via BPF_PROG_TEST_RUN.

        ``data_out_size`` defaults to len(data) + 256 so programs that grow
        the packet fit; a too-small buffer fails with ENOSPC.
        """
        data = _as_bytes("data", data)
        if data_out_size is None:
            data_out_size = len(data) + 256
        din = ctypes.create_string_buffer(data, len(data)) if data else None
        dout = ctypes.create_string_buffer(data_out_size) if data_out_size else None
        opts = make_opts(
            bpf_test_run_opts,
            data_size_in=len(data),
            data_size_out=data_out_size,
            repeat=repeat,
        )
        opts.data_in = ctypes.addressof(din) if din is not None else None
        opts.data_out = ctypes.addressof(dout) if dout is not None else None
        cout = None
        if ctx is not None:
            ctx = _as_bytes("ctx", ctx)
            cin = ctypes.create_string_buffer(ctx, len(ctx))
            cout = ctypes.create_string_buffer(len(ctx))
            opts.ctx_in = ctypes.addressof(cin)
            opts.ctx_out = ctypes.addressof(cout)
            opts.ctx_size_in = opts.ctx_size_out = len(ctx)
        call(
            f"test run {self._label()}",
            lib.bpf_prog_test_run_opts,
            self.fd,
            ctypes.byref(opts),
        )
        return TestRun(
            retval=opts.retval,
            data_out=dout.raw[: opts.data_size_out] if dout is not None else b"",
            duration_ns=opts.duration,
            ctx_out=cout.raw[: opts.ctx_size_out] if cout is not None else None,
        )

    def test_runner(self, max_size: int = 2048) -> Callable[[bytes], tuple[int, bytes]]:
        """test_run(data) -> (retval, data_out) for packet after packet of at
        most MAX_SIZE bytes, with buffers and options set up once: a quarter
        of test_run()'s cost per call, for tests that run a million packets."""
        din = ctypes.create_string_buffer(max_size)
        dout = ctypes.create_string_buffer(max_size)
        opts = make_opts(bpf_test_run_opts, repeat=1)
        opts.data_in = ctypes.addressof(din)
        opts.data_out = ctypes.addressof(dout)
        ref, fd, op = ctypes.byref(opts), self.fd, f"test run {self._label()}"

        def run(data: bytes) -> tuple[int, bytes]:
            if len(data) > max_size:
                raise ValueError(f"{len(data)}-byte packet for a {max_size}-byte test runner")
            ctypes.memmove(din, data, len(data))
            opts.data_size_in, opts.data_size_out = len(data), max_size
            ret = lib.bpf_prog_test_run_opts(fd, ref)
            if ret < 0:
                raise error(-ret, op, [])
            return opts.retval, dout.raw[: opts.data_size_out]

        return run

    def __repr__(self) -> str:
        try:
            return f"<Program {self.name!r} type={self.type} fd={self._fd}>"
        except Exception:  # noqa: BLE001 - repr must not fail
            return f"<Program fd={self._fd}>"


# --------------------------------------------------------------------------
# objects
# --------------------------------------------------------------------------


K = TypeVar("K", bound="_KernelObject")


class BpfObject(Closing):
    """An ELF BPF object (``bpf_object``); owns all its map and program fds."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._ptr: int | None = None
        self._loaded = False
        # (Map or Program, its struct pointer) -> the one wrapper of it
        self._wrapped: dict[tuple[type, int], _KernelObject] = {}
        self._ptr = call_ptr(
            f"open bpf object {self.path}",
            lib.bpf_object__open_file,
            os.fsencode(self.path),
            None,
        )

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> BpfObject:
        """Open (parse, not load) a BPF ELF object file."""
        return cls(path)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def name(self) -> str:
        return (lib.bpf_object__name(self._live()) or b"").decode()

    def _live(self) -> int:
        if self._ptr is None:
            raise ValueError(f"bpf object {self.path} is closed")
        return self._ptr

    def _before_load(self, what: str) -> None:
        if self._loaded:
            raise ValueError(f"{what}: bpf object {self.path} is already loaded")

    def load(self) -> None:
        """Create maps and load/verify programs; raises BPFError with the
        verifier log on rejection."""
        ptr = self._live()
        self._before_load("load")
        call(f"load bpf object {os.path.basename(self.path)}", lib.bpf_object__load, ptr)
        self._loaded = True

    def close(self) -> None:
        """Close the object and every fd it owns (idempotent)."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            lib.bpf_object__close(ptr)

    def _wrap(self, kind: type[K], ptr: int) -> K:
        """The one wrapper of this object's map or program at PTR."""
        w = self._wrapped.get((kind, ptr))
        if w is None or w._ptr is None:
            w = self._wrapped[(kind, ptr)] = kind(-1, owned=False, obj=self, ptr=ptr)
        return cast(K, w)

    def _find(self, kind: type[K], find: Callable[[int, bytes], int], name: str) -> K:
        ptr = find(self._live(), name.encode())
        if not ptr:
            raise KeyError(f"no {kind._NOUN} {name!r} in {self.path}")
        return self._wrap(kind, ptr)

    def _every(self, kind: type[K], after: Callable[[int, int | None], int]) -> list[K]:
        obj, out, ptr = self._live(), [], None
        while ptr := after(obj, ptr):
            out.append(self._wrap(kind, ptr))
        return out

    def program(self, name: str) -> Program:
        """Program by (function) name; KeyError if absent."""
        return self._find(Program, lib.bpf_object__find_program_by_name, name)

    def map(self, name: str) -> Map:
        """Map by name; KeyError if absent."""
        return self._find(Map, lib.bpf_object__find_map_by_name, name)

    @property
    def programs(self) -> list[Program]:
        return self._every(Program, lib.bpf_object__next_program)

    @property
    def maps(self) -> list[Map]:
        """All maps, including libbpf's internal .data/.rodata/.bss maps."""
        return self._every(Map, lib.bpf_object__next_map)

    def reuse_map(self, name: str, fd_or_map: int | Map) -> None:
        """Make map ``name`` use an existing map instead of creating one
        (e.g. a pinned map shared between loads).  libbpf dups the fd, so the
        caller keeps ownership of ``fd_or_map``."""
        self._before_load(f"reuse map {name}")
        m = self.map(name)
        call(
            f"reuse fd for map '{name}' of {self.path}",
            lib.bpf_map__reuse_fd,
            m._ptr,
            as_fd(fd_or_map),
        )

    def set_map_max_entries(self, name: str, n: int) -> None:
        """Resize map ``name`` before load."""
        self._before_load(f"set max_entries of map {name}")
        m = self.map(name)
        call(
            f"set max_entries of map '{name}' of {self.path}",
            lib.bpf_map__set_max_entries,
            m._ptr,
            n,
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("loaded" if self._loaded else "opened")
        return f"<BpfObject {self.path!r} {state}>"
