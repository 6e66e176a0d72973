"""Triton delta rule and DeltaProduct against the float64 reference: forward and every gradient
(interpreter on the CPU, poisoned outputs; bfloat16 on GPUs only, see test_triton_linear_attn)."""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import rnnops
from conftest import as_float64, assert_close, compare_backends, packed_sequences
from rnnops.autotune import cache, hardware, kernels
from rnnops.triton_backend import delta_rule as triton_delta_rule
from rnnops.triton_backend import linear_attn as triton_linear_attn
from rnnops.triton_kernels.delta_rule import _unit_lower_inverse


def make_inputs(B=2, T=40, H=2, K=16, V=32, gated=False, num_householder=None, dtype=torch.float32, initial=True,
                gate_scale=1.0, beta_max=1.0, device="cpu"):
    steps = () if num_householder is None else (num_householder,)
    x = {"q": torch.randn(B, T, H, K), "k": F.normalize(torch.randn((B, T) + steps + (H, K)), dim=-1),
         "v": torch.randn((B, T) + steps + (H, V)), "beta": torch.rand((B, T) + steps + (H,)) * beta_max}
    if gated:
        x["g"] = -torch.rand(B, T, H) * gate_scale
    x = {k: v.to(device=device, dtype=dtype) for k, v in x.items()}
    if initial:
        x["initial_state"] = torch.randn(B, H, K, V, device=device)
    return x


def delta(backend, chunk_size=16, cu_seqlens=None, final=True, **x):
    return rnnops.delta_rule(**x, output_final_state=final, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                             allow_neg_eigval=True, backend=backend)


def product(backend, chunk_size=16, num_householder=2, cu_seqlens=None, **x):
    return rnnops.delta_product(**x, num_householder=num_householder, output_final_state=True,
                                chunk_size=chunk_size, cu_seqlens=cu_seqlens, allow_neg_eigval=True, backend=backend)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("shape", [
    dict(T=40), dict(T=1), dict(T=70, chunk=32), dict(T=150, chunk=64), dict(K=48, V=16, H=3, initial=False),
    dict(T=20, final=False), dict(beta_max=2.0),
], ids=["T40", "T1", "T70-chunk32", "T150-chunk64", "K48-V16-H3-no-initial", "no-final", "negative-eigenvalues"])
def test_delta_rule_matches_reference(gated, shape):
    shape = dict(shape)
    chunk, final = shape.pop("chunk", 16), shape.pop("final", True)
    x = make_inputs(gated=gated, **shape)
    compare_backends(lambda backend, **kw: delta(backend, chunk, final=final, **kw), x, 1e-5, test="triton")


@pytest.mark.parametrize("gated", [False, True])
def test_varlen(gated):
    offsets, x = packed_sequences(make_inputs, gated=gated)
    compare_backends(lambda backend, **kw: delta(backend, cu_seqlens=offsets, **kw), x, 1e-5, test="triton")


def test_strong_gate():
    x = make_inputs(T=70, gated=True, gate_scale=20.0)
    compare_backends(lambda backend, **kw: delta(backend, 32, **kw), x, 1e-5, test="triton")


@pytest.mark.parametrize("num_householder", [None, 2, 3])
def test_strong_gate_of_a_short_sequence(num_householder):
    """Six tokens at g ~ -20: dg is small (1e-7 .. 1e-3), and the last token's own state term
    (k_last . dk_last, decay 1) had entered both dG's end term and the last row's k dk, which
    cancel only to float32's rounding of the sums they enter: every dg off by ~4e-7 (the reverse
    cumulative sum), 3e-4 relative (bench/fuzz_backends.py, case seed 1402273985; now 2e-6). Now
    neither holds it (the delta rule's LAST in triton_kernels/linear_attn.py's dqk_kernel). The
    DeltaProduct's steps of one token meet at decay 1 too: its dg was off by 1.6e-5 .. 6.6e-5 until
    dG left those pairs out (TOKEN_PAIRS; now 1e-7 .. 8e-7)."""
    torch.manual_seed(1402273985)
    x = make_inputs(B=1, T=6, H=1, K=64, gated=True, initial=False, gate_scale=20.0, num_householder=num_householder)
    if num_householder is None:
        compare_backends(lambda backend, **kw: delta(backend, **kw), x, 1e-5, test="triton")
    else:
        compare_backends(lambda backend, **kw: product(backend, 16, num_householder, **kw), x, 1e-5, test="triton")


