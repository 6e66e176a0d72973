"""rnnops.compat: the peers' signatures and layouts, checked against the peers' own pure-PyTorch
references (fla, FlashRNN: installed with the test extra) or mamba_ssm's layout written out."""
import pytest
import torch
import torch.nn.functional as F

import rnnops
from conftest import assert_close
from rnnops.compat import fla, flashrnn, mamba_ssm

D64 = torch.float64


def _qkv(B=2, T=13, H=3, K=8, V=6):
    return torch.randn(B, T, H, K, dtype=D64), F.normalize(torch.randn(B, T, H, K, dtype=D64), dim=-1), \
        torch.randn(B, T, H, V, dtype=D64)


def test_chunk_gla_matches_fla_naive():
    naive = pytest.importorskip("fla.ops.gla.naive").naive_recurrent_gla
    q, k, v = _qkv()
    g = F.logsigmoid(torch.randn(2, 13, 3, 8, dtype=D64))
    S0 = torch.randn(2, 3, 8, 6, dtype=D64)
    o, S = fla.chunk_gla(q, k, v, g, initial_state=S0, output_final_state=True)
    o_ref, S_ref = naive(q, k, v, g, initial_state=S0, output_final_state=True)
    assert_close(o, o_ref, 1e-6)
    assert_close(S, S_ref, 1e-6)


def test_chunk_simple_gla_with_g_and_g_gamma():
    naive = pytest.importorskip("fla.ops.simple_gla.naive").naive_recurrent_simple_gla
    q, k, v = _qkv()
    g = F.logsigmoid(torch.randn(2, 13, 3, dtype=D64))
    assert_close(fla.chunk_simple_gla(q, k, v, g)[0], naive(q, k, v, g)[0], 1e-6)
    gamma = -torch.rand(3, dtype=D64)
    assert_close(fla.fused_recurrent_simple_gla(q, k, v, g_gamma=gamma)[0], naive(q, k, v, gamma.expand(2, 13, 3))[0],
                 1e-6)


def test_chunk_delta_rules_match_fla_naive():
    delta_naive = pytest.importorskip("fla.ops.delta_rule.naive").delta_rule_recurrence
    gated_naive = pytest.importorskip("fla.ops.gated_delta_rule.naive").naive_recurrent_gated_delta_rule
    q, k, v = _qkv()
    beta = torch.rand(2, 13, 3, dtype=D64)
    o_ref = delta_naive(*(x.transpose(1, 2) for x in (q, k, v, beta)))[0].transpose(1, 2)
    assert_close(fla.chunk_delta_rule(q, k, v, beta)[0], o_ref, 1e-6)
    g = F.logsigmoid(torch.randn(2, 13, 3, dtype=D64))
    logits = torch.randn(2, 13, 3, dtype=D64)
    o, _ = fla.chunk_gated_delta_rule(q, k, v, g, logits, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
    assert_close(o, gated_naive(q, k, v, 2 * torch.sigmoid(logits), g)[0], 1e-6)


def test_gated_delta_product_takes_flas_interleaved_layout_as_a_view():
    naive = pytest.importorskip("fla.ops.gated_delta_product.naive").naive_recurrent_gated_delta_product
    q, _, _ = _qkv()
    k = F.normalize(torch.randn(2, 26, 3, 8, dtype=D64), dim=-1)
    v, beta = torch.randn(2, 26, 3, 6, dtype=D64), torch.rand(2, 26, 3, dtype=D64)
    g = F.logsigmoid(torch.randn(2, 13, 3, dtype=D64))
    o, _ = fla.chunk_gated_delta_product(q, k, v, g, beta, num_householder=2)
    assert_close(o, naive(q, k, v, g, beta, scale=8**-0.5, num_householder=2)[0], 1e-6)


def test_fla_refuses_what_rnnops_lacks():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="state_v_first=True is not supported"):
        fla.chunk_gla(q, k, v, -torch.rand_like(q), state_v_first=True)
    with pytest.raises(ValueError, match="grouped value heads"):
        fla.chunk_delta_rule(q, k, torch.randn(2, 13, 6, 6, dtype=D64), torch.rand(2, 13, 3, dtype=D64))
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['head_first'\\]"):
        fla.chunk_gla(q, k, v, -torch.rand_like(q), head_first=True)


