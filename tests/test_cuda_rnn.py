"""CUDA fused recurrent cells (csrc/rnn) through the simulator against the float64 reference:
forward, final states and every gradient, heads split over blocks with a grid barrier; their
instantiations compile for sm_80 and sm_90a without spills."""
from dataclasses import replace

import pytest
import torch

import rnnops
from conftest import assert_close, compare_backends
from rnnops._sass import STORE_BREAKS, cuobjdump
from rnnops.autotune import cache, hardware, kernels
from rnnops.cuda_backend import compile_check, engines
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


def _spy(monkeypatch, name: str) -> list[int]:
    """The k_steps of every launch of the simulator's ``name`` from now on."""
    simulator, launched = engines.simulator(), []
    kernel = getattr(simulator, name)
    monkeypatch.setattr(simulator, name, lambda *args: launched.append(args[-2]) or kernel(*args))
    return launched


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [{"D": 64}, {"B": 20, "T": 3, "D": 16, "initial": False, "bias": False},
                                   {"T": 3, "H": 1, "D": 48}], ids=["D64", "B20-D16-no-state-no-bias", "D48"])
def test_fragment_kernels(cell, dtype, bound, shape, monkeypatch):
    """RNNConfig.forward_fragments and backward_fragments: both directions in tensor-core fragments
    (csrc/rnn/rnn.cuh's rnn_fwd_fragments, rnn_bwd_fragments): a 64-wide head (four K steps a
    gate), a 16-wide one (two) with a second batch tile that has 12 rows past the batch and no
    initial state or bias, and a 48-wide one in the four-step instantiations (one unused)."""
    x = make_inputs(cell, dtype=dtype, **shape)
    bucket = kernels.bucket("rnn", kernels.rnn_shape(x["x_gates"], cell), dtype)
    forward, backward = _spy(monkeypatch, "rnn_forward_fragments"), _spy(monkeypatch, "rnn_backward_fragments")
    with cache.override("rnn", "cuda", bucket, {"units": 64, "threads": 128, "forward_fragments": 1,
                                                "backward_fragments": 1}):
        compare_backends(run(cell, dtype), x, bound, test="cuda")
    k_steps = cuda_rnn.fragment_k_steps(shape["D"], dtype.itemsize)
    assert forward and backward and set(forward) == set(backward) == {k_steps}


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_one_direction_in_fragments(cell, direction, monkeypatch):
    """Either direction alone, the other in slices (the backward reading what the sliced forward
    saved, and the sliced backward what the fragment forward saved)."""
    x = make_inputs(cell, dtype=torch.bfloat16, T=4, D=32)
    bucket = kernels.bucket("rnn", kernels.rnn_shape(x["x_gates"], cell), torch.bfloat16)
    launched = _spy(monkeypatch, f"rnn_{direction}_fragments")
    with cache.override("rnn", "cuda", bucket, {"units": 32, "threads": 128, f"{direction}_fragments": 1}):
        compare_backends(run(cell, torch.bfloat16), x, 2e-2, test="cuda")
    assert launched == [2]


def test_fragment_kernels_apply_to_half_types_up_to_64_units():
    assert [cuda_rnn.fragment_k_steps(D, 2) for D in (16, 32, 48, 64, 80)] == [2, 2, 4, 4, None]
    assert cuda_rnn.fragment_k_steps(32, 4) is None
    legal = cuda_rnn.space(80, "lstm", 2, hardware.named("H100")).legal()
    assert legal and not any(config["forward_fragments"] or config["backward_fragments"] for config in legal)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunks", [1, 2])
