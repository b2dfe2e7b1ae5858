"""State per network namespace and interface identity, as operators meet it.

- Two namespaces with the same interface names and roles are managed
  independently (every verb, from either side), and messages about the other
  namespace name it; `status --all-netns` lists both.
- A renamed interface keeps its attachment: `status` shows it under the new
  name, the old name still finds it, and `detach OLDNAME` removes it, the
  clsact qdisc netoken created included.  Nothing says "gone" while netoken's
  filter or XDP program is still there.
- netoken programs whose pins were removed (ghosts) are found by `status`,
  which says how to remove them.
- Key fingerprints: in status (from the kernel's maps), --json, and the
  exporter; key bytes never.
- State pinned by the previous layout (one directory per interface name) is
  moved to the new one by the first command in its namespace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netoken import config as nconfig
from netoken import guard as nguard
from netoken import marker as nmarker
from netoken import state, token
from netoken.libbpf import Map, Program
from netoken.netns import netns
from netoken.state import BPFFS, RUN_DIR

from .conftest import TEST_KEY, Lab, run
from .e2e import connect, server
from .test_cli import PORT, netoken, ok, one_line_error, qdiscs, write_config

CONFIG = f"""
[[policy]]
name = "svc"
destinations = ["198.18.77.0/24"]
ports = [{PORT}]
key = 1

[guard]
replay_cache = 4096

