"""``python -m rnnops autotune``: tune, explain, export and import kernel configurations.

    python -m rnnops autotune [--ops OP ...] [--shapes SHAPE ...] [--budget-s N] [--top K] [--fraction F]
                              [--compile-workers N] [--exhaustive] [--export FILE | --import FILE]
    python -m rnnops autotune --gpu NAME --dry-run [--compile-check] [--export FILE]    (no GPU needed)
    python -m rnnops autotune --explain OP SHAPE [--gpu NAME] [--compile-check]

SHAPE is name=value pairs: "B=8,T=4096,H=16,K=128,V=128,gate=per-key".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import cache, kernels, tuner
from .hardware import from_device, named


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", nargs="+", default=["all"], choices=["all", *kernels.SHAPE_NAMES],
                        help="op families to tune (default: all)")
    parser.add_argument("--shapes", nargs="+", metavar="SHAPE", help="shapes instead of the standard GPU cases")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="stop measuring after this long (one bucket per kernel shape comes first; an untuned "
                             "bucket takes the nearest tuned size)")
    parser.add_argument("--top", type=int, default=2,
                        help="the model's best configurations measured first (with the default), where the search "
                             "starts")
    parser.add_argument("--fraction", type=float, default=0.1,
                        help="measure at most this fraction of each legal space (at least 4 configurations)")
    parser.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="processes that compile each search round's configurations side by side before they "
                             "are timed (0: compile in the timed process; default min(8, CPUs))")
    parser.add_argument("--exhaustive", action="store_true",
                        help="measure every legal configuration, and report how close the search alone gets and "
                             "how many it measures (the search's own check: slow, name --ops and --shapes)")
    parser.add_argument("--try", dest="tries", nargs="+", type=json.loads, metavar="CHANGE",
                        help="measure the configuration shipped for the GPU and it with each change (JSON, e.g. "
                             "'{\"num_warps\": 4}'), nothing else, and store nothing: an A/B check")
    parser.add_argument("--dtype", choices=sorted(tuner.DTYPES), default="bfloat16")
    parser.add_argument("--gpu", help="an offline GPU (V100, A100, L4, RTX 4090, H100, H200) for --dry-run / --explain")
    parser.add_argument("--dry-run", action="store_true", help="solve and rank only (works without a GPU)")
    parser.add_argument("--compile-check", action="store_true",
                        help="with --dry-run: compile the best-ranked Triton configurations for the GPU's architecture "
                             "and keep the first that spills no registers (how autotune/defaults/ are made); with "
                             "--explain: show ptxas' registers, spills and shared memory of each ranked configuration")
    parser.add_argument("--explain", nargs=2, metavar=("OP", "SHAPE"), help="constraints, counts and the ranking")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--export", type=Path, metavar="FILE", help="write the chosen configurations")
    group.add_argument("--import", dest="import_", type=Path, metavar="FILE", help="merge configurations into the cache")


def _hardware(args):
    if args.gpu:
        return named(args.gpu)
    if not torch.cuda.is_available():
        raise SystemExit("autotune: no GPU here; name one with --gpu NAME (and --dry-run) to solve and rank offline")
    return from_device()


def table(results: list[tuner.Result]) -> str:
    """One row per tuned bucket, then the tuning's wall time per op (each bucket's 'tune s':
    compiling, vetting and measuring its configurations)."""
    from rnnops.bench.report import format_table

    lines, per_op = [], {}
    for r in results:
        config = ", ".join(f"{k}={v}" for k, v in r.config.items())
        lines.append((r.op, r.backend, r.bucket, config, "-" if r.seconds is None else f"{r.seconds * 1e3:.3f}",
                      "-" if r.speedup is None else f"{r.speedup:.2f}x", str(r.legal), str(r.measured),
                      f"{r.wall_seconds:.1f}", "; ".join(r.notes)[:60]))
        per_op[r.op] = per_op.get(r.op, 0.0) + r.wall_seconds
    spent = ", ".join(f"{op} {seconds:.1f} s" for op, seconds in per_op.items())
    return "\n".join([format_table(("op", "backend", "bucket", "config", "ms", "x default", "legal", "measured",
                                    "tune s", "notes"), lines),
                      f"tuning wall time per op: {spent} (total {sum(per_op.values()):.1f} s)"])


def tries_table(results: list[tuner.Result]) -> str:
    """--try: each measured configuration's time against the first (the shipped one); then, per
    change profiled, the kernels whose time moved by 3% or more (shipped ms -> changed ms); then
    the notes (why a change failed or was not tried)."""
    from rnnops.bench.report import format_table

    lines, moved = [], []
    notes = [f"note: {r.backend}.{r.op} {note}" for r in results for note in r.notes]
    for r in results:
        if not r.timings:
            continue
        base, base_seconds = r.timings[0]
        for i, (config, seconds) in enumerate(r.timings):
            change = {k: v for k, v in config.items() if base.get(k) != v} or "shipped"
            speedup = f"{base_seconds / seconds:.2f}x" if seconds and base_seconds else "-"
            lines.append((r.op, r.backend, r.bucket, str(change),
                          "failed" if seconds is None else f"{seconds * 1e3:.3f}", speedup))
            if 0 < i < len(r.kernel_seconds):
                moved.append(f"kernels: {r.op} {r.bucket} {change}: "
                             + (kernel_moves(r.kernel_seconds[0], r.kernel_seconds[i]) or "none moved 3%"))
    return "\n".join([format_table(("op", "backend", "bucket", "change", "ms", "x shipped"), lines), *moved, *notes])


def kernel_moves(shipped: dict[str, float], changed: dict[str, float], threshold: float = 0.03) -> str:
    """The kernels whose time differs by ``threshold`` or more between two profiles ({name:
    seconds}), largest difference first, as "name 1.128 -> 0.612 ms" (a kernel only one ran: "-")."""
    def ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1e3:.3f}"

    names = sorted(set(shipped) | set(changed), key=lambda n: -abs(changed.get(n, 0.0) - shipped.get(n, 0.0)))
    parts = []
    for name in names:
        before, after = shipped.get(name), changed.get(name)
        if before and after and abs(after - before) < threshold * before:
            continue
        parts.append(f"{name[:40]} {ms(before)} -> {ms(after)} ms")
    return ", ".join(parts)


def main(args: argparse.Namespace) -> int:
    dtype = tuner.DTYPES[args.dtype]
    if args.explain:
        op, text = args.explain
        try:
            shape = tuner.parse_shape(text)
            kernels.check_shape(op, shape)
        except ValueError as error:
            raise SystemExit(f"autotune: --explain: {error}") from None
        screen = tuner.CompileScreen() if args.compile_check else None
        print(tuner.explain(op, shape, _hardware(args), dtype, screen))
        return 0
    try:  # every shape must fit every op tuned (an rnn shape has no K for linear attention)
        shapes = [tuner.parse_shape(s) for s in args.shapes] if args.shapes else None
        for tunable in kernels.tunables(args.ops) if shapes else ():
            for shape in shapes:
                kernels.check_shape(tunable.op, shape)
    except ValueError as error:
        raise SystemExit(f"autotune: --shapes: {error}") from None
    if args.import_:
        if not torch.cuda.is_available():
            raise SystemExit("autotune: --import needs the GPU whose cache it fills")
        cache.for_device(torch.device("cuda")).put(json.loads(args.import_.read_text())["entries"])
        print(f"imported {args.import_}")
        return 0
    if args.dry_run:
        screen = tuner.CompileScreen() if args.compile_check else None
        results = tuner.dry_run(args.ops, _hardware(args), dtype, shapes, screen,
                                progress=lambda text: print(text, file=sys.stderr))
        print(table(results))
        if args.export:
            # (a bucket with no legal configuration ships none: its launches say why they cannot run)
            chosen = {cache.key(r.op, r.backend, r.bucket): r.config for r in results if r.legal}
            args.export.write_text(json.dumps(chosen, indent=1, sort_keys=True) + "\n")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("autotune: measuring needs a GPU; use --gpu NAME --dry-run to solve and rank offline")
    device = torch.device("cuda")

    def progress(text: str) -> None:
        sys.stderr.write("\r\033[K" + text[:150] if sys.stderr.isatty() else text + "\n")
        sys.stderr.flush()

    results = tuner.tune(args.ops, device, dtype, from_device(), top=args.top, fraction=args.fraction,
                         budget_s=args.budget_s, shapes=shapes, exhaustive=args.exhaustive, tries=args.tries,
                         compile_workers=args.compile_workers, progress=progress)
    print(tries_table(results) if args.tries else table(results))
    if args.export:
        device_cache = cache.for_device(device)
        args.export.write_text(json.dumps({"format": cache.FORMAT, "identity": device_cache.identity,
                                           "entries": device_cache.entries}, indent=1) + "\n")
    return 0
