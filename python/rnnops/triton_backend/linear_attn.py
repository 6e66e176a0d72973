"""Triton linear attention: configuration, search space, autograd Function, registration.

Memory: the forward saves only its inputs (q, k, v, g, initial_state); the backward
recomputes the chunk-local cumulative decay, the per-chunk states (one K x V state per chunk,
in the input dtype) and, for per-key decay, the intra-chunk scores (BT fp32 values per token and head).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from rnnops.autotune.cache import tuned
from rnnops.autotune.hardware import block_shared_memory, sm_registers
from rnnops.autotune.kernels import linear_attn_shape
from rnnops.autotune.space import Constraint, Space, next_power_of_two, powers_of_two

from .._backward_only import outputs_wanted
from .._buffers import empty
from .._dispatch import register
from ._common import (ChunkLayout, chunk_reason, device_reason, dot_precision, dtype_reason, head_dim_reason,
                      join_reasons, launch, register_cap)


@dataclass(frozen=True)
class ChunkConfig:
    """Tile sizes and launch parameters shared by the linear family's kernels (linear attention,
    the delta rule). The chunk size is the op's ``chunk_size`` argument."""

    block_k: int = 64
    block_v: int = 64
    num_warps: int = 8  # at 4 the gated delta rule's UT backward spills with these tiles (compile_check, sm_90)
    num_stages: int = 2
    # the state kernels: one program per (state tile, sequence, head) walks all of its chunks in
    # order, so their time is a chain of dependent steps, shortened by more programs per SM (each
    # hides the others' latency), not by more warps per program (flash-linear-attention's state
    # kernels choose among 2 and 4 warps on Hopper)
    state_num_warps: int = 4
    # and their own pipeline depth: two stages prefetch the next chunk's tiles, but double the
    # shared memory, which caps the programs per SM (the delta rule's states_bwd at the H100's
    # tiles: 116 KB, one program per SM, four waves of its 512; one stage: 32 KB, two per SM by
    # registers, two waves; compile_check): which wins is for measuring (the tuner walks it)
    state_num_stages: int = 2
    # the dq/dk kernel's registers capped so that this many of its programs fit an SM (register_cap;
    # 1: no cap): its time is each program's chain of dependent loads and products, so programs an
    # SM set it (H200, B8 T4096 H16, c34bbff: the scalar decay's at 230 registers and 8 warps, one
    # an SM, 1.128 ms; the ungated one's at 143 and 4 warps, three an SM, 0.395). Linear
    # attention's space offers 1 and 2 since the A/B at f0d91df timed the scalar decay's dq/dk at
    # 64-wide V tiles capped for two at 0.647 ms against the shipped 1.129 (f+b 1.21x); the delta
    # rule's offers 1 (capped for three 0.79x, 8 warps at 64-wide V tiles for two 0.82x: GVA, same
    # run). A cap that spills costs more than it gains: the tuner's compile screen passes over it
    dqk_programs_per_sm: int = 1

    def blocks(self, K: int, V: int) -> tuple[int, int]:
        """Tiles of the chunk-parallel kernels, no larger than the (power-of-two rounded) head dims."""
        return min(self.block_k, next_power_of_two(K)), min(self.block_v, next_power_of_two(V))

    def tile_widths(self, K: int, V: int) -> tuple[int, ...]:
        """Every head-dim tile width the op's kernels take (dot_precision's ``tile_dims``): the chunk
        kernels' and the state kernels' (``state_blocks``, each subclass's)."""
        return self.blocks(K, V) + self.state_blocks(K, V)


@dataclass(frozen=True)
class LinearAttnConfig(ChunkConfig):
    """ChunkConfig plus the state kernels' own tile of the K x V state, apart from the chunk
    kernels' tiles: the state kernels' dot is (state_block_k x chunk) @ (chunk x state_block_v),
    which runs on Hopper's warpgroup tensor cores (wgmma) only when state_block_k is 64 or more
    and the kernel has 4 warps or more (else mma.sync: compile_check shows which), while the
    chunk kernels' best block_k may be 32. Both tiles give one program per (K tile, V tile,
    sequence, head).

    ``fused_forward`` 1: without a per-key decay, the forward runs as one walk per (sequence,
    head, state_block_v tile) over its chunks with all K rows of the state in registers
    (fused_fwd_kernel), writing no per-chunk states (the backward recomputes them either way):
    fewer bytes (the states were the two-pass forward's largest traffic) but sequences x heads x
    V tiles programs walking every chunk in turn, so it pays where those fill the GPU: shipped on
    the H100 from 512 Ki ungated tokens (f+b 1.51x at B8 T4096 H16 K=V=128: 256 walks), off by
    default until measured elsewhere."""

    state_block_k: int = 64
    state_block_v: int = 64
    fused_forward: int = 0
    # grouped q / k heads (GVA, Mamba-2's SSD: GROUP value heads a q / k head): value heads whose dq
    # and dk one dq/dk program sums (a divisor of GROUP), in fp32, before writing them: GROUP /
    # group_heads partial gradients a q / k head written and summed again instead of GROUP (the SSD
    # at B8 T2048 H80: 1.3 GB of its backward's traffic at 1), for that many times fewer programs.
    # 1 until measured (the GPU suite's A/B). A bucket holds grouped calls of any group size: a call
    # whose GROUP it does not divide sums their greatest common divisor
    group_heads: int = 1

    def state_blocks(self, K: int, V: int) -> tuple[int, int]:
        """The state kernels' (K, V) tile, no larger than the (power-of-two rounded) head dims."""
        return min(self.state_block_k, next_power_of_two(K)), min(self.state_block_v, next_power_of_two(V))


