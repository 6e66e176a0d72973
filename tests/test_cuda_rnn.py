"""CUDA fused recurrent cells (csrc/rnn) through the simulator against the float64 reference:
forward, final states and every gradient, heads split over blocks with a grid barrier; their
instantiations compile for sm_80 and sm_90a without spills."""
import pytest
import torch

from conftest import assert_close, compare_backends
from rnnops.autotune import cache, hardware, kernels
from rnnops.cuda_backend import compile_check
from rnnops.cuda_backend import rnn as cuda_rnn
from test_triton_rnn import GATES, make_inputs, run


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("shape", [dict(), dict(B=20, D=32, initial=False, bias=False), dict(T=3, H=2, D=80),
                                   dict(T=1)], ids=["basic", "B20-D32-no-state-no-bias", "D80-split-over-blocks", "T1"])
def test_matches_reference(cell, shape):
    compare_backends(run(cell), make_inputs(cell, **shape), 1e-5, test="cuda")


@pytest.mark.parametrize("cell", ["lstm", "slstm"])
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [{"D": 32}, {"T": 3, "D": 80}, {"T": 2, "H": 1, "D": 144}],
                         ids=["one-block", "D80-split-over-blocks", "D144-two-gradient-chunks"])
def test_tensor_core_path(cell, dtype, bound, shape):
    """Half types: one block per head (h_{t-1} and the gate gradients kept in shared memory), a
    head split over two blocks (h_{t-1} copied from h_seq, the gate gradients staged in one chunk),
    and over three, the last partly filled, with 576 gate gradients a row staged in two chunks."""
    compare_backends(run(cell, dtype), make_inputs(cell, dtype=dtype, **shape), bound, test="cuda")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_tensor_core_products_split_over_warps(cell):
    """16-unit slices at 256 threads (8 warps): the forward's 4 (LSTM) or 3 (GRU: two warps idle)
    output tiles take 2 warps each and the backward's one tile 8 (csrc/rnn/rnn.cuh warp_share:
    each tile's K steps dealt out, the partial tiles summed); a head of 48 over three blocks."""
    x = make_inputs(cell, dtype=torch.bfloat16, T=3, D=48)
    bucket = kernels.bucket("rnn", kernels.rnn_shape(x["x_gates"], cell), torch.bfloat16)
    assert cuda_rnn.k_parts(4 * 16, 256, 2) == 2 and cuda_rnn.k_parts(16, 256, 2) == 8
    with cache.override("rnn", "cuda", bucket, {"units": 16, "threads": 256}):
        compare_backends(run(cell, torch.bfloat16), x, 2e-2, test="cuda")


@pytest.mark.parametrize("cell", list(GATES))
def test_inference_writes_no_pre_activations(cell):
    """Under no_grad the forward writes no pre-activations (the simulator gets no buffer: a write
    would fault), and h_seq and the final states still match the reference."""
    x = make_inputs(cell, T=4, D=32)
    with torch.no_grad():
        outputs = run(cell)("cuda", **x)
        expected = run(cell)("reference", **{k: v.double() for k, v in x.items()})
    for i, (a, b) in enumerate(zip(outputs, expected)):
        assert_close(a, b, 1e-5, f"output {i}")


def test_config_space_fits_shared_memory():
    h100 = hardware.named("H100")
    for D in (64, 256, 768):
        legal = cuda_rnn.space(D, 4, 2, h100).legal()
        assert legal and all(max(cuda_rnn.shared_bytes(D, 4, p["units"], 2, p["threads"])) <= h100.shared_memory_per_block
                             for p in legal)


def test_launch_narrows_a_slice_that_does_not_fit_the_gpu(monkeypatch):
    """A configuration asks for 64 units whatever D (the default, or one tuned for another D of the
    bucket); sLSTM at D = 768 in bf16 then needs 424 KB of shared memory (on an H100 the launch
    failed with CUDA_ERROR_INVALID_VALUE). The launch takes the widest slice that fits, and a head
    too wide for any slice is refused by `supports` so `auto` picks another backend."""
    monkeypatch.setattr(cuda_rnn, "block_shared_memory", lambda device: hardware.named("H100").shared_memory_per_block)
    cuda = torch.device("cuda")
    assert cuda_rnn.slice_units(64, 768, 4, 2, 256, cuda) == 32
    assert cuda_rnn.slice_units(64, 192, 4, 2, 256, cuda) == 64
    assert cuda_rnn.slice_units(64, 40, 4, 2, 256, cuda) == 32  # no wider than D rounded up to 16
    monkeypatch.setattr(cuda_rnn, "device_reason", lambda device: None)
    assert "shared memory" in cuda_rnn.supports(dtype=torch.float32, device=cuda, head_dim=768, cell="slstm")
    assert cuda_rnn.supports(dtype=torch.bfloat16, device=cuda, head_dim=768, cell="slstm") is None


def default_kernels() -> list[compile_check.Instantiation]:
    units = cuda_rnn.DEFAULT_CONFIG.units
    return [compile_check.rnn_kernel(phase, dtype, cell, units)
            for phase in ("fwd", "bwd") for dtype in ("float", "__nv_bfloat16") for cell in range(4)]


@pytest.mark.skipif(compile_check.nvcc() is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_default_configs_compile_without_spills(arch):
    kernels = default_kernels()
    reports = compile_check.ptxas_reports(kernels, arch)
    assert len(reports) == len(kernels)
    for report in reports:
        assert report.spill_stores == 0 and report.spill_loads == 0, report


@pytest.mark.skipif(compile_check.libnvrtc() is None, reason="needs libnvrtc (RNNOPS_LIBNVRTC)")
def test_default_configs_compile_with_nvrtc():
    """NVRTC, which compiles them on a GPU, refuses some C++ nvcc accepts."""
    compile_check.nvrtc_compile(default_kernels(), "sm_90a")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("H,D", [(1, 768), (4, 192), (12, 64)])
def test_realistic_shapes_on_gpu(cell, H, D):
    x = make_inputs(cell, B=16, T=64, H=H, D=D, dtype=torch.bfloat16, device="cuda")
    compare_backends(run(cell, torch.bfloat16), x, 2e-2, test="cuda")
