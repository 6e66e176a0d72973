"""Standard benchmark cases: per op family, the inputs and every way to run them.

A :class:`Case` builds its inputs once (``make``) and runs them through a *target*: one of the
op's backends, or a peer implementation (e.g. ``torch.nn.LSTM``). Its ``baseline`` target is
what speedups are quoted against and what the other targets' outputs are checked against.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rnnops


@dataclass
class Case:
    op: str
    name: str
    shape: dict[str, int]
    make: Callable[[torch.device, torch.dtype], dict]
    run: Callable[[dict, str], object]
    targets: tuple[str, ...]
    baseline: str = "reference"
    quick: bool = True


def _randn(shape, device, dtype, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


def _qkv(B, T, H, K, V, device, dtype):
    return {
        "q": _randn((B, T, H, K), device, dtype),
        "k": F.normalize(torch.randn(B, T, H, K, device=device), dim=-1).to(dtype),
        "v": _randn((B, T, H, V), device, dtype),
    }


def _linear_attn_case(gate: str, B, T, H, K, V, quick=True) -> Case:
    def make(device, dtype):
        inputs = _qkv(B, T, H, K, V, device, dtype)
        if gate == "scalar":
            inputs["g"] = F.logsigmoid(torch.randn(B, T, H, device=device) + 4).to(dtype)
        elif gate == "per-key":
            inputs["g"] = (F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16).to(dtype)
        return inputs

    def run(x, backend):
        return rnnops.linear_attn(x["q"], x["k"], x["v"], x.get("g"), backend=backend)[0]

    label = {"none": "plain", "scalar": "scalar decay", "per-key": "GLA"}[gate]
    return Case("linear_attn", f"{label} B{B} T{T} H{H} K{K} V{V}", dict(B=B, T=T, H=H, K=K, V=V), make, run,
                rnnops.available_backends("linear_attn"), quick=quick)


def _delta_case(num_householder: int, gated: bool, B, T, H, K, V, quick=True) -> Case:
    op = "delta_rule" if num_householder == 1 else "delta_product"

    def make(device, dtype):
        inputs = _qkv(B, T, H, K, V, device, dtype)
        extra = () if num_householder == 1 else (num_householder,)
        inputs["k"] = F.normalize(torch.randn((B, T) + extra + (H, K), device=device), dim=-1).to(dtype)
        inputs["v"] = _randn((B, T) + extra + (H, V), device, dtype)
        inputs["beta"] = torch.rand((B, T) + extra + (H,), device=device).to(dtype)
        if gated:
            inputs["g"] = F.logsigmoid(torch.randn(B, T, H, device=device) + 4).to(dtype)
        return inputs

    def run(x, backend):
        args = (x["q"], x["k"], x["v"], x["beta"], x.get("g"))
        if num_householder == 1:
            return rnnops.delta_rule(*args, backend=backend)[0]
        return rnnops.delta_product(*args, num_householder=num_householder, backend=backend)[0]

    label = ("gated " if gated else "") + ("delta rule" if num_householder == 1 else f"DeltaProduct n_h={num_householder}")
    return Case(op, f"{label} B{B} T{T} H{H} K{K} V{V}", dict(B=B, T=T, H=H, K=K, V=V, n_h=num_householder),
                make, run, rnnops.available_backends(op), quick=quick)


def _selective_scan_case(B, T, Dm, N, quick=True) -> Case:
    def make(device, dtype):
        return {
            "u": _randn((B, T, Dm), device, dtype),
            "delta": _randn((B, T, Dm), device, dtype, 0.5),
            "A": -torch.rand(Dm, N, device=device) * 4 - 0.5,
            "B": _randn((B, T, N), device, dtype),
            "C": _randn((B, T, N), device, dtype),
            "D": torch.randn(Dm, device=device),
            "z": _randn((B, T, Dm), device, dtype),
            "delta_bias": torch.randn(Dm, device=device) * 0.1 - 2,
        }

    def run(x, backend):
        return rnnops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                     delta_softplus=True, backend=backend)

    return Case("selective_scan", f"Mamba-1 B{B} T{T} D{Dm} N{N}", dict(B=B, T=T, Dm=Dm, N=N), make, run,
                rnnops.available_backends("selective_scan"), quick=quick)


def _rnn_module_case(cell: str, B, T, hidden, quick=True) -> Case:
    """rnnops.nn.LSTM/GRU per backend against torch.nn.LSTM/GRU (cuDNN / oneDNN)."""
    torch_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    ours_cls = {"lstm": rnnops.nn.LSTM, "gru": rnnops.nn.GRU}[cell]
    peer = f"torch.nn.{torch_cls.__name__}"

    def make(device, dtype):
        reference = torch_cls(hidden, hidden, batch_first=True, device=device, dtype=dtype)
        modules = {peer: reference}
        for backend in rnnops.available_backends("rnn"):
            ours = ours_cls(hidden, hidden, batch_first=True, device=device, dtype=dtype, backend=backend)
            ours.load_state_dict(reference.state_dict())
            modules[backend] = ours
        return {"x": _randn((B, T, hidden), device, dtype), "modules": modules}

    def run(x, target):
        return x["modules"][target](x["x"])[0]

    return Case("rnn", f"nn.{torch_cls.__name__} B{B} T{T} hidden{hidden}", dict(B=B, T=T, D=hidden, H=1), make, run,
                (peer,) + rnnops.available_backends("rnn"), baseline=peer, quick=quick)


def standard_cases() -> list[Case]:
    """Every case; ``quick`` ones form ``bench --quick`` (about a minute on two CPU cores)."""
    cases = []
    for T, quick in ((4096, True), (1024, False), (16384, False)):
        for gate in ("none", "scalar", "per-key"):
            cases.append(_linear_attn_case(gate, 1, T, 4, 64, 64, quick))
        for gated in (False, True):
            cases.append(_delta_case(1, gated, 1, T, 4, 64, 64, quick))
    cases.append(_delta_case(2, True, 1, 2048, 4, 64, 64))
    cases.append(_selective_scan_case(1, 2048, 1024, 16))
    cases.append(_rnn_module_case("lstm", 8, 256, 256))
    cases.append(_rnn_module_case("gru", 8, 256, 256))
    return cases
