"""CUDA selective scan (csrc/scan/selective_scan.cuh): configuration, search space, autograd
Function, registration as backend "cuda".

Memory: besides the inputs, the forward saves the state entering every chunk of
warps * items steps (Dm x N fp32 per chunk and sequence); the backward replays the forward
inside each chunk from it. With ``segments`` > 1 each direction also takes Dm x N fp32 and Dm
dt sums per segment and sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rnnops.autotune.cache import tuned
from rnnops.autotune.hardware import block_shared_memory
from rnnops.autotune.kernels import selective_scan_shape
from rnnops.autotune.space import Constraint, Space

from .._backward_only import needs_backward
from .._buffers import empty, empty_in_order_of
from .._dispatch import register
from ..triton_backend._common import ChunkLayout, dtype_reason, join_reasons
from .engines import device_reason, engine, maybe

STATIC, SHARED, GROUPED = 0, 1, 2


@dataclass(frozen=True)
class ScanConfig:
    warps: int = 4  # warps per block; a block owns 32 channels
    items: int = 8  # consecutive steps per warp; a chunk is warps * items steps
    # 1: where every block's channels share their B and C rows (_rows_shared), each chunk's rows are
    # staged in shared memory (the kernels' STAGED instantiation); 0: read from global memory always
    stage_rows: int = 1
    # runs of chunks each sequence is split into, walked by blocks of their own, for batches too
    # small to fill the GPU (B x Dm / 32 blocks): a LOCAL pass over each (forward its end state
    # from zero, backward the gradient it passes back from zero), a composition over the
    # segments, then the main kernels per segment (csrc/scan, "segments"): about 1.3 - 1.4x the
    # forward's work and 1.1x the backward's over ``segments`` x the blocks
    segments: int = 1


DEFAULT_CONFIG = ScanConfig()


def dynamic_shared_bytes(phase: str, N: int, warps: int, items: int, staged: bool = True,
                         element_bytes: int = 4) -> int:
    """The launch's dynamic shared memory (fp32 values but where said, chunk = warps * items steps,
    N4 = N rounded up to 4). Staged (the state elements split over the warps), both directions:
    the chunk's B and C rows (2 x chunk x N4); the forward the carried state (N4 x 32), dt and dt u
    (2 x chunk x 32), the warps' y sums (warps x chunk x 32) and z in the input type
    (chunk x 32 x ``element_bytes``, the inputs' element size; 4, the default, bounds every
    type); the backward the carried gradient, the next step's decay and dA (3 x N4 x 32), the
    state entering each sub-block of min(chunk, 8) steps (chunk / sub x N4 x 32), dt, dt u, dy, u,
    softplus' derivative and dz's factor (6 x chunk x 32) and the warps' sums over their state
    elements (2 x 3 x warps x sub x 32). Else (the steps split over the warps) the forward's
    carried state in two halves (2 x N x 32); the backward's carried gradient in two halves, dA and
    the first decay (4 x N x 32) and each lane's u, softplus' derivative and dz's factor (3 x chunk
    x 32). The per-step terms are staged so that the stores of a chunk's outputs wait for no
    global load (csrc: load_items, StepTerms)."""
    chunk, n4 = warps * items, -(-N // 4) * 4
    if not staged:
        return (2 * N * 32 if phase == "fwd" else 4 * N * 32 + 3 * chunk * 32) * 4
    if phase == "fwd":
        return (2 * chunk * n4 + n4 * 32 + 2 * chunk * 32 + warps * chunk * 32) * 4 + chunk * 32 * element_bytes
    sub = min(chunk, 8)
    return (2 * chunk * n4 + 3 * n4 * 32 + chunk // sub * n4 * 32 + 6 * chunk * 32 + 2 * 3 * warps * sub * 32) * 4


# the LOCAL passes over a sequence's segments (csrc/scan: selective_scan_fwd_local, _bwd_local): steps a
# block, state elements a lane carries (kLocalItems, kLocalStates)
LOCAL_ITEMS, LOCAL_STATES = 16, 16


def local_shared_bytes(staged: bool) -> int:
    """The dynamic shared memory of a LOCAL pass's launch: two per-step terms of LOCAL_ITEMS steps
    and 32 lanes, and where its rows are staged those of LOCAL_ITEMS steps and LOCAL_STATES state
    elements (fp32)."""
    return (2 * LOCAL_ITEMS * 32 + (LOCAL_ITEMS * LOCAL_STATES if staged else 0)) * 4


def block_shared_bytes(N: int, warps: int, items: int, staged: bool = True) -> int:
    """All the shared memory of the larger direction's block: dynamic_shared_bytes plus, where the
    steps are split over the warps, the static arrays (the forward's segments, 2 x 2 x warps x 32
    fp32; the backward's two phases' segments, the warps' first decays and dA parts, 6 x warps x
    32 fp32). The forward's z counts as fp32, the largest input type."""
    static_forward, static_backward = (0, 0) if staged else (warps * 32 * 4 * 4, warps * 32 * 4 * 6)
    return max(dynamic_shared_bytes("fwd", N, warps, items, staged) + static_forward,
               dynamic_shared_bytes("bwd", N, warps, items, staged) + static_backward)


