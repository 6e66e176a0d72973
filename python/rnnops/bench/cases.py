"""Standard benchmark cases: per op family, the inputs, how to run them, and their work.

A :class:`Case` builds its inputs once (``make``; our op's argument names and shapes) and runs
them through one of our backends (``run``); peers (``rnnops.bench.peers``) convert the same
inputs to their own layouts. Case lists differ by device: the CPU cases are sized for the
Python-loop reference, the GPU cases are the shapes the kernel issues and the peers' own
benchmarks name (flash-linear-attention: B8 H16 K=V=128, and its GVA, 32 value heads on 16 q / k
heads; mamba_ssm: B8 D2048 N16, also in its own (B, D, L) memory layout, and for Mamba-2's SSD a
2.7B model's layer, 80 heads of 64 with N128; FlashRNN: B16 T1024 with (head dim, heads) from
(16, 48) to (768, 1)). ``quick`` cases form ``bench --quick``; ``sweep`` marks the cases of the T
and B sweeps plotted in the report.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rnnops

from ..compat.mamba_ssm import mamba_chunk_scan_combined
from ..reference.rnn import CELLS
from . import roofline
from .roofline import Work


@dataclass
class Case:
    op: str
    name: str
    shape: dict[str, object]  # sizes, plus variant tags: gate, gated, num_householder, cell
    make: Callable[[torch.device, torch.dtype], dict]
    run: Callable[[dict, str], torch.Tensor]  # (inputs, backend) -> the op's main output
    work: Callable[[torch.dtype], Work]
    quick: bool = False
    sweep: str | None = None  # "T" or "B"
    time_reference: bool = True  # False where the Python-loop reference would take minutes
    op_shape: dict | None = None  # the shape of the op call it makes, where it differs from ``shape`` (the autotuner's)


def _randn(shape, device, dtype, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _unit(shape, device, dtype):
    return F.normalize(torch.randn(shape, device=device), dim=-1).to(dtype)


def _grouped(H, qk_heads) -> tuple[int, str, dict]:
    """(q and k's heads, a name suffix, shape entries) for ``qk_heads`` of v's ``H`` (None: as many)."""
    Hk = H if qk_heads is None else qk_heads
    return (Hk, "", {}) if Hk == H else (Hk, f" Hk{Hk}", {"Hk": Hk})


def linear_attn_case(gate: str, B, T, H, K, V, qk_heads=None, **flags) -> Case:
    """``qk_heads``: q and k's heads where grouped (a divisor of H)."""
    Hk, suffix, grouped = _grouped(H, qk_heads)

    def make(device, dtype):
        x = {"q": _randn((B, T, Hk, K), device, dtype), "k": _unit((B, T, Hk, K), device, dtype),
             "v": _randn((B, T, H, V), device, dtype)}
        if gate == "scalar":
            x["g"] = F.logsigmoid(torch.randn(B, T, H, device=device) + 4).to(dtype)
        elif gate == "per-key":
            x["g"] = (F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16).to(dtype)
        return x

    def run(x, backend):
        return rnnops.linear_attn(x["q"], x["k"], x["v"], x.get("g"), backend=backend)[0]

    label = {"none": "linear attention", "scalar": "scalar decay", "per-key": "GLA"}[gate]
    return Case("linear_attn", f"{label} B{B} T{T} H{H}{suffix} K{K} V{V}",
                dict(B=B, T=T, H=H, K=K, V=V, gate=gate, **grouped), make, run,
                lambda dtype: roofline.linear_attn(B, T, H, K, V, gate, dtype, qk_heads=Hk), **flags)


def delta_case(num_householder: int, gated: bool, B, T, H, K, V, qk_heads=None, **flags) -> Case:
    """``qk_heads``: q and k's heads where grouped (a divisor of H: fla's GVA)."""
    op = "delta_rule" if num_householder == 1 else "delta_product"
    steps = () if num_householder == 1 else (num_householder,)
    Hk, suffix, grouped = _grouped(H, qk_heads)

    def make(device, dtype):
        x = {"q": _randn((B, T, Hk, K), device, dtype), "k": _unit((B, T) + steps + (Hk, K), device, dtype),
             "v": _randn((B, T) + steps + (H, V), device, dtype),
             "beta": torch.rand((B, T) + steps + (H,), device=device).to(dtype)}
        if gated:
            x["g"] = F.logsigmoid(torch.randn(B, T, H, device=device) + 4).to(dtype)
        return x

    def run(x, backend):
        args = (x["q"], x["k"], x["v"], x["beta"], x.get("g"))
        if num_householder == 1:
            return rnnops.delta_rule(*args, backend=backend)[0]
        return rnnops.delta_product(*args, num_householder=num_householder, backend=backend)[0]

    label = ("gated " if gated else "") + ("delta rule" if num_householder == 1 else f"DeltaProduct n_h={num_householder}")
    return Case(op, f"{label} B{B} T{T} H{H}{suffix} K{K} V{V}",
                dict(B=B, T=T, H=H, K=K, V=V, gated=gated, num_householder=num_householder, **grouped), make, run,
                lambda dtype: roofline.delta_rule(B, T, H, K, V, gated, dtype, num_householder=num_householder,
                                                  qk_heads=Hk),
                **flags)


def ssd_case(B, T, H, P, N, G, **flags) -> Case:
    """Mamba-2's SSD through ``rnnops.compat.mamba_ssm.mamba_chunk_scan_combined`` (linear
    attention with a scalar decay per head, B and C shared by groups of heads), as Mamba-2's
    module calls it: D, dt_bias, softplus; no z (its gated RMSNorm takes z)."""
    def make(device, dtype):
        step = torch.rand(H, device=device) * 0.099 + 0.001  # Mamba-2's dt initialisation range
        return {"x": _randn((B, T, H, P), device, dtype), "dt": _randn((B, T, H), device, dtype, 0.5),
                "A": -(torch.rand(H, device=device) * 15 + 1), "B": _randn((B, T, G, N), device, dtype),
                "C": _randn((B, T, G, N), device, dtype), "D": torch.randn(H, device=device),
                "dt_bias": torch.log(torch.expm1(step))}

    def run(x, backend):
        return mamba_chunk_scan_combined(x["x"], x["dt"], x["A"], x["B"], x["C"], 256, D=x["D"], dt_bias=x["dt_bias"],
                                         dt_softplus=True, backend=backend)

    return Case("linear_attn", f"Mamba-2 SSD B{B} T{T} H{H} P{P} N{N} G{G}",
                dict(B=B, T=T, H=H, P=P, N=N, G=G, gate="ssd"), make, run,
                lambda dtype: roofline.ssd(B, T, H, P, N, G, dtype),
                op_shape=dict(B=B, T=T, H=H, K=N, V=P, gate="scalar", Hk=G), **flags)


def selective_scan_case(B, T, Dm, N, steps_contiguous=False, **flags) -> Case:
    """``steps_contiguous``: u, delta, z, B and C in mamba_ssm's memory layout, (B, Dm, T) and (B,
    N, T), as Mamba's module hands them to selective_scan_fn and rnnops.compat.mamba_ssm passes
    them on (transposed views, no copies); else rnnops' own (B, T, Dm) and (B, T, N)."""
    def sequence(shape, device, dtype, scale=1.0):
        x = _randn(shape, device, dtype, scale)
        return x.transpose(1, 2).contiguous().transpose(1, 2) if steps_contiguous else x

    def make(device, dtype):
        return {"u": sequence((B, T, Dm), device, dtype), "delta": sequence((B, T, Dm), device, dtype, 0.5),
                "A": -torch.rand(Dm, N, device=device) * 4 - 0.5, "B": sequence((B, T, N), device, dtype),
                "C": sequence((B, T, N), device, dtype), "D": torch.randn(Dm, device=device),
                "z": sequence((B, T, Dm), device, dtype), "delta_bias": torch.randn(Dm, device=device) * 0.1 - 2}

    def run(x, backend):
        return rnnops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                     delta_softplus=True, backend=backend)

    shape = dict(B=B, T=T, Dm=Dm, N=N)
    if steps_contiguous:  # (the autotuner's shape buckets know no layout: it tunes this one in rnnops')
        flags["op_shape"] = dict(shape)
        shape["layout"] = "B D L"
    return Case("selective_scan", f"Mamba-1 B{B} T{T} D{Dm} N{N}" + (" (B, D, L)" if steps_contiguous else ""), shape,
                make, run, lambda dtype: roofline.selective_scan(B, T, Dm, N, dtype), **flags)


