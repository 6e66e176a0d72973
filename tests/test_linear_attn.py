import pytest
import torch
import torch.nn.functional as F

import rnnops
from conftest import assert_close, compare_backends, run_with_grads

D64 = torch.float64


def make_inputs(B=2, T=37, H=3, K=8, V=5, gate="none", dtype=D64, initial=True, gate_scale=1.0):
    x = {
        "q": torch.randn(B, T, H, K, dtype=dtype),
        "k": torch.randn(B, T, H, K, dtype=dtype),
        "v": torch.randn(B, T, H, V, dtype=dtype),
    }
    if gate == "scalar":
        x["g"] = -torch.rand(B, T, H, dtype=dtype) * gate_scale
    elif gate == "per-key":
        x["g"] = -torch.rand(B, T, H, K, dtype=dtype) * gate_scale
    if initial:
        x["initial_state"] = torch.randn(B, H, K, V, dtype=dtype)
    return x


def op(backend, chunk_size=16, **x):
    return rnnops.linear_attn(**x, output_final_state=True, chunk_size=chunk_size, backend=backend)


@pytest.mark.parametrize("gate", ["none", "scalar", "per-key"])
@pytest.mark.parametrize("T,chunk", [(1, 16), (37, 16), (48, 16), (20, 64)])
@pytest.mark.parametrize("initial", [True, False])
def test_chunked_matches_reference_float64(gate, T, chunk, initial):
    x = make_inputs(T=T, gate=gate, initial=initial)
    compare_backends(lambda backend, **kw: op(backend, chunk, **kw), x, 1e-10)


@pytest.mark.parametrize("gate", ["none", "scalar", "per-key"])
def test_chunked_matches_reference_float32(gate):
    x = make_inputs(B=1, T=100, H=2, K=16, V=32, gate=gate, dtype=torch.float32)
    compare_backends(lambda backend, **kw: op(backend, 32, **kw), x, 1e-5)


@pytest.mark.parametrize("gate", ["scalar", "per-key"])
@pytest.mark.parametrize("dtype,bound", [(D64, 1e-10), (torch.float32, 1e-5)])
def test_strong_decay_is_stable(gate, dtype, bound):
    """g down to -20 per step: nothing overflows, forward or backward."""
    x = make_inputs(T=70, gate=gate, gate_scale=20.0, dtype=dtype)
    compare_backends(lambda backend, **kw: op(backend, 64, **kw), x, bound)


def test_per_key_decay_takes_both_score_paths():
    """Mild decays use one factored matmul, strong ones the sub-blocks; both agree with the reference."""
    from rnnops.chunked import linear_attn as chunked

    for scale, expect_fast in ((0.01, True), (30.0, False)):
        q, k = torch.randn(2, 32, 8, dtype=D64), torch.randn(2, 32, 8, dtype=D64)
        G = (-torch.rand(2, 32, 8, dtype=D64) * scale).cumsum(-2)
        span = (G[..., 0, :] - G[..., -1, :]).max().item()
        assert (span <= chunked.FACTOR_LIMIT[D64]) == expect_fast
        causal = torch.ones(32, 32, dtype=torch.bool).tril()
        expected = torch.einsum("id,jd,ijd->ij", q[0], k[0], (G[0, :, None] - G[0, None]).clamp_max(0).exp()) * causal
        assert_close(chunked.gated_scores(q, k, G, causal)[0], expected, 1e-12)


def test_zero_decay_equals_plain():
    x = make_inputs(gate="scalar")
    x["g"] = torch.zeros_like(x["g"])
    plain = {k: v for k, v in x.items() if k != "g"}
    for backend in ("reference", "chunked"):
        a, b = op(backend, **x), op(backend, **plain)
        assert_close(a[0], b[0], 1e-12)
        assert_close(a[1], b[1], 1e-12)