def space(N: int, hardware) -> Space:
    # every configuration compiles without spills for sm_80 and sm_90a (the tests compile each one
    # the model accepts)
    return Space(
        {"warps": [1, 2, 4, 8], "items": [4, 8], "stage_rows": [0, 1], "segments": [1, 2, 4, 8, 16]},
        (
            Constraint("each direction's shared memory (block_shared_bytes) fits a block", ("warps", "items", "stage_rows"),
                       lambda w, i, staged: block_shared_bytes(N, w, i, bool(staged))
                       <= hardware.shared_memory_per_block),
        ),
    )


def _shared_memory_reason(shape: dict | None, device) -> str | None:
    """Why a block of the default tile does not fit ``device``'s shared memory at ``shape``'s N,
    even with B and C read from global memory (the smaller kernels: _stages falls back to them)."""
    limit = None if shape is None else block_shared_memory(device)
    if limit is None:
        return None
    need = block_shared_bytes(shape["N"], DEFAULT_CONFIG.warps, DEFAULT_CONFIG.items, staged=False)
    return None if need <= limit else (f"N={shape['N']} state elements need {need} bytes of shared memory per block, "
                                       f"this GPU has {limit}")


def _stages(config: ScanConfig, b_layout: list[int], c_layout: list[int], N: int, device) -> bool:
    """Whether the kernels stage B and C rows in shared memory (their STAGED instantiation):
    the configuration asks for it, every block's channels share both rows (_rows_shared), and the
    staged blocks fit the device (at large N they need more shared memory than the kernels that
    read B and C from global memory: N 256 at 4 x 8, 324 against 131 KB)."""
    if not (config.stage_rows and _rows_shared(b_layout) and _rows_shared(c_layout)):
        return False
    limit = block_shared_memory(device)
    return limit is None or block_shared_bytes(N, config.warps, config.items) <= limit


def supports(*, dtype, device, shape=None, **_) -> str | None:
    return join_reasons(dtype_reason(dtype), device_reason(device), _shared_memory_reason(shape, device))


