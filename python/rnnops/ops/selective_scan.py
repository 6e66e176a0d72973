"""Selective scan (Mamba-1) and its decoding step."""
from __future__ import annotations

import torch

from .. import _validate as check
from rnnops.autotune.kernels import selective_scan_shape

from .._dispatch import register, resolve
from .._library import LibraryOp, tracing
from .._validate import accumulation_dtype
from ._common import add_time_axis, needs_grad, sequence_count, state_or_zeros

_BC_LAYOUTS = ("Dm N", "B T N", "B T {g} N")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Mamba-1's selective scan over (batch, time, channel) inputs::

        dt_t = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias
        x_t  = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t         (state x: (batch, Dm, N))
        y_t  = <x_t, C_t> + D * u_t;   y_t *= silu(z_t) if z is given

    Args:
        u, delta: (batch, T, Dm). z: None or (batch, T, Dm). Any strides.
        A: (Dm, N), real.
        B, C: each static per channel (Dm, N), shared over channels (batch, T, N), or grouped
            (batch, T, G, N) with G dividing Dm (channel d uses group d // (Dm // G)).
        D, delta_bias: None or (Dm,).
        initial_state: (S, Dm, N), S = batch, or the number of sequences with cu_seqlens.
        return_last_state: also return the state after the last step.
        cu_seqlens: int32/int64 offsets [0, ..., T] of packed sequences (batch must be 1).
        backend: "auto", "reference", "chunked".

    Returns:
        y (batch, T, Dm) in u's dtype, or (y, last_state) with last_state (S, Dm, N) in
        float32 (float64 for float64 inputs). T = 0 gives an empty y and the initial state.
    """
    dims, dtype, device = _validate("selective_scan", u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    if tracing(u):
        outputs = _SELECTIVE_SCAN(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state,
                                  bool(return_last_state), cu_seqlens, backend)
        return tuple(outputs) if return_last_state else outputs[0]
    if dims["T"] == 0:
        y = u.new_empty(u.shape)
        last = state_or_zeros(initial_state, (dims["S"], dims["Dm"], dims["N"]), dtype, device)
    else:
        _, impl = resolve("selective_scan", backend, device, dtype=dtype, shape=selective_scan_shape(u, A))
        y, last = impl(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state=initial_state,
                       output_final_state=bool(return_last_state), cu_seqlens=cu_seqlens)
    return (y, last) if return_last_state else y


def selective_state_update(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of :func:`selective_scan`, out of place.

    state (batch, Dm, N); u, delta, z (batch, Dm); A (Dm, N); B, C (batch, N) or
    (batch, G, N); D, delta_bias (Dm,). Returns y (batch, Dm) and the new state. (The in-place
    form of mamba_ssm lives in ``rnnops.compat.mamba_ssm``.)
    """
    op = "selective_state_update"
    check.require_tensor(op, "state", state)

    def bc_layout(M):
        return "B G N" if isinstance(M, torch.Tensor) and M.dim() == 3 else "B N"

    sequence = [add_time_axis(op, name, x, layout) for name, x, layout in
                (("u", u, "B Dm"), ("delta", delta, "B Dm"), ("B", B, bc_layout(B)), ("C", C, bc_layout(C)),
                 ("z", z, "B Dm"))]
    _, dtype, device = _validate(op, sequence[0], sequence[1], A, sequence[2], sequence[3], D, sequence[4], delta_bias,
                                 state, None)
    if tracing(u):
        return tuple(_SELECTIVE_STATE_UPDATE(state, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), backend))
    _, impl = resolve(op, backend, device, dtype=dtype,
                      requires_grad=needs_grad(state, u, delta, A, B, C, D, z, delta_bias))
    return impl(state, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))


_SCAN_ARGS = ("Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
              "bool delta_softplus")


def _fake_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state, cu_seqlens,
               backend):
    y = u.new_empty(u.shape)
    if not return_last_state:
        return y
    return y, u.new_empty((sequence_count(u.shape[0], cu_seqlens),) + A.shape, dtype=accumulation_dtype(u.dtype))


def _fake_state_update(state, u, *args):
    return u.new_empty(u.shape), state.new_empty(state.shape, dtype=accumulation_dtype(u.dtype))


_SELECTIVE_SCAN = LibraryOp(
    "selective_scan",
    _SCAN_ARGS + ", Tensor? initial_state, bool return_last_state, Tensor? cu_seqlens, str backend",
    selective_scan,
    _fake_scan,
)
_SELECTIVE_STATE_UPDATE = LibraryOp("selective_state_update", "Tensor state, " + _SCAN_ARGS + ", str backend",
                                    selective_state_update, _fake_state_update)


def _sequence_step(backend: str):
    """A step as a one-token scan on ``backend`` (any backend of selective_scan)."""

    def step(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        def token(x):
            return None if x is None else x.unsqueeze(1)

        y, new_state = selective_scan(token(u), token(delta), A, token(B), token(C), D, token(z), delta_bias,
                                      delta_softplus, initial_state=state, return_last_state=True, backend=backend)
        return y[:, 0], new_state

    return step


for _backend in ("reference", "chunked"):
    register("selective_state_update", _backend)(_sequence_step(_backend))


def _validate(op, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens):
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        check.require_tensor(op, name, x)
    optional = {"D": D, "z": z, "delta_bias": delta_bias, "initial_state": initial_state, "cu_seqlens": cu_seqlens}
    for name, x in optional.items():
        check.require_tensor(op, name, x, optional=True)
    dims = check.Dims(op)
    dims.bind("u", u, "B T Dm")
    dims.bind("delta", delta, "B T Dm")
    if z is not None:
        dims.bind("z", z, "B T Dm")
    dims.bind("A", A, "Dm N")
    for name, M in (("B", B), ("C", C)):
        layout = dims.bind_one_of(name, M, [lay.format(g="G" + name) for lay in _BC_LAYOUTS])
        if "G" + name in layout and dims["Dm"] % dims["G" + name]:
            raise ValueError(f"{op}: the group count of {name} (G={dims['G' + name]}) must divide Dm={dims['Dm']}")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            dims.bind(name, x, "Dm")
    dtype = check.activation_dtype(op, {"u": u, "delta": delta, "z": z})
    check.parameter_dtypes(op, {"A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias,
                                "initial_state": initial_state}, dtype)
    device = check.same_device(op, {"u": u, "delta": delta, "z": z, "A": A, "B": B, "C": C, "D": D,
                                    "delta_bias": delta_bias, "initial_state": initial_state})
    dims.bind_sequences("S", cu_seqlens, device)
    if initial_state is not None:
        dims.bind("initial_state", initial_state, "S Dm N")
    return dims, dtype, device
