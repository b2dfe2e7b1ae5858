"""The verbs that need no kernel work on a machine without libbpf (an
analyst's laptop), `config check`, and the CLI's error conventions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import TEST_KEY

# Runs the CLI with ctypes refusing to load libbpf.so.1, as on a machine
# without the package.
NO_LIBBPF = """
import ctypes, sys
_real = ctypes.CDLL
def _cdll(name, *a, **kw):
    if name and "libbpf" in str(name):
        raise OSError(f"{name}: cannot open shared object file")
    return _real(name, *a, **kw)
ctypes.CDLL = _cdll
from netoken.cli import main
sys.exit(main(sys.argv[1:]))
"""


def netoken(*argv: str, libbpf: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "netoken"] if libbpf else [sys.executable, "-c", NO_LIBBPF]
    return subprocess.run([*cmd, *argv], check=False, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["decode", "--help"],
        ["key", "--help"],
        ["config", "check", "--help"],
        ["status", "--help"],
    ],
)
def test_help_without_libbpf(argv):
    r = netoken(*argv, libbpf=False)
    assert r.returncode == 0, r.stderr
    assert "usage: netoken" in r.stdout and not r.stderr


def test_kernel_verb_without_libbpf_is_one_line(tmp_path):
    r = netoken("mark", "attach", "lo", "-c", _config(tmp_path, ""), libbpf=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "netoken: libbpf.so.1 not found: install the libbpf1 package (apt-get install libbpf1)"
    ]


def _config(tmp_path, body: str) -> str:
    key = tmp_path / "1.key"
    key.write_text(TEST_KEY.hex() + "\n")
    key.chmod(0o600)
    cfg = tmp_path / "netoken.toml"
    cfg.write_text(f'[[key]]\nid = 1\nfile = "{key}"\nwindow = 30\n' + body)
    return str(cfg)


def test_config_check_valid_without_libbpf(tmp_path):
    cfg = _config(
        tmp_path,
        '[[policy]]\nname = "p"\ndestinations = ["198.18.0.0/15"]\n'
        "key = 1\n[guard]\n[[guard.protect]]\n"
        'destinations = ["198.18.0.2/32"]\nkeys = [1]\n',
    )
    r = netoken("config", "check", cfg, libbpf=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{cfg}: valid: key id 1, 1 policy, 1 protect entry\n"
    r = netoken("--json", "config", "check", cfg, libbpf=False)
    assert json.loads(r.stdout) == {
        "file": cfg,
        "valid": True,
        "keys": [1],
        "policies": 1,
        "protect": 1,
        "schedule": {"in_use": {"p": 1}, "next_switch": None},
        "agent": None,
    }


def test_config_check_shows_the_key_schedule_and_the_agent(tmp_path):
    """What a fleet push will do, before it is pushed."""
    key2 = tmp_path / "2.key"
    key2.write_text(TEST_KEY.hex() + "\n")
    key2.chmod(0o400)
    cfg = _config(
        tmp_path,
        f'[[key]]\nid = 2\nfile = "{key2}"\n'
        "mark_from = 2999-01-01T00:00:00+02:00\n"
        '[[policy]]\nname = "p"\ndestinations = ["198.18.0.0/15"]\n'
        'keys = [1, 2]\n[agent]\nmark = ["eth0", "lxc*"]\n',
    )
    r = netoken("config", "check", cfg, libbpf=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == [
        "  keys in use now: p key 1",
        (
            "  schedule next switch 2998-12-31T22:00:00Z: p -> key 2 (performed by `netoken "
            "agent`; without it, run `netoken apply` then)"
        ),
        "  agent: marker on eth0 lxc*, guard on nothing, metrics off",
    ]
    d = json.loads(netoken("--json", "config", "check", cfg, libbpf=False).stdout)
    assert d["schedule"] == {
        "in_use": {"p": 1},
        "next_switch": {"at": "2998-12-31T22:00:00Z", "policies": {"p": 2}},
    }
    assert d["agent"] == {"mark": ["eth0", "lxc*"], "guard": [], "metrics": None}


def test_config_check_names_file_entry_and_problem(tmp_path):
    cfg = _config(tmp_path, '[[policy]]\nname = "p"\ndestinations = ["198.18.0.0/33"]\nkey = 1\n')
    r = netoken("config", "check", cfg)
    assert r.returncode == 1 and not r.stdout
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"netoken: {cfg}: ") and "198.18.0.0/33" in line


def test_json_errors_go_to_stdout_with_the_same_exit_code(tmp_path):
    missing = str(tmp_path / "nope.toml")
    plain = netoken("config", "check", missing)
    as_json = netoken("--json", "config", "check", missing)
    assert plain.returncode == as_json.returncode == 1
    assert json.loads(as_json.stdout) == {"error": plain.stderr.strip().removeprefix("netoken: ")}


def test_config_defaults_to_etc_netoken():
    r = netoken("config", "check", "--help")
    assert "/etc/netoken/netoken.toml" in r.stdout
