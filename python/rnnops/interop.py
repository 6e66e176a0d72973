"""rnnops' ops on any DLPack array: NumPy (CPU), CuPy and JAX (CPU or CUDA), zero-copy.

Each function takes the same arguments as the op of the same name in ``rnnops``; array arguments
(anything with ``__dlpack__``) are viewed as torch tensors through DLPack, and tensor results come
back as the kind of array the first array argument was (``numpy.from_dlpack``,
``cupy.from_dlpack`` or ``jax.numpy.from_dlpack``), again without copies. Arrays on devices
other than the CPU and CUDA are refused by name. These calls are for inference: gradients do not
cross the DLPack boundary (use torch tensors for training).
"""
from __future__ import annotations

import functools
import importlib

import torch

import rnnops

_DEVICES = {1: "cpu", 2: "cuda"}  # DLPack device types rnnops takes
_FROM_DLPACK = {"numpy": "numpy", "cupy": "cupy", "jax": "jax.numpy", "jaxlib": "jax.numpy"}


def _to_torch(op: str, name: str, value):
    if value is None or isinstance(value, torch.Tensor) or not hasattr(value, "__dlpack__"):
        return value
    device_type, _ = value.__dlpack_device__()
    if device_type not in _DEVICES:
        raise ValueError(f"{op}: {name} lives on DLPack device type {device_type}; rnnops takes CPU and CUDA arrays")
    return torch.from_dlpack(value)


def _exporter(op: str, array):
    module = type(array).__module__.split(".")[0]
    if module not in _FROM_DLPACK:
        raise TypeError(f"{op}: cannot return results as {type(array).__module__}.{type(array).__name__}; "
                        f"supported: NumPy, CuPy, JAX arrays")
    return importlib.import_module(_FROM_DLPACK[module]).from_dlpack


def _wrap(op: str):
    function = getattr(rnnops, op)
    names = function.__code__.co_varnames[: function.__code__.co_argcount]  # positional parameters, for messages

    @functools.wraps(function)
    def call(*args, **kwargs):
        arrays = [a for a in list(args) + list(kwargs.values()) if hasattr(a, "__dlpack__")
                  and not isinstance(a, torch.Tensor)]
        converted = [_to_torch(op, names[i] if i < len(names) else f"argument {i}", a) for i, a in enumerate(args)]
        converted_kw = {k: _to_torch(op, k, v) for k, v in kwargs.items()}
        with torch.no_grad():
            result = function(*converted, **converted_kw)
        if not arrays:
            return result
        export = _exporter(op, arrays[0])

        def back(x):
            if isinstance(x, torch.Tensor):
                return export(x.detach())
            if isinstance(x, tuple):
                return tuple(back(item) for item in x)
            return x

        return back(result)

    return call


OPS = ("rnn", "rnn_step", "linear_attn", "linear_attn_step", "delta_rule", "delta_rule_step", "delta_product",
       "delta_product_step", "selective_scan", "selective_state_update")
for _op in OPS:
    globals()[_op] = _wrap(_op)

__all__ = list(OPS)
