"""Peer adapters: each converts a standard case to the peer's layout and back, checked against
our reference where the peer's pure-PyTorch reference runs on the CPU."""
import sys
import types

import pytest
import torch

from rnnops.bench import cases as bench_cases
from rnnops.bench.peers import PEERS, PeerUnavailable
from rnnops.bench.runner import rel_err

CPU = torch.device("cpu")
PEER = {p.name: p for p in PEERS}


def check(peer_name, case, bound=1e-5):
    peer = PEER[peer_name]
    assert peer.applies(case)
    inputs = case.make(CPU, torch.float32)
    call = peer.load(CPU, torch.float32)
    with torch.no_grad():
        theirs = peer.to_ours(case, call(peer.prepare(case, inputs)))
        ours = case.run(inputs, "reference")
    assert rel_err(theirs, ours) <= bound


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("heads", [1, 3])
def test_torch_nn_with_block_diagonal_heads(cell, heads):
    check(f"torch.nn.{cell.upper()}", bench_cases.rnn_case(cell, 2, 9, heads, 4))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_flashrnn_vanilla(cell):
    pytest.importorskip("flashrnn")
    check("flashrnn.vanilla", bench_cases.rnn_case(cell, 2, 9, 3, 8))


FLA_CASES = [
    ("fla.chunk_simple_gla", bench_cases.linear_attn_case("none", 2, 19, 2, 8, 6)),
    ("fla.chunk_simple_gla", bench_cases.linear_attn_case("scalar", 2, 19, 2, 8, 6)),
    ("fla.chunk_gla", bench_cases.linear_attn_case("per-key", 2, 19, 2, 8, 6)),
    ("fla.chunk_delta_rule", bench_cases.delta_case(1, False, 2, 19, 2, 8, 6)),
    ("fla.chunk_gated_delta_rule", bench_cases.delta_case(1, True, 2, 19, 2, 8, 6)),
    ("fla.chunk_gated_delta_product", bench_cases.delta_case(3, True, 2, 11, 2, 8, 6)),
]


@pytest.mark.parametrize("name,case", FLA_CASES, ids=[f"{n}-{c.name}" for n, c in FLA_CASES])
def test_fla_naive_references(name, case):
    pytest.importorskip("fla")
    check(name, case)


@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_fla_simple_gla_chunk_kernel_gets_a_gate_only_when_gated(gate):
    """The naive recurrence needs a (zero) gate; fla's chunked kernel runs ungated without one."""
    case = bench_cases.linear_attn_case(gate, 2, 19, 2, 8, 6)
    inputs = case.make(CPU, torch.float32)
    prepared = PEER["fla.chunk_simple_gla"].prepare(case, inputs)
    assert prepared["g"].shape == (2, 19, 2)
    assert prepared["chunk_g"] is None if gate == "none" else prepared["chunk_g"] is inputs["g"]


@pytest.mark.parametrize("steps_contiguous", [False, True], ids=["rnnops-layout", "mamba-layout"])
def test_mamba_layout_conversion(monkeypatch, steps_contiguous):
    """mamba_ssm cannot be installed without its CUDA build; a stand-in written in mamba's own
    layout ((B, D, L) activations, (B, N, L) for B and C) checks the conversion, from the bench
    case's inputs in either memory layout."""
    def selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus=False):
        dt = torch.nn.functional.softplus(delta + delta_bias[:, None])
        x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        ys = []
        for t in range(u.shape[2]):
            x = torch.exp(dt[:, :, t, None] * A) * x + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
            ys.append((x * C[:, None, :, t]).sum(-1))
        y = torch.stack(ys, dim=2) + D[:, None] * u
        return y * torch.nn.functional.silu(z)

    module = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    module.selective_scan_ref = selective_scan_ref
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", module)
    check("mamba_ssm.selective_scan_ref", bench_cases.selective_scan_case(2, 13, 6, 4, steps_contiguous))


def test_mamba_selective_scan_ref():
    """mamba_ssm's own reference, where it is installed (the GPU suite's wheel from
    bench/build_mamba_ssm.sh: importing its interface loads the CUDA extension, even on a CPU)."""
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    check("mamba_ssm.selective_scan_ref", bench_cases.selective_scan_case(2, 13, 6, 4))


def test_fast_paths_say_why_they_cannot_run_on_a_cpu():
    for name in ("flashrnn.cuda_fused", "mamba_ssm.selective_scan_fn"):
        with pytest.raises(PeerUnavailable, match="cuda|CUDA"):
            PEER[name].load(CPU, torch.float32)


def test_flashrnn_fused_is_timed_on_the_lstm_head_splits_of_issue_6_only():
    """It builds, runs and bisects a torch extension per shape on the device: the LSTM's 768 units
    as 1, 4 and 12 heads; FlashRNN's other backends take every LSTM and GRU case."""
    fused, alternating = PEER["flashrnn.cuda_fused"], PEER["flashrnn.cuda"]
    timed = [(cell, H, D) for cell in ("lstm", "gru") for D, H in bench_cases.FLASHRNN_HEADS + ((192, 4),)
             if fused.applies(bench_cases.rnn_case(cell, 16, 1024, H, D))]
    assert timed == [("lstm", 12, 64), ("lstm", 1, 768), ("lstm", 4, 192)]
    assert alternating.applies(bench_cases.rnn_case("gru", 16, 1024, 48, 16))
