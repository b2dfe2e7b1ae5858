"""ctypes binding over the system libbpf (libbpf.so.1, written against 1.1.2).

This package is the only place in netoken that touches ctypes or raw
pointers; the rest of netoken works with the Python objects it defines:

- ``ffi``: constants, struct layouts, the library and its prototypes, errors
  and the log of each call (importing it loads libbpf.so.1);
- ``objects``: maps, programs and ELF objects, and who owns which fd;
- ``attach``: tc filters on a clsact qdisc, XDP;
- ``ringbuf``: reading a ring buffer map.

Importing ``netoken.libbpf`` loads the library; the verbs that need no kernel
(decode, key, config, --help) never import it.
"""

from ..errors import BPFError
from .attach import (
    TcFilter,
    XdpInfo,
    tc_attach,
    tc_detach,
    tc_hook_create,
    tc_hook_destroy,
    tc_query,
    xdp_attach,
    xdp_detach,
    xdp_query,
)
from .ffi import (
    BPF_ANY,
    BPF_EXIST,
    BPF_F_LOCK,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_LRU_HASH,
    BPF_MAP_TYPE_LRU_PERCPU_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_PERCPU_HASH,
    BPF_MAP_TYPE_RINGBUF,
    BPF_NOEXIST,
    BPF_PROG_TYPE_SCHED_CLS,
    BPF_PROG_TYPE_XDP,
    BPF_TC_EGRESS,
    BPF_TC_INGRESS,
    XDP_ATTACHED_DRV,
    XDP_ATTACHED_HW,
    XDP_ATTACHED_MULTI,
    XDP_ATTACHED_NONE,
    XDP_ATTACHED_SKB,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_HW_MODE,
    XDP_FLAGS_REPLACE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    interrupt_handler,
)
from .objects import (
    BpfObject,
    Map,
    Program,
    ProgStats,
    TestRun,
    num_possible_cpus,
    obj_get,
    obj_pin,
    probe_helper,
    run_time_stats,
    unpin,
)
from .ringbuf import RingBuffer

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_F_LOCK",
    "BPF_MAP_TYPE_ARRAY",
    "BPF_MAP_TYPE_HASH",
    "BPF_MAP_TYPE_LRU_HASH",
    "BPF_MAP_TYPE_LRU_PERCPU_HASH",
    "BPF_MAP_TYPE_PERCPU_ARRAY",
    "BPF_MAP_TYPE_PERCPU_HASH",
    "BPF_MAP_TYPE_RINGBUF",
    "BPF_NOEXIST",
    "BPF_PROG_TYPE_SCHED_CLS",
    "BPF_PROG_TYPE_XDP",
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
    "interrupt_handler",
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
