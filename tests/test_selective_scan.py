import math

import numpy as np
import pytest
import torch

import rnnops
from conftest import assert_close, compare_backends

D64 = torch.float64


def make_inputs(B=2, T=23, Dm=6, N=4, layout_B="shared", layout_C="grouped", dtype=D64, initial=True,
                with_extras=True, A_scale=3.0):
    def bc(layout):
        return {"static": (Dm, N), "shared": (B, T, N), "grouped": (B, T, 3, N)}[layout]

    x = {
        "u": torch.randn(B, T, Dm, dtype=dtype),
        "delta": torch.randn(B, T, Dm, dtype=dtype),
        "A": -torch.rand(Dm, N, dtype=dtype) * A_scale,
        "B": torch.randn(bc(layout_B), dtype=dtype),
        "C": torch.randn(bc(layout_C), dtype=dtype),
    }
    if with_extras:
        x.update(D=torch.randn(Dm, dtype=dtype), z=torch.randn(B, T, Dm, dtype=dtype),
                 delta_bias=torch.randn(Dm, dtype=dtype))
    if initial:
        x["initial_state"] = torch.randn(B, Dm, N, dtype=dtype)
    return x


def scan(backend, delta_softplus=True, **x):
    return rnnops.selective_scan(**x, delta_softplus=delta_softplus, return_last_state=True, backend=backend)


LAYOUTS = [("static", "static"), ("shared", "shared"), ("grouped", "shared"), ("shared", "grouped")]


@pytest.mark.parametrize("layout_B,layout_C", LAYOUTS)
@pytest.mark.parametrize("T", [1, 23, 64])
@pytest.mark.parametrize("initial", [True, False])
def test_chunked_matches_reference_float64(layout_B, layout_C, T, initial):
    x = make_inputs(T=T, layout_B=layout_B, layout_C=layout_C, initial=initial)
    compare_backends(scan, x, 1e-10)


@pytest.mark.parametrize("softplus", [True, False])
def test_chunked_matches_reference_float32(softplus):
    x = make_inputs(B=1, T=200, Dm=18, N=8, dtype=torch.float32)
    if not softplus:
        x["delta"] = x["delta"].abs() * 0.2
        x["delta_bias"] = x["delta_bias"].abs() * 0.1
    compare_backends(lambda backend, **kw: scan(backend, softplus, **kw), x, 1e-5)


def test_large_decay_is_stable():
    x = make_inputs(T=100, A_scale=200.0, dtype=torch.float32)
    compare_backends(scan, x, 1e-5)


def _mamba_paper_loop(u, delta, A, B, C, D, z, delta_bias, x0):
    """Section 3 of the Mamba paper, one channel and one state element at a time (numpy)."""
    u, delta, A, B, C, D, z, delta_bias, x0 = (t.numpy() for t in (u, delta, A, B, C, D, z, delta_bias, x0))
    batch, time, channels = u.shape
    groups = B.shape[2]
    y = np.zeros_like(u)
    state = x0.copy()
    for b in range(batch):
        for d in range(channels):
            grp = d // (channels // groups)
            for t in range(time):
                dt = math.log1p(math.exp(delta[b, t, d] + delta_bias[d]))
                acc = 0.0
                for n in range(A.shape[1]):
                    A_bar = math.exp(dt * A[d, n])
                    B_bar = dt * B[b, t, grp, n]
                    state[b, d, n] = A_bar * state[b, d, n] + B_bar * u[b, t, d]
                    acc += C[b, t, n] * state[b, d, n]
                silu = z[b, t, d] / (1 + math.exp(-z[b, t, d]))
                y[b, t, d] = (acc + D[d] * u[b, t, d]) * silu
    return torch.from_numpy(y), torch.from_numpy(state)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_matches_mamba_paper_loop(backend):
    x = make_inputs(B=2, T=9, Dm=6, N=3, layout_B="grouped", layout_C="shared")
    y, last = scan(backend, **x)
    y_loop, last_loop = _mamba_paper_loop(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                          x["delta_bias"], x["initial_state"])
    assert_close(y, y_loop, 1e-12)
    assert_close(last, last_loop, 1e-12)