def rnn_case(cell: str, B, T, H, D, **flags) -> Case:
    """The input projection (input size H * D) runs inside every target, as in torch.nn.LSTM."""
    G, hidden = CELLS[cell].gates, H * D

    def make(device, dtype):
        bound = hidden**-0.5
        return {"x": _randn((B, T, hidden), device, dtype),
                "W_ih": (torch.rand(G * hidden, hidden, device=device) * 2 - 1).mul(bound).to(dtype),
                "b_ih": (torch.rand(G * hidden, device=device) * 2 - 1).mul(bound).to(dtype),
                "R": (torch.rand(G, H, D, D, device=device) * 2 - 1).mul(D**-0.5).to(dtype),
                "b": (torch.rand(G, H, D, device=device) * 2 - 1).mul(bound).to(dtype)}

    def run(x, backend):
        x_gates = F.linear(x["x"], x["W_ih"], x["b_ih"]).view(B, T, G, H, D)
        return rnnops.rnn(x_gates, x["R"], x["b"], cell=cell, backend=backend)[0].reshape(B, T, hidden)

    return Case("rnn", f"{cell} B{B} T{T} H{H} D{D}", dict(B=B, T=T, H=H, D=D, cell=cell), make, run,
                lambda dtype: roofline.rnn(B, T, H, D, G, dtype), **flags)


