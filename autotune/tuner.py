"""Solve, rank, measure: choose each kernel's configuration per shape bucket.

For every tunable kernel and standard shape bucket: enumerate the legal configurations
(kernels.Tunable.space), order them by the analytic cost model, measure the best few, the
default and the shipped configuration on the device (forward + backward, CUDA events, inputs
rotated so that they do not sit in L2, medians) and search from there (autotune.search),
measuring at most a tenth of the space. Each configuration is vetted against the float64
reference before its first measurement (vet(): a miscompiled one is never measured or
stored). The winner goes into the device's cache (autotune.cache). Without a GPU
(``dry_run``) the ranking alone is reported, for any offline GPU, optionally screened by
ptxas (CompileScreen).
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cache, kernels, search
from .hardware import Hardware

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPES_BY_VALUE = {dtype: name for name, dtype in DTYPES.items()}


@dataclass
class Result:
    op: str
    backend: str
    bucket: str
    shape: dict
    legal: int
    ranked: list[dict]
    config: dict
    default: dict
    seconds: float | None = None
    default_seconds: float | None = None
    measured: int = 0
    notes: list[str] = field(default_factory=list)
    timings: list[tuple[dict, float | None]] = field(default_factory=list)  # every measured config, in order
    # --try: each measured configuration's kernels (ShapeTimer.kernels: name -> seconds of one call)
    kernel_seconds: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0  # the tuning of this bucket, end to end (compiling, vetting, measuring)

    @property
    def speedup(self) -> float | None:
        if self.seconds and self.default_seconds:
            return self.default_seconds / self.seconds
        return None


def parse_shape(text: str) -> dict:
    """"B=8,T=4096,H=16,K=128,V=128,gate=none" -> dict (ints where they parse)."""
    shape = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not value:
            raise ValueError(f"shape entries are name=value, got {part!r}")
        shape[name.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    for flag in ("gated",):
        if isinstance(shape.get(flag), str):
            shape[flag] = shape[flag].lower() in ("1", "true", "yes")
    return shape


def standard_shapes(op: str) -> list[dict]:
    """The GPU standard cases' shapes for ``op`` (rnnops.bench.cases)."""
    from rnnops.bench.cases import gpu_cases

    seen, shapes = set(), []
    for case in gpu_cases():
        if case.op != op:
            continue
        shape = case.op_shape or case.shape
        frozen = tuple(sorted(shape.items()))
        if frozen not in seen:
            seen.add(frozen)
            shapes.append(dict(shape))
    return shapes


def rank(tunable: kernels.Tunable, shape: dict, dtype: torch.dtype, hardware: Hardware) -> tuple[int, list[dict]]:
    """(legal count, legal configurations by estimated cost, cheapest first)."""
    legal = tunable.space(shape, dtype, hardware).legal()
    return len(legal), tunable.ranked(legal, shape, dtype, hardware)


class NotCompiled(Exception):
    """A configuration's kernels did not compile for the screened architecture."""


