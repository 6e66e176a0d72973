"""The public ops as ``torch.library`` operators, so ``torch.compile`` and ``torch.export`` see them.

Every public op ``rnnops.X`` is also the operator ``torch.ops.rnnops.X``. Eagerly, ``rnnops.X``
runs its backend directly (the backend's own autograd, nothing in between). While it is traced
(``torch.compile``, ``torch.export``, or called with meta tensors) it validates its arguments'
shapes and dtypes in Python and then calls the operator, which the tracer treats as one opaque
node:

- the real kernel is ``rnnops.X`` itself, run eagerly (value checks, backend choice and all),
  with outputs made contiguous (no backend returns an input or a view of one; opcheck in the
  tests would catch it);
- the fake (meta) kernel computes the output shapes and dtypes, never reading values;
- autograd is registered through a second operator ``torch.ops.rnnops.X_backward`` that
  calls the op again with gradients enabled and differentiates it with the backend's own
  autograd, under rnnops._backward_only: the Triton linear-attention, delta-rule and
  DeltaProduct Functions, whose backward needs only their inputs, then skip the forward's
  kernels, so a compiled training step costs what an eager one does. The other backends
  recompute the forward (one extra forward per op: the fused cells and the scans keep forward
  intermediates for their backward, the reference and chunked ones are plain autograd). Double
  backward through the compiled op is not supported.

Outputs that an op returns as None (an unrequested final state) travel through the operator as
empty placeholders; the public function turns them back into None.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ._backward_only import backward_only

_LIB = torch.library.Library("rnnops", "DEF")
OPS: dict[str, LibraryOp] = {}


def tracing(x: torch.Tensor) -> bool:
    """Whether this call is being traced rather than run: torch.compile / torch.export, or meta
    tensors (shape inference)."""
    return torch.compiler.is_compiling() or x.device.type == "meta"


class LibraryOp:
    """One public op registered as ``torch.ops.rnnops.<name>`` (see the module docstring).

    ``signature`` is the operator's argument list in torch schema syntax, e.g.
    ``"Tensor q, Tensor? g, float scale, str backend"``; ``run`` is the public function, called with
    those names as keywords; ``fake`` takes the same arguments positionally and returns
    outputs of the right shapes. Both return a (nested) tuple of tensors and Nones, flattened in
    order into the operator's ``Tensor[]`` result.
    """

    def __init__(self, name: str, signature: str, run: Callable, fake: Callable):
        OPS[name] = self
        self.name = name
        self.arg_names = [arg.split()[-1] for arg in signature.split(",")]
        self.arg_types = [arg.split()[0] for arg in signature.split(",")]
        self._run = run
        _LIB.define(f"{name}({signature}) -> Tensor[]")
        _LIB.impl(name, self._forward, "CompositeExplicitAutograd")
        torch.library.register_fake(f"rnnops::{name}", lambda *args: _materialise(_flatten_optional(fake(*args)), args))
        _LIB.define(f"{name}_backward(Tensor?[] grads, bool[] needs, {signature}) -> Tensor[]")
        _LIB.impl(f"{name}_backward", self._backward, "CompositeExplicitAutograd")
        torch.library.register_fake(f"rnnops::{name}_backward", self._backward_fake)
        torch.library.register_autograd(f"rnnops::{name}", self._autograd_backward, setup_context=self._save)

    @property
    def op(self) -> torch._ops.OpOverload:
        """``torch.ops.rnnops.<name>.default``."""
        return getattr(torch.ops.rnnops, self.name).default

    def __call__(self, *args) -> list[torch.Tensor]:
        """Call the operator (positional arguments in signature order, already validated by the
        public function except the ``str`` ones, which are checked here)."""
        for name, ty, value in zip(self.arg_names, self.arg_types, args):
            if ty == "str" and not isinstance(value, str):
                raise TypeError(f"{self.name}: {name} must be a str, got {type(value).__name__}")
        return self.op(*args)

    def _call_run(self, args) -> list[torch.Tensor | None]:
        return _flatten_optional(self._run(**dict(zip(self.arg_names, args))))

    def _forward(self, *args) -> list[torch.Tensor]:
        return _materialise(self._call_run(args), args)

    def _save(self, ctx, inputs, output) -> None:
        slots = _tensor_slots(inputs, self.arg_types)
        ctx.save_for_backward(*slots)
        ctx.template = _fill_slots(inputs, self.arg_types, [None] * len(slots))  # the non-tensor arguments

    def _autograd_backward(self, ctx, grads):
        args = _fill_slots(ctx.template, self.arg_types, ctx.saved_tensors)
        needs = _tensor_slots(ctx.needs_input_grad, self.arg_types, like=args)
        needs = [bool(need) and slot is not None for need, slot in zip(needs, _tensor_slots(args, self.arg_types))]
        found = iter(getattr(torch.ops.rnnops, f"{self.name}_backward")(list(grads), needs, *args))
        per_slot = [next(found) if need else None for need in needs]
        return tuple(_fill_slots(args, self.arg_types, per_slot, non_tensor=None))

    def _backward(self, grads, needs, *args) -> list[torch.Tensor]:
        """Call the op again with gradients on for the slots flagged in ``needs`` (its outputs
        unread: backward_only) and differentiate it; returns one contiguous gradient per flagged
        slot."""
        with torch.enable_grad(), backward_only():
            slots = _tensor_slots(args, self.arg_types)
            leaves = [t.detach().requires_grad_(True) if need else t for t, need in zip(slots, needs)]
            outs = self._call_run(_fill_slots(args, self.arg_types, leaves))
            wanted = [t for t, need in zip(leaves, needs) if need]
            pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None and o.requires_grad]
            found = (torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs else [None] * len(wanted))
        result = [x.new_zeros(x.shape) if g is None else g.contiguous() for g, x in zip(found, wanted)]
        return _fresh(result, list(args) + [list(grads)])

    def _backward_fake(self, grads, needs, *args) -> list[torch.Tensor]:
        return [t.new_empty(t.shape) for t, need in zip(_tensor_slots(args, self.arg_types), needs) if need]


def _tensor_slots(args, types, like=None) -> list:
    """The tensor slots of an operator call, in order: a ``Tensor`` or ``Tensor?`` argument is one
    slot (its value may be None), a ``Tensor[]`` argument one slot per element of the matching
    argument of ``like`` (default: ``args`` itself; none if it is None)."""
    slots = []
    for a, shape, ty in zip(args, like if like is not None else args, types):
        if ty.startswith("Tensor[]"):
            if shape is not None:
                slots.extend(a if isinstance(a, (list, tuple)) else [a] * len(shape))
        elif ty.startswith("Tensor"):
            slots.append(a)
    return slots


def _fill_slots(args, types, values, non_tensor="keep") -> list:
    """Inverse of :func:`_tensor_slots`: ``args`` with its tensor slots replaced by ``values``
    (and its other arguments replaced by ``non_tensor`` unless that is "keep")."""
    it = iter(values)
    filled = []
    for a, ty in zip(args, types):
        if ty.startswith("Tensor[]"):
            filled.append(None if a is None else [next(it) for _ in a])
        elif ty.startswith("Tensor"):
            filled.append(next(it))
        else:
            filled.append(a if non_tensor == "keep" else non_tensor)
    return filled


def _tensors_in(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors_in(v)


def _flatten_optional(result) -> list[torch.Tensor | None]:
    if isinstance(result, (tuple, list)):
        return [x for part in result for x in _flatten_optional(part)]
    return [result]


def _materialise(outputs: list[torch.Tensor | None], args) -> list[torch.Tensor]:
    """The operator's result: each output contiguous, None as an empty float32 placeholder."""
    device = next(_tensors_in(args)).device
    return [torch.empty(0, device=device) if out is None else out.contiguous() for out in outputs]


def _fresh(outputs: list[torch.Tensor], inputs) -> list[torch.Tensor]:
    """Operators may not return their inputs (or views of them), nor one tensor twice: copy any
    output that shares storage with an input or an earlier output. (Autograd hands an incoming
    gradient straight through a copy, e.g. from the final state of an empty sequence back to
    the initial state.)"""
    taken = {t.untyped_storage().data_ptr() for t in _tensors_in(inputs) if t.numel()}
    fresh = []
    for out in outputs:
        if out.numel() and out.untyped_storage().data_ptr() in taken:
            out = out.clone()
        taken.add(out.untyped_storage().data_ptr())
        fresh.append(out)
    return fresh
