"""The per-token reference implementations: their backward stays linear in T. Indexing an input
at [:, t] inside the time loop gives a SelectBackward node per step, each of which adds a
zero-filled gradient of the whole input (quadratic: 13 s for one forward+backward at T = 4096 on
a CPU); the references take their steps from one unbind instead."""
import pytest
import torch

import rnnops


def _node_names(tensor):
    seen, pending, names = set(), [tensor.grad_fn], []
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return names


def _leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


B, T, H, K = 1, 6, 2, 4
CASES = {
    "linear_attn per-key": lambda: rnnops.linear_attn(*_leaves(torch.randn(B, T, H, K), torch.randn(B, T, H, K),
                                                               torch.randn(B, T, H, K), -torch.rand(B, T, H, K)),
                                                      backend="reference")[0],
    "delta_product gated": lambda: rnnops.delta_product(*_leaves(
        torch.randn(B, T, H, K), torch.nn.functional.normalize(torch.randn(B, T, 2, H, K), dim=-1),
        torch.randn(B, T, 2, H, K), torch.rand(B, T, 2, H), -torch.rand(B, T, H)), num_householder=2,
        backend="reference")[0],
    "rnn lstm": lambda: rnnops.rnn(*_leaves(torch.randn(B, T, 4, H, K), torch.randn(4, H, K, K), torch.randn(4, H, K)),
                                   cell="lstm", backend="reference")[0],
    "selective_scan grouped": lambda: rnnops.selective_scan(*_leaves(
        torch.randn(B, T, 8), torch.rand(B, T, 8), -torch.rand(8, 3), torch.randn(B, T, 2, 3), torch.randn(B, T, 2, 3)),
        backend="reference"),  # y alone (no return_last_state)
}


@pytest.mark.parametrize("case", CASES)
def test_reference_backward_takes_each_step_from_one_unbind(case):
    names = _node_names(CASES[case]())
    assert "UnbindBackward0" in names
    assert "SelectBackward0" not in names, names.count("SelectBackward0")
