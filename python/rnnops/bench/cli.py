"""``python -m rnnops bench``: run the standard cases, print a table, write the report.

    python -m rnnops bench [--quick] [--ops OP ...] [--cases REGEX] [--backends NAME ...] [--peers]
                           [--dtype DTYPE] [--device DEV] [--out DIR] [--peer-choices-from RESULTS.json ...]
                           [--stalest-first RESULTS.json ...]
    python -m rnnops bench --compare A.json B.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import rnnops

from . import peer_choices, report
from .cases import families_in_turn, standard_cases
from .precompile import autotuner_compiles_side_by_side, precompile
from .runner import run_case

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
PEER_PACKAGES = ("flashrnn", "fla-core", "mamba-ssm", "triton")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the small standard set (about a minute on a CPU)")
    parser.add_argument("--ops", nargs="+", metavar="OP", help="only these op families (e.g. linear_attn rnn)")
    parser.add_argument("--cases", metavar="REGEX",
                        help="only the cases whose name this regular expression finds (e.g. 'GLA|D768')")
    parser.add_argument("--backends", nargs="+", metavar="NAME", help="only these rnnops backends")
    parser.add_argument("--peers", action="store_true",
                        help="also time the installed peers (flashrnn, fla, mamba_ssm); torch.nn always runs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (at least)")
    parser.add_argument("--out", type=Path, help="directory for results.json (rewritten after every case), report.md, "
                        "report.html, plots")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one forward+backward per target: its largest kernels in the report")
    parser.add_argument("--precompile", type=int, metavar="N",
                        help="first run every case once through our backends (and, with --peers, the peers' "
                             "kernels, their autotuners compiling only) in N processes at once, so kernels compile "
                             "side by side instead of case by case (default: min(8, CPUs) on a GPU, 0 (off) on a "
                             "CPU; the time counts toward --budget-s, of which it gets at most half)")
    parser.add_argument("--stalest-first", nargs="+", type=Path, metavar="RESULTS.json",
                        help="run first the op families these earlier results files timed longest ago (those they "
                             "never timed first of all), so that successive runs cut short by --budget-s on one GPU "
                             "model cover every family")
    parser.add_argument("--peer-choices-from", nargs="+", type=Path, metavar="RESULTS.json",
                        help="before running, put the peers' autotuning choices stored in these earlier results "
                             "files (their peer_autotune) into Triton's cache, so the peers' autotuners compile only "
                             "the configuration they chose there (rnnops.bench.peer_choices)")
    parser.add_argument("--budget-s", type=float, metavar="N",
                        help="start no new case after N seconds (the report then says which cases were left out; "
                             "the op families take turns, so a short budget reaches each of them)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                        help="print the ratios between two results files and exit")


def environment(device: torch.device) -> dict:
    env = {"rnnops": rnnops.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": str(device), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(rnnops.__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, cuda=torch.version.cuda, driver=torch.cuda.driver_version()
                   if hasattr(torch.cuda, "driver_version") else None)
    peers = {}
    for package in PEER_PACKAGES:
        try:
            peers[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    env["triton"] = peers.pop("triton", None)
    env["peers"] = peers
    return env


def _serialise(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        row = dict(row)
        for phase in ("fwd", "fwd_bwd"):
            timing = row[phase]
            row[phase] = None if timing is None else {"median_s": timing.median, "spread": timing.spread,
                                                      "samples_s": timing.samples,
                                                      "host_median_s": timing.host_median}
        out.append(row)
    return out


class Progress:
    """One status line on a terminal, plain lines otherwise (both on stderr), with the seconds since
    the start (on a cold GPU most of a case's time is compiling)."""

    def __init__(self, total: int):
        self.total, self.index = total, 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def case(self, index: int):
        self.index = index

    def __call__(self, text: str):
        done = int(20 * (self.index - 1) / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        line = f"[{'#' * done}{'.' * (20 - done)}] {self.index}/{self.total} {elapsed:4.0f}s {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty:
            sys.stderr.write("\r\033[K")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def stalest_first(ops: list[str], paths: list[Path]) -> list[str]:
    """``ops`` (each once, in their order) sorted by the date of the latest of the results files
    ``paths`` with a row of that op, never first; a file that cannot be read counts for nothing."""
    last: dict[str, str] = {}
    for path in paths:
        try:
            results = json.loads(Path(path).read_text())
            date, timed = results["environment"]["date"], {row["op"] for row in results["rows"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for op in timed:
            last[op] = max(last.get(op, ""), date)
    return sorted(dict.fromkeys(ops), key=lambda op: last.get(op, ""))


def main(args: argparse.Namespace) -> int:
    # torch's profiler (kineto; torch 2.13) prints a "USDT" trace line at each start and stop, two
    # a profiled call between the progress lines (26 in a quick CPU run). Kineto ranks those
    # markers above its errors, so the level that hides them (6) hides its errors too: the bench
    # reads the profiler's results, not its log. A level the user set stays.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    if args.compare:
        a, b = (json.loads(path.read_text()) for path in args.compare)
        print(report.compare(a, b))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cases = standard_cases(device)
    known = sorted({case.op for case in cases})
    if args.ops and set(args.ops) - set(known):
        raise SystemExit(f"bench: unknown op(s) {', '.join(sorted(set(args.ops) - set(known)))}; known: {', '.join(known)}")
    cases = [c for c in cases if (c.quick or not args.quick) and (not args.ops or c.op in args.ops)]
    if args.cases:
        try:
            wanted = re.compile(args.cases)
        except re.error as error:
            raise SystemExit(f"bench: --cases {args.cases!r} is not a regular expression: {error}") from None
        names = [c.name for c in cases]
        cases = [c for c in cases if wanted.search(c.name)]
        if not cases:
            raise SystemExit(f"bench: --cases {args.cases!r} matches none of: {'; '.join(names)}")
    hardware = None
    if device.type == "cuda":
        from rnnops.autotune.hardware import from_device

        hardware = from_device(device.index or 0)
    progress = Progress(len(cases))
    rows, notes, env = [], {}, environment(device)
    position = {case.name: i for i, case in enumerate(cases)}  # results keep the standard order

    def collect() -> dict:
        ordered = sorted(rows, key=lambda row: position[row["case"]])
        run_notes = dict(sorted(notes.items(), key=lambda item: position.get(item[0], -1)))  # the run's own first
        results = {"schema": 1, "environment": env, "device": str(device),
                   "dtype": str(dtype).split(".")[-1], "quick": args.quick,
                   "hardware": None if hardware is None else asdict(hardware), "rows": _serialise(ordered),
                   "notes": run_notes}
        if device.type == "cuda":  # for a later run's --peer-choices-from
            results["peer_autotune"] = peer_choices.collect()
        return results

    def stopped(reason: str) -> list[str]:
        return [f"{reason}: stopped after {len({r['case'] for r in rows})} of {len(cases)} cases"]

    if args.peer_choices_from:
        try:
            restored = peer_choices.restore(peer_choices.from_results(args.peer_choices_from))
            notes["peer choices"] = [(f"{restored} stored autotuning choices of the peers restored from "
                                      f"{len(args.peer_choices_from)} earlier results file(s)")]
        except (OSError, ValueError) as error:  # the run goes on, its peers tuning afresh
            notes["peer choices"] = [f"not restored: {error}"]
    first = stalest_first([case.op for case in cases], args.stalest_first or [])
    if args.stalest_first:
        notes["order"] = [f"op families by when {len(args.stalest_first)} earlier results file(s) last timed them, "
                          f"longest ago first: {', '.join(first)}"]
    in_turn = families_in_turn(cases, first)  # the precompile warms them in this order too
    workers = args.precompile if args.precompile is not None else (
        min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` still gets the finished cases
    compiles = contextlib.ExitStack()
    stopped_in, timed_out = {}, frozenset()  # case -> the peer its precompile worker was warming when it stopped
    try:
        if workers > 0 and cases:
            # the precompile gets at most half the budget (what becomes of a peer still compiling then:
            # rnnops.bench.precompile)
            timeout_s = 300.0 if args.budget_s is None else max(30.0, args.budget_s / 2)
            warmed = precompile(in_turn, device, dtype, args.backends, workers, progress, timeout_s=timeout_s,
                                peers=args.peers)
            notes["precompiled"] = [(f"{warmed.clean} of {len(cases)} cases warmed up in {workers} processes "
                                     f"in {warmed.seconds:.0f} s before timing (at most {timeout_s:.0f} s)")]
            stopped_in, timed_out = warmed.stopped_in, warmed.timed_out
        if device.type == "cuda" and args.peers:  # the rest of a peer's autotuning compiles, if any, at once
            compiles.enter_context(autotuner_compiles_side_by_side())
        for index, case in enumerate(in_turn, 1):
            if args.budget_s is not None and time.perf_counter() - progress.start > args.budget_s:
                notes["interrupted"] = stopped(f"time budget of {args.budget_s:g} s spent")
                break
            progress.case(index)
            case_rows, case_notes = run_case(case, device, dtype, backends=args.backends, include_peers=args.peers,
                                             repeats=args.repeats, progress=progress, hardware=hardware,
                                             profile=args.profile, stopped_peer=stopped_in.get(case.name),
                                             stopped_at_time_limit=case.name in timed_out)
            rows += case_rows
            if case_notes:
                notes[case.name] = case_notes
            if args.out:  # a process killed later still leaves the finished cases
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "results.json").write_text(json.dumps(collect(), indent=1))
    except KeyboardInterrupt:
        notes["interrupted"] = stopped("interrupted")
    finally:
        compiles.close()
        signal.signal(signal.SIGTERM, previous)
    progress.close()
    results = collect()
    print(f"rnnops {rnnops.__version__} on {results['environment'].get('gpu') or device} ({results['dtype']}); "
          "medians; 'x base' = speedup over the case's baseline")
    print(report.console_table(results))
    for case, case_notes in results["notes"].items():
        for note in case_notes:
            print(f"note: {case}: {note}")
    if args.out:
        written = report.write_report(results, args.out)
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
