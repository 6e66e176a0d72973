"""CUDA selective scan (csrc/scan) through the simulator against the float64 reference, forward
and every gradient; its instantiations compile for sm_80 and sm_90a without spills."""
import dataclasses

import pytest
import torch

from conftest import assert_close, compare_backends
from rnnops._sass import STORE_BREAKS, cuobjdump
from rnnops.autotune import hardware
from rnnops.compat import mamba_ssm
from rnnops.cuda_backend import compile_check
from rnnops.cuda_backend import selective_scan as cuda_scan
from test_triton_selective_scan import make_inputs, scan


@pytest.mark.parametrize("layouts", [("static", "static"), ("shared", "shared"), ("grouped", "shared"),
                                     ("shared", "grouped")], ids=lambda x: "/".join(x))
def test_layouts(layouts):
    compare_backends(scan, make_inputs(layout_B=layouts[0], layout_C=layouts[1]), 1e-5, test="cuda")


@pytest.mark.parametrize("shape", [dict(T=1), dict(T=100, initial=False), dict(extras=False),
                                   dict(T=70, A_scale=200.0), dict(Dm=40, T=40),
                                   dict(N=13, Dm=96, T=45, layout_B="grouped")],
                         ids=["T1", "T100-no-initial", "no-D-z-bias", "large-A", "Dm40-two-blocks", "N13-staged-rows"])
def test_shapes_and_options(shape):
    x = make_inputs(**shape)
    if shape.get("Dm") == 40:
        x["C"] = torch.randn(2, 40, 4, 4)  # 4 groups of 10 channels: a warp spans groups
    compare_backends(scan, x, 1e-5, test="cuda")


@pytest.mark.parametrize("layout", ["static", "shared"], ids=["global-rows", "staged-rows"])
def test_strong_decay_keeps_every_gradient(layout):
    """Every step's decay below e^-5 (A ~ -25 .. -50, dt >= 0.2), so each a_t x_{t-1} lies far
    below x_t: the backward that formed it as x_t - dt_t u_t B_t (step-split, B and C from global
    memory) lost it to cancellation, dA 0 where it was 1e-13 .. 1e-33 (channels with larger dt) and
    off by 1.5e-3 where 5e-7."""
    x = make_inputs(B=2, T=40, Dm=6, N=4, layout_B=layout, layout_C=layout, initial=False, A_scale=50.0)
    x["delta"], x["delta_bias"] = x["delta"].abs(), x["delta_bias"].abs() + 0.2
    x["A"] = x["A"] - 25.0
    compare_backends(lambda backend, **kw: scan(backend, softplus=False, **kw), x, 1e-5, test="cuda")


def test_inference_stores_no_chunk_states():
    """Under no_grad the simulator gets no chunk-state buffer (a store would fault), and out and
    the final state still match the reference."""
    x = make_inputs(T=40)
    with torch.no_grad():
        out, last = scan("cuda", **x)
        expected = scan("reference", **{k: v.double() for k, v in x.items()})
    assert_close(out, expected[0], 1e-5, "out")
    assert_close(last, expected[1], 1e-5, "last state")