def test_gate_gradient_chunks_in_rounds(cell, dtype, bound, chunks):
    """A head of 176 over three blocks: a backward step's product takes 3 (float32, 256 gradients
    a chunk row) or 2 (bfloat16, 512) chunks of the 704 (LSTM) or 528 (GRU) gate gradients a row,
    copied in one at a time or two at once (RNNConfig.gradient_chunks; GRU's third gate from
    drec_n), the last round or chunk partly filled."""
    x = make_inputs(cell, dtype=dtype, T=2, H=1, D=176)
    assert cuda_rnn.gradient_chunks_needed(176, cell, dtype.itemsize) == (3 if dtype == torch.float32 else 2)
    bucket = kernels.bucket("rnn", kernels.rnn_shape(x["x_gates"], cell), dtype)
    with cache.override("rnn", "cuda", bucket, {"units": 64, "threads": 128, "gradient_chunks": chunks}):
        compare_backends(run(cell, dtype), x, bound, test="cuda")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_unpadded_rows_match_reference(cell, dtype, bound):
    """RNNConfig.pad_rows 0 (what runs where the padded tiles do not fit): the weight slices, h_{t-1}
    and the gate-gradient chunks in shared memory with unpadded rows; one block and a head of 80
    split over two."""
    for shape in ({"D": 32}, {"T": 3, "D": 80}):
        x = make_inputs(cell, dtype=dtype, **shape)
        bucket = kernels.bucket("rnn", kernels.rnn_shape(x["x_gates"], cell), dtype)
        with cache.override("rnn", "cuda", bucket, {"units": 64, "threads": 128, "pad_rows": 0}):
            compare_backends(run(cell, dtype), x, bound, test="cuda")


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("shape", [dict(), dict(T=3, H=2, D=80)], ids=["basic", "D80-split-over-blocks"])
def test_unstaged_matches_reference(cell, shape):
    """RNNConfig.stage 0 (what runs where the staging buffers do not fit): the pointwise phases read
    their inputs from global memory each step and the carried states and gradients stay there."""
    x = make_inputs(cell, **shape)
    bucket = kernels.bucket("rnn", kernels.rnn_shape(x["x_gates"], cell), torch.float32)
    with cache.override("rnn", "cuda", bucket, {"units": 64, "threads": 128, "stage": 0}):
        compare_backends(run(cell), x, 1e-5, test="cuda")


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


@pytest.mark.parametrize("cell", list(GATES))
def test_fragment_forward_in_inference_writes_no_pre_activations(cell, monkeypatch):
    """The fragment forward under no_grad: no pre-activation buffer (a write would fault)."""
    x = make_inputs(cell, dtype=torch.bfloat16, T=4, D=32)
    bucket = kernels.bucket("rnn", kernels.rnn_shape(x["x_gates"], cell), torch.bfloat16)
    launched = _spy(monkeypatch, "rnn_forward_fragments")
    with torch.no_grad(), cache.override("rnn", "cuda", bucket, {"units": 32, "threads": 128, "forward_fragments": 1}):
        outputs = run(cell, torch.bfloat16)("cuda", **x)
        expected = run(cell, torch.bfloat16)("reference", **{k: v.double() for k, v in x.items()})
    for i, (a, b) in enumerate(zip(outputs, expected)):
        assert_close(a, b, 2e-2, f"output {i}")
    assert launched == [2]


def misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values, contiguous, at an address that is not a multiple of 16 bytes."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype)
    copy = storage[1:].view_as(t).copy_(t)
    assert copy.data_ptr() % 16
    return copy


def test_inputs_at_an_offset_that_is_not_16_byte_aligned():
    """The kernels copy x_t (forward) and d h_seq (backward) 16 bytes at a time (cp.async, which
    faults on a misaligned address; the simulator raises): the launcher copies either first where
    it sits at an odd offset."""
    x = make_inputs("lstm", T=3, D=32)
    x_gates = x.pop("x_gates")
    R = x.pop("R").requires_grad_()
    h_seq, _ = rnnops.rnn(misaligned_copy(x_gates), R, x["b"], (x["state0"], x["state1"]), cell="lstm", backend="cuda")
    double = {k: v.double() for k, v in x.items()}
    reference, _ = rnnops.rnn(x_gates.double(), R.double(), double["b"], (double["state0"], double["state1"]),
                              cell="lstm", backend="reference")
    assert_close(h_seq, reference, 1e-5, "h_seq")
    d_h_seq = torch.randn_like(h_seq)
    (dR,) = torch.autograd.grad(h_seq, R, misaligned_copy(d_h_seq))
    (expected,) = torch.autograd.grad(reference, R, d_h_seq.double())
    assert_close(dR, expected, 1e-5, "dR")


