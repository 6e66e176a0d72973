"""chunked vs reference in float64 at shapes drawn by hypothesis (forward and final state)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis")  # in the test extra; a machine without it (the GPU one) skips this file
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rnnops
from conftest import assert_close

D64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def sequence_shapes(draw):
    varlen = draw(st.booleans())
    lengths = draw(st.lists(st.integers(0, 20), min_size=1, max_size=4)) if varlen else None
    batch = 1 if varlen else draw(st.integers(1, 3))
    time = sum(lengths) if varlen else draw(st.integers(1, 40))
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist()) if varlen else None
    return {
        "B": batch, "T": time, "H": draw(st.integers(1, 3)), "K": draw(st.integers(1, 9)), "V": draw(st.integers(1, 9)),
        "chunk": draw(st.sampled_from([1, 3, 8, 16, 64])), "cu_seqlens": cu_seqlens,
        "N": batch if cu_seqlens is None else len(lengths), "initial": draw(st.booleans()),
        "gate": draw(st.sampled_from(["none", "scalar", "per-key"])),
    }


def _state(s):
    return torch.randn(s["N"], s["H"], s["K"], s["V"], dtype=D64) if s["initial"] else None


@SETTINGS
@given(sequence_shapes(), st.integers(0, 2**31 - 1))
def test_linear_attn(s, seed):
    torch.manual_seed(seed)
    B, T, H, K, V = s["B"], s["T"], s["H"], s["K"], s["V"]
    g = {"none": None, "scalar": -torch.rand(B, T, H, dtype=D64) * 3,
         "per-key": -torch.rand(B, T, H, K, dtype=D64) * 3}[s["gate"]]
    args = (torch.randn(B, T, H, K, dtype=D64), torch.randn(B, T, H, K, dtype=D64), torch.randn(B, T, H, V, dtype=D64), g)
    kw = dict(initial_state=_state(s), output_final_state=True, cu_seqlens=s["cu_seqlens"], chunk_size=s["chunk"])
    got, expected = (rnnops.linear_attn(*args, **kw, backend=b) for b in ("chunked", "reference"))
    assert_close(got[0], expected[0], 1e-10)
    assert_close(got[1], expected[1], 1e-10)


@SETTINGS
@given(sequence_shapes(), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_delta_product(s, num_householder, seed):
    torch.manual_seed(seed)
    B, T, H, K, V = s["B"], s["T"], s["H"], s["K"], s["V"]
    g = None if s["gate"] == "none" else -torch.rand(B, T, H, dtype=D64) * 3
    args = (torch.randn(B, T, H, K, dtype=D64),
            F.normalize(torch.randn(B, T, num_householder, H, K, dtype=D64), dim=-1),
            torch.randn(B, T, num_householder, H, V, dtype=D64),
            torch.rand(B, T, num_householder, H, dtype=D64) * 2, g)
    kw = dict(num_householder=num_householder, allow_neg_eigval=True, initial_state=_state(s),
              output_final_state=True, cu_seqlens=s["cu_seqlens"], chunk_size=s["chunk"])
    got, expected = (rnnops.delta_product(*args, **kw, backend=b) for b in ("chunked", "reference"))
    assert_close(got[0], expected[0], 1e-10)
    assert_close(got[1], expected[1], 1e-10)


@SETTINGS
@given(sequence_shapes(), st.sampled_from(["static", "shared", "grouped"]), st.integers(0, 2**31 - 1))
def test_selective_scan(s, layout, seed):
    torch.manual_seed(seed)
    B, T, Dm, N = s["B"], s["T"], 2 * s["H"], s["K"]
    BC = {"static": (Dm, N), "shared": (B, T, N), "grouped": (B, T, 2, N)}[layout]
    args = (torch.randn(B, T, Dm, dtype=D64), torch.randn(B, T, Dm, dtype=D64), -torch.rand(Dm, N, dtype=D64) * 4,
            torch.randn(BC, dtype=D64), torch.randn(BC, dtype=D64), torch.randn(Dm, dtype=D64),
            torch.randn(B, T, Dm, dtype=D64), torch.randn(Dm, dtype=D64), True)
    state = torch.randn(s["N"], Dm, N, dtype=D64) if s["initial"] else None
    kw = dict(initial_state=state, return_last_state=True, cu_seqlens=s["cu_seqlens"])
    got, expected = (rnnops.selective_scan(*args, **kw, backend=b) for b in ("chunked", "reference"))
    assert_close(got[0], expected[0], 1e-10)
    assert_close(got[1], expected[1], 1e-10)
