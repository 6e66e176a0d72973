"""CUDA fused recurrent cells (csrc/rnn/rnn.cuh): configuration, search space, launcher (the
autograd Function is rnnops._fused_rnn's), registration as backend "cuda".

A block owns 16 batch rows and ``units`` units of one head, with that slice of the recurrent
weights in shared memory; heads wider than ``units`` split over several blocks that meet at a
grid barrier every step (a cooperative launch: every block must be resident at once).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rnnops.autotune.cache import tuned
from rnnops.autotune.hardware import block_shared_memory
from rnnops.autotune.kernels import rnn_shape
from rnnops.autotune.space import Constraint, Space

from .._backward_only import needs_backward
from .._dispatch import register
from .._fused_rnn import CELL_IDS, FusedRNNFunction, pre_buffer
from ..reference.rnn import CELLS
from ..triton_backend._common import dtype_reason, join_reasons
from .engines import device_reason, engine, maybe

ROWS = 16  # batch rows per block
GRADIENT_CHUNK = 256  # float32 slots per row of the backward's staging buffer (csrc/rnn/rnn.cuh's KC: 256 float32 or 512 half-type gradients)
UNITS = (16, 32, 64)  # the instantiated slice widths


@dataclass(frozen=True)
class RNNConfig:
    units: int = 64  # units of a head per block
    threads: int = 128


DEFAULT_CONFIG = RNNConfig()


def k_parts(outputs: int, threads: int, element_bytes: int) -> int:
    """Warps that share each 16 x 16 output tile's K steps in the kernels' tensor-core products
    (csrc/rnn/rnn.cuh's warp_share), each leaving a partial [16][outputs] fp32 tile; float32
    products (CUDA cores) keep one."""
    if element_bytes == 4:
        return 1
    return max(1, threads // 32 // (outputs // 16))


def shared_bytes(D: int, gates: int, units: int, element_bytes: int, threads: int) -> tuple[int, int]:
    """Dynamic shared memory of the forward and backward kernels."""
    forward = (gates * units * D * element_bytes + ROWS * D * element_bytes
               + ROWS * gates * units * 4 * k_parts(gates * units, threads, element_bytes))
    backward = (gates * D * units * element_bytes + ROWS * GRADIENT_CHUNK * 4
                + ROWS * units * 4 * k_parts(units, threads, element_bytes))
    return forward, backward


def slice_units(requested: int, D: int, gates: int, element_bytes: int, threads: int, device: torch.device) -> int:
    """The units per block for a head of D units: the widest instantiated slice no wider than the
    configuration's (and than D rounded up to 16) whose weights and buffers fit the device's
    shared memory. A configuration tuned or shipped for another head dim of the same shape bucket
    may ask for more than fits (sLSTM at D = 768 with 64 units: 424 KB); it gets a narrower slice."""
    limit = block_shared_memory(device)
    candidates = [u for u in UNITS if u <= max(requested, 16) and u <= -(-D // 16) * 16] or [UNITS[0]]
    fitting = [u for u in candidates if limit is None or max(shared_bytes(D, gates, u, element_bytes, threads)) <= limit]
    if not fitting:
        need = max(shared_bytes(D, gates, UNITS[0], element_bytes, threads))
        raise ValueError(f"rnn (cuda): a head of D={D} needs {need} bytes of shared memory per block even with "
                         f"{UNITS[0]} units; this GPU has {limit} (use backend='triton')")
    return max(fitting)


def space(D: int, gates: int, element_bytes: int, hardware) -> Space:
    return Space(
        {"units": list(UNITS), "threads": [64, 128, 256]},
        (
            Constraint("units <= D rounded up to 16", ("units",), lambda u: u <= -(-D // 16) * 16),
            Constraint("the weight slice and buffers fit in a block's shared memory", ("units", "threads"),
                       lambda u, t: max(shared_bytes(D, gates, u, element_bytes, t)) <= hardware.shared_memory_per_block),
        ),
    )


def supports(*, dtype, device, head_dim=None, cell=None, **_) -> str | None:
    reasons = [dtype_reason(dtype), device_reason(device)]
    if head_dim is not None and head_dim % 16:
        reasons.append(f"the head dim D must be a multiple of 16, got {head_dim}")
    elif head_dim is not None and cell in CELLS and not any(reasons):
        try:
            slice_units(UNITS[0], head_dim, CELLS[cell].gates, dtype.itemsize, 64, torch.device(device))
        except ValueError as error:
            reasons.append(str(error).removeprefix("rnn (cuda): "))
    return join_reasons(*reasons)


class _Launcher:
    """``saves`` False (no backward will run: rnnops._backward_only.needs_backward): the forward writes
    no pre-activations (the states it still writes every step: the kernel reads c_{t-1} back)."""

    def __init__(self, cell: str, config: RNNConfig, batch: int, time: int, heads: int, dim: int, element_bytes: int,
                 device, saves: bool = True):
        units = slice_units(config.units, dim, CELLS[cell].gates, element_bytes, config.threads, device)
        splits = -(-dim // units)
        forward_bytes, backward_bytes = shared_bytes(dim, CELLS[cell].gates, units, element_bytes, config.threads)
        self.cell, self.cell_name, self.units, self.device = CELL_IDS[cell], cell, units, device
        self.grid = [heads, -(-batch // ROWS), splits, config.threads]
        self.shared = (forward_bytes, backward_bytes)
        self.shape = [batch, time, heads, dim, splits]
        self.saves = saves

    def forward(self, x, R, b, initial, states, h_seq):
        """Runs the forward; returns the pre-activations it saves for the backward (None without
        ``saves``)."""
        pre = pre_buffer(self.cell_name, *self.shape[:4], x.device) if self.saves else None
        engine(self.device).rnn_forward(x, R, maybe(b), maybe(initial), states, maybe(pre), h_seq,
                                        self.shape + [int(b is not None), int(initial is not None), int(self.saves)],
                                        self.cell, self.units, self.grid + [self.shared[0]])
        return pre

    def backward(self, R, initial, states, pre, d_h_seq, carry, dx, drec_n, x, b, h_seq):
        """(``x``, ``b``, ``h_seq``: for a backward that recomputes the pre-activations; this one reads
        the saved ones.)"""
        engine(self.device).rnn_backward(R, maybe(initial), states, pre, d_h_seq, carry, dx, maybe(drec_n),
                                         self.shape + [0, int(initial is not None), 0], self.cell, self.units,
                                         self.grid + [self.shared[1]])


@register("rnn", "cuda", supports=supports)
def rnn(x_gates, R, b, state, *, cell, config: RNNConfig | None = None):
    batch, time, _, heads, dim = x_gates.shape
    if config is None:
        config = tuned("rnn", "cuda", rnn_shape(x_gates, cell), x_gates.dtype, x_gates.device, DEFAULT_CONFIG)
    launcher = _Launcher(cell, config, batch, time, heads, dim, x_gates.element_size(), x_gates.device,
                         needs_backward(x_gates, R, b, *(state or ())))
    h_seq, *final = FusedRNNFunction.apply(launcher, x_gates, R, b, cell, *(state or ()))
    return h_seq, tuple(final)
