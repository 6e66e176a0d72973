"""Calls made only to be differentiated: their outputs are dropped unread.

The ``torch.library`` operators (rnnops._library) differentiate an op by calling it again with
gradients on and running autograd through it. Within :func:`backward_only`, an autograd Function
whose backward reads nothing but its saved inputs (the Triton linear-attention and delta-rule
Functions: they recompute their states in the backward anyway) sets up its context and returns
uninitialised outputs of the right shapes instead of computing them, so a compiled training step
costs what an eager one does. Functions whose backward needs what the forward computes (the
fused cells' per-step states, the scans' chunk states) ignore the flag and run in full.

Only code whose outputs meet nothing but shape operations (views, slices, reshapes) before the
gradient is taken may use it: an op that reads an output's values in its own backward would read
garbage.

The other way round, :func:`needs_backward` tells a call that will not be differentiated
(inference), whose forward then saves nothing only a backward would read (the cells'
pre-activations, the Triton scan's chunk states).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.local()


@contextlib.contextmanager
def backward_only() -> Iterator[None]:
    """Within the block, Functions that may skip their forward compute (:func:`outputs_wanted`)."""
    previous = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def outputs_wanted() -> bool:
    """False inside :func:`backward_only`: a Function that needs only its inputs in the backward
    may then return ``torch.empty`` outputs."""
    return not getattr(_state, "active", False)


def needs_backward(*tensors) -> bool:
    """Whether a call's outputs can be differentiated: grad mode on and an input requiring grad.
    Otherwise (inference) the launchers may skip what only the backward reads. Decided where the
    op is called: inside an autograd Function's forward grad mode is off."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