@dataclass
class CompileScreen:
    """Screens ranked Triton configurations by compiling them for the hardware's architecture
    (rnnops.triton_backend.compile_check: no GPU needed): the first of the ``top`` ranked that
    spills no registers and fits the shared memory per block wins, else the one that spills
    least. The cost model cannot see register pressure; ptxas can. Compile results are kept per
    (architecture, kernel shape, dtype, configuration), so size buckets share them."""

    top: int = 6
    reports: dict = field(default_factory=dict)

    def kernel_reports(self, tunable: kernels.Tunable, shape: dict, dtype: torch.dtype, hardware: Hardware,
                       config: dict) -> list:
        """ptxas' report (rnnops._ptxas.KernelReport) of each of ``config``'s kernels compiled
        for the hardware's architecture. The launches come from the op's host code, whose errors
        are bugs and propagate; a failure to compile them raises NotCompiled (e.g. an architecture
        this Triton cannot target), which the screen notes and gets past."""
        from rnnops.triton_backend.compile_check import capability, compile_launches, config_launches, small_shape

        arch = capability(hardware)
        kernel_shape = tuple(sorted(small_shape(tunable.op, shape).items()))
        key = (arch, tunable.op, kernel_shape, dtype, tuple(sorted(config.items())))
        if key not in self.reports:
            launches = config_launches(tunable.op, shape, dtype, config, hardware)
            try:
                self.reports[key] = compile_launches(launches, arch)
            except Exception as error:  # what Triton or ptxas raise: they name no common type
                raise NotCompiled(f"{type(error).__name__}: {str(error)[:80]}") from error
        return self.reports[key]

    def compiled(self, tunable: kernels.Tunable, shape: dict, dtype: torch.dtype, hardware: Hardware,
                 config: dict) -> tuple[dict[str, int], int, int]:
        """({kernel: bytes spilled} for the kernels that spill, most shared bytes, most registers)
        of ``config``'s kernels compiled for the hardware's architecture."""
        reports = self.kernel_reports(tunable, shape, dtype, hardware, config)
        spills = {r.name: r.spill_stores + r.spill_loads for r in reports if r.spill_stores + r.spill_loads}
        return (spills, max((r.shared_bytes for r in reports), default=0),
                max((r.registers for r in reports), default=0))

    def choose(self, tunable: kernels.Tunable, shape: dict, dtype: torch.dtype, hardware: Hardware,
               ranked: list[dict], notes: list[str], also: Sequence[dict] = ()) -> dict:
        """The screened pick among the ``top`` ranked and then the legal ones of ``also`` (e.g. the
        configuration shipped for the bucket, which a model's pick that spills more must not
        replace: on 2026-11-27 every one of the top six spilled in the GVA delta rule's dq/dk,
        the least 532 B, where the shipped tiles spilled 24)."""
        limit = hardware.shared_memory_per_block
        scored = []
        # configurations that keep the kernel's screen_at_default variables at their defaults first
        # (a stable sort: rank order otherwise), so copies of one tile shape do not fill the screen
        default = tunable.default()
        fixed = tunable.screen_at_default
        ranked = sorted(ranked, key=lambda c: sum(c.get(v, default[v]) != default[v] for v in fixed))
        candidates = ranked[:self.top] + [c for c in also if c in ranked and c not in ranked[:self.top]]
        for i, config in enumerate(candidates):
            try:
                spills, shared, _ = self.compiled(tunable, shape, dtype, hardware, config)
            except NotCompiled as error:
                notes.append(f"not compiled for {hardware.arch}: {error}")
                return ranked[0]
            if not spills and shared <= limit:
                return config
            worst = max(spills, key=spills.get) if spills else None
            notes.append(f"#{i + 1} rejected: " + (f"{sum(spills.values())} B spilled ({worst} {spills[worst]} B)"
                                                    if spills else f"{shared} B shared > {limit} B"))
            scored.append(((shared > limit, sum(spills.values()), i), config))
        return min(scored, key=lambda s: s[0])[1] if scored else (ranked[0] if ranked else tunable.default())


def shipped_config(tunable: kernels.Tunable, gpu_name: str, bucket: str) -> dict | None:
    """The configuration shipped for ``gpu_name`` and ``bucket`` (cache.shipped_for) as a launch
    takes it: variables it predates at the kernel's defaults; None where none is shipped."""
    shipped = cache.shipped_for(gpu_name, cache.key(tunable.op, tunable.backend, bucket))
    return None if shipped is None else {**tunable.default(), **shipped}


def dry_run(ops, hardware: Hardware, dtype: torch.dtype, shapes: list[dict] | None = None,
            screen: CompileScreen | None = None,
            progress: Callable[[str], None] = lambda text: None) -> list[Result]:
    """Solve and rank without a GPU; with ``screen``, Triton configurations are also compiled."""
    results = []
    for tunable in kernels.tunables(ops):
        for shape in shapes if shapes is not None else standard_shapes(tunable.op):
            count, ranked = rank(tunable, shape, dtype, hardware)
            bucket = kernels.bucket(tunable.op, shape, dtype)
            result = Result(tunable.op, tunable.backend, bucket, shape, count, ranked[:5],
                            ranked[0] if ranked else tunable.default(), tunable.default())
            if screen is not None and tunable.backend == "triton" and ranked:
                progress(f"compiling {tunable.name} {bucket}")
                shipped = shipped_config(tunable, hardware.name, bucket)
                also = [shipped] if shipped is not None else []
                result.config = screen.choose(tunable, shape, dtype, hardware, ranked, result.notes, also)
            results.append(result)
    return results