DEFAULT_CONFIG = LinearAttnConfig()
# float32 (tf32x3) splits every dot operand in two: 64 x 64 tiles spill up to 1.4 KB per thread
# in dq/dk at K = V = 128, 32 x 32 tiles nothing (compile_check, sm_90); its state kernels keep 8
# warps, which halves their operand registers
FLOAT32_DEFAULT_CONFIG = LinearAttnConfig(block_k=32, block_v=32, state_num_warps=8, state_block_k=32,
                                          state_block_v=32)


def default_config(dtype: torch.dtype, half=DEFAULT_CONFIG, single=FLOAT32_DEFAULT_CONFIG):
    """The configuration without a tuned or shipped entry: ``single`` for float32 inputs."""
    return single if dtype == torch.float32 else half


def chunk_tiles_bytes(block_k: int, block_v: int, stages: int, chunk: int, dtype_bytes: int) -> int:
    """The shared memory a chunk kernel's pipelined q / k / v tiles and the chunk's fp32 scores take,
    by the space's model (an upper bound: e.g. the delta rule's output kernel at 64 x 128 tiles and
    two stages, bf16, 80 KB by ptxas against 112 KB here)."""
    return stages * chunk * (2 * block_k + 2 * block_v) * dtype_bytes + 4 * chunk * chunk


def k_loop_stages(config, block_k: int, block_v: int, chunk: int, dtype_bytes: int, limit: int | None) -> int:
    """The pipeline stages of the output and dv kernels' K loops (and of the delta rule's ut_fwd's K
    and V loops): the configuration's, at least two where two fit a block's shared memory ``limit``
    (chunk_tiles_bytes; None: no limit). The shipped H100 and H200 entries take one stage for the
    chunk kernels (dq/dk and the UT backward spill at two), at which these loaded their tiles one
    after the other; at two they are copied a tile ahead (cp.async) and the kernels hold as many
    registers or fewer (bf16, sm_90, Triton 3.6, the output kernel: the delta rule's 216 -> 178,
    gated 242 -> 180, GLA's 128 -> 109; 48 -> 80 KB, two programs an SM either way)."""
    stages = max(2, config.num_stages)
    if limit is not None and chunk_tiles_bytes(block_k, block_v, stages, chunk, dtype_bytes) > limit:
        return config.num_stages
    return stages


def chunk_space(K: int, V: int, chunk: int, dtype_bytes: int, hardware) -> Space:
    """The legal ChunkConfig values for head dims K, V as integer constraints.

    The register budget is calibrated with rnnops.triton_backend.compile_check (sm_90, K = V = 128,
    chunk 64): with half inputs, at 4 warps the (32, 128), (64, 64) and (32, 64) tiles compile
    without spills in every variant (64 registers per thread by this count), and (64, 128) or
    (128, 64) (96) without in the plain backward but with some in the gated or decayed one
    (Triton 3.6: 100 B in the gated delta rule's dq/dk, 28 B in its UT backward). Measured anyway,
    64 x 128 tiles at 4 warps and one stage beat 8 warps and two stages: the plain delta rule 1.2x
    on an H200 and 1.17x on an H100, the gated one 1.21x and the gated DeltaProduct 1.19x on an
    H100 (f+b, 2026-11-26), so the budget is 96 in every variant; float32's tf32x3 operands take
    twice the registers, so half that. The compile screen checks the ranked few anyway."""
    registers = 96 if dtype_bytes <= 2 else 48
    return Space(
        {"block_k": powers_of_two(16, 128), "block_v": powers_of_two(16, 128), "num_warps": [1, 2, 4, 8],
         "num_stages": [1, 2, 3, 4], "state_num_warps": [2, 4, 8], "state_num_stages": [1, 2, 3],
         "dqk_programs_per_sm": [1]},
        (
            Constraint("block_k <= K rounded up to a power of two", ("block_k",), lambda bk: bk <= next_power_of_two(K)),
            Constraint("block_v <= V rounded up to a power of two", ("block_v",), lambda bv: bv <= next_power_of_two(V)),
            Constraint(f"a (block_k, block_v) and a (chunk, chunk) fp32 tile fit in {registers} registers per thread "
                       "(calibrated with rnnops.triton_backend.compile_check: beyond it the backward spills)",
                       ("block_k", "block_v", "num_warps"),
                       lambda bk, bv, w: bk * bv + chunk * chunk <= registers * hardware.warp_size * w),
            Constraint("pipelined q/k/v tiles and the chunk's scores fit in shared memory",
                       ("block_k", "block_v", "num_stages"),
                       lambda bk, bv, s: chunk_tiles_bytes(bk, bv, s, chunk, dtype_bytes)
                       <= hardware.shared_memory_per_block),
        ),
    )


