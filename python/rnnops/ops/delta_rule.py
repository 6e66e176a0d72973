"""The delta rule (DeltaNet, Gated DeltaNet) and DeltaProduct."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validate as check
from rnnops.autotune.kernels import delta_rule_shape

from .._dispatch import register, resolve
from .._library import LibraryOp, tracing
from ._common import (Checked, add_time_axis, check_grouped_heads, fake_linear_outputs, needs_grad,
                      reads_grouped_heads, repeat_heads, sequence_count, state_or_zeros)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    allow_neg_eigval: bool = False,
    qk_l2norm: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The delta rule with an optional scalar gate, per token and head (state S: (K, V))::

        S <- exp(g_t) * S                                (Gated DeltaNet, if g is given)
        S <- S + beta_t k_t (v_t - S^T k_t)^T            (S <- (I - beta k k^T) S + beta k v^T)
        o_t = scale * S^T q_t

    Args:
        q, k: (B, T, Hk, K); keys are used as given (l2-normalise them, or pass qk_l2norm=True).
            Hk = H, or grouped heads (fla's GVA): Hk divides H and each q / k head serves H / Hk
            consecutive value heads (beta, g, the state per value head). The ``triton`` backend
            reads the shared heads in place; the others repeat them.
        v: (B, T, H, V).
        beta: (B, T, H) in [0, 1], or in [0, 2] with allow_neg_eigval=True (the transition
            then has eigenvalues in [-1, 1]).
        g: None or (B, T, H) log-decay, <= 0.
        scale: defaults to K ** -0.5.
        initial_state: (N, H, K, V), N = B, or the number of sequences with cu_seqlens.
        output_final_state: return the state after the last token (else None).
        cu_seqlens: int32/int64 offsets [0, ..., T] of packed sequences (B must be 1).
        qk_l2norm: l2-normalise q and k over K first.
        chunk_size: tokens per chunk for the chunked algorithms.
        backend: "auto", "reference", "chunked".

    Returns:
        o (B, T, H, V) in q's dtype, and the final state (N, H, K, V) in float32 (float64 for
        float64 inputs) or None. T = 0 gives an empty o and the initial state (or zeros).
    """
    checked = _validate("delta_rule", q, k, v, beta, g, initial_state, cu_seqlens, scale, chunk_size,
                     allow_neg_eigval, num_householder=None)
    if tracing(q):
        o, final = _DELTA_RULE(q, k, v, beta, g, checked.scale, initial_state, bool(output_final_state), cu_seqlens,
                               bool(allow_neg_eigval), bool(qk_l2norm), checked.chunk_size, backend)
        return o, final if output_final_state else None
    return _run("delta_rule", checked, q, k, v, beta, g, initial_state, output_final_state, cu_seqlens,
                qk_l2norm, backend)


def delta_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    num_householder: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    allow_neg_eigval: bool = False,
    qk_l2norm: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaProduct: n_h = num_householder delta-rule steps per token::

        S <- exp(g_t) * S                                              (if gated)
        for j in 0..n_h-1:  S <- S + beta_tj k_tj (v_tj - S^T k_tj)^T
        o_t = scale * S^T q_t

    Shapes as :func:`delta_rule` except k (B, T, n_h, H, K), v (B, T, n_h, H, V) and
    beta (B, T, n_h, H). num_householder = 1 is the delta rule.
    """
    checked = _validate("delta_product", q, k, v, beta, g, initial_state, cu_seqlens, scale, chunk_size,
                     allow_neg_eigval, num_householder=num_householder)
    if tracing(q):
        o, final = _DELTA_PRODUCT(q, k, v, beta, g, num_householder, checked.scale, initial_state,
                                  bool(output_final_state), cu_seqlens, bool(allow_neg_eigval), bool(qk_l2norm),
                                  checked.chunk_size, backend)
        return o, final if output_final_state else None
    return _run("delta_product", checked, q, k, v, beta, g, initial_state, output_final_state, cu_seqlens,
                qk_l2norm, backend)


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    state: torch.Tensor | None = None,
    scale: float | None = None,
    allow_neg_eigval: bool = False,
    qk_l2norm: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of :func:`delta_rule`: q, k (B, Hk, K) (Hk divides H: grouped heads);
    v (B, H, V); beta, g (B, H); state (B, H, K, V) or None (zeros). Returns o (B, H, V) and the
    new state. The ``triton`` backend runs it as one fused kernel (inference: without autograd)."""
    op = "delta_rule_step"
    sequence = [add_time_axis(op, name, x, layout) for name, x, layout in
                (("q", q, "B H K"), ("k", k, "B H K"), ("v", v, "B H V"), ("beta", beta, "B H"), ("g", g, "B H"))]
    checked = _validate(op, *sequence, state, None, scale, 1, allow_neg_eigval, num_householder=None)
    if tracing(q):
        return tuple(_DELTA_RULE_STEP(q, k, v, beta, g, state, checked.scale, bool(allow_neg_eigval),
                                      bool(qk_l2norm), backend))
    return _step(op, checked, q, k, v, beta, g, state, qk_l2norm, backend)


