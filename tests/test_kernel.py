"""The minimum kernel: features probed on the running kernel, and the one line
a kernel without one gets at attach.

No kernel older than 6.1 boots here, so the refusal is shown with a helper
number no kernel knows; the probe that answers is the same real one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netoken import kernel
from netoken import libbpf as lb
from netoken.datapath import object_path

from .conftest import Lab, make_config, run
from .test_cli import pin_dir

FUTURE = ("bpf_from_the_future", 9999, lb.BPF_PROG_TYPE_XDP, "99.0")

CONFIG = """
[[policy]]
name = "svc"
destinations = ["198.18.7.2/32"]
ports = [8080]
key = 1

[guard]
[[guard.protect]]
destinations = ["198.18.7.2/32"]
ports = [8080]
keys = [1]
"""


def helpers_called(obj: str) -> set[int]:
    """BPF_FUNC_ numbers an object calls: `call` with src_reg 0 (1 is a call
    to one of its own functions)."""
    objdump = shutil.which("llvm-objdump-19") or shutil.which("llvm-objdump")
    assert objdump, "llvm-objdump not found (apt-get install llvm-19)"
    text = subprocess.run(
        [objdump, "-d", str(object_path(obj))], check=True, capture_output=True, text=True
    ).stdout
    return {
        int.from_bytes(bytes.fromhex(imm), "little")
        for imm in re.findall(r"\b85 00 00 00 ((?:[0-9a-f]{2} ){3}[0-9a-f]{2})\s+call", text)
    }


def test_the_probed_helpers_are_the_young_ones_the_programs_call():
    called = helpers_called("marker") | helpers_called("guard")
    probed = {helper for _, helper, _, _ in kernel.HELPERS}
    # Helper numbers are handed out in order: those below the oldest probed
    # one are older than it, the others must all be probed.
    assert {h for h in called if h >= min(probed)} == probed
    assert kernel.MINIMUM == max(
        (since for *_, since in kernel.HELPERS), key=lambda v: tuple(map(int, v.split(".")))
    )


def test_this_kernel_has_every_feature_netoken_needs():
    assert kernel.missing() is None


def test_each_probe_asks_the_kernel():
    # A helper the verifier has never heard of is reported missing; one the
    # programs use is present (the same probe, not a version comparison).
    assert not lb.probe_helper(lb.BPF_PROG_TYPE_XDP, FUTURE[1])
    assert lb.probe_helper(lb.BPF_PROG_TYPE_XDP, 208)


def test_a_missing_helper_is_named_with_the_linux_that_has_it():
    assert kernel.missing((FUTURE,)) == (
        f"this kernel ({os.uname().release}) lacks the BPF helper bpf_from_the_future "
        f"(Linux 99.0); netoken needs Linux {kernel.MINIMUM} or newer"
    )
    two = kernel.missing((FUTURE, (*FUTURE[:1], 9998, *FUTURE[2:])))
    assert "helpers bpf_from_the_future (Linux 99.0), bpf_from_the_future (Linux 99.0);" in two


@pytest.mark.parametrize("verb", ["mark", "guard"])
def test_attach_without_a_feature_is_one_line_and_attaches_nothing(
    lab: Lab, tmp_path: Path, verb: str
):
    a, b = lab.ns("ka"), lab.ns("kb")
    ia, _ = lab.link(a, b)
    make_config(tmp_path, CONFIG)
    cfg = tmp_path / "netoken.toml"
    # The CLI as operators run it, on a kernel whose probes find FUTURE missing.
    prog = (
        "import sys; from netoken import cli, kernel; "
        f"kernel.HELPERS += ({FUTURE!r},); sys.exit(cli.main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", prog, "-n", a, verb, "attach", ia, "-c", str(cfg)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert r.stderr.splitlines() == [f"netoken: {kernel.missing((FUTURE,))}"]
    assert not pin_dir(ia).exists()
    assert "clsact" not in run("tc", "qdisc", "show", "dev", ia, ns=a).stdout
    assert "xdp" not in run("ip", "link", "show", "dev", ia, ns=a).stdout
