"""torch.library registration: opcheck, torch.compile(fullgraph=True), torch.export, meta tensors."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import rnnops
from conftest import assert_close, run_with_grads
from rnnops._library import OPS

F64 = torch.float64


def _r(*shape, device="cpu", dtype=F64):
    return torch.randn(*shape, device=device, dtype=dtype)


def _unit(*shape, device="cpu", dtype=F64):
    return F.normalize(_r(*shape, device=device, dtype=dtype), dim=-1)


def _decay(*shape, device="cpu", dtype=F64):
    return -torch.rand(*shape, device=device, dtype=dtype)


def _cases(device="cpu", dtype=F64, chunk_size=4, B=2, T=9, H=2, K=16, V=16, Dm=6, N=4, D=8):
    """(id, public op, inputs): every registered op, with optional inputs both given and left out."""
    kw = dict(device=device, dtype=dtype)
    q, k, v = _r(B, T, H, K, **kw), _unit(B, T, H, K, **kw), _r(B, T, H, V, **kw)
    beta, g, state = torch.rand(B, T, H, **kw), _decay(B, T, H, **kw), _r(B, H, K, V, **kw)
    kp, vp, bp = _unit(B, T, 2, H, K, **kw), _r(B, T, 2, H, V, **kw), torch.rand(B, T, 2, H, **kw)
    u, dt, A = _r(B, T, Dm, **kw), torch.rand(B, T, Dm, **kw), _decay(Dm, N, **kw)
    cu = torch.tensor([0, 4, 4, 2 * T], device=device)
    packed = dict(q=_r(1, 2 * T, H, K, **kw), k=_unit(1, 2 * T, H, K, **kw), v=_r(1, 2 * T, H, V, **kw))
    return [
        ("linear_attn", rnnops.linear_attn, dict(q=q, k=k, v=v, output_final_state=True, chunk_size=chunk_size)),
        ("linear_attn-gla-varlen", rnnops.linear_attn,
         dict(**packed, g=_decay(1, 2 * T, H, K, **kw), initial_state=_r(3, H, K, V, **kw), cu_seqlens=cu,
              output_final_state=True, chunk_size=chunk_size)),
        ("linear_attn_step", rnnops.linear_attn_step, dict(q=q[:, 0], k=k[:, 0], v=v[:, 0], g=g[:, 0], state=state)),
        ("delta_rule", rnnops.delta_rule,
         dict(q=q, k=k, v=v, beta=beta, g=g, initial_state=state, output_final_state=True, chunk_size=chunk_size)),
        ("delta_rule-no-state", rnnops.delta_rule,
         dict(q=q, k=k, v=v, beta=beta, qk_l2norm=True, chunk_size=chunk_size)),
        ("delta_product", rnnops.delta_product,
         dict(q=q, k=kp, v=vp, beta=bp, g=g, num_householder=2, output_final_state=True, chunk_size=chunk_size)),
        ("delta_rule_step", rnnops.delta_rule_step,
         dict(q=q[:, 0], k=k[:, 0], v=v[:, 0], beta=beta[:, 0], state=state)),
        ("delta_product_step", rnnops.delta_product_step,
         dict(q=q[:, 0], k=kp[:, 0], v=vp[:, 0], beta=bp[:, 0], g=g[:, 0], num_householder=2, state=state)),
        ("selective_scan", rnnops.selective_scan,
         dict(u=u, delta=dt, A=A, B=_r(B, T, N, **kw), C=_r(B, T, 2, N, **kw), D=_r(Dm, **kw), z=_r(B, T, Dm, **kw),
              delta_bias=_r(Dm, **kw), delta_softplus=True, initial_state=_r(B, Dm, N, **kw), return_last_state=True)),
        ("selective_scan-y-only", rnnops.selective_scan,
         dict(u=u, delta=dt, A=A, B=_r(Dm, N, **kw), C=_r(Dm, N, **kw))),
        ("selective_state_update", rnnops.selective_state_update,
         dict(state=_r(B, Dm, N, **kw), u=u[:, 0], delta=dt[:, 0], A=A, B=_r(B, N, **kw), C=_r(B, N, **kw),
              D=_r(Dm, **kw), delta_softplus=True)),
        *[(f"rnn-{cell}", rnnops.rnn,
           dict(x_gates=_r(B, T, G, H, D, **kw), R=0.3 * _r(G, H, D, D, **kw), b=_r(G, H, D, **kw),
                state=tuple(_r(B, H, D, **kw) for _ in range(states)), cell=cell))
          for cell, G, states in (("lstm", 4, 2), ("gru", 3, 1), ("slstm", 4, 4), ("elman", 1, 1))],
        ("rnn-no-state-no-bias", rnnops.rnn, dict(x_gates=_r(B, T, 4, H, D, **kw), R=0.3 * _r(4, H, D, D, **kw))),
        ("rnn-empty-sequence", rnnops.rnn,
         dict(x_gates=_r(B, 0, 4, H, D, **kw), R=_r(4, H, D, D, **kw), state=(_r(B, H, D, **kw), _r(B, H, D, **kw)))),
    ]


CASES = {name: (fn, inputs) for name, fn, inputs in _cases()}
# bfloat16 activations: outputs in bfloat16, states in float32 (the fake kernels must agree)
BF16_CASES = {f"{name}-bf16": (fn, inputs) for name, fn, inputs in _cases(dtype=torch.bfloat16)}


def _operator_args(fn, inputs: dict) -> tuple:
    """The positional arguments of ``fn``'s operator for the public call ``fn(**inputs)``."""
    bound = inspect.signature(fn).bind(**inputs)
    bound.apply_defaults()
    return tuple(bound.arguments[name] for name in OPS[fn.__name__].arg_names)


