"""Triton delta rule and DeltaProduct: configuration, search space, autograd Function.

The forward runs the UT transform, the chunk-state loop (which also yields the pseudo-values
V_new) and linear attention's output kernel on V_new, or with ``fused_forward`` the UT transform
and one walk that computes V_new and the outputs (linear attention's fused_fwd_kernel); the
backward runs the state loop backwards, linear attention's dq/dk kernel on V_new, and the UT
transform's backward.
Memory: the inputs and the UT inverses T (chunk values per token and head, input dtype: a
sixth more than q, k, v at K = V = 128) are saved, so the backward skips the inverse; W, U
(K + V values per token and head), the chunk states (one K x V state per chunk, input dtype)
and V_new are recomputed in the backward.
DeltaProduct (n_h Householder steps a token) runs the same kernels over the steps as rows: k, v
and beta interleaved by a reshape, while q, g, o and their gradients stay once a token; the
kernels read and write those only on each token's last step (g on its first), so nothing is
padded with zeros on the host and o is written once a token (triton_kernels._packed.token_rows).
Its forward's output kernel takes chunks of ``chunk_size`` tokens (n_h row-chunks: ChunkedRun's
``output_layout``), the chunk states of those alone, and their own cumulative decay; the backward
keeps every row-chunk's state (dW = -dV_new S_in^T needs each).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rnnops.autotune.cache import tuned
from rnnops.autotune.kernels import delta_rule_shape
from rnnops.autotune.space import Constraint, Space, next_power_of_two, powers_of_two

from .._backward_only import outputs_wanted
from .._buffers import empty
from .._delta_product import interleave, step_offsets
from .._dispatch import register
from ._common import dot_precision, launch
from .linear_attn import ChunkConfig, ChunkedRun, chunk_space, default_config, supports


@dataclass(frozen=True)
class DeltaRuleConfig(ChunkConfig):
    """ChunkConfig plus the V tiles of the state loops, which hold all of K (rounded up to a
    power of two: V_new = U - W S_in reduces over the whole of K) times ``state_block_v``
    (forward) or ``state_backward_block_v`` (backward) columns of the state in registers."""

    state_block_v: int = 32
    # the backward walk's (states_bwd_kernel) V tile, apart from the forward's: at B8 H16, K = V =
    # 128 on an H200 (Triton 3.6, bf16, 2 stages) the forward walk takes 80 KB of shared memory at
    # 32 columns (two programs an SM: its 512 walks in two waves) and 96 KB at 64 (256 walks, one
    # wave), while the backward's 108 KB at 32 and 120 KB at 64 keep two waves either way (two an
    # SM at 32, one at 64), so 64 halves the forward's waves and only doubles the backward's work
    # a walk. flash-linear-attention's own autotuning on the H200 picked 64 for its forward walk,
    # 64 or 32 for its backward (ungated / gated). Which wins is for measuring (the GPU suite's A/B)
    state_backward_block_v: int = 32
    # and its own pipeline depth (state_num_stages: the forward walk's): flash-linear-attention's
    # backward walk at 32 columns and 4 warps took 0.347 ms at three stages and 0.573 at two on an
    # H200 (its autotuning records, B8 T4096 H16 K=V=128), one program an SM either way, while
    # its forward walk took the same at two, three or four. At three the walk takes q's tiles as
    # pipelined and applies the scale to their product (FOLD_SCALE off: 534 SASS instructions a
    # chunk, 114 registers, 168 KB, where folding the scale into q took 727, 152, 160 KB, one
    # program an SM either way); at one or two it folds the scale into q for half inputs, which
    # keeps q's tiles out of the pipeline (two stages, 32 columns: 108 KB against 116, two programs
    # an SM instead of one; bf16, sm_90, Triton 3.6, the H200's tiles). Which wins is for measuring
    # (the GPU suite's A/B; the tuner searches it, doubling the space on Hopper: 35208 legal on an H100)
    state_backward_num_stages: int = 2
    # 1: the forward's state walk also computes the outputs (linear_attn's fused_fwd_kernel with
    # DELTA: V_new = U - W S_in in the walk), writing neither the chunk states nor V_new, which
    # the backward recomputes either way; the two-pass forward's states and V_new were about a
    # third of its traffic (B8 T4096 H16 K=V=128: 268 + 134 MB written, read again by the output
    # kernel). Off until measured (the GPU suite's A/B).
    fused_forward: int = 0
    # warps of the UT inverse (ut_inverse_kernel), a latency-bound chain of 15 substitution steps
    # over the chunk's 16 x 16 diagonal blocks. At 4 warps, a diagonal block a warp, a step's sums
    # stay within warps: 2128 SASS instructions, 10 block barriers in all (the products' staging;
    # 128 registers gated, four programs an SM); at 8, 1856 and 13 (128 registers, two an SM), its
    # BT^3 products split into 64 x 32 halves over two warpgroups; at 2, 5072 and 71 (218
    # registers) (bf16, sm_90, Triton 3.6, the H200's tiles). flash-linear-attention's fused
    # k k^T + inverse kernel chose 1 warp of its 1, 2 and 4 on the H200 and ran 23 ns a chunk and
    # head against our inverse's 41 at 4 (its autotuning record, B8 T4096 H32; ours 4e23ac8, H16,
    # when a step took 5 barriers). Which of 4 and 8 wins is for measuring (the GPU suite's A/B;
    # the space offers 4 alone until then)
    inverse_num_warps: int = 4

    def state_blocks(self, K: int, V: int) -> tuple[int, int]:
        """The forward state walk's (K, V) tile: all of K, state_block_v of V (both powers of two)."""
        return next_power_of_two(K), min(self.state_block_v, next_power_of_two(V))

    def backward_state_block_v(self, V: int) -> int:
        """The backward state walk's V tile (its K tile: all of K, as the forward's)."""
        return min(self.state_backward_block_v, next_power_of_two(V))

    def tile_widths(self, K: int, V: int) -> tuple[int, ...]:
        return super().tile_widths(K, V) + (self.backward_state_block_v(V),)

    def backward_state_launch(self) -> dict:
        """The backward state walk's warps and pipeline stages."""
        return {"num_warps": self.state_num_warps, "num_stages": self.state_backward_num_stages}


