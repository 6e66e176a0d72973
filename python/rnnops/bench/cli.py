"""``python -m rnnops bench``: run the standard cases, print a table, optionally write JSON.

Each target (backend or peer) is first checked against the case's baseline output (relative
error reported), then timed forward (under no_grad) and forward+backward (random cotangent),
median over repeats after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import rnnops

from .cases import Case, standard_cases
from .timing import Timing, measure

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the small standard set (about a minute on a CPU)")
    parser.add_argument("--ops", nargs="+", metavar="OP", help="only these op families (e.g. linear_attn rnn)")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="only these backends (peers and each case's baseline always run)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (at least)")
    parser.add_argument("--out", type=Path, help="directory for results.json")


def _select(cases: list[Case], args) -> list[Case]:
    known = sorted({case.op for case in cases})
    if args.ops:
        unknown = sorted(set(args.ops) - set(known))
        if unknown:
            raise SystemExit(f"bench: unknown op(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [c for c in cases if (c.quick or not args.quick) and (not args.ops or c.op in args.ops)]


def _targets(case: Case, backends) -> list[str]:
    return [t for t in case.targets if t == case.baseline or t not in rnnops._dispatch.BACKENDS
            or backends is None or t in backends]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _fwd_bwd(case: Case, inputs: dict, target: str, cotangent: torch.Tensor):
    leaves = [x for x in inputs.values() if isinstance(x, torch.Tensor) and x.requires_grad]
    leaves += [p for m in inputs.get("modules", {}).values() for p in m.parameters()]

    def step():
        for leaf in leaves:
            leaf.grad = None
        case.run(inputs, target).backward(cotangent)

    return step


def run_case(case: Case, device: torch.device, dtype: torch.dtype, backends, repeats: int, log) -> list[dict]:
    torch.manual_seed(0)
    inputs = case.make(device, dtype)
    targets = _targets(case, backends)
    with torch.no_grad():
        outputs = {t: case.run(inputs, t) for t in targets}
    rows = []
    for target in targets:
        with torch.no_grad():
            fwd = measure(lambda: case.run(inputs, target), device, repeats=repeats, min_seconds=0.3,
                          max_seconds=2.0)
        rows.append({"op": case.op, "case": case.name, "shape": case.shape, "target": target,
                     "baseline": case.baseline, "rel_err": _rel_err(outputs[target], outputs[case.baseline]),
                     "fwd": fwd})
        log(f"  {target:18s} fwd {fwd.median * 1e3:9.2f} ms")
    for x in inputs.values():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x.requires_grad_(True)
    cotangent = torch.randn_like(outputs[case.baseline])
    for row in rows:
        timing = measure(_fwd_bwd(case, inputs, row["target"], cotangent), device, repeats=repeats, min_seconds=0.3,
                         max_seconds=2.0)
        row["fwd_bwd"] = timing
        log(f"  {row['target']:18s} fwd+bwd {timing.median * 1e3:9.2f} ms")
    return rows


def _speedup(rows: list[dict], row: dict, key: str) -> float:
    base = next(r for r in rows if r["case"] == row["case"] and r["target"] == row["baseline"])
    return base[key].median / row[key].median


def format_table(rows: list[dict]) -> str:
    header = ("op", "case", "target", "fwd ms", "x base", "fwd+bwd ms", "x base", "rel err", "baseline")
    lines = [header]
    for row in rows:
        lines.append((row["op"], row["case"], row["target"], f"{row['fwd'].median * 1e3:.2f}",
                      f"{_speedup(rows, row, 'fwd'):.1f}", f"{row['fwd_bwd'].median * 1e3:.2f}",
                      f"{_speedup(rows, row, 'fwd_bwd'):.1f}", f"{row['rel_err']:.1e}", row["baseline"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def environment(device: torch.device) -> dict:
    env = {"rnnops": rnnops.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": str(device), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _serialise(row: dict) -> dict:
    out = dict(row)
    for key in ("fwd", "fwd_bwd"):
        timing: Timing = row[key]
        out[key] = {"median_s": timing.median, "spread": timing.spread, "samples_s": timing.samples}
    return out


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    cases = _select(standard_cases(), args)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    rows = []
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.op}: {case.name}")
        rows += run_case(case, device, dtype, args.backends, args.repeats, log)
    print(f"rnnops {rnnops.__version__} on {device} ({args.dtype}); medians; 'x base' = speedup over the "
          f"baseline target")
    print(format_table(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        results = {"environment": environment(device), "dtype": args.dtype, "rows": [_serialise(r) for r in rows]}
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        log(f"wrote {args.out / 'results.json'}")
    return 0
