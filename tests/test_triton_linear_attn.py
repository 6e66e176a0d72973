"""Triton linear attention against the float64 reference: forward and every gradient.

On the CPU the kernels run in Triton's interpreter (tiny shapes; its bfloat16 dot products
are broken, so bfloat16 is covered by the GPU tests only). Every buffer a kernel writes is
poisoned with NaN first, so an element left unwritten fails.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import rnnops
from conftest import HAS_CUDA, compare_backends, packed_sequences, run_with_grads
from rnnops.autotune import cache, hardware, kernels
from rnnops.autotune.kernels import linear_attn_shape
from rnnops.triton_backend import _common, linear_attn as triton_linear_attn
from rnnops.triton_backend._common import register_cap

GATES = ["none", "scalar", "per-key"]


def make_inputs(B=2, T=40, H=2, K=16, V=32, gate="none", dtype=torch.float32, initial=True, gate_scale=1.0,
                device="cpu"):
    x = {"q": torch.randn(B, T, H, K), "k": F.normalize(torch.randn(B, T, H, K), dim=-1), "v": torch.randn(B, T, H, V)}
    if gate == "scalar":
        x["g"] = -torch.rand(B, T, H) * gate_scale
    elif gate == "per-key":
        x["g"] = -torch.rand(B, T, H, K) * gate_scale
    x = {k: v.to(device=device, dtype=dtype) for k, v in x.items()}
    if initial:
        x["initial_state"] = torch.randn(B, H, K, V, device=device)
    return x


def run(backend, chunk_size=16, cu_seqlens=None, final=True, **x):
    return rnnops.linear_attn(**x, output_final_state=final, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                              backend=backend)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", [
    dict(T=40), dict(T=1), dict(T=70, chunk=32), dict(K=48, V=16, H=3, initial=False), dict(T=20, final=False),
], ids=["T40", "T1", "T70-chunk32", "K48-V16-H3-no-initial", "no-final"])
def test_matches_reference(gate, shape):
    shape = dict(shape)
    chunk, final = shape.pop("chunk", 16), shape.pop("final", True)
    x = make_inputs(gate=gate, **shape)
    compare_backends(lambda backend, **kw: run(backend, chunk, final=final, **kw), x, 1e-5, test="triton")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's overflow in exp: no exponent may pass 0
@pytest.mark.parametrize("gate", ["scalar", "per-key"])
def test_strong_decay(gate):
    """Decays to e^-20 a token; T=70 ends mid-chunk, so rows past the end (G read as 0) meet valid
    columns in every kernel: an exponent that is not clamped there overflows (the interpreter's
    RuntimeWarning, an error here) even where the inf only reached masked rows."""
    x = make_inputs(T=70, gate=gate, gate_scale=20.0)
    compare_backends(lambda backend, **kw: run(backend, 32, **kw), x, 1e-5, test="triton")


@pytest.mark.parametrize("op", ["scalar", "per-key", "gated delta rule"])
def test_decay_gradient_of_a_lone_token_is_exactly_zero(op):
    """One token and no initial state: the output does not depend on g at all (its decay acts on the
    empty state before it), so dg is 0. Its terms q dq and k dk carry the token's own pair
    (q dA k, decay 1) and the last token's own part of the final state (k^T v): equal, O(1), and
    cancelling only to float32's rounding, which had left dg ~1e-7 where it is 0 (and, at g ~ -20
    and 13 tokens, 3e-5 relative error in the gated delta rule's). They now stay out of dG
    (triton_kernels/linear_attn.py: DIAGONAL, LAST). The delta rule keeps the LAST pair (registers):
    with one token both of its sums add the same products over K, exactly equal here (the
    interpreter sums them in one order); the test fails there on DIAGONAL's pair."""
    from test_triton_delta_rule import delta
    from test_triton_delta_rule import make_inputs as delta_inputs

    if op == "gated delta rule":
        x, fn = delta_inputs(B=2, T=1, gated=True, gate_scale=20.0, initial=False), delta
    else:
        x, fn = make_inputs(T=1, gate=op, gate_scale=20.0, initial=False), run
    _, grads = run_with_grads(lambda **kw: fn("triton", **kw), x)
    assert grads["g"].abs().max() == 0.0


