"""Compile the Triton kernels for a GPU architecture on a machine without one, and read ptxas'
report per kernel (registers, spills, stack and shared memory), which tensor-core
instructions it uses (wgmma, mma or none; from its PTX) and, with ``--loops``, the size of its
innermost loop that evaluates exponentials (SASS instructions, exponentials, warp shuffles and
block barriers per iteration: the scans' per-step work and the sums across their lanes, a Triton
cell's step and its layout conversions).

Triton's interpreter (the CPU tests) runs any tile shape and any amount of shared memory; the
compiler does not. This check runs an op's host code with CPU tensors and every kernel launch
intercepted (nothing executes), then compiles each launched specialisation exactly as the launch
would have (same argument types, alignment hints, constexprs, num_warps/num_stages) for the target
(``GPUTarget("cuda", 80 | 90, 32)``). It relies on Triton's JIT internals
(``create_function_from_signature``, ``JITFunction._pack_args``; checked with Triton 3.9) and
needs Triton's bundled ptxas, not a GPU or a driver.

The kernels must be imported as compiled kernels, so run it in a process without
``TRITON_INTERPRET=1``: ``python -m rnnops.triton_backend.compile_check --arch 90 [--json]``
prints one row per kernel specialisation of the standard cases (:func:`standard_calls`); with
``--gpu NAME`` the launches take that GPU's shipped configurations. :func:`config_reports`
compiles one op with one configuration (``python -m rnnops autotune --dry-run --compile-check``).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from .. import _ptxas, _sass
from .._files import write_atomically
from .._ptxas import KernelReport, lane_divergent_sums, parse_log, tensor_core_path
from .._sass import innermost_exponential_loop


@dataclass
class Launch:
    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict


class _LargestShippedBucket:
    """Stands in for a device cache: a key's shipped default of the largest size bucket (tokens
    or batch) with the same op, dtype and head shape, so small CPU stand-in inputs launch with the
    configurations of benchmark-sized ones."""

    def __init__(self, gpu: str):
        from rnnops.autotune.cache import shipped_defaults

        self.shipped = shipped_defaults(gpu)

    def config_for(self, key: str) -> dict | None:
        from rnnops.autotune.cache import bucket_prefix, bucket_size

        sizes = {bucket_size(k): config for k, config in self.shipped.items() if bucket_prefix(k) == bucket_prefix(key)}
        return sizes[max(sizes)] if sizes else None


@contextlib.contextmanager
def captured_launches(gpu: str | None = None) -> Iterator[list[Launch]]:
    """Within the block, Triton kernel launches are recorded instead of run, and the Triton
    backends accept CPU tensors (their outputs stay as allocated). With ``gpu`` (a name of
    rnnops.autotune.hardware) launches use that GPU's shipped default configurations, as they
    would on it before tuning, and the host code's decisions by a block's shared memory (the
    Triton cells' resident weights, the output kernel's stages) or an SM's registers (register_cap)
    take that GPU's; without, each kernel's DEFAULT_CONFIG, and no limit (as on the CPU)."""
    from triton.runtime import jit

    from rnnops.autotune import cache, hardware

    from . import _common

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs compiled kernels: run it without TRITON_INTERPRET=1")
    launches: list[Launch] = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append(Launch(kernel, args, kwargs))

    offline = None if gpu is None else _LargestShippedBucket(gpu)
    saved = jit.JITFunction.run, _common.interpreting, cache.for_device
    jit.JITFunction.run, _common.interpreting, cache.for_device = record, lambda: True, lambda device: offline
    try:
        with device_limits(None if gpu is None else hardware.named(gpu)):
            yield launches
    finally:
        jit.JITFunction.run, _common.interpreting, cache.for_device = saved


@contextlib.contextmanager
def device_limits(hardware) -> Iterator[None]:
    """Within the block, the host code's look-ups of a block's shared memory and an SM's registers
    (which pick the output kernel's stages, the Triton cells' resident weights, register_cap's
    caps) return ``hardware``'s (an rnnops.autotune.hardware.Hardware), or None (no limit, as on
    the CPU) without."""
    from . import linear_attn, rnn

    limit = None if hardware is None else hardware.shared_memory_per_block
    registers = None if hardware is None else hardware.registers_per_sm
    saved = linear_attn.block_shared_memory, rnn.block_shared_memory, linear_attn.sm_registers
    linear_attn.block_shared_memory = rnn.block_shared_memory = lambda device: limit
    linear_attn.sm_registers = lambda device: registers
    try:
        yield
    finally:
        linear_attn.block_shared_memory, rnn.block_shared_memory, linear_attn.sm_registers = saved


def _specialisation(launch: Launch, backend) -> tuple[object, object]:
    """The (ASTSource, options) that running ``launch`` would compile for ``backend``."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    kernel, kwargs = launch.kernel, dict(launch.kwargs, debug=False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def _compile(source, options, target) -> tuple[object, KernelReport]:
    """Triton's compiled kernel of ``source`` and its report (ptxas' log, the shared memory, the
    threads, and from the PTX the tensor-core path and the lane-divergent sums)."""
    import triton
    from triton import knobs

    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True  # ptxas prints its report only when it runs
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=target, options=options.__dict__)
    (report,) = parse_log(log.getvalue())
    return compiled, replace(report, shared_bytes=compiled.metadata.shared, threads=32 * options.num_warps,
                             tensor_cores=tensor_core_path(compiled.asm["ptx"]),
                             lane_divergent_sums=lane_divergent_sums(compiled.asm["ptx"]))