DEFAULT_CONFIG = DeltaRuleConfig()
# float32: dq/dk spills 56 B instead of 2 KB, the UT backward 1.4 KB instead of 2.3 KB (sm_90); the
# state kernels still spill ~1-2 KB whatever the tiles (full-K tf32x3 operands)
FLOAT32_DEFAULT_CONFIG = DeltaRuleConfig(block_k=32, block_v=32, state_num_warps=8)


def space(K: int, V: int, chunk: int, dtype_bytes: int, hardware) -> Space:
    """The legal DeltaRuleConfig values: chunk_space and the state kernels'."""
    base = chunk_space(K, V, chunk, dtype_bytes, hardware)

    def walk_tile(columns: str) -> tuple[Constraint, ...]:
        """A state walk's V tile (``columns``, the forward's or the backward's variable)."""
        return (Constraint(f"{columns} <= V rounded up to a power of two", (columns,),
                           lambda bv: bv <= next_power_of_two(V)),
                Constraint(f"the full-K fp32 state tile of {columns} columns fits in 128 registers per thread",
                           (columns, "state_num_warps"),
                           lambda bv, w: next_power_of_two(K) * bv <= 128 * hardware.warp_size * w))

    return Space(
        dict(base.variables, state_block_v=powers_of_two(16, 64), state_backward_block_v=powers_of_two(16, 64),
             state_backward_num_stages=[1, 2, 3], fused_forward=[0, 1],
             # 4 alone until an A/B measures 8 (DeltaRuleConfig.inverse_num_warps): both would double
             # every GPU's space, the A100's to 141372 configurations, 137 ms to enumerate
             inverse_num_warps=[4]),
        base.constraints + walk_tile("state_block_v") + walk_tile("state_backward_block_v") + (
            Constraint("fused_forward: the pipelined q, k, W and U chunk tiles fit in shared memory",
                       ("state_block_v", "state_num_stages", "fused_forward"),
                       lambda bv, s, f: not f or s * chunk * (3 * next_power_of_two(K) + bv) * dtype_bytes
                       <= hardware.shared_memory_per_block),
            Constraint("Hopper: the state kernels pipeline two stages or more (Triton 3.6 compiles "
                       "states_fwd_kernel at one stage into wgmma reads past its shared memory: an illegal "
                       "memory access, compute-sanitizer on an H200, 2026-11-26)",
                       ("state_num_stages", "state_backward_num_stages"),
                       lambda s, sb: hardware.compute_capability[0] != 9 or min(s, sb) >= 2),
        ),
    )


def _kernels():
    from rnnops.triton_kernels import delta_rule as kernels

    return kernels