def test_per_key_chunks_weak_and_strong_in_one_call():
    """GLA's intra-chunk kernels factor a chunk around its first token where its decay span is at
    most factored_span_limit (30 in float32) and go by exact sub-chunks elsewhere: chunks of both
    kinds in one call: spans about 3, 360 and, for the third chunk, near 30 (of its four sequence
    and head walks some fall each side), then 3 again."""
    x = make_inputs(T=64, gate="per-key")
    strength = torch.tensor([0.25] * 16 + [30.0] * 16 + [2.3] * 16 + [0.25] * 16).view(1, 64, 1, 1)
    x["g"] = -(0.5 + 0.5 * torch.rand_like(x["g"])) * strength
    compare_backends(lambda backend, **kw: run(backend, 16, **kw), x, 1e-5, test="triton")


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("tiles", [dict(block_k=64, block_v=32, state_block_k=16, state_block_v=16),
                                   dict(block_k=32, block_v=16, state_block_k=64, state_block_v=32)],
                         ids=["small-state-tiles", "large-state-tiles"])
def test_state_tiles_apart_from_the_chunk_tiles(gate, tiles):
    """The state kernels take their own (state_block_k, state_block_v) tile: three K tiles of the
    state (K = 48) under one chunk tile, and one state tile over two chunk tiles (one partial)."""
    x = make_inputs(K=48, V=32, gate=gate)
    bucket = kernels.bucket("linear_attn", linear_attn_shape(x["q"], x["v"], x.get("g")), torch.float32)
    config = dict(triton_linear_attn.FLOAT32_DEFAULT_CONFIG.__dict__, **tiles)
    with cache.override("linear_attn", "triton", bucket, config):
        compare_backends(lambda backend, **kw: run(backend, **kw), x, 1e-5, test="triton")


@pytest.mark.parametrize("gate", ["none", "scalar"])
@pytest.mark.parametrize("shape", [dict(T=70, chunk=32), dict(K=48, V=48, H=3, initial=False), dict(T=20, final=False),
                                   dict(varlen=True)],
                         ids=["T70-chunk32", "K48-V48-H3-no-initial", "no-final", "varlen"])
def test_fused_forward(gate, shape):
    """fused_forward: one walk per (sequence, head, V tile) with all K rows of the state in
    registers (K = 48 padded to 64; V over 16-wide tiles: three at V = 48, two at 32), against
    the reference, forward and every gradient (the backward is the two-pass one)."""
    shape = dict(shape)
    chunk, final, varlen = shape.pop("chunk", 16), shape.pop("final", True), shape.pop("varlen", False)
    offsets = None
    if varlen:
        offsets, x = packed_sequences(make_inputs, gate=gate)
    else:
        x = make_inputs(gate=gate, **shape)
    bucket = kernels.bucket("linear_attn", linear_attn_shape(x["q"], x["v"], x.get("g")), torch.float32)
    config = dict(triton_linear_attn.FLOAT32_DEFAULT_CONFIG.__dict__, state_block_v=16, fused_forward=1)
    with cache.override("linear_attn", "triton", bucket, config):
        compare_backends(lambda backend, **kw: run(backend, chunk, cu_seqlens=offsets, final=final, **kw), x, 1e-5,
                         test="triton")


def _variant(variant: str, gate_scale: float = 1.0):
    """(inputs with 4 value heads, cu_seqlens, configuration override, bound) of a test variant
    named by its gate ("varlen": scalar decay, packed sequences), "-fused" for the fused forward,
    "-float16" for half inputs, "-summed" for dq / dk summed over 2 value heads in the dq/dk kernel
    (group_heads: with one q / k head, two partial sums the group sum adds; with two, each group
    whole), "-summed4" over 4 (one q / k head: its group whole; two: the common divisor 2)."""
    gate = next((gate for gate in GATES if variant.startswith(gate)), "scalar")
    dtype, bound = (torch.float16, 2e-3) if variant.endswith("float16") else (torch.float32, 1e-5)
    offsets, config = None, None
    if variant.startswith("varlen"):
        offsets, x = packed_sequences(make_inputs, gate=gate, H=4)
    else:
        x = make_inputs(H=4, gate=gate, gate_scale=gate_scale, dtype=dtype)
    if variant.endswith("fused"):
        config = dict(triton_linear_attn.FLOAT32_DEFAULT_CONFIG.__dict__, state_block_v=16, fused_forward=1)
    if "-summed" in variant:
        config = dict(triton_linear_attn.FLOAT32_DEFAULT_CONFIG.__dict__, group_heads=4 if variant.endswith("4") else 2)
    return x, offsets, config, bound


def _compare_variant(x, offsets, config, bound):
    bucket = kernels.bucket("linear_attn", linear_attn_shape(x["q"], x["v"], x.get("g")), torch.float32)
    with cache.override("linear_attn", "triton", bucket, config) if config else contextlib.nullcontext():
        compare_backends(lambda backend, **kw: run(backend, cu_seqlens=offsets, **kw), x, bound, test="triton")