@pytest.mark.parametrize("chunk", [16, 64])
def test_strong_gate_of_products_of_one_or_two_tokens(chunk):
    """Packed DeltaProduct sequences of one, two, one and no tokens, three steps a token, at g ~ -20
    with initial states (bench/fuzz_backends.py, case seed 750430823): a lone token's dg is
    e^g-small (3e-8), and the pairs of its own steps in dG (q dq - k dk, the end term, the UT's F),
    not decayed at all, had cancelled to float32's rounding of their sums: exactly 0 instead, 3.3e-4
    relative over dg (chunked 1.4e-7). TOKEN_PAIRS leaves them out of dG: 2e-7."""
    torch.manual_seed(750430823)
    x = make_inputs(B=1, T=4, H=1, K=48, V=32, gated=True, num_householder=3, gate_scale=20.0)
    x["initial_state"] = torch.randn(4, 1, 48, 32)
    offsets = torch.tensor([0, 1, 3, 4, 4])
    compare_backends(lambda backend, **kw: product(backend, chunk, 3, cu_seqlens=offsets, **kw), x, 1e-5,
                     test="triton")


def _record_launches(monkeypatch, record):
    """Every kernel launch the Triton delta rule makes (its own and linear attention's) passes
    through ``record(kernel name, grid, launch keywords)``, then launches as it would have."""
    from rnnops.triton_backend import _common

    def recording_launch(kernel, grid, *args, **kwargs):
        record(kernel.__name__, grid, kwargs)
        return _common.launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(triton_delta_rule, "launch", recording_launch)
    monkeypatch.setattr(triton_linear_attn, "launch", recording_launch)


@pytest.fixture
def launched(monkeypatch):
    """The last launch of each kernel the Triton delta rule makes: kernel name -> (grid, launch
    keywords)."""
    launches = {}
    _record_launches(monkeypatch, lambda name, grid, kwargs: launches.__setitem__(name, (grid, kwargs)))
    return launches


def _with_config(op, x, dtype, **changes):
    """A cache override for ``op``'s bucket at these inputs: its default configuration with ``changes``."""
    shape = kernels.delta_rule_shape(x["q"], x["v"], x.get("g"), x["k"].shape[2] if op == "delta_product" else 1)
    default = triton_linear_attn.default_config(dtype, triton_delta_rule.DEFAULT_CONFIG,
                                                triton_delta_rule.FLOAT32_DEFAULT_CONFIG)
    return cache.override(op, "triton", kernels.bucket(op, shape, dtype), dict(default.__dict__, **changes))


@pytest.mark.parametrize("gated,shape", [
    (False, dict(T=70, chunk=32)), (True, dict(T=70, chunk=32)), (False, dict(K=48, V=48, H=3, initial=False)),
    (True, dict(T=20, final=False)), (True, dict(varlen=True)), (True, dict(num_householder=2, T=13)),
], ids=["plain-T70-chunk32", "gated-T70-chunk32", "plain-K48-V48-H3-no-initial", "gated-no-final", "gated-varlen",
        "gated-DeltaProduct"])
