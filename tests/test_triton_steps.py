"""The fused Triton decoding step against the reference sequence op, token by token."""
import pytest
import torch
import torch.nn.functional as F

import rnnops
from conftest import assert_close


@pytest.mark.parametrize("gate", ["none", "scalar", "per-key"])
@pytest.mark.parametrize("K,V", [(16, 32), (48, 20)])
def test_linear_attn_steps(gate, K, V):
    B, T, H = 2, 4, 3
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    g = {"none": None, "scalar": -torch.rand(B, T, H), "per-key": -torch.rand(B, T, H, K)}[gate]
    state = torch.randn(B, H, K, V)
    o_ref, S_ref = rnnops.linear_attn(q, k, v, g, initial_state=state, output_final_state=True, backend="reference")
    S = state
    for t in range(T):
        o, S = rnnops.linear_attn_step(q[:, t], k[:, t], v[:, t], None if g is None else g[:, t], state=S,
                                       backend="triton")
        assert_close(o, o_ref[:, t], 1e-5)
    assert_close(S, S_ref, 1e-5)


@pytest.mark.parametrize("num_householder", [None, 1, 3])
@pytest.mark.parametrize("gated", [False, True])
def test_delta_steps(num_householder, gated):
    B, T, H, K, V = 2, 4, 2, 16, 16
    steps = () if num_householder is None else (num_householder,)
    q = torch.randn(B, T, H, K)
    k = F.normalize(torch.randn((B, T) + steps + (H, K)), dim=-1)
    v, beta = torch.randn((B, T) + steps + (H, V)), torch.rand((B, T) + steps + (H,)) * 2
    g = -torch.rand(B, T, H) if gated else None
    if num_householder is None:
        seq = rnnops.delta_rule(q, k, v, beta, g, output_final_state=True, allow_neg_eigval=True, backend="reference")
    else:
        seq = rnnops.delta_product(q, k, v, beta, g, num_householder=num_householder, output_final_state=True,
                                   allow_neg_eigval=True, backend="reference")
    S = None
    for t in range(T):
        args = (q[:, t], k[:, t], v[:, t], beta[:, t], None if g is None else g[:, t])
        if num_householder is None:
            o, S = rnnops.delta_rule_step(*args, state=S, allow_neg_eigval=True, backend="triton")
        else:
            o, S = rnnops.delta_product_step(*args, num_householder=num_householder, state=S, allow_neg_eigval=True,
                                             backend="triton")
        assert_close(o, seq[0][:, t], 1e-5)
    assert_close(S, seq[1], 1e-5)


def test_gradients_make_auto_fall_back_to_a_sequence_backend():
    q, k, v = (torch.randn(2, 3, 16, requires_grad=True) for _ in range(3))
    with pytest.raises(ValueError, match="the decoding kernel has no backward"):
        rnnops.linear_attn_step(q, k, v, backend="triton")
    o, _ = rnnops.linear_attn_step(q, k, v)  # auto: chunked on the CPU, with autograd
    o.sum().backward()
    assert q.grad is not None


@pytest.mark.gpu
def test_auto_takes_the_fused_step_on_gpu_without_gradients():
    pick = rnnops._dispatch.resolve
    cuda = torch.device("cuda")
    assert pick("delta_rule_step", "auto", cuda, dtype=torch.bfloat16, head_dims=(128, 128))[0] == "triton"
    assert pick("delta_rule_step", "auto", cuda, dtype=torch.bfloat16, head_dims=(128, 128),
                requires_grad=True)[0] == "chunked"