@pytest.mark.parametrize("variant", ["none", "scalar", "per-key", "per-key-strong", "scalar-fused", "varlen",
                                     "scalar-float16", "none-summed", "scalar-summed4", "per-key-summed",
                                     "varlen-summed"])
@pytest.mark.parametrize("qk_heads", [1, 2])
def test_grouped_heads(variant, qk_heads):
    """q and k with fewer heads than v (4): each kernel reads its value head's group in place, and
    dq, dk come back summed over the group (float16: per value head in float16, summed in float32);
    every path that reads q or k (GLA's factored and sub-chunk intra kernels, the fused forward)
    against the reference, which repeats the heads."""
    x, offsets, config, bound = _variant(variant, gate_scale=20.0 if variant.endswith("strong") else 1.0)
    x["q"], x["k"] = (x[name][:, :, :qk_heads].contiguous() for name in ("q", "k"))
    _compare_variant(x, offsets, config, bound)


@pytest.mark.parametrize("variant", ["none", "scalar", "per-key", "scalar-fused", "scalar-grouped", "varlen",
                                     "scalar-float16", "scalar-skip-only", "scalar-grouped-summed4"])
def test_value_scale_and_skip(variant):
    """v_scale (a scale per token and head of v, Mamba-2's dt) and skip (o += skip * v, Mamba's
    D) applied inside the kernels: the outputs and every gradient, theirs included, against the
    reference (which scales a copy and adds the skip term after); grouped heads and the fused
    forward too."""
    x, offsets, config, bound = _variant(variant)
    if not variant.endswith("skip-only"):
        x["v_scale"] = torch.rand(x["v"].shape[:3]) * 0.5 + 0.01
    x["skip"] = torch.randn(x["v"].shape[2:])
    if "-grouped" in variant:
        x["q"], x["k"] = (x[name][:, :, :2].contiguous() for name in ("q", "k"))
    _compare_variant(x, offsets, config, bound)


@pytest.mark.parametrize("gate", GATES)
def test_varlen(gate):
    offsets, x = packed_sequences(make_inputs, gate=gate)
    compare_backends(lambda backend, **kw: run(backend, cu_seqlens=offsets, **kw), x, 1e-5, test="triton")


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", [{}, dict(B=1, T=150, H=1, K=128, V=128, chunk=64)], ids=["small", "K128-chunk64"])
def test_float16(gate, shape):
    """Half inputs: the chunk states and their gradients go between kernels in float16."""
    shape = dict(shape)
    chunk = shape.pop("chunk", 16)
    x = make_inputs(gate=gate, dtype=torch.float16, **shape)
    compare_backends(lambda backend, **kw: run(backend, chunk, **kw), x, 2e-3, test="triton")


def test_unsupported_inputs_are_refused_by_name():
    x = make_inputs(K=20)
    with pytest.raises(ValueError, match="backend 'triton' cannot take these inputs: K must be a multiple of 16"):
        run("triton", **x)
    with pytest.raises(ValueError, match="chunk_size must be 16, 32, 64 or 128, got 24"):
        run("triton", 24, **make_inputs())
    with pytest.raises(ValueError, match="supports float16, bfloat16 and float32 inputs, got torch.float64"):
        run("triton", **make_inputs(dtype=torch.float64))