[[guard.protect]]
destinations = ["198.18.77.0/24"]
ports = [{PORT}]
keys = [1]
"""


def cookie(ns: str) -> int:
    with netns(ns):
        return state.this_netns().cookie


def ifindex(ns: str, dev: str) -> int:
    (link,) = json.loads(run("ip", "-j", "link", "show", "dev", dev, ns=ns).stdout)
    return link["ifindex"]


def xdp_prog(ns: str, dev: str) -> int | None:
    (link,) = json.loads(run("ip", "-j", "link", "show", "dev", dev, ns=ns).stdout)
    return link.get("xdp", {}).get("prog", {}).get("id")


def guard_prog(ns: str, dev: str) -> int | None:
    """The program at the guard's place on DEV: XDP, or netoken's filter at
    TC ingress (where `--hook auto` puts it on these veths)."""
    for f in json.loads(
        run("tc", "-j", "filter", "show", "dev", dev, "ingress", ns=ns, check=False).stdout or "[]"
    ):
        o = f.get("options", {})
        if f.get("pref") == 1 and o.get("handle") == "0x6e74":
            return o["prog"]["id"]
    return xdp_prog(ns, dev)


def egress_filters(ns: str, dev: str) -> list[dict]:
    return [
        f
        for f in json.loads(
            run("tc", "-j", "filter", "show", "dev", dev, "egress", ns=ns).stdout or "[]"
        )
        if "options" in f
    ]


@dataclass
class Node:
    """A network namespace with two veth pairs named as on a real host:
    eth0 <-> peer0 and eth1 <-> peer1 (the same names in every Node)."""

    ns: str
    cookie: int

    def ok(self, *args: str) -> str:
        return ok(*args, ns=self.ns)

    def json(self, *args: str) -> list[dict]:
        return json.loads(self.ok(*args, "--json"))

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return netoken(*args, ns=self.ns)

    @property
    def pins(self) -> Path:
        return BPFFS / "netoken" / f"net:{self.cookie}"

    @property
    def run(self) -> Path:
        return RUN_DIR / f"net:{self.cookie}"

    def forget(self) -> None:
        shutil.rmtree(self.pins, ignore_errors=True)
        shutil.rmtree(self.run, ignore_errors=True)


def make_node(lab: Lab, name: str) -> Node:
    ns = lab.ns(name)
    for i in (0, 1):
        run("ip", "link", "add", f"eth{i}", "type", "veth", "peer", "name", f"peer{i}", ns=ns)
        run("ip", "link", "set", f"eth{i}", "up", ns=ns)
        run("ip", "link", "set", f"peer{i}", "up", ns=ns)
    return Node(ns, cookie(ns))


@pytest.fixture
def nodes(lab: Lab, tmp_path: Path) -> Iterator[tuple[Node, Node, Path]]:
    a, b = make_node(lab, "na"), make_node(lab, "nb")
    try:
        yield a, b, write_config(tmp_path, {1: TEST_KEY}, CONFIG)
    finally:
        a.forget()
        b.forget()


@pytest.fixture
def node(lab: Lab, tmp_path: Path) -> Iterator[tuple[Node, Path]]:
    a = make_node(lab, "nn")
    try:
        yield a, write_config(tmp_path, {1: TEST_KEY}, CONFIG)
    finally:
        a.forget()


# --------------------------------------------------------------------------
# two namespaces, same names, same roles


def test_two_namespaces_with_the_same_names_are_managed_independently(nodes):
    a, b, cfg = nodes
    c = str(cfg)
    # The same roles on the same interface names in both namespaces.
    ga = json.loads(a.ok("guard", "attach", "eth0", "-c", c, "--json"))
    ma = json.loads(a.ok("mark", "attach", "eth1", "-c", c, "--json"))
    gb = json.loads(b.ok("guard", "attach", "eth0", "-c", c, "--json"))
    mb = json.loads(b.ok("mark", "attach", "eth1", "-c", c, "--json"))
    assert ga["pinned"] == f"{a.pins}/if:{ifindex(a.ns, 'eth0')}/guard"
    assert gb["pinned"] == f"{b.pins}/if:{ifindex(b.ns, 'eth0')}/guard"
    assert ga["prog_id"] != gb["prog_id"] and ma["prog_id"] != mb["prog_id"]

    # Every verb in one namespace sees only its own state.
    for n, g, m in ((a, ga, ma), (b, gb, mb)):
        items = n.json("status")
        assert sorted((d["ifname"], d["role"], d["prog"]["id"], d["state"]) for d in items) == [
            ("eth0", "guard", g["prog_id"], "attached"),
            ("eth1", "marker", m["prog_id"], "attached"),
        ]
        assert {d["netns"]["cookie"] for d in items} == {n.cookie}
        assert {d["netns"]["name"] for d in items} == {n.ns}
        (d,) = n.json("status", "eth0")
        assert d["prog"]["id"] == g["prog_id"]
        assert [s["role"] for s in n.json("stats", "eth1")] == ["marker"]
        n.ok("apply", "eth0", "-c", c)
        n.ok("apply", "eth1", "-c", c)
    # A message about the other namespace names it.
    r = a.cli("status")
    assert r.returncode == 0
    (note,) = [ln for ln in r.stderr.splitlines() if "other network namespaces" in ln]
    # Other tests' (or a crashed run's) namespaces may fill the note, which
    # lists a few and counts the rest; --all-netns below finds b regardless.
    assert f"{b.ns} (eth0 guard, eth1 marker)" in note or re.search(r" and \d+ more ", note)

    # --all-netns: both, each under its ip netns name.
    every = a.json("status", "--all-netns")
    mine = {
        (d["netns"]["name"], d["ifname"], d["role"], d["prog"]["id"])
        for d in every
        if d["netns"] and d["netns"]["cookie"] in (a.cookie, b.cookie)
    }
    assert mine == {
        (a.ns, "eth0", "guard", ga["prog_id"]),
        (a.ns, "eth1", "marker", ma["prog_id"]),
        (b.ns, "eth0", "guard", gb["prog_id"]),
        (b.ns, "eth1", "marker", mb["prog_id"]),
    }
    human = a.ok("status", "--all-netns")
    assert (
        f"network namespace {a.ns} (net:[" in human and f"network namespace {b.ns} (net:[" in human
    )

    # Detaching everything in B leaves A running, and removes B's directories.
    b.ok("guard", "detach", "eth0")
    b.ok("mark", "detach", "eth1")
    assert not b.pins.exists() and not b.run.exists()
    assert guard_prog(b.ns, "eth0") is None and egress_filters(b.ns, "eth1") == []
    assert guard_prog(a.ns, "eth0") == ga["prog_id"]
    assert [f["options"]["prog"]["id"] for f in egress_filters(a.ns, "eth1")] == [ma["prog_id"]]
    assert [d["state"] for d in a.json("status")] == ["attached", "attached"]
    a.ok("guard", "detach", "eth0")
    a.ok("mark", "detach", "eth1")
    assert not a.pins.exists() and not a.run.exists()


# --------------------------------------------------------------------------
# renames


def rename(ns: str, old: str, new: str) -> None:
    run("ip", "link", "set", old, "down", ns=ns)
    run("ip", "link", "set", old, "name", new, ns=ns)
    run("ip", "link", "set", new, "up", ns=ns)


def test_rename_while_attached(node):
    n, cfg = node
    c = str(cfg)
    m = json.loads(n.ok("mark", "attach", "eth1", "-c", c, "--json"))
    g = json.loads(n.ok("guard", "attach", "eth0", "-c", c, "--json"))
    assert m["created_clsact"] is True
    rename(n.ns, "eth1", "eth9")
    rename(n.ns, "eth0", "eth8")

    # status shows both under their names now, and where they were attached
    items = {d["role"]: d for d in n.json("status")}
    assert (
        items["marker"]["ifname"],
        items["marker"]["attached_as"],
        items["marker"]["state"],
    ) == ("eth9", "eth1", "attached")
    assert (items["guard"]["ifname"], items["guard"]["attached_as"], items["guard"]["state"]) == (
        "eth8",
        "eth0",
        "attached",
    )
    assert "eth9 (ifindex " in n.ok("status") and "attached as eth1)" in n.ok("status")
    # the old name still finds it, and says what it is called now
    r = n.cli("status", "eth1")
    assert r.returncode == 0 and r.stdout.startswith("eth9 ")
    assert "eth1 is called eth9 now" in r.stderr
    assert [d["role"] for d in json.loads(n.ok("stats", "eth1", "--json"))] == ["marker"]
    # attaching by the old name is refused in one line naming the new one
    line = one_line_error(n.cli("mark", "attach", "eth1", "-c", c))
    assert "'eth1' does not exist" in line and "is eth9 now" in line and "use eth9" in line

    # detach by the old name: found by ifindex, named by its name now
    out = n.ok("mark", "detach", "eth1")
    assert out.startswith(
        f"marker detached from eth9 (attached as eth1, ifindex {m['ifindex']}): "
        f"removed prog {m['prog_id']}, clsact removed"
    )
    assert "gone" not in out
    assert egress_filters(n.ns, "eth9") == [] and "clsact" not in qdiscs(n.ns, "eth9")
    out = n.ok("guard", "detach", "eth0")
    assert out.startswith(
        f"guard detached from eth8 (attached as eth0, ifindex {g['ifindex']}): "
        f"removed prog {g['prog_id']}"
    )
    assert guard_prog(n.ns, "eth8") is None
    assert not n.pins.exists() and not n.run.exists()
    assert "nothing attached" in n.ok("status")


def test_a_new_interface_with_the_old_name_is_another_interface(node):
    n, cfg = node
    c = str(cfg)
    m = json.loads(n.ok("mark", "attach", "eth1", "-c", c, "--json"))
    rename(n.ns, "eth1", "eth9")
    run("ip", "link", "add", "eth1", "type", "veth", "peer", "name", "peer9", ns=n.ns)
    # eth1 is the new interface now: nothing attached to it, the marker is on eth9
    assert "nothing attached to eth1" in n.ok("status", "eth1")
    assert "no netoken marker on eth1" in one_line_error(n.cli("mark", "detach", "eth1"))
    assert [f["options"]["prog"]["id"] for f in egress_filters(n.ns, "eth9")] == [m["prog_id"]]
    n.ok("mark", "detach", "eth9")
    assert not n.pins.exists()


def test_interface_gone_is_reported_only_when_it_is(node):
    n, cfg = node
    n.ok("mark", "attach", "eth1", "-c", str(cfg))
    run("ip", "link", "del", "eth1", ns=n.ns)
    (d,) = n.json("status")
    assert (d["ifname"], d["state"], d["attached"]) == ("eth1", "interface missing", False)
    out = n.ok("mark", "detach", "eth1")
    assert "eth1 is gone from this network namespace" in out
    assert not n.pins.exists()


# --------------------------------------------------------------------------
# ghosts


def test_programs_that_lost_their_pins_are_found_and_removable(node):
    n, cfg = node
    c = str(cfg)
    m = json.loads(n.ok("mark", "attach", "eth1", "-c", c, "--json"))
    g = json.loads(n.ok("guard", "attach", "eth0", "-c", c, "--json"))
    # Someone removes netoken's state by hand; the programs keep running.
    n.forget()
    ghosts = {d["role"]: d for d in n.json("status")}
    assert ghosts["marker"]["ifname"] == "eth1" and ghosts["guard"]["ifname"] == "eth0"
    for role, res, verb in (("marker", m, "mark"), ("guard", g, "guard")):
        d = ghosts[role]
        assert (d["state"], d["ghost"], d["prog"]["id"]) == ("ghost", True, res["prog_id"])
        assert d["remove"] == f"netoken {verb} detach {d['ifname']}"
    human = n.ok("status")
    assert (
        f"ghost  prog {m['prog_id']}" in human
        and "remove it with: netoken mark detach eth1" in human
    )
    assert [d["state"] for d in n.json("status", "eth0")] == ["ghost"]
    # What it says to run removes them.
    n.ok("mark", "detach", "eth1")
    n.ok("guard", "detach", "eth0")
    assert n.json("status") == []
    assert egress_filters(n.ns, "eth1") == [] and guard_prog(n.ns, "eth0") is None


def test_a_foreign_xdp_program_is_not_a_ghost(node):
    n, _ = node
    empty = Path(__file__).resolve().parents[1] / "netoken" / "bpf" / "empty.bpf.o"
    run("ip", "link", "set", "dev", "eth0", "xdpgeneric", "obj", str(empty), "sec", "xdp", ns=n.ns)
    assert n.json("status") == []


# --------------------------------------------------------------------------
# key fingerprints


def test_fingerprints_show_what_the_kernel_holds_and_never_the_key(node, tmp_path):
    n, cfg = node
    c = str(cfg)
    fp = token.key_fingerprint(TEST_KEY)
    n.ok("mark", "attach", "eth1", "-c", c)
    n.ok("guard", "attach", "eth0", "-c", c)
    outputs = []
    for d in n.json("status"):
        assert [(k["id"], k["fingerprint"]) for k in d["keys"]] == [(1, fp)]
    human = n.ok("status")
    assert human.count(f"1 (fp {fp}, window 30s)") == 2
    outputs += [human, json.dumps(n.json("status"))]
    # The key file changes on disk: status still shows what is loaded, until apply.
    other = bytes(range(50, 66))
    Path(nconfig.load(cfg).keys[1].file).write_text(other.hex() + "\n")
    assert {k["fingerprint"] for d in n.json("status") for k in d["keys"]} == {fp}
    n.ok("apply", "eth0", "-c", c)
    n.ok("apply", "eth1", "-c", c)
    new = {k["fingerprint"] for d in n.json("status") for k in d["keys"]}
    assert new == {token.key_fingerprint(other)} and new != {fp}
    # The exporter carries it too.
    text = subprocess.run(
        [
            sys.executable,
            "-m",
            "netoken",
            "-n",
            n.ns,
            "exporter",
            "--textfile",
            str(tmp_path / "m.prom"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert text.returncode == 0, text.stderr
    prom = (tmp_path / "m.prom").read_text()
    for role, dev in (("guard", "eth0"), ("marker", "eth1")):
        assert re.search(
            rf'netoken_key_info{{(?=[^}}]*interface="{dev}")(?=[^}}]*role="{role}")'
            rf'(?=[^}}]*key_id="1")(?=[^}}]*fingerprint="{token.key_fingerprint(other)}")[^}}]*}}'
            rf" 1\.0",
            prom,
        ), prom
    outputs.append(prom)
    for out in outputs:
        assert TEST_KEY.hex() not in out and other.hex() not in out
    # key generate shows the fingerprint of the key it wrote
    out = ok("key", "generate", str(tmp_path / "9.key"))
    written = nconfig.key_file_bytes(tmp_path / "9.key")
    assert out.strip().endswith(f"fingerprint {token.key_fingerprint(written)})")
    assert written.hex() not in out


# --------------------------------------------------------------------------
# the layout before this one


def _old_state(ns: str, dev: str, role: str, cfg: nconfig.Config, meta: bool = True) -> int:
    """Attach ROLE to DEV the way the previous netoken left it: every map
    and the program pinned in /sys/fs/bpf/netoken/DEV/ROLE, metadata in
    /run/netoken/DEV/ROLE.json with the namespace as net:[inode]."""
    kind = nguard.Guard if role == "guard" else nmarker.Marker
    pin = BPFFS / "netoken" / dev / role
    pin.mkdir(mode=0o700, parents=True)
    os.chmod(pin.parent, 0o700)
    with netns(ns):
        p = kind.load() if role == "marker" else kind.load(4096)
        with p:
            p.configure(cfg)
            idx = socket_index(dev)
            if role == "guard":
                p.attach(dev)
                names = [n for n in kind.MAPS if n != "nt_ev_bucket"]  # not pinned then
            else:
                p.attach(dev)
                names = list(kind.MAPS)
            for name in names:
                p.maps[name].pin(str(pin / name))
            p.prog.pin(str(pin / "prog"))
            prog_id = p.prog.id
        here = state.current_netns()
    if meta:
        run_dir = RUN_DIR / dev
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (run_dir / f"{role}.json").write_text(
            json.dumps(
                {
                    "version": 1,
                    "role": role,
                    "ifname": dev,
                    "ifindex": idx,
                    "netns": here,
                    "config": str(cfg.path),
                    "attached_at": "2026-01-01T00:00:00Z",
                    "created_clsact": role == "marker",
                }
            )
        )
    return prog_id


def socket_index(dev: str) -> int:
    import socket

    return socket.if_nametoindex(dev)


def test_state_of_the_old_layout_is_moved_on_first_use(lab: Lab, tmp_path: Path):
    ns = lab.ns("mg")
    other_ns = lab.ns("mo")
    from .conftest import uid

    devs = [uid("nmg") for _ in range(3)]
    foreign = uid("nmo")
    for d in devs:
        run("ip", "link", "add", d, "type", "veth", "peer", "name", f"{d}p", ns=ns)
        run("ip", "link", "set", d, "up", ns=ns)
    run("ip", "link", "add", foreign, "type", "veth", "peer", "name", f"{foreign}p", ns=other_ns)
    cfg = nconfig.load(write_config(tmp_path, {1: TEST_KEY}, CONFIG))
    olds = [BPFFS / "netoken" / d for d in (*devs, foreign)] + [
        RUN_DIR / d for d in (*devs, foreign)
    ]
    me = Node(ns, cookie(ns))
    try:
        marker_id = _old_state(ns, devs[0], "marker", cfg)
        g1 = _old_state(ns, devs[1], "guard", cfg)
        g2 = _old_state(ns, devs[2], "guard", cfg)
        foreign_id = _old_state(other_ns, foreign, "marker", cfg)

        # The first command in NS moves NS's state, and only NS's.
        items = {d["ifname"]: d for d in me.json("status")}
        assert {k: (v["role"], v["prog"]["id"], v["state"]) for k, v in items.items()} == {
            devs[0]: ("marker", marker_id, "attached"),
            devs[1]: ("guard", g1, "attached"),
            devs[2]: ("guard", g2, "attached"),
        }
        for d in devs:
            assert not (BPFFS / "netoken" / d).exists() and not (RUN_DIR / d).exists()
        assert (BPFFS / "netoken" / foreign / "marker" / "prog").exists()
        # Moved guards keep running on their own maps until attached again.
        for d in devs[1:]:
            assert (items[d]["memory"]["shared"], items[d]["memory"]["shared_by"]) == (0, 0)
            assert items[d]["replay_cache"] == {"entries": 4096}
        assert "attach it again to share" in me.ok("status", devs[1])
        every = me.json("status", "--all-netns")
        assert any(d["ifname"] == foreign and "older netoken" in d["state"] for d in every)

        # apply reaches both sets of maps; attaching again makes them share.
        me.ok("apply", devs[2], "-c", str(cfg.path))
        for dev, old_id in ((devs[2], g2), (devs[1], g1)):
            res = json.loads(me.ok("guard", "attach", dev, "-c", str(cfg.path), "--json"))
            assert res["replaced_prog_id"] == old_id and res["shared_by"] == 2
            assert sorted(
                os.listdir(me.pins / f"if:{socket_index_in(ns, dev)}" / "guard")
            ) == sorted(["prog", *nguard.OWN_MAPS])
        items = {d["ifname"]: d for d in me.json("status")}
        for d in devs[1:]:
            assert items[d]["memory"]["shared_by"] == 2 and items[d]["memory"]["shared"] > 0
        me.ok("mark", "detach", devs[0])
        me.ok("guard", "detach", devs[1])
        me.ok("guard", "detach", devs[2])
        assert not me.pins.exists()
        assert "clsact" not in qdiscs(ns, devs[0])
        # The other namespace's state moves when netoken runs there.
        (d,) = json.loads(ok("status", "--json", ns=other_ns))
        assert (d["ifname"], d["prog"]["id"]) == (foreign, foreign_id)
        assert not (BPFFS / "netoken" / foreign).exists()
        ok("mark", "detach", foreign, ns=other_ns)
    finally:
        me.forget()
        Node(other_ns, cookie(other_ns)).forget()
        for p in olds:
            shutil.rmtree(p, ignore_errors=True)


def socket_index_in(ns: str, dev: str) -> int:
    with netns(ns):
        return socket_index(dev)


def test_an_unreachable_namespace_is_listed_with_how_to_remove_it(node, lab: Lab):
    n, cfg = node
    gone = lab.ns("ng")
    run("ip", "link", "add", "eth5", "type", "veth", "peer", "name", "peer5", ns=gone)
    ok("mark", "attach", "eth5", "-c", str(cfg), ns=gone)
    g = Node(gone, cookie(gone))
    try:
        run("ip", "netns", "del", gone)
        lab.namespaces.remove(gone)
        every = n.json("status", "--all-netns")
        (d,) = [d for d in every if d["netns"] and d["netns"]["cookie"] == g.cookie]
        assert (d["ifname"], d["role"], d["attached"]) == ("eth5", "marker", False)
        assert "not found" in d["state"] and d["remove"] == f"rm -r {g.pins} {g.run}"
    finally:
        g.forget()


def test_connections_still_flow_through_a_renamed_guard(lab: Lab, tmp_path: Path):
    from .conftest import build_topology

    t = build_topology(lab)
    cfg = write_config(
        tmp_path,
        {1: TEST_KEY},
        f"""
