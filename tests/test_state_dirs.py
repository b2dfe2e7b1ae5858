"""State directories that someone else planted are refused, never followed.

bpffs is mounted mode 1777 by default, so any local user can create
/sys/fs/bpf/netoken (or a symlink there) before root's first attach.  Here an
unprivileged user (setpriv, uid 65534) plants directories and symlinks where
netoken looks, and every verb must refuse them with one line that says what
is wrong and how to fix it, attach nothing and write nothing into them.

Each test runs netoken in a private mount namespace with a bpffs and a /run
of its own (both mode 1777, as bpffs is by default), so what the user plants
never touches the /sys/fs/bpf/netoken of tests running at the same time.  The
paths are the real ones: netoken runs unchanged, with no test-only setting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from netoken.netns import netns
from netoken.state import this_netns

from .conftest import Lab, run
from .test_cli import one_line_error, write_config

REPO = Path(__file__).resolve().parents[1]
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
BPF = "/sys/fs/bpf/netoken"
RUN = "/run/netoken"

CONFIG = """
[[policy]]
name = "svc"
destinations = ["198.18.99.1/32"]
key = 1

[guard]
[[guard.protect]]
destinations = ["198.18.99.1/32"]
keys = [1]
"""


@dataclass
class Box:
    """A private mount namespace (held by a sleeping process) and a network
    namespace with a veth pair whose ends are A and B."""

    proc: subprocess.Popen
    ns: str
    a: str
    b: str
    cfg: Path

    def _enter(self, net: bool) -> list[str]:
        # nsenter opens the namespace files before switching, so the
        # network namespace is found in the host's /run/netns.
        return [
            "nsenter",
            "-t",
            str(self.proc.pid),
            "-m",
            f"--wd={REPO}",
            *([f"--net=/run/netns/{self.ns}"] if net else []),
        ]

    def sh(self, script: str, nobody: bool = False) -> str:
        r = subprocess.run(
            [*self._enter(False), *(NOBODY if nobody else ()), "sh", "-ec", script],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, f"{script}: {r.stderr}"
        return r.stdout

    def netoken(self, *args: str, umask: int | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "netoken", *args]
        if umask is not None:
            cmd = ["sh", "-c", f'umask {umask:03o}; exec "$@"', "sh", *cmd]
        return subprocess.run(
            [*self._enter(True), *cmd], capture_output=True, text=True, timeout=60, check=False
        )

    def refused(self, *args: str) -> str:
        return one_line_error(self.netoken(*args)).removeprefix("netoken: ")

    def ok(self, *args: str, umask: int | None = None) -> str:
        r = self.netoken(*args, umask=umask)
        assert r.returncode == 0, f"netoken {' '.join(args)}: {r.stderr}"
        return r.stdout

    def mode(self, path: str) -> tuple[int, int]:
        """(owner uid, permission bits) of PATH, not following a symlink."""
        uid, mode = self.sh(f"stat -c '%u %a' {path}").split()
        return int(uid), int(mode, 8)

    def xdp(self, dev: str) -> dict:
        (link,) = json.loads(run("ip", "-j", "link", "show", "dev", dev, ns=self.ns).stdout)
        return link.get("xdp", {})

    @property
    def ns_dir(self) -> str:
        """This box's network namespace level below BPF (or RUN)."""
        with netns(self.ns):
            return f"net:{this_netns().cookie}"

    def if_dir(self, dev: str) -> str:
        """DEV's interface level below ns_dir."""
        (link,) = json.loads(run("ip", "-j", "link", "show", "dev", dev, ns=self.ns).stdout)
        return f"{self.ns_dir}/if:{link['ifindex']}"

    def tc_filters(self, dev: str, hook: str = "egress") -> list:
        out = run("tc", "-j", "filter", "show", "dev", dev, hook, ns=self.ns, check=False).stdout
        return json.loads(out or "[]")


