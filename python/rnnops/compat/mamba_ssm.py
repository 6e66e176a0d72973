"""mamba_ssm's scan functions on rnnops: Mamba-1's selective scan, Mamba-2's SSD, and the
decoding step of both.

``selective_scan_fn`` / ``selective_scan_ref`` take mamba's layouts: u, delta, z [B, D, L];
A [D, N]; B, C [D, N] (static), [B, N, L] or [B, G, N, L]; D, delta_bias [D]. They are passed
to rnnops as transposed views (no copies) and the output comes back as a [B, D, L] view.

``mamba_chunk_scan_combined`` (Mamba-2's SSD, :func:`rnnops.linear_attn` with a scalar
log-decay per head and step) is described in its docstring; ``mamba_chunk_scan`` is its
state-less form.

``selective_state_update`` updates ``state`` in place and returns the output, as mamba_ssm's does,
in Mamba-1's layout (state [B, D, N]) and Mamba-2's multi-head one (state [B, nheads, dim, N]).
Not supported (a ValueError): complex A.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import rnnops

from .. import _validate as check


def _time_last_to_time_major(M):
    """[B, N, L] -> [B, L, N] and [B, G, N, L] -> [B, L, G, N] views; static [D, N] unchanged."""
    if M.dim() == 3:
        return M.transpose(1, 2)
    if M.dim() == 4:
        return M.permute(0, 3, 1, 2)
    return M


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, backend="auto"):
    if A.is_complex():
        raise ValueError("selective_scan_fn: complex A is not supported by rnnops")
    out = rnnops.selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A, _time_last_to_time_major(B),
                                _time_last_to_time_major(C), D, None if z is None else z.transpose(1, 2), delta_bias,
                                delta_softplus, return_last_state=return_last_state, backend=backend)
    if return_last_state:
        y, last = out
        return y.transpose(1, 2), last
    return out.transpose(1, 2)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """mamba_ssm's pure-PyTorch reference: rnnops' reference backend."""
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                             backend="reference")


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False, *, backend="auto"):
    """Mamba-2's SSD with mamba_ssm's signature, on :func:`rnnops.linear_attn`.

    x, z [batch, L, nheads, P]; dt [batch, L, nheads]; A [nheads] (<= 0: Mamba-2's -exp(A_log));
    B, C [batch, L, G, N], G groups of consecutive heads; D [nheads, P] or [nheads]; dt_bias
    [nheads]; initial_states [batch, nheads, P, N]; seq_idx [batch, L] integer sequence ids of
    packed sequences (the state restarts where the id changes); cu_seqlens [S + 1] offsets, with
    ``return_varlen_states`` (batch 1). Per head, with dt' = clamp(softplus(dt + dt_bias) (or
    dt + dt_bias without dt_softplus), *dt_limit)::

        h_t = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T      (P x N)
        out_t = (h_t C_t + D x_t) * silu(z_t)             (the factor only with z)

    which is linear_attn(q=C, k=B, v=x, g=dt' A, scale=1, v_scale=dt', skip=D) with its (N, P)
    state transposed.

    Returns out [batch, L, nheads, P] in x's dtype, followed by final_states [batch, nheads, P, N]
    with ``return_final_states`` and varlen_states [S, nheads, P, N] (each sequence's last state)
    with ``return_varlen_states``, both float32 (float64 for float64 inputs). Gradients flow into
    every tensor input and from both states (mamba_ssm has no backward for varlen_states).

    Where rnnops differs: ``chunk_size`` (mamba's chunk, usually 256) is checked but the chunking
    is rnnops' own; seq_idx is turned into cu_seqlens on the host (a device synchronisation), and
    the initial state belongs to each row's first sequence if its id is 0, as in mamba_ssm; with
    cu_seqlens the state restarts at every offset (mamba_ssm restarts only at seq_idx changes, so
    give seq_idx with the same boundaries, or none: different boundaries are a ValueError). B and
    C go to linear_attn as grouped q and k heads, read in place by its Triton kernels.
    """
    op = "mamba_chunk_scan_combined"
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        check.require_tensor(op, name, t)
    for name, t in (("D", D), ("z", z), ("dt_bias", dt_bias), ("initial_states", initial_states),
                    ("seq_idx", seq_idx), ("cu_seqlens", cu_seqlens)):
        check.require_tensor(op, name, t, optional=True)
    check.positive_int(op, "chunk_size", chunk_size)
    dims = check.Dims(op)
    dims.bind("x", x, "b L h P")
    dims.bind("dt", dt, "b L h")
    dims.bind("A", A, "h")
    dims.bind("B", B, "b L G N")
    dims.bind("C", C, "b L G N")
    for name, t, layouts in (("D", D, ("h P", "h")), ("z", z, ("b L h P",)), ("dt_bias", dt_bias, ("h",)),
                             ("initial_states", initial_states, ("b h P N",)), ("seq_idx", seq_idx, ("b L",))):
        if t is not None:
            dims.bind_one_of(name, t, layouts)
    batch, length, heads, groups = dims["b"], dims["L"], dims["h"], dims["G"]
    if heads % groups:
        raise ValueError(f"{op}: the {groups} groups of B and C must divide the {heads} heads of x")
    dtype = check.activation_dtype(op, {"x": x, "B": B, "C": C, "z": z})
    check.parameter_dtypes(op, {"dt": dt, "A": A, "D": D, "dt_bias": dt_bias, "initial_states": initial_states}, dtype)
    check.check_range(op, "A", A, float("-inf"), 0.0, "a decay rate: Mamba-2's A = -exp(A_log)")
    if seq_idx is not None and seq_idx.dtype not in check.INDEX_DTYPES:
        raise TypeError(f"{op}: seq_idx must be int32 or int64, got {seq_idx.dtype}")
    if return_varlen_states and cu_seqlens is None:
        raise ValueError(f"{op}: return_varlen_states needs cu_seqlens")

    dt = dt.to(check.accumulation_dtype(dtype))
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(*dt_limit)
    # the values dt' x: x as given with dt' as linear_attn's v_scale (the Triton kernels scale
    # each tile they read, no scaled copy of x), B and C as grouped q and k heads (G of them, each
    # serving nheads / G value heads)
    query, key, value, decay, step = C, B, x, dt * A, dt
    state0 = None if initial_states is None else initial_states.transpose(-1, -2)  # (b, h, N, P)
    packing = None
    if return_varlen_states or seq_idx is not None:
        packing = _PackedRows(op, seq_idx, cu_seqlens if return_varlen_states else None, batch, length,
                              x.device)
        query, key, value, decay, step = (t.reshape((1, batch * length) + t.shape[2:])
                                          for t in (query, key, value, decay, step))
        state0 = None if state0 is None else packing.initial_states(state0)
    skip = None if D is None else (D if D.dim() == 2 else D.unsqueeze(-1).expand(heads, dims["P"]))
    y, final = rnnops.linear_attn(query, key, value, decay, scale=1.0, initial_state=state0,
                                  output_final_state=bool(return_final_states or return_varlen_states),
                                  cu_seqlens=None if packing is None else packing.cu_seqlens, v_scale=step,
                                  skip=skip, backend=backend)
    y = y.view(x.shape)
    if z is not None:
        y = y * F.silu(z)
    outputs = [y]
    if return_final_states:
        outputs.append((final if packing is None else final[packing.last_of_row]).transpose(-1, -2))
    if return_varlen_states:
        outputs.append(final.transpose(-1, -2))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def mamba_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False, *,
                     backend="auto"):
    """mamba_ssm's ``mamba_chunk_scan``: :func:`mamba_chunk_scan_combined` without states."""
    return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                     backend=backend)


class _PackedRows:
    """The batch's rows as one packed sequence for rnnops' cu_seqlens: a sequence starts at every
    row and wherever seq_idx changes within one, or (batch 1) at the given cu_seqlens, which
    seq_idx must then agree with. Reads seq_idx and cu_seqlens on the host."""

    def __init__(self, op, seq_idx, cu_seqlens, batch, length, device):
        changes = [[] for _ in range(batch)]
        if seq_idx is not None:
            ids = seq_idx.cpu()
            for b, t in (ids[:, 1:] != ids[:, :-1]).nonzero().tolist():
                changes[b].append(b * length + t + 1)
        starts, self.first_of_row = [], []
        for b in range(batch):
            self.first_of_row.append(len(starts))
            starts += [b * length] + changes[b]
        if cu_seqlens is not None:
            check.check_cu_seqlens(op, cu_seqlens, batch, length, device)
            offsets = cu_seqlens.tolist()
            if seq_idx is not None and set(starts) - {0} != set(offsets[1:-1]) - {0, length}:
                raise ValueError(f"{op}: seq_idx and cu_seqlens give different sequence boundaries")
            starts = offsets[:-1]
        self.cu_seqlens = torch.tensor(starts + [batch * length], dtype=torch.int64, device=device)
        self.last_of_row = [first - 1 for first in self.first_of_row[1:]] + [len(starts) - 1]
        # the initial state is sequence id 0's (mamba_ssm's rule): a row starting at another id gets zeros
        self.initial_rows = [b for b in range(batch) if seq_idx is None or length == 0 or int(ids[b, 0]) == 0]

    def initial_states(self, state0):
        """(batch, ...) initial states -> (sequences, ...): each row's on its first sequence."""
        rows = torch.tensor(self.initial_rows, dtype=torch.int64, device=state0.device)
        slots = torch.tensor([self.first_of_row[b] for b in self.initial_rows], dtype=torch.int64, device=state0.device)
        packed = state0.new_zeros((self.cu_seqlens.numel() - 1,) + state0.shape[1:])
        return packed.index_copy(0, slots, state0.index_select(0, rows))


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One step, updating ``state`` in place; returns out.

    Mamba-1: state [B, D, N]; x, dt, z [B, D]; A [D, N]; B, C [B, N] or [B, G, N]; D, dt_bias [D];
    out [B, D]. Mamba-2 (multi-head): state [B, nheads, dim, N]; x, dt, z [B, nheads, dim]; A
    [nheads, dim, N]; B, C [B, G, N]; D, dt_bias [nheads, dim]; out [B, nheads, dim]. Mamba-2's
    decoding passes stride-0 expansions (dt, A, D, dt_bias repeated over dim, A over N), which
    work as given. The heads are rnnops' channels (nheads * dim of them, G groups of consecutive
    heads). With ``state_batch_indices`` [B] the step reads and writes ``state[state_batch_indices]``
    (a cache with more slots than the batch).
    """
    op = "selective_state_update"
    check.require_tensor(op, "state", state)
    check.require_tensor(op, "x", x)
    if state.dim() not in (3, 4):
        raise ValueError(f"{op}: state must be [batch, dim, dstate] or [batch, nheads, dim, dstate], got shape "
                         f"{tuple(state.shape)}")
    rows = state
    if state_batch_indices is not None:
        check.require_tensor(op, "state_batch_indices", state_batch_indices)
        if state_batch_indices.dtype not in check.INDEX_DTYPES or state_batch_indices.shape != x.shape[:1]:
            raise ValueError(f"{op}: state_batch_indices must be an int32/int64 tensor of shape ({x.shape[0]},), got "
                             f"{state_batch_indices.dtype} {tuple(state_batch_indices.shape)}")
        rows = state[state_batch_indices]
    multi_head = state.dim() == 4
    if multi_head:  # channels = (head, dim) pairs
        head_dims = tuple(state.shape[1:3])
        for name, t, lead in (("x", x, 1), ("dt", dt, 1), ("z", z, 1), ("A", A, 0), ("D", D, 0),
                              ("dt_bias", dt_bias, 0)):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape[lead:lead + 2]) != head_dims):
                raise ValueError(f"{op}: with a multi-head state [batch, nheads, dim, dstate], {name} must have "
                                 f"(nheads, dim) = {head_dims} at dimensions {lead}-{lead + 1}, got "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        rows = rows.flatten(1, 2)
        x, dt, z = (None if t is None else t.flatten(1, 2) for t in (x, dt, z))
        A = A.flatten(0, 1)
        D, dt_bias = (None if t is None else t.flatten() for t in (D, dt_bias))
    out, new_state = rnnops.selective_state_update(rows, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if multi_head:
        out, new_state = out.view(out.shape[0], *state.shape[1:3]), new_state.view((-1,) + state.shape[1:])
    if state_batch_indices is None:
        state.copy_(new_state)
    else:
        state[state_batch_indices] = new_state.to(state.dtype)
    return out