[[policy]]
name = "svc"
destinations = ["{t.server_ip}/32"]
ports = [{PORT}]
key = 1

[guard]
[[guard.protect]]
destinations = ["{t.server_ip}/32"]
ports = [{PORT}]
keys = [1]
""",
    )
    s = Node(t.server, cookie(t.server))
    cl = Node(t.client, cookie(t.client))
    try:
        cl.ok("mark", "attach", t.client_if, "-c", str(cfg))
        s.ok("guard", "attach", t.server_if, "-c", str(cfg))
        new = t.server_if[:-1] + "r"
        rename(t.server, t.server_if, new)
        with server(t.server, PORT):
            assert connect(t.client, t.server_ip, PORT).endswith(b"ok")
        (d,) = json.loads(s.ok("stats", new, "--json"))
        assert d["counters"]["ok"] == 1
        # apply by either name reaches it
        s.ok("apply", t.server_if, "-c", str(cfg))
        s.ok("apply", new, "-c", str(cfg))
        with (
            Program.from_pinned(
                str(s.pins / f"if:{ifindex(s.ns, new)}" / "guard" / "prog")
            ) as prog,
            Map.from_pinned(str(s.pins / "guard" / "nt_keys")),
        ):
            assert prog.id == guard_prog(s.ns, new)
    finally:
        s.forget()
        cl.forget()
