"""Command line: ``python -m rnnops bench [...]``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnops", description="rnnops command line")
    commands = parser.add_subparsers(dest="command", required=True)
    from .bench import cli as bench_cli

    bench_cli.add_arguments(commands.add_parser("bench", help="time ops, backends and peers on standard cases"))
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_cli.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
