"""Compile the kernels of the standard cases side by side before any of them is timed.

On a cold GPU machine most of a case's wall time is compiling: Triton JIT-compiles each kernel
specialisation (about a second each, tens per case), CuPy's NVRTC the CUDA kernels. Both keep
what they compile on disk (Triton's cache directory, CuPy's kernel cache), so running each
case once through our backends (and, with ``--peers``, the peers) in parallel worker processes
first leaves the timed loop only cache hits.

Peers that autotune by timing (flash-linear-attention: Triton autotuners over tens of
configurations per kernel, a cold case's 100 s on an H200, nearly all of it compiling) are
warmed with their autotuners compiling and launching each configuration once but timing none
and storing no choice (``compile_only_autotuning``): choices timed while other workers share
the GPU must not become the configurations a peer is measured with. The timed process then
autotunes on an otherwise idle GPU, as the peer's users do, from compiled kernels. In both, an
autotuner about to time compiles all its configurations side by side first
(``autotuner_compiles_side_by_side``).

Nothing here changes what is timed; it changes when compiling happens. A worker that fails or
crashes only loses its warm-up: the timed run meets the same error and reports it. A worker
killed at its time limit takes its compilers with it (rnnops._workers), and the extension build
locks it held are removed (clear_stale_build_locks). The peer it was warming then is left out
of the timed run (``Precompiled.stopped_in``) where its worker crashed (it would take the bench
with it) or was building an extension (a build that outlasted the precompile would outlast the
bench's budget too); a peer whose Triton kernels were still compiling at the time limit
(``Precompiled.timed_out``; fla's autotuners on a cold machine) is timed anyway: the disk cache
holds what its worker compiled, and the timed run compiles the rest before timing it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .._workers import run_side_by_side
from .cases import Case, standard_cases
from .runner import fresh_leaves, targets_for

_WORKER = "import json, sys; from rnnops.bench.precompile import warm_named; warm_named(*json.loads(sys.argv[1]))"


class _NoStoredChoice(Exception):
    """Raised in place of an autotuner's benchmark: the disk cache held no stored choice."""


