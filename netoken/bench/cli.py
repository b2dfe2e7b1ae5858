"""`netoken bench` and `python -m netoken.bench`: options, output, exit status."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import PARTS, BenchError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `netoken bench` (the CLI adds -j/--json itself)."""
    parser.add_argument(
        "--quick", action="store_true", help="fewer samples and shorter rounds (under 2 minutes)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        metavar="PART",
        help=f"run only this part ({', '.join(PARTS)}); repeatable",
    )
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="also write the results as JSON to FILE"
    )


def run(args: argparse.Namespace) -> int:
    """`netoken bench`: the table (or JSON) on stdout, progress on stderr."""

    def progress(msg: str) -> None:
        print(f"netoken bench: {msg}", file=sys.stderr, flush=True)

    from .report import format_table
    from .suite import run_all

    try:
        import scapy  # noqa: F401 - builds the benchmark's packets
    except ImportError:
        raise BenchError(
            "netoken bench needs scapy: pip install 'netoken[bench]' "
            "(or apt-get install python3-scapy)"
        ) from None

    try:
        res = run_all(quick=args.quick, progress=progress, parts=args.only or PARTS)
    except BenchError as e:
        print(f"netoken: {e}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2) + "\n")
    if getattr(args, "json", False):
        print(json.dumps(res, indent=2 if getattr(args, "pretty", False) else None))
    else:
        print(format_table(res))
    failed = [k for k in PARTS if isinstance(res.get(k), dict) and "error" in res[k]]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    import logging

    # As the CLI does: libbpf's warnings reach the user through our errors.
    logging.basicConfig(level=logging.CRITICAL)
    parser = argparse.ArgumentParser(
        prog="netoken bench", description="datapath, end-to-end and control-plane benchmarks"
    )
    parser.add_argument("-j", "--json", action="store_true", help="JSON output")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("netoken: bench interrupted; lab removed", file=sys.stderr)
        return 130
