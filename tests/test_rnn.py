import pytest
import torch

import rnnops
from conftest import assert_close

D64 = torch.float64
GATES = {"lstm": 4, "gru": 3, "slstm": 4, "elman": 1}
STATES = {"lstm": 2, "gru": 1, "slstm": 4, "elman": 1}


def make_inputs(cell, B=2, T=7, H=3, D=4, dtype=D64, initial=True):
    G = GATES[cell]
    x = {
        "x_gates": torch.randn(B, T, G, H, D, dtype=dtype),
        "R": torch.randn(G, H, D, D, dtype=dtype) / D**0.5,
        "b": torch.randn(G, H, D, dtype=dtype) * 0.1,
    }
    state = None
    if initial:
        state = [torch.randn(B, H, D, dtype=dtype) for _ in range(STATES[cell])]
        if cell == "slstm":  # n > 0 (a normaliser), m any real
            state[2] = state[2].abs() + 0.5
        state = tuple(state)
    return x, state


def _torch_module_as_rnn_args(module, x_in, hx):
    """Weights of a single-layer torch RNN module as rnnops.rnn arguments (H = 1)."""
    G = module.weight_ih_l0.shape[0] // module.hidden_size
    D = module.hidden_size
    B, T = x_in.shape[:2]
    x_gates = (x_in @ module.weight_ih_l0.T + module.bias_ih_l0).view(B, T, G, 1, D)
    return x_gates, module.weight_hh_l0.view(G, 1, D, D), module.bias_hh_l0.view(G, 1, D), tuple(s[0, :, None] for s in hx)


@pytest.mark.parametrize("cell,module_cls,kwargs", [
    ("lstm", torch.nn.LSTM, {}),
    ("gru", torch.nn.GRU, {}),
    ("elman", torch.nn.RNN, {"nonlinearity": "tanh"}),
])
@pytest.mark.parametrize("dtype,bound", [(D64, 1e-12), (torch.float32, 1e-5)])
def test_single_head_matches_torch(cell, module_cls, kwargs, dtype, bound):
    module = module_cls(6, 8, batch_first=True, dtype=dtype, **kwargs)
    x_in = torch.randn(3, 11, 6, dtype=dtype)
    hx = tuple(torch.randn(1, 3, 8, dtype=dtype) for _ in range(STATES[cell]))
    expected, final = module(x_in, hx if cell == "lstm" else hx[0])
    final = final if isinstance(final, tuple) else (final,)
    with torch.no_grad():
        h_seq, state = rnnops.rnn(*_torch_module_as_rnn_args(module, x_in, hx), cell=cell)
    assert_close(h_seq[:, :, 0], expected, bound)
    for ours, theirs in zip(state, final):
        assert_close(ours[:, 0], theirs[0], bound)


def test_slstm_matches_unstabilised_equations():
    """xLSTM's sLSTM without the stabiliser (fine for small pre-activations):
    c = sigmoid(f) c + exp(i) tanh(z), n = sigmoid(f) n + exp(i), h = sigmoid(o) c / n."""
    x, _ = make_inputs("slstm", T=9)
    h_seq, (h, c_s, n_s, m) = rnnops.rnn(**x, cell="slstm")
    B, T, _, H, D = x["x_gates"].shape
    c = n = hh = torch.zeros(B, H, D, dtype=D64)
    for t in range(T):
        pre = x["x_gates"][:, t] + torch.einsum("ghij,bhj->bghi", x["R"], hh) + x["b"]
        i, f, z, o = pre.unbind(1)
        c = torch.sigmoid(f) * c + torch.exp(i) * torch.tanh(z)
        n = torch.sigmoid(f) * n + torch.exp(i)
        hh = torch.sigmoid(o) * c / n
        assert_close(h_seq[:, t], hh, 1e-12)
    assert_close(c_s * m.exp(), c, 1e-12)
    assert_close(n_s * m.exp(), n, 1e-12)


@pytest.mark.parametrize("cell", list(GATES))
def test_heads_are_independent(cell):
    x, state = make_inputs(cell, H=3)
    h_seq, final = rnnops.rnn(**x, state=state, cell=cell)
    for head in range(3):
        one = {k: v[..., head : head + 1, :] if k == "x_gates" else v[:, head : head + 1] for k, v in x.items()}
        h_one, final_one = rnnops.rnn(**one, state=tuple(s[:, head : head + 1] for s in state), cell=cell)
        assert_close(h_seq[:, :, head : head + 1], h_one, 1e-12)
        for a, b in zip(final, final_one):
            assert_close(a[:, head : head + 1], b, 1e-12)


@pytest.mark.parametrize("cell", list(GATES))
def test_resumable_in_two_halves(cell):
    x, state = make_inputs(cell, T=10)
    h_seq, final = rnnops.rnn(**x, state=state, cell=cell)
    first = dict(x, x_gates=x["x_gates"][:, :4])
    second = dict(x, x_gates=x["x_gates"][:, 4:])
    h1, mid = rnnops.rnn(**first, state=state, cell=cell)
    h2, end = rnnops.rnn(**second, state=mid, cell=cell)
    assert_close(torch.cat([h1, h2], 1), h_seq, 1e-12)
    for a, b in zip(end, final):
        assert_close(a, b, 1e-12)


@pytest.mark.parametrize("cell", list(GATES))
def test_step_equals_sequence(cell):
    x, state = make_inputs(cell, T=3)
    h_seq, final = rnnops.rnn(**x, state=state, cell=cell)
    for t in range(3):
        h, state = rnnops.rnn_step(x["x_gates"][:, t], x["R"], x["b"], state, cell=cell)
        assert_close(h, h_seq[:, t], 1e-12)
    for a, b in zip(state, final):
        assert_close(a, b, 1e-12)


@pytest.mark.parametrize("cell", list(GATES))
def test_without_bias_and_state(cell):
    x, _ = make_inputs(cell, initial=False)
    zeros = tuple(torch.zeros(2, 3, 4, dtype=D64) for _ in range(STATES[cell]))
    a, _ = rnnops.rnn(x["x_gates"], x["R"], None, None, cell=cell)
    b, _ = rnnops.rnn(x["x_gates"], x["R"], torch.zeros_like(x["b"]), zeros, cell=cell)
    assert_close(a, b, 0.0)


@pytest.mark.parametrize("cell", list(GATES))
def test_gradcheck(cell):
    x, state = make_inputs(cell, B=1, T=3, H=2, D=2)
    tensors = (x["x_gates"], x["R"], x["b"]) + state

    def flat(xg, R, b, *s):
        h_seq, final = rnnops.rnn(xg, R, b, s, cell=cell)
        return (h_seq,) + final

    torch.autograd.gradcheck(flat, tuple(t.requires_grad_() for t in tensors))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_float32_states(dtype):
    x, state = make_inputs("lstm", dtype=torch.float32)
    h_ref, final_ref = rnnops.rnn(**x, state=state, cell="lstm")
    h, final = rnnops.rnn(x["x_gates"].to(dtype), x["R"], x["b"], state, cell="lstm")
    assert h.dtype == dtype and all(s.dtype == torch.float32 for s in final)
    assert_close(h, h_ref, 1e-2)