@pytest.fixture
def box(lab: Lab, tmp_path: Path) -> Iterator[Box]:
    ns = lab.ns("sd")
    a, b = lab.link(ns, ns)
    proc = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "--",
            "sh",
            "-ec",
            (
                "mount -t bpf -o mode=1777 bpf /sys/fs/bpf; mount -t tmpfs -o mode=1777 tmpfs /run; "
                "echo ready; exec sleep infinity"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        cfg = write_config(tmp_path, {1: bytes(range(16))}, CONFIG)
        yield Box(proc, ns, a, b, cfg)
    finally:
        # The private bpffs goes with the mount namespace; the namespace's
        # deletion (lab) takes the XDP programs and filters.
        proc.kill()
        proc.wait()


def every_verb(box: Box, iface: str) -> list[tuple[str, ...]]:
    c = str(box.cfg)
    return [
        ("guard", "attach", iface, "-c", c),
        ("mark", "attach", iface, "-c", c),
        ("status",),
        ("status", iface),
        ("stats",),
        ("monitor",),
        ("apply", iface, "-c", c),
        ("guard", "detach", iface),
        ("mark", "detach", iface),
        ("exporter", "--textfile", "/tmp/netoken-never-written.prom"),
    ]


def refused_by_every_verb(box: Box, iface: str, want: str) -> None:
    """Every verb gives WANT as its one-line error (run side by side: each
    is a fresh process that only reads)."""
    verbs = every_verb(box, iface)
    with ThreadPoolExecutor(len(verbs)) as pool:
        got = list(pool.map(lambda args: box.refused(*args), verbs))
    assert got == [want] * len(verbs), list(zip(verbs, got, strict=True))


def assert_nothing_attached(box: Box, iface: str) -> None:
    assert box.xdp(iface) == {}
    assert box.tc_filters(iface) == [] and box.tc_filters(iface, "ingress") == []


def test_planted_directory_is_refused_by_every_verb(box: Box):
    box.sh(f"mkdir {BPF}", nobody=True)
    want = f"{BPF} is owned by uid 65534, not root: remove it (rm -r {BPF}) and retry"
    refused_by_every_verb(box, box.a, want)
    assert_nothing_attached(box, box.a)
    assert box.sh(f"ls -A {BPF}") == ""  # root wrote nothing into it

    box.sh(f"rm -r {BPF}")  # what the message says
    box.ok("guard", "attach", box.a, "-c", str(box.cfg))
    assert box.mode(BPF) == (0, 0o700)


def test_planted_symlink_is_refused(box: Box):
    box.sh(f"mkdir /sys/fs/bpf/mine; ln -s /sys/fs/bpf/mine {BPF}", nobody=True)
    want = (
        f"{BPF} is a symbolic link (to /sys/fs/bpf/mine), not a directory: "
        f"remove it (rm {BPF}) and retry"
    )
    refused_by_every_verb(box, box.a, want)
    assert_nothing_attached(box, box.a)
    assert box.sh("ls -A /sys/fs/bpf/mine") == ""


def test_planted_run_directory_and_symlink_are_refused(box: Box):
    box.sh(f"mkdir {RUN}", nobody=True)
    want = f"{RUN} is owned by uid 65534, not root: remove it (rm -r {RUN}) and retry"
    refused_by_every_verb(box, box.a, want)
    assert_nothing_attached(box, box.a)

    box.sh(f"rm -r {RUN}")
    box.sh(f"mkdir /run/mine; ln -s /run/mine {RUN}", nobody=True)
    want = (
        f"{RUN} is a symbolic link (to /run/mine), not a directory: remove it (rm {RUN}) and retry"
    )
    assert box.refused("guard", "attach", box.a, "-c", str(box.cfg)) == want
    assert box.refused("status") == want
    assert_nothing_attached(box, box.a)
    assert box.sh("ls -A /run/mine") == ""


def test_plants_at_the_interface_level_are_refused(box: Box):
    """Below a good namespace directory: what a user planted while it was
    open (an administrator's chmod 1777, since undone) is refused level by
    level."""
    box.ok("guard", "attach", box.a, "-c", str(box.cfg))
    ns_dirs = f"{BPF} {RUN} {BPF}/{box.ns_dir} {RUN}/{box.ns_dir}"
    box.sh(f"chmod 1777 {ns_dirs}")
    box.sh(
        f"mkdir /sys/fs/bpf/mine; ln -s /sys/fs/bpf/mine {BPF}/{box.if_dir(box.b)}; "
        f"mkdir {RUN}/{box.if_dir(box.b)}",
        nobody=True,
    )
    box.sh(f"chmod 0700 {ns_dirs}")

    link = f"{BPF}/{box.if_dir(box.b)}"
    want = f"{link} is a symbolic link (to /sys/fs/bpf/mine), not a directory: remove it (rm {link}) and retry"
    refused_by_every_verb(box, box.b, want)
    assert_nothing_attached(box, box.b)
    # Also for the interface that is netoken's own: its status names the
    # devices no guard covers, which needs every guard's pins.
    assert box.refused("status", box.a) == want

    box.sh(f"rm {link}")
    run_dir = f"{RUN}/{box.if_dir(box.b)}"
    want = f"{run_dir} is owned by uid 65534, not root: remove it (rm -r {run_dir}) and retry"
    assert box.refused("guard", "attach", box.b, "-c", str(box.cfg)) == want
    assert_nothing_attached(box, box.b)
    box.sh(f"rm -r {run_dir}")
    box.ok("guard", "attach", box.b, "-c", str(box.cfg))
    assert box.tc_filters(box.b, "ingress") != []  # a veth: the guard runs at TC


def test_group_or_other_writable_directories_are_refused(box: Box):
    box.ok("guard", "attach", box.a, "-c", str(box.cfg))
    role_dir = f"{BPF}/{box.if_dir(box.a)}/guard"
    box.sh(f"chmod 0770 {role_dir}")
    assert box.refused("status") == (
        f"{role_dir} is writable by group (mode 0770): make it "
        f"private (chmod 0700 {role_dir}) and retry"
    )
    box.sh(f"chmod 0700 {role_dir}; chmod 0757 {RUN}")
    assert box.refused("guard", "detach", box.a) == (
        f"{RUN} is writable by others (mode 0757): make it private (chmod 0700 {RUN}) and retry"
    )
    box.sh(f"chmod 0700 {RUN}")
    # The bpffs itself may be shared, but only with the sticky bit, which
    # keeps others from renaming root's directory away and planting theirs.
    box.sh("chmod 0777 /sys/fs/bpf")
    assert box.refused("status") == (
        "/sys/fs/bpf is writable by group and others without the sticky bit (mode 0777), so "
        "anyone could replace netoken's state there: chmod +t /sys/fs/bpf and retry"
    )
    box.sh("chmod 1777 /sys/fs/bpf")
    box.ok("guard", "detach", box.a)


def test_clean_first_attach_creates_private_directories(box: Box):
    # umask 277 would make mkdir(0700) give 0500: netoken sets the mode itself.
    box.ok("guard", "attach", box.a, "-c", str(box.cfg), umask=0o277)
    box.ok("mark", "attach", box.b, "-c", str(box.cfg), umask=0o277)
    a, b, ns = box.if_dir(box.a), box.if_dir(box.b), box.ns_dir
    for path in (
        BPF,
        f"{BPF}/{ns}",
        f"{BPF}/{a}",
        f"{BPF}/{a}/guard",
        f"{BPF}/{ns}/guard",
        f"{BPF}/{b}/marker",
        RUN,
        f"{RUN}/{ns}",
        f"{RUN}/{a}",
        f"{RUN}/{b}",
    ):
        assert box.mode(path) == (0, 0o700), path
    status = json.loads(box.ok("status", "--json"))
    assert sorted((d["ifname"], d["role"], d["state"]) for d in status) == [
        (box.a, "guard", "attached"),
        (box.b, "marker", "attached"),
    ]
    assert box.tc_filters(box.a, "ingress") != [] and box.tc_filters(box.b) != []
    box.ok("guard", "detach", box.a)
    box.ok("mark", "detach", box.b)
    assert_nothing_attached(box, box.a)
    assert_nothing_attached(box, box.b)
    assert "netoken" not in box.sh("ls -A /sys/fs/bpf").split()  # empty, so removed
    assert box.sh(f"ls -A {RUN}").split() == ["lock"]