def case_for(op: str, shape: dict):
    from rnnops.bench import cases

    qk_heads = shape.get("Hk", shape.get("H"))
    if op == "linear_attn":
        return cases.linear_attn_case(shape["gate"], shape["B"], shape["T"], shape["H"], shape["K"], shape["V"],
                                      qk_heads=qk_heads)
    if op in ("delta_rule", "delta_product"):
        return cases.delta_case(shape.get("num_householder", 1), shape["gated"], shape["B"], shape["T"], shape["H"],
                                shape["K"], shape["V"], qk_heads=qk_heads)
    if op == "selective_scan":
        return cases.selective_scan_case(shape["B"], shape["T"], shape["Dm"], shape["N"])
    return cases.rnn_case(shape["cell"], shape["B"], shape["T"], shape["H"], shape["D"])


def inputs_with_grads(case, device: torch.device, dtype: torch.dtype) -> dict:
    """``case.make(device, dtype)`` with every floating tensor a leaf that requires its gradient."""
    return {k: (v.requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in case.make(device, dtype).items()}


def forward_backward(case, x: dict, backend: str) -> None:
    """One forward and backward of ``case`` on ``x`` through ``backend`` (a cotangent of ones),
    into gradients cleared first, as the bench times it: adding to the last call's gradients costs
    a pass over every input (linear attention B8 T4096 H16 K128 V128 bf16: 1.2 GB, about 0.25 ms
    on an H200, where the A/B check timed the shipped configuration at 1.75 ms and the bench 1.43)."""
    for value in x.values():
        if isinstance(value, torch.Tensor):
            value.grad = None
    out = case.run(x, backend)
    out.backward(torch.ones_like(out))


def measure_config(tunable: kernels.Tunable, case, inputs: list[dict], bucket: str, config: dict,
                   device: torch.device, spin_up_s: float = 0.0) -> float:
    """Median seconds of forward + backward with ``config``, rotating over ``inputs``, after
    ``spin_up_s`` seconds of the same calls untimed (timing.spin_up)."""
    from rnnops.bench.timing import measure, spin_up

    step = _rotating_step(tunable, case, inputs)
    with cache.override(tunable.op, tunable.backend, bucket, config):
        spin_up(step, device, spin_up_s)
        return measure(step, device, warmup=1, repeats=5, min_seconds=0.05, max_seconds=1.0).median


def config_kernels(tunable: kernels.Tunable, case, inputs: list[dict], bucket: str, config: dict,
                   device: torch.device) -> dict[str, float]:
    """{kernel name: seconds} of one forward + backward with ``config`` (timing.kernel_breakdown,
    the largest 12; a kernel launched twice, e.g. the state walk recomputed, summed)."""
    from rnnops.bench.timing import kernel_breakdown

    step = _rotating_step(tunable, case, inputs)
    with cache.override(tunable.op, tunable.backend, bucket, config):
        step()  # anything the profiled call would otherwise compile or allocate first
        return {row["name"]: row["seconds"] for row in kernel_breakdown(step, device, top=12)}


def _rotating_step(tunable: kernels.Tunable, case, inputs: list[dict]) -> Callable[[], None]:
    """A forward + backward call on each of ``inputs`` in turn."""
    state = {"i": 0}

    def step():
        x = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        forward_backward(case, x, tunable.backend)

    return step


class Unsupported(Exception):
    """A timer cannot time this kernel here (the message says why)."""


@dataclass
class ShapeTimer:
    """Times one kernel at one shape: ``measure(config)`` -> seconds; ``prepare(configs)`` may
    compile configurations ahead of their measurement (returns how many it prepared);
    ``kernels(config)`` -> {kernel name: seconds} of one call, by the profiler (the A/B check's
    account of where a change gained or lost)."""

    measure: Callable[[dict], float]
    prepare: Callable[[list[dict]], int] = lambda configs: 0
    kernels: Callable[[dict], dict[str, float]] = lambda config: {}


# (tunable, shape, bucket) -> ShapeTimer; raises Unsupported for a kernel it cannot time
Timer = Callable[[kernels.Tunable, dict, str], ShapeTimer]


class Rejected(Exception):
    """A configuration unfit to measure: it raised, faulted or computed a wrong answer (the
    message says which)."""


def vet(op: str, backend: str, shape: dict, device: torch.device, dtype: torch.dtype, config: dict) -> str | None:
    """Why ``config`` must not be measured, or None: one forward and backward at a small size
    (compile_check.small_shape: batch and time cut, the kernels and their tiles unchanged) against
    the float64 reference on the same inputs, rounded to ``dtype``; the output and every input's
    gradient must agree within the bench's tolerance for ``dtype``. Compilers miscompile some legal
    configurations (rnnops.triton_backend.delta_rule.space has one), and the fastest wrong answer
    must never be stored."""
    from rnnops.bench.runner import TOLERANCE, rel_err
    from rnnops.triton_backend.compile_check import small_shape

    small = small_shape(op, shape)
    case = case_for(op, small)
    torch.manual_seed(0)
    trial = inputs_with_grads(case, device, dtype)
    exact = {k: v.detach().double().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
             else v for k, v in trial.items()}
    exact_out = case.run(exact, "reference")
    cotangent = torch.randn(exact_out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact_out.backward(cotangent.to(device))
    with cache.override(op, backend, kernels.bucket(op, small, dtype), config):
        trial_out = case.run(trial, backend)
        trial_out.backward(cotangent.to(device=device, dtype=trial_out.dtype))
    pairs = [("the output", trial_out, exact_out)]
    pairs += [(f"d{name}", trial[name].grad, exact[name].grad) for name in trial if isinstance(trial[name], torch.Tensor)
              and trial[name].requires_grad and (trial[name].grad is not None or exact[name].grad is not None)]
    tolerance = TOLERANCE[dtype]
    for what, got, want in pairs:
        err = float("inf") if got is None or want is None else rel_err(got, want)
        if not err <= tolerance:  # NaN fails too
            return f"{what} differs from the float64 reference by {err:.1e} (tolerance {tolerance:.0e})"
    return None


WRONG_ANSWER = 3  # a vetting worker's exit status when vet() found a wrong answer (1: it raised)


def vet_in_worker(op: str, backend: str, shape: dict, bucket: str, device: str, dtype: str, config: dict,
                  verdict: str) -> int:
    """In a worker process: one forward + backward of ``op`` at ``shape`` with ``config`` (its
    kernels compile into Triton's and CuPy's disk caches, for the timed process), then vet();
    returns the exit status, 0 or WRONG_ANSWER. An error, or a fault such as an illegal memory
    access (which would end the timed process's CUDA context for every later measurement), ends
    the worker with status 1 instead. Unless 0, the reason goes to the file ``verdict``."""
    device_, dtype_ = torch.device(device), DTYPES[dtype]
    try:
        case = case_for(op, shape)
        x = inputs_with_grads(case, device_, dtype_)
        with cache.override(op, backend, bucket, config):
            forward_backward(case, x, backend)
        reason = vet(op, backend, shape, device_, dtype_, config)
    except Exception as error:
        Path(verdict).write_text(f"{type(error).__name__}: {error}")
        raise
    if reason:
        Path(verdict).write_text(reason)
        return WRONG_ANSWER
    return 0


_VET_WORKER = ("import json, sys; from rnnops.autotune.tuner import vet_in_worker; "
               "sys.exit(vet_in_worker(**json.loads(sys.argv[1])))")


def device_timer(device: torch.device, dtype: torch.dtype, compile_workers: int = 0,
                 deadline: float = math.inf) -> Timer:
    """The tuner's timer: two sets of inputs of the shape on ``device``, measure_config, each
    configuration vetted (vet()) before its first measurement. With ``compile_workers``,
    ``prepare`` runs and vets each configuration in a worker process of its own (vet_in_worker),
    that many at a time (rnnops._workers): the configurations a search round may measure compile
    side by side instead of one by one in the timed loop, and one that faults there is never run
    in the timed process (prepare waits for them, so nothing runs while timing, but not past
    ``deadline``, a time.perf_counter() value). Without workers, or for a worker killed at its
    time limit, vet() runs in the timed process, where it catches wrong answers but a fault ends
    the run."""
    from rnnops._dispatch import unsupported
    from rnnops._workers import run_side_by_side

    def for_shape(tunable: kernels.Tunable, shape: dict, bucket: str) -> ShapeTimer:
        reason = unsupported(tunable.op, tunable.backend, device=device, dtype=dtype)
        if reason:
            raise Unsupported(reason)
        case = case_for(tunable.op, shape)
        torch.manual_seed(0)
        inputs = [inputs_with_grads(case, device, dtype) for _ in range(2)]
        vetted: set[tuple] = set()
        rejected: dict[tuple, str] = {}
        idle_since = [-math.inf]  # when the last measurement ended (time.perf_counter())

        def prepare(configs: list[dict]) -> int:
            if compile_workers <= 0:
                return 0
            task = {"op": tunable.op, "backend": tunable.backend, "shape": shape, "bucket": bucket,
                    "device": str(device), "dtype": DTYPES_BY_VALUE[dtype]}
            with tempfile.TemporaryDirectory(prefix="rnnops-vet-") as folder:
                verdicts = [Path(folder) / f"{i}.txt" for i in range(len(configs))]
                # a worker stuck for five minutes compiles nothing the budget can still measure
                statuses = run_side_by_side(
                    _VET_WORKER, [json.dumps(dict(task, config=c, verdict=str(v))) for c, v in zip(configs, verdicts)],
                    compile_workers, timeout_s=300.0, deadline=deadline)
                for config, status, verdict in zip(configs, statuses, verdicts):
                    key = search.config_key(config)
                    reason = verdict.read_text().strip() if verdict.exists() else "no reason written: a crash?"
                    if status == 0:
                        vetted.add(key)
                    elif status == WRONG_ANSWER:
                        rejected[key] = f"wrong answer in its worker process: {reason}"
                    elif status is not None:  # not run here: a fault would end this process's CUDA context
                        rejected[key] = f"failed in its worker process (exit status {status}): {reason}"
            return statuses.count(0)

        def measure(config: dict) -> float:
            key = search.config_key(config)
            if key not in vetted and key not in rejected:
                reason = vet(tunable.op, tunable.backend, shape, device, dtype, config)
                if reason:
                    rejected[key] = reason
                else:
                    vetted.add(key)
            if key in rejected:
                raise Rejected(rejected[key])
            # after a second or more without work (compiling, vetting, another shape's inputs) the
            # GPU's clocks have dropped: 0.3 s of calls first
            spin_up_s = 0.3 if time.perf_counter() - idle_since[0] > 1.0 else 0.0
            seconds = measure_config(tunable, case, inputs, bucket, config, device, spin_up_s)
            idle_since[0] = time.perf_counter()
            return seconds

        def kernel_seconds(config: dict) -> dict[str, float]:
            return config_kernels(tunable, case, inputs, bucket, config, device)

        return ShapeTimer(measure, prepare, kernel_seconds)

    return for_shape


def tuning_order(tunables: list[kernels.Tunable], shapes_of: Callable[[str], list[dict]], dtype: torch.dtype):
    """(tunable, shape, bucket) to tune, one shape per bucket (a T sweep and a batch sweep reach
    the same token count), in two rounds: first one bucket per kernel shape (its bucket prefix:
    op, dtype, head dims, variant), the middle size, so a short budget still covers every kernel;
    then the other sizes. Untuned buckets take the nearest tuned size (TuneCache.config_for)."""
    first, rest = [], []
    for tunable in tunables:
        by_prefix: dict[str, list[tuple[str, dict]]] = {}
        for shape in shapes_of(tunable.op):
            b = kernels.bucket(tunable.op, shape, dtype)
            group = by_prefix.setdefault(cache.bucket_prefix(b), [])
            if all(b != seen for seen, _ in group):
                group.append((b, shape))
        for group in by_prefix.values():
            group.sort(key=lambda item: cache.bucket_size(item[0]))
            middle = group.pop((len(group) - 1) // 2)
            first.append((tunable, middle[1], middle[0]))
            rest.extend((tunable, shape, b) for b, shape in group)
    return first + rest


def tune(ops, device: torch.device, dtype: torch.dtype, hardware: Hardware, *, top: int = 2,
         fraction: float = 0.1, budget_s: float = 300.0, shapes: list[dict] | None = None,
         exhaustive: bool = False, tries: list[dict] | None = None, timer: Timer | None = None,
         compile_workers: int = 0, progress: Callable[[str], None] = lambda text: None) -> list[Result]:
    """Per kernel and shape bucket (tuning_order): measure the model's ``top`` configurations, the
    kernel's default and the configuration shipped for the GPU, then search (search.coordinate_search) measuring at most ``fraction`` of the
    legal space (search.measurement_cap); store the fastest in the device's cache. Stops
    measuring once ``budget_s`` is spent (a shape in progress keeps its fastest so far).

    ``exhaustive``: measure every legal configuration instead, and replay the search on those
    timings to report how close it gets and how many it measures (the search's own check).
    ``tries`` (changes such as {"num_warps": 4}): measure the configuration shipped for the GPU
    (else the default) and it with each change, nothing else, and store nothing (an A/B check).
    ``timer`` replaces device_timer (tests); ``compile_workers`` is passed to it."""
    run = _Tuning(dtype, hardware, top, fraction, exhaustive, tries, time.perf_counter() + budget_s, progress,
                  cache.for_device(device))
    order = tuning_order(kernels.tunables(ops), lambda op: shapes if shapes is not None else standard_shapes(op),
                         dtype)
    timer = timer or device_timer(device, dtype, compile_workers, run.deadline)
    results = []
    for tunable, shape, bucket in order:
        if run.over_budget():
            progress(f"budget of {budget_s:.0f} s spent; {tunable.name} {bucket} not tuned")
            continue
        started = time.perf_counter()
        results.append(run.tune_bucket(tunable, shape, bucket, timer))
        results[-1].wall_seconds = time.perf_counter() - started
    return results


@dataclass
class _Tuning:
    """One tune() run's settings."""

    dtype: torch.dtype
    hardware: Hardware
    top: int
    fraction: float
    exhaustive: bool
    tries: list[dict] | None
    deadline: float  # time.perf_counter() value
    progress: Callable[[str], None]
    device_cache: cache.TuneCache | None

    def over_budget(self) -> bool:
        return time.perf_counter() > self.deadline

    def tune_bucket(self, tunable: kernels.Tunable, shape: dict, bucket: str, timer: Timer) -> Result:
        count, ranked = rank(tunable, shape, self.dtype, self.hardware)
        default = tunable.default()
        result = Result(tunable.op, tunable.backend, bucket, shape, count, ranked[:5], default, default)
        try:
            shape_timer = timer(tunable, shape, bucket)
        except Unsupported as reason:
            result.notes.append(f"skipped: {reason}")
            return result

        def measure(config):
            self.progress(f"{tunable.name} {bucket} {config}")
            try:
                return shape_timer.measure(config)
            except Exception as error:  # a configuration that fails to compile or launch is skipped
                result.notes.append(f"{config}: {type(error).__name__}: {str(error)[:200]}")
                return None

        # the model's best, the kernel's default and the configuration shipped for this GPU (the
        # compile screen's pick, which the measured walk then improves on)
        shipped = shipped_config(tunable, self.hardware.name, bucket)
        seeds = []
        for config in ranked[:self.top] + [default, shipped]:
            if config in ranked and config not in seeds:
                seeds.append(config)
        cap = search.measurement_cap(count, search.movable_variables(ranked), self.fraction)
        if self.tries is not None:  # the A/B check: exactly these, legal or not
            base = shipped or default
            seeds = [base]
            for change in self.tries:  # one --try list serves every backend of an op
                foreign = sorted(set(change) - set(default))
                if foreign:
                    result.notes.append(f"{change}: not tried, {', '.join(foreign)} not variables of this kernel")
                else:
                    seeds.append(dict(base, **change))
            if len(seeds) == 1:  # no change is about this kernel (another backend's): nothing to compare
                return result
            cap = len(seeds)
        neighbourhood = search.Neighbourhood(ranked)  # (the exhaustive check searches the space twice)
        found = search.coordinate_search(ranked, ranked if self.exhaustive else seeds, measure,
                                         count if self.exhaustive else cap, should_stop=self.over_budget,
                                         prepare=shape_timer.prepare, neighbourhood=neighbourhood)
        result.timings = [(dict(key), seconds) for key, seconds in found.timings.items()]
        if self.tries is not None:  # where each change gained or lost, kernel by kernel
            for config, seconds in result.timings:
                if seconds is None or self.over_budget():
                    break
                try:
                    profile = shape_timer.kernels(config)
                except Exception as error:  # a profiler that cannot start costs the account, not the A/B
                    result.notes.append(f"kernels not profiled: {type(error).__name__}: {str(error)[:120]}")
                    break
                if not profile:  # a timer that profiles nothing
                    break
                result.kernel_seconds.append(profile)
        if self.exhaustive and found.measured == count and found.seconds:
            replay = search.coordinate_search(ranked, seeds, lambda c: found.timings[search.config_key(c)], cap,
                                              neighbourhood=neighbourhood)
            if replay.seconds:
                result.notes.insert(0, f"search alone: {replay.seconds / found.seconds:.3f}x the best, "
                                       f"measuring {replay.measured} of {count}")  # first: the table cuts notes
        if found.best is None:
            return result
        result.config, result.seconds, result.measured = found.best, found.seconds, found.measured
        result.default_seconds = found.timings.get(search.config_key(default))
        if self.device_cache is not None and self.tries is None:
            self.device_cache.put({cache.key(tunable.op, tunable.backend, bucket):
                                   {"config": result.config, "seconds": result.seconds,
                                    "default_seconds": result.default_seconds, "legal": count,
                                    "measured": result.measured}})
        return result


def explain(op: str, shape: dict, hardware: Hardware, dtype: torch.dtype,
            screen: CompileScreen | None = None) -> str:
    """The constraints of every kernel for ``op`` at ``shape``, what each removes, and the ranking;
    with ``screen``, what ptxas reports for each ranked Triton configuration."""
    lines = []
    for tunable in kernels.tunables([op]):
        space = tunable.space(shape, dtype, hardware)
        total = math.prod(len(domain) for domain in space.variables.values())
        count, ranked = rank(tunable, shape, dtype, hardware)
        bucket = kernels.bucket(op, shape, dtype)
        lines.append(f"{tunable.name} on {hardware.name}, bucket {bucket}")
        lines.append("  variables: " + ", ".join(f"{n} in {list(d)}" for n, d in space.variables.items()))
        lines.append(f"  {total} combinations, {count} legal")
        for name, removed in space.explain():
            lines.append(f"  - {name}: removes {removed}")
        default, floor = tunable.default(), tunable.floor(shape, dtype, hardware)
        cost_default = tunable.cost(default, shape, dtype, hardware, floor)
        basis = ("T times a step's latency: kernels._cells_step_cycles" if tunable.step_cycles else
                 "the floor over the waves' utilisation, times tile, thread-count and kernel penalties")
        lines.append(f"  roofline floor of forward + backward: {floor * 1e3:.3f} ms; the model's cost of a "
                     f"configuration ({basis}), as a multiple of it, ranks configurations and does not predict "
                     "their time")

        def model(config: dict, tunable=tunable, floor=floor, cost_default=cost_default) -> str:
            cost = tunable.cost(config, shape, dtype, hardware, floor)
            return f"model cost {cost / floor:.1f}x the floor ({cost_default / cost:.2f}x the default's)"

        for i, config in enumerate(ranked[:5]):
            lines.append(f"  #{i + 1} {config}: {model(config)}")
            if screen is not None and tunable.backend == "triton":
                spills, shared, registers = screen.compiled(tunable, shape, dtype, hardware, config)
                lines.append(f"      compiled for {hardware.arch}: up to {registers} registers, "
                             + (", ".join(f"{k} spills {v} B" for k, v in spills.items()) or "no spills")
                             + f", {shared} B shared of {hardware.shared_memory_per_block}")
                # what the model cannot see: how many programs of each kernel share an SM (and
                # what limits it), which sets the waves of the latency-bound state walks, and
                # which tensor-core instructions it compiled to (wgmma, mma or none)
                occupancy = []
                for report in screen.kernel_reports(tunable, shape, dtype, hardware, config):
                    per_sm, limiter = hardware.programs_per_sm(report.threads, report.registers, report.shared_bytes)
                    occupancy.append(f"{report.name.removesuffix('_kernel')} {per_sm} ({limiter}; {report.tensor_cores})")
                lines.append("      programs per SM (limit; tensor cores): " + ", ".join(occupancy))
        lines.append(f"  default {default}: model cost {cost_default / floor:.1f}x the floor"
                     + ("" if default in ranked else " (not legal here)"))
        shipped = shipped_config(tunable, hardware.name, bucket)
        if shipped is not None:
            place = f"rank {ranked.index(shipped) + 1} of {count}" if shipped in ranked else "not legal here"
            lines.append(f"  shipped for {hardware.name} (what runs until tuned): {shipped}: {model(shipped)}, {place}")
        if ranked:
            lines.append(f"  winner by the model: {ranked[0]} (lowest model cost); measuring decides on a GPU")
    return "\n".join(lines)
