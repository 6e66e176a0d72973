"""Input validation shared by every public op.

Every check raises ``ValueError`` (wrong shape, size, value or option) or ``TypeError`` (not a
tensor, wrong dtype) with a message that starts with the op's name, names the argument, shows
what was given and says what was expected.

Checks that need tensor *values* (value ranges, cu_seqlens order) read the data, which forces a
device-to-host copy on a GPU. They always run on CPU tensors and run on GPU tensors only when
the environment variable ``RNNOPS_DEBUG`` is set to a non-empty value other than ``0``, so the
hot path never synchronises. While torch.compile or torch.export traces an op they are skipped
(there are no values yet); the traced operator runs them when it executes (see ``_library``).

Dtype rule (all ops): the per-token tensors of an op ("activations", e.g. q, k, v, beta) share
one floating dtype X in {float16, bfloat16, float32, float64}; parameters and states (decays,
recurrent weights, initial states, ...) may be X or float32. Computation accumulates in
float32 (float64 when X is float64); outputs come back in X, states in the accumulation dtype.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def value_checks_enabled(device: torch.device) -> bool:
    """Whether checks that read tensor values run for tensors on ``device``."""
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" or os.environ.get("RNNOPS_DEBUG", "0") not in ("", "0")


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


class Dims:
    """Binds named dimensions across an op's tensors and reports mismatches by name.

    >>> dims = Dims("linear_attn")
    >>> dims.bind("q", q, "B T H K")      # binds B, T, H, K from q
    >>> dims.bind("v", v, "B T H V")      # checks B, T, H against q, binds V
    """

    def __init__(self, op: str):
        self.op = op
        self.sizes: dict[str, int] = {}
        self.source: dict[str, str] = {}

    def __getitem__(self, letter: str) -> int:
        return self.sizes[letter]

    def bind(self, name: str, x: torch.Tensor, layout: str) -> None:
        letters = layout.split()
        if x.dim() != len(letters):
            raise ValueError(
                f"{self.op}: {name} must have {len(letters)} dimensions ({', '.join(letters)}), "
                f"got shape {_shape(x)}"
            )
        for letter, size in zip(letters, x.shape):
            if letter in self.sizes and self.sizes[letter] != size:
                raise ValueError(
                    f"{self.op}: {name} has shape {_shape(x)} ({', '.join(letters)}), but "
                    f"{letter}={self.sizes[letter]} from {self.source[letter]}"
                )
            self.sizes.setdefault(letter, size)
            self.source.setdefault(letter, name)

    def bind_one_of(self, name: str, x: torch.Tensor, layouts: Sequence[str]) -> str:
        """Bind ``x`` with the layout whose rank matches; returns the layout used."""
        for layout in layouts:
            if len(layout.split()) == x.dim():
                self.bind(name, x, layout)
                return layout
        expected = " or ".join(f"({', '.join(lay.split())})" for lay in layouts)
        raise ValueError(f"{self.op}: {name} must have shape {expected}, got shape {_shape(x)}")

    def bind_sequences(self, letter: str, cu_seqlens, device: torch.device) -> int:
        """Bind the number of sequences (the states' leading size): B, or len(cu_seqlens) - 1
        for packed sequences (validated by :func:`check_cu_seqlens`)."""
        if cu_seqlens is None:
            self.bind_int(letter, self.sizes["B"], "the batch size")
        else:
            count = check_cu_seqlens(self.op, cu_seqlens, self.sizes["B"], self.sizes["T"], device)
            self.bind_int(letter, count, "len(cu_seqlens) - 1")
        return self.sizes[letter]

    def bind_int(self, letter: str, value: int, name: str) -> None:
        """Bind a dimension from an integer argument (e.g. num_householder)."""
        if letter in self.sizes and self.sizes[letter] != value:
            raise ValueError(
                f"{self.op}: {name}={value}, but {letter}={self.sizes[letter]} from "
                f"{self.source[letter]}"
            )
        self.sizes.setdefault(letter, value)
        self.source.setdefault(letter, name)


def require_tensor(op: str, name: str, x, *, optional: bool = False) -> None:
    if x is None and optional:
        return
    if not isinstance(x, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{op}: {name} must be {expected}, got {type(x).__name__}")


def activation_dtype(op: str, tensors: dict[str, torch.Tensor | None]) -> torch.dtype:
    """Check that the named per-token tensors share one floating dtype and return it."""
    dtype, first = None, None
    for name, x in tensors.items():
        if x is None:
            continue
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
            )
        if dtype is None:
            dtype, first = x.dtype, name
        elif x.dtype != dtype:
            raise TypeError(
                f"{op}: {name} has dtype {x.dtype} but {first} has {dtype}; "
                f"the per-token inputs must share one dtype"
            )
    assert dtype is not None, "activation_dtype needs at least one tensor"
    return dtype


def parameter_dtypes(op: str, tensors: dict[str, torch.Tensor | None], dtype: torch.dtype) -> None:
    """Parameters and states may be the activations' dtype or float32."""
    allowed = {dtype, torch.float32}
    for name, x in tensors.items():
        if x is not None and x.dtype not in allowed:
            names = " or ".join(sorted(str(d) for d in allowed))
            raise TypeError(f"{op}: {name} must have dtype {names} (inputs are {dtype}), got {x.dtype}")


def same_device(op: str, tensors: dict[str, torch.Tensor | None]) -> torch.device:
    device, first = None, None
    for name, x in tensors.items():
        if x is None:
            continue
        if device is None:
            device, first = x.device, name
        elif x.device != device:
            raise ValueError(f"{op}: {name} is on {x.device} but {first} is on {device}")
    assert device is not None
    return device


def positive_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be >= 1, got {value}")
    return value


def resolve_scale(op: str, scale, head_dim: int) -> float:
    """``scale`` defaults to head_dim ** -0.5; a given one must be a finite real number."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return float(scale)


def check_cu_seqlens(op: str, cu_seqlens, batch: int, time: int, device: torch.device) -> int:
    """Validate packed-sequence offsets; returns the number of sequences N.

    ``cu_seqlens`` is a 1-D int32/int64 tensor [0, t1, ..., T] on the inputs' device, used with
    batch size 1. Offsets must be non-decreasing (empty sequences are allowed) and end at T;
    that part reads the values and so follows :func:`value_checks_enabled`.
    """
    require_tensor(op, "cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{op}: cu_seqlens must be 1-D with at least 2 offsets [0, ..., T], "
            f"got shape {_shape(cu_seqlens)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    if batch != 1:
        raise ValueError(f"{op}: with cu_seqlens the batch size must be 1 (packed sequences), got {batch}")
    if value_checks_enabled(device):
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0:
            raise ValueError(f"{op}: cu_seqlens must start at 0, got {offsets[0]}")
        if any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {offsets}")
        if offsets[-1] != time:
            raise ValueError(f"{op}: cu_seqlens must end at T={time}, got {offsets[-1]}")
    return cu_seqlens.numel() - 1


def check_range(op: str, name: str, x: torch.Tensor | None, low: float, high: float, what: str) -> None:
    """Values of ``x`` must lie in [low, high] (follows :func:`value_checks_enabled`)."""
    if x is None or x.numel() == 0 or not value_checks_enabled(x.device):
        return
    lo, hi = x.min().item(), x.max().item()
    if not (low <= lo and hi <= high):  # also catches NaN
        raise ValueError(f"{op}: {name} must lie in [{low}, {high}] ({what}), got values in [{lo}, {hi}]")


def check_choice(op: str, name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
