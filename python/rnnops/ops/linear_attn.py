"""Chunked linear attention with optional scalar or per-key log-decay."""
from __future__ import annotations

import torch

from .. import _validate as check
from rnnops.autotune.kernels import linear_attn_shape

from .._dispatch import register, resolve
from .._library import LibraryOp, tracing
from ._common import (Checked, add_time_axis, check_grouped_heads, fake_linear_outputs, needs_grad,
                      reads_grouped_heads, repeat_heads, sequence_count, state_or_zeros)


def linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    v_scale: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention, a linear RNN with a matrix state S of shape (K, V) per head::

        S_t = exp(g_t) * S_{t-1} + k_t^T (s_t v_t)   (decay broadcast over V; s_t = v_scale, or 1)
        o_t = scale * q_t S_t (+ skip * v_t)

    Args:
        q, k: (B, T, Hk, K). v: (B, T, H, V). Hk = H, or grouped heads: Hk divides H and each q / k
            head serves H / Hk consecutive value heads (grouped-value attention; Mamba-2's B and C
            groups). The ``triton`` backend reads the shared heads in place; the others repeat
            them.
        g: None (plain linear attention), (B, T, H) scalar log-decay per head (RetNet,
            Mamba-2 SSD, simple GLA) or (B, T, H, K) per-key log-decay (GLA). Must be <= 0.
        scale: defaults to K ** -0.5.
        initial_state: (N, H, K, V), N = B, or the number of sequences with cu_seqlens.
        output_final_state: return the state after the last token (else None).
        cu_seqlens: int32/int64 offsets [0, ..., T] of packed sequences (B must be 1).
        chunk_size: tokens per chunk for the chunked algorithms.
        v_scale: None or (B, T, H), a scale per token and head of v (Mamba-2's dt: its SSD
            inputs are dt x), with its gradient. The ``triton`` backend applies it inside its
            kernels (v is read once as given, no scaled copy); the others scale a copy of v.
        skip: None or (H, V): o_t += skip * v_t, v as given (Mamba's D skip connection), with
            its gradient; fused into the ``triton`` backend's output kernels.
        backend: "auto" or a name from ``rnnops.available_backends("linear_attn")``.

    Returns:
        o (B, T, H, V) in q's dtype, and the final state (N, H, K, V) in float32 (float64 for
        float64 inputs) or None. T = 0 gives an empty o and the initial state (or zeros).
    """
    dims, dtype, device, scale, chunk_size = _validate("linear_attn", q, k, v, g, initial_state, cu_seqlens, scale,
                                                       chunk_size, v_scale, skip)
    if tracing(q):
        o, final = _LINEAR_ATTN(q, k, v, g, scale, initial_state, bool(output_final_state), cu_seqlens, chunk_size,
                                v_scale, skip, backend)
        return o, final if output_final_state else None
    if dims["T"] == 0:
        final = state_or_zeros(initial_state, (dims["N"], dims["H"], dims["K"], dims["V"]), dtype, device)
        return v.new_empty(v.shape), final if output_final_state else None
    name, impl = resolve("linear_attn", backend, device, dtype=dtype, head_dims=(dims["K"], dims["V"]),
                         chunk_size=chunk_size, shape=linear_attn_shape(q, v, g))
    options = {"scale": scale, "initial_state": initial_state, "output_final_state": bool(output_final_state),
               "cu_seqlens": cu_seqlens, "chunk_size": chunk_size}
    if reads_grouped_heads(name):  # the Triton kernels also apply v_scale and skip themselves
        o, final = impl(q, k, v, g, v_scale=v_scale, skip=skip, **options)
    else:
        q, k = repeat_heads(q, k, dims)
        values = v if v_scale is None else (v * v_scale.unsqueeze(-1)).to(v.dtype)
        o, final = impl(q, k, values, g, **options)
        if skip is not None:
            o = (o + skip * v).to(o.dtype)
    return o, final if output_final_state else None


def linear_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    state: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of :func:`linear_attn`.

    q, k (B, Hk, K) (Hk divides H: grouped heads, as in :func:`linear_attn`); v (B, H, V); g None,
    (B, H) or (B, H, K); state (B, H, K, V) or None (zeros).
    Returns o (B, H, V) and the new state (B, H, K, V). The ``triton`` backend runs it as one
    fused kernel (inference: without autograd).
    """
    op = "linear_attn_step"
    g_layout = "B H K" if isinstance(g, torch.Tensor) and g.dim() == 3 else "B H"
    sequence = [add_time_axis(op, name, x, layout) for name, x, layout in
                (("q", q, "B H K"), ("k", k, "B H K"), ("v", v, "B H V"), ("g", g, g_layout))]
    dims, dtype, device, scale, _ = _validate(op, *sequence, state, None, scale, 1, None, None)
    if tracing(q):
        return tuple(_LINEAR_ATTN_STEP(q, k, v, g, state, scale, backend))
    q, k = repeat_heads(q, k, dims)
    _, impl = resolve(op, backend, device, dtype=dtype, head_dims=(dims["K"], dims["V"]),
                      requires_grad=needs_grad(q, k, v, g, state))
    return impl(q, k, v, g, state=state, scale=scale)