def test_device_and_precision_rules(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "needs a CUDA device" in _common.device_reason(torch.device("cpu"))
    assert _common.device_reason(torch.device("cuda")) is None
    assert _common.dot_precision(torch.float32, allow_tf32=False) == "tf32x3"
    assert _common.dot_precision(torch.bfloat16, allow_tf32=False) == "tf32"
    assert _common.dot_precision(torch.float32, allow_tf32=True) == "tf32"
    assert _common.dot_precision(torch.float32) == "tf32x3"  # torch's default: no TF32 for matmuls
    # a 16-wide head tile, whatever the dtype and TF32 setting (Triton 3.6 on an H100, see dot_precision)
    assert _common.dot_precision(torch.float32, allow_tf32=False, tile_dims=(16, 64)) == "ieee"
    assert _common.dot_precision(torch.bfloat16, allow_tf32=True, tile_dims=(64, 16)) == "ieee"
    assert _common.dot_precision(torch.float32, allow_tf32=False, tile_dims=(32, 64)) == "tf32x3"


class _KernelOutOfSharedMemory:
    """Stands in for a JITFunction whose launches with more than one stage need 185 KB of shared
    memory on a GPU with 163 KB (or whose launches run out of ``resource``)."""

    __name__ = "states_bwd_kernel"

    def __init__(self, resource="shared memory"):
        self.resource, self.stages = resource, []

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def run(*args, num_stages, **kwargs):
            self.stages.append(num_stages)
            if num_stages > 1 or self.resource != "shared memory":
                raise OutOfResources(189188, 166912, self.resource)
            return "launched"
        return run


def test_equal_length_layouts_are_built_once_and_packed_ones_per_call():
    dense = _common.ChunkLayout.build(3, 100, 64, None, "cpu")
    assert _common.ChunkLayout.build(3, 100, 64, None, torch.device("cpu")) is dense
    assert dense.chunk_indices.tolist() == [[s, c] for s in range(3) for c in range(2)]
    assert dense.cu_seqlens.tolist() == [0, 100, 200, 300] and dense.chunk_offsets.tolist() == [0, 2, 4, 6]
    offsets = torch.tensor([0, 70, 100])
    packed = _common.ChunkLayout.build(1, 100, 64, offsets, "cpu")
    assert packed is not _common.ChunkLayout.build(1, 100, 64, offsets, "cpu")
    assert packed.chunk_indices.tolist() == [[0, 0], [0, 1], [1, 0], [-1, -1]]


def test_launch_falls_back_to_one_stage_when_shared_memory_runs_out():
    from triton.runtime.errors import OutOfResources

    kernel = _KernelOutOfSharedMemory()
    with pytest.warns(RuntimeWarning, match="states_bwd_kernel with num_stages=2 .*Required: 189188"):
        assert _common.launch(kernel, (4, 2), 1.0, num_stages=2, num_warps=8) == "launched"
    assert kernel.stages == [2, 1]
    registers = _KernelOutOfSharedMemory("registers")
    with pytest.raises(OutOfResources, match="registers"):
        _common.launch(registers, (4, 2), num_stages=2)
    assert registers.stages == [2]


@pytest.mark.parametrize("gpu,tiles,stages,expected", [
    ("H100", (64, 128), 1, 2),  # the shipped Hopper entries: the output and dv kernels pipelined anyway
    ("A100", (64, 64), 3, 3),  # more stages are kept
    ("RTX 4090", (128, 128), 1, 1),  # two copies of the tiles would not fit its ~100 KB
    ("RTX 4090", (64, 64), 1, 2),
    (None, (128, 128), 1, 2),  # no limit (the interpreter)
])
def test_k_loops_take_two_stages_where_they_fit(gpu, tiles, stages, expected):
    config = triton_linear_attn.LinearAttnConfig(block_k=tiles[0], block_v=tiles[1], num_stages=stages)
    limit = None if gpu is None else hardware.named(gpu).shared_memory_per_block
    assert triton_linear_attn.k_loop_stages(config, *tiles, 64, 2, limit) == expected


@pytest.mark.parametrize("programs,warps,registers,expected", [
    (1, 8, 65536, {}),  # no cap asked
    (2, 8, None, {}),  # no SM to fit (Triton's interpreter)
    (2, 8, 65536, {"maxnreg": 128}),
    (3, 8, 65536, {"maxnreg": 80}),  # 85 rounded down to whole blocks of 256 a warp
    (2, 4, 65536, {"maxnreg": 255}),  # 256 would fit; a thread addresses 255
    (3, 4, 65536, {"maxnreg": 168}),
])
def test_register_cap_fits_the_programs_an_sm(programs, warps, registers, expected):
    cap = register_cap(programs, warps, registers)
    assert cap == expected
    if cap:
        assert hardware.named("H200").programs_per_sm(32 * warps, cap["maxnreg"], 0)[0] >= programs


def test_auto_does_not_pick_triton_on_the_cpu():
    assert rnnops._dispatch.resolve("linear_attn", "auto", torch.device("cpu"), dtype=torch.float32,
                                    head_dims=(64, 64), chunk_size=64)[0] == "chunked"


@pytest.mark.parametrize("gpu", ["A100", "H100", "RTX 4090"])
def test_config_space(gpu):
    hw = hardware.named(gpu)
    space = triton_linear_attn.space(128, 128, 64, 2, hw)
    legal = space.legal()
    assert legal and triton_linear_attn.DEFAULT_CONFIG.__dict__ in legal
    assert triton_linear_attn.FLOAT32_DEFAULT_CONFIG.__dict__ in triton_linear_attn.space(128, 128, 64, 4, hw).legal()
    assert all(c.holds(p) for p in legal for c in space.constraints)
    assert sum(removed for _, removed in space.explain()) > 0
    registers = triton_linear_attn.STATE_REGISTERS * hw.warp_size
    assert all(p["state_block_k"] * p["state_block_v"] <= registers * p["state_num_warps"] for p in legal)
    small = triton_linear_attn.space(16, 32, 16, 4, hw).legal()
    assert all(p["block_k"] <= 16 and p["block_v"] <= 32 for p in small)
    assert all(p["state_block_k"] <= 16 and p["state_block_v"] <= 32 for p in small)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_realistic_shapes_on_gpu(gate, dtype, bound):
    """K = V = 128: the head dims of the shipped configurations (an H100 launches its own)."""
    x = make_inputs(B=2, T=1000, H=4, K=128, V=128, gate=gate, dtype=dtype, device="cuda")
    compare_backends(lambda backend, **kw: run(backend, 64, **kw), x, bound, test="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_heads_on_gpu(gate, dtype, bound):
    """Grouped heads at Mamba-2's SSD shape (one q / k head for 8 value heads, K 128, V 64)."""
    x = make_inputs(B=2, T=1000, H=8, K=128, V=64, gate=gate, dtype=dtype, device="cuda")
    x["q"], x["k"] = (x[name][:, :, :1].contiguous() for name in ("q", "k"))
    compare_backends(lambda backend, **kw: run(backend, 64, **kw), x, bound, test="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("group_heads", [4, 8])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_summed_grouped_heads_on_gpu(group_heads, dtype, bound):
    """dq / dk summed over value heads in the dq/dk kernel (group_heads) at the SSD's head dims,
    one q / k head for 8 value heads: two partial sums a q / k head, or the group whole; at the
    32-wide V tiles the GPU suite's A/B tries (no spills)."""
    x = make_inputs(B=2, T=1000, H=8, K=128, V=64, gate="scalar", dtype=dtype, device="cuda")
    x["q"], x["k"] = (x[name][:, :, :1].contiguous() for name in ("q", "k"))
    bucket = kernels.bucket("linear_attn", linear_attn_shape(x["q"], x["v"], x.get("g")), dtype)
    config = dict(triton_linear_attn.default_config(dtype).__dict__, group_heads=group_heads, block_v=32)
    with cache.override("linear_attn", "triton", bucket, config):
        compare_backends(lambda backend, **kw: run(backend, 64, **kw), x, bound, test="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("gate,warps", [("none", 4), ("scalar", 8)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_forward_on_gpu(gate, warps, dtype, bound):
    """fused_forward at K = V = 128 (the configurations the GPU suite's A/B tries), outputs poisoned
    first like every buffer; a packed batch with an empty sequence."""
    offsets = torch.tensor([0, 300, 300, 1000, 1003], device="cuda")
    x = make_inputs(B=1, T=1003, H=4, K=128, V=128, gate=gate, dtype=dtype, initial=False, device="cuda")
    x["initial_state"] = torch.randn(4, 4, 128, 128, device="cuda")
    bucket = kernels.bucket("linear_attn", linear_attn_shape(x["q"], x["v"], x.get("g")), dtype)
    default = triton_linear_attn.default_config(dtype)
    config = dict(default.__dict__, fused_forward=1, state_num_warps=warps)
    with cache.override("linear_attn", "triton", bucket, config):
        compare_backends(lambda backend, **kw: run(backend, 64, cu_seqlens=offsets, **kw), x, bound, test="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("K,V", [(16, 64), (64, 16)])
def test_head_dim_16_on_gpu(K, V):
    """16-wide head tiles: Triton 3.6's tensor-core float32 dots gave wrong results ("tf32") or an
    illegal memory access ("tf32x3") on an H100; the kernels use "ieee" there (dot_precision)."""
    x = make_inputs(B=2, T=300, H=2, K=K, V=V, gate="per-key", device="cuda")
    compare_backends(lambda backend, **kw: run(backend, 64, **kw), x, 1e-5, test="triton")


@pytest.mark.gpu
def test_gpu_varlen_and_auto_picks_triton():
    offsets = torch.tensor([0, 100, 100, 1000, 1003], device="cuda")
    x = make_inputs(B=1, T=1003, H=4, K=64, V=64, gate="per-key", initial=False, device="cuda")
    compare_backends(lambda backend, **kw: run(backend, 64, cu_seqlens=offsets, **kw), x, 1e-5, test="triton")
    assert rnnops._dispatch.resolve("linear_attn", "auto", torch.device("cuda"), dtype=torch.bfloat16,
                                    head_dims=(64, 64), chunk_size=64)[0] == "triton"
    assert HAS_CUDA
