"""rnnops.compat: the peers' signatures and layouts, checked against the peers' own pure-PyTorch
references (fla, FlashRNN: installed with the test extra) or mamba_ssm's layout written out."""
import pytest
import torch
import torch.nn.functional as F

import rnnops
from conftest import assert_close, run_with_grads
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


def test_fla_functions_take_grouped_value_heads():
    """fla's GVA: q and k with 2 heads, v, g (and g_gamma), beta with 6; each q / k head serves 3
    consecutive value heads."""
    q, k, v = _qkv(H=6)
    q, k = q[:, :, :2], k[:, :, :2]
    g_key, g = F.logsigmoid(torch.randn(2, 13, 6, 8, dtype=D64)), F.logsigmoid(torch.randn(2, 13, 6, dtype=D64))
    q6, k6 = q.repeat_interleave(3, dim=2), k.repeat_interleave(3, dim=2)
    assert_close(fla.chunk_gla(q, k, v, g_key)[0], rnnops.linear_attn(q6, k6, v, g_key)[0], 1e-12)
    gamma = F.logsigmoid(torch.randn(6, dtype=D64))
    assert_close(fla.chunk_simple_gla(q, k, v, g_gamma=gamma)[0],
                 rnnops.linear_attn(q6, k6, v, gamma.expand(2, 13, 6))[0], 1e-12)
    assert_close(fla.chunk_simple_gla(q, k, v, g)[0], rnnops.linear_attn(q6, k6, v, g)[0], 1e-12)
    beta = torch.rand(2, 13, 6, dtype=D64)
    k, k6 = F.normalize(k, dim=-1), F.normalize(k6, dim=-1)
    assert_close(fla.chunk_delta_rule(q, k, v, beta)[0], rnnops.delta_rule(q6, k6, v, beta)[0], 1e-12)
    assert_close(fla.chunk_gated_delta_rule(q, k, v, g, beta)[0], rnnops.delta_rule(q6, k6, v, beta, g)[0], 1e-12)


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
    with pytest.raises(ValueError, match="q and k have 3 heads, which must divide v's 4"):
        fla.chunk_delta_rule(q, k, torch.randn(2, 13, 4, 6, dtype=D64), torch.rand(2, 13, 4, dtype=D64))
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


