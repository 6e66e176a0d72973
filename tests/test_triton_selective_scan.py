"""Triton selective scan against the float64 reference: forward and every gradient, every B/C
layout, strided inputs, states, packed sequences, the decoding step (interpreter on the CPU,
poisoned outputs)."""
import pytest
import torch

import rnnops
from conftest import assert_close, compare_backends
from rnnops.autotune import hardware
from rnnops.triton_backend import selective_scan as triton_scan


def make_inputs(B=2, T=23, Dm=6, N=4, layout_B="shared", layout_C="grouped", initial=True, extras=True, A_scale=3.0,
                dtype=torch.float32, device="cpu"):
    def bc(layout):
        return {"static": (Dm, N), "shared": (B, T, N), "grouped": (B, T, 3, N)}[layout]

    x = {"u": torch.randn(B, T, Dm), "delta": torch.randn(B, T, Dm), "A": -torch.rand(Dm, N) * A_scale,
         "B": torch.randn(bc(layout_B)), "C": torch.randn(bc(layout_C))}
    if extras:
        x.update(D=torch.randn(Dm), z=torch.randn(B, T, Dm), delta_bias=torch.randn(Dm))
    if initial:
        x["initial_state"] = torch.randn(B, Dm, N)
    return {k: v.to(device=device, dtype=dtype if k in ("u", "delta", "z") else torch.float32) for k, v in x.items()}


def scan(backend, softplus=True, cu_seqlens=None, **x):
    return rnnops.selective_scan(**x, delta_softplus=softplus, return_last_state=True, cu_seqlens=cu_seqlens,
                                 backend=backend)


@pytest.mark.parametrize("layouts", [("static", "static"), ("shared", "shared"), ("grouped", "shared"),
                                     ("shared", "grouped")], ids=lambda x: "/".join(x))
def test_layouts(layouts):
    x = make_inputs(layout_B=layouts[0], layout_C=layouts[1])
    compare_backends(scan, x, 1e-5, test="triton")


@pytest.mark.parametrize("shape", [dict(T=1), dict(T=40, initial=False), dict(extras=False),
                                   dict(T=40, A_scale=200.0)], ids=["T1", "T40-no-initial", "no-D-z-bias", "large-A"])
def test_shapes_and_options(shape):
    compare_backends(scan, make_inputs(**shape), 1e-5, test="triton")


@pytest.mark.parametrize("segments", [1, 3])
def test_inference_stores_no_chunk_states(segments):
    """Under no_grad the forward gets no chunk-state buffer (the interpreter faults on a store to
    it), and the outputs and final state still match the reference (whole, and in segments)."""
    x = make_inputs(T=40)
    with torch.no_grad():
        out, last = triton_scan.selective_scan(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True,
            initial_state=x["initial_state"], output_final_state=True, cu_seqlens=None,
            config=triton_scan.SelectiveScanConfig(chunk=16, segments=segments))
        expected = scan("reference", **{k: v.double() for k, v in x.items()})
    assert_close(out, expected[0], 1e-5, "out")
    assert_close(last, expected[1], 1e-5, "last state")


def test_without_softplus():
    x = make_inputs()
    x["delta"] = x["delta"].abs() * 0.3
    x["delta_bias"] = x["delta_bias"].abs() * 0.1  # dt = delta + delta_bias >= 0: a decaying state
    compare_backends(lambda backend, **kw: scan(backend, False, **kw), x, 1e-5, test="triton")


def test_varlen():
    offsets = torch.tensor([0, 5, 5, 17, 18, 30])
    x = make_inputs(B=1, T=30, initial=False)
    x["initial_state"] = torch.randn(5, 6, 4)
    compare_backends(lambda backend, **kw: scan(backend, cu_seqlens=offsets, **kw), x, 1e-5, test="triton")


def test_varlen_in_segments(monkeypatch):
    """Packed sequences of 2, 0, 3, 1 and 3 chunks of 4 steps, each split into 3 segments (some
    empty) walked in parallel, with initial and final states and a static B."""
    monkeypatch.setattr(triton_scan, "DEFAULT_CONFIG", triton_scan.SelectiveScanConfig(chunk=4, segments=3))
    offsets = torch.tensor([0, 5, 5, 17, 18, 30])
    x = make_inputs(B=1, T=30, initial=False, layout_B="static")
    x["initial_state"] = torch.randn(5, 6, 4)
    compare_backends(lambda backend, **kw: scan(backend, cu_seqlens=offsets, **kw), x, 1e-5, test="triton")


def test_mamba_layout_strides_without_copies():
    x = make_inputs(layout_B="static", layout_C="static")
    strided = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v)
               for k, v in x.items()}
    assert not strided["u"].is_contiguous()
    compare_backends(scan, strided, 1e-5, test="triton")