class _DeltaRun(ChunkedRun):
    def __init__(self, q, v, g, cu_seqlens, chunk, scale, config: DeltaRuleConfig, steps):
        super().__init__(q, v, g, cu_seqlens, chunk, scale, config, steps=steps)
        # the UT backward holds T^T dU (chunk x V tile, fp32) beside its chunk x chunk matrices:
        # V tiles wider than 64 spill there (compile_check, sm_90, bf16 at chunk 64)
        self.UT_BV = min(self.BV, 64)
        self.delta = {"H": self.H, "GROUP": self.group, "K": self.K, "V": self.V, "GATED": g is not None,
                      "PRECISION": self.precision, "BT": chunk}
        # the chunk x chunk x chunk products (the UT inverse's substitution, the backward's dL)
        # have no head-dim tile, so 16-wide heads' "ieee" is not theirs: with it they ran on CUDA
        # cores and spilled ~9 KB a thread (float32, K = 16, sm_90, Triton 3.6: ut_inverse 34.5 KB
        # of spill stores, and the launch failed with out of memory on an H100, 2026-11-26)
        self.chunk_precision = dot_precision(q.dtype)

    def ut(self, k, v, beta, G, T=None):
        """(W, U, T): T = the chunks' UT-transform inverses, (rows, H, chunk) in the input dtype,
        computed unless given (the forward's, saved for the backward), ungated with W and U in the
        same kernel (ut_inverse_kernel's APPLY)."""
        lay = self.layout
        W = empty(self.per_value_head(k), dtype=k.dtype, device=k.device)
        U = empty(v.shape, dtype=v.dtype, device=v.device)
        applied = False
        if T is None:
            T = empty((k.shape[0], self.H, self.chunk), dtype=self.stored_dtype, device=k.device)
            applied = not self.delta["GATED"]
            # its W and U take V tiles of at most 64 (UT_BV): at 128 the kernel took 188 registers, not
            # the inverse's 128 (bf16, sm_90, Triton 3.6)
            launch(
                _kernels().ut_inverse_kernel, (lay.programs, self.H),
                k, v, beta, G, T, W, U, lay.chunk_indices, lay.cu_seqlens, CHUNK_PRECISION=self.chunk_precision,
                APPLY=applied, STAGES=self.config.num_stages, BK=self.BK, BV=self.UT_BV, **self.delta,
                **dict(self.launch, num_warps=self.config.inverse_num_warps))
        if not applied:
            launch(
                _kernels().ut_fwd_kernel, (lay.programs, self.H),
                k, v, beta, G, T, W, U, lay.chunk_indices, lay.cu_seqlens, STAGES=self.k_loop_stages, BK=self.BK,
                BV=self.BV, **self.delta, **self.launch)
        return W, U, T

    def delta_states(self, k, W, U, G, initial_state, store_final, for_output=False):
        """(h, V_new, final state): h the chunk states, S_in of every chunk, or ``for_output`` of
        every chunk of ``output_layout`` (DeltaProduct: a token chunk's)."""
        lay = self.layout
        states = self.output_layout if for_output else lay
        h = empty((states.programs, self.H, self.K, self.V), dtype=self.stored_dtype, device=k.device)
        v_new = empty(U.shape, dtype=U.dtype, device=U.device)
        final = self.final_state(k.device) if store_final else None
        launch(
            _kernels().states_fwd_kernel, (-(-self.V // self.SBV), lay.sequences * self.H),
            k, W, U, G, h, v_new, initial_state, final, lay.chunk_offsets, states.chunk_offsets, lay.cu_seqlens,
            HAS_INITIAL=initial_state is not None, STORE_FINAL=store_final, BKF=self.SBK, BV=self.SBV,
            STATE_EVERY=self.steps if for_output else 1, **self.delta, **self.state_launch)
        return h, v_new, final

    def delta_states_backward(self, q, k, W, G, do, d_final, initial_state):
        lay = self.layout
        dh = empty((lay.programs, self.H, self.K, self.V), dtype=self.stored_dtype, device=q.device)
        # the intra-chunk term in parallel, so the sequential loop only adds the state term
        dv_new, *_ = self.dv(q, k, G, None, None, do)
        d_initial = None if initial_state is None else empty(initial_state.shape, dtype=torch.float32, device=q.device)
        block_v = self.config.backward_state_block_v(self.V)
        walk = self.config.backward_state_launch()
        launch(
            _kernels().states_bwd_kernel, (-(-self.V // block_v), lay.sequences * self.H),
            q, k, W, G, do, dh, dv_new, None if d_final is None else d_final.float().contiguous(), d_initial,
            lay.chunk_offsets, lay.cu_seqlens, self.scale, HAS_D_FINAL=d_final is not None,
            STORE_D_INITIAL=initial_state is not None,
            FOLD_SCALE=q.dtype != torch.float32 and walk["num_stages"] <= 2, STEPS=self.steps, QT=self.QT,
            BKF=self.SBK, BV=block_v, **self.delta, **walk)
        return dh, dv_new, d_initial

    def ut_backward(self, k, v, beta, G, T, dv_new, dW, dk, dG):
        """(dk, dv, dbeta, dg): dk in k's dtype, per value head (group_sum adds up a group's), the
        partial ``dk`` (dqk's output and state terms) plus the UT terms, in place; dg for gated runs."""
        lay = self.layout
        dv = empty(v.shape, dtype=v.dtype, device=v.device)
        dbeta = empty(beta.shape, dtype=torch.float32, device=beta.device)
        dg = None if G is None else empty(G.shape, dtype=torch.float32, device=G.device)
        launch(
            _kernels().ut_bwd_kernel, (lay.programs, self.H),
            k, v, beta, G, T, dv_new, dW, dk, dv, dbeta, dG, dg, lay.chunk_indices, lay.cu_seqlens,
            lay.total_rows, CHUNK_PRECISION=self.chunk_precision, STEPS=self.steps, BK=self.BK, BV=self.UT_BV,
            **self.delta, **self.launch)
        return dk, dv, dbeta, dg


class DeltaRuleFunction(torch.autograd.Function):
    """The delta rule, and DeltaProduct with ``steps`` > 1 Householder steps a token: k, v, beta
    (B, T * steps, ...) interleaved (``cu_seqlens`` in those rows), q, g and the output (B, T, ...)
    once a token (ChunkedRun)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, cu_seqlens, chunk, output_final_state, config, steps):
        run = _DeltaRun(q, v, g, cu_seqlens, chunk, scale, config, steps)
        qf, kf, vf, bf, gf = (run.flat(x) for x in (q, k, v, beta, g))
        state0 = None if initial_state is None else initial_state.float().contiguous()
        ctx.run = run
        ctx.dtypes = (k.dtype, beta.dtype, None if g is None else g.dtype,
                      None if initial_state is None else initial_state.dtype)
        if not outputs_wanted():
            ctx.save_for_backward(qf, kf, vf, bf, gf, state0, None)
            return run.unread_outputs(q, v, output_final_state)
        G, G_out = run.forward_decays(gf)
        W, U, T = run.ut(kf, vf, bf, G)
        ctx.save_for_backward(qf, kf, vf, bf, gf, state0, T)
        if config.fused_forward:
            o, final = run.fused_forward(qf, kf, U, G, state0, output_final_state, W=W)
        else:
            h, v_new, final = run.delta_states(kf, W, U, G, state0, output_final_state, for_output=True)
            o = run.output(qf, kf, v_new, G_out, None, h)
        return run.unflat(o), final

    @staticmethod
    def backward(ctx, do, d_final):
        qf, kf, vf, bf, gf, state0, T = ctx.saved_tensors
        run = ctx.run
        do = run.flat(do)
        G = run.cumulative_decay(gf)
        W, U, T = run.ut(kf, vf, bf, G, T)
        h, v_new, _ = run.delta_states(kf, W, U, G, state0, store_final=False)
        dh, dv_new, d_initial = run.delta_states_backward(qf, kf, W, G, do, d_final, state0)
        dq, dk, dW, dG = run.dqk(qf, kf, v_new, G, h, dh, do, dv2=dv_new)
        dk, dv, dbeta, dg = run.ut_backward(kf, vf, bf, G, T, dv_new, dW, dk, dG)
        k_dtype, beta_dtype, g_dtype, initial_dtype = ctx.dtypes
        return (run.unflat(run.group_sum(dq, qf.dtype)), run.unflat(run.group_sum(dk, k_dtype)), run.unflat(dv),
                run.unflat(dbeta, beta_dtype),
                run.unflat(run.token_gradient(dg), g_dtype), None if d_initial is None else d_initial.to(initial_dtype),
                None, None, None, None, None, None)


def _tuned(op, q, v, g, steps, config):
    return config or tuned(op, "triton", delta_rule_shape(q, v, g, steps), q.dtype, q.device,
                           default_config(q.dtype, DEFAULT_CONFIG, FLOAT32_DEFAULT_CONFIG))


@register("delta_rule", "triton", supports=supports)
def delta_rule(q, k, v, beta, g, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
               config: DeltaRuleConfig | None = None):
    return DeltaRuleFunction.apply(q, k, v, beta, g, initial_state, scale, cu_seqlens, chunk_size,
                                   output_final_state, _tuned("delta_rule", q, v, g, 1, config), 1)


@register("delta_product", "triton", supports=supports)
def delta_product(q, k, v, beta, g, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                  config: DeltaRuleConfig | None = None):
    """k, v, beta (B, T, n_h, ...): the delta rule over their n_h steps a token, interleaved (a
    reshape, no copy), with q and g read and o written once a token by the kernels themselves."""
    steps = k.shape[2]
    config = _tuned("delta_product", q, v, g, steps, config)
    return DeltaRuleFunction.apply(q, interleave(k), interleave(v), interleave(beta), g, initial_state, scale,
                                   step_offsets(cu_seqlens, steps), chunk_size, output_final_state, config, steps)
