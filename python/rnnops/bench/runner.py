"""Run one standard case through every target: check, time, measure memory, place on the roofline.

A target is one of our backends or a peer. Every target's output is first compared with the
case's oracle (the reference, or on GPUs where the reference is not timed, the float32
``chunked`` backend): a mismatch is reported in the row, never hidden. Then forward (under
no_grad) and forward+backward (fixed random cotangent, fresh leaf inputs) are timed, medians
after a warm-up, and their peak memory is measured.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import rnnops

from .cases import Case
from .peers import PeerUnavailable, peers_for
from .timing import host_breakdown, kernel_breakdown, measure, peak_memory

TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


@dataclass
class Target:
    name: str
    kind: str  # "rnnops", "peer", or "peer-reference" (a peer's pure-PyTorch reference)
    prepare: Callable[[dict], dict]  # our inputs -> what call() takes (outside the timed region)
    call: Callable[[dict], torch.Tensor]
    to_ours: Callable[[torch.Tensor], torch.Tensor]
    compiles_incrementally: bool = False  # (peers: see Peer)


def targets_for(case: Case, device: torch.device, dtype: torch.dtype, backends, include_peers: bool):
    """Our backends (all, or those named) and the applicable peers; returns (targets, notes)."""
    targets, notes = [], []
    for backend in rnnops.available_backends(case.op):
        if backends is not None and backend not in backends:
            continue
        if backend == "reference" and device.type == "cuda" and not case.time_reference:
            notes.append("reference: not timed at this size on a GPU (a Python loop over T)")
            continue
        reason = rnnops._dispatch.unsupported(case.op, backend, device=device, dtype=dtype)
        if reason:
            notes.append(f"{backend}: skipped, {reason}")
            continue
        targets.append(Target(backend, "rnnops", lambda x: x,
                              lambda x, backend=backend: case.run(x, backend), lambda out: out))
    for peer in peers_for(case, include_peers):
        try:
            call = peer.load(device, dtype)
        except PeerUnavailable as why:
            notes.append(f"{peer.name}: skipped, {why}")
            continue
        kind = "peer-reference" if peer.is_reference(device) else "peer"
        targets.append(Target(peer.name, kind, lambda x, peer=peer: peer.prepare(case, x), call,
                              lambda out, peer=peer: peer.to_ours(case, out), peer.compiles_incrementally))
    return targets, notes


def fresh_leaves(state: dict) -> tuple[dict, list[torch.Tensor]]:
    """Fresh leaf tensors that require grad, in place of the floating tensors of ``state``."""
    fresh, leaves = {}, []
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().requires_grad_(True)
            leaves.append(value)
        elif isinstance(value, torch.nn.Module):
            leaves += list(value.parameters())
        fresh[key] = value
    return fresh, leaves


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


PROFILE_LIMIT_S = 0.25  # slower targets (Python loops over chunks on a GPU) are not profiled: the
# chunked selective scan's 1.5 s forward+backward on an H200 took 30 s more to profile


def run_case(case: Case, device: torch.device, dtype: torch.dtype, *, backends=None, include_peers=False,
             repeats: int = 3, progress=lambda text: None, hardware=None, profile: bool = False,
             stopped_peer: str | None = None, stopped_at_time_limit: bool = False) -> tuple[list[dict], list[str]]:
    """Rows (one per target) and notes for ``case``; with ``profile``, each row also gets the
    largest kernels (GPU) or operators (CPU) of one profiled forward+backward and, on a GPU, the
    Python functions of a forward call's host time (host_breakdown); where a target's backward
    failed (fla's gated ops on Hopper with Triton < 3.7.1), so that the case compares forwards
    only, every row also gets its forward's (``kernels_fwd``). ``stopped_peer``:
    a peer whose precompile worker stopped while warming it (bench.precompile), left out unless
    the worker was killed at its time limit (``stopped_at_time_limit``) and the peer compiles
    incrementally: then the timed run finishes compiling it (its first, untimed call) and times it."""
    torch.manual_seed(0)
    inputs = case.make(device, dtype)
    targets, notes = targets_for(case, device, dtype, backends, include_peers)
    for target in [t for t in targets if t.name == stopped_peer and t.kind != "rnnops"]:
        if stopped_at_time_limit and target.compiles_incrementally:
            notes.append(f"{target.name}: its precompile worker reached its time limit while warming it; the rest "
                         "of its kernels compiled in the timed process, before timing")
            continue
        targets.remove(target)
        reason = "its time limit" if stopped_at_time_limit else "a crash"
        notes.append(f"{target.name}: skipped, its precompile worker stopped while warming it ({reason})")
    outputs, states = {}, {}
    for target in list(targets):
        try:
            with torch.no_grad():
                states[target.name] = target.prepare(inputs)
                outputs[target.name] = target.call(states[target.name])
        except Exception as error:  # a target rejecting the case is reported, not fatal
            verb = "skipped" if isinstance(error, ValueError) and target.kind == "rnnops" else "failed"
            notes.append(f"{target.name}: {verb} ({type(error).__name__}: {str(error)[:200]})")
            targets.remove(target)
    if not targets:
        return [], notes
    oracle = next((t.name for t in targets if t.name in ("reference", "chunked")), targets[0].name)
    oracle_out = next(t for t in targets if t.name == oracle).to_ours(outputs[oracle])
    rows, forwards = [], []
    for target in targets:
        err = rel_err(target.to_ours(outputs[target.name]), oracle_out)
        row = {"op": case.op, "case": case.name, "shape": case.shape, "sweep": case.sweep, "target": target.name,
               "kind": target.kind, "oracle": oracle, "rel_err": err, "mismatch": not err <= TOLERANCE[dtype]}
        state = states[target.name]

        def forward(target=target, state=state):
            with torch.no_grad():
                return target.call(state)

        progress(f"{case.op}: {case.name} | {target.name} fwd")
        row["fwd"] = measure(forward, device, repeats=repeats, min_seconds=0.3, max_seconds=2.0)
        row["memory_fwd"] = peak_memory(forward, device)
        fresh, leaves = fresh_leaves(target.prepare(inputs))
        cotangent = torch.randn(outputs[target.name].shape, generator=torch.Generator().manual_seed(1)).to(
            device=device, dtype=outputs[target.name].dtype)

        def forward_backward(target=target, fresh=fresh, leaves=leaves, cotangent=cotangent):
            for leaf in leaves:
                leaf.grad = None
            target.call(fresh).backward(cotangent)

        progress(f"{case.op}: {case.name} | {target.name} fwd+bwd")
        try:
            row["fwd_bwd"] = measure(forward_backward, device, repeats=repeats, min_seconds=0.3, max_seconds=2.0)
            row["memory_fwd_bwd"] = peak_memory(forward_backward, device)
        except Exception as error:
            notes.append(f"{target.name}: backward failed ({type(error).__name__}: {str(error)[:200]})")
            row["fwd_bwd"], row["memory_fwd_bwd"] = None, None
        if profile and row["fwd_bwd"] is not None and row["fwd_bwd"].median > PROFILE_LIMIT_S:
            notes.append(f"{target.name}: not profiled (forward+backward {row['fwd_bwd'].median:.2g} s: tens of "
                         f"thousands of launches, whose profile costs more than the timing)")
        elif profile and row["fwd_bwd"] is not None:
            try:
                row["kernels"] = kernel_breakdown(forward_backward, device)
            except Exception as error:  # a profiler that cannot start costs the breakdown, not the timings
                notes.append(f"{target.name}: not profiled ({type(error).__name__}: {str(error)[:200]})")
            if device.type == "cuda":  # where 'fwd host ms' goes (on a CPU the host time is the run)
                row["host"] = host_breakdown(forward, calls=20 if row["fwd"].median < 0.01 else 3)
        row["roofline"] = _roofline(case, dtype, row, hardware)
        rows.append(row)
        forwards.append(forward)
    if profile and any(row["fwd_bwd"] is None for row in rows):
        for row, forward in zip(rows, forwards):
            if row["fwd"].median <= PROFILE_LIMIT_S:
                try:
                    row["kernels_fwd"] = kernel_breakdown(forward, device)
                except Exception as error:
                    notes.append(f"{row['target']}: forward not profiled ({type(error).__name__}: {str(error)[:200]})")
    return rows, notes


def _roofline(case: Case, dtype: torch.dtype, row: dict, hardware) -> dict:
    """Achieved TFLOP/s and GB/s per phase, and the fraction of the roofline floor reached."""
    work = case.work(dtype)
    result = {}
    for phase in ("fwd", "fwd_bwd"):
        if row.get(phase) is None:
            continue
        seconds = row[phase].median
        flops, moved = work.phase(phase)
        entry = {"tflops": flops / seconds / 1e12, "gbps": moved / seconds / 1e9}
        floor = work.floor_seconds(hardware, phase) if hardware is not None else None
        entry["fraction"] = None if floor is None else floor / seconds
        result[phase] = entry
    return result