def compile_launch(launch: Launch, arch: int) -> tuple[object, KernelReport]:
    """One launch's compiled kernel for compute capability ``arch`` (its ``asm``: "ptx", "cubin",
    for reading its SASS with rnnops._sass) and its report; compiled afresh, nothing stored."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    return _compile(*_specialisation(launch, make_backend(target)), target)


def compile_launches(launches: list[Launch], arch: int, loops: bool = False) -> list[KernelReport]:
    """Compile each distinct specialisation among ``launches`` for compute capability ``arch``
    (80, 90, ...); raises what Triton raises on a compile error. With ``loops``, each report also
    counts the instructions, exponentials, shuffles and block barriers of the kernel's innermost
    loop that evaluates exponentials (its SASS; 0 where it has none)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    reports, seen = [], set()
    for launch in launches:
        source, options = _specialisation(launch, backend)
        key = (source.hash(), str(options))
        if key in seen:
            continue
        seen.add(key)
        # backend.hash(): ptxas and the arch; _READER: a report stored before a field existed, or
        # before a change to how one is read, is not read back
        stored = _StoredReport(f"{triton.__version__}|{backend.hash()}|{key[0]}|{key[1]}|{loops}|{_READER}")
        report = stored.read()
        if report is None:
            compiled, report = _compile(source, options, target)
            if loops:
                with contextlib.suppress(LookupError):
                    loop = innermost_exponential_loop(compiled.asm["cubin"])
                    report = replace(report, loop_instructions=loop.instructions,
                                     loop_exponentials=loop.count("MUFU.EX2"), loop_shuffles=loop.count("SHFL"),
                                     loop_barriers=loop.count("BAR"))
            stored.write(report)
        reports.append(report)
    return reports