def test_every_public_op_is_an_operator():
    ops = {name for name in rnnops.__all__ if inspect.isfunction(getattr(rnnops, name))} - {"available_backends"}
    # rnn_step is rnn on a one-token sequence, so it traces through the rnn operator.
    assert ops - {"rnn_step"} == set(OPS)
    for name in OPS:
        assert hasattr(torch.ops.rnnops, name) and hasattr(torch.ops.rnnops, f"{name}_backward")


@pytest.mark.parametrize("case", {**CASES, **BF16_CASES})
def test_opcheck(case):
    """Schema, fake kernel vs real outputs, autograd registration and AOT dispatch, all at once."""
    fn, inputs = {**CASES, **BF16_CASES}[case]
    args = tuple(x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else
                 tuple(s.detach().requires_grad_() for s in x) if isinstance(x, tuple) else x
                 for x in _operator_args(fn, inputs))
    torch.library.opcheck(OPS[fn.__name__].op, args)


@pytest.mark.parametrize("case", CASES)
def test_compiled_fullgraph_matches_eager(case):
    """The traced operator (forward, and the backward that recomputes it) gives the eager result."""
    fn, inputs = CASES[case]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    want, want_grads = run_with_grads(fn, inputs)
    got, got_grads = run_with_grads(compiled, inputs)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if b.numel():
            assert_close(a, b, 1e-12, f"output {i}")
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        if grad is None:  # not connected in eager; the operator's backward may return zeros instead
            assert got_grads[name] is None or not got_grads[name].any(), name
        else:
            assert_close(got_grads[name], grad, 1e-12, f"d/d{name}")


@pytest.mark.parametrize("case", ["linear_attn-gla-varlen", "delta_rule-no-state", "delta_product"])
def test_compiled_triton_backward_skips_the_forward_kernels(case, monkeypatch):
    """The operator's backward calls the op again only to differentiate it: the Triton linear
    family then sets up its autograd context without launching its forward kernels (output_kernel,
    which only the forward launches, runs once per training step, as in eager mode), and the
    outputs and gradients are the eager ones. (Interpreter on the CPU, float32, chunks of 16.)"""
    from rnnops.triton_backend import delta_rule as triton_delta_rule
    from rnnops.triton_backend import linear_attn as triton_linear_attn

    fn, inputs = {name: (f, x) for name, f, x in _cases(dtype=torch.float32, chunk_size=16)}[case]

    def call(**x):
        return fn(**x, backend="triton")

    launched = []
    for module in (triton_linear_attn, triton_delta_rule):
        launch = module.launch
        monkeypatch.setattr(module, "launch", lambda kernel, *a, _launch=launch, **kw: (
            launched.append(kernel.fn.__name__), _launch(kernel, *a, **kw))[1])
    want, want_grads = run_with_grads(call, inputs)
    eager_launches = list(launched)
    assert eager_launches.count("output_kernel") == 1 and "states_bwd_kernel" in eager_launches  # the spy sees both
    launched.clear()
    torch._dynamo.reset()
    got, got_grads = run_with_grads(torch.compile(call, fullgraph=True, backend="aot_eager"), inputs)
    assert launched.count("output_kernel") == 1 and "states_bwd_kernel" in launched, launched
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, 1e-6, "output")
    for name, grad in want_grads.items():
        assert_close(got_grads[name], grad, 1e-6, f"d/d{name}")


