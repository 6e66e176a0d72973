"""CUDA fused recurrent cells (csrc/rnn/rnn.cuh): configuration, search space, launcher (the
autograd Function is rnnops._fused_rnn's), registration as backend "cuda".

A block owns 16 batch rows and ``units`` units of one head, with that slice of the recurrent
weights in shared memory; heads wider than ``units`` split over several blocks that meet at a
grid barrier every step (a cooperative launch: every block must be resident at once). A head
of up to 64 units in a half type can instead run either direction in tensor-core fragments
(RNNConfig.forward_fragments, backward_fragments): a block a head, no slices.
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
from .._fused_rnn import CELL_IDS, FusedRNNFunction, pre_buffer, pre_slots
from ..reference.rnn import CELLS
from ..triton_backend._common import dtype_reason, join_reasons
from .engines import device_reason, engine, maybe

ROWS = 16  # batch rows per block
# with RNNConfig.pad_rows, the shared-memory tiles that tensor-core fragments read have rows padded by
# 16 bytes (csrc/rnn/rnn.cuh's padded(): row strides an odd multiple of 16 bytes, free of bank conflicts)
ROW_PAD_BYTES = 16
# a row of the backward's gate-gradient chunk (16 rows in shared memory; csrc/rnn/rnn.cuh's KC: 256
# float32 or 512 half-type gradients)
CHUNK_ROW_BYTES = 1024
UNITS = (16, 32, 64)  # the instantiated slice widths
# the fragment kernels' instantiations (csrc/rnn/rnn.cuh's rnn_fwd_fragments, rnn_bwd_fragments): the
# largest head, in 16-wide K steps, whose weights a warp holds in registers (D <= 16 KS; at 8 the
# LSTM's forward spills)
FRAGMENT_K_STEPS = (2, 4)


@dataclass(frozen=True)
class RNNConfig:
    units: int = 64  # units of a head per block
    threads: int = 128
    # the pointwise phases' inputs staged in shared memory (csrc/rnn/rnn.cuh's RNNShape.stage):
    # a launch where they do not fit at any width runs unstaged
    stage: int = 1
    # the gate-gradient chunks the backward's product copies in at once where a head splits over
    # blocks (csrc/rnn/rnn.cuh's RNNShape.gradient_chunks): each round of chunks waits one memory
    # latency; a launch takes no more than a step needs (gradient_chunks_needed) and fit
    gradient_chunks: int = 8
    # the tiles the tensor-core products read in shared memory with rows padded by ROW_PAD_BYTES
    # (csrc/rnn/rnn.cuh's RNNShape.pad_rows; unpadded, a row of a multiple of 128 bytes made every
    # fragment load an 8-way bank conflict): a launch where they do not fit pads none
    pad_rows: int = 1
    # the forward / backward in tensor-core fragments (csrc/rnn/rnn.cuh's rnn_fwd_fragments,
    # rnn_bwd_fragments: a block a head, the products in the registers of the threads that apply
    # the cell or its gradient, one block barrier a step) where fragment_k_steps allows it; else
    # the slices above
    forward_fragments: int = 0
    backward_fragments: int = 0


DEFAULT_CONFIG = RNNConfig()


def k_parts(outputs: int, threads: int, element_bytes: int) -> int:
    """Warps that share each 16 x 16 output tile's K steps in the kernels' tensor-core products
    (csrc/rnn/rnn.cuh's warp_share), each leaving a partial [16][outputs] fp32 tile; float32
    products (CUDA cores) keep one."""
    if element_bytes == 4:
        return 1
    return max(1, threads // 32 // (outputs // 16))


def fragment_k_steps(D: int, element_bytes: int) -> int | None:
    """The fragment kernels' instantiation for a head of D units (its K steps, FRAGMENT_K_STEPS),
    or None where it does not apply: float32 (no tensor cores), or D past 16 times the largest (64)."""
    if element_bytes != 2:
        return None
    return next((k for k in FRAGMENT_K_STEPS if D <= 16 * k), None)


def fragment_launch(phase: str, D: int, cell: str, element_bytes: int, pad_rows: int) -> tuple[int, int]:
    """(threads, dynamic shared bytes) of a fragment kernel: D / 8 warps; forward, two [16][D] h
    buffers; backward, two [16][G D] gate-gradient buffers, first R^T ([D][G D]) staged, rows padded
    as ``pad_rows`` says."""
    pad = ROW_PAD_BYTES if pad_rows else 0
    if phase == "fwd":
        return 4 * D, 2 * ROWS * (D * element_bytes + pad)
    return 4 * D, max(D, 2 * ROWS) * (CELLS[cell].gates * D * element_bytes + pad)


def carried_states(cell: str) -> int:
    """The float32 states the forward carries from step to step in shared memory (csrc/rnn/rnn.cuh's
    SC): GRU's h, the LSTM's c, the sLSTM's c, n and m; Elman's h is only the product's input."""
    return 1 if cell == "gru" else len(CELLS[cell].states) - 1


def gradient_chunks_needed(D: int, cell: str, element_bytes: int) -> int:
    """Gate-gradient chunks of a backward step's product: G D gradients a row, 1 KB of them a chunk
    (one for every head that fits a block, D <= 64)."""
    return -(-CELLS[cell].gates * D * element_bytes // CHUNK_ROW_BYTES)


def shared_bytes(D: int, cell: str, units: int, element_bytes: int, threads: int, stage: int = 1,
                 gradient_chunks: int = 1, pad_rows: int = 1) -> tuple[int, int]:
    """Dynamic shared memory of the forward and backward kernels, with ``pad_rows`` their tiles'
    rows padded (ROW_PAD_BYTES). Forward: the weight slice, h_{t-1}, the product's partial tiles,
    and staged, x_t and x_{t+1} of the slice, the carried states and the bias. Backward: the
    transposed weight slice, ``gradient_chunks`` gate-gradient chunks, the product's partial tiles,
    and staged, the carried gradients, three steps of the saved states it reads, two of the
    pre-activations and of d h_seq."""
    gates, pad = CELLS[cell].gates, ROW_PAD_BYTES if pad_rows else 0
    row = D * element_bytes + pad  # of the weight slice and h_{t-1}
    forward = (gates * units * row + ROWS * row
               + ROWS * gates * units * 4 * k_parts(gates * units, threads, element_bytes))
    backward = (units * (gates * D * element_bytes + pad) + gradient_chunks * ROWS * (CHUNK_ROW_BYTES + pad)
                + ROWS * units * 4 * k_parts(units, threads, element_bytes))
    if stage:
        forward += (2 * ROWS * gates * units * element_bytes + carried_states(cell) * ROWS * units * 4
                    + gates * units * 4)
        states = len(CELLS[cell].states)
        read_states = states - 1 if cell in ("lstm", "slstm") else 1  # the slots the gradients read
        read_pre = 0 if cell == "elman" else pre_slots(cell)
        backward += (states + 3 * read_states + 2 * read_pre) * ROWS * units * 4 + 2 * ROWS * units * element_bytes
    return forward, backward


def fitting_slice(config: RNNConfig, D: int, cell: str, element_bytes: int,
                  device: torch.device) -> tuple[int, int, int]:
    """(units, stage, pad_rows) for a head of D units: the widest instantiated slice no wider than
    the configuration's (and than D rounded up to 16) whose weights and buffers fit the device's
    shared memory, staged and padded as the configuration asks where any width fits so; else, in
    this order, staged and unpadded, unstaged and padded, unstaged and unpadded. A configuration
    tuned or shipped for another head dim of the same shape bucket may ask for more than fits (sLSTM
    at D = 768 with 64 units: 424 KB); it gets a narrower slice. A GRU's 768-wide head fits an L4's
    or RTX 4090's 99 KB only unstaged and unpadded."""
    limit = block_shared_memory(device)
    candidates = [u for u in UNITS if u <= max(config.units, 16) and u <= -(-D // 16) * 16] or [UNITS[0]]
    for stage in sorted({config.stage, 0}, reverse=True):
        for pad_rows in sorted({config.pad_rows, 0}, reverse=True):
            fitting = [u for u in candidates if limit is None or max(
                shared_bytes(D, cell, u, element_bytes, config.threads, stage, 1, pad_rows)) <= limit]
            if fitting:
                return max(fitting), stage, pad_rows
    need = max(shared_bytes(D, cell, UNITS[0], element_bytes, config.threads, 0, 1, 0))
    raise ValueError(f"rnn (cuda): a head of D={D} needs {need} bytes of shared memory per block even with "
                     f"{UNITS[0]} units; this GPU has {limit} (use backend='triton')")


def fitting_gradient_chunks(config: RNNConfig, D: int, cell: str, units: int, stage: int, pad_rows: int,
                            element_bytes: int, device: torch.device) -> int:
    """The backward's gate-gradient chunk buffers for a slice fitting_slice chose: as many as the
    configuration asks, no more than a step needs, and no more than fit beside the slice's other
    buffers (at least one, which fitting_slice counted)."""
    limit = block_shared_memory(device)
    wanted = max(1, min(config.gradient_chunks, gradient_chunks_needed(D, cell, element_bytes)))
    return max([c for c in range(1, wanted + 1)
                if limit is None
                or shared_bytes(D, cell, units, element_bytes, config.threads, stage, c, pad_rows)[1] <= limit])


def space(D: int, cell: str, element_bytes: int, hardware) -> Space:
    needed = gradient_chunks_needed(D, cell, element_bytes)
    return Space(
        {"units": list(UNITS), "threads": [64, 128, 256], "stage": [0, 1], "gradient_chunks": [1, 2, 4, 8],
         "pad_rows": [0, 1], "forward_fragments": [0, 1], "backward_fragments": [0, 1]},
        (
            Constraint("fragments: half types and D <= 64", ("forward_fragments", "backward_fragments"),
                       lambda f, b: not (f or b) or fragment_k_steps(D, element_bytes) is not None),
            Constraint("units <= D rounded up to 16", ("units",), lambda u: u <= -(-D // 16) * 16),
            Constraint("gradient_chunks <= a step's chunks rounded up to a power of two", ("gradient_chunks",),
                       lambda c: c == 1 or c // 2 < needed),
            Constraint("the weight slice and buffers fit in a block's shared memory",
                       ("units", "threads", "stage", "gradient_chunks", "pad_rows"),
                       lambda u, t, st, c, p: max(shared_bytes(D, cell, u, element_bytes, t, st, min(c, needed), p))
                       <= hardware.shared_memory_per_block),
        ),
    )


def supports(*, dtype, device, head_dim=None, cell=None, **_) -> str | None:
    reasons = [dtype_reason(dtype), device_reason(device)]
    if head_dim is not None and head_dim % 16:
        reasons.append(f"the head dim D must be a multiple of 16, got {head_dim}")
    elif head_dim is not None and cell in CELLS and not any(reasons):
        try:
            fitting_slice(RNNConfig(units=UNITS[0], threads=64, stage=0, pad_rows=0), head_dim, cell,
                          dtype.itemsize, torch.device(device))
        except ValueError as error:
            reasons.append(str(error).removeprefix("rnn (cuda): "))
    return join_reasons(*reasons)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it where it does not start at a multiple of 16 bytes (a view at an odd
    offset): the kernels copy x and d h_seq 16 bytes at a time (cp.async)."""
    return t.clone() if t.data_ptr() % 16 else t


def co_resident_blocks(device: torch.device, phase: str, dtype: torch.dtype, cell: str, units: int, threads: int,
                       shared: int) -> int | None:
    """How many blocks of a kernel can be resident at once on ``device`` (the occupancy of its
    registers, threads and shared memory, times the SMs); None for the simulator, whose blocks
    are threads and all run at once."""
    if device.type == "cpu":
        return None
    return engine(device).rnn_co_resident_blocks(phase, dtype, CELL_IDS[cell], units, threads, shared)


class _Launcher:
    """``saves`` False (no backward will run: rnnops._backward_only.needs_backward): the forward writes
    no pre-activations (it still writes every step's states).

    A block takes one (head, batch tile) group's slice of units (grid x: groups, z: slices). Where a
    head splits over blocks, they meet at grid barriers, so every block of a launch must be resident
    at once: the groups go in as many launches as that takes (a 768-wide head in 16-unit slices
    fills 48 of an H100's 132 SMs with its one block an SM, so from 48 batch rows on)."""

    def __init__(self, cell: str, config: RNNConfig, batch: int, time: int, heads: int, dim: int, dtype: torch.dtype,
                 device, saves: bool = True):
        units, stage, pad_rows = fitting_slice(config, dim, cell, dtype.itemsize, device)
        chunks = fitting_gradient_chunks(config, dim, cell, units, stage, pad_rows, dtype.itemsize, device)
        self.splits = -(-dim // units)
        self.groups = heads * -(-batch // ROWS)
        self.cell, self.cell_name, self.units, self.device, self.dtype = CELL_IDS[cell], cell, units, device, dtype
        self.threads = config.threads
        self.shared = dict(zip(("fwd", "bwd"), shared_bytes(dim, cell, units, dtype.itemsize, config.threads, stage,
                                                             chunks, pad_rows)))
        self.shape = [batch, time, heads, dim, self.splits]
        self.saves, self.layout = saves, [stage, chunks, pad_rows]  # RNNShape's stage, gradient_chunks, pad_rows
        k_steps = fragment_k_steps(dim, dtype.itemsize)  # (None where the fragment kernels do not apply)
        self.fragments = {"fwd": k_steps if config.forward_fragments else None,
                          "bwd": k_steps if config.backward_fragments else None}

    def launches(self, phase: str) -> list[tuple[list[int], list[int]]]:
        """(RNNShape's last field, group_begin; the launch shape: grid x, y, z, threads, shared bytes)
        per launch of ``phase``: one where a head fits a block, else as many groups a launch as can
        be resident at once."""
        per_launch = self.groups
        if self.splits > 1:
            blocks = co_resident_blocks(self.device, phase, self.dtype, self.cell_name, self.units, self.threads,
                                        self.shared[phase])
            if blocks is not None:
                per_launch = blocks // self.splits
                if per_launch == 0:
                    raise ValueError(f"rnn (cuda): a head of D={self.shape[3]} splits over {self.splits} blocks that "
                                     f"must be resident at once, and this GPU holds {blocks} of them "
                                     f"(use backend='triton', or a smaller head)")
        return [([begin], [min(per_launch, self.groups - begin), 1, self.splits, self.threads, self.shared[phase]])
                for begin in range(0, self.groups, per_launch)]

    def fragment_launch(self, phase: str) -> list[int]:
        """The launch shape of a fragment kernel: a block a (head, batch tile) group, in one launch."""
        return [self.groups, 1, 1, *fragment_launch(phase, self.shape[3], self.cell_name, self.dtype.itemsize,
                                                    self.layout[2])]

    def forward(self, x, R, b, initial, states, h_seq):
        """Runs the forward; returns the pre-activations it saves for the backward (None without
        ``saves``). x at a misaligned address is copied first (_aligned)."""
        x = _aligned(x)
        pre = pre_buffer(self.cell_name, *self.shape[:4], x.device) if self.saves else None
        flags = [int(b is not None), int(initial is not None), int(self.saves), *self.layout]
        if self.fragments["fwd"] is not None:  # one block a head, all of them in one launch
            engine(self.device).rnn_forward_fragments(
                x, _aligned(R), maybe(b), maybe(initial), states, maybe(pre), h_seq, self.shape + flags + [0],
                self.cell, self.fragments["fwd"], self.fragment_launch("fwd"))
            return pre
        for group_begin, launch in self.launches("fwd"):
            engine(self.device).rnn_forward(x, R, maybe(b), maybe(initial), states, maybe(pre), h_seq,
                                            self.shape + flags + group_begin, self.cell, self.units, launch)
        return pre

    def backward(self, R, initial, states, pre, d_h_seq, carry, dx, drec_n, x, b, h_seq):
        """(``x``, ``b``, ``h_seq``: for a backward that recomputes the pre-activations; this one reads
        the saved ones.) d h_seq at a misaligned address is copied first (_aligned)."""
        d_h_seq = _aligned(d_h_seq)
        flags = [0, int(initial is not None), 0, *self.layout]
        if self.fragments["bwd"] is not None:
            engine(self.device).rnn_backward_fragments(
                _aligned(R), maybe(initial), states, pre, d_h_seq, carry, dx, maybe(drec_n), self.shape + flags + [0],
                self.cell, self.fragments["bwd"], self.fragment_launch("bwd"))
            return
        for group_begin, launch in self.launches("bwd"):
            engine(self.device).rnn_backward(R, maybe(initial), states, pre, d_h_seq, carry, dx, maybe(drec_n),
                                             self.shape + flags + group_begin, self.cell, self.units, launch)


@register("rnn", "cuda", supports=supports)
def rnn(x_gates, R, b, state, *, cell, config: RNNConfig | None = None):
    batch, time, _, heads, dim = x_gates.shape
    if config is None:
        config = tuned("rnn", "cuda", rnn_shape(x_gates, cell), x_gates.dtype, x_gates.device, DEFAULT_CONFIG)
    launcher = _Launcher(cell, config, batch, time, heads, dim, x_gates.dtype, x_gates.device,
                         needs_backward(x_gates, R, b, *(state or ())))
    h_seq, *final = FusedRNNFunction.apply(launcher, x_gates, R, b, cell, *(state or ()))
    return h_seq, tuple(final)
