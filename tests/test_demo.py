"""`netoken demo` through the real CLI: it works, and it leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

NETOKEN = [str(Path(sys.executable).parent / "netoken")]


def demo_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.startswith("ntdemo-")}


def test_demo_marks_verifies_guards_and_cleans_up():
    before = demo_namespaces()
    r = subprocess.run([*NETOKEN, "demo"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "4/4 marked connections succeeded; 4/4 SYNs carried a token that verifies" in out
    assert "unmarked connection from the attacker namespace: dropped by the guard" in out
    assert "20/20 client connections succeeded during the flood" in out
    assert "\x1b[" not in out, "piped output must be plain text"
    assert demo_namespaces() == before


def test_demo_cleans_up_on_ctrl_c():
    before = demo_namespaces()
    p = subprocess.Popen(
        [*NETOKEN, "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # interrupt once the lab exists (the marker line comes after it is built)
    deadline = time.monotonic() + 20
    for line in p.stdout:
        if "marker attached" in line or time.monotonic() > deadline:
            break
    os.kill(p.pid, signal.SIGINT)
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 130, out
    assert "interrupted" in out
    assert demo_namespaces() == before
