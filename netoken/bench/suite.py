"""Every part in one run, with the machine it ran on."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

from .common import PARTS, BenchError, Progress, _guarded
from .control_part import control
from .datapath_part import datapath
from .e2e_part import e2e
from .namespaces import _sigterm_as_interrupt


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_all(
    quick: bool = False, progress: Progress = None, parts: Sequence[str] = PARTS
) -> dict[str, Any]:
    """Every benchmark; a part that fails reports {"error": ...} in its place."""
    if os.geteuid() != 0:
        raise BenchError("netoken bench needs root (it loads BPF and builds namespaces)")
    t0 = time.monotonic()
    res: dict[str, Any] = {"machine": machine(), "quick": quick}
    with _sigterm_as_interrupt():
        if "datapath" in parts:
            res["datapath"] = _guarded(lambda: datapath(quick, progress=progress))
        if "e2e" in parts:
            res["e2e"] = _guarded(lambda: e2e(quick, progress))
        if "control" in parts:
            res["control"] = _guarded(lambda: control(quick, progress))
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    return res
