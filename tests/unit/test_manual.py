"""The man page and the bash completion follow the CLI: every command and
option is in both, the page renders without a warning, and completion
completes what the parser accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from netoken import manual

COMMANDS = manual.commands()
LEAVES = [c for c in COMMANDS[1:] if not c.verbs]


def test_the_walk_finds_every_verb_of_the_cli():
    names = {" ".join(c.path) for c in LEAVES}
    assert {
        "mark attach",
        "mark detach",
        "guard attach",
        "guard detach",
        "status",
        "apply",
        "stats",
        "monitor",
        "key generate",
        "config check",
        "decode",
        "exporter",
        "agent",
        "demo",
        "bench",
    } <= names


def test_the_man_page_has_every_command_and_option():
    page = manual.man()
    for cmd in LEAVES:
        assert f".SS {cmd.name}" in page
        for action in cmd.options:
            assert action.option_strings[-1].replace("-", "\\-") in page, (cmd.name, action)


def test_the_man_page_renders_without_warnings(tmp_path: Path):
    page = tmp_path / "netoken.1"
    page.write_text(manual.man())
    r = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and not r.stderr, r.stderr


def test_the_completion_has_every_command_and_option():
    script = manual.bash()
    for cmd in COMMANDS:
        assert f'_netoken_verbs["{cmd.name}"]="{" ".join(cmd.verbs)}"' in script
        for action in cmd.options:
            for flag in action.option_strings:
                assert flag in script, (cmd.name, flag)


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    path = tmp_path_factory.mktemp("completion") / "netoken.bash"
    path.write_text(manual.bash())
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0

    def run(*words: str) -> list[str]:
        script = (
            f"source {path}; COMP_WORDS=(netoken {' '.join(map(repr, words))}); "
            f"COMP_CWORD={len(words)}; _netoken; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        )
        out = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, check=True
        ).stdout
        return out.split()

    return run


def test_completion_completes_objects_verbs_options_and_choices(complete):
    assert complete("gu") == ["guard"]
    assert complete("guard", "") == ["attach", "detach"]
    assert complete("-j", "mark", "") == ["attach", "detach"]
    assert "--xdp-mode" in complete("guard", "attach", "--")
    assert complete("guard", "attach", "lo", "--hook", "") == ["auto", "xdp", "tc"]
    assert complete("guard", "attach", "l") == ["lo"]  # interfaces
