"""Triton selective scan (Mamba-1) and its decoding step: configuration, autograd Function.

Memory: besides the inputs (B and C as fp32 copies when given in half precision; A, static B and
C and the initial state as n-major copies, the kernels' layout for every state-shaped tile), the
forward saves the state entering every chunk of ``config.chunk`` steps (N x Dm fp32 per chunk and
sequence); the backward recomputes the states inside each chunk from it, through a scratch of
chunk / BACKWARD_UNROLL states per program (N x block_d fp32 each), and writes dB, dC as partial
sums per block of ``block_d`` channels (Dm / block_d x T x N fp32 each when time-varying).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rnnops.autotune.cache import tuned
from rnnops.autotune.kernels import selective_scan_shape
from rnnops.autotune.space import Constraint, Space, next_power_of_two, powers_of_two

from .._backward_only import needs_backward
from .._buffers import empty, empty_in_order_of
from .._dispatch import register
from . import _common
from ._common import ChunkLayout, device_reason, dtype_reason, join_reasons
from .recurrent_step import supports as step_supports


@dataclass(frozen=True)
class SelectiveScanConfig:
    """Each kernel's channels per program are capped by the group size of grouped B / C; one warp
    per 32 channels, and a narrower block splits each channel's state elements over 32 / block
    lanes (more programs, more instructions per element: SASS at N 16, about 34 / 22 a step,
    channel and state element forward at 8 / 16 channels, 103 / 75 backward; 32 spill in both).
    No num_stages: the loops have nothing for Triton's pipeliner (1 and 2 compiled the same).

    ``segments`` > 1 splits each sequence's chunks into that many runs walked in parallel, for
    batches too small to fill the GPU (B Dm / block one-warp programs). Forward: each segment's
    end state from zero and its sum of dt (the LOCAL pass), a walk over the segments composing
    them into the state entering each (scan_segment_states_kernel), then the outputs from those
    states: about 1.6x the forward's instructions over segments x the programs. Backward: each
    segment's gradient passed back from a zero gradient at its end (the adjoint recurrence
    alone: scan_bwd_local_kernel, about a tenth of the backward), the reverse walk composing
    them, then the gradients from the gradient entering each segment's end."""

    chunk: int = 32  # time steps between stored states (the backward recomputes inside a chunk)
    block_d: int = 16  # channels per backward program
    forward_block_d: int = 16  # channels per forward program (the forward holds far fewer tiles)
    segments: int = 1  # programs per sequence, both directions (above)
    # steps per forward sub-block, whose loads issue a sub-block ahead (two sub-blocks' B and C in
    # registers: SASS sm_90, N 16, at 8 channels 2 steps take 102 registers and 4 take 164, at 16
    # channels 162 and 242; fewer registers, more one-warp programs an SM to hide latency with)
    forward_unroll: int = 4


DEFAULT_CONFIG = SelectiveScanConfig()
BACKWARD_UNROLL = 2  # steps per backward sub-block: their states and loads live in registers together


def space(Dm: int, N: int, hardware) -> Space:
    def per_thread(block: int) -> int:
        """fp32 values per thread in one N x block state tile (one warp per 32 channels)."""
        return next_power_of_two(N) * min(block, hardware.warp_size) // hardware.warp_size

    return Space(
        {"chunk": powers_of_two(16, 128), "block_d": powers_of_two(8, 128), "forward_block_d": powers_of_two(8, 128),
         "segments": powers_of_two(1, 16), "forward_unroll": [2, 4]},
        (
            Constraint("block_d <= Dm rounded up to a power of two", ("block_d",), lambda bd: bd <= next_power_of_two(Dm)),
            Constraint("forward_block_d <= Dm rounded up to a power of two", ("forward_block_d",),
                       lambda bd: bd <= next_power_of_two(Dm)),
            Constraint("the forward's tiles (the state, A, and B and C of the 2 x forward_unroll steps in flight, "
                       "N x forward_block_d fp32 each) fit in 160 registers per thread (calibrated with "
                       "compile_check, N = 16, 4 steps: 8 channels compile to 164 registers, 16 to 242, 32 spill; "
                       "2 steps at 32 channels: 249)",
                       ("forward_block_d", "forward_unroll"), lambda bd, u: (2 + 4 * u) * per_thread(bd) <= 160),
            Constraint("the backward's tiles (the sub-block's states, its steps' B and C, and 6 more: "
                       "3 BACKWARD_UNROLL + 6 of N x block_d fp32) fit in 128 "
                       "registers per thread (calibrated with rnnops.triton_backend.compile_check, N = 16: block_d "
                       "8 compiles to 226 registers, 16 to 248, 32 spills)",
                       ("block_d",), lambda bd: (3 * BACKWARD_UNROLL + 6) * per_thread(bd) <= 128),
        ),
    )


