"""``rnnops.nn.LSTM`` and ``rnnops.nn.GRU``: drop-ins for ``torch.nn.LSTM`` / ``torch.nn.GRU``.

Same constructor arguments, parameter names, shapes and state_dict as torch (a state_dict
saved from the torch module loads as is), ``batch_first``, ``num_layers``, ``bidirectional``,
``dropout``, unbatched inputs, plus:

- ``num_heads`` (default 1): the hidden state splits into heads of size hidden_size //
  num_heads with block-diagonal recurrent weights (FlashRNN-style). ``weight_hh_l{k}`` then
  has shape (G * hidden_size, hidden_size // num_heads) and
  ``weight_hh.view(G, num_heads, head_size, head_size)`` is the op's R.
- ``backend`` (default "auto"), passed to :func:`rnnops.rnn`.

Not supported (a clear error): ``proj_size > 0`` (the fused cell has no output projection)
and ``PackedSequence`` inputs (pad the batch, or use the linear families' cu_seqlens).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.rnn import rnn


class _FusedRNNBase(nn.Module):
    cell: str = ""
    gates: int = 0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, num_heads: int = 1, backend: str = "auto"):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size),
                           ("num_layers", num_layers), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if hidden_size % num_heads:
            raise ValueError(f"{name}: num_heads={num_heads} must divide hidden_size={hidden_size}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1) or isinstance(dropout, bool):
            raise ValueError(f"{name}: dropout must be a number in [0, 1], got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.num_heads, self.backend = bidirectional, num_heads, backend
        directions = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        head_size = hidden_size // num_heads
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for suffix in ("", "_reverse")[:directions]:
                shapes = {
                    "weight_ih": (self.gates * hidden_size, layer_input),
                    "weight_hh": (self.gates * hidden_size, head_size),
                }
                if bias:
                    shapes.update(bias_ih=(self.gates * hidden_size,), bias_hh=(self.gates * hidden_size,))
                for kind, shape in shapes.items():
                    self.register_parameter(f"{kind}_l{layer}{suffix}", nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as torch.nn.LSTM/GRU."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for attr, default in (("num_layers", 1), ("bias", True), ("batch_first", False),
                              ("dropout", 0.0), ("bidirectional", False), ("num_heads", 1)):
            if getattr(self, attr) != default:
                s += f", {attr}={getattr(self, attr)}"
        return s

    def _run(self, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None):
        """x (B, T, input) batch-first; state tuple of (L * dirs, B, hidden) or None."""
        batch, time = x.shape[:2]
        heads, head_size = self.num_heads, self.hidden_size // self.num_heads
        finals: list[list[torch.Tensor]] = []
        layer_in = x
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(("", "_reverse")[: self.num_directions]):
                p = {kind: getattr(self, f"{kind}_l{layer}{suffix}", None)
                     for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
                seq = layer_in.flip(1) if direction else layer_in
                x_gates = F.linear(seq, p["weight_ih"], p["bias_ih"]).view(batch, time, self.gates, heads, head_size)
                index = layer * self.num_directions + direction
                init = None if state is None else tuple(s[index].reshape(batch, heads, head_size) for s in state)
                h_seq, final = rnn(
                    x_gates,
                    p["weight_hh"].view(self.gates, heads, head_size, head_size),
                    None if p["bias_hh"] is None else p["bias_hh"].view(self.gates, heads, head_size),
                    init,
                    cell=self.cell,
                    backend=self.backend,
                )
                h_seq = h_seq.reshape(batch, time, self.hidden_size)
                outputs.append(h_seq.flip(1) if direction else h_seq)
                finals.append([s.reshape(batch, self.hidden_size).to(x.dtype) for s in final])
            layer_in = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        return layer_in, tuple(torch.stack(parts) for parts in zip(*finals))

    def _forward(self, input: torch.Tensor, hx: tuple[torch.Tensor, ...] | None):
        name = type(self).__name__
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError(f"{name}: PackedSequence inputs are not supported; pass a padded tensor")
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: input must be 2-D (unbatched) or 3-D, got shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input has {input.shape[-1]} features, expected input_size={self.input_size}")
        unbatched = input.dim() == 2
        x = input.unsqueeze(0) if unbatched else (input if self.batch_first else input.transpose(0, 1))
        if hx is not None:
            expected = (self.num_layers * self.num_directions,) + (() if unbatched else (x.shape[0],)) + (self.hidden_size,)
            for i, s in enumerate(hx):
                if not isinstance(s, torch.Tensor) or tuple(s.shape) != expected:
                    got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                    raise ValueError(f"{name}: hx[{i}] must have shape {expected}, got {got}")
            hx = tuple(s.unsqueeze(1) for s in hx) if unbatched else tuple(hx)
        out, final = self._run(x, hx)
        if unbatched:
            return out[0], tuple(s[:, 0] for s in final)
        return (out if self.batch_first else out.transpose(0, 1)), final


class LSTM(_FusedRNNBase):
    """Drop-in for :class:`torch.nn.LSTM` (gates i, f, g, o) with ``num_heads`` and ``backend``.

    forward(input, hx=None) -> output, (h_n, c_n), shapes as torch.nn.LSTM.
    """

    cell, gates = "lstm", 4

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, num_heads: int = 1, backend: str = "auto"):
        if proj_size != 0:
            raise ValueError(f"LSTM: proj_size={proj_size} is not supported (the fused cell has no output "
                             "projection); use proj_size=0 or torch.nn.LSTM")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype, num_heads=num_heads, backend=backend)
        self.proj_size = 0

    def forward(self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ValueError("LSTM: hx must be None or a tuple (h_0, c_0)")
        out, (h, c) = self._forward(input, hx)
        return out, (h, c)


class GRU(_FusedRNNBase):
    """Drop-in for :class:`torch.nn.GRU` (gates r, z, n) with ``num_heads`` and ``backend``.

    forward(input, hx=None) -> output, h_n, shapes as torch.nn.GRU.
    """

    cell, gates = "gru", 3

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None):
        out, (h,) = self._forward(input, None if hx is None else (hx,))
        return out, h