def _mamba_loop(u, delta, A, B, C, D, z, delta_bias):
    """mamba_ssm's semantics written in its own layout: u, delta, z [B, D, L], B [B, G, N, L]."""
    batch, dim, length = u.shape
    dt = F.softplus(delta + delta_bias[:, None])
    Bx = B.repeat_interleave(dim // B.shape[1], dim=1)
    x = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        x = torch.exp(dt[:, :, t, None] * A) * x + (dt[:, :, t] * u[:, :, t])[..., None] * Bx[..., t]
        ys.append((x * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, dim=2) + D[:, None] * u) * F.silu(z), x


def test_selective_scan_fn_in_mambas_layout_without_copies():
    u, delta, z = (torch.randn(2, 6, 11, dtype=D64) for _ in range(3))
    A, B, C = -torch.rand(6, 4, dtype=D64), torch.randn(2, 3, 4, 11, dtype=D64), torch.randn(2, 4, 11, dtype=D64)
    D, bias = torch.randn(6, dtype=D64), torch.randn(6, dtype=D64)
    y, last = mamba_ssm.selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)
    y_ref, last_ref = _mamba_loop(u, delta, A, B, C, D, z, bias)
    assert y.shape == (2, 6, 11)
    assert_close(y, y_ref, 1e-10)
    assert_close(last, last_ref, 1e-10)
    assert_close(mamba_ssm.selective_scan_ref(u, delta, A, B, C, D, z, bias, True), y_ref, 1e-10)
    with pytest.raises(ValueError, match="complex A"):
        mamba_ssm.selective_scan_fn(u, delta, A.to(torch.complex128), B, C)


def _mamba_inputs(device, dtype, groups=1):
    """Inputs in mamba_ssm's layout: u, delta, z [B, D, L]; B, C [B, G, N, L]; A, D, bias fp32."""
    def make(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    u, delta, z = make(2, 64, 37), make(2, 64, 37, scale=0.5), make(2, 64, 37)
    B, C = make(2, groups, 8, 37), make(2, groups, 8, 37)
    A = (-torch.rand(64, 8, device=device) - 0.1).requires_grad_()
    D, bias = torch.randn(64, device=device).requires_grad_(), torch.randn(64, device=device).requires_grad_()
    return u, delta, A, B, C, D, z, bias


def _against_mamba(function_name, device, dtype, bound, groups=1):
    """rnnops.compat.mamba_ssm's function against the installed mamba_ssm's: outputs, last state
    and every gradient."""
    interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    torch.manual_seed(0)
    inputs = _mamba_inputs(device, dtype, groups)
    results = []
    for function in (getattr(mamba_ssm, function_name), getattr(interface, function_name)):
        args = [x.detach().clone().requires_grad_() for x in inputs]
        y, last = function(*args, delta_softplus=True, return_last_state=True)
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device=device)).sum().backward()
        results.append((y, last, [x.grad for x in args]))
    (y, last, grads), (y_peer, last_peer, grads_peer) = results
    assert_close(y.float(), y_peer.float(), bound)
    assert_close(last.float(), last_peer.float(), bound)
    for name, grad, grad_peer in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), grads, grads_peer):
        assert grad is not None and grad_peer is not None, name
        assert_close(grad.float(), grad_peer.float(), bound)


def test_selective_scan_ref_matches_mambas_own():
    """Where mamba_ssm is installed (the GPU suite's wheel, bench/build_mamba_ssm.sh)."""
    _against_mamba("selective_scan_ref", torch.device("cpu"), torch.float32, 1e-5, groups=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2e-4), (torch.bfloat16, 2e-2)], ids=["float32", "bfloat16"])
def test_selective_scan_fn_matches_mambas_cuda_kernel(dtype, bound):
    """The drop-in against mamba_ssm's CUDA selective_scan_fn itself (its exponentials are fast-math
    approximations: float32 agrees to about 1e-5)."""
    _against_mamba("selective_scan_fn", torch.device("cuda"), dtype, bound)


