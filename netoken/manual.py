"""The man page and the bash completion of `netoken`, made from its parser.

``make build`` writes build/netoken.1 and build/netoken.bash with
``python -m netoken.manual --man`` and ``--bash``.  Both are read off the
argparse parser that runs the command (cli.build_parser), so a verb or an
option appears in them the moment the CLI has it, with the CLI's own help
text; the tests check that every command and option is in both.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from . import __version__
from .cli import DEFAULT_CONFIG, PROG, build_parser

# What a value is, by its metavar, for completion.
FILES = ("FILE", "PCAP", "PATH")
INTERFACES = ("IFACE",)
NAMESPACES = ("NAME",)


@dataclass(frozen=True)
class Command:
    """One command of the tree: `netoken PATH...`, its parser, its help."""

    path: tuple[str, ...]
    parser: argparse.ArgumentParser
    help: str
    verbs: tuple[str, ...]  # its subcommands (an object's verbs), if any

    @property
    def name(self) -> str:
        return " ".join((PROG, *self.path))

    @property
    def options(self) -> list[argparse.Action]:
        return [
            a
            for a in self.parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)
        ]

    @property
    def positionals(self) -> list[argparse.Action]:
        return [
            a
            for a in self.parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
        ]


def commands(parser: argparse.ArgumentParser | None = None) -> list[Command]:
    """Every command, the top level first, then depth first in the CLI's order."""
    return list(_walk(parser or build_parser(), (), None))


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...], help_: str | None
) -> Iterator[Command]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {c.dest: c.help or "" for s in subs for c in s._choices_actions}
    verbs = tuple(name for s in subs for name in s.choices)
    yield Command(path, parser, parser.description or help_ or "", verbs)
    for s in subs:
        for name, sub in s.choices.items():
            yield from _walk(sub, (*path, name), helps.get(name))


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    # argparse's own expansion of %(default)s and friends
    return parser._get_formatter()._expand_help(action) if action.help else ""


def _name(action: argparse.Action) -> str:
    """What the help calls ACTION's value (netoken never gives a tuple metavar)."""
    return str(action.metavar or action.dest.upper())


def _value(action: argparse.Action) -> str | None:
    """How an option's value is written (None: it takes none)."""
    if action.nargs == 0:
        return None
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return _name(action)


def synopsis(cmd: Command) -> list[str]:
    """CMD's usage as words: options in brackets, then its arguments."""
    words = []
    for a in cmd.options:
        value = _value(a)
        words.append(f"[{a.option_strings[0]}{' ' + value if value else ''}]")
    for a in cmd.positionals:
        name = _name(a)
        words.append(f"[{name}]" if a.nargs == "?" else name)
    if cmd.verbs:
        words.append("{" + ",".join(cmd.verbs) + "} ...")
    return words


# --------------------------------------------------------------------------
# the man page


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def _bold(text: str) -> str:
    return f"\\fB{_roff(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{_roff(text)}\\fR"


def _examples(epilog: str | None) -> list[str]:
    lines = (epilog or "").splitlines()
    return [ln.strip() for ln in lines if ln.startswith("  ") and ln.strip()]


def man(parser: argparse.ArgumentParser | None = None) -> str:
    """The man page, section 1, in roff (man macros)."""
    parser = parser or build_parser()
    cmds = commands(parser)
    top, rest = cmds[0], [c for c in cmds[1:] if not c.verbs]
    out = [
        f'.TH NETOKEN 1 "" "{PROG} {__version__}" "User Commands"',
        ".SH NAME",
        f"{PROG} \\- {_roff(top.help[0].lower() + top.help[1:].rstrip('.'))}",
        ".SH SYNOPSIS",
        f"{_bold(PROG)} [\\fIOPTIONS\\fR] \\fIOBJECT\\fR [\\fIVERB\\fR] [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        _roff(top.help),
        _DESCRIPTION,
        ".SH OPTIONS",
    ]
    out += _option_items(top)
    shared = {o for a in top.options for o in a.option_strings}
    out.append(".SH COMMANDS")
    for cmd in rest:
        out.append(f".SS {_roff(cmd.name)}")
        out.append(f"{_bold(cmd.name)} {' '.join(_roff(w) for w in synopsis(cmd))}")
        out.append(".PP")
        out.append(_roff(cmd.help))
        out += _option_items(cmd, shared)
        for action in cmd.positionals:
            if action.help:
                out += [".TP", _italic(_name(action)), _roff(_help(cmd.parser, action))]
        examples = _examples(cmd.parser.epilog)
        if examples:
            out += [".PP", "Examples:", ".RS", ".nf", *map(_roff, examples), ".fi", ".RE"]
    out += [".SH EXAMPLES", ".nf", *map(_roff, _examples(parser.epilog)), ".fi", ".SH FILES"]
    for path, what in _FILES:
        out += [".TP", _italic(path), _roff(what)]
    out += [".SH EXIT STATUS", _roff(_EXIT), ".SH SEE ALSO", _SEE_ALSO]
    return "\n".join(out) + "\n"


