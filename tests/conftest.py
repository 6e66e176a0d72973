"""Shared test helpers: relative errors, backend comparisons with gradients, GPU skipping."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
os.environ["RNNOPS_POISON"] = "1"  # every kernel output starts as NaN, so an unwritten element fails (rnnops._buffers)
if not HAS_CUDA:  # kernels run on CPU tensors: Triton's interpreter (set before they import), the CUDA simulator
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("RNNOPS_CUDA_SIMULATOR", "1")


def _patch_triton_language_once_per_launch() -> None:
    """Triton's interpreter (3.9) patches triton.language's builtins for a kernel's launch and then
    again at every call of a @triton.jit helper inside it (inspect.getmembers over tl, tl.tensor and
    tl.math each time, ~0.2 ms): the scan's and the cells' per-step helpers spent three quarters of
    their interpreter tests' time there (the Triton scan's, the cells' and grouped linear attention's
    tests: 110 -> 48 s). Here a helper call patches only where its module sees a language module
    the launch has not patched yet (triton.language.core, from Triton's own helpers such as
    tl.zeros), and those patches are undone with the launch's. A builtin left unpatched would fail
    loudly (a call outside a kernel's scope), not compute something else."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    if not hasattr(interpreter, "_patch_lang") or not hasattr(interpreter, "_LangPatchScope"):
        return  # another Triton: leave its interpreter alone
    patch_lang = interpreter._patch_lang
    launch_scopes: list = []  # the running launch's scope, then its helpers'
    patched: set[int] = set()  # the language modules patched for it

    def patch_once(fn):
        languages = {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}
        if launch_scopes and languages <= patched:
            return interpreter._LangPatchScope()
        scope = patch_lang(fn)
        patched.update(languages)
        if launch_scopes:  # a helper's: undone with the launch's
            launch_scopes.append(scope)
            return interpreter._LangPatchScope()
        launch_scopes.append(scope)
        restore = scope.restore

        def restore_all():
            while len(launch_scopes) > 1:
                launch_scopes.pop().restore()
            launch_scopes.clear()
            patched.clear()
            restore()

        scope.restore = restore_all
        return scope

    interpreter._patch_lang = patch_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_language_once_per_launch()


if os.environ.get("RNNOPS_STACKS_ON_TERM"):
    # a folder: every test process (pytest's and each xdist worker's) writes its threads' stacks
    # there on SIGTERM, then stops as before; the GPU suite's time limit sends one, so a run that
    # runs out of time says where (2026-11-28: the limit stopped the GPU tests after 117 of 144, no summary)
    import faulthandler
    import signal

    _STACKS = open(os.path.join(os.environ["RNNOPS_STACKS_ON_TERM"], f"stacks-{os.getpid()}.txt"), "w")
    faulthandler.register(signal.SIGTERM, file=_STACKS, all_threads=True, chain=True)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (b the reference)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_close(a, b, bound: float, what: str = "") -> None:
    err = rel_err(a, b)
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.0e}"


def run_with_grads(fn, inputs: dict, cotangent_seed: int = 1):
    """Run ``fn(**inputs)`` -> tensor or (nested) tuple of tensors (None entries allowed) on fresh
    leaf copies of the floating inputs (also inside tuple inputs, named ``name[i]``),
    back-propagate fixed random cotangents, and return (flat outputs, {name: grad})."""
    def leaf(v):
        if isinstance(v, tuple):
            return tuple(leaf(x) for x in v)
        return v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    def flat(out):
        return [t for part in (out if isinstance(out, tuple) else (out,))
                for t in (flat(part) if isinstance(part, tuple) else [part]) if t is not None]

    leaves = {k: leaf(v) for k, v in inputs.items()}
    outs = tuple(flat(fn(**leaves)))
    gen = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    differentiable = [(o, c) for o, c in zip(outs, cotangents) if o.requires_grad]
    torch.autograd.backward([o for o, _ in differentiable], [c for _, c in differentiable])
    grads = {}
    for k, v in leaves.items():
        for i, x in enumerate(v) if isinstance(v, tuple) else [(None, v)]:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                grads[k if i is None else f"{k}[{i}]"] = x.grad
    return outs, grads


def as_float64(inputs: dict) -> dict:
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def packed_sequences(make_inputs, **kwargs) -> tuple[torch.Tensor, dict]:
    """(cu_seqlens, inputs) of five sequences packed in one batch row of 50 steps (lengths 5, 0,
    25, 1 and 19), each with an initial state of its own; ``make_inputs`` a linear-family test
    module's, given ``kwargs`` (the variant), at its default head dims."""
    x = make_inputs(B=1, T=50, initial=False, **kwargs)
    heads, keys, values = x["q"].shape[2], x["q"].shape[3], x["v"].shape[-1]
    x["initial_state"] = torch.randn(5, heads, keys, values)
    return torch.tensor([0, 5, 5, 30, 31, 50]), x


def compare_backends(fn, inputs: dict, bound: float, test: str = "chunked", reference: str = "reference"):
    """Outputs and every input gradient of ``fn(backend=test, **inputs)`` against the float64
    reference on the same inputs."""
    outs_t, grads_t = run_with_grads(lambda **kw: fn(backend=test, **kw), inputs)
    outs_r, grads_r = run_with_grads(lambda **kw: fn(backend=reference, **kw), as_float64(inputs))
    assert len(outs_t) == len(outs_r)
    for i, (a, b) in enumerate(zip(outs_t, outs_r)):
        assert_close(a, b, bound, f"output {i}")
    for name, grad in grads_r.items():
        assert grads_t[name] is not None, f"no gradient for {name}"
        assert_close(grads_t[name], grad, bound, f"d/d{name}")