def delta_product_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    num_householder: int,
    state: torch.Tensor | None = None,
    scale: float | None = None,
    allow_neg_eigval: bool = False,
    qk_l2norm: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of :func:`delta_product`: q (B, Hk, K); k (B, n_h, Hk, K);
    v (B, n_h, H, V); beta (B, n_h, H); g (B, H); state (B, H, K, V) or None (zeros)."""
    op = "delta_product_step"
    sequence = [add_time_axis(op, name, x, layout) for name, x, layout in
                (("q", q, "B H K"), ("k", k, "B NH H K"), ("v", v, "B NH H V"), ("beta", beta, "B NH H"),
                 ("g", g, "B H"))]
    checked = _validate(op, *sequence, state, None, scale, 1, allow_neg_eigval, num_householder=num_householder)
    if tracing(q):
        return tuple(_DELTA_PRODUCT_STEP(q, k, v, beta, g, num_householder, state, checked.scale,
                                         bool(allow_neg_eigval), bool(qk_l2norm), backend))
    return _step(op, checked, q, k, v, beta, g, state, qk_l2norm, backend)


def _step(op, checked: Checked, q, k, v, beta, g, state, qk_l2norm, backend):
    dims, dtype, device, scale, _ = checked
    if qk_l2norm:
        q, k = _l2_normalised(dtype, q, k)
    q, k = repeat_heads(q, k, dims)
    _, impl = resolve(op, backend, device, dtype=dtype, head_dims=(dims["K"], dims["V"]),
                      requires_grad=needs_grad(q, k, v, beta, g, state))
    return impl(q, k, v, beta, g, state=state, scale=scale)


_SEQUENCE_ARGS = ("float? scale, Tensor? initial_state, bool output_final_state, Tensor? cu_seqlens, "
                  "bool allow_neg_eigval, bool qk_l2norm, int chunk_size, str backend")
_STEP_ARGS = "Tensor? state, float? scale, bool allow_neg_eigval, bool qk_l2norm, str backend"


def _fake_sequence(q, k, v, beta, g, *args):
    *_, output_final_state, cu_seqlens, _allow_neg_eigval, _qk_l2norm, _chunk_size, _backend = args
    return fake_linear_outputs(q, v, sequence_count(q.shape[0], cu_seqlens) if output_final_state else None)


def _fake_step(q, k, v, *args):
    return fake_linear_outputs(q, v, q.shape[0])


_DELTA_ARGS = "Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, "
_DELTA_RULE = LibraryOp("delta_rule", _DELTA_ARGS + _SEQUENCE_ARGS, delta_rule, _fake_sequence)
_DELTA_PRODUCT = LibraryOp("delta_product", _DELTA_ARGS + "int num_householder, " + _SEQUENCE_ARGS, delta_product,
                           _fake_sequence)
_DELTA_RULE_STEP = LibraryOp("delta_rule_step", _DELTA_ARGS + _STEP_ARGS, delta_rule_step, _fake_step)
_DELTA_PRODUCT_STEP = LibraryOp("delta_product_step", _DELTA_ARGS + "int num_householder, " + _STEP_ARGS,
                                delta_product_step, _fake_step)


def _sequence_step(sequence_op, backend: str):
    """A step as a one-token sequence on ``backend`` (any backend of the sequence op)."""

    def step(q, k, v, beta, g, *, state, scale):
        extra = {} if sequence_op is delta_rule else {"num_householder": k.shape[1]}
        o, new_state = sequence_op(*(None if x is None else x.unsqueeze(1) for x in (q, k, v, beta, g)),
                                   scale=scale, initial_state=state, output_final_state=True, allow_neg_eigval=True,
                                   backend=backend, **extra)
        return o[:, 0], new_state

    return step


for _backend in ("reference", "chunked"):
    register("delta_rule_step", _backend)(_sequence_step(delta_rule, _backend))
    register("delta_product_step", _backend)(_sequence_step(delta_product, _backend))


def _l2_normalised(dtype, *tensors):
    return tuple(F.normalize(x.to(check.accumulation_dtype(dtype)), dim=-1).to(dtype) for x in tensors)


def _validate(op, q, k, v, beta, g, initial_state, cu_seqlens, scale, chunk_size, allow_neg_eigval,
              num_householder):
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        check.require_tensor(op, name, x)
    for name, x in (("g", g), ("initial_state", initial_state), ("cu_seqlens", cu_seqlens)):
        check.require_tensor(op, name, x, optional=True)
    dims = check.Dims(op)
    dims.bind("q", q, "B T Hk K")
    if num_householder is None:
        dims.bind("k", k, "B T Hk K")
        dims.bind("v", v, "B T H V")
        dims.bind("beta", beta, "B T H")
    else:
        dims.bind_int("NH", check.positive_int(op, "num_householder", num_householder), "num_householder")
        dims.bind("k", k, "B T NH Hk K")
        dims.bind("v", v, "B T NH H V")
        dims.bind("beta", beta, "B T NH H")
    check_grouped_heads(op, dims)
    if g is not None:
        dims.bind("g", g, "B T H")
    dtype = check.activation_dtype(op, {"q": q, "k": k, "v": v, "beta": beta})
    check.parameter_dtypes(op, {"g": g, "initial_state": initial_state}, dtype)
    device = check.same_device(op, {"q": q, "k": k, "v": v, "beta": beta, "g": g, "initial_state": initial_state})
    dims.bind_sequences("N", cu_seqlens, device)
    if initial_state is not None:
        dims.bind("initial_state", initial_state, "N H K V")
    beta_max = 2.0 if allow_neg_eigval else 1.0
    check.check_range(op, "beta", beta, 0.0, beta_max,
                      "a step size; [0, 2] needs allow_neg_eigval=True" if beta_max == 1.0 else "allow_neg_eigval=True")
    check.check_range(op, "g", g, float("-inf"), 0.0, "a log-decay")
    return Checked(dims, dtype, device, check.resolve_scale(op, scale, dims["K"]),
                   check.positive_int(op, "chunk_size", chunk_size))


def _run(op, checked: Checked, q, k, v, beta, g, initial_state, output_final_state, cu_seqlens, qk_l2norm,
         backend):
    dims, dtype, device, scale, chunk_size = checked
    if dims["T"] == 0:
        final = state_or_zeros(initial_state, (dims["N"], dims["H"], dims["K"], dims["V"]), dtype, device)
        return q.new_empty(q.shape[:2] + (dims["H"], dims["V"])), final if output_final_state else None
    if qk_l2norm:
        q, k = _l2_normalised(dtype, q, k)
    name, impl = resolve(op, backend, device, dtype=dtype, head_dims=(dims["K"], dims["V"]), chunk_size=chunk_size,
                         shape=delta_rule_shape(q, v, g, dims.sizes.get("NH", 1)))
    if not reads_grouped_heads(name):
        q, k = repeat_heads(q, k, dims)
    o, final = impl(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                    output_final_state=bool(output_final_state), cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    return o, final if output_final_state else None