# the state kernels' fp32 tile per thread (half inputs; float32's tf32x3 operands take half), by
# compile_check (sm_90, K = V = 128, chunk 64, bf16): at 32 (e.g. 64 x 64 at 4 warps) nothing spills
# in any gate mode; at 64 ((128, 64) at 4 warps, (64, 64) at 2) nothing in plain and scalar decay,
# 4-24 B in per-key decay; at 128 ((128, 128) at 4 warps) 0.3-1 KB in every mode
STATE_REGISTERS = 64


def group_heads_choices(group: int) -> list[int]:
    """The group_heads values the space offers for ``group`` value heads a q / k head: one, the
    whole group (the fewest bytes) and the largest power of two dividing it (between: GROUP / it
    dq/dk programs a chunk and K tile of each q / k head). Every divisor would be legal, but the
    space is the product of this with ~27k tile choices: Mamba-2's 80 heads' ten divisors made
    265k configurations, 0.23 s to enumerate and 1.2 s to rank (these three: 80k)."""
    return sorted({1, group, group & -group})


def space(K: int, V: int, chunk: int, dtype_bytes: int, hardware, group: int = 1) -> Space:
    """The legal LinearAttnConfig values: chunk_space, the state tile (STATE_REGISTERS), the
    value heads a dq/dk program sums (group_heads_choices of ``group``, the value heads a q / k head)
    and the dq/dk programs an SM its registers are capped for (1, no cap, or 2)."""
    base = chunk_space(K, V, chunk, dtype_bytes, hardware)
    registers = STATE_REGISTERS if dtype_bytes <= 2 else STATE_REGISTERS // 2
    return Space(
        dict(base.variables, state_block_k=powers_of_two(16, 128), state_block_v=powers_of_two(16, 128),
             fused_forward=[0, 1], group_heads=group_heads_choices(group), dqk_programs_per_sm=[1, 2]),
        base.constraints + (
            Constraint("state_block_k <= K rounded up to a power of two", ("state_block_k",),
                       lambda bk: bk <= next_power_of_two(K)),
            Constraint("state_block_v <= V rounded up to a power of two", ("state_block_v",),
                       lambda bv: bv <= next_power_of_two(V)),
            Constraint(f"the fp32 state tile fits in {registers} registers per thread",
                       ("state_block_k", "state_block_v", "state_num_warps"),
                       lambda bk, bv, w: bk * bv <= registers * hardware.warp_size * w),
            Constraint("the pipelined chunk tiles of k and v (or q and do) fit in shared memory",
                       ("state_block_k", "state_block_v", "state_num_stages"),
                       lambda bk, bv, s: s * chunk * (bk + bv) * dtype_bytes <= hardware.shared_memory_per_block),
            Constraint(f"fused_forward: the fp32 state of all K rows fits in {registers} registers per thread, and "
                       "the pipelined q, k and v chunk tiles in shared memory",
                       ("state_block_v", "state_num_warps", "state_num_stages", "fused_forward"),
                       lambda bv, w, s, f: not f or (next_power_of_two(K) * bv <= registers * hardware.warp_size * w
                                                     and s * chunk * (2 * next_power_of_two(K) + bv) * dtype_bytes
                                                     <= hardware.shared_memory_per_block)),
        ),
    )


