"""Triton fused recurrent cells against the float64 reference: forward, final states and every
gradient (x_gates, R, b, initial states), interpreter on the CPU, poisoned outputs."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

import rnnops
from conftest import assert_close, compare_backends
from rnnops.autotune import cache, hardware, kernels
from rnnops.triton_backend import rnn as triton_rnn
from test_rnn import GATES, STATES


def make_inputs(cell, B=3, T=5, H=2, D=16, initial=True, bias=True, dtype=torch.float32, device="cpu"):
    x = {"x_gates": torch.randn(B, T, GATES[cell], H, D).to(dtype),
         "R": torch.randn(GATES[cell], H, D, D) / D**0.5}
    if bias:
        x["b"] = torch.randn(GATES[cell], H, D) * 0.1
    if initial:
        for i in range(STATES[cell]):
            x[f"state{i}"] = torch.randn(B, H, D).abs() + 0.5 if (cell, i) == ("slstm", 2) else torch.randn(B, H, D)
    return {k: v.to(device) for k, v in x.items()}


def run(cell, dtype=torch.float32):
    """The op as a function of the test inputs: outputs h_seq and the final states. For sLSTM in
    half precision only h_seq and the final h: its final c, n and m carry the stabiliser m, and a
    loss on them is not differentiable where max(log f + m_prev, i) ties, so a half-precision
    rounding that flips a near-tie moves O(1) gradient between the i and f gates of different
    steps (gradient errors of 2-6e-2 in ten elements, simulator, bf16); a loss on h alone is smooth
    (h does not depend on m) and the same kernels stay within 3e-3."""
    def call(backend, x_gates, R, b=None, **states):
        state = tuple(states[f"state{i}"] for i in range(len(states))) or None
        h_seq, final = rnnops.rnn(x_gates, R, b, state, cell=cell, backend=backend)
        if cell == "slstm" and dtype in (torch.float16, torch.bfloat16):
            return h_seq, final[0]
        return (h_seq,) + final

    return call


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("shape", [dict(), dict(B=20, D=32, initial=False, bias=False), dict(T=3, H=1, D=80),
                                   dict(T=1)], ids=["basic", "B20-D32-no-state-no-bias", "D80-tiles", "T1"])
def test_matches_reference(cell, shape):
    compare_backends(run(cell), make_inputs(cell, **shape), 1e-5, test="triton")


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("config, D, resident", [({"block_d": 128, "block_k": 128}, 80, True),
                                                 ({"block_d": 128, "block_k": 128, "recompute": 1}, 80, True),
                                                 ({"block_d": 128, "block_k": 128, "num_stages": 2}, 80, True),
                                                 ({"block_d": 16, "block_k": 16}, 32, False)],
                         ids=["resident-padded", "resident-recompute", "resident-two-stages", "tiled"])
def test_resident_and_tiled_paths(cell, config, D, resident, monkeypatch):
    """Forward and backward hold R and the carried states on chip when one tile spans the head
    (RESIDENT; here with 48 padded units masked off; with recompute the backward computes the
    pre-activations again, the forward saving none; at two stages the time loops name their stage
    count, which a GPU pipelines: test_two_stages_on_gpu), else they walk the tiles through memory:
    all against the reference."""
    chosen = triton_rnn.RNNConfig(**config)
    launcher = triton_rnn._Launcher(cell, chosen, 3, 4, 2, D, torch.float32, torch.device("cpu"))
    assert (launcher.resident, launcher.recompute) == (resident, bool(chosen.recompute))
    monkeypatch.setattr(triton_rnn, "DEFAULT_CONFIG", chosen)
    compare_backends(run(cell), make_inputs(cell, T=4, D=D), 1e-5, test="triton")


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("config, D", [({"block_d": 128, "block_k": 128}, 80), ({"block_d": 16, "block_k": 16}, 32)],
                         ids=["resident", "tiled"])
def test_inference_writes_only_what_it_returns(cell, config, D, monkeypatch):
    """Under no_grad (no backward can run) the forward saves no pre-activations and, resident,
    writes the states of the last step only: h_seq and the final states still match the
    reference (poisoned buffers: an unwritten final state is NaN)."""
    monkeypatch.setattr(triton_rnn, "DEFAULT_CONFIG", triton_rnn.RNNConfig(**config))
    x = make_inputs(cell, T=4, D=D)
    with torch.no_grad():
        outputs = run(cell)("triton", **x)
        expected = run(cell)("reference", **{k: v.double() for k, v in x.items()})
    for i, (a, b) in enumerate(zip(outputs, expected)):
        assert_close(a, b, 1e-5, f"output {i}")
    launcher = triton_rnn._Launcher(cell, triton_rnn.RNNConfig(**config), 3, 4, 2, D, torch.float32,
                                    torch.device("cpu"), saves=False)
    assert launcher.forward(x["x_gates"], x["R"], x["b"], None, torch.empty(3, 4, STATES[cell], 2, D),
                            torch.empty(3, 4, 2, D)) is None


def test_resident_forward_only_where_the_weights_fit_in_shared_memory(monkeypatch):
    """An L4-sized block (99 KB): an LSTM head of 64 stays resident in bfloat16 (40 KB of weights)
    but not in float32 (160 KB: tf32x3 operands), nor a head of 128 in bfloat16 (160 KB)."""
    monkeypatch.setattr(triton_rnn, "block_shared_memory", lambda device: 99 * 1024)
    spanning = triton_rnn.RNNConfig(block_d=128, block_k=128)

    def resident(dim, dtype):
        return triton_rnn._Launcher("lstm", spanning, 16, 4, 12, dim, dtype, torch.device("cuda")).resident

    assert resident(64, torch.bfloat16) and not resident(64, torch.float32) and not resident(128, torch.bfloat16)


@pytest.mark.parametrize("recompute, refusing, launches", [
    (0, "both", [("fwd", True), ("fwd", False), ("bwd", False)]),  # the forward refused, then all tiled
    (0, "bwd", [("fwd", True), ("bwd", True), ("bwd", False)]),
    # the recomputing forward saved no pre-activations: a tiled forward into scratch buffers makes them
    (1, "bwd", [("fwd", True), ("bwd", True), ("fwd", False), ("bwd", False)]),
])
def test_a_resident_launch_the_gpu_refuses_runs_tiled(monkeypatch, recompute, refusing, launches):
    """resident_shared_bytes is an estimate: where Triton refuses a resident kernel's shared
    memory (OutOfResources, raised when it loads the kernel), the launch runs tiled, warns, and
    the later ones run tiled too; the results stay those of the reference."""
    from triton.runtime.errors import OutOfResources

    kernels, seen = triton_rnn._kernels(), []

    class Refusing:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            def launch(*args, RESIDENT, **flags):  # the kernel's constexpr name
                seen.append((self.name, RESIDENT))
                if RESIDENT and refusing in (self.name, "both"):
                    raise OutOfResources(300_000, 232_448, "shared memory")
                return self.kernel[grid](*args, RESIDENT=RESIDENT, **flags)
            return launch

    monkeypatch.setattr(triton_rnn, "_kernels", lambda: SimpleNamespace(
        rnn_fwd_kernel=Refusing(kernels.rnn_fwd_kernel, "fwd"), rnn_bwd_kernel=Refusing(kernels.rnn_bwd_kernel, "bwd")))
    monkeypatch.setattr(triton_rnn, "DEFAULT_CONFIG", triton_rnn.RNNConfig(recompute=recompute))
    with pytest.warns(RuntimeWarning, match="resident kernels do not fit this GPU .out of resource: shared memory"):
        compare_backends(run("gru"), make_inputs("gru"), 1e-5, test="triton")
    assert seen == launches


def test_recompute_only_where_its_second_weight_copy_fits(monkeypatch):
    """A block of 200 KB holds a float32 LSTM head of 64 resident (160 KB) but not its recompute
    (288 KB): the pre-activations are saved then, whatever the configuration asks."""
    monkeypatch.setattr(triton_rnn, "block_shared_memory", lambda device: 200 * 1024)
    asked = triton_rnn.RNNConfig(block_d=64, block_k=64, recompute=1)

    def launcher(dtype):
        return triton_rnn._Launcher("lstm", asked, 16, 4, 12, 64, dtype, torch.device("cuda"))

    assert (launcher(torch.float32).resident, launcher(torch.float32).recompute) == (True, False)
    assert (launcher(torch.bfloat16).resident, launcher(torch.bfloat16).recompute) == (True, True)
    h100 = hardware.named("H100")
    legal = triton_rnn.space(64, 4, h100, 2).legal()
    assert {c["recompute"] for c in legal} == {0, 1} and all(c["block_d"] == 64 for c in legal if c["recompute"])
    for D, element_bytes in ((128, 2), (64, 4)):  # 288 KB each
        assert not any(c["recompute"] for c in triton_rnn.space(D, 4, h100, element_bytes).legal())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_float16(cell):
    compare_backends(run(cell), make_inputs(cell, dtype=torch.float16), 3e-3, test="triton")


def test_head_dim_limits_are_stated():
    x = make_inputs("lstm", D=24)
    with pytest.raises(ValueError, match="the head dim D must be a multiple of 16 in \\[16, 256\\], got 24"):
        run("lstm")("triton", **x)


@pytest.mark.parametrize("gpu", ["A100", "H100"])
def test_config_space(gpu):
    legal = triton_rnn.space(256, 4, hardware.named(gpu)).legal()
    assert triton_rnn.DEFAULT_CONFIG.__dict__ in legal


@pytest.mark.gpu
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H,D", [(1, 256), (4, 64), (12, 64), (6, 128)])
def test_realistic_shapes_on_gpu(cell, dtype, bound, H, D):
    """D = 128: resident in bfloat16 where the GPU ships 128-wide tiles (an H100's 160 KB of stacked
    weights), tiled in float32 (its tf32x3 operands do not fit)."""
    x = make_inputs(cell, B=16, T=128, H=H, D=D, dtype=dtype, device="cuda")
    compare_backends(run(cell, dtype), x, bound, test="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", list(GATES))
def test_two_stages_on_gpu(cell):
    """RNNConfig.num_stages 2: both time loops copy a step's inputs a step ahead (cp.async, which
    only a GPU runs): against the reference, bf16, resident (H12 D64) and tiled (D128 in 64-wide
    tiles), the configuration put in the cache where the shipped one would be read."""
    for H, D, block in ((12, 64, 64), (2, 128, 64)):
        x = make_inputs(cell, B=16, T=128, H=H, D=D, dtype=torch.bfloat16, device="cuda")
        bucket = kernels.bucket("rnn", kernels.rnn_shape(x["x_gates"], cell), torch.bfloat16)
        config = dataclasses.asdict(triton_rnn.RNNConfig(block_d=block, block_k=block, num_stages=2))
        with cache.override("rnn", "triton", bucket, config):
            compare_backends(run(cell, torch.bfloat16), x, 2e-2, test="triton")


@pytest.mark.gpu
def test_nn_lstm_runs_triton_on_gpu():
    """The nn drop-in with the Triton backend named (auto picks the CUDA cells first on a GPU)."""
    module = rnnops.nn.LSTM(64, 128, num_heads=2, batch_first=True, backend="triton").cuda()
    reference = rnnops.nn.LSTM(64, 128, num_heads=2, batch_first=True, backend="reference").cuda()
    reference.load_state_dict(module.state_dict())
    x = torch.randn(4, 50, 64, device="cuda")
    torch.testing.assert_close(module(x)[0], reference(x)[0], rtol=1e-4, atol=1e-5)