def test_config_space_fits_shared_memory():
    h100 = hardware.named("H100")
    for D in (64, 256, 768):
        legal = cuda_rnn.space(D, "lstm", 2, h100).legal()
        needed = cuda_rnn.gradient_chunks_needed(D, "lstm", 2)
        assert legal and all(max(cuda_rnn.shared_bytes(D, "lstm", p["units"], 2, p["threads"], p["stage"],
                                                       min(p["gradient_chunks"], needed), p["pad_rows"]))
                             <= h100.shared_memory_per_block
                             for p in legal)
        # no more chunk buffers than the smallest power of two that holds a step's chunks
        assert {p["gradient_chunks"] for p in legal} == {c for c in (1, 2, 4, 8) if c == 1 or c // 2 < needed}


def test_gradient_chunks_take_what_a_step_needs_and_what_fits(monkeypatch):
    """The backward copies a step's gate-gradient chunks in rounds of RNNConfig.gradient_chunks, each
    16 KB of shared memory (and its rows' padding): a launch takes no more than the step's chunks and than fit beside the
    slice's other buffers (an LSTM's 768-wide head in bf16: 6 chunks, all of them on an H100, two on
    an A100; a head of 64 keeps its one chunk resident)."""
    cuda = torch.device("cuda")
    config = cuda_rnn.RNNConfig(units=16, threads=256)
    assert config.gradient_chunks == 8
    assert [cuda_rnn.gradient_chunks_needed(768, cell, 2) for cell in ("lstm", "gru", "elman")] == [6, 5, 2]
    assert cuda_rnn.gradient_chunks_needed(64, "lstm", 4) == 1
    for gpu, chunks in (("H100", 6), ("A100", 2)):
        limit = hardware.named(gpu).shared_memory_per_block
        monkeypatch.setattr(cuda_rnn, "block_shared_memory", lambda device, limit=limit: limit)
        assert cuda_rnn.fitting_slice(config, 768, "lstm", 2, cuda) == (16, 1, 1)
        assert cuda_rnn.fitting_gradient_chunks(config, 768, "lstm", 16, 1, 1, 2, cuda) == chunks
    assert cuda_rnn.fitting_gradient_chunks(replace(config, gradient_chunks=4), 768, "lstm", 16, 1, 1, 2, cuda) == 2
    assert cuda_rnn.fitting_gradient_chunks(config, 64, "lstm", 64, 1, 1, 2, cuda) == 1


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_split_heads_launch_as_many_groups_as_can_be_resident(cell, monkeypatch):
    """A head split over blocks needs every block of its launch resident at once (grid barriers):
    where the GPU holds fewer than all (head, batch tile) groups' blocks, the groups go in several
    launches (here 4 groups of 2 blocks, 2 groups a launch, then 1, then none fit)."""
    x = make_inputs(cell, B=20, T=3, H=2, D=80)
    bucket = kernels.bucket("rnn", kernels.rnn_shape(x["x_gates"], cell), torch.float32)
    override = {"units": 64, "threads": 128}
    for blocks, launches in ((5, 2), (2, 4)):
        monkeypatch.setattr(cuda_rnn, "co_resident_blocks", lambda *args, blocks=blocks: blocks)
        config = replace(cuda_rnn.DEFAULT_CONFIG, **override)
        launcher = cuda_rnn._Launcher(cell, config, 20, 3, 2, 80, torch.float32, torch.device("cpu"))
        assert [(begin, grid[:3]) for begin, grid in launcher.launches("bwd")][:2] == [
            ([0], [4 // launches, 1, 2]), ([4 // launches], [4 // launches, 1, 2])]
        assert len(launcher.launches("fwd")) == launches
        with cache.override("rnn", "cuda", bucket, override):
            compare_backends(run(cell), x, 1e-5, test="cuda")
    monkeypatch.setattr(cuda_rnn, "co_resident_blocks", lambda *args: 1)
    with pytest.raises(ValueError, match="D=80 splits over 2 blocks that must be resident at once"):
        cuda_rnn._Launcher(cell, config, 20, 3, 2, 80, torch.float32, torch.device("cpu")).launches("fwd")


def test_launch_narrows_a_slice_that_does_not_fit_the_gpu(monkeypatch):
    """A configuration asks for 64 units whatever D (the default, or one tuned for another D of the
    bucket); sLSTM at D = 768 in bf16 then needs 424 KB of shared memory (on an H100 the launch
    failed with CUDA_ERROR_INVALID_VALUE). The launch takes the widest slice that fits, and a head
    too wide for any slice is refused by `supports` so `auto` picks another backend."""
    monkeypatch.setattr(cuda_rnn, "block_shared_memory", lambda device: hardware.named("H100").shared_memory_per_block)
    cuda = torch.device("cuda")
    # 32 units of a 768-wide LSTM head took 224 KB, 234 KB with the forward's x_t and x_{t+1}
    config = cuda_rnn.RNNConfig(units=64, threads=256)
    assert cuda_rnn.fitting_slice(config, 768, "lstm", 2, cuda) == (16, 1, 1)
    assert cuda_rnn.fitting_slice(config, 192, "lstm", 2, cuda) == (64, 1, 1)
    assert cuda_rnn.fitting_slice(config, 40, "lstm", 2, cuda) == (32, 1, 1)  # no wider than D rounded up to 16
    monkeypatch.setattr(cuda_rnn, "device_reason", lambda device: None)
    assert "shared memory" in cuda_rnn.supports(dtype=torch.float32, device=cuda, head_dim=768, cell="slstm")
    assert cuda_rnn.supports(dtype=torch.bfloat16, device=cuda, head_dim=768, cell="slstm") is None
    # 99 KB a block (L4, RTX 4090): a 768-wide GRU head fits only unstaged and unpadded
    monkeypatch.setattr(cuda_rnn, "block_shared_memory", lambda device: hardware.named("L4").shared_memory_per_block)
    assert cuda_rnn.fitting_slice(cuda_rnn.RNNConfig(units=16), 768, "gru", 2, cuda) == (16, 0, 0)


def fragment_kernels() -> list[compile_check.Instantiation]:
    return [compile_check.rnn_fragments_kernel(phase, dtype, cell, k_steps) for phase in ("fwd", "bwd")
            for dtype in ("__half", "__nv_bfloat16") for cell in range(4) for k_steps in cuda_rnn.FRAGMENT_K_STEPS]


def default_kernels() -> list[compile_check.Instantiation]:
    """The default slice's kernels and every fragment kernel."""
    units = cuda_rnn.DEFAULT_CONFIG.units
    return [compile_check.rnn_kernel(phase, dtype, cell, units) for phase in ("fwd", "bwd")
            for dtype in ("float", "__nv_bfloat16") for cell in range(4)] + fragment_kernels()


@pytest.mark.skipif(compile_check.nvcc() is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_default_configs_compile_without_spills(arch):
    kernels = default_kernels()
    reports = compile_check.ptxas_reports(kernels, arch)
    assert len(reports) == len(kernels)
    for report in reports:
        assert report.spill_stores == 0 and report.spill_loads == 0, report


@pytest.mark.skipif(compile_check.nvcc() is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("phase,k_steps", [("fwd", 4), ("bwd", 4 * 4)])
def test_fragment_products_load_their_k_steps_together(phase, k_steps):
    """The fragment kernels' products (LSTM, bf16, 64 units: four K steps forward, 16 backward,
    sm_90a) issue the shared loads of all their K steps as one round (rnnops._sass.load_rounds,
    four 32-bit loads a K step), ahead of the tensor-core products that wait for them: a K loop
    that left at the run-time step count had a branch between the steps, one shared-memory
    latency each (rounds of 4)."""
    kernel = compile_check.rnn_fragments_kernel(phase, "__nv_bfloat16", 0, 4)
    assert max(compile_check.sass_load_rounds(kernel, "sm_90a", "LDS")) >= 4 * k_steps


@pytest.mark.skipif(compile_check.nvcc() is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("phase", ["fwd", "bwd"])
def test_sliced_products_load_four_k_steps_together(phase):
    """The sliced kernels' wmma products (LSTM, bf16, a 64-unit slice, sm_90a) load four K steps'
    fragments (eight generic loads a step: nvcc does not see the shared space through wmma) as
    one round before their products (wmma_k_steps); one step at a time, a K loop of run-time
    length waited a shared-memory latency a step (rounds of 8)."""
    kernel = compile_check.rnn_kernel(phase, "__nv_bfloat16", 0, 64)
    assert max(compile_check.sass_load_rounds(kernel, "sm_90a", "LD.E")) >= 4 * 8


@pytest.mark.skipif(compile_check.nvcc() is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("phase", ["fwd", "bwd"])
def test_gate_activations_call_no_division_slow_path(phase):
    """The LSTM's and GRU's steps (bf16, sm_90a; sliced 64-unit and fragment kernels) take
    their sigmoids and tanhs without a call: rnnops::sigmoid divides with __fdividef, where an IEEE
    division added a range check and a call to its slow path each (20 calls in an LSTM step, whose
    loop then held 1406 instructions forward instead of 1157; the fragment forward 818 instead of
    548). The sLSTM's divisions by its normaliser stay IEEE."""
    for cell in (0, 1):
        for kernel in (compile_check.rnn_kernel(phase, "__nv_bfloat16", cell, 64),
                       compile_check.rnn_fragments_kernel(phase, "__nv_bfloat16", cell, 4)):
            loop = compile_check.inner_loop(kernel, "sm_90a")
            assert loop.count("CALL") == 0, (kernel.kernel, loop)


@pytest.mark.skipif(compile_check.nvcc() is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("phase", ["fwd", "bwd"])
def test_pointwise_phase_runs_four_cells_together(phase):
    """The sliced kernels' pointwise phase (for_slice; bf16, 64 units, sm_90a) computes a thread's
    four elements' cells between their loads and their stores, so that their chains of
    exponentials and reciprocals interleave: one run of 4 x 10 MUFU instructions for the LSTM
    (sigmoids and tanhs of its gates and c), 4 x 6 for the GRU, with no store, branch or barrier
    between (load_rounds counts runs of any opcode). Computed and stored element by element behind
    a branch each, a run held one element's: the cell's whole dependent chain alone, four times a
    step (SASS at ed34e7e: runs of 10 and 6). A 16-unit slice, one element a thread at 256
    threads, computes one cell together (kTogether): every slot computed unconditionally cost it
    three cells of work a step."""
    breaks = ("STS", "STG", "BSYNC", "BRA", "BAR")
    for cell, per_element in ((0, 10), (1, 6)):
        for units, together in ((64, 4), (16, 1)):
            kernel = compile_check.rnn_kernel(phase, "__nv_bfloat16", cell, units)
            runs = compile_check.sass_load_rounds(kernel, "sm_90a", "MUFU", breaks)
            assert max(runs) == together * per_element, (kernel.kernel, runs)


@pytest.mark.skipif(compile_check.nvcc() is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("phase", ["fwd", "bwd"])
def test_sliced_products_alternate_two_accumulators(phase):
    """wmma_k_steps' products (bf16, 16-unit slices, sm_90a) alternate between two accumulators,
    so no tensor-core product waits for more than the one two K steps before it (a chain of 2 a
    round of four K steps); into one accumulator each waited for the one before (4), a warp's 24
    K steps of the 768-wide head's forward tile in one chain."""
    assert compile_check.mma_chain(compile_check.rnn_kernel(phase, "__nv_bfloat16", 0, 16), "sm_90a") == 2


@pytest.mark.skipif(compile_check.nvcc() is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_weights_are_staged_eight_loads_at_a_time():
    """The weights' staging before the time loop (bf16, sm_90a: the sliced kernels' R and R^T
    slices, the fragment backward's R^T) issues a thread's loads eight at a time before storing
    them (kStagingInFlight): element by element, each load waited a memory latency, 192 a thread
    for a 16-unit slice of a 768-wide head (SASS: rounds of 1)."""
    kernels = [compile_check.rnn_kernel(phase, "__nv_bfloat16", 0, 16) for phase in ("fwd", "bwd")]
    for kernel in kernels + [compile_check.rnn_fragments_kernel("bwd", "__nv_bfloat16", 0, 4)]:
        rounds = compile_check.sass_load_rounds(kernel, "sm_90a", "LDG.E.U16", STORE_BREAKS)
        assert rounds[0] == 8, (kernel.kernel, rounds)


@pytest.mark.skipif(compile_check.libnvrtc() is None, reason="needs libnvrtc (RNNOPS_LIBNVRTC)")
def test_every_slice_width_compiles_with_nvrtc():
    """NVRTC, which compiles them on a GPU, refuses some C++ nvcc accepts; every shipped entry
    takes 16-unit slices, the default 64."""
    compile_check.nvrtc_compile([compile_check.rnn_kernel(phase, dtype, cell, units) for phase in ("fwd", "bwd")
                                 for dtype in ("float", "__nv_bfloat16") for cell in range(4)
                                 for units in cuda_rnn.UNITS] + fragment_kernels(), "sm_90a")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("H,D", [(1, 768), (4, 192), (12, 64)])
def test_realistic_shapes_on_gpu(cell, H, D):
    x = make_inputs(cell, B=16, T=64, H=H, D=D, dtype=torch.bfloat16, device="cuda")
    compare_backends(run(cell, torch.bfloat16), x, 2e-2, test="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H,D", [(12, 64), (4, 32)])
def test_fragment_kernels_on_gpu(cell, dtype, bound, H, D):
    """The fragment kernels on tensor cores, whose register layout (PTX's, for mma.m16n8k16) only a
    GPU checks: the simulator follows the same documentation."""
    x = make_inputs(cell, B=16, T=64, H=H, D=D, dtype=dtype, device="cuda")
    bucket = kernels.bucket("rnn", kernels.rnn_shape(x["x_gates"], cell), dtype)
    with cache.override("rnn", "cuda", bucket, {"units": 64, "threads": 256, "forward_fragments": 1,
                                                "backward_fragments": 1}):
        compare_backends(run(cell, dtype), x, bound, test="cuda")


@pytest.mark.gpu
def test_a_split_head_batch_larger_than_the_gpu_holds_on_gpu():
    """LSTM, one 768-wide head, 160 batch rows: 10 batch tiles of 48 blocks each, more than any GPU
    holds at once with one block an SM (an H100's 132 SMs: 2 tiles a launch), so the groups go in
    several cooperative launches."""
    x = make_inputs("lstm", B=160, T=8, H=1, D=768, dtype=torch.bfloat16, device="cuda")
    launcher = cuda_rnn._Launcher("lstm", cuda_rnn.RNNConfig(units=16, threads=256), 160, 8, 1, 768, torch.bfloat16,
                                  torch.device("cuda"))
    assert len(launcher.launches("bwd")) > 1
    compare_backends(run("lstm", torch.bfloat16), x, 2e-2, test="cuda")
