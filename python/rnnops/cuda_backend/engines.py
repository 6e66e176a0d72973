"""Where the CUDA kernels run: the CPU simulator (CPU tensors) or NVRTC through cupy (CUDA
tensors). Both engines take the same arguments, tensors plus the integer vectors the host code
computed, so that everything but the final launch is shared."""
from __future__ import annotations

import functools
import os

import torch


SIMULATOR_ENV = "RNNOPS_CUDA_SIMULATOR"


def simulating() -> bool:
    return os.environ.get(SIMULATOR_ENV, "0") == "1"


def device_reason(device: torch.device) -> str | None:
    """Why the CUDA kernels cannot run on ``device`` (None if they can)."""
    if device.type == "cpu":
        return None if simulating() else f"runs CPU tensors only in the simulator ({SIMULATOR_ENV}=1)"
    if device.type != "cuda":
        return f"needs a CUDA device, got {device.type}"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "needs cupy for NVRTC (pip install 'rnnops[cuda]')"
    return None


def maybe(tensor: torch.Tensor | None) -> torch.Tensor:
    """Both engines take an undefined tensor for an absent optional argument."""
    return torch.Tensor() if tensor is None else tensor


@functools.cache
def simulator():
    """The simulator extension (a sanitizer's build where RNNOPS_CUDA_SIMULATOR_SANITIZER names one,
    in a process started with its runtime preloaded: simulator.sanitizer_environment)."""
    from . import simulator as sim

    return sim.load_from_environment()


def engine(device: torch.device):
    """The module whose functions launch the kernels for tensors on ``device``."""
    if device.type == "cpu":
        return simulator()
    from . import nvrtc

    return nvrtc.engine(device)
