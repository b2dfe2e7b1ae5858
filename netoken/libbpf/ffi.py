"""The C side of the binding: constants, struct layouts, the library and
its prototypes, and how a call's errors and log come back to Python.

Loading this module loads libbpf.so.1 (a one-line NetokenError without it).
Callers reach a libbpf function by its C name, ``lib.bpf_map_lookup_elem``;
``call`` and ``call_ptr`` turn libbpf's error conventions into BPFError with
the log the call produced (the verifier's, for a rejected program).

RLIMIT_MEMLOCK is deliberately not touched.  libbpf 1.x probes whether the
kernel charges BPF memory to the memory cgroup (5.11+) and only raises
RLIMIT_MEMLOCK when it does not, on the first map/program creation.  Raising
it blindly would just hide misconfiguration on old kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
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
from typing import TypeVar

from ..errors import BPFError, NetokenError

logger = logging.getLogger("netoken.libbpf")

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

PERCPU_MAP_TYPES = frozenset(
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


class bpf_map_info(Structure):  # linux/bpf.h
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


class bpf_prog_info(Structure):  # linux/bpf.h
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


class bpf_test_run_opts(Structure):  # bpf/bpf.h
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


class bpf_tc_hook(Structure):  # bpf/libbpf.h
    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_int),  # enum bpf_tc_attach_point
        ("parent", c_uint32),
    ]


class bpf_tc_opts(Structure):  # bpf/libbpf.h
    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
    ]


class bpf_xdp_attach_opts(Structure):  # bpf/libbpf.h
    _fields_ = [
        ("sz", c_size_t),
        ("old_prog_fd", c_int),
    ]


class bpf_xdp_query_opts(Structure):  # bpf/libbpf.h 1.1.2 (no feature_flags yet)
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
        bpf_map_info: 88,
        bpf_prog_info: 232,
        bpf_test_run_opts: 80,
        bpf_tc_hook: 24,
        bpf_tc_opts: 32,
        bpf_xdp_attach_opts: 16,
        bpf_xdp_query_opts: 32,
    }
    for struct, size in expected.items():
        if sizeof(struct) != size:  # pragma: no cover - guards against edits
            raise ImportError(f"{struct.__name__}: sizeof {sizeof(struct)} != {size}")


_check_layouts()


S = TypeVar("S", bound=Structure)


def make_opts(struct: type[S], **fields: int) -> S:
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
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
except OSError:
    # Only the verbs that touch the kernel import this module; the others
    # (decode, key, config, --help) keep working without libbpf.
    raise NetokenError(
        "libbpf.so.1 not found: install the libbpf1 package (apt-get install libbpf1)"
    ) from None
_libc = ctypes.CDLL(None, use_errno=True)

_PRINT_FN = CFUNCTYPE(c_int, c_int, c_void_p, c_void_p)
SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


def _proto(name: str, restype: object, *argtypes: object) -> Callable[..., object]:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


_libc.vsnprintf.restype = c_int
_libc.vsnprintf.argtypes = [c_void_p, c_size_t, c_void_p, c_void_p]

_proto("libbpf_set_print", c_void_p, _PRINT_FN)
_proto("libbpf_num_possible_cpus", c_int)

_proto("bpf_object__open_file", c_void_p, c_char_p, c_void_p)
_proto("bpf_object__load", c_int, c_void_p)
_proto("bpf_object__close", None, c_void_p)
_proto("bpf_object__name", c_char_p, c_void_p)
_proto("bpf_object__find_program_by_name", c_void_p, c_void_p, c_char_p)
_proto("bpf_object__find_map_by_name", c_void_p, c_void_p, c_char_p)
_proto("bpf_object__next_program", c_void_p, c_void_p, c_void_p)
_proto("bpf_object__next_map", c_void_p, c_void_p, c_void_p)

_proto("bpf_program__name", c_char_p, c_void_p)
_proto("bpf_program__fd", c_int, c_void_p)
_proto("bpf_program__type", c_int, c_void_p)

_proto("bpf_map__name", c_char_p, c_void_p)
_proto("bpf_map__fd", c_int, c_void_p)
_proto("bpf_map__type", c_int, c_void_p)
_proto("bpf_map__key_size", c_uint32, c_void_p)
_proto("bpf_map__value_size", c_uint32, c_void_p)
_proto("bpf_map__max_entries", c_uint32, c_void_p)
_proto("bpf_map__set_max_entries", c_int, c_void_p, c_uint32)
_proto("bpf_map__reuse_fd", c_int, c_void_p, c_int)

_proto("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
_proto("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, c_uint64)
_proto("bpf_map_delete_elem", c_int, c_int, c_void_p)
_proto("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
_proto(
    "bpf_map_lookup_batch",
    c_int,
    c_int,
    c_void_p,
    c_void_p,
    c_void_p,
    c_void_p,
    POINTER(c_uint32),
    c_void_p,
)
_proto("bpf_obj_pin", c_int, c_int, c_char_p)
_proto("bpf_obj_get", c_int, c_char_p)
_proto("bpf_map_get_fd_by_id", c_int, c_uint32)
_proto("bpf_prog_get_fd_by_id", c_int, c_uint32)
_proto("bpf_obj_get_info_by_fd", c_int, c_int, c_void_p, POINTER(c_uint32))
_proto("bpf_prog_test_run_opts", c_int, c_int, POINTER(bpf_test_run_opts))
_proto("bpf_enable_stats", c_int, c_int)
_proto("libbpf_probe_bpf_helper", c_int, c_int, c_int, c_void_p)

_proto("bpf_tc_hook_create", c_int, POINTER(bpf_tc_hook))
_proto("bpf_tc_hook_destroy", c_int, POINTER(bpf_tc_hook))
_proto("bpf_tc_attach", c_int, POINTER(bpf_tc_hook), POINTER(bpf_tc_opts))
_proto("bpf_tc_detach", c_int, POINTER(bpf_tc_hook), POINTER(bpf_tc_opts))
_proto("bpf_tc_query", c_int, POINTER(bpf_tc_hook), POINTER(bpf_tc_opts))

_proto("bpf_xdp_attach", c_int, c_int, c_int, c_uint32, POINTER(bpf_xdp_attach_opts))
_proto("bpf_xdp_detach", c_int, c_int, c_uint32, POINTER(bpf_xdp_attach_opts))
_proto("bpf_xdp_query", c_int, c_int, c_int, POINTER(bpf_xdp_query_opts))

_proto("ring_buffer__new", c_void_p, c_int, SAMPLE_FN, c_void_p, c_void_p)
_proto("ring_buffer__free", None, c_void_p)
_proto("ring_buffer__poll", c_int, c_void_p, c_int)
_proto("ring_buffer__consume", c_int, c_void_p)
_proto("ring_buffer__epoll_fd", c_int, c_void_p)


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
def capturing(quiet: bool = False) -> Iterator[_Capture]:
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


def error(err: int, op: str, entries: list[tuple[int, str]]) -> BPFError:
    return BPFError(err, op, "\n".join(msg for _, msg in entries), _log_tail(entries))


def call(op: str, fn: Callable[..., int], *args: object) -> int:
    """Call an int-returning libbpf API (libbpf 1.x: -errno on failure)."""
    with capturing() as log:
        ret = fn(*args)
    if ret < 0:
        raise error(-ret, op, log)
    return ret


def call_ptr(op: str, fn: Callable[..., int | None], *args: object) -> int:
    """Call a pointer-returning libbpf API (libbpf 1.x: NULL + errno)."""
    with capturing() as log:
        ptr = fn(*args)
        err = ctypes.get_errno()
    if not ptr:
        raise error(err, op, log)
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
    # is remembered and raised by capturing() once the libbpf call returns.
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
lib.libbpf_set_print(_PRINT_CALLBACK)
