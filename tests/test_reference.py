"""The PyTorch backends' backward stays linear in T. Indexing an input at [:, t] inside a time
(or chunk) loop gives a SelectBackward node per step, each of which adds a zero-filled gradient
of the whole input (quadratic: 13 s for one reference forward+backward at T = 4096 on a CPU);
the per-token references and the chunked backends' chunk loops take their steps from one unbind
(or split) instead."""
from collections import Counter

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


CHUNKED = {
    "linear_attn scalar": lambda T: rnnops.linear_attn(*_leaves(
        torch.randn(1, T, 2, 4), torch.randn(1, T, 2, 4), torch.randn(1, T, 2, 4), -torch.rand(1, T, 2)),
        chunk_size=16, backend="chunked")[0],
    "delta_rule gated": lambda T: rnnops.delta_rule(*_leaves(
        torch.randn(1, T, 2, 4), torch.nn.functional.normalize(torch.randn(1, T, 2, 4), dim=-1),
        torch.randn(1, T, 2, 4), torch.rand(1, T, 2), -torch.rand(1, T, 2)), chunk_size=16, backend="chunked")[0],
    "selective_scan": lambda T: rnnops.selective_scan(*_leaves(
        torch.randn(1, T, 8), torch.rand(1, T, 8), -torch.rand(8, 3), torch.randn(1, T, 3), torch.randn(1, T, 3)),
        backend="chunked"),
}


@pytest.mark.parametrize("case", CHUNKED)
def test_chunked_backward_indexes_no_more_with_more_chunks(case):
    def indexing(T):
        names = Counter(_node_names(CHUNKED[case](T)))
        return names["SelectBackward0"] + names["SliceBackward0"]

    assert indexing(1024) == indexing(64)  # 64 chunks of 16 against 4 (the scan: 32 of 32 against 8 of 8)