@contextlib.contextmanager
def compile_only_autotuning():
    """Within: every Triton autotuner runs each configuration once (compiling it into Triton's
    disk cache) and records the same time for all, so it measures nothing and keeps its first
    legal configuration, and stores no choice on disk (``cache_results``, which fla turns on,
    runs the benchmark and writes nothing). An autotuner with ``cache_results`` whose choice is
    already stored (an earlier run's, restored by rnnops.bench.peer_choices) takes it and
    compiles only that configuration, as the timed process will. Yields False, changing
    nothing, where Triton's Autotuner lacks the ``do_bench`` it patches."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(Autotuner.__dict__.get("do_bench"), property | functools.cached_property):
        yield False
        return

    def run_once(kernel_call, quantiles=None):
        kernel_call()
        return [1.0] * len(quantiles) if quantiles else 1.0

    def stored_choice_or_store_nothing(self, tuning_key, configs, bench_fn):
        def no_stored_choice():
            raise _NoStoredChoice

        try:  # Triton's own look-up: True where it found and took a stored choice
            return patched["check_disk_cache"](self, tuning_key, configs, no_stored_choice)
        except _NoStoredChoice:  # it would have benchmarked, then stored the timings: only the former
            bench_fn()
            return False

    patched = {name: Autotuner.__dict__[name] for name in ("do_bench", "check_disk_cache") if name in Autotuner.__dict__}
    Autotuner.do_bench = property(lambda self: run_once)
    if "check_disk_cache" in patched:  # Triton >= 3.4: results cached on disk when an autotuner asks
        Autotuner.check_disk_cache = stored_choice_or_store_nothing
    try:
        yield True
    finally:
        for name, attribute in patched.items():
            setattr(Autotuner, name, attribute)


COMPILE_THREADS = min(8, os.cpu_count() or 1)


@contextlib.contextmanager
def autotuner_compiles_side_by_side(threads: int = COMPILE_THREADS):
    """Within: a Triton autotuner about to time its configurations (Triton's ``check_disk_cache``
    found no stored choice: autotuners with ``cache_results``, which fla turns on and the GPU
    suite's TRITON_CACHE_AUTOTUNING=1 gives every other) first compiles all of them at once, on
    ``threads`` threads (triton.AsyncCompileMode; Triton's passes and ptxas run outside the GIL:
    twelve configurations of fla's chunk_gla output kernel compiled for sm_90 in 5.4 s on one
    thread, 3.0 s on two cores), then times them one after another from its in-memory cache as
    before. fla's chunk_gla autotunes a few hundred configurations over its kernels, which
    compiled one at a time took minutes on the GPU machine: longer than any run gave it
    (rnnops.bench.cases._linear_family). Nothing timed changes, only when compiling happens; a
    configuration that fails to compile is left to the autotuner's own run, which meets the error
    again and handles it as it always does. Yields False, changing nothing, with fewer than two
    threads or a Triton without AsyncCompileMode or ``check_disk_cache`` (before 3.4)."""
    try:
        from triton import AsyncCompileMode
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        AsyncCompileMode = None
    if threads < 2 or AsyncCompileMode is None or "check_disk_cache" not in Autotuner.__dict__:
        yield False
        return
    triton_run, triton_check = Autotuner.__dict__["run"], Autotuner.__dict__["check_disk_cache"]

    def run_noting_its_call(self, *args, **kwargs):  # the launch's arguments, for the compiles below
        self.rnnops_call = args, kwargs
        try:
            return triton_run(self, *args, **kwargs)
        finally:
            self.rnnops_call = None

    def compile_all(self, configs):
        args, kwargs = self.rnnops_call
        with ThreadPoolExecutor(threads) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for config in configs:
                with contextlib.suppress(Exception):  # left to the autotuner's own launch of it
                    self.fn.run(*args, **{**kwargs, **config.all_kwargs(), "warmup": True})

    def check_compiling_first(self, tuning_key, configs, bench_fn):
        def compile_then_bench():
            if getattr(self, "rnnops_call", None) is not None:
                compile_all(self, configs)
            bench_fn()

        return triton_check(self, tuning_key, configs, compile_then_bench)

    Autotuner.run, Autotuner.check_disk_cache = run_noting_its_call, check_compiling_first
    try:
        yield True
    finally:
        Autotuner.run, Autotuner.check_disk_cache = triton_run, triton_check


def warm_up(case: Case, device: torch.device, dtype: torch.dtype, backends: Sequence[str] | None = None,
            peers: bool = False, progress_file: Path | None = None) -> int:
    """One forward+backward of ``case`` through each of our backends and, with ``peers``, each
    peer's kernels (not its pure-PyTorch reference; autotuners compile only, see the module
    docstring), nothing timed; returns how many ran without an error (errors are left to the
    timed run, which reports them). ``progress_file`` names, while it runs, the target being
    warmed (``{"warming": name}``, null once all are done): what a killed worker was doing."""
    torch.manual_seed(0)
    inputs = case.make(device, dtype)
    targets, _ = targets_for(case, device, dtype, backends, include_peers=peers)
    ran = 0
    for target in targets:
        if target.kind not in ("rnnops", "peer"):
            continue
        _record(progress_file, target.name)
        with contextlib.suppress(Exception):  # the timed run meets the same error and reports it
            fresh, _ = fresh_leaves(target.prepare(inputs))
            out = target.call(fresh)
            out.backward(torch.randn_like(out))
            ran += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _record(progress_file, None)
    return ran


def _record(progress_file: Path | None, warming: str | None) -> None:
    if progress_file is not None:
        partial = progress_file.with_suffix(".partial")
        partial.write_text(json.dumps({"warming": warming}))
        partial.replace(progress_file)


def warm_named(case_name: str, device: str, dtype: str, backends: Sequence[str] | None, peers: bool,
               progress_file: str | None = None) -> None:
    """The worker's entry point: warm the standard case named ``case_name``; exit status 3 if no
    standard case has that name."""
    device_ = torch.device(device)
    case = next((c for c in standard_cases(device_) if c.name == case_name), None)
    if case is None:
        sys.exit(3)
    with contextlib.ExitStack() as stack:
        if peers:  # compile_only_autotuning's time-nothing look-up wraps the side-by-side compiles
            stack.enter_context(autotuner_compiles_side_by_side())
            stack.enter_context(compile_only_autotuning())
        warm_up(case, device_, getattr(torch, dtype), backends, peers, progress_file and Path(progress_file))


@dataclass
class Precompiled:
    """What a precompile did: cases whose worker exited cleanly, seconds, per case the target its
    worker was warming when it stopped (killed at its time limit, or crashed), and the cases whose
    worker was killed at its time limit."""

    clean: int
    seconds: float
    stopped_in: dict[str, str]
    timed_out: frozenset[str] = frozenset()


def precompile(cases: Sequence[Case], device: torch.device, dtype: torch.dtype, backends: Sequence[str] | None,
               workers: int, progress: Callable[[str], None] = lambda text: None,
               timeout_s: float = 300.0, peers: bool = False) -> Precompiled:
    """Warm ``cases`` (standard cases, found again by name in each worker; with ``peers``, the
    peers' kernels too) in up to ``workers`` processes at once (rnnops._workers), for at most
    ``timeout_s`` in all: then, and on an interrupt, every worker still running is killed and no
    other starts (a cold case of ours compiles in well under two minutes; a FlashRNN build can
    take longer)."""
    start, started_at = time.perf_counter(), time.time()
    dtype_name = str(dtype).split(".")[-1]
    with tempfile.TemporaryDirectory(prefix="rnnops-precompile-") as folder:
        files = [Path(folder) / f"{i}.json" for i in range(len(cases))]
        arguments = [json.dumps([case.name, str(device), dtype_name, backends, peers, str(file)])
                     for case, file in zip(cases, files)]
        statuses = run_side_by_side(_WORKER, arguments, workers, timeout_s=timeout_s, deadline=start + timeout_s,
                                    report=lambda finished, running: progress(
                                        f"precompiling: {finished}/{len(cases)} cases done, {running} running"))
        stopped_in = {}
        for case, file in zip(cases, files):
            with contextlib.suppress(OSError, ValueError):
                if (target := json.loads(file.read_text())["warming"]) is not None:
                    stopped_in[case.name] = target
    clean = statuses.count(0)
    if clean < len(cases):
        clear_stale_build_locks(started_at)
    timed_out = frozenset(case.name for case, status in zip(cases, statuses) if status is None)
    return Precompiled(clean, time.perf_counter() - start, stopped_in, timed_out)


def clear_stale_build_locks(since: float) -> list[Path]:
    """Remove the ``lock`` files torch.utils.cpp_extension builds (FlashRNN's CUDA kernels) left
    since ``since`` (a time.time() value): a build killed with its worker never releases its lock,
    and the next build of that extension would wait on it forever. Called once every worker is
    gone, so no lock made since then is held. Returns the removed paths."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in root.glob("**/lock"):
        with contextlib.suppress(OSError):
            if lock.stat().st_mtime >= since:
                lock.unlink()
                removed.append(lock)
    return removed
