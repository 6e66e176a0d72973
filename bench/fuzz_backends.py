"""Random-shape fuzzing of the kernel backends against the float64 reference, forward and every
gradient: the Triton kernels under Triton's interpreter and the CUDA kernels in the simulator, at
shapes, layouts, options and value ranges drawn at random (odd and tiny sizes, packed sequences,
mamba_ssm's (B, D, L) strides, strong decays, states or not), where the tests pin chosen cases.

    python bench/fuzz_backends.py [--minutes M] [--cases N] [--families F,...] [--seed S]
    python bench/fuzz_backends.py --repro 'LINE'      (one failure's line, printed as it was found)

Each failure prints one JSON line: the family, its parameters and seeds, and every gradient's
relative error on the same inputs for each backend of the op (the chunked one included), and a
verdict. A kernel bug shows as one backend off where the others are not; a quantity that float32
cannot resolve (a gradient summed from terms far larger than it, one below float32's range) leaves
every backend off. So a failure is a "bug" where some other backend gets an out-of-bound quantity
RESOLVED times closer (or the backend raised), else "float32 limit"; only bugs count as failing
(the exit status), limits are printed and counted apart. Bounds: 1e-4 for Triton (the issues'),
1e-5 for the simulator's CUDA kernels.
On 2026-11-28, 20 minutes of it found the CUDA scan backward losing dA to cancellation under
strong decay (tests/test_cuda_selective_scan.py::test_strong_decay_keeps_every_gradient).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RNNOPS_CUDA_SIMULATOR", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_triton_delta_rule as delta_tests
import test_triton_linear_attn as linear_tests
import test_triton_rnn as rnn_tests
import test_triton_selective_scan as scan_tests
import torch
from rnnops.autotune import cache, kernels
from conftest import as_float64, rel_err, run_with_grads

BOUNDS = {"triton": 1e-4, "cuda": 1e-5}
RESOLVED = 10.0  # an out-of-bound error this many times another backend's on the same quantity: a bug


def _packed(rng: random.Random, T: int) -> list[int]:
    """Offsets [0, ..., T] of up to four packed sequences, empty ones allowed."""
    return [0] + sorted(rng.randint(0, T) for _ in range(rng.randint(0, 3))) + [T]


def _per_sequence_state(x: dict, offsets: list[int] | None) -> None:
    if offsets is not None and "initial_state" in x:
        x["initial_state"] = torch.randn(len(offsets) - 1, *x["initial_state"].shape[1:])


def linear_case(rng: random.Random):
    packed = rng.random() < 0.3
    p = dict(B=1 if packed else rng.randint(1, 3), T=rng.randint(1, 90), H=rng.randint(1, 3),
             K=rng.choice([16, 32, 48, 64]), V=rng.choice([16, 32, 48]), gate=rng.choice(linear_tests.GATES),
             initial=rng.random() < 0.5, gate_scale=rng.choice([1.0, 5.0, 20.0]))
    chunk, final = rng.choice([16, 32, 64]), rng.random() < 0.7
    offsets = _packed(rng, p["T"]) if packed else None

    def make():
        x = linear_tests.make_inputs(**p)
        _per_sequence_state(x, offsets)
        return x

    cu = None if offsets is None else torch.tensor(offsets)
    return (dict(p, chunk=chunk, final=final, offsets=offsets), make,
            lambda backend, **kw: linear_tests.run(backend, chunk, cu_seqlens=cu, final=final, **kw))


def delta_case(rng: random.Random):
    packed = rng.random() < 0.3
    householder = rng.choice([None, None, 1, 2, 3])
    p = dict(B=1 if packed else rng.randint(1, 3), T=rng.randint(1, 90), H=rng.randint(1, 3),
             K=rng.choice([16, 32, 48, 64]), V=rng.choice([16, 32, 48]), gated=rng.random() < 0.5,
             num_householder=householder, initial=rng.random() < 0.5, gate_scale=rng.choice([1.0, 5.0, 20.0]),
             beta_max=rng.choice([1.0, 2.0]))
    chunk, final = rng.choice([16, 32, 64]), rng.random() < 0.7
    offsets = _packed(rng, p["T"]) if packed else None
    cu = None if offsets is None else torch.tensor(offsets)

    def make():
        x = delta_tests.make_inputs(**p)
        _per_sequence_state(x, offsets)
        return x

    if householder is None:
        def op(backend, **kw):
            return delta_tests.delta(backend, chunk, cu_seqlens=cu, final=final, **kw)
    else:
        def op(backend, **kw):
            return delta_tests.product(backend, chunk, householder, cu_seqlens=cu, **kw)
    return dict(p, chunk=chunk, final=final, offsets=offsets), make, op


def scan_case(rng: random.Random):
    packed = rng.random() < 0.3
    layouts = [rng.choice(["static", "shared", "grouped"]) for _ in range(2)]
    Dm = rng.choice([1, 3, 6, 32, 40, 64, 70])
    if "grouped" in layouts:  # (make_inputs' three groups)
        Dm = 3 * max(1, Dm // 3)
    p = dict(B=1 if packed else rng.randint(1, 3), T=rng.randint(1, 100), Dm=Dm, N=rng.choice([1, 4, 13, 16]),
             layout_B=layouts[0], layout_C=layouts[1], initial=rng.random() < 0.5, extras=rng.random() < 0.7,
             A_scale=rng.choice([1.0, 3.0, 50.0]))
    softplus, time_contiguous = rng.random() < 0.8, rng.random() < 0.3
    # each sequence in segments walked apart (both backends' ``segments``), in short chunks so that
    # a short sequence has several (some segments empty where there are more than chunks)
    segments = rng.choice([1, 1, 2, 3, 8])
    offsets = _packed(rng, p["T"]) if packed else None
    cu = None if offsets is None else torch.tensor(offsets)

    def make():
        x = scan_tests.make_inputs(**p)
        _per_sequence_state(x, offsets)
        if not softplus:  # dt must not be negative (e^(dt A) with A < 0 would grow past any float)
            x["delta"] = x["delta"].abs()
            if "delta_bias" in x:
                x["delta_bias"] = x["delta_bias"].abs()
        if time_contiguous:  # mamba_ssm's (B, D, L) memory
            for name in ("u", "delta", "z"):
                if name in x:
                    x[name] = x[name].transpose(1, 2).contiguous().transpose(1, 2)
        return x

    def op(backend, **kw):
        tiles = {"triton": {"chunk": 16}, "cuda": {"warps": 1, "items": 4}}.get(backend)
        if segments == 1 or tiles is None:
            return scan_tests.scan(backend, softplus=softplus, cu_seqlens=cu, **kw)
        bucket = kernels.bucket("selective_scan", kernels.selective_scan_shape(kw["u"], kw["A"]), kw["u"].dtype)
        with cache.override("selective_scan", backend, bucket, dict(tiles, segments=segments)):
            return scan_tests.scan(backend, softplus=softplus, cu_seqlens=cu, **kw)

    return (dict(p, softplus=softplus, time_contiguous=time_contiguous, offsets=offsets, segments=segments), make, op)


def rnn_case(rng: random.Random):
    cell = rng.choice(["lstm", "gru", "slstm", "elman"])
    p = dict(B=rng.randint(1, 4), T=rng.randint(1, 12), H=rng.randint(1, 3), D=rng.choice([16, 32, 48, 64]),
             initial=rng.random() < 0.6, bias=rng.random() < 0.8)
    return dict(p, cell=cell), lambda: rnn_tests.make_inputs(cell, **p), rnn_tests.run(cell)


# family: (case maker, backend under test, the op's other backends compared on a failure)
FAMILIES = {
    "linear-triton": (linear_case, "triton", ("chunked",)),
    "delta-triton": (delta_case, "triton", ("chunked",)),
    "scan-triton": (scan_case, "triton", ("cuda", "chunked")),
    "scan-cuda": (scan_case, "cuda", ("triton", "chunked")),
    "rnn-triton": (rnn_case, "triton", ("cuda",)),
    "rnn-cuda": (rnn_case, "cuda", ("triton",)),
}


def errors(op, x: dict, backend: str, reference) -> dict[str, float] | str:
    """Each output's and gradient's relative error of ``backend`` against ``reference`` (the float64
    run's outputs and gradients), or why it failed (a non-finite value: rel_err; valid input
    refused or crashing)."""
    outs_r, grads_r = reference
    try:
        outs, grads = run_with_grads(lambda **kw: op(backend=backend, **kw), x)
        found = {f"output {i}": rel_err(a, b) for i, (a, b) in enumerate(zip(outs, outs_r))}
        found.update({f"d/d{name}": rel_err(grads[name], g) if grads.get(name) is not None else float("inf")
                      for name, g in grads_r.items()})
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:200]}"
    return found


def check(family: str, case_seed: int) -> dict | None:
    """One case of ``family`` drawn from ``case_seed``: None if the backend under test is within
    its bound everywhere, else the failure's record with the op's other backends on the same inputs."""
    maker, backend, others = FAMILIES[family]
    params, make, op = maker(random.Random(case_seed))
    torch.manual_seed(case_seed)
    x = make()
    reference = run_with_grads(lambda **kw: op(backend="reference", **kw), as_float64(x))
    found = errors(op, x, backend, reference)
    if isinstance(found, dict) and all(e <= BOUNDS[backend] for e in found.values()):
        return None
    results = {backend: found, **{other: errors(op, x, other, reference) for other in others}}
    return {"family": family, "case_seed": case_seed, "params": params,
            "errors": {name: {k: f"{e:.1e}" for k, e in r.items()} if isinstance(r, dict) else r
                       for name, r in results.items()},
            "verdict": verdict(found, [results[other] for other in others], BOUNDS[backend])}


def verdict(found: dict[str, float] | str, others: list[dict[str, float] | str], bound: float) -> str:
    """"bug" if the backend raised or left a quantity non-finite, or one of its out-of-bound
    quantities is resolved RESOLVED times better by some other backend or by none (nothing to
    compare); else "float32 limit" (module docstring)."""
    if not isinstance(found, dict):
        return "bug"
    for name, error in found.items():
        resolved = [r[name] for r in others if isinstance(r, dict) and name in r]
        if not math.isfinite(error) or (error > bound and (not resolved or RESOLVED * min(resolved) < error)):
            return "bug"
    return "float32 limit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="stop drawing cases after this long")
    parser.add_argument("--cases", type=int, help="stop after this many cases")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--seed", type=int, default=0, help="of the sequence of cases")
    parser.add_argument("--repro", metavar="LINE", help="rerun one failure's printed line")
    args = parser.parse_args(argv)
    if args.repro:
        record = json.loads(args.repro)
        print(json.dumps(check(record["family"], record["case_seed"]) or {"passed": record["family"]}))
        return 0
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}: choose from {', '.join(FAMILIES)}")
    rng, start, count, failures, limits = random.Random(args.seed), time.time(), 0, 0, 0
    while time.time() - start < 60 * args.minutes and (args.cases is None or count < args.cases):
        family = families[count % len(families)]
        record = check(family, rng.randrange(2**31))
        count += 1
        if record is not None:
            if record["verdict"] == "bug":
                failures += 1
            else:
                limits += 1
            print(json.dumps(record), flush=True)
    print(f"{count} cases, {failures} failing, {limits} at float32's limit, {time.time() - start:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
