"""Hardware-counter profiles of one benchmark case's kernels: what a GPU session brings back that
the SASS read offline cannot tell, namely where each kernel's warps wait (Nsight Compute's stall
reasons, in cycles per issued instruction), how busy its SMs and memory are, and the occupancy
it achieves.

    python -m rnnops.bench.kernel_profile run --case REGEX --target NAME [--forward-only]
                                              [--peer-choices-from RESULTS.json ...]
        One standard GPU case (the regular expression must find exactly one name) through one
        target (an rnnops backend or a peer, as the bench names them): a forward and one call
        like the profiled one, unprofiled (the kernels compile, the peers' autotuners choose), then
        one forward (+ backward) between cudaProfilerStart and cudaProfilerStop, so that
        ``ncu --profile-from-start off`` profiles those kernels alone.
    python -m rnnops.bench.kernel_profile summarize NCU.csv ... [--out FILE]
        ncu's logs (``--csv --page raw --log-file``) as one markdown table per log.

``bash bench/gpu_suite.sh profile`` runs both for the cases where rnnops trails a peer, each
target of a case beside the peer's.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import torch

# (ncu metric, header) of the summary's columns; a metric the log lacks shows as "-"
_COLUMNS = (
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "SM %"),
    ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", "memory %"),
    ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "DRAM %"),
    ("smsp__issue_active.avg.pct_of_peak_sustained_active", "issue %"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occupancy %"),
    ("sm__maximum_warps_per_active_cycle_pct", "theor. occ. %"),
    ("launch__registers_per_thread", "registers"),
    ("launch__grid_size", "grid"),
    ("launch__block_size", "block"),
)
_DURATION = "gpu__time_duration.sum"
_TIME_UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}
# the warp-state section's stall reasons: cycles a warp spent in each per instruction it issued
_STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
TOP_STALLS = 4


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_log(path: Path) -> tuple[list[str], dict[str, str], list[dict[str, str]]]:
    """(metric columns, their units, one dict per profiled kernel) of an ncu ``--csv --page raw``
    log, whose table starts at the row of column names ("ID", ...) and whose next row holds the
    units; ncu's own messages (``==PROF==`` lines) and anything else before the table are skipped."""
    lines = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return [], {}, []
    table = [line for line in lines[start:] if line.startswith('"')]
    rows = list(csv.reader(table))
    header, units = rows[0], rows[1] if len(rows) > 1 else []
    return header, dict(zip(header, units)), [dict(zip(header, row)) for row in rows[2:]]


def _short_name(name: str) -> str:
    """A kernel's name without template arguments and parameter lists (a Triton kernel's is bare)."""
    name = re.sub(r"\(.*", "", name)
    depth, kept = 0, []
    for char in name:
        depth += char == "<"
        if depth == 0:
            kept.append(char)
        depth -= char == ">" and depth > 0
    return "".join(kept).strip()[-60:]


def summary_table(path: Path) -> str:
    """The markdown table of one log: a row per kernel (in launch order) with its duration, the
    SM / memory / DRAM throughput and issue-slot use in percent of peak, achieved and theoretical
    occupancy, registers, launch shape, and its TOP_STALLS largest stall reasons."""
    header, units, kernels = read_log(path)
    if not kernels:
        return f"{path.name}: no profiled kernels (see the log)\n"
    stalls = [(column, match.group(1)) for column in header if (match := _STALL.match(column))]
    lines = ["| kernel | us | " + " | ".join(title for _, title in _COLUMNS) + " | top stalls (cycles / instruction) |",
             "| --- " * (len(_COLUMNS) + 3) + "|"]
    total = 0.0
    for kernel in kernels:
        duration = _number(kernel.get(_DURATION, ""))
        if duration is not None:
            duration *= _TIME_UNITS.get(units.get(_DURATION, "nsecond"), 1e-3)
            total += duration
        cells = [_short_name(kernel.get("Kernel Name", "?")), "-" if duration is None else f"{duration:.1f}"]
        for column, _ in _COLUMNS:
            value = _number(kernel.get(column, ""))
            cells.append("-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.2g}")
        ranked = sorted(((value, reason) for column, reason in stalls
                         if (value := _number(kernel.get(column, ""))) is not None), reverse=True)
        cells.append(", ".join(f"{reason} {value:.2g}" for value, reason in ranked[:TOP_STALLS]) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return f"{path.stem}: {len(kernels)} kernels, {total:.0f} us\n\n" + "\n".join(lines) + "\n"


def run(case_pattern: str, target_name: str, forward_only: bool, peer_choices_from: list[Path]) -> None:
    from . import peer_choices
    from .cases import gpu_cases
    from .runner import fresh_leaves, targets_for

    if not torch.cuda.is_available():
        raise SystemExit("kernel_profile run: needs a CUDA device")
    found = [case for case in gpu_cases() if re.search(case_pattern, case.name)]
    if len(found) != 1:
        names = ", ".join(repr(case.name) for case in found) or "none"
        raise SystemExit(f"kernel_profile run: --case {case_pattern!r} must find one case, found {names}")
    case, device, dtype = found[0], torch.device("cuda"), torch.bfloat16
    if peer_choices_from:
        peer_choices.restore(peer_choices.from_results(peer_choices_from))
    targets, notes = targets_for(case, device, dtype, None, include_peers=True)
    target = next((t for t in targets if t.name == target_name), None)
    if target is None:
        raise SystemExit(f"kernel_profile run: no target {target_name!r} for {case.name!r} (targets: "
                         f"{', '.join(t.name for t in targets)}; {'; '.join(notes) or 'no notes'})")
    torch.manual_seed(0)
    state = target.prepare(case.make(device, dtype))  # (a peer's layout copies stay out of the profile)

    with torch.no_grad():
        cotangent = torch.randn_like(target.call(state))  # (the first of the unprofiled calls)

    def call():
        if forward_only:
            with torch.no_grad():
                target.call(state)
        else:
            target.call(fresh_leaves(state)[0]).backward(cotangent)

    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled {case.name} | {target.name} ({'forward' if forward_only else 'forward+backward'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnops.bench.kernel_profile", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="one case through one target, its profiled call in between "
                                          "cudaProfilerStart and Stop (run under ncu --profile-from-start off)")
    one.add_argument("--case", required=True, metavar="REGEX", help="finds exactly one standard GPU case's name")
    one.add_argument("--target", required=True, help="an rnnops backend or a peer, as the bench names it")
    one.add_argument("--forward-only", action="store_true", help="profile the forward alone (under no_grad)")
    one.add_argument("--peer-choices-from", nargs="*", type=Path, default=[], metavar="RESULTS.json",
                     help="restore the peers' autotuning choices these results files stored")
    logs = commands.add_parser("summarize", help="ncu --csv --page raw logs as markdown tables")
    logs.add_argument("logs", nargs="+", type=Path)
    logs.add_argument("--out", type=Path, help="write the tables here as well as to stdout")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.case, args.target, args.forward_only, args.peer_choices_from)
        return 0
    text = "\n".join(summary_table(path) for path in args.logs)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
