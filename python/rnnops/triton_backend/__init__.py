"""Triton backend: autograd Functions around ``rnnops.triton_kernels``, registered as backend
``"triton"``.

It takes CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before the kernels
were first imported (Triton's interpreter, used by the CPU tests). Kernel modules are imported
on first use so that importing rnnops stays cheap.
"""
from __future__ import annotations

import importlib.util

AVAILABLE = importlib.util.find_spec("triton") is not None

if AVAILABLE:
    from . import delta_rule, linear_attn, recurrent_step, rnn, selective_scan  # noqa: F401  (registration)