def _fake_linear_attn(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size, v_scale, skip,
                      backend):
    return fake_linear_outputs(q, v, sequence_count(q.shape[0], cu_seqlens) if output_final_state else None)


def _fake_linear_attn_step(q, k, v, g, state, scale, backend):
    return fake_linear_outputs(q, v, q.shape[0])


_LINEAR_ATTN = LibraryOp(
    "linear_attn",
    "Tensor q, Tensor k, Tensor v, Tensor? g, float? scale, Tensor? initial_state, bool output_final_state, "
    "Tensor? cu_seqlens, int chunk_size, Tensor? v_scale, Tensor? skip, str backend",
    linear_attn,
    _fake_linear_attn,
)
_LINEAR_ATTN_STEP = LibraryOp("linear_attn_step",
                              "Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? state, float? scale, str backend",
                              linear_attn_step, _fake_linear_attn_step)


def _sequence_step(backend: str):
    """A step as a one-token sequence on ``backend`` (any backend of linear_attn)."""

    def step(q, k, v, g, *, state, scale):
        o, new_state = linear_attn(*(None if x is None else x.unsqueeze(1) for x in (q, k, v, g)), scale=scale,
                                   initial_state=state, output_final_state=True, backend=backend)
        return o[:, 0], new_state

    return step


for _backend in ("reference", "chunked"):
    register("linear_attn_step", _backend)(_sequence_step(_backend))


def _validate(op, q, k, v, g, initial_state, cu_seqlens, scale, chunk_size, v_scale, skip) -> Checked:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check.require_tensor(op, name, x)
    for name, x in (("g", g), ("initial_state", initial_state), ("cu_seqlens", cu_seqlens), ("v_scale", v_scale),
                    ("skip", skip)):
        check.require_tensor(op, name, x, optional=True)
    dims = check.Dims(op)
    dims.bind("q", q, "B T Hk K")
    dims.bind("k", k, "B T Hk K")
    dims.bind("v", v, "B T H V")
    check_grouped_heads(op, dims)
    if g is not None:
        dims.bind_one_of("g", g, ("B T H", "B T H K"))
    if v_scale is not None:
        dims.bind("v_scale", v_scale, "B T H")
    if skip is not None:
        dims.bind("skip", skip, "H V")
    dtype = check.activation_dtype(op, {"q": q, "k": k, "v": v})
    check.parameter_dtypes(op, {"g": g, "initial_state": initial_state, "v_scale": v_scale, "skip": skip}, dtype)
    device = check.same_device(op, {"q": q, "k": k, "v": v, "g": g, "initial_state": initial_state,
                                    "v_scale": v_scale, "skip": skip})
    dims.bind_sequences("N", cu_seqlens, device)
    if initial_state is not None:
        dims.bind("initial_state", initial_state, "N H K V")
    scale = check.resolve_scale(op, scale, dims["K"])
    chunk_size = check.positive_int(op, "chunk_size", chunk_size)
    check.check_range(op, "g", g, float("-inf"), 0.0, "a log-decay")
    return Checked(dims, dtype, device, scale, chunk_size)
