"""Peer adapters: the same standard case run by torch.nn, FlashRNN, flash-linear-attention and
mamba_ssm, each in its own layout.

An adapter converts our inputs to the peer's layout once, outside the timed region
(``prepare``), runs the peer (the callable ``load`` returns; importing the peer may fail, and
the peer is then skipped with the reason), and maps the peer's output back to ours for the
correctness check (``to_ours``). On a CPU, peers whose fast path needs a GPU run their own
pure-PyTorch reference instead, so that the conversions are tested anywhere.

Semantics that differ and are therefore not compared: FlashRNN's sLSTM (it floors the
normaliser at 1 and special-cases the first step) and fused gate activations; the adapters
use the peers' plain forms only (and no GVA head grouping).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..reference.rnn import CELLS
from .cases import Case


class PeerUnavailable(Exception):
    """The peer cannot run here (not installed, or needs a device we do not have)."""


@dataclass(frozen=True)
class Peer:
    name: str
    applies: Callable[[Case], bool]
    load: Callable[[torch.device, torch.dtype], Callable[[dict], torch.Tensor]]
    prepare: Callable[[Case, dict], dict]
    to_ours: Callable[[Case, torch.Tensor], torch.Tensor] = lambda case, out: out
    # whether what runs on this device is the peer's pure-PyTorch reference, not its fast path
    is_reference: Callable[[torch.device], bool] = lambda device: False
    # whether its kernels compile one by one into a disk cache (Triton JIT), so a warm-up stopped
    # at its time limit leaves most of them compiled, rather than in one build that a stop throws
    # away (a torch.utils.cpp_extension build: FlashRNN's CUDA backends)
    compiles_incrementally: bool = False


def _import(module: str, attr: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as error:  # ImportError, or a peer failing at import on this machine
        raise PeerUnavailable(f"{module}.{attr} not importable ({type(error).__name__}: {error})") from None


def _views(*names):
    """prepare() that passes the named inputs through unchanged (our layout is the peer's)."""
    return lambda case, x: {name: x[name] for name in names if name in x}


# ---------------------------------------------------------------- torch.nn (cuDNN / oneDNN)

def _torch_module(cell: str):
    def prepare(case: Case, x: dict) -> dict:
        H, D = case.shape["H"], case.shape["D"]
        hidden = H * D
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
        module = cls(hidden, hidden, batch_first=True, device=x["x"].device, dtype=x["x"].dtype)
        block_diagonal = torch.cat([torch.block_diag(*x["R"][g]) for g in range(CELLS[cell].gates)])
        with torch.no_grad():
            module.weight_ih_l0.copy_(x["W_ih"])
            module.bias_ih_l0.copy_(x["b_ih"])
            module.weight_hh_l0.copy_(block_diagonal)  # heads as a block-diagonal dense matrix
            module.bias_hh_l0.copy_(x["b"].reshape(-1))
        return {"module": module, "x": x["x"]}

    return Peer(f"torch.nn.{cell.upper()}", lambda case: case.op == "rnn" and case.shape["cell"] == cell,
                lambda device, dtype: (lambda p: p["module"](p["x"])[0]), prepare)


# ---------------------------------------------------------------- FlashRNN

_FLASHRNN_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# FlashRNN's cuda_fused compiles, runs and bisects its tiles per shape on the device (a torch
# extension build each, tens of seconds): it is timed on the shapes issue 6 compares it on, the
# LSTM's 768 units as 1, 4 and 12 heads (heads, head dim), not on every cell and head split
FUSED_SHAPES = ((1, 768), (4, 192), (12, 64))


def _flashrnn(backend: str):
    def load(device, dtype):
        if (device.type == "cuda") != (backend != "vanilla"):
            raise PeerUnavailable(f"flashrnn backend {backend!r} does not run on {device.type}")
        if dtype not in _FLASHRNN_DTYPES:
            raise PeerUnavailable(f"flashrnn has no {dtype}")
        flashrnn = _import("flashrnn", "flashrnn")

        def run(p):
            x_gates = F.linear(p["x"], p["W_ih"], p["b_ih"]).view(p["shape"])
            h = flashrnn(x_gates, p["R"], p["b"], function=p["cell"], backend=backend, dtype=_FLASHRNN_DTYPES[dtype])[0]
            return h[0]  # states (S, B, T, H, D): h first

        return run

    def prepare(case: Case, x: dict) -> dict:
        cell, B, T, H, D = (case.shape[k] for k in ("cell", "B", "T", "H", "D"))
        R, b = x["R"], x["b"]
        if cell == "gru":  # FlashRNN: recurrent gates (n, r, z); biases (n recurrent, r, z, n input)
            R = R[[2, 0, 1]]
            b = torch.stack([b[2], b[0], b[1], torch.zeros_like(b[2])])
        return {"x": x["x"], "W_ih": x["W_ih"], "b_ih": x["b_ih"], "R": R.contiguous(), "b": b.contiguous(),
                "cell": cell, "shape": (B, T, CELLS[cell].gates, H, D)}

    def applies(case: Case) -> bool:
        if case.op != "rnn" or case.shape["cell"] not in ("lstm", "gru"):
            return False
        if backend == "cuda_fused":  # (FUSED_SHAPES)
            return case.shape["cell"] == "lstm" and (case.shape["H"], case.shape["D"]) in FUSED_SHAPES
        return True

    return Peer(f"flashrnn.{backend}", applies, load, prepare, lambda case, h: h.reshape(h.shape[0], h.shape[1], -1),
                is_reference=lambda device: backend == "vanilla", compiles_incrementally=backend.startswith("triton"))


# ---------------------------------------------------------------- flash-linear-attention

def _fla(name: str, applies, chunk_call, naive_call, prepare):
    """chunk_call / naive_call: (function, prepared inputs) -> output in (B, T, H, V)."""
    module, function = name.rsplit(".", 1)

    def load(device, dtype):
        if device.type == "cuda":
            fn = _import(f"fla.ops.{module}", function)
            return lambda p: chunk_call(fn, p)
        naive_module, naive_function = naive_call[0].rsplit(".", 1)
        fn = _import(f"fla.ops.{naive_module}", naive_function)
        return lambda p: naive_call[1](fn, p)

    return Peer(f"fla.{function}", applies, load, prepare, is_reference=lambda device: device.type != "cuda",
                compiles_incrementally=True)


def _zero_gate(case: Case, x: dict) -> dict:
    """Simple GLA's inputs; ungated linear attention gets a zero log-gate for the naive recurrence
    (which needs one) but none for the chunked kernel (``chunk_g``: fla's ungated path, which does
    no gate work and which fla still runs backward on Hopper with Triton < 3.7.1, where it
    refuses its gated backward)."""
    B, T, H = (case.shape[k] for k in "BTH")
    g = x["g"] if "g" in x else x["q"].new_zeros(B, T, H)
    return {"q": x["q"], "k": x["k"], "v": x["v"], "g": g, "chunk_g": x.get("g")}


def _interleaved(case: Case, x: dict) -> dict:
    """DeltaProduct: fla takes the n_h steps interleaved along time, (B, T * n_h, H, ...): a view."""
    return {"q": x["q"], "k": x["k"].flatten(1, 2), "v": x["v"].flatten(1, 2), "beta": x["beta"].flatten(1, 2),
            "g": x["g"], "num_householder": case.shape["num_householder"]}


def _head_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


FLA_PEERS = [
    _fla("simple_gla.chunk_simple_gla",
         lambda case: case.op == "linear_attn" and case.shape["gate"] in ("none", "scalar"),
         lambda fn, p: fn(p["q"], p["k"], p["v"], p["chunk_g"])[0],
         ("simple_gla.naive.naive_recurrent_simple_gla", lambda fn, p: fn(p["q"], p["k"], p["v"], p["g"])[0]),
         _zero_gate),
    _fla("gla.chunk_gla",
         lambda case: case.op == "linear_attn" and case.shape["gate"] == "per-key",
         lambda fn, p: fn(p["q"], p["k"], p["v"], p["g"])[0],
         ("gla.naive.naive_recurrent_gla", lambda fn, p: fn(p["q"], p["k"], p["v"], p["g"])[0]),
         _views("q", "k", "v", "g")),
    _fla("delta_rule.chunk_delta_rule",
         lambda case: case.op == "delta_rule" and not case.shape["gated"],
         lambda fn, p: fn(p["q"], p["k"], p["v"], p["beta"])[0],
         ("delta_rule.naive.delta_rule_recurrence",
          lambda fn, p: _head_first(fn(*(_head_first(p[n]) for n in ("q", "k", "v", "beta")))[0])),
         _views("q", "k", "v", "beta")),
    _fla("gated_delta_rule.chunk_gated_delta_rule",
         lambda case: case.op == "delta_rule" and case.shape["gated"],
         lambda fn, p: fn(p["q"], p["k"], p["v"], p["g"], p["beta"])[0],
         ("gated_delta_rule.naive.naive_recurrent_gated_delta_rule",
          lambda fn, p: fn(p["q"], p["k"], p["v"], p["beta"], p["g"])[0]),
         _views("q", "k", "v", "beta", "g")),
    _fla("gated_delta_product.chunk_gated_delta_product",
         lambda case: case.op == "delta_product" and case.shape["gated"],
         lambda fn, p: fn(p["q"], p["k"], p["v"], p["g"], p["beta"], num_householder=p["num_householder"])[0],
         ("gated_delta_product.naive.naive_recurrent_gated_delta_product",
          lambda fn, p: fn(p["q"], p["k"], p["v"], p["g"], p["beta"], scale=p["q"].shape[-1] ** -0.5,
                           num_householder=p["num_householder"])[0]),
         _interleaved),
]


# ---------------------------------------------------------------- mamba_ssm

def _mamba(function: str):
    def load(device, dtype):
        if function == "selective_scan_fn" and device.type != "cuda":
            raise PeerUnavailable("mamba_ssm.selective_scan_fn needs a CUDA device")
        if function == "selective_scan_ref" and device.type == "cuda":
            raise PeerUnavailable("mamba_ssm's Python-loop reference is not timed on GPUs")
        fn = _import("mamba_ssm.ops.selective_scan_interface", function)
        return lambda p: fn(p["u"], p["delta"], p["A"], p["B"], p["C"], p["D"], p["z"], p["delta_bias"],
                            delta_softplus=True)

    def prepare(case: Case, x: dict) -> dict:
        """mamba_ssm's layouts: (B, D, L) activations, (B, N, L) or (B, G, N, L) for B and C."""
        def channels_first(t):
            return t.movedim(1, -1).contiguous() if t.dim() > 2 else t

        return {k: channels_first(v) if k in ("u", "delta", "z", "B", "C") else v for k, v in x.items()}

    return Peer(f"mamba_ssm.{function}", lambda case: case.op == "selective_scan", load, prepare,
                lambda case, y: y.transpose(1, 2), is_reference=lambda device: function == "selective_scan_ref")


def _load_mamba_ssd(device, dtype):
    """Mamba-2's SSD: mamba_ssm's layouts are ours (x [B, L, H, P], B and C [B, L, G, N])."""
    if device.type != "cuda":
        raise PeerUnavailable("mamba_ssm's SSD (Triton) needs a CUDA device")
    fn = _import("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
    return lambda p: fn(p["x"], p["dt"], p["A"], p["B"], p["C"], 256, D=p["D"], dt_bias=p["dt_bias"], dt_softplus=True)


PEERS: list[Peer] = [
    _torch_module("lstm"),
    _torch_module("gru"),
    *(_flashrnn(backend) for backend in ("cuda_fused", "cuda", "triton_fused", "vanilla")),
    *FLA_PEERS,
    _mamba("selective_scan_fn"),
    _mamba("selective_scan_ref"),
    Peer("mamba_ssm.mamba_chunk_scan_combined", lambda case: case.shape.get("gate") == "ssd", _load_mamba_ssd,
         _views("x", "dt", "A", "B", "C", "D", "dt_bias"), compiles_incrementally=True),
]

ALWAYS = ("torch.nn.LSTM", "torch.nn.GRU")  # part of torch: timed even without --peers


def peers_for(case: Case, include_optional: bool) -> list[Peer]:
    return [p for p in PEERS if p.applies(case) and (include_optional or p.name in ALWAYS)]
