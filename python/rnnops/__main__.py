"""Command line: ``python -m rnnops bench [...]`` and ``python -m rnnops autotune [...]``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnops", description="rnnops command line")
    commands = parser.add_subparsers(dest="command", required=True)
    from .autotune import cli as autotune_cli
    from .bench import cli as bench_cli

    bench_cli.add_arguments(commands.add_parser("bench", help="time ops, backends and peers on standard cases"))
    autotune_cli.add_arguments(commands.add_parser("autotune", help="choose kernel configurations per GPU and shape"))
    args = parser.parse_args(argv)
    return {"bench": bench_cli.main, "autotune": autotune_cli.main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