def test_selective_state_update_multi_head_layout():
    """Mamba-2's decoding step (state [B, nheads, dim, N], stride-0 expansions over dim and N as
    its module passes them, a state cache indexed by state_batch_indices) against the same step
    written out per head."""
    batch, heads, dim, N, groups, slots = 2, 4, 3, 5, 2, 5
    state = torch.randn(slots, heads, dim, N, dtype=D64)
    x, z = torch.randn(batch, heads, dim, dtype=D64), torch.randn(batch, heads, dim, dtype=D64)
    dt = torch.randn(batch, heads, dtype=D64)[..., None].expand(batch, heads, dim)
    A = -torch.rand(heads, dtype=D64)[:, None, None].expand(heads, dim, N)
    D, bias = (torch.randn(heads, dtype=D64)[:, None].expand(heads, dim) for _ in range(2))
    B, C = torch.randn(batch, groups, N, dtype=D64), torch.randn(batch, groups, N, dtype=D64)
    index = torch.tensor([3, 1])
    expected_state = state.clone()
    step = F.softplus(dt + bias)
    head_B, head_C = (M.repeat_interleave(heads // groups, dim=1)[:, :, None] for M in (B, C))  # (batch, heads, 1, N)
    new = torch.exp(step[..., None] * A) * state[index] + (step * x)[..., None] * head_B
    expected_state[index] = new
    expected = ((new * head_C).sum(-1) + D * x) * F.silu(z)
    out = mamba_ssm.selective_state_update(state, x, dt, A, B, C, D, z, bias, dt_softplus=True,
                                           state_batch_indices=index)
    assert_close(out, expected, 1e-12)
    assert_close(state, expected_state, 1e-12)
    with pytest.raises(ValueError, match=r"\(nheads, dim\) = \(4, 3\)"):
        mamba_ssm.selective_state_update(state[:batch], x.reshape(batch, 3, 4), dt, A, B, C)


def _ssd_loop(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, dt_softplus=False,
              dt_limit=(0.0, float("inf"))):
    """Mamba-2's SSD written out step by step in its layouts (fp64): returns out, each row's final
    state, and the state at the end of every sequence (row-major)."""
    batch, length, heads, P = x.shape
    repeat = heads // B.shape[2]
    dt = dt + (0 if dt_bias is None else dt_bias)
    dt = (F.softplus(dt) if dt_softplus else dt).clamp(*dt_limit)
    out, finals, ends = torch.empty_like(x), [], []
    for b in range(batch):
        h = torch.zeros(heads, P, B.shape[-1], dtype=x.dtype)
        if initial_states is not None and (seq_idx is None or seq_idx[b, 0] == 0):
            h = initial_states[b]
        for t in range(length):
            if seq_idx is not None and t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                ends.append(h)
                h = torch.zeros_like(h)
            Bt, Ct = (M[b, t].repeat_interleave(repeat, dim=0) for M in (B, C))  # (heads, N)
            h = torch.exp(dt[b, t] * A)[:, None, None] * h + (dt[b, t, :, None] * x[b, t])[..., None] * Bt[:, None]
            y = (h * Ct[:, None]).sum(-1)
            if D is not None:
                y = y + x[b, t] * (D if D.dim() == 2 else D[:, None])
            out[b, t] = y * (1 if z is None else F.silu(z[b, t]))
        ends.append(h)
        finals.append(h)
    return out, torch.stack(finals), torch.stack(ends)


def _ssd_inputs(batch=2, length=23, heads=4, P=6, groups=2, N=5):
    make = (lambda *shape: torch.randn(*shape, dtype=D64).requires_grad_())
    return {"x": make(batch, length, heads, P),
            "dt": (torch.randn(batch, length, heads, dtype=D64) - 1).requires_grad_(),
            "A": (-torch.rand(heads, dtype=D64) - 0.2).requires_grad_(), "B": make(batch, length, groups, N),
            "C": make(batch, length, groups, N), "D": make(heads, P), "z": make(batch, length, heads, P),
            "dt_bias": make(heads), "initial_states": make(batch, heads, P, N)}


@pytest.mark.parametrize("variant", ["plain", "all options", "seq_idx", "varlen"])
def test_mamba_chunk_scan_combined_matches_the_recurrence(variant):
    """Outputs, final and varlen states and every gradient, against the step-by-step recurrence."""
    torch.manual_seed(0)
    x = _ssd_inputs(batch=1 if variant == "varlen" else 2)
    options = {}
    if variant == "plain":
        x = {k: x[k] for k in ("x", "dt", "A", "B", "C")}
    else:
        options = {"dt_softplus": True, "dt_limit": (0.05, 1.5)}
    seq_idx = cu_seqlens = None
    if variant in ("seq_idx", "varlen"):
        seq_idx = torch.tensor([[0] * 5 + [1] * 9 + [2] * 9, [1] * 4 + [2] * 19][:x["x"].shape[0]])
    if variant == "varlen":
        cu_seqlens = torch.tensor([0, 5, 14, 23])

    def ours(**x):
        return mamba_ssm.mamba_chunk_scan_combined(**x, chunk_size=256, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                                   return_final_states=True,
                                                   return_varlen_states=cu_seqlens is not None, **options)

    def loop(**x):
        out, final, ends = _ssd_loop(**x, seq_idx=seq_idx, **options)
        return (out, final, ends) if cu_seqlens is not None else (out, final)

    if variant == "all options":  # the state-less form (no dt_limit)
        plain = {k: v.detach() for k, v in x.items() if k != "initial_states"}
        assert_close(mamba_ssm.mamba_chunk_scan(**plain, chunk_size=64, dt_softplus=True),
                     _ssd_loop(**plain, dt_softplus=True)[0], 1e-10)
    for backend in ("reference", "chunked"):
        got, grads = run_with_grads(lambda backend=backend, **x: ours(**x, backend=backend), x)
        want, grads_want = run_with_grads(loop, x)
        for a, b in zip(got, want, strict=True):
            assert_close(a, b, 1e-10, f"{variant} {backend}")
        for name in grads_want:
            assert_close(grads[name], grads_want[name], 1e-10, f"{variant} {backend} d{name}")


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "seq_idx"])
def test_mamba_chunk_scan_combined_on_the_triton_kernels(packed):
    """The Triton backend (the interpreter on a CPU) reads B and C as grouped q / k heads in
    place: float32 outputs, final states and every gradient against the fp64 recurrence."""
    torch.manual_seed(0)
    x = {k: v.detach().float() for k, v in _ssd_inputs(length=40, heads=4, P=16, groups=2, N=16).items()}
    seq_idx = torch.tensor([[0] * 17 + [1] * 23, [0] * 40]) if packed else None
    options = {"D": x.pop("D"), "z": x.pop("z"), "dt_bias": x.pop("dt_bias"), "dt_softplus": True, "seq_idx": seq_idx}
    got, grads = run_with_grads(lambda **x: mamba_ssm.mamba_chunk_scan_combined(
        **x, chunk_size=256, return_final_states=True, backend="triton", **options), x)
    want, grads_want = run_with_grads(lambda **x: _ssd_loop(**x, **options)[:2],
                                      {k: v.double() for k, v in x.items()})
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, 1e-5)
    for name in grads_want:
        assert_close(grads[name], grads_want[name], 1e-5, f"d{name}")


