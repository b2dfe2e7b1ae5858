"""docs/operations.md runs: its commands, its config reference, its queries.

Conventions the doc follows (and this file enforces):

- Every ```sh block runs, in document order, as one `bash -euo pipefail`
  script, so every command in it must succeed.  An HTML comment on the line
  right before the fence, ``<!-- notest: REASON -->``, skips the block (it is
  invisible in the rendered page; REASON is mandatory).  Use it only for what
  cannot run here: package installs, systemctl (no systemd as PID 1 in CI),
  commands that wait for traffic, verbs not wired in the CLI yet.
- ``<!-- file: PATH -->`` right before a ```toml block writes the block to
  PATH, so the commands after it run with the doc's own config.
- In a table whose header has a ``Command`` column, each inline code span in
  that column runs too; a cell containing ``<!-- notest -->`` is skipped.
  Pipes inside such code are written ``\\|`` (GitHub tables need that).
- Even skipped commands must be real: every ``netoken ...`` in any ```sh
  block must parse with the CLI's own parser, and every unit name must exist
  in contrib/systemd.

The sandbox: ``/etc/netoken`` is rewritten to a temporary directory and
``/opt/netoken`` (where the doc installs the repository) to this checkout; the
commands run in a private network namespace whose veth is named ``eth0`` (so
attach, status, stats and detach act on a real kernel), with this checkout's
``netoken`` first on PATH.  ``syn.pcap``, which the doc captures with tcpdump
(a notest step: it waits for traffic), is made before the first command that
uses it from what the real marker emits under the config in place then.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from netoken import config as nconfig
from netoken.cli import build_parser
from netoken.marker import Marker
from netoken.netns import netns
from netoken.state import RUN_DIR, this_netns

from .conftest import Lab, write_key
from .pkt import LINUX_SYN_OPTS, syn
from .test_contrib import LABELS, TARGET_LABELS, metric_names, promql_selectors

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
BIN = Path(sys.executable).parent
BPFFS = Path("/sys/fs/bpf/netoken")

_FENCE = re.compile(r"^```(\w*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*(notest|file):\s*(.*?)\s*-->$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_CODE = re.compile(r"`([^`]+)`")


@dataclass
class Unit:
    """Something the doc shows: a fenced block or a command in a table."""

    kind: str  # "sh", "toml", "promql", ... or "cell"
    text: str
    line: int
    directive: tuple[str, str] | None = None


def doc_units(text: str = "") -> list[Unit]:
    lines = (text or DOC.read_text()).splitlines()
    out: list[Unit] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            d = _DIRECTIVE.match(lines[i - 1].strip()) if i else None
            out.append(
                Unit(
                    m.group(1),
                    "\n".join(lines[i + 1 : end]),
                    i + 2,
                    (d.group(1), d.group(2)) if d else None,
                )
            )
            i = end + 1
            continue
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            header = [c.strip() for c in _CELL_SPLIT.split(lines[i].strip("|"))]
            col = header.index("Command") if "Command" in header else None
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = _CELL_SPLIT.split(lines[i].strip().strip("|"))
                if col is not None and "<!-- notest" not in cells[col]:
                    for code in _CODE.findall(cells[col]):
                        out.append(Unit("cell", code.replace("\\|", "|"), i + 1))
                i += 1
            continue
        i += 1
    return out


def shell_commands(script: str) -> list[list[str]]:
    """argv of each simple command in a shell script (quote-aware; comments dropped)."""
    out: list[list[str]] = []
    for line in re.sub(r"\\\n", " ", script).splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.commenters = "#"
        out.append([])
        for tok in lex:
            if set(tok) <= set("|&;"):
                out.append([])
            else:
                out[-1].append(tok)
    return [argv for argv in out if argv]


# ---------------------------------------------------------------- static checks


def test_doc_conventions_are_followed():
    units = doc_units()
    for u in units:
        if u.directive:
            what, arg = u.directive
            assert arg, f"line {u.line}: {what} needs an argument (a reason or a path)"
            assert (what, u.kind) in (("notest", "sh"), ("file", "toml")), (u.line, what, u.kind)
    runnable = [u for u in units if u.kind == "cell" or (u.kind == "sh" and not u.directive)]
    assert len(runnable) >= 15, "most of the doc must run; see the conventions above"


def test_every_netoken_command_shown_parses():
    parser = build_parser()
    units = [u for u in doc_units() if u.kind in ("sh", "cell")]
    count = 0
    for u in units:
        for argv in shell_commands(u.text):
            if argv[0] == "netoken":
                try:
                    parser.parse_args(argv[1:])
                except SystemExit:
                    pytest.fail(
                        f"docs/operations.md:{u.line}: `{shlex.join(argv)}` is not a "
                        "netoken command"
                    )
                count += 1
    assert count >= 15


def test_unit_names_in_the_doc_exist():
    text = DOC.read_text()
    names = set(re.findall(r"netoken-(?:mark|guard)@|netoken-exporter\.service", text))
    templates = {
        p.name.split("@")[0] + "@" if "@" in p.name else p.name
        for p in (ROOT / "contrib" / "systemd").glob("*.service")
    }
    assert names and names <= templates, names - templates


def config_reference() -> dict[str, list[str]]:
    """dotted key -> its table row cells, from the doc's config reference."""
    text = DOC.read_text()
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in _CELL_SPLIT.split(line.strip().strip("|"))]
        m = re.fullmatch(r"`([a-z_.]+)`", cells[0]) if line.startswith("|") else None
        if m:
            rows[m.group(1)] = cells
    return rows


