"""Compile the kernels of the standard cases side by side before any of them is timed.

On a cold GPU machine most of a case's wall time is compiling: Triton JIT-compiles each kernel
specialisation (about a second each, tens per case), CuPy's NVRTC the CUDA kernels. Both keep
what they compile on disk (Triton's cache directory, CuPy's kernel cache), so running each
case once through our backends in parallel worker processes first leaves the timed loop only
cache hits. Only our backends are warmed: flash-linear-attention autotunes on first use and
stores its choices on disk (Triton's ``cache_results``), and choices timed while other workers
share the GPU must not become the configurations it is measured with.

Nothing here changes what is timed; it changes when compiling happens. A worker that fails or
crashes only loses its warm-up: the timed run meets the same error and reports it.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence

import torch

from .._workers import run_side_by_side
from .cases import Case, standard_cases
from .runner import fresh_leaves, targets_for

_WORKER = "import json, sys; from rnnops.bench.precompile import warm_named; warm_named(*json.loads(sys.argv[1]))"


def warm_up(case: Case, device: torch.device, dtype: torch.dtype, backends: Sequence[str] | None = None) -> int:
    """One forward+backward of ``case`` through each of our backends (no peers, nothing timed);
    returns how many ran without an error (errors are left to the timed run, which reports them)."""
    torch.manual_seed(0)
    inputs = case.make(device, dtype)
    targets, _ = targets_for(case, device, dtype, backends, include_peers=False)
    ran = 0
    for target in targets:
        if target.kind != "rnnops":
            continue
        with contextlib.suppress(Exception):  # the timed run meets the same error and reports it
            fresh, _ = fresh_leaves(target.prepare(inputs))
            out = target.call(fresh)
            out.backward(torch.randn_like(out))
            ran += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ran


def warm_named(case_name: str, device: str, dtype: str, backends: Sequence[str] | None) -> None:
    """The worker's entry point: warm the standard case named ``case_name``; exit status 3 if no
    standard case has that name."""
    device_ = torch.device(device)
    case = next((c for c in standard_cases(device_) if c.name == case_name), None)
    if case is None:
        sys.exit(3)
    warm_up(case, device_, getattr(torch, dtype), backends)


def precompile(cases: Sequence[Case], device: torch.device, dtype: torch.dtype, backends: Sequence[str] | None,
               workers: int, progress: Callable[[str], None] = lambda text: None,
               timeout_s: float = 300.0) -> tuple[int, float]:
    """Warm ``cases`` (standard cases, found again by name in each worker) in up to ``workers``
    processes at once (rnnops._workers); returns (cases whose worker exited cleanly, seconds). A
    worker still running after ``timeout_s`` (a cold case compiles in well under two minutes), and
    on an interrupt every worker still running, is killed."""
    start = time.perf_counter()
    dtype_name = str(dtype).split(".")[-1]
    arguments = [json.dumps([case.name, str(device), dtype_name, backends]) for case in cases]
    clean = run_side_by_side(_WORKER, arguments, workers, timeout_s=timeout_s, report=lambda finished, running: progress(
        f"precompiling: {finished}/{len(cases)} cases done, {running} running"))
    return clean, time.perf_counter() - start