# the report's fields and the source that reads them from ptxas' log, the PTX and the SASS
_READER = hashlib.sha256("".join([",".join(f.name for f in fields(KernelReport))] + [
    Path(module.__file__).read_text() for module in (_ptxas, _sass)]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _StoredReport:
    """A compiled specialisation's report kept on disk (Triton's cache directory, rnnops-ptxas/),
    so that another check of the same specialisation (the same kernel source, argument
    specialisation, options, architecture, Triton and ptxas) reads it instead of
    compiling again: the CPU tests compile many kernels twice (a GPU's shipped configuration is
    often the default; DeltaProduct launches the gated delta rule's kernels), and later checks
    and compile screens (autotune --compile-check) meet the same ones. No directory: nothing kept."""

    key: str

    @property
    def path(self) -> Path | None:
        from triton import knobs

        directory = knobs.cache.dir
        digest = hashlib.sha256(self.key.encode()).hexdigest()
        return Path(directory) / "rnnops-ptxas" / f"{digest}.json" if directory else None

    def read(self) -> KernelReport | None:
        path = self.path
        try:
            return KernelReport(**json.loads(path.read_text())) if path is not None and path.exists() else None
        except (OSError, ValueError, TypeError):  # half written by another process, or an older layout
            return None

    def write(self, report: KernelReport) -> None:
        path = self.path
        if path is None:
            return
        with contextlib.suppress(OSError):  # a read-only cache keeps nothing
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(asdict(report)))


def _forward_backward(case, dtype: torch.dtype) -> None:
    from rnnops.autotune import tuner

    cpu = torch.device("cpu")
    tuner.forward_backward(case, tuner.inputs_with_grads(case, cpu, dtype), "triton")


SMALL_SIZES = {"linear_attn": {"B": 1, "T": 128, "H": 2}, "delta_rule": {"B": 1, "T": 128, "H": 2},
               "delta_product": {"B": 1, "T": 128, "H": 2}, "selective_scan": {"B": 1, "T": 128},
               "rnn": {"B": 2, "T": 8}}  # sizes that change the grid, not the kernels


def small_shape(op: str, shape: dict) -> dict:
    """``shape`` cut to SMALL_SIZES (sizes that change the grid, not the kernels). Grouped q / k
    heads keep their group, H / Hk, a constexpr of the kernels: H becomes a multiple of it, with
    as few q / k heads as that allows."""
    small = dict(shape, **SMALL_SIZES[op])
    if "Hk" in shape:
        group = shape["H"] // shape["Hk"]
        small["H"] = max(small["H"], group) // group * group
        small["Hk"] = small["H"] // group
    return small


def config_launches(op: str, shape: dict, dtype: torch.dtype, config: dict, hardware=None) -> list[Launch]:
    """The Triton launches of ``op``'s forward and backward at ``shape`` (an autotune standard
    shape, cut by :func:`small_shape`) with ``config``, captured (nothing compiles or runs), with
    ``hardware``'s limits where given (device_limits)."""
    from rnnops.autotune import cache, kernels, tuner

    small = small_shape(op, shape)
    with (cache.override(op, "triton", kernels.bucket(op, small, dtype), config), captured_launches() as launches,
          device_limits(hardware)):
        _forward_backward(tuner.case_for(op, small), dtype)
    return launches


def config_reports(op: str, shape: dict, dtype: torch.dtype, config: dict, arch: int,
                   kernels: frozenset[str] | None = None, gpu: str | None = None) -> list[KernelReport]:
    """:func:`config_launches` compiled for ``arch``, with ``gpu``'s limits where named (an
    rnnops.autotune.hardware name); only the kernels named in ``kernels``, if given."""
    from rnnops.autotune import hardware

    launches = config_launches(op, shape, dtype, config, None if gpu is None else hardware.named(gpu))
    return compile_launches([launch for launch in launches if kernels is None or launch.kernel.__name__ in kernels],
                            arch)


def standard_calls(dtype: torch.dtype) -> list[tuple[str, Callable[[], None]]]:
    """(label, call) per op variant at the head dims of the GPU benchmark (rnnops.bench.cases),
    forward and backward, with B and T cut to a few chunks (tile shapes do not depend on them)."""
    import rnnops
    from rnnops.autotune.tuner import case_for
    from rnnops.bench.cases import ssd_case

    def forward_backward(case):
        return case.name, lambda: _forward_backward(case, dtype)

    shapes = [("linear_attn", {"K": 128, "V": 128, "gate": gate}) for gate in ("none", "scalar", "per-key")]
    shapes += [(op, {"K": 128, "V": 128, "gated": gated, "num_householder": n})
               for op, n, gated in (("delta_rule", 1, False), ("delta_rule", 1, True), ("delta_product", 2, True))]
    shapes.append(("selective_scan", {"Dm": 2048, "N": 16}))
    shapes += [("rnn", {"cell": cell, "H": H, "D": D})
               for cell in ("lstm", "gru", "slstm", "elman") for D, H in ((64, 12), (256, 3))]
    calls = [forward_backward(case_for(op, small_shape(op, shape))) for op, shape in shapes]
    # Mamba-2's SSD as benchmarked: 80 value heads of one q / k group (GROUP 80), K 128, V 64
    calls.append(forward_backward(ssd_case(1, 128, 80, 64, 128, 1)))

    B, H, K, V, N, Dm = 2, 2, 128, 128, 16, 2048
    q, k, v = (torch.randn(B, H, d).to(dtype) for d in (K, K, V))
    state = torch.randn(B, H, K, V)
    g = -torch.rand(B, H, K).to(dtype)
    scan_state = torch.randn(B, Dm, N)
    u, delta, z = (torch.randn(B, Dm).to(dtype) for _ in range(3))
    calls += [
        ("linear_attn_step", lambda: rnnops.linear_attn_step(q, k, v, g, state=state, backend="triton")),
        ("delta_rule_step", lambda: rnnops.delta_rule_step(q, k, v, torch.rand(B, H).to(dtype), g[..., 0],
                                                           state=state, backend="triton")),
        ("selective_state_update", lambda: rnnops.selective_state_update(
            scan_state, u, delta, -torch.rand(Dm, N), torch.randn(B, N).to(dtype), torch.randn(B, N).to(dtype),
            torch.randn(Dm), z, delta_softplus=True, backend="triton")),
    ]
    return calls


def check(arch: int, dtypes=(torch.bfloat16, torch.float32), case: str = "", gpu: str | None = None,
          loops: bool = False) -> list[dict]:
    """Rows (dtype, case, kernel, registers, spills, stack, shared bytes) for every kernel the
    standard calls whose label matches the regular expression ``case`` launch (with ``gpu``'s shipped configurations,
    see :func:`captured_launches`), compiled for ``arch``; ``loops``: see :func:`compile_launches`."""
    rows = []
    for dtype in dtypes:
        for label, call in standard_calls(dtype):
            if not re.search(case, label):
                continue
            with captured_launches(gpu) as launches:
                call()
            for report in compile_launches(launches, arch, loops):
                rows.append({"dtype": str(dtype).removeprefix("torch."), "case": label, **asdict(report)})
    return rows


def capability(hardware) -> int:
    """The ``arch`` number of a rnnops.autotune.hardware.Hardware: (9, 0) -> 90."""
    major, minor = hardware.compute_capability
    return 10 * major + minor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnops.triton_backend.compile_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", help="launch with this GPU's shipped default configurations (e.g. H100; "
                        "default: each kernel's DEFAULT_CONFIG); --arch defaults to its compute capability")
    parser.add_argument("--arch", type=int, help="compute capability: 80 (A100), 90 (H100), ... (default 90)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), action="append",
                        help="input dtypes (default bfloat16 and float32)")
    parser.add_argument("--case", default="",
                        help="only the standard calls whose label matches this regular expression")
    parser.add_argument("--loops", action="store_true",
                        help="also count the instructions, exponentials, warp shuffles and block barriers per "
                        "iteration of each kernel's innermost loop that evaluates exponentials (SASS, through "
                        "cuobjdump: about a second per kernel; 0/0/0/0 where none does)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    dtypes = tuple(getattr(torch, d) for d in args.dtype) if args.dtype else (torch.bfloat16, torch.float32)
    from rnnops.autotune.hardware import named

    arch = args.arch or (capability(named(args.gpu)) if args.gpu else 90)
    rows = check(arch, dtypes, args.case, args.gpu, args.loops)
    if args.json:
        json.dump(rows, sys.stdout)
        return 0
    # programs per SM by CUDA's occupancy rules, on the named GPU (else an H100 or an A100)
    occupancy_gpu = named(args.gpu or ("A100" if arch < 90 else "H100"))
    loop_header = f" {'loop / exp / shfl / bar':>23}" if args.loops else ""
    print(f"{'dtype':9} {'case':40} {'kernel':24} {'regs':>4} {'spill st/ld':>12} {'shared':>7} {'mma':>5}{loop_header}  "
          f"per SM on {occupancy_gpu.name}")
    for r in rows:
        spills = f"{r['spill_stores']}/{r['spill_loads']}"
        per_sm, limiter = occupancy_gpu.programs_per_sm(r["threads"], r["registers"], r["shared_bytes"])
        loop = (f" {r['loop_instructions']:>5}/{r['loop_exponentials']:<4}/{r['loop_shuffles']:<5}/{r['loop_barriers']:<5}"
                if args.loops else "")
        print(f"{r['dtype']:9} {r['case'][:40]:40} {r['name'][:24]:24} {r['registers']:4} {spills:>12} "
              f"{r['shared_bytes']:7} {r['tensor_cores']:>5}{loop}  {per_sm} ({limiter})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
