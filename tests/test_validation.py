"""Bad input gets a ValueError/TypeError that names the argument and what was expected."""
import pytest
import torch

import rnnops
from rnnops import _validate

F32 = torch.float32


def la(**over):
    x = dict(q=torch.randn(2, 5, 3, 4), k=torch.randn(2, 5, 3, 4), v=torch.randn(2, 5, 3, 6))
    x.update(over)
    return lambda: rnnops.linear_attn(**x)


def dr(**over):
    x = dict(q=torch.randn(2, 5, 3, 4), k=torch.randn(2, 5, 3, 4), v=torch.randn(2, 5, 3, 6), beta=torch.rand(2, 5, 3))
    x.update(over)
    return lambda: rnnops.delta_rule(**x)


def dp(**over):
    x = dict(q=torch.randn(2, 5, 3, 4), k=torch.randn(2, 5, 2, 3, 4), v=torch.randn(2, 5, 2, 3, 6),
             beta=torch.rand(2, 5, 2, 3), num_householder=2)
    x.update(over)
    return lambda: rnnops.delta_product(**x)


def ss(**over):
    x = dict(u=torch.randn(2, 5, 6), delta=torch.randn(2, 5, 6), A=-torch.rand(6, 4), B=torch.randn(2, 5, 4),
             C=torch.randn(2, 5, 4))
    x.update(over)
    return lambda: rnnops.selective_scan(**x)


def rnn(**over):
    x = dict(x_gates=torch.randn(2, 5, 4, 3, 8), R=torch.randn(4, 3, 8, 8), b=torch.randn(4, 3, 8), cell="lstm")
    x.update(over)
    return lambda: rnnops.rnn(**x)


META = torch.device("meta")
PACKED = dict(q=torch.randn(1, 5, 3, 4), k=torch.randn(1, 5, 3, 4), v=torch.randn(1, 5, 3, 6))