def test_mamba_chunk_scan_combined_matches_mambas_reference():
    """Where mamba_ssm is installed: its pure-PyTorch SSD (which computes dt in float32, hence
    the bound), grouped B and C, D per channel, z, dt_bias, softplus."""
    ssd = pytest.importorskip("mamba_ssm.ops.triton.ssd_combined")
    x = {k: v.detach() for k, v in _ssd_inputs(length=32).items() if k != "initial_states"}
    want = ssd.ssd_chunk_scan_combined_ref(**x, chunk_size=16, dt_softplus=True)
    assert_close(mamba_ssm.mamba_chunk_scan_combined(**x, chunk_size=16, dt_softplus=True), want, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)], ids=["float32", "bfloat16"])
def test_mamba_chunk_scan_combined_matches_mambas_triton_kernels(dtype, bound):
    """The drop-in against mamba_ssm's own SSD (Triton; its float32 products are tf32), a length
    that is no multiple of its chunk, grouped B and C: outputs, final states, every gradient."""
    ssd = pytest.importorskip("mamba_ssm.ops.triton.ssd_combined")
    torch.manual_seed(0)
    inputs = {k: v.detach().cuda() for k, v in _ssd_inputs(batch=2, length=300, heads=8, P=64, groups=2, N=64).items()}
    inputs = {k: v.to(dtype) if k in ("x", "B", "C", "z") else v.float() for k, v in inputs.items()}
    results = []
    for function in (mamba_ssm.mamba_chunk_scan_combined, ssd.mamba_chunk_scan_combined):
        args = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out, final = function(**args, chunk_size=256, dt_softplus=True, return_final_states=True)
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device="cuda")).sum().backward()
        results.append((out, final, {k: v.grad for k, v in args.items()}))
    (out, final, grads), (out_peer, final_peer, grads_peer) = results
    assert_close(out.float(), out_peer.float(), bound, "out")
    assert_close(final.float(), final_peer.float(), bound, "final_states")
    for name in grads:
        assert_close(grads[name].float(), grads_peer[name].float(), bound, f"d{name}")


def test_mamba_chunk_scan_combined_refuses_bad_input():
    x = {k: v.detach() for k, v in _ssd_inputs().items()}
    call = mamba_ssm.mamba_chunk_scan_combined
    with pytest.raises(ValueError, match="groups of B and C must divide"):
        call(x["x"], x["dt"], x["A"], x["B"][:, :, :1].expand(2, 23, 3, 5), x["C"][:, :, :1].expand(2, 23, 3, 5), 64)
    with pytest.raises(ValueError, match="A must lie in"):
        call(x["x"], x["dt"], -x["A"], x["B"], x["C"], 64)
    with pytest.raises(ValueError, match="return_varlen_states needs cu_seqlens"):
        call(x["x"], x["dt"], x["A"], x["B"], x["C"], 64, return_varlen_states=True)
    with pytest.raises(ValueError, match="batch size must be 1"):
        call(x["x"], x["dt"], x["A"], x["B"], x["C"], 64, cu_seqlens=torch.tensor([0, 23]), return_varlen_states=True)
    with pytest.raises(ValueError, match="different sequence boundaries"):
        call(*(x[k][:1] for k in ("x", "dt")), x["A"], x["B"][:1], x["C"][:1], 64,
             seq_idx=torch.zeros(1, 23, dtype=torch.int64), cu_seqlens=torch.tensor([0, 7, 23]),
             return_varlen_states=True)
    with pytest.raises(TypeError, match="seq_idx must be int32 or int64"):
        call(x["x"], x["dt"], x["A"], x["B"], x["C"], 64, seq_idx=torch.zeros(2, 23))
    with pytest.raises(ValueError, match="initial_states has shape"):
        call(x["x"], x["dt"], x["A"], x["B"], x["C"], 64, initial_states=x["initial_states"].transpose(-1, -2))


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
    ssd = {k: v.detach() for k, v in _ssd_inputs().items()}
    return {
        "chunk_gla": lambda: fla.chunk_gla(q, k, v, g_key, output_final_state=True),
        "chunk_simple_gla": lambda: fla.chunk_simple_gla(q, k, v, g),
        "chunk_delta_rule": lambda: fla.chunk_delta_rule(q, k, v, beta),
        "chunk_gated_delta_rule": lambda: fla.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True),
        "selective_scan_fn": lambda: mamba_ssm.selective_scan_fn(u, delta, A, B, B, return_last_state=True),
        "selective_state_update": lambda: mamba_ssm.selective_state_update(state.clone(), u[..., 0], delta[..., 0], A,
                                                                           B[..., 0], B[..., 0]),
        "flashrnn": lambda: flashrnn.flashrnn(Wx, R, b, function="gru", dtype="float32"),
        "mamba_chunk_scan_combined": lambda: mamba_ssm.mamba_chunk_scan_combined(
            *(ssd[k] for k in ("x", "dt", "A", "B", "C")), 256, D=ssd["D"], z=ssd["z"], dt_softplus=True,
            initial_states=ssd["initial_states"], return_final_states=True),
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
