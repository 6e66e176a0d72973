import pytest
import torch

import rnnops
from rnnops import _dispatch

CPU = torch.device("cpu")


def test_available_backends():
    assert rnnops.available_backends("linear_attn") == ("reference", "chunked", "triton")
    assert rnnops.available_backends("selective_scan") == ("reference", "chunked", "triton", "cuda")
    assert rnnops.available_backends("selective_state_update") == ("reference", "chunked", "triton")
    assert rnnops.available_backends("rnn") == ("reference", "triton", "cuda")


def test_auto_prefers_chunked_on_cpu_and_falls_back(monkeypatch):
    monkeypatch.delenv("RNNOPS_BACKEND", raising=False)
    assert _dispatch.resolve("delta_rule", "auto", CPU)[0] == "chunked"
    assert _dispatch.resolve("rnn", "auto", CPU)[0] == "reference"


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("RNNOPS_BACKEND", "reference")
    assert _dispatch.resolve("linear_attn", "auto", CPU)[0] == "reference"
    assert _dispatch.resolve("linear_attn", "chunked", CPU)[0] == "chunked"
    monkeypatch.setenv("RNNOPS_BACKEND", "chunked")
    assert _dispatch.resolve("rnn", "auto", CPU)[0] == "reference"  # rnn has no chunked backend
    monkeypatch.setenv("RNNOPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="RNNOPS_BACKEND='fast' is not a backend"):
        _dispatch.resolve("rnn", "auto", CPU)


def test_unsupported_inputs_are_skipped_by_auto_and_explained_when_asked(monkeypatch):
    monkeypatch.delenv("RNNOPS_BACKEND", raising=False)
    op = "test_only_op"
    _dispatch.register(op, "chunked", supports=lambda dtype, **_: None if dtype == torch.float32 else f"{dtype} unsupported")(
        lambda: "chunked")
    _dispatch.register(op, "reference")(lambda: "reference")
    try:
        assert _dispatch.resolve(op, "auto", CPU, dtype=torch.float32)[0] == "chunked"
        assert _dispatch.resolve(op, "auto", CPU, dtype=torch.float16)[0] == "reference"
        with pytest.raises(ValueError, match="backend 'chunked' cannot take these inputs: torch.float16 unsupported"):
            _dispatch.resolve(op, "chunked", CPU, dtype=torch.float16)
    finally:
        del _dispatch._REGISTRY[op]


def test_auto_on_cuda_tensors_tries_triton_before_cuda(monkeypatch):
    """The measured order (rnnops._dispatch: Triton faster forward+backward wherever a GPU bench
    timed both), falling back to CUDA where Triton cannot take the inputs (no GPU needed: no shape,
    so no autotune cache is asked)."""
    monkeypatch.delenv("RNNOPS_BACKEND", raising=False)
    op = "test_only_op"
    _dispatch.register(op, "cuda")(lambda: "cuda")
    _dispatch.register(op, "triton", supports=lambda head_dim, **_: None if head_dim <= 256 else "heads up to 256")(
        lambda: "triton")
    cuda = torch.device("cuda")
    try:
        assert _dispatch.resolve(op, "auto", cuda, head_dim=64)[0] == "triton"
        assert _dispatch.resolve(op, "auto", cuda, head_dim=768)[0] == "cuda"
    finally:
        del _dispatch._REGISTRY[op]


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'numpy'"):
        _dispatch.register("linear_attn", "numpy")