def supports(*, dtype, device, head_dims=None, chunk_size=None, **_) -> str | None:
    """Why these inputs cannot take the Triton kernels (None if they can)."""
    reasons = [dtype_reason(dtype), device_reason(device)]
    if head_dims is not None:
        reasons += [head_dim_reason(name, size) for name, size in zip(("K", "V"), head_dims)]
    if chunk_size is not None:
        reasons.append(chunk_reason(chunk_size))
    return join_reasons(*reasons)


def _kernels():
    from rnnops.triton_kernels import linear_attn as kernels

    return kernels


def factored_span_limit(dtype: torch.dtype) -> float:
    """The largest decay span (max over keys of G_first - G_last in a chunk) for which GLA's
    intra-chunk kernels factor every pair of the chunk around its first token, in one product,
    instead of by exact sub-chunks: its dot operands are keys times up to e^span and queries
    times down to e^-span in the input dtype. float16 (largest 65504) keeps keys up to about 1200
    in range at e^4; bfloat16 and float32 (largest 3.4e38, smallest normal 1.2e-38) any key up
    to 1e25 at e^30. Gates as GLA trains them (log-sigmoid over a temperature of 16: about -0.04
    a step) span about 3 over 64 tokens."""
    return 4.0 if dtype == torch.float16 else 30.0