def loader_keys() -> set[str]:
    # The loader's own allow-lists: the doc must follow them, not a copy.
    tables = {
        "option": nconfig._OPTION_KEYS,
        "key": nconfig._KEY_KEYS,
        "policy": nconfig._POLICY_KEYS,
        "guard": nconfig._GUARD_KEYS,
        "guard.protect": nconfig._PROTECT_KEYS,
        "agent": nconfig._AGENT_KEYS,
    }
    assert set(nconfig._TOP_KEYS) == {"option", "key", "policy", "guard", "agent"}
    return {f"{t}.{k}" for t, keys in tables.items() for k in keys}


def test_config_reference_matches_the_loader():
    documented = set(config_reference())
    accepted = loader_keys()
    assert documented == accepted, (
        f"missing from the doc: {sorted(accepted - documented)}; "
        f"not accepted by the loader: {sorted(documented - accepted)}"
    )


MINIMAL = """
[[key]]
id = 1
file = "{key}"
[[policy]]
name = "p"
destinations = ["192.0.2.0/24"]
key = 1
[guard]
[[guard.protect]]
destinations = ["192.0.2.0/24"]
keys = [1]
"""

# How each documented default shows in the loaded Config.
DEFAULT_OF = {
    "option.kind": lambda c: c.option.kind,
    "option.exid": lambda c: c.option.exid,
    "key.window": lambda c: c.keys[1].window,
    "key.bind": lambda c: list(c.keys[1].bind),
    "policy.ports": lambda c: list(c.policies[0].ports),
    "policy.mode": lambda c: c.policies[0].mode,
    "guard.action": lambda c: c.guard.action,
    "guard.skew": lambda c: c.guard.skew,
    "guard.replay_cache": lambda c: c.guard.replay_cache,
    "guard.protect.ports": lambda c: list(c.guard.protect[0].ports),
    "guard.protect.tokens": lambda c: list(c.guard.protect[0].tokens),
}


