import io

import pytest
import torch

import rnnops
from conftest import assert_close

PAIRS = [(rnnops.nn.LSTM, torch.nn.LSTM), (rnnops.nn.GRU, torch.nn.GRU)]


def _states(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("ours_cls,torch_cls", PAIRS)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias", [
    (1, False, False, True), (2, True, True, True), (3, False, True, False), (2, True, False, False),
])
def test_torch_state_dict_gives_same_outputs(ours_cls, torch_cls, num_layers, bidirectional, batch_first, bias):
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    theirs = torch_cls(5, 12, **kwargs)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = ours_cls(5, 12, **kwargs)
    ours.load_state_dict(torch.load(buffer))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(4, 9, 5) if batch_first else torch.randn(9, 4, 5)
    directions = 2 if bidirectional else 1
    hx = tuple(torch.randn(num_layers * directions, 4, 12) for _ in range(2 if torch_cls is torch.nn.LSTM else 1))
    for state in (None, hx):
        arg = None if state is None else (state if len(state) == 2 else state[0])
        expected, expected_final = theirs(x, arg)
        got, got_final = ours(x, arg)
        assert_close(got, expected, 1e-5, "output")
        for a, b in zip(_states(got_final), _states(expected_final)):
            assert a.dtype == b.dtype
            assert_close(a, b, 1e-5, "final state")


@pytest.mark.parametrize("ours_cls,torch_cls", PAIRS)
def test_gradients_match_torch(ours_cls, torch_cls):
    theirs = torch_cls(5, 8, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = ours_cls(5, 8, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    cotangent = torch.randn(6, 3, 16, dtype=torch.float64)
    theirs(x)[0].backward(cotangent)
    ours(x)[0].backward(cotangent)
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
        assert_close(q.grad, p.grad, 1e-10, name)


@pytest.mark.parametrize("ours_cls,torch_cls", PAIRS)
def test_unbatched_input(ours_cls, torch_cls):
    theirs = torch_cls(5, 8)
    ours = ours_cls(5, 8)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 5)
    expected, expected_final = theirs(x)
    got, got_final = ours(x)
    assert_close(got, expected, 1e-5)
    for a, b in zip(_states(got_final), _states(expected_final)):
        assert a.shape == b.shape
        assert_close(a, b, 1e-5)


@pytest.mark.parametrize("ours_cls", [rnnops.nn.LSTM, rnnops.nn.GRU])
def test_heads_parameter_shapes_and_semantics(ours_cls):
    module = ours_cls(6, 12, num_heads=3, batch_first=True, dtype=torch.float64)
    G = module.gates
    assert module.weight_hh_l0.shape == (G * 12, 4)
    assert module.weight_ih_l0.shape == (G * 12, 6)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    out, _ = module(x)
    x_gates = (x @ module.weight_ih_l0.T + module.bias_ih_l0).view(2, 5, G, 3, 4)
    h_seq, _ = rnnops.rnn(x_gates, module.weight_hh_l0.view(G, 3, 4, 4), module.bias_hh_l0.view(G, 3, 4),
                          cell=module.cell)
    assert_close(out, h_seq.reshape(2, 5, 12), 1e-12)


def test_dropout_between_layers_only_in_training():
    module = rnnops.nn.LSTM(4, 8, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 4)
    module.eval()
    a, _ = module(x)
    b, _ = module(x)
    assert_close(a, b, 0.0)
    module.train()
    c, _ = module(x)
    assert (c - a).abs().max() > 1e-3


def test_unsupported_options_are_clear():
    with pytest.raises(ValueError, match="proj_size"):
        rnnops.nn.LSTM(4, 8, proj_size=2)
    with pytest.raises(ValueError, match="num_heads"):
        rnnops.nn.GRU(4, 9, num_heads=2)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 4), [3, 2])
    with pytest.raises(TypeError, match="PackedSequence"):
        rnnops.nn.LSTM(4, 8)(packed)
    with pytest.raises(ValueError, match="input_size"):
        rnnops.nn.LSTM(4, 8)(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match=r"hx\[0\]"):
        rnnops.nn.GRU(4, 8)(torch.randn(3, 2, 4), torch.randn(2, 2, 8))