class ChunkedRun:
    """Shapes, packed-sequence layout and launch parameters of one call, and the launches of the
    linear-attention kernels; shared by forward and backward, and by the delta rule (which
    reuses the cumulative decay, output and dq/dk kernels on its pseudo-values)."""

    def __init__(self, q, v, g, cu_seqlens, chunk, scale, config, v_scale=None, skip=None, steps=1):
        """``config``: a ChunkConfig with a ``state_blocks(K, V)`` method (the state kernels' tile);
        linear attention only: ``v_scale`` None or the per-token value scale (B, T, H), ``skip``
        None or the (H, V) weights of o += skip * v. ``steps`` > 1: DeltaProduct's Householder
        steps a token: k, v (B, T * steps, ...) interleaved, and ``cu_seqlens`` in those rows, but
        q, g, o and their gradients (B, T, ...) once a token (the kernels' token_rows; g decays
        each token's first step)."""
        kernels = _kernels()
        self.B, self.T, self.H, self.V = v.shape  # T: the kernels' rows a sequence (steps a token)
        self.steps = steps
        self.K = q.shape[-1]
        self.group = self.H // q.shape[2]  # value heads per q / k head
        self.v_scale = None if v_scale is None else self.flat(v_scale).float()  # (B*T, H) float32
        self.skip = None if skip is None else skip.float().contiguous()  # (H, V) float32
        self.gate = kernels.NO_GATE if g is None else (kernels.SCALAR_GATE if g.dim() == 3 else kernels.KEY_GATE)
        self.g_dtype = None if g is None else g.dtype
        self.chunk, self.scale, self.config = chunk, scale, config
        self.BK, self.BV = config.blocks(self.K, self.V)
        self.SBK, self.SBV = config.state_blocks(self.K, self.V)
        self.layout = ChunkLayout.build(self.B, self.T, chunk, cu_seqlens, q.device)
        self.precision = dot_precision(q.dtype, tile_dims=config.tile_widths(self.K, self.V))
        # what goes from kernel to kernel (the chunk states h, their gradients dh; the delta rule's
        # dV_new, dW and the UT inverse T) is stored in the input dtype: for half inputs every kernel
        # that reads it rounds it to half for its dot products anyway, so this halves the largest
        # traffic (only the gated dg's rowsum(S * dS) and the UT backward's dL, a float32 product,
        # read rounded values where they read float32 before); float32 inputs keep float32 throughout
        self.stored_dtype = q.dtype
        self.launch = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        self.k_loop_stages = k_loop_stages(config, self.BK, self.BV, chunk, q.dtype.itemsize,
                                           block_shared_memory(q.device))
        self.dqk_launch = dict(self.launch, **register_cap(config.dqk_programs_per_sm, config.num_warps,
                                                           sm_registers(q.device)))
        self.state_launch = {"num_warps": config.state_num_warps, "num_stages": config.state_num_stages}
        # GLA's kernels built on 16 x 16 sub-chunks: more than 4 warps only add registers
        # (compile_check, sm_90, bf16: they spill at 8, and at 2 too). (The delta rule's UT inverse,
        # also on 16 x 16 blocks, has its own: DeltaRuleConfig.inverse_num_warps)
        self.sub_chunk_launch = dict(self.launch, num_warps=min(config.num_warps, 4))
        # GLA's intra-chunk kernels, each launched for the chunks it factors whole and for the
        # others (the 16 x 16 sub-chunks: at most 4 warps). Factored, the scores at 4 warps too
        # (SASS sm_90 bf16: 7.7k warp instructions a chunk against 11.7k at 8, two programs an SM
        # either way), the gradients at the configuration's (8: 128 registers, two an SM; 4: 222)
        self.KP = next_power_of_two(self.K)  # K rounded up: the kernels that hold all of K at once
        self.per_key = {"KP": self.KP, "SPAN_LIMIT": factored_span_limit(q.dtype), "BC": kernels.SUB_CHUNK}
        self.common = {"H": self.H, "GROUP": self.group, "K": self.K, "GATE": self.gate, "PRECISION": self.precision,
                       "BT": chunk}
        # the fused forward, dv and delta-rule state backward kernels' query tile (_packed.query_rows):
        # a chunk's ceil(chunk / steps) queries, a power of two and at least 16 for the tensor cores
        self.QT = chunk if steps == 1 else max(16, next_power_of_two(-(-chunk // steps)))
        self.cu_seqlens = cu_seqlens

    @functools.cached_property
    def output_layout(self) -> ChunkLayout:
        """The output kernel's chunks: ``layout``'s, or DeltaProduct's of ``chunk`` tokens, ``steps``
        row-chunks each (query tiles of ``chunk`` rows, as the delta rule's; its forward's state walk
        stores the states of these alone, 1 / steps of the row-chunks' K x V states)."""
        if self.steps == 1:
            return self.layout
        return ChunkLayout.build(self.B, self.T, self.chunk * self.steps, self.cu_seqlens,
                                 self.layout.cu_seqlens.device)

    @property
    def k_tiles(self) -> int:
        return -(-self.K // self.BK)

    @property
    def v_tiles(self) -> int:
        return -(-self.V // self.BV)

    def state_grid(self) -> tuple[int, int, int]:
        """Linear attention's state kernels: one program per (K tile, V tile, sequence x head)."""
        return -(-self.K // self.SBK), -(-self.V // self.SBV), self.layout.sequences * self.H

    def flat(self, x):
        """(B, T, H, ...) -> contiguous (B*T, H, ...)."""
        return None if x is None else x.reshape((-1,) + x.shape[2:]).contiguous()

    def cumulative_decay(self, g):
        """G, float32, (rows, H) or (rows, H, K): g's cumulative sum within each chunk (per row of
        the kernels: a DeltaProduct's g once a token, on its first step)."""
        return None if g is None else self._cumulative_decays(g, self.layout)[0]

    def forward_decays(self, g):
        """(G, the cumulative decay the output kernel takes): G twice, or for DeltaProduct's token
        chunks (``output_layout``, steps row chunks each) g's within those besides, one launch."""
        if g is None:
            return None, None
        if self.steps == 1:
            G = self.cumulative_decay(g)
            return G, G
        G_out, G = self._cumulative_decays(g, self.output_layout)
        return G, G_out

    def _cumulative_decays(self, g, lay):
        """cumsum_kernel over ``lay``'s chunks: (G within them, G within each chunk of rows; None
        where they are the same chunks)."""
        tiles = 1 if lay is self.layout else self.steps
        shape = (lay.total_rows,) + g.shape[1:]
        G = empty(shape, dtype=torch.float32, device=g.device)
        G_rows = empty(shape, dtype=torch.float32, device=g.device) if tiles > 1 else None
        launch(
            _kernels().cumsum_kernel, (lay.programs, self.H),
            g, G, G_rows, lay.chunk_indices, lay.cu_seqlens, H=self.H, K=self.K, GATE=self.gate,
            STEPS=self.steps, TILES=tiles, BT=self.chunk, BK=self.BK, **self.launch)
        return G, G_rows

    def token_gradient(self, dG):
        """The gradient of a per-token g from the per-row ``dG`` (rows, H): its first step's."""
        return dG if dG is None or self.steps == 1 else dG.view((-1, self.steps) + dG.shape[1:])[:, 0]

    def intra_scores(self, q, k, G):
        if self.gate != _kernels().KEY_GATE:
            return None
        A = empty((q.shape[0], self.H, self.chunk), dtype=torch.float32, device=q.device)
        for factored in (True, False):
            launch(
                _kernels().intra_scores_kernel, (self.layout.programs, self.H),
                q, k, G, A, self.layout.chunk_indices, self.layout.cu_seqlens, H=self.H, GROUP=self.group, K=self.K,
                PRECISION=self.precision, BT=self.chunk, BK=self.BK, FACTORED=factored, **self.per_key,
                **self.sub_chunk_launch)
        return A

    def states(self, k, v, G, initial_state, store_final):
        lay = self.layout
        h = empty((lay.programs, self.H, self.K, self.V), dtype=self.stored_dtype, device=k.device)
        final = self.final_state(k.device) if store_final else None
        launch(
            _kernels().states_fwd_kernel, self.state_grid(),
            k, v, self.v_scale, G, h, initial_state, final, lay.chunk_offsets, lay.cu_seqlens, V=self.V,
            HAS_VSCALE=self.v_scale is not None, HAS_INITIAL=initial_state is not None, STORE_FINAL=store_final,
            BK=self.SBK, BV=self.SBV, **self.common, **self.state_launch)
        return h, final

    def fused_forward(self, q, k, v, G, initial_state, store_final, W=None):
        """(o, final state) in one walk over each sequence's chunks per head and V tile
        (fused_fwd_kernel; no per-key decay). With ``W`` (the delta rule), ``v`` is its U and each
        chunk's values are U - W S_in."""
        lay = self.layout
        o = empty(self.per_token(q, v), dtype=v.dtype, device=v.device)
        final = self.final_state(v.device) if store_final else None
        launch(
            _kernels().fused_fwd_kernel, (-(-self.V // self.SBV), lay.sequences * self.H),
            q, k, v, self.v_scale, self.skip, W, G, o, initial_state, final, lay.chunk_offsets, lay.cu_seqlens,
            self.scale, V=self.V, HAS_VSCALE=self.v_scale is not None, HAS_SKIP=self.skip is not None,
            HAS_INITIAL=initial_state is not None,
            STORE_FINAL=store_final, DELTA=W is not None, STEPS=self.steps, QT=self.QT, KP=self.KP, BV=self.SBV,
            **self.common,
            **self.state_launch)
        return o, final

    def output(self, q, k, v, G, A, h):
        """o from the chunk states ``h`` and cumulative decay ``G`` of ``output_layout``'s chunks."""
        o = empty(self.per_token(q, v), dtype=v.dtype, device=v.device)
        lay = self.output_layout
        launch(
            _kernels().output_kernel, (self.v_tiles, lay.programs, self.H),
            q, k, v, self.v_scale, self.skip, G, A, h, o, lay.chunk_indices, lay.cu_seqlens, self.scale, V=self.V,
            HAS_VSCALE=self.v_scale is not None, HAS_SKIP=self.skip is not None, STEPS=self.steps,
            KEY_TILES=self.steps, K_STAGES=self.k_loop_stages, QT=self.chunk, BK=self.BK, BV=self.BV,
            **self.common, **self.launch)
        return o

    def states_backward(self, q, do, G, d_final, initial_state):
        lay = self.layout
        dh = empty((lay.programs, self.H, self.K, self.V), dtype=self.stored_dtype, device=q.device)
        d_initial = None if initial_state is None else empty(initial_state.shape, dtype=torch.float32, device=q.device)
        launch(
            _kernels().states_bwd_kernel, self.state_grid(),
            q, do, G, dh, None if d_final is None else d_final.float().contiguous(), d_initial, lay.chunk_offsets,
            lay.cu_seqlens, self.scale, V=self.V, HAS_D_FINAL=d_final is not None,
            STORE_D_INITIAL=initial_state is not None, BK=self.SBK, BV=self.SBV, **self.common, **self.state_launch)
        return dh, d_initial

    def intra_gradients(self, q, k, v, G, do):
        """Per-key decay: the intra-chunk parts of dq and dk but the diagonal's (fp32) and dA, whose
        diagonal dqk_kernel takes; else (None, None, None)."""
        kernels, lay = _kernels(), self.layout
        if self.gate != kernels.KEY_GATE:
            return None, None, None
        dA = empty((q.shape[0], self.H, self.chunk), dtype=torch.float32, device=q.device)
        launch(
            kernels.d_scores_kernel, (lay.programs, self.H),
            do, v, self.v_scale, dA, lay.chunk_indices, lay.cu_seqlens, self.scale, H=self.H, V=self.V,
            HAS_VSCALE=self.v_scale is not None, PRECISION=self.precision, BT=self.chunk, BV=self.BV, **self.launch)
        dq_intra, dk_intra = (empty(self.per_value_head(q), dtype=torch.float32, device=q.device) for _ in range(2))
        for factored, warps in ((True, self.launch), (False, self.sub_chunk_launch)):
            launch(
                kernels.intra_dqk_kernel, (lay.programs, self.H),
                q, k, G, dA, dq_intra, dk_intra, lay.chunk_indices, lay.cu_seqlens, H=self.H, GROUP=self.group,
                K=self.K, PRECISION=self.precision, BT=self.chunk, BK=self.BK, FACTORED=factored, **self.per_key,
                **warps)
        return dq_intra, dk_intra, dA

    def dqk(self, q, k, v, G, h, dh, do, intra=(None, None, None), dv2=None, heads=1):
        """dq (q's dtype), dk, and for gated runs dG, linear attention's reverse-cumulated dg: a
        per-key decay's in g's dtype (rounded once from fp32, as a conversion after would: at B8
        T4096 H16 K128 bf16 its 268 MB fp32 buffer and the conversion's pass cost 0.5 GB of
        traffic), a scalar decay's per K tile in fp32 (the caller sums them). With the delta rule's
        dv2, also dW, and dk (k's dtype) and dG (fp32) partial: the UT backward adds its terms to dk
        in fp32 and rounds it once more (half inputs: fla's chunk_bwd_dqkwg too writes dk in k's
        dtype; a float32 partial cost 268 MB more traffic at B8 T4096 H16 K128, for dk's relative
        error 7.7e-4 against 7.3e-4 in float16, the delta rule's other gradients' 6.3-7.1e-4,
        interpreter, B1 T192 H2 K=V=64). dq and dk are per value head, or summed over each
        ``heads`` value heads of a group (linear attention: LinearAttnConfig.group_heads),
        (B*T, H / heads, K): group_sum adds up a group's."""
        kernels, lay = _kernels(), self.layout
        delta = dv2 is not None
        dq = empty(self.per_value_head(q, heads), dtype=q.dtype, device=q.device)
        dk = empty(self.per_value_head(k, heads), dtype=k.dtype, device=k.device)
        dW = empty(self.per_value_head(k), dtype=self.stored_dtype, device=k.device) if delta else None
        dG = None
        if self.gate == kernels.KEY_GATE:  # dg itself (reverse-cumulated in fp32), in g's dtype
            dG = empty((lay.total_rows, self.H, self.K), dtype=self.g_dtype, device=q.device)
        elif self.gate == kernels.SCALAR_GATE:
            dG = empty((self.k_tiles, lay.total_rows, self.H), dtype=torch.float32, device=q.device)
        launch(
            kernels.dqk_kernel, (self.k_tiles, lay.programs, self.H // heads),
            q, k, v, self.v_scale, G, h, dh, do, *intra, dv2, dq, dk, dW, dG, lay.chunk_indices,
            lay.cu_seqlens, self.scale, lay.total_rows, V=self.V, HAS_VSCALE=self.v_scale is not None, DELTA=delta,
            STEPS=self.steps, HEADS=heads, TWO_WALKS=not delta and self.gate == kernels.NO_GATE, BK=self.BK,
            BV=self.BV, **self.common, **self.dqk_launch)
        return dq, dk, dW, dG

    def dv(self, q, k, G, A, dh, do, v=None):
        """(dv in do's dtype, d v_scale (B*T, H) and d skip (H, V) in float32, each None where not
        given); with dh None only the intra-chunk term. ``v`` (needed with a value scale or a
        skip): the values as given."""
        lay = self.layout
        dv = empty((lay.total_rows, self.H, self.V), dtype=do.dtype, device=do.device)
        d_scale = d_skip = None
        if self.v_scale is not None:  # a part per V tile, summed here
            d_scale = empty((self.v_tiles, lay.total_rows, self.H), dtype=torch.float32, device=do.device)
        if self.skip is not None:  # a part per chunk program (zeros for the programs past the chunks), summed here
            d_skip = torch.zeros((lay.programs, self.H, self.V), dtype=torch.float32, device=do.device)
        launch(
            _kernels().dv_kernel, (self.v_tiles, lay.programs, self.H),
            q, k, v, self.v_scale, self.skip, G, A, dh, do, dv, d_scale, d_skip, lay.chunk_indices, lay.cu_seqlens,
            self.scale, lay.total_rows, V=self.V, HAS_VSCALE=self.v_scale is not None, HAS_SKIP=self.skip is not None,
            HAS_DH=dh is not None, STEPS=self.steps, K_STAGES=self.k_loop_stages, QT=self.QT, BK=self.BK,
            BV=self.BV, **self.common, **self.launch)
        return dv, None if d_scale is None else d_scale.sum(0), None if d_skip is None else d_skip.sum(0)

    def per_value_head(self, x, heads=1) -> tuple[int, ...]:
        """The shape of a gradient of q or k as the kernels write it: (B*T, H / heads, K), one per
        value head or per ``heads`` of them (dqk)."""
        return (x.shape[0], self.H // heads) + tuple(x.shape[2:])

    def per_token(self, q, v) -> tuple[int, ...]:
        """The shape of the output: q's rows (B*T, once a token) by v's heads and V."""
        return (q.shape[0],) + tuple(v.shape[1:])

    def group_sum(self, dx, dtype):
        """(B*T, H / heads, K) parts of a group (per value head, or per ``heads`` of them: dqk) ->
        (B*T, H / group, K) in ``dtype``: each q / k head's gradient, summed in float32 (the parts
        come in the input dtype: half the traffic of float32 ones; each is rounded once, as an
        ungrouped head's gradient is)."""
        qk_heads = self.H // self.group
        parts = dx.shape[1] // qk_heads
        if parts > 1:
            dx = dx.view(dx.shape[0], qk_heads, parts, dx.shape[-1]).sum(2, dtype=torch.float32)
        return dx.to(dtype)

    def final_state(self, device):
        """An output buffer for the final states: (sequences, H, K, V) float32."""
        return empty((self.layout.sequences, self.H, self.K, self.V), dtype=torch.float32, device=device)

    def unread_outputs(self, q, v, output_final_state: bool):
        """(o, final state) of the right shapes, never written (rnnops._backward_only)."""
        final = self.final_state(v.device) if output_final_state else None
        return empty(q.shape[:2] + v.shape[2:], dtype=v.dtype, device=v.device), final

    def unflat(self, x, dtype=None):
        """(B*T, H, ...) -> (B, T, H, ...), optionally cast."""
        if x is None:
            return None
        x = x.view((self.B, -1) + x.shape[1:])
        return x if dtype is None else x.to(dtype)


class LinearAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, v_scale, skip, initial_state, scale, cu_seqlens, chunk, output_final_state, config):
        run = ChunkedRun(q, v, g, cu_seqlens, chunk, scale, config, v_scale, skip)
        qf, kf, vf, gf = (run.flat(x) for x in (q, k, v, g))
        state0 = None if initial_state is None else initial_state.float().contiguous()
        ctx.save_for_backward(qf, kf, vf, gf, state0)
        ctx.run = run
        ctx.dtypes = tuple(None if x is None else x.dtype for x in (g, v_scale, skip, initial_state))
        if not outputs_wanted():
            return run.unread_outputs(q, v, output_final_state)
        G = run.cumulative_decay(gf)
        if config.fused_forward and run.gate != _kernels().KEY_GATE:
            o, final = run.fused_forward(qf, kf, vf, G, state0, output_final_state)
        else:
            h, final = run.states(kf, vf, G, state0, output_final_state)
            o = run.output(qf, kf, vf, G, run.intra_scores(qf, kf, G), h)
        return run.unflat(o), final

    @staticmethod
    def backward(ctx, do, d_final):
        qf, kf, vf, gf, state0 = ctx.saved_tensors
        run = ctx.run
        do = run.flat(do)
        G = run.cumulative_decay(gf)
        A = run.intra_scores(qf, kf, G)
        h, _ = run.states(kf, vf, G, state0, store_final=False)
        dh, d_initial = run.states_backward(qf, do, G, d_final, state0)
        dq, dk, _, dG = run.dqk(qf, kf, vf, G, h, dh, do, run.intra_gradients(qf, kf, vf, G, do),
                                heads=math.gcd(run.config.group_heads, run.group))
        dv, d_scale, d_skip = run.dv(qf, kf, G, A, dh, do, vf)
        dg = None if dG is None else (dG if run.gate == _kernels().KEY_GATE else dG.sum(0))
        g_dtype, scale_dtype, skip_dtype, initial_dtype = ctx.dtypes
        return (run.unflat(run.group_sum(dq, qf.dtype)), run.unflat(run.group_sum(dk, kf.dtype)), run.unflat(dv),
                run.unflat(dg, g_dtype), run.unflat(d_scale, scale_dtype),
                None if d_skip is None else d_skip.to(skip_dtype),
                None if d_initial is None else d_initial.to(initial_dtype), None, None, None, None, None)


@register("linear_attn", "triton", supports=supports)
def linear_attn(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size, v_scale=None,
                skip=None, config: LinearAttnConfig | None = None):
    """``v_scale`` (B, T, H): v used as v_scale * v, applied inside the kernels (a row factor of
    each v tile it multiplies; the backward's dv kernel also returns its gradient); ``skip`` (H, V):
    o += skip * v in the output kernels (dv and d skip from the dv kernel)."""
    if config is None:
        config = tuned("linear_attn", "triton", linear_attn_shape(q, v, g), q.dtype, q.device,
                       default_config(q.dtype))
    return LinearAttnFunction.apply(q, k, v, g, v_scale, skip, initial_state, scale, cu_seqlens, chunk_size,
                                    output_final_state, config)