def _bc_layout(M: torch.Tensor, channels: int) -> list[int]:
    """mode, strides (b, t, g, n), channels per group; static B/C use t for the Dm stride."""
    if M.dim() == 2:
        return [STATIC, 0, M.stride(0), 0, M.stride(1), channels]
    if M.dim() == 3:
        return [SHARED, M.stride(0), M.stride(1), 0, M.stride(2), channels]
    return [GROUPED, M.stride(0), M.stride(1), M.stride(2), M.stride(3), channels // M.shape[2]]


def _rows_shared(layout: list[int]) -> bool:
    """Whether every 32-channel block reads one B or C row per step (_bc_layout's ``layout``):
    shared, or grouped in groups of a multiple of 32 channels. Where both B and C do, the kernels
    stage each chunk's rows in shared memory and read them as 16-byte broadcasts (their STAGED
    instantiation, which splits the state elements over the warps), where loading them from
    global memory took a load and a 64-bit address per step and state element: SASS sm_90a at 4
    warps x 8 steps, about 7 instead of 23 instructions an element forward and 37 instead of 120
    backward."""
    return layout[0] == SHARED or (layout[0] == GROUPED and layout[5] % 32 == 0)


def _bc_operand(M: torch.Tensor) -> torch.Tensor:
    """B or C in fp32 with a step stride below 2^24 elements: the kernels address a chunk's steps
    by 32-bit byte offsets from its first row (at most 64 steps)."""
    M = M.float()
    return M if M.dim() == 2 or M.stride(1) < 2**24 else M.contiguous()


def _strides(*tensors) -> list[int]:
    return [s for t in tensors for s in (t.stride() if t is not None else (0, 0, 0))]


class SelectiveScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, cu_seqlens, output_final_state,
                config, saves):
        """``saves`` False (no backward will run: rnnops._backward_only.needs_backward, decided by
        the caller): no chunk states are stored (the kernel gets a null pointer)."""
        batch, time, channels = u.shape
        N = A.shape[1]
        chunk = config.warps * config.items
        layout = ChunkLayout.build(batch, time, chunk, cu_seqlens, u.device)
        A, D, delta_bias = (None if x is None else x.float() for x in (A.contiguous(), D, delta_bias))
        B, C = _bc_operand(B), _bc_operand(C)
        state0 = None if initial_state is None else initial_state.float().contiguous()
        out = empty_in_order_of(u)  # u's dimension order, as du, d delta and dz: mamba's (B, D, L) stays (B, D, L)
        f32 = {"dtype": torch.float32, "device": u.device}
        chunk_states = empty((layout.programs, channels, N), **f32) if saves else None
        final = empty((layout.sequences, channels, N), **f32) if output_final_state else None
        # (T bounds a packed sequence's length; a grid's y extent is at most 65535)
        segments = max(1, min(config.segments, -(-time // chunk), 65535 // layout.sequences))
        shape = [channels, N, int(cu_seqlens is not None), int(D is not None), int(z is not None),
                 int(delta_bias is not None), int(softplus), segments]
        b_layout, c_layout = _bc_layout(B, channels), _bc_layout(C, channels)
        staged = _stages(config, b_layout, c_layout, N, u.device)
        grid = [-(-channels // 32), layout.sequences * segments]
        run = engine(u.device)
        entering, leaving = state0, final
        if segments > 1:  # each segment's end state from zero, then the states entering them
            entering, dt_sums = empty((grid[1], channels, N), **f32), empty((grid[1], channels), **f32)
            run.scan_forward_local(u, delta, A, B, maybe(delta_bias), entering, dt_sums, layout.cu_seqlens,
                                   layout.chunk_offsets, _strides(u, delta), b_layout, shape,
                                   grid + [chunk, local_shared_bytes(staged), int(staged)])
            run.scan_compose(entering, dt_sums, A, maybe(state0), maybe(final),
                             [channels, N, segments, 0, layout.sequences])
            leaving = None  # (the composition wrote the final state)
        run.scan_forward(
            u, delta, A, B, C, maybe(D), maybe(z), maybe(delta_bias), out, maybe(chunk_states), maybe(entering),
            maybe(leaving), layout.cu_seqlens, layout.chunk_offsets, _strides(u, delta, z, out), b_layout, c_layout,
            shape, grid + [config.warps, config.items,
                           dynamic_shared_bytes("fwd", N, config.warps, config.items, staged, u.element_size()),
                           int(staged)])
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_states, state0)
        ctx.layout, ctx.shape, ctx.grid, ctx.config, ctx.staged = layout, shape, grid, config, staged
        ctx.bc_layouts = b_layout, c_layout  # of the saved B and C, which the backward reads alike
        ctx.dtypes = [None if x is None else x.dtype for x in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        u, delta, A, B, C, D, z, delta_bias, chunk_states, state0 = ctx.saved_tensors
        layout, config = ctx.layout, ctx.config
        channels = u.shape[2]
        N = A.shape[1]
        f32 = {"dtype": torch.float32, "device": u.device}
        # the kernel's element type (u's, delta's and z's): rounded once as it stores them, where fp32
        # buffers cast after took three more passes (B8 T2048 Dm2048 bf16: 0.15 ms of 4.88 f+b, H200);
        # in u's dimension order: (B, T, D) views of mamba's (B, D, L) tensors got (B, T, D)-contiguous
        # gradients, which autograd then copied into the leaves' layout (0.64 ms of 3.29 f+b, H200)
        du, d_delta = empty_in_order_of(u), empty_in_order_of(u)
        dz = empty_in_order_of(u) if z is not None else None
        dA = torch.zeros(A.shape, **f32)
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
        dD = torch.zeros(channels, **f32) if D is not None else None
        d_bias = torch.zeros(channels, **f32) if delta_bias is not None else None
        d_initial = empty(state0.shape, **f32) if state0 is not None else None
        d_final = None if d_final is None else d_final.float().contiguous()
        run, segments = engine(u.device), ctx.shape[-1]
        entering, leaving = d_final, d_initial  # the gradients entering the last step, leaving the first
        if segments > 1:  # the gradient each segment passes back from zero, then the gradients entering their ends
            spans = ctx.grid[1]
            entering, dt_sums = empty((spans, channels, N), **f32), empty((spans, channels), **f32)
            run.scan_backward_local(delta, maybe(z), d_out, A, C, maybe(delta_bias), entering, dt_sums,
                                    layout.cu_seqlens, layout.chunk_offsets, _strides(delta, z, d_out),
                                    ctx.bc_layouts[1], ctx.shape,
                                    ctx.grid + [config.warps * config.items, local_shared_bytes(ctx.staged),
                                                int(ctx.staged)])
            run.scan_compose(entering, dt_sums, A, maybe(d_final), maybe(d_initial),
                             [channels, N, segments, 1, layout.sequences])
            leaving = None  # (the composition wrote the initial state's gradient)
        run.scan_backward(
            u, delta, A, B, C, maybe(D), maybe(z), maybe(delta_bias), d_out, chunk_states, maybe(entering),
            maybe(leaving), du, d_delta, maybe(dz), dA, dB, dC, maybe(dD), maybe(d_bias), layout.cu_seqlens,
            layout.chunk_offsets, _strides(u, delta, z, d_out, du), *ctx.bc_layouts, ctx.shape,
            ctx.grid + [config.warps, config.items,
                        dynamic_shared_bytes("bwd", N, config.warps, config.items, ctx.staged), int(ctx.staged)])
        grads = [du, d_delta, dA, dB, dC, dD, dz, d_bias, d_initial]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads[:8], None, grads[8], None, None, None, None)


@register("selective_scan", "cuda", supports=supports)
def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *, initial_state, output_final_state,
                   cu_seqlens, config: ScanConfig | None = None):
    if config is None:
        config = tuned("selective_scan", "cuda", selective_scan_shape(u, A), u.dtype, u.device, DEFAULT_CONFIG)
    saves = needs_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return SelectiveScanFunction.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens,
                                       output_final_state, config, saves)
