"""The README's tour runs, block by block, as written (same conventions as
docs/operations.md: see tests/test_docs.py).  Each ```sh block must succeed,
and the output shown after it must still be what netoken prints, line for
line where it does not depend on ids, keys, times or counters."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from netoken.netns import netns
from netoken.state import this_netns

from .test_docs import doc_units

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
TOUR_NAMESPACES = ("client", "server")
STATE_TOPS = (Path("/sys/fs/bpf/netoken"), Path("/run/netoken"))
# The tour's names are the README's, fixed: runs from other checkouts on the
# same machine take turns instead of tearing down each other's lab.
TOUR_LOCK = Path("/run/lock/netoken-readme-tour.lock")
MARK = "\x1e"  # separates block outputs in the one bash run


def _clean() -> None:
    for ns in TOUR_NAMESPACES:
        # netoken keeps state per namespace (by cookie): what a failed tour
        # left goes with its namespace.
        with contextlib.suppress(OSError):
            with netns(ns):
                cookie = this_netns().cookie
            for top in STATE_TOPS:
                shutil.rmtree(top / f"net:{cookie}", ignore_errors=True)
        # The tour starts servers and monitors in the background; they would
        # keep the namespace (and its pins' programs) alive after `del`.
        pids = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@contextlib.contextmanager
def _tour_lock():
    TOUR_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(TOUR_LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def tour_blocks() -> list[tuple[str, str | None]]:
    """(script, output shown right after it or None) for every runnable block."""
    units = doc_units(README.read_text())
    out = []
    for i, u in enumerate(units):
        if u.kind != "sh" or u.directive:
            continue
        nxt = units[i + 1] if i + 1 < len(units) else None
        out.append((u.text, nxt.text if nxt and nxt.kind == "text" else None))
    return out


# Lines whose shape, not value, is the contract: ids, tags, keys, times, counts.
_VOLATILE = re.compile(
    r"\b(\d{4}-\d\d-\d\dT[\d:]+Z|\d\d:\d\d:\d\d\.\d+|[0-9a-f]{8,}|\d+)\b"
    r"|/tmp/\S+"
)


def _shape(text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("netoken: ")]
    return [_VOLATILE.sub("#", re.sub(r"\s+", " ", ln.strip())) for ln in lines]


def test_readme_tour_runs_and_prints_what_it_shows(tmp_path):
    with _tour_lock():
        _run_tour(tmp_path)


def _run_tour(tmp_path: Path) -> None:
    _clean()
    units = doc_units(README.read_text())
    for u in units:
        if u.directive and u.directive[0] == "file":
            (tmp_path / u.directive[1]).write_text(u.text + "\n")
    blocks = tour_blocks()
    assert len(blocks) >= 6
    script = f"\necho -n {MARK}\n".join(b for b, _ in blocks)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    try:
        r = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        _clean()
    assert r.returncode == 0, f"README tour failed:\n{r.stdout}\n{r.stderr}"
    outputs = r.stdout.split(MARK)
    assert len(outputs) == len(blocks)
    for (script_text, shown), got in zip(blocks, outputs):
        if shown is not None:
            assert _shape(got) == _shape(shown), f"README output for:\n{script_text}\nnow:\n{got}"
