import pytest
import torch
import torch.nn.functional as F

import rnnops
from conftest import assert_close, compare_backends

D64 = torch.float64


def make_inputs(B=2, T=37, H=3, K=8, V=5, gated=False, num_householder=None, dtype=D64, initial=True,
                beta_max=1.0, gate_scale=1.0):
    extra = () if num_householder is None else (num_householder,)
    x = {
        "q": torch.randn(B, T, H, K, dtype=dtype),
        "k": F.normalize(torch.randn((B, T) + extra + (H, K), dtype=dtype), dim=-1),
        "v": torch.randn((B, T) + extra + (H, V), dtype=dtype),
        "beta": torch.rand((B, T) + extra + (H,), dtype=dtype) * beta_max,
    }
    if gated:
        x["g"] = -torch.rand(B, T, H, dtype=dtype) * gate_scale
    if initial:
        x["initial_state"] = torch.randn(B, H, K, V, dtype=dtype)
    return x


def delta(backend, chunk_size=16, **x):
    return rnnops.delta_rule(**x, output_final_state=True, chunk_size=chunk_size, allow_neg_eigval=True,
                             backend=backend)


def product(backend, chunk_size=16, num_householder=2, **x):
    return rnnops.delta_product(**x, num_householder=num_householder, output_final_state=True,
                                chunk_size=chunk_size, allow_neg_eigval=True, backend=backend)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T,chunk", [(1, 16), (37, 16), (32, 16), (20, 64)])
@pytest.mark.parametrize("initial", [True, False])
def test_delta_rule_chunked_matches_reference_float64(gated, T, chunk, initial):
    x = make_inputs(T=T, gated=gated, initial=initial)
    compare_backends(lambda backend, **kw: delta(backend, chunk, **kw), x, 1e-10)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("beta_max", [1.0, 2.0])
def test_delta_rule_chunked_matches_reference_float32(gated, beta_max):
    x = make_inputs(B=1, T=100, H=2, K=16, V=32, gated=gated, dtype=torch.float32, beta_max=beta_max)
    compare_backends(lambda backend, **kw: delta(backend, 32, **kw), x, 1e-5)


def test_strong_gate_is_stable():
    x = make_inputs(T=70, gated=True, gate_scale=20.0, dtype=torch.float32)
    compare_backends(lambda backend, **kw: delta(backend, 64, **kw), x, 1e-5)


@pytest.mark.parametrize("num_householder", [1, 2, 3])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T", [1, 19])
def test_delta_product_chunked_matches_reference(num_householder, gated, T):
    x = make_inputs(T=T, gated=gated, num_householder=num_householder, beta_max=2.0)
    compare_backends(lambda backend, **kw: product(backend, 8, num_householder, **kw), x, 1e-10)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("gated", [False, True])
def test_delta_product_with_one_step_equals_delta_rule(backend, gated):
    x = make_inputs(gated=gated, num_householder=1)
    o_p, S_p = product(backend, num_householder=1, **x)
    squeezed = {k: (v.squeeze(2) if k in ("k", "v", "beta") else v) for k, v in x.items()}
    o_d, S_d = delta(backend, **squeezed)
    assert_close(o_p, o_d, 1e-12)
    assert_close(S_p, S_d, 1e-12)


def test_delta_product_matches_householder_products():
    """Independent check: S_t = prod_j (I - beta_j k_j k_j^T) S + ..., written as explicit matrices."""
    x = make_inputs(B=1, T=6, H=1, K=4, V=3, gated=True, num_householder=3, beta_max=2.0)
    o, S_final = product("chunked", 4, 3, **x)
    S = x["initial_state"][0, 0]
    for t in range(6):
        S = torch.exp(x["g"][0, t, 0]) * S
        for j in range(3):
            k, v, b = x["k"][0, t, j, 0], x["v"][0, t, j, 0], x["beta"][0, t, j, 0]
            S = (torch.eye(4, dtype=D64) - b * torch.outer(k, k)) @ S + b * torch.outer(k, v)
        assert_close(o[0, t, 0], 4**-0.5 * S.T @ x["q"][0, t, 0], 1e-12)
    assert_close(S_final[0, 0], S, 1e-12)