def _linear_family(B, T, H, K, V, **flags) -> list[Case]:
    # GLA (per-key decay) last: on the GPU machine (Triton 3.6) fla's chunk_gla compiles its tens of
    # autotuner configurations for minutes, more than any run gave it (2026-11-26: its precompile
    # worker's limit; 11-28: the bench's process, past its budget, the cases after it lost), so a
    # budget-limited run, whose op families take turns, reaches it after the scalar decay
    # (`BENCH_CASES='^GLA'` gives it a run of its own)
    cases = [linear_attn_case(gate, B, T, H, K, V, **flags) for gate in ("none", "scalar", "per-key")]
    cases += [delta_case(1, gated, B, T, H, K, V, **flags) for gated in (False, True)]
    return cases


def cpu_cases() -> list[Case]:
    cases = _linear_family(1, 4096, 4, 64, 64, quick=True, sweep="T")
    for T in (1024, 16384):
        cases += _linear_family(1, T, 4, 64, 64, sweep="T")
    cases += _linear_family(4, 1024, 4, 64, 64, sweep="B")
    cases.append(delta_case(2, True, 1, 2048, 4, 64, 64, quick=True))
    cases.append(ssd_case(1, 2048, 8, 16, 32, 2, quick=True))
    cases.append(selective_scan_case(1, 2048, 1024, 16, quick=True, sweep="T"))
    cases += [selective_scan_case(1, T, 1024, 16, sweep="T") for T in (512, 8192)]
    cases += [rnn_case(cell, 8, 256, 1, 256, quick=True) for cell in ("lstm", "gru")]
    cases += [rnn_case(cell, 8, 256, 4, 64) for cell in ("lstm", "gru")]
    return cases


FLASHRNN_HEADS = ((16, 48), (32, 24), (64, 12), (128, 6), (256, 3), (768, 1))  # (head dim, heads)


def gpu_cases() -> list[Case]:
    big = dict(time_reference=False)
    cases = []
    for T in (1024, 2048, 4096, 8192, 16384):
        cases += _linear_family(8, T, 16, 128, 128, quick=T == 4096, sweep="T", **big)
    for B in (1, 2, 4, 16):
        cases += _linear_family(B, 4096, 16, 128, 128, sweep="B", **big)
    cases += [delta_case(2, True, 8, T, 16, 128, 128, quick=T == 2048, **big) for T in (2048, 4096)]
    cases.append(ssd_case(8, 2048, 80, 64, 128, 1, quick=True, **big))  # a Mamba-2 2.7B layer
    # Gated DeltaNet with grouped value heads (fla's GVA: 32 value heads, 16 for q and k, as in Qwen3-Next)
    cases.append(delta_case(1, True, 8, 4096, 32, 128, 128, qk_heads=16, **big))
    cases += [selective_scan_case(8, T, 2048, 16, quick=T == 2048, sweep="T", **big) for T in (2048, 8192)]
    cases.append(selective_scan_case(1, 8192, 2048, 16, sweep="B", **big))  # a prompt's prefill: B Dm / 16 programs
    # mamba_ssm's own layout (its benchmark's and Mamba's module's): the drop-in through rnnops.compat
    cases.append(selective_scan_case(8, 2048, 2048, 16, steps_contiguous=True, quick=True, **big))
    for cell in ("lstm", "gru"):
        for D, H in FLASHRNN_HEADS + ((192, 4),):
            cases.append(rnn_case(cell, 16, 1024, H, D, quick=(D, H) in ((64, 12), (768, 1)) and cell == "lstm"))
    return cases


def families_in_turn(cases: list[Case], first: Sequence[str] = ()) -> list[Case]:
    """The order the bench runs ``cases`` in: the op families take turns (each keeps its own
    order), so a run that its time budget stops has timed every family it could reach; the
    families named in ``first`` take their turns first, in its order."""
    queues: dict[str, list[Case]] = {op: [] for op in first}
    for case in cases:
        queues.setdefault(case.op, []).append(case)
    ordered = []
    while len(ordered) < len(cases):
        ordered += [queue.pop(0) for queue in queues.values() if queue]
    return ordered


def standard_cases(device: torch.device) -> list[Case]:
    return gpu_cases() if device.type == "cuda" else cpu_cases()