def test_return_conventions():
    x = make_inputs(initial=False)
    y = rnnops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"])
    assert isinstance(y, torch.Tensor) and y.shape == x["u"].shape
    y2, last = rnnops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True)
    assert_close(y2, y, 0.0)
    assert last.shape == (2, 6, 4)


def test_strided_mamba_layout_inputs():
    """(B, Dm, L) tensors transposed to (B, L, Dm) views work without a copy on the caller's side."""
    x = make_inputs(initial=False)
    strided = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v)
               for k, v in x.items()}
    assert not strided["u"].is_contiguous()
    for backend in ("reference", "chunked"):
        assert_close(scan(backend, **strided)[0], scan("reference", **x)[0], 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_resumable_in_two_halves(backend):
    x = make_inputs(T=30)
    whole_y, whole_S = scan(backend, **x)
    per_token = ("u", "delta", "z", "B", "C")
    first = {k: (v[:, :12] if k in per_token else v) for k, v in x.items()}
    second = {k: (v[:, 12:] if k in per_token else v) for k, v in x.items() if k != "initial_state"}
    y1, S1 = scan(backend, **first)
    y2, S2 = scan(backend, initial_state=S1, **second)
    assert_close(torch.cat([y1, y2], 1), whole_y, 1e-12)
    assert_close(S2, whole_S, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("layout_B", ["static", "grouped"])
def test_varlen_equals_separate_sequences(backend, layout_B):
    lengths = [5, 0, 17, 1, 9]
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    x = make_inputs(B=1, T=sum(lengths), layout_B=layout_B, initial=False)
    x["initial_state"] = torch.randn(len(lengths), 6, 4, dtype=D64)
    y, S = rnnops.selective_scan(**x, delta_softplus=True, return_last_state=True, cu_seqlens=offsets,
                                 backend=backend)
    per_token = ("u", "delta", "z", "C") + (("B",) if layout_B != "static" else ())
    for i, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        piece = {k: (v[:, start:end] if k in per_token else v) for k, v in x.items() if k != "initial_state"}
        y_i, S_i = scan("reference", initial_state=x["initial_state"][i : i + 1], **piece)
        if end > start:
            assert_close(y[:, start:end], y_i, 1e-12)
        assert_close(S[i : i + 1], S_i, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_state_update_equals_sequence(backend):
    x = make_inputs(T=4, layout_B="shared", layout_C="grouped")
    y_seq, S_seq = scan(backend, **x)
    S = x["initial_state"]
    for t in range(4):
        y_t, S = rnnops.selective_state_update(S, x["u"][:, t], x["delta"][:, t], x["A"], x["B"][:, t], x["C"][:, t],
                                               x["D"], x["z"][:, t], x["delta_bias"], True, backend=backend)
        assert_close(y_t, y_seq[:, t], 1e-12)
    assert_close(S, S_seq, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("layout_B,layout_C", [("static", "grouped"), ("shared", "shared")])
def test_gradcheck(backend, layout_B, layout_C):
    x = make_inputs(B=1, T=5, Dm=3, N=2, layout_B=layout_B, layout_C=layout_C)
    if layout_C == "grouped":
        x["C"] = torch.randn(1, 5, 3, 2, dtype=D64)
    names = list(x)
    torch.autograd.gradcheck(
        lambda *args: scan(backend, **dict(zip(names, args))),
        tuple(v.requires_grad_() for v in x.values()),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_chunked_on_gpu(dtype, bound):
    x = make_inputs(B=2, T=500, Dm=96, N=16, dtype=torch.float32)
    ref_y, ref_S = scan("reference", **{k: v.double() for k, v in x.items()})
    cast = {k: (v.cuda().to(dtype) if k in ("u", "delta", "z") else v.cuda()) for k, v in x.items()}
    y, S = scan("chunked", **cast)
    assert_close(y.cpu(), ref_y, bound)
    assert_close(S.cpu(), ref_S, bound)