def test_default_scale_and_explicit_scale():
    x = make_inputs(initial=False)
    o_default, _ = rnnops.linear_attn(x["q"], x["k"], x["v"])
    o_scaled, _ = rnnops.linear_attn(x["q"] * 8**-0.5, x["k"], x["v"], scale=1.0)
    assert_close(o_default, o_scaled, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("gate", ["none", "scalar", "per-key"])
def test_resumable_in_two_halves(backend, gate):
    x = make_inputs(T=30, gate=gate)
    whole_o, whole_S = op(backend, 8, **x)
    cut = 13
    first = {k: (v[:, :cut] if k != "initial_state" else v) for k, v in x.items()}
    second = {k: v[:, cut:] for k, v in x.items() if k != "initial_state"}
    o1, S1 = op(backend, 8, **first)
    o2, S2 = op(backend, 8, initial_state=S1, **second)
    assert_close(torch.cat([o1, o2], 1), whole_o, 1e-12)
    assert_close(S2, whole_S, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("gate", ["none", "per-key"])
def test_varlen_equals_separate_sequences(backend, gate):
    lengths = [5, 0, 17, 1, 9]
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x = make_inputs(B=1, T=sum(lengths), gate=gate, initial=False)
    x["initial_state"] = torch.randn(len(lengths), 3, 8, 5, dtype=D64)
    o, S = op(backend, 4, cu_seqlens=offsets, **x)
    for i, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        piece = {k: v[:, start:end] for k, v in x.items() if k != "initial_state"}
        o_i, S_i = op("reference", initial_state=x["initial_state"][i : i + 1], **piece)
        if end > start:
            assert_close(o[:, start:end], o_i, 1e-12)
        assert_close(S[i : i + 1], S_i, 1e-12)


def test_varlen_gradients_match_reference():
    offsets = torch.tensor([0, 6, 6, 19])
    x = make_inputs(B=1, T=19, gate="scalar", initial=False)
    x["initial_state"] = torch.randn(3, 3, 8, 5, dtype=D64)
    compare_backends(lambda backend, **kw: op(backend, 4, cu_seqlens=offsets, **kw), x, 1e-10)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_value_scale_and_skip(backend):
    """v_scale s (B, T, H) and skip (H, V): the same as v * s and o + skip * v, outputs and
    gradients (s's and skip's too)."""
    x = make_inputs(gate="scalar")
    x["v_scale"] = torch.rand(x["v"].shape[:3], dtype=D64)
    x["skip"] = torch.randn(x["v"].shape[2:], dtype=D64)

    def scaled_by_hand(backend, v, v_scale, skip, **kw):
        o, final = op(backend, v=v * v_scale[..., None], **kw)
        return o + skip * v, final

    compare_backends(lambda backend, **kw: op(backend, **kw), x, 1e-12, test=backend)
    got, grads = run_with_grads(lambda **kw: op(backend, **kw), x)
    want, grads_want = run_with_grads(lambda **kw: scaled_by_hand(backend, **kw), x)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, 1e-12)
    for name in grads_want:
        assert_close(grads[name], grads_want[name], 1e-12, name)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("grouped", [False, True], ids=["heads", "grouped-heads"])
def test_step_equals_one_token(backend, grouped):
    """Also with grouped heads (q and k with one head for v's three): the same as the sequence,
    and as the sequence with q and k repeated per value head."""
    x = make_inputs(T=4, gate="per-key")
    if grouped:
        x["q"], x["k"] = x["q"][:, :, :1], x["k"][:, :, :1]
        repeated = dict(x, q=x["q"].repeat_interleave(3, dim=2), k=x["k"].repeat_interleave(3, dim=2))
        for want, got in zip(op("reference", **repeated), op(backend, **x), strict=True):
            assert_close(got, want, 1e-12)
    o_seq, S_seq = op(backend, **x)
    S = x["initial_state"]
    for t in range(4):
        o_t, S = rnnops.linear_attn_step(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["g"][:, t], state=S, backend=backend)
        assert_close(o_t, o_seq[:, t], 1e-12)
    assert_close(S, S_seq, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("gate", ["none", "scalar", "per-key"])
def test_gradcheck(backend, gate):
    x = make_inputs(B=1, T=5, H=2, K=3, V=2, gate=gate)
    names = list(x)
    torch.autograd.gradcheck(
        lambda *args: op(backend, 2, **dict(zip(names, args))),
        tuple(v.requires_grad_() for v in x.values()),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    x = make_inputs(B=1, T=40, H=2, K=16, V=16, gate="scalar", dtype=torch.float32)
    ref_o, ref_S = op("reference", **x)
    low = {k: v.to(dtype) for k, v in x.items()}
    o, S = op("chunked", **low)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert_close(o, ref_o, 2e-2)
    assert_close(S, ref_S, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_chunked_on_gpu(dtype, bound):
    x = make_inputs(B=2, T=300, H=4, K=64, V=64, gate="per-key", dtype=torch.float32)
    x["k"] = F.normalize(x["k"], dim=-1)
    ref_o, ref_S = op("reference", 64, **{k: v.double() for k, v in x.items()})
    o, S = op("chunked", 64, **{k: v.cuda().to(dtype) for k, v in x.items()})
    assert_close(o.cpu(), ref_o, bound)
    assert_close(S.cpu(), ref_S, bound)
