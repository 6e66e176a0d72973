"""Triton fused recurrent cells: configuration, search space, launcher (the autograd Function
is rnnops._fused_rnn's). Memory: (S + P) * 4 bytes per token, head and unit are written for the
backward (every state and the gates' pre-activations, fp32)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from rnnops.autotune.cache import tuned
from rnnops.autotune.hardware import block_shared_memory
from rnnops.autotune.kernels import rnn_shape
from rnnops.autotune.space import Constraint, Space, next_power_of_two, powers_of_two

from .._backward_only import needs_backward
from .._dispatch import register
from .._fused_rnn import CELL_IDS, FusedRNNFunction, pre_buffer, pre_slots
from ..reference.rnn import CELLS
from ._common import device_reason, dot_precision, dtype_reason, join_reasons, launch


@dataclass(frozen=True)
class RNNConfig:
    block_b: int = 16  # batch rows per program (>= 16: tl.dot)
    block_d: int = 64  # output units per tile
    block_k: int = 64  # reduction units per tile
    num_warps: int = 8  # the forward kernel's warps
    backward_num_warps: int = 8  # the backward's (4 spill in the fp16 sLSTM backward at D = 256: compile_check)
    # both kernels' time loops: at 2, Triton copies a step's inputs into shared memory a step ahead
    # (cp.async; the forward's loop through its STAGES, the backward's through the launch option)
    num_stages: int = 1
    # 1: resident kernels save no pre-activations, the backward recomputes them (recompute_shared_bytes)
    recompute: int = 0


DEFAULT_CONFIG = RNNConfig()


def space(D: int, gates: int, hardware, element_bytes: int = 2) -> Space:
    return Space(
        {"block_b": powers_of_two(16, 64), "block_d": powers_of_two(16, 128), "block_k": powers_of_two(16, 128),
         "num_warps": [2, 4, 8], "backward_num_warps": [4, 8], "num_stages": [1, 2], "recompute": [0, 1]},
        (
            Constraint("block_d <= D rounded up to a power of two", ("block_d",), lambda bd: bd <= next_power_of_two(D)),
            Constraint("block_k <= D rounded up to a power of two", ("block_k",), lambda bk: bk <= next_power_of_two(D)),
            Constraint("G gate accumulators and a weight tile fit in 255 registers per thread (forward and "
                       "backward warps)", ("block_b", "block_d", "block_k", "num_warps", "backward_num_warps"),
                       lambda bb, bd, bk, *warps: gates * bb * bd + bd * bk <= 255 * hardware.warp_size * min(warps)),
            Constraint("recompute: one tile spans the head, and R twice in shared memory",
                       ("block_d", "block_k", "recompute"),
                       lambda bd, bk, r: not r or (bd >= D and bk >= D and recompute_shared_bytes(
                           gates, D, element_bytes) <= hardware.shared_memory_per_block)),
        ),
    )


def supports(*, dtype, device, head_dim=None, **_) -> str | None:
    reasons = [dtype_reason(dtype), device_reason(device)]
    if head_dim is not None and not (head_dim % 16 == 0 and 16 <= head_dim <= 256):
        reasons.append(f"the head dim D must be a multiple of 16 in [16, 256], got {head_dim} (larger heads: the "
                       "cuda backend)")
    return join_reasons(*reasons)


def resident_shared_bytes(gates: int, dim: int, element_bytes: int) -> int:
    """Shared memory the resident kernels (RESIDENT in triton_kernels/rnn.py) hold R in: the
    backward stacks four gates' weights (a GRU's three and a zero one) for its one product, and by
    compile_check (sm_90, D = 64 and 128, Triton 3.6 and 3.9) a block takes at most 2 bytes per
    weight plus 2 D^2 for half inputs, 8 and 8 D^2 for float32's tf32x3 operands (an LSTM head of
    64: 40 KB in bfloat16, 160 KB in float32; of 128 in bfloat16: 160 KB)."""
    per_weight = 2 if element_bytes <= 2 else 8
    return _stacked_weight_bytes(gates, dim, element_bytes) + per_weight * next_power_of_two(dim) ** 2


def recompute_shared_bytes(gates: int, dim: int, element_bytes: int) -> int:
    """With RECOMPUTE (RNNConfig.recompute): the backward multiplies h_{t-1} with the stacked
    weights transposed, which Triton stages as a second copy (compile_check, sm_90: an LSTM head
    of 64 in bfloat16 72 KB; of 128, or of 64 in float32, 288 KB: over an H100's 227)."""
    return resident_shared_bytes(gates, dim, element_bytes) + _stacked_weight_bytes(gates, dim, element_bytes)


def _stacked_weight_bytes(gates: int, dim: int, element_bytes: int) -> int:
    """One shared copy of the stacked weights (four gates', or one: Elman), 2 bytes a weight for half
    inputs, 8 for float32's tf32x3 operands."""
    return (4 if gates > 1 else 1) * (2 if element_bytes <= 2 else 8) * next_power_of_two(dim) ** 2


def _kernels():
    from rnnops.triton_kernels import rnn as kernels

    return kernels


class _Launcher:
    """Launches the Triton kernels on the buffers of rnnops._fused_rnn.FusedRNNFunction.
    ``saves`` False (no backward will run: rnnops._backward_only.needs_backward): the forward saves no
    pre-activations and, resident, writes only the last step's states (SAVE in the kernel)."""

    def __init__(self, cell: str, config: RNNConfig, batch: int, time: int, heads: int, dim: int, dtype,
                 device: torch.device, saves: bool = True):
        block_d, block_k = (min(block, next_power_of_two(dim)) for block in (config.block_d, config.block_k))
        self.meta = dict(H=heads, D=dim, CELL=CELL_IDS[cell], G=CELLS[cell].gates, S=len(CELLS[cell].states),
                         P=pre_slots(cell), PRECISION=dot_precision(dtype, tile_dims=(block_d, block_k)),
                         BB=config.block_b, BD=block_d, BKD=block_k, num_stages=config.num_stages)
        self.forward_warps, self.backward_warps = config.num_warps, config.backward_num_warps
        # the kernels hold the head's R on chip when their tile spans the head and R fits (RESIDENT)
        limit = block_shared_memory(device)
        gates, element_bytes = CELLS[cell].gates, dtype.itemsize
        self.resident = block_d >= dim and block_k >= dim and (
            limit is None or resident_shared_bytes(gates, dim, element_bytes) <= limit)
        self.recompute = self.resident and bool(config.recompute) and (
            limit is None or recompute_shared_bytes(gates, dim, element_bytes) <= limit)
        self.grid = (heads, -(-batch // config.block_b))
        self.cell, self.time, self.batch, self.saves = cell, time, batch, saves

    def _pre(self, device):
        return pre_buffer(self.cell, self.batch, self.time, self.meta["H"], self.meta["D"], device)

    def _run(self, kernel, args, flags, resident: bool, recompute: bool, num_warps: int):
        launch(kernel, self.grid, *args, RESIDENT=resident, RECOMPUTE=recompute, num_warps=num_warps, **flags,
               **self.meta)

    def _refused(self, error) -> None:
        """resident_shared_bytes and recompute_shared_bytes are estimates: where the GPU refuses a
        resident kernel's shared memory (Triton raises OutOfResources when it loads the kernel),
        this launch and every later one run tiled, with a warning; other errors are raised."""
        if "shared" not in str(error):
            raise error
        warnings.warn(f"rnnops: the Triton cells' resident kernels do not fit this GPU ({error}); they run "
                      "tiled, with R read from L2 every step", RuntimeWarning, stacklevel=4)
        self.resident = self.recompute = False

    def forward(self, x, R, b, initial, states, h_seq):
        """Runs the forward; returns the pre-activations saved for the backward (None where the
        resident kernels recompute them)."""
        from triton.runtime.errors import OutOfResources

        flags = {"HAS_BIAS": b is not None, "HAS_INITIAL": initial is not None, "SAVE": self.saves,
                 "STAGES": self.meta["num_stages"]}
        if self.resident:
            pre = None if self.recompute or not self.saves else self._pre(x.device)
            try:
                self._run(_kernels().rnn_fwd_kernel, (x, R, b, initial, states, pre, h_seq, self.time, self.batch),
                          flags, True, self.recompute, self.forward_warps)
                return pre
            except OutOfResources as error:
                self._refused(error)
        pre = self._pre(x.device) if self.saves else None
        self._run(_kernels().rnn_fwd_kernel, (x, R, b, initial, states, pre, h_seq, self.time, self.batch), flags,
                  False, False, self.forward_warps)
        return pre

    def backward(self, R, initial, states, pre, d_h_seq, carry, dx, drec_n, x, b, h_seq):
        """``pre`` None: the resident forward saved none, this backward recomputes them (or, refused,
        runs a tiled forward into scratch buffers for them first)."""
        from triton.runtime.errors import OutOfResources

        flags = {"HAS_BIAS": b is not None, "HAS_INITIAL": initial is not None}
        if self.resident:
            try:
                self._run(_kernels().rnn_bwd_kernel, (R, initial, states, pre, d_h_seq, carry, dx, drec_n, x, b,
                                                      h_seq, self.time, self.batch), flags, True, pre is None,
                          self.backward_warps)
                return
            except OutOfResources as error:
                self._refused(error)
        if pre is None:
            states = torch.empty_like(states)
            pre = self.forward(x, R, b, initial, states, torch.empty_like(h_seq))
        self._run(_kernels().rnn_bwd_kernel, (R, initial, states, pre, d_h_seq, carry, dx, drec_n, x, b, h_seq,
                                              self.time, self.batch), flags, False, False, self.backward_warps)


@register("rnn", "triton", supports=supports)
def rnn(x_gates, R, b, state, *, cell, config: RNNConfig | None = None):
    batch, time, _, heads, dim = x_gates.shape
    if config is None:
        config = tuned("rnn", "triton", rnn_shape(x_gates, cell), x_gates.dtype, x_gates.device, DEFAULT_CONFIG)
    launcher = _Launcher(cell, config, batch, time, heads, dim, x_gates.dtype, x_gates.device,
                         needs_backward(x_gates, R, b, *(state or ())))
    h_seq, *final = FusedRNNFunction.apply(launcher, x_gates, R, b, cell, *(state or ()))
    return h_seq, tuple(final)