def test_documented_defaults_and_limits_are_the_loaders(tmp_path):
    cfg = nconfig.parse(MINIMAL.format(key=write_key(tmp_path)), path="minimal.toml")
    rows = config_reference()
    for key, get in DEFAULT_OF.items():
        default = rows[key][2].strip("`")
        want = tomllib.loads(f"v = {default}")["v"]
        assert get(cfg) == want, (key, default)
    limits = {
        "key.window": nconfig.MAX_WINDOW,
        "guard.skew": nconfig.MAX_SKEW,
        "guard.replay_cache": nconfig.MAX_REPLAY_CACHE,
    }
    for key, limit in limits.items():
        assert f"{limit:,}".replace(",", "") in " ".join(rows[key]).replace(",", ""), key
    assert str(nconfig.MIN_REPLAY_CACHE) in " ".join(rows["guard.replay_cache"]).replace(",", "")


def test_every_metric_is_documented_and_queries_name_real_metrics():
    text = DOC.read_text()
    for name in metric_names():
        assert f"`{name}`" in text, name
    queries = [u.text for u in doc_units() if u.kind == "promql"]
    assert len(queries) >= 4
    for q in queries:
        for expr in q.split("\n\n"):
            expr = " ".join(line for line in expr.splitlines() if not line.startswith("#"))
            selectors, grouping = promql_selectors(expr)
            assert selectors, expr
            labels = set(TARGET_LABELS)
            for metric, _ in selectors:
                assert metric in LABELS, f"{metric} in {expr!r} is not an exported metric"
                labels |= LABELS[metric]
            assert grouping <= labels, (grouping, expr)


# ---------------------------------------------------------------- running it


def _make_syn_pcap(path: Path, config: Path) -> None:
    """What a capture on the client would hold: one marked SYN, one not."""
    cfg = nconfig.load(config)
    policy = cfg.policies[0]
    net = policy.destinations[0]
    dst = str(net.network_address + 10 if net.num_addresses > 16 else net.network_address)
    port = policy.ports[0].lo if policy.ports else 443
    plain = syn(dst=dst, dport=port, options=LINUX_SYN_OPTS)
    with Marker.load() as m:
        m.configure(cfg)
        marked = m.prog.test_run(plain).data_out
    wrpcap(str(path), [Ether(marked), Ether(plain)])
    assert ipaddress.ip_address(dst) in net


def test_operations_doc_runs(tmp_path):
    root, work, bindir = tmp_path / "root", tmp_path / "work", tmp_path / "bin"
    for d in (root, work, bindir):
        d.mkdir()
    env = dict(os.environ, PATH=f"{bindir}:{BIN}:{os.environ['PATH']}")

    def sandboxed(text: str) -> str:
        return text.replace("/etc/netoken", f"{root}/etc/netoken").replace(
            "/opt/netoken", str(ROOT)
        )

    lab = Lab()
    ns = lab.ns("doc")
    with netns(ns):
        cookie = this_netns().cookie

    def sh(script: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns}", "bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    try:
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"],
            check=True,
        )
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0p", "up"], check=True)
        ran = 0
        for u in doc_units():
            if u.directive and u.directive[0] == "file":
                path = Path(sandboxed(u.directive[1]))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(sandboxed(u.text) + "\n")
                continue
            if u.kind not in ("sh", "cell") or u.directive:
                continue
            if "syn.pcap" in u.text and not (work / "syn.pcap").exists():
                _make_syn_pcap(work / "syn.pcap", root / "etc/netoken/netoken.toml")
            r = sh(sandboxed(u.text))
            assert r.returncode == 0, (
                f"docs/operations.md:{u.line} failed (exit {r.returncode}):\n{u.text}\n"
                f"--- stdout\n{r.stdout}--- stderr\n{r.stderr}"
            )
            ran += 1
        assert ran >= 15
    finally:
        sh(
            "netoken mark detach eth0 >/dev/null 2>&1 || true; "
            "netoken guard detach eth0 >/dev/null 2>&1 || true"
        )
        lab.close()
        # State is per namespace: the sandbox's own, whatever the doc left.
        for top in (BPFFS, RUN_DIR):
            shutil.rmtree(top / f"net:{cookie}", ignore_errors=True)