CASES = {
    # linear_attn
    "la q rank": (la(q=torch.randn(2, 5, 12)), ValueError, r"linear_attn: q must have 4 dimensions \(B, T, Hk, K\)"),
    "la k shape": (la(k=torch.randn(2, 5, 3, 5)), ValueError, r"k has shape \(2, 5, 3, 5\).*K=4 from q"),
    "la v heads": (la(v=torch.randn(2, 5, 2, 6)), ValueError, r"q and k have 3 heads, which must divide v's 2"),
    "la v time": (la(v=torch.randn(2, 4, 3, 6)), ValueError, r"v has shape.*T=5 from q"),
    "la g shape": (la(g=-torch.rand(2, 5, 3, 4, 1)), ValueError, r"g must have shape \(B, T, H\) or \(B, T, H, K\)"),
    "la g key dim": (la(g=-torch.rand(2, 5, 3, 2)), ValueError, r"g has shape .* K=4 from q"),
    "la g positive": (la(g=torch.rand(2, 5, 3)), ValueError, r"g must lie in \[-inf, 0.0\]"),
    "la int q": (la(q=torch.ones(2, 5, 3, 4, dtype=torch.int64)), TypeError, r"q must be float16, bfloat16, float32 or float64"),
    "la mixed dtype": (la(k=torch.randn(2, 5, 3, 4, dtype=torch.float64)), TypeError, r"k has dtype torch.float64 but q has torch.float32"),
    "la state dtype": (la(initial_state=torch.zeros(2, 3, 4, 6, dtype=torch.float64)), TypeError, r"initial_state must have dtype"),
    "la mixed device": (la(v=torch.randn(2, 5, 3, 6, device=META)), ValueError, r"v is on meta but q is on cpu"),
    "la not tensor": (la(q=[[1.0]]), TypeError, r"q must be a torch.Tensor, got list"),
    "la state shape": (la(initial_state=torch.zeros(2, 3, 6, 4)), ValueError, r"initial_state has shape"),
    "la chunk zero": (la(chunk_size=0), ValueError, r"chunk_size must be >= 1"),
    "la chunk float": (la(chunk_size=1.5), TypeError, r"chunk_size must be an int"),
    "la scale str": (la(scale="0.5"), TypeError, r"scale must be a float or None"),
    "la scale nan": (la(scale=float("nan")), ValueError, r"scale must be finite"),
    "la backend": (la(backend="cudnn"), ValueError, r"backend must be 'auto' or one of 'reference', 'chunked', 'triton', got 'cudnn'"),
    "la backend type": (la(backend=None), TypeError, r"backend must be a str"),
    "la cu batch": (la(cu_seqlens=torch.tensor([0, 5])), ValueError, r"with cu_seqlens the batch size must be 1"),
    "la cu dtype": (lambda: rnnops.linear_attn(**PACKED, cu_seqlens=torch.tensor([0.0, 5.0])), TypeError, r"cu_seqlens must be int32 or int64"),
    "la cu rank": (lambda: rnnops.linear_attn(**PACKED, cu_seqlens=torch.tensor([[0, 5]])), ValueError, r"cu_seqlens must be 1-D"),
    "la cu order": (lambda: rnnops.linear_attn(**PACKED, cu_seqlens=torch.tensor([0, 3, 2, 5])), ValueError, r"cu_seqlens must be non-decreasing"),
    "la cu end": (lambda: rnnops.linear_attn(**PACKED, cu_seqlens=torch.tensor([0, 2, 4])), ValueError, r"cu_seqlens must end at T=5"),
    "la cu start": (lambda: rnnops.linear_attn(**PACKED, cu_seqlens=torch.tensor([1, 2, 5])), ValueError, r"cu_seqlens must start at 0"),
    "la cu state": (lambda: rnnops.linear_attn(**PACKED, cu_seqlens=torch.tensor([0, 2, 5]), initial_state=torch.zeros(1, 3, 4, 6)),
                    ValueError, r"initial_state has shape .*N=2 from len\(cu_seqlens\) - 1"),
    "la step rank": (lambda: rnnops.linear_attn_step(torch.randn(2, 3), torch.randn(2, 3, 4), torch.randn(2, 3, 6)),
                     ValueError, r"linear_attn_step: q must have 3 dimensions \(B, H, K\)"),
    # delta rule / product
    "dr beta range": (dr(beta=torch.rand(2, 5, 3) + 1.0), ValueError, r"beta must lie in \[0.0, 1.0\].*allow_neg_eigval"),
    "dr beta shape": (dr(beta=torch.rand(2, 5, 3, 1)), ValueError, r"beta must have 3 dimensions \(B, T, H\)"),
    "dr beta dtype": (dr(beta=torch.rand(2, 5, 3, dtype=torch.float64)), TypeError, r"beta has dtype"),
    "dr g per-key": (dr(g=-torch.rand(2, 5, 3, 4)), ValueError, r"g must have 3 dimensions \(B, T, H\)"),
    "dr int k": (dr(k=torch.ones(2, 5, 3, 4, dtype=torch.int32)), TypeError, r"k must be float16"),
    "dp householder": (dp(num_householder=3), ValueError, r"k has shape .*NH=3 from num_householder"),
    "dp householder type": (dp(num_householder=2.0), TypeError, r"num_householder must be an int"),
    "dp beta": (dp(beta=torch.rand(2, 5, 3)), ValueError, r"beta must have 4 dimensions \(B, T, NH, H\)"),
    "dp neg eigval": (dp(beta=torch.rand(2, 5, 2, 3) * 2 + 0.1, allow_neg_eigval=False), ValueError, r"beta must lie in"),
    # selective scan
    "ss A shape": (ss(A=torch.randn(5, 4)), ValueError, r"A has shape \(5, 4\) \(Dm, N\), but Dm=6 from u"),
    "ss B rank": (ss(B=torch.randn(2, 5, 1, 1, 4)), ValueError, r"B must have shape \(Dm, N\) or \(B, T, N\) or \(B, T, GB, N\)"),
    "ss B groups": (ss(B=torch.randn(2, 5, 4, 4)), ValueError, r"group count of B \(G=4\) must divide Dm=6"),
    "ss C state": (ss(C=torch.randn(2, 5, 3)), ValueError, r"C has shape .*N=4 from A"),
    "ss D shape": (ss(D=torch.randn(5)), ValueError, r"D has shape \(5,\) \(Dm\), but Dm=6 from u"),
    "ss delta int": (ss(delta=torch.ones(2, 5, 6, dtype=torch.int64)), TypeError, r"delta must be float16"),
    "ss z dtype": (ss(z=torch.randn(2, 5, 6, dtype=torch.float64)), TypeError, r"z has dtype"),
    "ss state": (ss(initial_state=torch.zeros(2, 4, 6)), ValueError, r"initial_state has shape"),
    "ss A dtype": (ss(A=-torch.rand(6, 4, dtype=torch.float16)), TypeError, r"A must have dtype"),
    "ss update state": (lambda: rnnops.selective_state_update(None, torch.randn(2, 6), torch.randn(2, 6), -torch.rand(6, 4),
                                                              torch.randn(2, 4), torch.randn(2, 4)),
                        TypeError, r"selective_state_update: state must be a torch.Tensor"),
    # rnn
    "rnn cell": (rnn(cell="lstmx"), ValueError, r"cell must be one of 'lstm', 'gru', 'slstm', 'elman', got 'lstmx'"),
    "rnn gates": (rnn(cell="gru"), ValueError, r"x_gates has shape .*G=3 from cell='gru'"),
    "rnn R shape": (rnn(R=torch.randn(4, 3, 8, 7)), ValueError, r"R has shape \(4, 3, 8, 7\)"),
    "rnn b heads": (rnn(b=torch.randn(4, 2, 8)), ValueError, r"b has shape .*H=3 from x_gates"),
    "rnn state count": (rnn(state=(torch.zeros(2, 3, 8),)), ValueError, r"state must be None or a tuple of 2 tensors \(h, c\)"),
    "rnn state shape": (rnn(state=(torch.zeros(2, 3, 8), torch.zeros(2, 3, 7))), ValueError, r"state\[c\] has shape"),
    "rnn int": (rnn(x_gates=torch.ones(2, 5, 4, 3, 8, dtype=torch.int64)), TypeError, r"x_gates must be float16"),
    "rnn R device": (rnn(R=torch.randn(4, 3, 8, 8, device=META)), ValueError, r"R is on meta but x_gates is on cpu"),
    "rnn backend": (rnn(backend="chunked"), ValueError, r"rnn: backend must be 'auto' or one of 'reference', 'triton', 'cuda', got 'chunked'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_clear_error(name):
    call, error, pattern = CASES[name]
    with pytest.raises(error, match=pattern):
        call()


def test_value_checks_run_on_cpu_always_and_on_gpus_only_when_debugging(monkeypatch):
    monkeypatch.delenv("RNNOPS_DEBUG", raising=False)
    assert _validate.value_checks_enabled(torch.device("cpu"))
    assert not _validate.value_checks_enabled(torch.device("cuda"))
    monkeypatch.setenv("RNNOPS_DEBUG", "1")
    assert _validate.value_checks_enabled(torch.device("cuda"))
    monkeypatch.setenv("RNNOPS_DEBUG", "0")
    assert not _validate.value_checks_enabled(torch.device("cuda"))


def test_value_checks_do_not_read_non_cpu_tensors(monkeypatch):
    """Tensors off the CPU (meta here: reading them fails) pass the value checks untouched."""
    monkeypatch.delenv("RNNOPS_DEBUG", raising=False)
    beta = torch.empty(2, 5, 3, device=META)
    _validate.check_range("delta_rule", "beta", beta, 0.0, 1.0, "a step size")
    _validate.check_cu_seqlens("linear_attn", torch.empty(3, dtype=torch.int64, device=META), 1, 5, META)


EMPTY_CASES = {
    "linear_attn": (lambda s: rnnops.linear_attn(torch.randn(2, 0, 3, 4), torch.randn(2, 0, 3, 4), torch.randn(2, 0, 3, 6),
                                                initial_state=s, output_final_state=True), (2, 3, 4, 6), (2, 0, 3, 6)),
    "delta_rule": (lambda s: rnnops.delta_rule(torch.randn(2, 0, 3, 4), torch.randn(2, 0, 3, 4), torch.randn(2, 0, 3, 6),
                                              torch.rand(2, 0, 3), initial_state=s, output_final_state=True), (2, 3, 4, 6), (2, 0, 3, 6)),
    "delta_product": (lambda s: rnnops.delta_product(torch.randn(2, 0, 3, 4), torch.randn(2, 0, 2, 3, 4), torch.randn(2, 0, 2, 3, 6),
                                                    torch.rand(2, 0, 2, 3), num_householder=2, initial_state=s,
                                                    output_final_state=True), (2, 3, 4, 6), (2, 0, 3, 6)),
    "selective_scan": (lambda s: rnnops.selective_scan(torch.randn(2, 0, 6), torch.randn(2, 0, 6), -torch.rand(6, 4),
                                                      torch.randn(2, 0, 4), torch.randn(2, 0, 4), initial_state=s,
                                                      return_last_state=True), (2, 6, 4), (2, 0, 6)),
    "rnn": (lambda s: (lambda h, st: (h, st[0]))(*rnnops.rnn(torch.randn(2, 0, 1, 3, 8), torch.randn(1, 3, 8, 8),
                                                              cell="elman", state=None if s is None else (s,))),
            (2, 3, 8), (2, 0, 3, 8)),
}


@pytest.mark.parametrize("family", list(EMPTY_CASES))
def test_empty_sequence_returns_empty_output_and_initial_state(family):
    call, state_shape, out_shape = EMPTY_CASES[family]
    out, final = call(None)
    assert out.shape == out_shape
    assert final.shape == state_shape and not final.any()
    initial = torch.randn(state_shape)
    out, final = call(initial)
    assert torch.equal(final, initial) and final.data_ptr() != initial.data_ptr()
