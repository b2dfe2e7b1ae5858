"""ctypes binding over the system libbpf (libbpf.so.1, written against 1.1.2).

This is the only module in netoken that touches ctypes or raw pointers; the
rest of the package works with the Python objects defined here.

File descriptor ownership
-------------------------
* A :class:`BpfObject` owns every map/program fd it created; they are closed by
  :meth:`BpfObject.close` (``bpf_object__close``).  :class:`Map` and
  :class:`Program` instances obtained from an object *borrow* those fds: they
  keep the Python object alive, but once the object is closed explicitly their
  ``fd`` raises ``ValueError``.  Their ``close()`` only drops the borrow.
  To keep a map/program beyond the object, pin it or use ``from_id``.
* Instances created with ``from_pinned`` / ``from_id`` / ``from_fd(owned=True)``
  own their fd and close it in ``close()`` (or on garbage collection).

RLIMIT_MEMLOCK
--------------
Deliberately not touched here.  libbpf 1.x probes whether the kernel charges
BPF memory to the memory cgroup (5.11+) and only raises RLIMIT_MEMLOCK when it
does not, on the first map/program creation.  Raising it blindly would just
hide misconfiguration on old kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import functools
import logging
import os
import platform
import threading
from collections.abc import Callable, Iterator
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
    sizeof,
)
from typing import Any, NamedTuple, Self, Union

from .errors import BPFError, NetokenError

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_F_LOCK",
    "BPF_NOEXIST",
    "BPF_TC_EGRESS",
    "BPF_TC_INGRESS",
    "XDP_ATTACHED_DRV",
    "XDP_ATTACHED_HW",
    "XDP_ATTACHED_MULTI",
    "XDP_ATTACHED_NONE",
    "XDP_ATTACHED_SKB",
    "XDP_FLAGS_DRV_MODE",
    "XDP_FLAGS_HW_MODE",
    "XDP_FLAGS_REPLACE",
    "XDP_FLAGS_SKB_MODE",
    "XDP_FLAGS_UPDATE_IF_NOEXIST",
    "BPFError",
    "BpfObject",
    "Map",
    "ProgStats",
    "Program",
    "RingBuffer",
    "TcFilter",
    "TestRun",
    "XdpInfo",
    "num_possible_cpus",
    "obj_get",
    "obj_pin",
    "probe_helper",
    "run_time_stats",
    "tc_attach",
    "tc_detach",
    "tc_hook_create",
    "tc_hook_destroy",
    "tc_query",
    "unpin",
    "xdp_attach",
    "xdp_detach",
    "xdp_query",
]

logger = logging.getLogger("netoken.libbpf")

# --------------------------------------------------------------------------
# constants (linux/bpf.h, linux/if_link.h, bpf/libbpf.h)
# --------------------------------------------------------------------------

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
BPF_MAP_TYPE_RINGBUF = 27

_PERCPU_MAP_TYPES = frozenset(
    {
        BPF_MAP_TYPE_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        BPF_MAP_TYPE_LRU_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE,
    }
)

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6

BPF_TC_INGRESS = 1 << 0
BPF_TC_EGRESS = 1 << 1
BPF_TC_F_REPLACE = 1 << 0

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4

XDP_ATTACHED_NONE = 0
XDP_ATTACHED_DRV = 1
XDP_ATTACHED_SKB = 2
XDP_ATTACHED_HW = 3
XDP_ATTACHED_MULTI = 4

_LIBBPF_WARN, _LIBBPF_INFO, _LIBBPF_DEBUG = 0, 1, 2
_PY_LEVEL = {
    _LIBBPF_WARN: logging.WARNING,
    _LIBBPF_INFO: logging.INFO,
    _LIBBPF_DEBUG: logging.DEBUG,
}

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

# --------------------------------------------------------------------------
# struct layouts
# --------------------------------------------------------------------------
# The libbpf opts structs end in `size_t :0`, which only pads the struct to
# 8-byte alignment; ctypes rounds sizeof() up to the largest member's
# alignment, so the sizes below match C (checked in _check_layouts()).


class _bpf_map_info(Structure):  # linux/bpf.h
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("btf_id", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("_pad", c_uint32),
        ("map_extra", c_uint64),
    ]


class _bpf_prog_info(Structure):  # linux/bpf.h
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32),
        ("gpl_compatible", c_uint32),  # bitfield :1 + :31 pad, same storage
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("nr_jited_ksyms", c_uint32),
        ("nr_jited_func_lens", c_uint32),
        ("jited_ksyms", c_uint64),
        ("jited_func_lens", c_uint64),
        ("btf_id", c_uint32),
        ("func_info_rec_size", c_uint32),
        ("func_info", c_uint64),
        ("nr_func_info", c_uint32),
        ("nr_line_info", c_uint32),
        ("line_info", c_uint64),
        ("jited_line_info", c_uint64),
        ("nr_jited_line_info", c_uint32),
        ("line_info_rec_size", c_uint32),
        ("jited_line_info_rec_size", c_uint32),
        ("nr_prog_tags", c_uint32),
        ("prog_tags", c_uint64),
        ("run_time_ns", c_uint64),
        ("run_cnt", c_uint64),
        ("recursion_misses", c_uint64),
        ("verified_insns", c_uint32),
        ("attach_btf_obj_id", c_uint32),
        ("attach_btf_id", c_uint32),
        ("_pad", c_uint32),
    ]


class _bpf_test_run_opts(Structure):  # bpf/bpf.h
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class _bpf_tc_hook(Structure):  # bpf/libbpf.h
    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_int),  # enum bpf_tc_attach_point
        ("parent", c_uint32),
    ]


class _bpf_tc_opts(Structure):  # bpf/libbpf.h
    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
    ]


class _bpf_xdp_attach_opts(Structure):  # bpf/libbpf.h
    _fields_ = [
        ("sz", c_size_t),
        ("old_prog_fd", c_int),
    ]


class _bpf_xdp_query_opts(Structure):  # bpf/libbpf.h 1.1.2 (no feature_flags yet)
    _fields_ = [
        ("sz", c_size_t),
        ("prog_id", c_uint32),
        ("drv_prog_id", c_uint32),
        ("hw_prog_id", c_uint32),
        ("skb_prog_id", c_uint32),
        ("attach_mode", c_uint8),
    ]


def _check_layouts() -> None:
    expected = {
        _bpf_map_info: 88,
        _bpf_prog_info: 232,
        _bpf_test_run_opts: 80,
        _bpf_tc_hook: 24,
        _bpf_tc_opts: 32,
        _bpf_xdp_attach_opts: 16,
        _bpf_xdp_query_opts: 32,
    }
    for struct, size in expected.items():
        if sizeof(struct) != size:  # pragma: no cover - guards against edits
            raise ImportError(f"{struct.__name__}: sizeof {sizeof(struct)} != {size}")


_check_layouts()


def _opts(struct: type[Structure], **fields: int) -> Structure:
    # libbpf uses `sz` for ABI versioning and rejects non-zero bytes it does
    # not know about, so always start from a zeroed struct.
    o = struct()
    o.sz = sizeof(struct)
    for k, v in fields.items():
        setattr(o, k, v)
    return o


# --------------------------------------------------------------------------
# library loading and prototypes
# --------------------------------------------------------------------------

try:
    _lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
except OSError:
    # Only the verbs that touch the kernel import this module; the others
    # (decode, key, config, --help) keep working without libbpf.
    raise NetokenError(
        "libbpf.so.1 not found: install the libbpf1 package (apt-get install libbpf1)"
    ) from None
_libc = ctypes.CDLL(None, use_errno=True)

_PRINT_FN = CFUNCTYPE(c_int, c_int, c_void_p, c_void_p)
_SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


def _proto(name: str, restype: object, *argtypes: object) -> Callable[..., object]:
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


_libc.vsnprintf.restype = c_int
_libc.vsnprintf.argtypes = [c_void_p, c_size_t, c_void_p, c_void_p]

_set_print = _proto("libbpf_set_print", c_void_p, _PRINT_FN)
_num_possible_cpus = _proto("libbpf_num_possible_cpus", c_int)

_object_open_file = _proto("bpf_object__open_file", c_void_p, c_char_p, c_void_p)
_object_load = _proto("bpf_object__load", c_int, c_void_p)
_object_close = _proto("bpf_object__close", None, c_void_p)
_object_name = _proto("bpf_object__name", c_char_p, c_void_p)
_find_program = _proto("bpf_object__find_program_by_name", c_void_p, c_void_p, c_char_p)
_find_map = _proto("bpf_object__find_map_by_name", c_void_p, c_void_p, c_char_p)
_next_program = _proto("bpf_object__next_program", c_void_p, c_void_p, c_void_p)
_next_map = _proto("bpf_object__next_map", c_void_p, c_void_p, c_void_p)

_program_name = _proto("bpf_program__name", c_char_p, c_void_p)
_program_fd = _proto("bpf_program__fd", c_int, c_void_p)
_program_type = _proto("bpf_program__type", c_int, c_void_p)

_map_name = _proto("bpf_map__name", c_char_p, c_void_p)
_map_fd = _proto("bpf_map__fd", c_int, c_void_p)
_map_type = _proto("bpf_map__type", c_int, c_void_p)
_map_key_size = _proto("bpf_map__key_size", c_uint32, c_void_p)
_map_value_size = _proto("bpf_map__value_size", c_uint32, c_void_p)
_map_max_entries = _proto("bpf_map__max_entries", c_uint32, c_void_p)
_map_set_max_entries = _proto("bpf_map__set_max_entries", c_int, c_void_p, c_uint32)
_map_reuse_fd = _proto("bpf_map__reuse_fd", c_int, c_void_p, c_int)

_map_lookup_elem = _proto("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
_map_update_elem = _proto("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, c_uint64)
_map_delete_elem = _proto("bpf_map_delete_elem", c_int, c_int, c_void_p)
_map_get_next_key = _proto("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
_obj_pin = _proto("bpf_obj_pin", c_int, c_int, c_char_p)
_obj_get = _proto("bpf_obj_get", c_int, c_char_p)
_map_get_fd_by_id = _proto("bpf_map_get_fd_by_id", c_int, c_uint32)
_prog_get_fd_by_id = _proto("bpf_prog_get_fd_by_id", c_int, c_uint32)
_obj_get_info_by_fd = _proto("bpf_obj_get_info_by_fd", c_int, c_int, c_void_p, POINTER(c_uint32))
_prog_test_run_opts = _proto("bpf_prog_test_run_opts", c_int, c_int, POINTER(_bpf_test_run_opts))
_enable_stats = _proto("bpf_enable_stats", c_int, c_int)
_probe_bpf_helper = _proto("libbpf_probe_bpf_helper", c_int, c_int, c_int, c_void_p)

_tc_hook_create = _proto("bpf_tc_hook_create", c_int, POINTER(_bpf_tc_hook))
_tc_hook_destroy = _proto("bpf_tc_hook_destroy", c_int, POINTER(_bpf_tc_hook))
_tc_attach = _proto("bpf_tc_attach", c_int, POINTER(_bpf_tc_hook), POINTER(_bpf_tc_opts))
_tc_detach = _proto("bpf_tc_detach", c_int, POINTER(_bpf_tc_hook), POINTER(_bpf_tc_opts))
_tc_query = _proto("bpf_tc_query", c_int, POINTER(_bpf_tc_hook), POINTER(_bpf_tc_opts))

_xdp_attach = _proto("bpf_xdp_attach", c_int, c_int, c_int, c_uint32, POINTER(_bpf_xdp_attach_opts))
_xdp_detach = _proto("bpf_xdp_detach", c_int, c_int, c_uint32, POINTER(_bpf_xdp_attach_opts))
_xdp_query = _proto("bpf_xdp_query", c_int, c_int, c_int, POINTER(_bpf_xdp_query_opts))

_ring_buffer_new = _proto("ring_buffer__new", c_void_p, c_int, _SAMPLE_FN, c_void_p, c_void_p)
_ring_buffer_free = _proto("ring_buffer__free", None, c_void_p)
_ring_buffer_poll = _proto("ring_buffer__poll", c_int, c_void_p, c_int)
_ring_buffer_consume = _proto("ring_buffer__consume", c_int, c_void_p)
_ring_buffer_epoll_fd = _proto("ring_buffer__epoll_fd", c_int, c_void_p)


# --------------------------------------------------------------------------
# errors and log capture
# --------------------------------------------------------------------------

_VERIFIER_BEGIN = "-- BEGIN PROG LOAD LOG --"
_VERIFIER_END = "-- END PROG LOAD LOG --"
_TAIL_LINES = 20


def _log_tail(entries: list[tuple[int, str]]) -> str:
    """Pick what the user needs from a captured log: the end of the verifier
    log if there is one (the reason is at its end), else the last warnings."""
    text = "\n".join(msg for _, msg in entries)
    begin = text.rfind(_VERIFIER_BEGIN)
    if begin >= 0:
        end = text.find(_VERIFIER_END, begin)
        block = text[begin + len(_VERIFIER_BEGIN) : end if end >= 0 else None]
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if lines:
            return "verifier log (tail):\n" + "\n".join("  " + ln for ln in lines[-_TAIL_LINES:])
    warns = [
        ln for lvl, msg in entries if lvl == _LIBBPF_WARN for ln in msg.splitlines() if ln.strip()
    ]
    if warns:
        return "libbpf log (tail):\n" + "\n".join("  " + ln for ln in warns[-5:])
    return ""


_tls = threading.local()


def _capture_stack() -> list[list[tuple[int, str]]]:
    stack = getattr(_tls, "stack", None)
    if stack is None:
        stack = _tls.stack = []
    return stack


class _Capture(list):
    """Log entries of one operation.  With ``quiet`` they are only forwarded
    to logging by :meth:`flush`, so an expected failure (EEXIST on an
    existing qdisc...) does not print kernel warnings."""

    def __init__(self, quiet: bool) -> None:
        super().__init__()
        self.quiet = quiet

    def flush(self) -> None:
        for level, msg in self:
            logger.log(_PY_LEVEL.get(level, logging.DEBUG), "%s", msg)


@contextlib.contextmanager
def _capturing(quiet: bool = False) -> Iterator[_Capture]:
    buf = _Capture(quiet)
    stack = _capture_stack()
    stack.append(buf)
    try:
        yield buf
    finally:
        stack.pop()
    if getattr(_tls, "interrupted", False):
        # Ctrl-C arrived while libbpf was calling back into Python, where
        # ctypes would have swallowed it: deliver it now that C returned.
        _tls.interrupted = False
        raise KeyboardInterrupt


def _error(err: int, op: str, entries: list[tuple[int, str]]) -> BPFError:
    return BPFError(err, op, "\n".join(msg for _, msg in entries), _log_tail(entries))


def _call(op: str, fn: Callable[..., int], *args: object) -> int:
    """Call an int-returning libbpf API (libbpf 1.x: -errno on failure)."""
    with _capturing() as log:
        ret = fn(*args)
    if ret < 0:
        raise _error(-ret, op, log)
    return ret


def _call_ptr(op: str, fn: Callable[..., int | None], *args: object) -> int:
    """Call a pointer-returning libbpf API (libbpf 1.x: NULL + errno)."""
    with _capturing() as log:
        ptr = fn(*args)
        err = ctypes.get_errno()
    if not ptr:
        raise _error(err, op, log)
    return ptr


# va_list on x86-64 is `__va_list_tag[1]`, so the callback receives a pointer
# to a 24-byte struct that vsnprintf advances in place.  Formatting from a
# fresh copy each time (what va_copy does there) lets us retry with a bigger
# buffer -- verifier logs are routinely far larger than any fixed buffer.
_VA_LIST_COPYABLE = platform.machine() in ("x86_64", "AMD64")
_VA_LIST_SIZE = 24


def _vformat(fmt: int, ap: int) -> str:
    size = 1024
    if not _VA_LIST_COPYABLE:  # one shot: ap can only be consumed once
        buf = ctypes.create_string_buffer(1 << 16)
        _libc.vsnprintf(buf, len(buf), fmt, ap)
        return buf.value.decode("utf-8", "replace")
    saved = ctypes.string_at(ap, _VA_LIST_SIZE)
    while True:
        ap_copy = ctypes.create_string_buffer(saved, _VA_LIST_SIZE)
        buf = ctypes.create_string_buffer(size)
        n = _libc.vsnprintf(buf, size, fmt, ap_copy)
        if n < 0:
            return "<libbpf message formatting failed>"
        if n < size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n + 1


def _print_cb(level: int, fmt: int, ap: int) -> int:
    # Exceptions cannot propagate through C; never let one escape.  A Ctrl-C
    # is remembered and raised by _capturing() once the libbpf call returns.
    try:
        _print_cb_body(level, fmt, ap)
    except KeyboardInterrupt:
        _tls.interrupted = True
    except Exception:  # noqa: BLE001, S110 - logging must never break a libbpf call
        pass
    return 0


def interrupt_handler(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM handler for programs that use this module.

    Python runs signal handlers between bytecodes, which can be inside one
    of libbpf's callbacks into Python, where ctypes swallows exceptions.  So
    during a libbpf call the KeyboardInterrupt is deferred to the moment the
    call returns; otherwise it is raised at once, as Python's default does.
    """
    if getattr(_tls, "stack", None):
        _tls.interrupted = True
        return
    raise KeyboardInterrupt