@pytest.mark.parametrize("case", CASES)
def test_meta_tensors_give_shapes_without_computing(case):
    fn, inputs = CASES[case]
    want = fn(**inputs)
    got = fn(**{name: x.to("meta") if isinstance(x, torch.Tensor) else
                tuple(s.to("meta") for s in x) if isinstance(x, tuple) else x for name, x in inputs.items()})

    def flat(out):
        return [t for part in (out if isinstance(out, tuple) else (out,))
                for t in (flat(part) if isinstance(part, tuple) else [part])]

    for a, b in zip(flat(got), flat(want), strict=True):
        assert (a is None) == (b is None)
        if b is not None:
            assert a.is_meta and a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("module", [rnnops.nn.LSTM, rnnops.nn.GRU])
def test_nn_modules_compile_with_inductor(module):
    model = module(8, 16, num_layers=2, batch_first=True, num_heads=2, dtype=F64)
    x = _r(3, 5, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)

    def loss(m):
        out, final = m(x)
        return out.square().sum() + sum(s.sum() for s in (final if isinstance(final, tuple) else (final,)))

    want, got = loss(model), loss(compiled)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        assert_close(a, b, 1e-12, "parameter gradient")
    assert_close(got, want, 1e-12, "loss")


class _Mixer(torch.nn.Module):
    """Gated linear attention followed by a GRU, as a model would use them."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkvg = torch.nn.Linear(dim, 4 * dim)
        self.gru = rnnops.nn.GRU(dim, dim, batch_first=True, num_heads=heads)

    def forward(self, x):
        q, k, v, g = self.qkvg(x).unflatten(-1, (4, self.heads, -1)).unbind(2)
        o, _ = rnnops.linear_attn(q, F.normalize(k, dim=-1), v, F.logsigmoid(g), chunk_size=4)
        return self.gru(o.flatten(2))[0]


def test_export_keeps_rnnops_operators_and_matches_eager():
    model = _Mixer().eval()
    x = torch.randn(2, 7, 16)
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert {"rnnops.linear_attn.default", "rnnops.rnn.default"} <= targets
    fresh = torch.randn(2, 7, 16)
    assert_close(program.module()(fresh), model(fresh), 1e-6, "exported output")


def test_compile_with_dynamic_shapes():
    model = _Mixer().double()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (5, 11):
        x = _r(2, T, 16)
        assert_close(compiled(x), model(x), 1e-12, f"T={T}")


def test_compiled_op_still_checks_values_when_it_runs():
    compiled = torch.compile(lambda q, g: rnnops.linear_attn(q, q, q, g)[0], fullgraph=True, backend="aot_eager")
    q = torch.randn(1, 4, 2, 16)
    compiled(q, -torch.rand(1, 4, 2))
    with pytest.raises(ValueError, match=r"linear_attn: g must lie in \[-inf, 0.0\]"):
        compiled(q, torch.rand(1, 4, 2))


def test_compiled_shape_error_names_the_argument():
    compiled = torch.compile(lambda q, k: rnnops.linear_attn(q, k, q)[0], backend="aot_eager")
    with pytest.raises(ValueError, match=r"linear_attn: k has shape \(1, 4, 3, 16\)"):
        compiled(torch.randn(1, 4, 2, 16), torch.randn(1, 4, 3, 16))


def test_operator_rejects_a_non_string_backend():
    q = torch.randn(1, 4, 2, 16, device="meta")
    with pytest.raises(TypeError, match="linear_attn: backend must be a str, got int"):
        rnnops.linear_attn(q, q, q, backend=3)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["linear_attn", "delta_rule", "selective_scan", "rnn-lstm"])
def test_compiled_on_gpu_matches_eager(case):
    """On CUDA the operator runs the Triton/CUDA backends (one case per family, to keep the GPU
    suite short; the CPU tests cover every op)."""
    cases = _cases(device="cuda", dtype=torch.float32, chunk_size=16)  # the Triton kernels take chunks >= 16
    fn, inputs = {name: (f, x) for name, f, x in cases}[case]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    want, want_grads = run_with_grads(fn, inputs)
    got, got_grads = run_with_grads(compiled, inputs)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_close(a, b, 1e-6, f"output {i}")
    for name, grad in want_grads.items():
        if grad is not None:
            assert_close(got_grads[name], grad, 1e-6, f"d/d{name}")
