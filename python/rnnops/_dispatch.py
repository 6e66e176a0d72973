"""Backend registry and selection.

Each op registers one implementation per backend. Backends, in the order ``auto`` tries them:

- CUDA tensors: the backend the autotune cache measured fastest for the call's shape bucket,
  else the one a GPU suite run timed fastest there on the same GPU model
  (autotune/defaults/backends.json: the H200's Mamba-1 scan at B8, CUDA 2.87 against Triton
  3.12 ms forward+backward, 3.29 against 4.32 in mamba's (B, D, L) layout, commit 76b5d92), then
  ``triton``, ``cuda``, ``chunked``, ``reference``. Triton before CUDA because the benches have
  mostly found the Triton kernels faster forward+backward: the LSTM B16 T1024 H12 D64 6.62
  against 8.89 ms (H200, 76b5d92), Mamba-1's scan 3.48 against 5.60 ms on the H100 (2c039d7,
  before the CUDA scan's one-round loads, not timed there since). Where the Triton kernels
  cannot run (the cells' head dims above 256) the CUDA ones still do; ``python -m rnnops
  autotune`` measures both on the device and its choice then comes first.
- CPU tensors: ``chunked``, ``reference``.

An implementation may come with a ``supports(**info)`` function that returns ``None`` when it
can take the inputs, or a sentence saying why not; ``auto`` skips such a backend, an explicit
request for it raises ``ValueError`` with that sentence.

``RNNOPS_BACKEND=<name>`` replaces ``auto`` for every op that has that backend; ops without it
keep the ``auto`` order. An explicit ``backend=`` argument always wins.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "chunked", "triton", "cuda")
_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "chunked", "reference"),
    "cpu": ("chunked", "reference"),
}


@dataclass(frozen=True)
class Implementation:
    fn: Callable
    supports: Callable[..., str | None] | None = None

    def reason_unsupported(self, info: dict) -> str | None:
        return None if self.supports is None else self.supports(**info)


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, supports: Callable[..., str | None] | None = None):
    """Decorator: register ``fn`` as ``op``'s implementation for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")

    def wrap(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = Implementation(fn, supports)
        return fn

    return wrap


def available(op: str) -> tuple[str, ...]:
    """Backends registered for ``op``, in ``BACKENDS`` order."""
    return tuple(b for b in BACKENDS if b in _REGISTRY.get(op, {}))


def unsupported(op: str, backend: str, **info) -> str | None:
    """Why ``backend`` cannot take inputs described by ``info`` (device, dtype, ...), or None."""
    return _REGISTRY[op][backend].reason_unsupported(info)


def resolve(op: str, backend, device: torch.device, **info) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for ``backend`` ("auto" or a name); returns (name, fn).

    ``info`` (dtype, sizes, ...) and ``device`` are passed to each candidate's ``supports`` check.
    """
    info = dict(info, device=device)
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str, got {type(backend).__name__}")
    impls = _REGISTRY[op]
    if backend == "auto":
        preferred = os.environ.get("RNNOPS_BACKEND", "").strip()
        if preferred:
            if preferred not in BACKENDS:
                raise ValueError(
                    f"{op}: RNNOPS_BACKEND={preferred!r} is not a backend; known: {', '.join(BACKENDS)}"
                )
            if preferred in impls:
                backend = preferred
    if backend != "auto":
        if backend not in impls:
            raise ValueError(
                f"{op}: backend must be 'auto' or one of {', '.join(map(repr, available(op)))}, "
                f"got {backend!r}"
            )
        reason = impls[backend].reason_unsupported(info)
        if reason is not None:
            raise ValueError(f"{op}: backend {backend!r} cannot take these inputs: {reason}")
        return backend, impls[backend].fn
    reasons = []
    order = _AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]
    if device.type == "cuda" and info.get("shape") is not None:
        from rnnops.autotune.cache import preferred_backend

        fastest = preferred_backend(op, info["shape"], info.get("dtype"), device)
        if fastest in impls:
            order = (fastest,) + tuple(name for name in order if name != fastest)
    for name in order:
        if name not in impls:
            continue
        reason = impls[name].reason_unsupported(info)
        if reason is None:
            return name, impls[name].fn
        reasons.append(f"{name}: {reason}")
    raise ValueError(f"{op}: no backend can take these inputs on {device}: " + "; ".join(reasons))