def supports(*, dtype, device, **_) -> str | None:
    return join_reasons(dtype_reason(dtype), device_reason(device))


def _kernels():
    from rnnops.triton_kernels import selective_scan as kernels

    return kernels


def _lowest_power_of_two(n: int) -> int:
    return n & -n


def _bc_layout(M: torch.Tensor, channels: int):
    """(mode, strides (b, t, g, n), channels per group) of a B or C operand (a static one is read
    as an n-major state tile: no strides)."""
    kernels = _kernels()
    if M.dim() == 2:
        return kernels.STATIC, (0, 0, 0, 0), channels
    if M.dim() == 3:
        return kernels.SHARED, (M.stride(0), M.stride(1), 0, M.stride(2)), channels
    return kernels.GROUPED, (M.stride(0), M.stride(1), M.stride(2), M.stride(3)), channels // M.shape[2]


class _ScanRun:
    def __init__(self, u, A, B, C, cu_seqlens, config: SelectiveScanConfig):
        self.batch, self.T, self.Dm = u.shape
        self.N = A.shape[1]
        self.B_mode, self.B_strides, self.B_group = _bc_layout(B, self.Dm)
        self.C_mode, self.C_strides, self.C_group = _bc_layout(C, self.Dm)
        self.layout = ChunkLayout.build(self.batch, self.T, config.chunk, cu_seqlens, u.device)
        self.packed = cu_seqlens is not None
        self.config = config
        self.forward_launch = self._launch(config.forward_block_d, config.forward_unroll)
        self.backward_launch = self._launch(config.block_d, BACKWARD_UNROLL)
        # no more segments than a sequence has chunks (T bounds a packed sequence's length)
        self.segments = min(config.segments, -(-self.T // config.chunk))
        self.programs = self.layout.sequences * self.segments  # per channel block

    def _launch(self, block_d: int, unroll: int) -> dict:
        """Launch options of a kernel with ``block_d`` channels per program (capped by the channel
        count and the B / C groups): one warp per 32 channels (narrower blocks split a channel's
        state elements over 32 / BD lanes), UNROLL steps unrolled."""
        BD = min(block_d, next_power_of_two(self.Dm), _lowest_power_of_two(self.B_group),
                 _lowest_power_of_two(self.C_group))
        return {"BD": BD, "UNROLL": min(unroll, self.config.chunk), "num_warps": max(1, BD // 32), "num_stages": 1}

    def channel_blocks(self, launch: dict) -> int:
        return -(-self.Dm // launch["BD"])

    def constants(self, D, z, delta_bias, softplus):
        return {"Dm": self.Dm, "N": self.N, "NP": next_power_of_two(self.N), "B_MODE": self.B_mode,
                "C_MODE": self.C_mode, "HAS_D": D is not None, "HAS_Z": z is not None,
                "HAS_BIAS": delta_bias is not None, "SOFTPLUS": softplus, "PACKED": self.packed,
                "BT": self.config.chunk}

    def compose_segments(self, values, dt_sums, A, initial, final, reverse: bool, launch: dict) -> None:
        """scan_segment_states_kernel over every sequence's segments (``launch``: the pass's BD
        and warps)."""
        _common.launch(_kernels().scan_segment_states_kernel, (self.channel_blocks(launch), self.layout.sequences),
            values, dt_sums, A, initial, final, Dm=self.Dm, N=self.N, NP=next_power_of_two(self.N),
            SEGMENTS=self.segments, HAS_INITIAL=initial is not None, STORE_FINAL=final is not None, REVERSE=reverse,
            BD=launch["BD"], num_warps=launch["num_warps"])

    def strides(self, u, delta, z, out):
        zs = z.stride() if z is not None else (0, 0, 0)
        return (*u.stride(), *delta.stride(), *zs, *out.stride(), *self.B_strides, *self.C_strides,
                self.B_group, self.C_group)


def _n_major(state: torch.Tensor) -> torch.Tensor:
    """A (..., Dm, N) state-shaped tensor as the kernels read it: fp32, (..., N, Dm) contiguous."""
    return state.float().transpose(-1, -2).contiguous()


def _from_n_major(state: torch.Tensor) -> torch.Tensor:
    """A kernel's (..., N, Dm) state-shaped output in the API's (..., Dm, N) layout (contiguous)."""
    return state.transpose(-1, -2).contiguous()


class SelectiveScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, cu_seqlens, output_final_state,
                config, saves):
        """``saves`` False (no backward will run: rnnops._backward_only.needs_backward, decided by the
        caller, since grad mode is off in here): the forward stores no per-chunk states (fp32,
        N x Dm per chunk: a fifth of its bytes at N 16 and 32-step chunks in bfloat16)."""
        # read by every channel at every step: converted once here
        B_, C_ = (_n_major(M) if M.dim() == 2 else M.float() for M in (B, C))
        run = _ScanRun(u, A, B_, C_, cu_seqlens, config)
        A_ = _n_major(A)
        D_, bias_ = (None if x is None else x.contiguous() for x in (D, delta_bias))
        state0 = None if initial_state is None else _n_major(initial_state)
        # (B, T, D)-contiguous whatever u's order: a step's channels stored together (in mamba's
        # (B, D, L) they lie T apart; the gradients below take u's order, which saves autograd a copy)
        out = empty(u.shape, dtype=u.dtype, device=u.device)
        lay = run.layout
        f32 = {"dtype": torch.float32, "device": u.device}
        h = empty((lay.programs, run.N, run.Dm), **f32) if saves else None
        final = empty((lay.sequences, run.N, run.Dm), **f32) if output_final_state else None
        kernels = _kernels()
        segment_states = dt_sums = None
        forward = functools.partial(
            _common.launch, kernels.scan_fwd_kernel, (run.channel_blocks(run.forward_launch), run.programs), u,
            delta, A_, B_, C_, D_, z, bias_, out, h, state0, final)
        launch = dict(HAS_INITIAL=state0 is not None, STORE_FINAL=output_final_state, STORE_STATES=saves,
                      SEGMENTS=run.segments,
                      **run.constants(D, z, delta_bias, softplus), **run.forward_launch)
        if run.segments > 1:  # each segment's end state from zero, then the states entering them
            segment_states = empty((run.programs, run.N, run.Dm), **f32)
            dt_sums = empty((run.programs, run.Dm), **f32)
            forward(segment_states, dt_sums, lay.cu_seqlens, lay.chunk_offsets, *run.strides(u, delta, z, out),
                    PASS=kernels.LOCAL, **launch)
            run.compose_segments(segment_states, dt_sums, A_, state0, final, False, run.forward_launch)
        forward(segment_states, dt_sums, lay.cu_seqlens, lay.chunk_offsets, *run.strides(u, delta, z, out),
                PASS=kernels.OUTPUTS, **launch)
        ctx.save_for_backward(u, delta, A_, B_, C_, D_, z, bias_, h, state0)
        ctx.run, ctx.softplus = run, softplus
        ctx.dtypes = [None if x is None else x.dtype for x in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
        return out, None if final is None else _from_n_major(final)

    @staticmethod
    def backward(ctx, d_out, d_final):
        u, delta, A, B, C, D, z, delta_bias, h, state0 = ctx.saved_tensors
        run = ctx.run
        lay = run.layout
        f32 = {"dtype": torch.float32, "device": u.device}
        rows = run.batch * run.T
        # in their inputs' dtypes, rounded once as the kernel stores them: fp32 buffers cast after
        # took three more passes (B8 T2048 Dm2048 bf16: 0.14 ms of 3.34 f+b, H200)
        # in u's dimension order: (B, T, D) views of mamba's (B, D, L) tensors got (B, T, D)-contiguous
        # gradients, which autograd then copied into the leaves' layout, a pass of its own over each
        # (0.64 ms of the CUDA scan's 3.29 f+b on the H200 at 76b5d92, before it wrote them so); the
        # kernel's stores then lie T apart, as its loads of u, delta and z do (the forward's three
        # such loads cost 0.19 ms of 0.83 there, the copies 0.13 ms each)
        du, d_delta = (empty_in_order_of(u, dtype=x.dtype) for x in (u, delta))
        dz = empty_in_order_of(u, dtype=z.dtype) if z is not None else None
        programs = run.programs
        per_program = (programs, run.N, run.Dm)
        dA = empty(per_program, **f32)
        channel_blocks = run.channel_blocks(run.backward_launch)
        dB = empty(per_program if run.B_mode == 0 else (channel_blocks, rows, run.N), **f32)
        dC = empty(per_program if run.C_mode == 0 else (channel_blocks, rows, run.N), **f32)
        dD = empty((programs, run.Dm), **f32) if D is not None else None
        d_bias = empty((programs, run.Dm), **f32) if delta_bias is not None else None
        d_initial = empty((lay.sequences, run.N, run.Dm), **f32) if state0 is not None else None
        d_final = None if d_final is None else _n_major(d_final)
        d_out = d_out if d_out.stride() == u.stride() else d_out.contiguous()
        kernels, grid = _kernels(), (channel_blocks, programs)
        segment_grads = None
        if run.segments > 1:  # the gradient entering each segment's end
            segment_grads, dt_sums = empty(per_program, **f32), empty((programs, run.Dm), **f32)
            local = {k: v for k, v in run.constants(D, z, delta_bias, ctx.softplus).items() if k != "HAS_D"}
            _common.launch(
                kernels.scan_bwd_local_kernel, grid, u, delta, A, B, C, z, delta_bias, d_out, segment_grads, dt_sums,
                lay.cu_seqlens, lay.chunk_offsets, *run.strides(u, delta, z, d_out), SEGMENTS=run.segments, **local,
                **run.backward_launch)
            run.compose_segments(segment_grads, dt_sums, A, d_final, d_initial, True, run.backward_launch)
        sub_blocks = run.config.chunk // run.backward_launch["UNROLL"]
        checkpoints = empty((channel_blocks * programs * sub_blocks, next_power_of_two(run.N),
                             run.backward_launch["BD"]), **f32)
        _common.launch(
            kernels.scan_bwd_kernel, grid, u, delta, A, B, C, D, z, delta_bias, d_out, h, checkpoints, d_final,
            d_initial, segment_grads, du, d_delta, dz, dA, dB, dC, dD, d_bias, lay.cu_seqlens, lay.chunk_offsets, rows,
            *run.strides(u, delta, z, d_out), *du.stride(), HAS_D_FINAL=d_final is not None,
            STORE_D_INITIAL=state0 is not None, SEGMENTS=run.segments, **run.constants(D, z, delta_bias, ctx.softplus),
            **run.backward_launch)
        grads = [du, d_delta, _from_n_major(dA.sum(0)), _reduce_bc(dB, B, run), _reduce_bc(dC, C, run),
                 None if dD is None else dD.sum(0), dz,
                 None if d_bias is None else d_bias.sum(0), None if d_initial is None else _from_n_major(d_initial)]
        grads = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*grads[:8], None, grads[8], None, None, None, None)


def _reduce_bc(partial: torch.Tensor, M: torch.Tensor, run: _ScanRun) -> torch.Tensor:
    """Sum the per-block (or per-sequence, n-major for a static M) partial gradient of B or C into
    M's shape."""
    if M.dim() == 2:
        return _from_n_major(partial.sum(0))
    if M.dim() == 3:
        return partial.sum(0).view(M.shape)
    groups = M.shape[2]
    per_group = partial.view(groups, -1, *partial.shape[1:]).sum(1)  # blocks are ordered by channel
    return per_group.view(groups, run.batch, run.T, run.N).permute(1, 2, 0, 3)


@register("selective_scan", "triton", supports=supports)
def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *, initial_state, output_final_state,
                   cu_seqlens, config: SelectiveScanConfig | None = None):
    if config is None:
        config = tuned("selective_scan", "triton", selective_scan_shape(u, A), u.dtype, u.device, DEFAULT_CONFIG)
    saves = needs_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return SelectiveScanFunction.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens,
                                       output_final_state, config, saves)


@register("selective_state_update", "triton", supports=step_supports)
def selective_state_update(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, channels = u.shape
    N = A.shape[1]
    B3, C3 = (M if M.dim() == 3 else M[:, None] for M in (B, C))
    out = empty((batch, channels), dtype=u.dtype, device=u.device)
    new_state = empty((batch, channels, N), dtype=torch.float32, device=u.device)
    block = min(64, next_power_of_two(channels))
    _common.launch(
        _kernels().state_update_kernel, (-(-channels // block), batch), state.float().contiguous(), u.contiguous(),
        delta.contiguous(), A.contiguous(), B3.contiguous(), C3.contiguous(), None if D is None else D.contiguous(),
        None if z is None else z.contiguous(), None if delta_bias is None else delta_bias.contiguous(), new_state, out,
        channels // B3.shape[1], channels // C3.shape[1], Dm=channels, N=N, NP=next_power_of_two(N), GB=B3.shape[1],
        GC=C3.shape[1], HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, BD=block)
    return out, new_state