_DESCRIPTION = _roff(
    "Each command is one call of the netoken library.  With --json (and --pretty) a "
    'command prints its result as JSON instead, errors included, as {"error": "..."} '
    "on standard output."
)
_FILES = (
    (DEFAULT_CONFIG, "The config read by -c by default (TOML; docs/design.md)."),
    ("/sys/fs/bpf/netoken/", "Pinned programs and maps, by network namespace, interface, role."),
    ("/run/netoken/", "What the pins cannot say (names, config path, times), and the lock."),
)
_EXIT = (
    "0 on success, 1 on an error (one line on standard error, or the "
    '{"error": ...} object under --json), 2 on a usage error.'
)
_SEE_ALSO = (
    "\\fBbpftool\\fR(8), \\fBtc\\fR(8), \\fBip-netns\\fR(8); docs/design.md "
    "(wire format, config and CLI), docs/operations.md, docs/architecture.md."
)


def _option_items(cmd: Command, skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """CMD's options as .TP items, but for those in SKIP (the global ones)."""
    out = []
    for a in cmd.options:
        if set(a.option_strings) <= skip:
            continue
        value = _value(a)
        names = ", ".join(_bold(o) for o in a.option_strings)
        out += [".TP", names + (f" {_italic(value)}" if value else ""), _roff(_help(cmd.parser, a))]
    return out


# --------------------------------------------------------------------------
# bash completion


def _kind(action: argparse.Action) -> str:
    """What completes ACTION's value: words, files, interfaces, namespaces."""
    if action.choices:
        return "words " + " ".join(map(str, action.choices))
    metavar = _name(action)
    if metavar in FILES or metavar.startswith("FILE"):
        return "files"
    if metavar in INTERFACES:
        return "interfaces"
    if metavar in NAMESPACES and "--netns" in action.option_strings:
        return "namespaces"
    return "none"


def bash(parser: argparse.ArgumentParser | None = None) -> str:
    """A bash completion script: commands, options, choices, files,
    interfaces and `ip netns` names where the CLI takes them."""
    rows: list[tuple[str, str, str]] = []  # (table, key, value)
    for cmd in commands(parser):
        key = cmd.name
        rows.append(("verbs", key, " ".join(cmd.verbs)))
        words = ["-h", "--help", *(o for a in cmd.options for o in a.option_strings)]
        rows.append(("opts", key, " ".join(words)))
        rows += [
            ("value", f"{key}|{o}", _kind(a))
            for a in cmd.options
            if a.nargs != 0
            for o in a.option_strings
        ]
        if cmd.positionals:
            rows.append(("arg", key, _kind(cmd.positionals[0])))
    tables = "\n".join(f'_{PROG}_{table}["{key}"]="{value}"' for table, key, value in rows)
    return _BASH.format(prog=PROG, tables=tables)


# The tables say, by command (`netoken guard attach`): its verbs, its options,
# what completes an option's value (key "COMMAND|OPTION") and an argument.
_BASH = r"""# bash completion for {prog}; generated by `python -m netoken.manual --bash`.
# Install: cp netoken.bash /usr/share/bash-completion/completions/{prog}

declare -gA _{prog}_verbs _{prog}_opts _{prog}_value _{prog}_arg
{tables}

_{prog}_complete() {{
    local cur=$1 kind=$2
    shift 2
    case "$kind" in
        words) COMPREPLY=($(compgen -W "$*" -- "$cur")) ;;
        files) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")) ;;
        interfaces) COMPREPLY=($(compgen -W "$(ls /sys/class/net 2>/dev/null)" -- "$cur")) ;;
        namespaces) COMPREPLY=($(compgen -W "$(ip netns list 2>/dev/null | cut -d' ' -f1)" \
                                 -- "$cur")) ;;
    esac
}}

_{prog}() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} cmd={prog} i=1 w kind
    COMPREPLY=()
    # The command typed so far: its verbs, skipping options and their values.
    while (( i < COMP_CWORD )); do
        w=${{COMP_WORDS[i]}}
        if [[ $w == -* ]]; then
            [[ -n ${{_{prog}_value["$cmd|$w"]}} ]] && (( i++ ))
        elif [[ " ${{_{prog}_verbs["$cmd"]}} " == *" $w "* ]]; then
            cmd="$cmd $w"
        fi
        (( i++ ))
    done
    kind=${{_{prog}_value["$cmd|${{COMP_WORDS[COMP_CWORD-1]}}"]}}
    if (( COMP_CWORD > 1 )) && [[ -n $kind ]]; then
        _{prog}_complete "$cur" $kind
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${{_{prog}_opts["$cmd"]}}" -- "$cur"))
    elif [[ -n ${{_{prog}_verbs["$cmd"]}} ]]; then
        COMPREPLY=($(compgen -W "${{_{prog}_verbs["$cmd"]}}" -- "$cur"))
    else
        _{prog}_complete "$cur" ${{_{prog}_arg["$cmd"]:-none}}
    fi
}}

complete -F _{prog} {prog}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m netoken.manual", description="Write netoken's man page or bash completion."
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--man", action="store_true", help="the man page (roff)")
    what.add_argument("--bash", action="store_true", help="the bash completion script")
    args = p.parse_args(argv)
    sys.stdout.write(man() if args.man else bash())
    return 0


if __name__ == "__main__":
    sys.exit(main())