def test_selective_state_update_is_in_place():
    state = torch.randn(2, 6, 4, dtype=D64)
    x, dt = torch.randn(2, 6, dtype=D64), torch.randn(2, 6, dtype=D64)
    A, B, C = -torch.rand(6, 4, dtype=D64), torch.randn(2, 4, dtype=D64), torch.randn(2, 4, dtype=D64)
    expected, new_state = rnnops.selective_state_update(state.clone(), x, dt, A, B, C, delta_softplus=True)
    out = mamba_ssm.selective_state_update(state, x, dt, A, B, C, dt_softplus=True)
    assert_close(out, expected, 1e-12)
    assert_close(state, new_state, 1e-12)
    with pytest.raises(ValueError, match="multi-head layout"):
        mamba_ssm.selective_state_update(torch.randn(2, 3, 6, 4, dtype=D64), x, dt, A, B, C)


@pytest.mark.parametrize("function", ["lstm", "gru"])
def test_flashrnn_matches_its_vanilla_backend(function):
    peer = pytest.importorskip("flashrnn").flashrnn
    G = {"lstm": 4, "gru": 3}[function]
    Wx = torch.randn(2, 7, G, 2, 16)
    R = torch.randn(G, 2, 16, 16) * 0.2
    b = torch.randn(G + (1 if function == "gru" else 0), 2, 16) * 0.1
    S = 2 if function == "lstm" else 1
    states = torch.randn(S, 2, 1, 2, 16)
    h, last = flashrnn.flashrnn(Wx, R, b, states, function=function, dtype="float32")
    h_ref, last_ref = peer(Wx, R, b, states, function=function, backend="vanilla", dtype="float32")
    assert h.shape == (1,) + h_ref.shape[1:] and last.shape == last_ref.shape
    assert_close(h[0], h_ref[0], 1e-5)
    assert_close(last, last_ref, 1e-5)


def test_flashrnn_refuses_slstm():
    with pytest.raises(ValueError, match="function='slstm' is not supported"):
        flashrnn.flashrnn(torch.randn(1, 2, 4, 1, 16), torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16),
                          function="slstm")


def _compat_calls():
    q, k, v = _qkv()
    g_key, g = F.logsigmoid(torch.randn(2, 13, 3, 8, dtype=D64)), F.logsigmoid(torch.randn(2, 13, 3, dtype=D64))
    beta = torch.rand(2, 13, 3, dtype=D64)
    u, delta = torch.randn(2, 6, 11, dtype=D64), torch.rand(2, 6, 11, dtype=D64)
    A, B = -torch.rand(6, 4, dtype=D64), torch.randn(2, 4, 11, dtype=D64)
    state = torch.randn(2, 6, 4, dtype=D64)
    Wx, R, b = torch.randn(2, 7, 3, 2, 16), 0.2 * torch.randn(3, 2, 16, 16), torch.randn(4, 2, 16)  # gru
    return {
        "chunk_gla": lambda: fla.chunk_gla(q, k, v, g_key, output_final_state=True),
        "chunk_simple_gla": lambda: fla.chunk_simple_gla(q, k, v, g),
        "chunk_delta_rule": lambda: fla.chunk_delta_rule(q, k, v, beta),
        "chunk_gated_delta_rule": lambda: fla.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True),
        "selective_scan_fn": lambda: mamba_ssm.selective_scan_fn(u, delta, A, B, B, return_last_state=True),
        "selective_state_update": lambda: mamba_ssm.selective_state_update(state.clone(), u[..., 0], delta[..., 0], A,
                                                                           B[..., 0], B[..., 0]),
        "flashrnn": lambda: flashrnn.flashrnn(Wx, R, b, function="gru", dtype="float32"),
    }


@pytest.mark.parametrize("name", list(_compat_calls()))
def test_compat_functions_compile_without_graph_breaks(name):
    torch._dynamo.reset()
    call = _compat_calls()[name]
    want, got = call(), torch.compile(call, fullgraph=True, backend="aot_eager")()
    if isinstance(want, torch.Tensor):
        want, got = (want,), (got,)
    for a, b in zip(got, want, strict=True):
        if b is not None:
            assert_close(a, b, 1e-12 if b.dtype == D64 else 1e-6, name)