@pytest.mark.parametrize("layout_C", ["grouped", "shared"], ids=["global-rows", "staged-rows"])
def test_varlen_and_strides(layout_C):
    offsets = torch.tensor([0, 5, 5, 17, 18, 30])
    x = make_inputs(B=1, T=30, initial=False, layout_C=layout_C)
    x["initial_state"] = torch.randn(5, 6, 4)
    x["u"] = x["u"].transpose(1, 2).contiguous().transpose(1, 2)
    compare_backends(lambda backend, **kw: scan(backend, cu_seqlens=offsets, **kw), x, 1e-5, test="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations(dtype):
    compare_backends(scan, make_inputs(dtype=dtype, layout_C="shared"), 2e-2 if dtype == torch.bfloat16 else 2e-3,
                     test="cuda")


@pytest.mark.parametrize("config,staged", [
    (cuda_scan.ScanConfig(1, 4), False), (cuda_scan.ScanConfig(8, 8), False), (cuda_scan.ScanConfig(1, 4), True),
    (cuda_scan.ScanConfig(8, 8), True), (cuda_scan.ScanConfig(4, 8, stage_rows=0), True),
], ids=["1x4-global-rows", "8x8-global-rows", "1x4-staged-rows", "8x8-staged-rows", "4x8-rows-shared-not-staged"])
def test_other_tiles(config, staged):
    """T = 37 ends inside a chunk. Staged: B and C grouped and shared in groups of 32 channels
    (Dm 96: three blocks, one group each), so each block stages its chunk's rows in shared memory
    (unless the configuration's stage_rows is 0); else C's groups of 2 channels make every block
    read C per channel from global memory."""
    x = make_inputs(T=37, Dm=96 if staged else 6, layout_B="grouped" if staged else "shared")
    compare_backends(lambda backend, **kw: rnnops_scan(backend, config, **kw), x, 1e-5, test="cuda")


@pytest.mark.parametrize("dtype,T,config,bound", [
    (torch.float32, 45, cuda_scan.DEFAULT_CONFIG, 1e-5),
    (torch.float32, 45, cuda_scan.ScanConfig(4, 8, stage_rows=0), 1e-5),
    (torch.bfloat16, 48, cuda_scan.DEFAULT_CONFIG, 2e-2),
], ids=["float32-staged-rows", "float32-global-rows", "bfloat16-staged-rows"])
def test_mamba_layout_steps_contiguous(dtype, T, config, bound):
    """mamba_ssm's (B, D, L) layout, as rnnops.compat.mamba_ssm passes it: u, delta, z and (the
    output returned transposed, as the compat function does) d_out have contiguous steps, which
    load_items reads 16 bytes a lane where the lane's ITEMS steps all exist and start aligned.
    float32 at T 45: channels 180 bytes apart, so aligned and unaligned lanes meet in one load, and
    the last chunk is partial; Dm 40: a second block with dead lanes."""
    x = make_inputs(T=T, Dm=40, layout_B="shared", layout_C="shared", dtype=dtype)
    for name in ("u", "delta", "z"):
        x[name] = x[name].transpose(1, 2).contiguous().transpose(1, 2)

    def time_last(backend, **kw):
        out, last = rnnops_scan(backend, config, **kw)
        return out.transpose(1, 2), last

    compare_backends(time_last, x, bound, test="cuda")


@pytest.mark.parametrize("config", [cuda_scan.DEFAULT_CONFIG, cuda_scan.ScanConfig(4, 8, stage_rows=0)],
                         ids=["staged-rows", "global-rows"])
def test_outputs_and_gradients_keep_us_dimension_order(config):
    """The output, du, d delta and dz take u's dimension order: mamba's (B, D, L) tensors, passed as
    (B, T, D) views (here x and z sliced from a (B, 2D, L) tensor, as Mamba splits xz), get
    (B, D, L)-contiguous results, which autograd hands on to (B, D, L) tensors without copying."""
    x = make_inputs(B=2, T=48, Dm=40, N=4, layout_B="shared", layout_C="shared", initial=False,
                    dtype=torch.bfloat16)
    xz = torch.randn(2, 80, 48, dtype=torch.bfloat16, requires_grad=True)
    u, z = (part.transpose(1, 2) for part in xz.chunk(2, dim=1))
    delta = x["delta"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    out, _ = cuda_scan.selective_scan(u, delta, x["A"], x["B"], x["C"], x["D"], z, x["delta_bias"], True,
                                      initial_state=None, output_final_state=False, cu_seqlens=None, config=config)
    assert out.stride() == (40 * 48, 1, 48)
    grads = torch.autograd.grad(out, (u, delta, z), torch.randn_like(out))
    for grad in grads:  # dense (B, D, L), not xz's 80-row layout
        assert grad.stride() == (40 * 48, 1, 48) and not grad.isnan().any()


@pytest.mark.parametrize("config,staged", [
    (cuda_scan.ScanConfig(1, 4, segments=4), True), (cuda_scan.ScanConfig(1, 4, segments=8), True),
    (cuda_scan.ScanConfig(2, 4, segments=3), False), (cuda_scan.ScanConfig(4, 8, segments=16), True),
], ids=["4-segments-staged-rows", "8-segments-some-empty", "3-segments-global-rows", "16-segments-one-chunk"])
def test_segments(config, staged):
    """Each sequence split into segments walked by blocks of their own (the LOCAL passes, the
    composition, then the main kernels from the values it gives): T = 37 in 4-step chunks is 10
    chunks, in 4 segments of 3, 3, 3 and 1 or in 8 of 2 (the last three empty); in 8-step chunks and
    3 segments of 2 chunks (B and C from global memory: C grouped in 2-channel groups); the shipped
    4 x 8 tile's 16 capped at the 2 chunks of 32 steps. Staged: B and C shared, Dm 40 (a second
    block, 8 channels live), N 20 (the LOCAL passes carry 16 state elements at a time: two runs,
    the second partial). With an initial state, D, z and delta_bias, every gradient."""
    x = make_inputs(T=37, Dm=40 if staged else 6, N=20 if staged else 4, layout_C="shared" if staged else "grouped")
    compare_backends(lambda backend, **kw: rnnops_scan(backend, config, **kw), x, 1e-5, test="cuda")


def test_varlen_in_segments(monkeypatch):
    """Packed sequences of 5, 0, 12, 1 and 12 steps (2, 0, 3, 1 and 3 chunks of 4 steps), each in 3
    segments (empty ones among them), with initial states; the half-type kernels' segments too
    (bf16 loads of delta, u, z and d_out in the LOCAL passes)."""
    monkeypatch.setattr(cuda_scan, "DEFAULT_CONFIG", cuda_scan.ScanConfig(1, 4, segments=3))
    offsets = torch.tensor([0, 5, 5, 17, 18, 30])
    x = make_inputs(B=1, T=30, initial=False, layout_C="shared")
    x["initial_state"] = torch.randn(5, 6, 4)
    compare_backends(lambda backend, **kw: scan(backend, cu_seqlens=offsets, **kw), x, 1e-5, test="cuda")
    compare_backends(scan, make_inputs(T=37, dtype=torch.bfloat16, layout_C="shared"), 2e-2, test="cuda")


def rnnops_scan(backend, config, **x):
    """The scan with an explicit tile configuration for the cuda backend."""
    if backend == "cuda":
        initial = x.pop("initial_state", None)
        args = [x["u"], x["delta"], x["A"], x["B"], x["C"], x.get("D"), x.get("z"), x.get("delta_bias"), True]
        return cuda_scan.selective_scan(*args, initial_state=initial, output_final_state=True, cu_seqlens=None,
                                        config=config)
    return scan(backend, **x)


def test_state_elements_beyond_shared_memory_are_refused(monkeypatch):
    """A GPU whose blocks cannot hold the default tile's shared memory at this N is no candidate
    (``auto`` moves on; backend="cuda" gets a ValueError naming N), rather than a failed launch.
    Where only the staged kernels do not fit, B and C are read from global memory instead."""
    monkeypatch.setattr(cuda_scan, "block_shared_memory", lambda device: hardware.named("A100").shared_memory_per_block)
    cuda = torch.device("cuda")
    assert "N=512 state elements need" in cuda_scan.supports(dtype=torch.bfloat16, device=cuda, shape={"N": 512})
    for N in (16, 256):
        assert "state elements" not in (cuda_scan.supports(dtype=torch.bfloat16, device=cuda, shape={"N": N}) or "")
    shared = [cuda_scan.SHARED, 0, 16, 0, 1, 64]
    assert cuda_scan._stages(cuda_scan.DEFAULT_CONFIG, shared, shared, 16, cuda)
    assert not cuda_scan._stages(cuda_scan.DEFAULT_CONFIG, shared, shared, 256, cuda)


def test_config_space():
    legal = cuda_scan.space(16, hardware.named("H100")).legal()
    assert dataclasses.asdict(cuda_scan.DEFAULT_CONFIG) in legal


def default_kernels() -> list[compile_check.Instantiation]:
    """The default tiles' kernels, every element type, and the segments' (LOCAL passes: float32 and
    bfloat16, for which float16 differs in its conversions alone; the composition)."""
    config, dtypes = cuda_scan.DEFAULT_CONFIG, ("float", "__half", "__nv_bfloat16")
    return ([compile_check.scan_kernel(phase, dtype, config.warps, config.items, staged)
             for phase in ("fwd", "bwd") for dtype in dtypes for staged in (True, False)]
            + [compile_check.scan_segment_kernel(phase, dtype, staged) for phase in ("fwd_local", "bwd_local")
               for dtype in ("float", "__nv_bfloat16") for staged in (True, False)]
            + [compile_check.scan_segment_kernel("compose", reverse=reverse) for reverse in (False, True)])


@pytest.mark.skipif(compile_check.nvcc() is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_default_configs_compile_without_spills(arch):
    kernels = default_kernels()
    reports = compile_check.ptxas_reports(kernels, arch)
    assert len(reports) == len(kernels)
    for report in reports:
        assert report.spill_stores == 0 and report.spill_loads == 0, report
        assert report.registers <= 255


@pytest.mark.skipif(compile_check.libnvrtc() is None, reason="needs libnvrtc (RNNOPS_LIBNVRTC)")
def test_default_configs_compile_with_nvrtc():
    """NVRTC, which compiles them on a GPU, refuses some C++ nvcc accepts: a lambda capturing
    structured bindings broke the backward there (2026-11-27)."""
    compile_check.nvrtc_compile(default_kernels(), "sm_90a")


@pytest.mark.skipif(compile_check.nvcc() is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("phase,staged,budget", [("fwd", True, 8), ("bwd", True, 34), ("fwd", False, 25),
                                                  ("bwd", False, 100)])
def test_loop_over_state_elements_stays_lean(phase, staged, budget):
    """SASS instructions per exponential in the innermost loop with exponentials at the default
    tile, sm_90a. With B and C staged in shared memory (the usual case), a warp's walk of a
    chunk's steps for four state elements: 7.0 forward (one exponential per (step, channel,
    state element)), 30.0 backward (per sub-block: the replay's exponential, the adjoint, dA, the
    sums over the elements, dB and dC halved over the lanes). Reading them from global memory,
    the loop over n: 23.4 forward, 86.9 backward (both ways of adding dB / dC counted). Resolving
    B and C's mode and address per element, and composing the warps' segments in a loop of
    run-time length, had made it 65 forward and over 500 per element backward (that code has no
    loop this finds); the step-split kernels took 11.7 and 39.7 staged, and the backward's
    halving kept its 32 values in local memory until its rounds became template arguments."""
    config = cuda_scan.DEFAULT_CONFIG
    kernel = compile_check.scan_kernel(phase, "__nv_bfloat16", config.warps, config.items, staged)
    loop = compile_check.inner_loop(kernel, "sm_90a")
    assert loop.instructions / loop.count("MUFU.EX2") <= budget, loop


@pytest.mark.skipif(compile_check.nvcc() is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_backward_walk_stores_only_what_it_carries():
    """The staged backward's walk of a sub-block (bf16, default tile, sm_90a; its innermost loop
    with exponentials, once per group of four state elements) stores 12 values to shared memory:
    the carried gradient, the decay after the sub-block and dA of its four elements. Its per-step
    sums over the elements stay in registers until the group loop ends: added into shared memory
    step by step (36 stores), each step's shared loads waited behind the step before's stores."""
    config = cuda_scan.DEFAULT_CONFIG
    loop = compile_check.inner_loop(compile_check.scan_kernel("bwd", "__nv_bfloat16", config.warps, config.items),
                                    "sm_90a")
    assert loop.count("STS") == 12, loop


@pytest.mark.skipif(compile_check.nvcc() is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("staged", [True, False], ids=["staged-rows", "global-rows"])
@pytest.mark.parametrize("phase,outputs", [("fwd", 1), ("bwd", 3)])
def test_contiguous_steps_are_stored_as_16_byte_words(phase, outputs, staged):
    """bf16, default tile, sm_90a: where a lane's 8 steps are contiguous (outputs in mamba's (B, D,
    L) order) the forward stores out and the backward du, d delta and dz as one 16-byte word each
    (STG.E.128; store_items), beside the element-by-element stores of every other layout."""
    from rnnops._sass import _functions

    config = cuda_scan.DEFAULT_CONFIG
    _, cubin = compile_check._compile([compile_check.scan_kernel(phase, "__nv_bfloat16", config.warps, config.items,
                                                                 staged)], "sm_90a")
    assert sum("STG.E.128" in instruction for function in _functions(cubin) for _, instruction in function) == outputs


@pytest.mark.skipif(compile_check.nvcc() is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("phase,loads,words,staging", [("fwd", 3 * 8, 3, 8), ("bwd", 4 * 8 + 1, 4, 8 + 4)])
def test_a_chunk_waits_for_one_round_of_loads(phase, loads, words, staging):
    """The staged kernels (bf16, default tile, sm_90a) issue all of a chunk's activation loads
    together, before anything waits for one (rnnops._sass.load_rounds): the forward a warp's
    ITEMS steps of delta, u and z, the backward of delta, u, d_out and z and delta after the
    chunk; none in the phases that store the outputs. At dd69b80 each step waited for its own
    loads (32 rounds forward, 35 backward): 0.99 ms forward and 3.72 backward on the H200,
    against mamba_ssm's 0.59 and 2.27. In the same round, predicated, each operand's 16-byte word
    (a lane's 8 steps where they are contiguous: load_items). And no store waits for a load before
    the staging's loads are in flight too (STORE_BREAKS; the branches of their bounds tests wait
    for nothing): a thread's 4 indices of B and C rows (stage_rows) and, backward, of the chunk's
    state, where each operand's staging had waited for its own loads (three memory latencies a
    chunk backward, two forward)."""
    config = cuda_scan.DEFAULT_CONFIG
    kernel = compile_check.scan_kernel(phase, "__nv_bfloat16", config.warps, config.items)
    assert compile_check.sass_load_rounds(kernel, "sm_90a", ("LDG.E.U16", "LDG.E.128")) == [loads + words]
    assert max(compile_check.sass_load_rounds(kernel, "sm_90a", "LDG.E", STORE_BREAKS)) >= loads + words + staging


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("layout_C", ["shared", "static"], ids=["staged-rows", "global-rows"])
def test_realistic_shapes_on_gpu(dtype, bound, layout_C):
    """Groups of 32 channels for B: with a shared C every block stages its rows; a static C is per channel."""
    x = make_inputs(B=2, T=2000, Dm=96, N=16, layout_B="grouped", layout_C=layout_C, dtype=dtype, device="cuda")
    compare_backends(scan, x, bound, test="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("layout_C", ["shared", "static"], ids=["staged-rows", "global-rows"])
def test_segments_on_gpu(layout_C):
    """Batch 1 in 8 segments (what the Hopper entries at batch 1 ship): NVRTC's build of the LOCAL
    passes and the composition, launched."""
    x = make_inputs(B=1, T=4000, Dm=96, N=16, layout_B="shared", layout_C=layout_C, dtype=torch.bfloat16,
                    device="cuda")
    compare_backends(lambda backend, **kw: rnnops_scan(backend, cuda_scan.ScanConfig(segments=8), **kw), x, 1e-2,
                     test="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,T,bound", [(torch.bfloat16, 2000, 1e-2), (torch.float32, 2003, 1e-5)])
def test_mamba_layout_on_gpu(dtype, T, bound):
    """The drop-in: rnnops.compat.mamba_ssm.selective_scan_fn on (B, D, L) and (B, N, L) tensors,
    whose steps the kernels load 16 bytes a lane (a misaligned word would fault here; T 2003
    leaves most float32 channels unaligned, and a partial last span)."""
    x = make_inputs(B=2, T=T, Dm=96, N=16, layout_B="shared", layout_C="shared", initial=False, dtype=dtype,
                    device="cuda")
    mamba = {k: v.transpose(1, 2).contiguous() if k in ("u", "delta", "z", "B", "C") else v for k, v in x.items()}

    def selective_scan_fn(backend, u, delta, A, B, C, D, z, delta_bias):
        return mamba_ssm.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                           return_last_state=True, backend=backend)

    compare_backends(selective_scan_fn, mamba, bound, test="cuda")