def _print_cb_body(level: int, fmt: int, ap: int) -> None:
    stack = getattr(_tls, "stack", None)
    pylevel = _PY_LEVEL.get(level, logging.DEBUG)
    if not stack and not logger.isEnabledFor(pylevel):
        return
    msg = _vformat(fmt, ap).rstrip("\n")
    if stack:
        stack[-1].append((level, msg))
        if stack[-1].quiet:
            return
    logger.log(pylevel, "%s", msg)


# Module-level reference: libbpf keeps the raw pointer forever, so the
# trampoline must never be garbage collected.
_PRINT_CALLBACK = _PRINT_FN(_print_cb)
_set_print(_PRINT_CALLBACK)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

FdLike = Union[int, "Map", "Program"]


def _as_fd(obj: FdLike) -> int:
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
    _call(
        f"get info of {what}",
        _obj_get_info_by_fd,
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
    return _call("get number of possible CPUs", _num_possible_cpus)


def probe_helper(prog_type: int, helper_id: int) -> bool:
    """Whether this kernel lets programs of PROG_TYPE call BPF helper
    HELPER_ID (libbpf loads a two-instruction program and reads the verifier's
    answer), so that features are found, not inferred from version strings."""
    return bool(_call(f"probe BPF helper #{helper_id}", _probe_bpf_helper, prog_type, helper_id, None))


BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type


@contextlib.contextmanager
def run_time_stats() -> Iterator[None]:
    """Have the kernel count runs and run time of every BPF program while the
    block runs (``Program.run_stats``).

    BPF_ENABLE_STATS hands back an fd and the accounting stays on only while
    some such fd is open, so an interrupted caller cannot leave it on (unlike
    the kernel.bpf_stats_enabled sysctl).  It costs two clock reads per run.
    """
    fd = _call("enable BPF run-time stats", _enable_stats, BPF_STATS_RUN_TIME)
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
    _call(f"pin fd at {path}", _obj_pin, _as_fd(fd), os.fsencode(path))


def obj_get(path: str) -> int:
    """Open a pinned object; the caller owns the returned fd."""
    return _call(f"open pinned object {path}", _obj_get, os.fsencode(path))


def unpin(path: str) -> None:
    """Remove a bpffs pin; a missing pin is not an error."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------


def _decode_name(raw: bytes | None) -> str:
    return (raw or b"").decode()


def _attr(from_ptr: Callable[[int], object], field: str,
          convert: Callable[[object], object] = lambda v: v, doc: str = "") -> property:
    """An attribute libbpf knows for a borrowed object (``from_ptr``) and the
    kernel's info struct knows (``field``) for an fd opened on its own."""
    def get(self: _KernelObject) -> object:
        if self._ptr is not None:
            return convert(from_ptr(self._ptr))
        return convert(getattr(self._loaded_info(), field))
    return property(get, doc=doc)


class _KernelObject:
    """What maps and programs share: an fd that is either borrowed from a
    :class:`BpfObject` (``ptr`` set) or owned, and the kernel's info for it.

    Subclasses name their kind and the libbpf accessors for it."""

    _KIND = ""        # "map" or "prog", as in the fd's anon-inode name
    _NOUN = ""        # for messages
    _INFO: type[Structure]

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
        fd = _call(f"open pinned {cls._NOUN} {path}", _obj_get, os.fsencode(path))
        try:
            _check_kind(fd, cls._KIND, path)
        except ValueError:
            _close_fd(fd)
            raise
        return cls(fd, owned=True)

    @classmethod
    def from_id(cls, obj_id: int) -> Self:
        """Open by kernel id (needs CAP_SYS_ADMIN)."""
        fd = _call(f"open {cls._NOUN} id {obj_id}", cls._fd_by_id, obj_id)
        return cls(fd, owned=True)

    @staticmethod
    def _fd_by_id(obj_id: int) -> int:
        raise NotImplementedError

    @staticmethod
    def _ptr_fd(ptr: int) -> int:
        raise NotImplementedError

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
            fd = self._ptr_fd(self._ptr)
            if fd < 0:
                raise ValueError(f"{self._label()}: BpfObject not loaded yet")
            self._fd = fd
        if self._fd < 0:
            raise ValueError(f"{self._NOUN} is closed")
        return self._fd

    def _loaded_info(self) -> Any:  # _bpf_map_info or _bpf_prog_info
        if self._info is None:
            self._info = _get_info(self.fd, self._INFO, self._label())
        return self._info

    @property
    def id(self) -> int:
        return self._loaded_info().id

    # -- lifetime -----------------------------------------------------------

    def pin(self, path: str) -> None:
        """Pin at ``path`` on bpffs."""
        _call(f"pin {self._label()} at {path}", _obj_pin, self.fd, os.fsencode(path))

    def close(self) -> None:
        """Close an owned fd; for a borrowed one just drop the borrow."""
        fd, self._fd = self._fd, -1
        if self._owned and fd >= 0:
            _close_fd(fd)
        self._owned = False
        self._obj = None
        self._ptr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._owned and self._fd >= 0:
                os.close(self._fd)


class Map(_KernelObject):
    """A BPF map, either borrowed from a :class:`BpfObject` or owning its fd.

    Keys and values are raw bytes (any bytes-like object, e.g. a ctypes
    structure, is accepted) and must match ``key_size``/``value_size``.
    """

    _KIND = "map"
    _NOUN = "map"
    _INFO = _bpf_map_info
    _fd_by_id = staticmethod(_map_get_fd_by_id)
    _ptr_fd = staticmethod(_map_fd)

    name = _attr(_map_name, "name", _decode_name)
    type = _attr(_map_type, "type", doc="enum bpf_map_type.")
    key_size = _attr(_map_key_size, "key_size")
    value_size = _attr(_map_value_size, "value_size",
                       doc="Size of one value (for per-CPU maps: of one CPU's value).")
    max_entries = _attr(_map_max_entries, "max_entries")

    @property
    def is_percpu(self) -> bool:
        return self.type in _PERCPU_MAP_TYPES

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
        ret = _map_lookup_elem(self.fd, k, buf)
        if ret == -_errno.ENOENT:
            return None
        if ret < 0:
            raise BPFError(-ret, f"lookup in {self._label()}")
        return buf.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """Create or update an element (``flags``: BPF_ANY/NOEXIST/EXIST/F_LOCK)."""
        self._require_percpu(False)
        k, v = self._key(key), self._value(value)
        ret = _map_update_elem(self.fd, k, v, flags)
        if ret < 0:
            raise BPFError(-ret, f"update {self._label()}")

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was absent."""
        k = self._key(key)
        ret = _map_delete_elem(self.fd, k)
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
            ret = _map_get_next_key(fd, prev, nxt)
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

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """One value per possible CPU for ``key``, or None if absent."""
        self._require_percpu(True)
        k = self._key(key)
        vs, stride, n = self.value_size, _round8(self.value_size), num_possible_cpus()
        buf = ctypes.create_string_buffer(stride * n)
        ret = _map_lookup_elem(self.fd, k, buf)
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
        ret = _map_update_elem(self.fd, k, blob, flags)
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


class Program(_KernelObject):
    """A loaded BPF program, borrowed from a :class:`BpfObject` or owning its fd."""

    _KIND = "prog"
    _NOUN = "program"
    _INFO = _bpf_prog_info
    _fd_by_id = staticmethod(_prog_get_fd_by_id)
    _ptr_fd = staticmethod(_program_fd)

    # Full name for object programs; kernel names are cut to 15 chars.
    name = _attr(_program_name, "name", _decode_name)
    type = _attr(_program_type, "type", doc="enum bpf_prog_type.")

    @property
    def tag(self) -> str:
        return bytes(self._loaded_info().tag).hex()

    def run_stats(self) -> ProgStats:
        """Runs and run time so far; counted only while run_time_stats() is on."""
        info = _get_info(self.fd, _bpf_prog_info, self._label())
        return ProgStats(info.run_cnt, info.run_time_ns)

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
        opts = _opts(
            _bpf_test_run_opts,
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
        _call(
            f"test run {self._label()}",
            _prog_test_run_opts,
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
        opts = _opts(_bpf_test_run_opts, repeat=1)
        opts.data_in = ctypes.addressof(din)
        opts.data_out = ctypes.addressof(dout)
        ref, fd, op = ctypes.byref(opts), self.fd, f"test run {self._label()}"

        def run(data: bytes) -> tuple[int, bytes]:
            if len(data) > max_size:
                raise ValueError(f"{len(data)}-byte packet for a {max_size}-byte test runner")
            ctypes.memmove(din, data, len(data))
            opts.data_size_in, opts.data_size_out = len(data), max_size
            ret = _prog_test_run_opts(fd, ref)
            if ret < 0:
                raise _error(-ret, op, [])
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


class BpfObject:
    """An ELF BPF object (``bpf_object``); owns all its map and program fds."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._ptr: int | None = None
        self._loaded = False
        self._maps: dict[int, Map] = {}
        self._progs: dict[int, Program] = {}
        self._ptr = _call_ptr(
            f"open bpf object {self.path}",
            _object_open_file,
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
        return (_object_name(self._live()) or b"").decode()

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
        _call(f"load bpf object {os.path.basename(self.path)}", _object_load, ptr)
        self._loaded = True

    def close(self) -> None:
        """Close the object and every fd it owns (idempotent)."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _object_close(ptr)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _wrap_map(self, ptr: int) -> Map:
        m = self._maps.get(ptr)
        if m is None or m._ptr is None:
            m = self._maps[ptr] = Map(-1, owned=False, obj=self, ptr=ptr)
        return m

    def _wrap_prog(self, ptr: int) -> Program:
        p = self._progs.get(ptr)
        if p is None or p._ptr is None:
            p = self._progs[ptr] = Program(-1, owned=False, obj=self, ptr=ptr)
        return p

    def program(self, name: str) -> Program:
        """Program by (function) name; KeyError if absent."""
        ptr = _find_program(self._live(), name.encode())
        if not ptr:
            raise KeyError(f"no program {name!r} in {self.path}")
        return self._wrap_prog(ptr)

    def map(self, name: str) -> Map:
        """Map by name; KeyError if absent."""
        ptr = _find_map(self._live(), name.encode())
        if not ptr:
            raise KeyError(f"no map {name!r} in {self.path}")
        return self._wrap_map(ptr)

    @property
    def programs(self) -> list[Program]:
        obj, out, p = self._live(), [], None
        while p := _next_program(obj, p):
            out.append(self._wrap_prog(p))
        return out

    @property
    def maps(self) -> list[Map]:
        """All maps, including libbpf's internal .data/.rodata/.bss maps."""
        obj, out, m = self._live(), [], None
        while m := _next_map(obj, m):
            out.append(self._wrap_map(m))
        return out

    def reuse_map(self, name: str, fd_or_map: int | Map) -> None:
        """Make map ``name`` use an existing map instead of creating one
        (e.g. a pinned map shared between loads).  libbpf dups the fd, so the
        caller keeps ownership of ``fd_or_map``."""
        self._before_load(f"reuse map {name}")
        m = self.map(name)
        _call(
            f"reuse fd for map '{name}' of {self.path}",
            _map_reuse_fd,
            m._ptr,
            _as_fd(fd_or_map),
        )

    def set_map_max_entries(self, name: str, n: int) -> None:
        """Resize map ``name`` before load."""
        self._before_load(f"set max_entries of map {name}")
        m = self.map(name)
        _call(
            f"set max_entries of map '{name}' of {self.path}",
            _map_set_max_entries,
            m._ptr,
            n,
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("loaded" if self._loaded else "opened")
        return f"<BpfObject {self.path!r} {state}>"


# --------------------------------------------------------------------------
# TC (clsact qdisc + cls_bpf in direct-action mode)
# --------------------------------------------------------------------------


class TcFilter(NamedTuple):
    handle: int
    priority: int
    prog_id: int


def _tc_hook(ifindex: int, attach_point: int) -> _bpf_tc_hook:
    return _opts(_bpf_tc_hook, ifindex=ifindex, attach_point=attach_point)


def _tc_where(ifindex: int, attach_point: int) -> str:
    names = {BPF_TC_INGRESS: "ingress", BPF_TC_EGRESS: "egress"}
    ap = names.get(attach_point, "ingress+egress" if attach_point == 3 else str(attach_point))
    return f"ifindex {ifindex} {ap}"


_NO_CHAIN = "Cannot find specified filter chain"
_NO_QDISC = "Parent Qdisc doesn't exist"  # the kernel's spelling: "exists"


def tc_hook_create(ifindex: int, attach_point: int = BPF_TC_EGRESS) -> bool:
    """Ensure a clsact qdisc exists; True if created, False if already there."""
    hook = _tc_hook(ifindex, attach_point)
    with _capturing(quiet=True) as log:
        ret = _tc_hook_create(ctypes.byref(hook))
    if ret == -_errno.EEXIST:
        return False
    log.flush()
    if ret < 0:
        raise _error(-ret, f"create tc hook on {_tc_where(ifindex, attach_point)}", log)
    return True


def tc_hook_destroy(ifindex: int, attach_point: int) -> None:
    """With BPF_TC_INGRESS|BPF_TC_EGRESS remove the clsact qdisc; with a
    single attach point libbpf only flushes that hook's filters."""
    hook = _tc_hook(ifindex, attach_point)
    _call(
        f"destroy tc hook on {_tc_where(ifindex, attach_point)}",
        _tc_hook_destroy,
        ctypes.byref(hook),
    )


def tc_attach(
    ifindex: int,
    attach_point: int,
    prog_fd: FdLike,
    handle: int,
    priority: int,
    replace: bool = True,
) -> TcFilter:
    """Attach a direct-action cls_bpf filter (hook must exist)."""
    hook = _tc_hook(ifindex, attach_point)
    opts = _opts(
        _bpf_tc_opts,
        prog_fd=_as_fd(prog_fd),
        flags=BPF_TC_F_REPLACE if replace else 0,
        handle=handle,
        priority=priority,
    )
    _call(
        f"attach tc filter {handle}/{priority} on {_tc_where(ifindex, attach_point)}",
        _tc_attach,
        ctypes.byref(hook),
        ctypes.byref(opts),
    )
    return TcFilter(opts.handle, opts.priority, opts.prog_id)


def tc_detach(ifindex: int, attach_point: int, handle: int, priority: int) -> None:
    """Remove the filter identified by handle/priority."""
    hook = _tc_hook(ifindex, attach_point)
    # libbpf insists prog_fd/prog_id/flags are zero for detach and query.
    opts = _opts(_bpf_tc_opts, handle=handle, priority=priority)
    _call(
        f"detach tc filter {handle}/{priority} from {_tc_where(ifindex, attach_point)}",
        _tc_detach,
        ctypes.byref(hook),
        ctypes.byref(opts),
    )


def tc_query(ifindex: int, attach_point: int, handle: int, priority: int) -> int | None:
    """prog id of the filter at handle/priority, or None if there is none."""
    hook = _tc_hook(ifindex, attach_point)
    opts = _opts(_bpf_tc_opts, handle=handle, priority=priority)
    with _capturing(quiet=True) as log:
        ret = _tc_query(ctypes.byref(hook), ctypes.byref(opts))
    if ret == -_errno.ENOENT:
        return None
    # With no filter left at that priority (or no clsact qdisc at all) the
    # kernel answers EINVAL instead of ENOENT; only its extack message tells.
    if ret == -_errno.EINVAL and any(_NO_CHAIN in msg or _NO_QDISC in msg for _, msg in log):
        return None
    log.flush()
    if ret < 0:
        raise _error(
            -ret,
            f"query tc filter {handle}/{priority} on {_tc_where(ifindex, attach_point)}",
            log,
        )
    return opts.prog_id


# --------------------------------------------------------------------------
# XDP
# --------------------------------------------------------------------------


class XdpInfo(NamedTuple):
    prog_id: int
    drv_prog_id: int
    skb_prog_id: int
    hw_prog_id: int
    attach_mode: int  # XDP_ATTACHED_*


def _xdp_opts(old_prog_fd: FdLike | None) -> _bpf_xdp_attach_opts | None:
    # libbpf 1.1.2 adds XDP_FLAGS_REPLACE itself when old_prog_fd != 0.
    if old_prog_fd is None:
        return None
    return _opts(_bpf_xdp_attach_opts, old_prog_fd=_as_fd(old_prog_fd))


def xdp_attach(
    ifindex: int, prog_fd: FdLike, flags: int = 0, old_prog_fd: FdLike | None = None
) -> None:
    """Attach an XDP program (netlink); ``old_prog_fd`` makes it an atomic replace."""
    opts = _xdp_opts(old_prog_fd)
    _call(
        f"attach xdp program to ifindex {ifindex}",
        _xdp_attach,
        ifindex,
        _as_fd(prog_fd),
        flags,
        ctypes.byref(opts) if opts is not None else None,
    )


def xdp_detach(ifindex: int, flags: int = 0, old_prog_fd: FdLike | None = None) -> None:
    """Detach the XDP program in the mode given by ``flags``."""
    opts = _xdp_opts(old_prog_fd)
    _call(
        f"detach xdp program from ifindex {ifindex}",
        _xdp_detach,
        ifindex,
        flags,
        ctypes.byref(opts) if opts is not None else None,
    )


def xdp_query(ifindex: int, flags: int = 0) -> XdpInfo:
    """Attached XDP program ids per mode (0 = none)."""
    opts = _opts(_bpf_xdp_query_opts)
    _call(
        f"query xdp on ifindex {ifindex}",
        _xdp_query,
        ifindex,
        flags,
        ctypes.byref(opts),
    )
    return XdpInfo(
        opts.prog_id,
        opts.drv_prog_id,
        opts.skb_prog_id,
        opts.hw_prog_id,
        opts.attach_mode,
    )


# --------------------------------------------------------------------------
# ring buffer
# --------------------------------------------------------------------------


class RingBuffer:
    """Consumer for a BPF_MAP_TYPE_RINGBUF map.

    ``callback(data)`` gets a copy of each record.  If it raises, consumption
    stops (that record counts as consumed) and the exception propagates from
    :meth:`poll`/:meth:`consume`.  Pass a :class:`Map` to keep its fd alive;
    with a raw fd the caller must keep it open for the RingBuffer's lifetime.
    """

    def __init__(self, map_or_fd: int | Map, callback: Callable[[bytes], object]) -> None:
        self._ptr: int | None = None
        self._map = map_or_fd if isinstance(map_or_fd, Map) else None
        self._callback = callback
        self._exc: BaseException | None = None
        # Referenced from self for as long as libbpf may call it.
        self._c_callback = _SAMPLE_FN(self._on_sample)
        self._ptr = _call_ptr(
            "create ring buffer",
            _ring_buffer_new,
            _as_fd(map_or_fd),
            self._c_callback,
            None,
            None,
        )

    def _on_sample(self, _ctx: int, data: int, size: int) -> int:
        try:
            self._callback(ctypes.string_at(data, size))
        except BaseException as e:  # noqa: BLE001 - re-raised from poll()
            self._exc = e
            return -_errno.ECANCELED
        return 0

    def _live(self) -> int:
        if self._ptr is None:
            raise ValueError("ring buffer is closed")
        return self._ptr

    def _finish(self, op: str, ret: int) -> int:
        exc, self._exc = self._exc, None
        if exc is not None:
            raise exc
        if ret == -_errno.EINTR:
            return 0
        if ret < 0:
            raise BPFError(-ret, op)
        return ret

    def poll(self, timeout_ms: int = -1) -> int:
        """Wait up to ``timeout_ms`` (-1: forever) and consume; returns the
        number of records handled."""
        return self._finish("poll ring buffer", _ring_buffer_poll(self._live(), timeout_ms))

    def consume(self) -> int:
        """Consume all available records without waiting."""
        return self._finish("consume ring buffer", _ring_buffer_consume(self._live()))

    def fileno(self) -> int:
        """epoll fd that becomes readable when records are available."""
        return _ring_buffer_epoll_fd(self._live())

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _ring_buffer_free(ptr)
        self._map = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