def test_gradients_keep_us_dimension_order():
    """du, d delta and dz take u's dimension order: mamba's (B, D, L) tensors, passed as (B, T, D)
    views (here u and z sliced from a (B, 2D, L) tensor, as Mamba splits xz), get (B, D, L)-dense
    gradients, which autograd hands on to them without copying; the output stays (B, T, D)-dense."""
    x = make_inputs(T=9, layout_B="shared", layout_C="shared", initial=False)
    xz = torch.randn(2, 12, 9, requires_grad=True)
    u, z = (part.transpose(1, 2) for part in xz.chunk(2, dim=1))
    delta = x["delta"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    out, _ = triton_scan.selective_scan(u, delta, x["A"], x["B"], x["C"], x["D"], z, x["delta_bias"], True,
                                        initial_state=None, output_final_state=False, cu_seqlens=None)
    assert out.is_contiguous()
    grads = torch.autograd.grad(out, (u, delta, z), torch.randn_like(out))
    for grad in grads:  # dense (B, D, L), not xz's 12-row layout
        assert grad.stride() == (6 * 9, 1, 9) and not grad.isnan().any()


def test_float16_activations():
    compare_backends(scan, make_inputs(dtype=torch.float16), 2e-3, test="triton")


@pytest.mark.parametrize("config", [triton_scan.SelectiveScanConfig(chunk=16, block_d=4, forward_block_d=16),
                                    triton_scan.SelectiveScanConfig(chunk=128, block_d=8, forward_block_d=4),
                                    triton_scan.SelectiveScanConfig(chunk=16, segments=2),
                                    triton_scan.SelectiveScanConfig(chunk=16, segments=16),
                                    triton_scan.SelectiveScanConfig(chunk=16, forward_unroll=2, segments=2)],
                         ids=["chunk16", "chunk128", "segments2", "segments16", "forward-unroll2"])
def test_other_configs(config):
    """Chunks of four forward sub-blocks and of many backward sub-blocks, one partial; the forward's
    channel blocks wider and narrower than the backward's; sequences of 3 chunks split into
    segments of 2 and 1 chunks, and into one segment per chunk (16 capped at 3); the forward in
    2-step sub-blocks (8 a chunk), in segments."""
    def run(backend, **x):
        if backend != "triton":
            return scan(backend, **x)
        initial = x.pop("initial_state")
        return triton_scan.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                          True, initial_state=initial, output_final_state=True, cu_seqlens=None,
                                          config=config)

    compare_backends(run, make_inputs(T=37, Dm=16, layout_C="shared"), 1e-5, test="triton")


@pytest.mark.parametrize("layout", ["shared", "grouped"])
def test_state_update(layout):
    x = make_inputs(T=3, layout_B=layout, layout_C=layout)
    y_seq, S_seq = scan("reference", **x)
    S = x["initial_state"]
    for t in range(3):
        y, S = rnnops.selective_state_update(S, x["u"][:, t], x["delta"][:, t], x["A"], x["B"][:, t], x["C"][:, t],
                                             x["D"], x["z"][:, t], x["delta_bias"], True, backend="triton")
        assert_close(y, y_seq[:, t], 1e-5)
    assert_close(S, S_seq, 1e-5)


@pytest.mark.parametrize("gpu", ["A100", "H100"])
def test_config_space(gpu):
    legal = triton_scan.space(2048, 16, hardware.named(gpu)).legal()
    assert triton_scan.DEFAULT_CONFIG.__dict__ in legal


@pytest.mark.gpu
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_realistic_shapes_on_gpu(dtype, bound, segments, monkeypatch):
    monkeypatch.setattr(triton_scan, "DEFAULT_CONFIG", triton_scan.SelectiveScanConfig(segments=segments))
    x = make_inputs(B=2, T=2000, Dm=96, N=16, layout_B="grouped", layout_C="shared", dtype=dtype, device="cuda")
    compare_backends(scan, x, bound, test="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("segments", [1, 16])
def test_long_sequence_on_gpu(segments, monkeypatch):
    """T = 64k: stable and accurate, walked whole or in segments of 4096 steps (forward; the
    reference's backward would not fit)."""
    monkeypatch.setattr(triton_scan, "DEFAULT_CONFIG", triton_scan.SelectiveScanConfig(segments=segments))
    x = make_inputs(B=1, T=65536, Dm=32, N=16, layout_B="shared", layout_C="shared", device="cuda")
    with torch.no_grad():
        y, last = scan("triton", **x)
        y_ref, last_ref = scan("chunked", **{k: v.double() for k, v in x.items()})
    assert_close(y.cpu(), y_ref.cpu(), 1e-5)
    assert_close(last.cpu(), last_ref.cpu(), 1e-5)
