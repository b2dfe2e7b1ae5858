"""Reading a BPF ring buffer."""

from __future__ import annotations

import ctypes
import errno as _errno
from collections.abc import Callable

from ..errors import BPFError
from .ffi import SAMPLE_FN, call_ptr, lib
from .objects import Closing, Map, as_fd


class RingBuffer(Closing):
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
        self._c_callback = SAMPLE_FN(self._on_sample)
        self._ptr = call_ptr(
            "create ring buffer",
            lib.ring_buffer__new,
            as_fd(map_or_fd),
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
        return self._finish("poll ring buffer", lib.ring_buffer__poll(self._live(), timeout_ms))

    def consume(self) -> int:
        """Consume all available records without waiting."""
        return self._finish("consume ring buffer", lib.ring_buffer__consume(self._live()))

    def fileno(self) -> int:
        """epoll fd that becomes readable when records are available."""
        return lib.ring_buffer__epoll_fd(self._live())

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            lib.ring_buffer__free(ptr)
        self._map = None