def test_fused_forward(gated, shape):
    """fused_forward: the state walk computes the outputs too (V_new = U - W S_in inside it; K = 48
    padded to 64, V = 48 over 16-wide tiles), against the reference, forward and every gradient (the
    backward is the two-pass one)."""
    shape = dict(shape)
    chunk, final, varlen = shape.pop("chunk", 16), shape.pop("final", True), shape.pop("varlen", False)
    offsets = None
    if varlen:
        offsets, x = packed_sequences(make_inputs, gated=gated)
    else:
        x = make_inputs(gated=gated, beta_max=2.0, **shape)
    op = "delta_product" if "num_householder" in shape else "delta_rule"

    def call(backend, **kw):
        if op == "delta_product":
            return product(backend, chunk, shape["num_householder"], **kw)
        return delta(backend, chunk, cu_seqlens=offsets, final=final, **kw)

    with _with_config(op, x, torch.float32, state_block_v=16, fused_forward=1):
        compare_backends(call, x, 1e-5, test="triton")


@pytest.mark.parametrize("forward_v,backward_v", [(16, 32), (32, 16)])
def test_state_walks_take_their_own_v_tiles(forward_v, backward_v, launched):
    """state_block_v (the forward walk) and state_backward_block_v (the backward walk) apart: V = 32
    in two 16-wide walks one way and one 32-wide walk the other, gated, with states in and out."""
    x = make_inputs(T=37, gated=True, beta_max=2.0)
    with _with_config("delta_rule", x, torch.float32, state_block_v=forward_v, state_backward_block_v=backward_v):
        compare_backends(lambda backend, **kw: delta(backend, **kw), x, 1e-5, test="triton")
    walks = {name: (grid[0], kwargs.get("BV")) for name, (grid, kwargs) in launched.items()}
    assert walks["states_fwd_kernel"] == (32 // forward_v, forward_v)
    assert walks["states_bwd_kernel"] == (32 // backward_v, backward_v)


@pytest.mark.parametrize("variant", ["plain", "gated", "gated-varlen", "gated-fused", "DeltaProduct"])
def test_grouped_heads(variant):
    """fla's GVA: q and k with two heads for v's, beta's and g's four; every kernel reads the
    group's q / k in place (the UT transform, both state walks, the fused forward, dq / dk per
    value head summed), against the reference, which repeats them."""
    gated = variant != "plain"
    offsets, steps = None, 2 if variant == "DeltaProduct" else None
    if variant.endswith("varlen"):
        offsets, x = packed_sequences(make_inputs, gated=True, H=4)
    else:
        x = make_inputs(H=4, T=37, gated=gated, num_householder=steps, beta_max=2.0)
    x["q"] = x["q"][:, :, :2].contiguous()
    x["k"] = x["k"][..., :2, :].contiguous()
    if steps:
        call = (lambda backend, **kw: product(backend, 16, steps, **kw))
    else:
        call = (lambda backend, **kw: delta(backend, cu_seqlens=offsets, **kw))
    if variant.endswith("fused"):
        with _with_config("delta_rule", x, torch.float32, state_block_v=16, fused_forward=1):
            compare_backends(call, x, 1e-5, test="triton")
    else:
        compare_backends(call, x, 1e-5, test="triton")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("num_householder", [1, 2, 3])
def test_delta_product(gated, num_householder):
    """Three token chunks of 16 (the output kernel's chunks: num_householder row-chunks each), the
    last partial."""
    x = make_inputs(T=37, gated=gated, num_householder=num_householder, beta_max=2.0)
    compare_backends(lambda backend, **kw: product(backend, 16, num_householder, **kw), x, 1e-5, test="triton")


def test_delta_product_varlen():
    """Packed sequences of 3 Householder steps a token: the kernels' rows are the steps, q, g and
    o are read and written once a token (token_rows), sequences of 0 and 1 tokens among them."""
    offsets, x = packed_sequences(make_inputs, gated=True, num_householder=3, beta_max=2.0)
    compare_backends(lambda backend, **kw: product(backend, 16, 3, cu_seqlens=offsets, **kw), x, 1e-5,
                     test="triton")


def test_gated_delta_product_forward_takes_both_decays_from_one_cumsum(monkeypatch):
    """The row chunks' G (the UT transform, the state walk) and the token chunks' (the output
    kernel) come from one cumsum_kernel launch (forward_decays), and are right (the outputs)."""
    launches = []
    _record_launches(monkeypatch, lambda name, grid, kwargs: launches.append(name))
    x = make_inputs(T=37, gated=True, num_householder=3)
    with torch.no_grad():
        o, _ = product("triton", 16, 3, **x)
    assert launches.count("cumsum_kernel") == 1
    assert_close(o, product("reference", 16, 3, **as_float64(x))[0], 1e-5, "output")


@pytest.mark.parametrize("stages", [2, 3])
def test_backward_walk_takes_its_own_stages(stages, launched):
    """state_backward_num_stages reaches the backward walk alone, and with it whether half inputs
    fold the scale into q (two stages) or scale q's product (three): float16, plain."""
    x = make_inputs(T=37, dtype=torch.float16, beta_max=2.0)
    with _with_config("delta_rule", x, torch.float16, state_num_stages=1, state_backward_num_stages=stages):
        compare_backends(lambda backend, **kw: delta(backend, **kw), x, 2e-3, test="triton")
    walks = {name: (kwargs["num_stages"], kwargs.get("FOLD_SCALE")) for name, (_, kwargs) in launched.items()}
    assert walks["states_fwd_kernel"] == (1, None)
    assert walks["states_bwd_kernel"] == (stages, stages <= 2)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("shape", [{}, dict(B=1, T=150, H=1, K=128, V=128, chunk=64)], ids=["small", "K128-chunk64"])
def test_float16(gated, shape):
    """Half inputs: the states, dV_new and dW go between kernels in float16 (the interpreter's
    float16 dot products work; its bfloat16 ones do not)."""
    shape = dict(shape)
    chunk = shape.pop("chunk", 16)
    x = make_inputs(gated=gated, dtype=torch.float16, **shape)
    compare_backends(lambda backend, **kw: delta(backend, chunk, **kw), x, 2e-3, test="triton")


def test_float16_gated_delta_product():
    """Half inputs through TOKEN_PAIRS: dA's two parts (a token's own steps, the others') rounded
    to float16 before their products, as the whole was."""
    x = make_inputs(gated=True, dtype=torch.float16, num_householder=3)
    compare_backends(lambda backend, **kw: product(backend, 16, 3, **kw), x, 2e-3, test="triton")


def test_head_dims_are_checked():
    with pytest.raises(ValueError, match="V must be a multiple of 16 in \\[16, 256\\], got 24"):
        delta("triton", **make_inputs(V=24))


@pytest.mark.parametrize("gpu", ["A100", "H100"])
def test_config_space(gpu):
    legal = triton_delta_rule.space(256, 128, 64, 2, hardware.named(gpu)).legal()
    assert legal and all(256 * max(p["state_block_v"], p["state_backward_block_v"]) <= 128 * 32 * p["state_num_warps"]
                         for p in legal)
    defaults = dict(triton_delta_rule.DEFAULT_CONFIG.__dict__)
    assert defaults in triton_delta_rule.space(128, 128, 64, 2, hardware.named(gpu)).legal()
    assert triton_delta_rule.FLOAT32_DEFAULT_CONFIG.__dict__ in triton_delta_rule.space(
        128, 128, 64, 4, hardware.named(gpu)).legal()


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_realistic_shapes_on_gpu(gated, dtype, bound):
    x = make_inputs(B=2, T=1000, H=4, K=128, V=128, gated=gated, dtype=dtype, device="cuda")
    compare_backends(lambda backend, **kw: delta(backend, 64, **kw), x, bound, test="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_heads_on_gpu(dtype, bound):
    """fla's GVA as Gated DeltaNet models use it: two value heads a q / k head."""
    x = make_inputs(B=2, T=1000, H=4, K=128, V=128, gated=True, dtype=dtype, device="cuda")
    x["q"], x["k"] = (x[name][:, :, :2].contiguous() for name in ("q", "k"))
    compare_backends(lambda backend, **kw: delta(backend, 64, **kw), x, bound, test="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_forward_on_gpu(gated, dtype, bound):
    """fused_forward at K = V = 128 with the state tiles the GPU suite's A/B tries (64 columns);
    a packed batch with an empty sequence; outputs poisoned first like every buffer."""
    offsets = torch.tensor([0, 300, 300, 1000, 1003], device="cuda")
    x = make_inputs(B=1, T=1003, H=4, K=128, V=128, gated=gated, dtype=dtype, initial=False, device="cuda")
    x["initial_state"] = torch.randn(4, 4, 128, 128, device="cuda")
    with _with_config("delta_rule", x, dtype, fused_forward=1, state_block_v=64):
        compare_backends(lambda backend, **kw: delta(backend, 64, cu_seqlens=offsets, **kw), x, bound, test="triton")


@pytest.mark.gpu
def test_head_dim_16_on_gpu():
    """16-wide head tiles take "ieee" dots (see test_triton_linear_attn.test_head_dim_16_on_gpu)."""
    x = make_inputs(B=2, T=300, H=2, K=16, V=32, gated=True, device="cuda")
    compare_backends(lambda backend, **kw: delta(backend, 64, **kw), x, 1e-5, test="triton")


@pytest.mark.gpu
def test_delta_product_on_gpu():
    x = make_inputs(B=2, T=500, H=4, K=64, V=64, gated=True, num_householder=2, dtype=torch.bfloat16, device="cuda")
    compare_backends(lambda backend, **kw: product(backend, 64, 2, **kw), x, 2e-2, test="triton")


@triton.jit
def invert_unit_lower(L, T, BT: tl.constexpr):
    offs = tl.arange(0, BT)[:, None] * BT + tl.arange(0, BT)[None, :]
    tl.store(T + offs, _unit_lower_inverse(tl.load(L + offs), "ieee", BT))


@pytest.mark.parametrize("chunk", [16, 32, 64, 128])
def test_unit_lower_inverse(chunk):
    """The UT transform's blocked inverse against float64, with off-diagonal entries as large as
    the delta rule makes them (beta up to 2 times unit-key dot products)."""
    k = F.normalize(torch.randn(chunk, 8, dtype=torch.float64), dim=-1)
    L = torch.tril(2 * torch.rand(chunk, 1, dtype=torch.float64) * (k @ k.T), diagonal=-1)
    T = torch.full((chunk, chunk), float("nan"))
    invert_unit_lower[(1,)](L.float().contiguous(), T, BT=chunk)
    expected = torch.linalg.inv(torch.eye(chunk, dtype=torch.float64) + L)
    assert ((T.double() - expected).norm() / expected.norm()).item() < 1e-5


def test_state_kernels_launch_with_their_own_warps_and_stages(launched):
    """The chunk-walking state kernels take state_num_warps / state_num_stages (the backward walk
    state_backward_num_stages), the UT inverse inverse_num_warps (and num_stages), every other
    kernel num_warps / num_stages."""
    config = triton_delta_rule.DeltaRuleConfig(num_warps=8, num_stages=3, state_num_warps=2, state_num_stages=1,
                                               state_backward_num_stages=1, inverse_num_warps=2)
    x = make_inputs(T=20, gated=True)
    q, k, v, beta, g = (x[n].requires_grad_() for n in ("q", "k", "v", "beta", "g"))
    o, _ = triton_delta_rule.delta_rule(q, k, v, beta, g, scale=1.0, initial_state=None, output_final_state=False,
                                        cu_seqlens=None, chunk_size=16, config=config)
    o.sum().backward()
    warps_stages = {name: (kwargs["num_warps"], kwargs["num_stages"]) for name, (_, kwargs) in launched.items()}
    states = {name: launch for name, launch in warps_stages.items() if name.startswith("states_")}
    assert set(states) == {"states_fwd_kernel", "states_bwd_kernel"} and set(states.values()) == {(2, 1)}
    assert warps_stages.pop("ut_inverse_kernel") == (2, 3)
    others = {launch for name, launch in warps_stages.items() if not name.startswith("states_")}
    assert others == {(8, 3)} and len(warps_stages) == 8  # and cumsum, UT forward / backward, output, dv, dq/dk