def test_qk_l2norm_equals_normalising_first():
    x = make_inputs(initial=False)
    x["k"] = x["k"] * 3.0
    a = delta("chunked", qk_l2norm=True, **x)
    normalised = dict(x, q=F.normalize(x["q"], dim=-1), k=F.normalize(x["k"], dim=-1))
    b = delta("reference", **normalised)
    assert_close(a[0], b[0], 1e-12)
    assert_close(a[1], b[1], 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("gated", [False, True])
def test_resumable_in_two_halves(backend, gated):
    x = make_inputs(T=30, gated=gated)
    whole_o, whole_S = delta(backend, 8, **x)
    cut = 11
    first = {k: (v[:, :cut] if k != "initial_state" else v) for k, v in x.items()}
    second = {k: v[:, cut:] for k, v in x.items() if k != "initial_state"}
    o1, S1 = delta(backend, 8, **first)
    o2, S2 = delta(backend, 8, initial_state=S1, **second)
    assert_close(torch.cat([o1, o2], 1), whole_o, 1e-12)
    assert_close(S2, whole_S, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_delta_product_resumable(backend):
    x = make_inputs(T=14, gated=True, num_householder=2)
    whole_o, whole_S = product(backend, 4, **x)
    first = {k: (v[:, :5] if k != "initial_state" else v) for k, v in x.items()}
    second = {k: v[:, 5:] for k, v in x.items() if k != "initial_state"}
    o1, S1 = product(backend, 4, **first)
    o2, S2 = product(backend, 4, initial_state=S1, **second)
    assert_close(torch.cat([o1, o2], 1), whole_o, 1e-12)
    assert_close(S2, whole_S, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("num_householder", [None, 2])
def test_varlen_equals_separate_sequences(backend, num_householder):
    lengths = [4, 0, 13, 1, 7]
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x = make_inputs(B=1, T=sum(lengths), gated=True, num_householder=num_householder, initial=False)
    x["initial_state"] = torch.randn(len(lengths), 3, 8, 5, dtype=D64)
    run = delta if num_householder is None else product
    o, S = run(backend, 4, cu_seqlens=offsets, **x)
    for i, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        piece = {k: v[:, start:end] for k, v in x.items() if k != "initial_state"}
        o_i, S_i = run("reference", initial_state=x["initial_state"][i : i + 1], **piece)
        if end > start:
            assert_close(o[:, start:end], o_i, 1e-12)
        assert_close(S[i : i + 1], S_i, 1e-12)


def test_varlen_gradients_match_reference():
    offsets = torch.tensor([0, 6, 6, 19])
    x = make_inputs(B=1, T=19, gated=True, initial=False)
    x["initial_state"] = torch.randn(3, 3, 8, 5, dtype=D64)
    compare_backends(lambda backend, **kw: delta(backend, 4, cu_seqlens=offsets, **kw), x, 1e-10)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("grouped", [False, True], ids=["heads", "grouped-heads"])
def test_steps_equal_sequence(backend, grouped):
    """Also with grouped heads (q and k with one head for v's three), where the sequence equals
    the sequence with q and k repeated per value head."""
    def group(x):
        if grouped:
            x["q"], x["k"] = x["q"][..., :1, :], x["k"][..., :1, :]
        return x

    if grouped:
        x = group(make_inputs(T=4, gated=True, num_householder=2))
        repeated = dict(x, q=x["q"].repeat_interleave(3, dim=-2), k=x["k"].repeat_interleave(3, dim=-2))
        for want, got in zip(product("reference", **repeated), product(backend, **x), strict=True):
            assert_close(got, want, 1e-12)
    x = group(make_inputs(T=4, gated=True))
    o_seq, S_seq = delta(backend, **x)
    S = x["initial_state"]
    for t in range(4):
        o_t, S = rnnops.delta_rule_step(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["beta"][:, t], x["g"][:, t],
                                        state=S, backend=backend)
        assert_close(o_t, o_seq[:, t], 1e-12)
    assert_close(S, S_seq, 1e-12)
    y = group(make_inputs(T=3, gated=True, num_householder=2))
    o_seq, S_seq = product(backend, **y)
    S = y["initial_state"]
    for t in range(3):
        o_t, S = rnnops.delta_product_step(y["q"][:, t], y["k"][:, t], y["v"][:, t], y["beta"][:, t], y["g"][:, t],
                                           num_householder=2, state=S, backend=backend)
        assert_close(o_t, o_seq[:, t], 1e-12)
    assert_close(S, S_seq, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("num_householder", [None, 2])
def test_gradcheck(backend, num_householder):
    x = make_inputs(B=1, T=5, H=2, K=3, V=2, gated=True, num_householder=num_householder)
    names = list(x)
    run = delta if num_householder is None else product
    torch.autograd.gradcheck(
        lambda *args: run(backend, 2, **dict(zip(names, args))),
        tuple(v.requires_grad_() for v in x.values()),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_chunked_on_gpu(dtype, bound):
    x = make_inputs(B=2, T=300, H=4, K=64, V=64, gated=True, dtype=torch.float32)
    ref_o, ref_S = delta("reference", 64, **{k: v.double() for k, v in x.items()})
    o, S = delta("chunked", 64, **{k: v.cuda().to(dtype) for k, v in x.items()})
    assert_close(o.cpu(), ref_o, bound)
    assert_close(S.cpu(), ref_S, bound)
