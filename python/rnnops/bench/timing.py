"""Timing: CUDA events on a GPU (calls back to back, see :func:`measure`), ``time.perf_counter`` on
the CPU; medians over repeats."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Seconds per call over ``len(samples)`` repeats after warm-up; on a GPU also the host's
    seconds until each call returned (its launches are asynchronous: a host time near the
    device time means the call is bound by launch overhead, not by its kernels)."""

    samples: list[float]
    host_samples: list[float] = field(default_factory=list)

    @property
    def host_median(self) -> float | None:
        return statistics.median(self.host_samples) if self.host_samples else None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the machine was."""
        return (max(self.samples) - min(self.samples)) / self.median


def batch_size(estimate: float, repeats: int, min_seconds: float, max_seconds: float) -> int:
    """How many back-to-back GPU calls to time, given one call's ``estimate`` (seconds): at least
    ``repeats`` and enough to fill ``min_seconds``, no more than fit in ``max_seconds`` (which may
    be infinite), and always between 1 and 100."""
    estimate = max(estimate, 1e-6)
    count = min(max(repeats, math.ceil(min_seconds / estimate)), 100)
    if math.isfinite(max_seconds):
        count = min(count, math.floor(max_seconds / estimate))
    return max(1, count)


def call_estimate(synchronised_call: Callable[[], float], repeats: int, max_seconds: float) -> float:
    """One call's seconds, to size a GPU batch by (batch_size), from ``synchronised_call()`` (which
    makes one synchronised call and returns its wall seconds): a second call where the first took
    so long that fewer than ``repeats`` would fit in ``max_seconds``, and the faster of the two. A
    first call can compile, autotune or allocate: on the H200 (2026-11-28) the delta rule's and
    fla's chunk_gla's forward+backward were timed once each so, where their calls took 3 and 7 ms
    (the delta rule's one sample 3.57 ms, with no queued call to hide its host work: its kernels
    sum to 2.86, and the A/B check timed it at 2.91)."""
    estimate = synchronised_call()
    if estimate * repeats > max_seconds:
        estimate = min(estimate, synchronised_call())
    return estimate


def spin_up(fn: Callable[[], object], device: torch.device, seconds: float) -> None:
    """Call ``fn()`` back to back for ``seconds`` of wall time on a GPU (nothing elsewhere): an
    idle GPU runs at low clocks for its first tens of milliseconds of work, which a short
    measurement taken first would count (the tuner's A/B check on the H200, 2026-11-28: each of
    four configurations timed faster than the one before, the first 1.6x slower than the bench's
    time of it)."""
    if device.type != "cuda":
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 5,
            min_seconds: float = 0.0, max_seconds: float = float("inf")) -> Timing:
    """Time ``fn()`` after ``warmup`` calls: ``repeats`` times, more (up to 100) until
    ``min_seconds`` have been spent measuring, fewer (at least one) once ``max_seconds`` have.

    On a GPU the timed calls run back to back, as in a training loop and as
    triton.testing.do_bench (the peers' own benchmarks) times them: each call's CUDA-event
    interval runs from when the GPU reaches it to when it finishes, with one synchronisation after
    the last, so a call's host work overlaps the previous call's kernels, and shows in its interval
    only where it takes longer than they do (then the call is host-bound: see Timing.host_samples).
    The batch's size comes from the last warm-up call's synchronised time (a GPU makes that one
    even at ``warmup=0``; two where the first was slow: call_estimate), and an untimed call goes
    first so that the first timed one also starts behind queued work."""
    for _ in range(warmup - 1):
        fn()
    if device.type != "cuda":
        if warmup > 0:
            fn()
        samples: list[float] = []
        spent = 0.0
        while True:
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
            spent += samples[-1]
            if (len(samples) >= repeats and spent >= min_seconds) or spent >= max_seconds or len(samples) >= 100:
                return Timing(samples)
    torch.cuda.synchronize(device)

    def synchronised_call() -> float:  # an upper bound on a call's time: host and device, not overlapped
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - begin

    estimate = call_estimate(synchronised_call, repeats, max_seconds)  # the last warm-up call(s)
    count = batch_size(estimate, repeats, min_seconds, max_seconds)
    if estimate < 0.05:  # (for longer calls the host's share is negligible)
        fn()
    events, host = [], []
    for _ in range(count):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        begin = time.perf_counter()
        fn()
        host.append(time.perf_counter() - begin)
        end.record()
        events.append((start, end))
    events[-1][1].synchronize()
    return Timing([start.elapsed_time(end) / 1e3 for start, end in events], host)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory ``fn()`` allocates above what was in use when it started:
    the CUDA caching allocator's peak on a GPU; on a CPU (whose tensors have no allocator
    statistics) the largest running total of the profiler's allocation events above the total
    before the first. The events are read from the profiler's raw event tree: building its
    FunctionEvents instead took 24 s for the 0.5 million events of one forward+backward of the
    per-token reference at T = 4096, 20 times the run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    first, peak, pending = None, None, list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation:
            total = event.extra_fields.total_allocated
            peak = total if peak is None else max(peak, total)
            if first is None or event.start_time_ns < first[0]:
                first = (event.start_time_ns, total - event.extra_fields.alloc_size)
    return 0 if first is None else max(0, peak - first[1])


def kernel_breakdown(fn: Callable[[], object], device: torch.device, top: int = 8) -> list[dict]:
    """Where one ``fn()`` call spends its time, by the profiler: on a GPU the device kernels,
    on a CPU the operators (self CPU time); the ``top`` largest as dicts of name, calls, seconds
    and share of the total (largest_entries)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return largest_entries(prof.key_averages(), device.type == "cuda", top)


def host_breakdown(fn: Callable[[], object], calls: int = 20, top: int = 10) -> list[dict]:
    """Where ``fn()`` spends host time, by cProfile over ``calls`` calls: the ``top`` Python
    functions by cumulative time (their callees included, so the list reads as the call chain
    and its heavy branches: the op's validation, dispatch, the autograd Function, each kernel
    launcher) as dicts of name, calls and seconds per ``fn()`` call and share of ``fn()``'s host
    time; ``fn`` itself is left out. cProfile slows Python-heavy code, so the shares matter more
    than the absolute times. On a GPU the launches are asynchronous: this is the time before the
    call returns, what 'fwd host ms' measures."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (primitive calls, calls, self, cumulative, callers)}
    own = getattr(fn, "__code__", None)
    own_key = None if own is None else (own.co_filename, own.co_firstlineno, own.co_name)
    total = stats[own_key][3] if own_key in stats else max(entry[3] for entry in stats.values())
    rows = sorted(((cumulative, count, key) for key, (_, count, _, cumulative, _) in stats.items()
                   if key != own_key and not key[2].startswith("<method 'disable'")), reverse=True)
    return [{"name": f"{key[0].rsplit('/', 1)[-1]}:{key[1]}({key[2]})" if key[0] != "~" else key[2],
             "calls": count / calls, "seconds": cumulative / calls, "share": cumulative / total}
            for cumulative, count, key in rows[:top]]


def largest_entries(averages, on_device: bool, top: int) -> list[dict]:
    """The profiler's averaged events as (name, calls, seconds, share) dicts, largest first. On a
    device only its own events (kernels, copies): the host operators and autograd Functions that
    launched them carry the same time as their self device time, and counted too they doubled
    the total (the H200 report listed LinearAttnFunctionBackward at 39% beside its kernels)."""
    from torch.autograd import DeviceType

    if on_device:  # (a profiler that marks no event as the device's: every event's self device time)
        own = [e for e in averages if getattr(e, "device_type", None) == DeviceType.CUDA] or list(averages)
        rows = [(e.key, e.count, e.self_device_time_total / 1e6) for e in own]
    else:
        rows = [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in averages]
    rows = sorted((r for r in rows if r[2] > 0), key=lambda r: -r[2])
    total = sum(s for _, _, s in rows) or 1.0
    return [{"name": name, "calls": calls, "seconds": s, "share": s / total} for name, calls, s in rows[:top]]
