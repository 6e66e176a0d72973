"""CUDA backend: kernels from ``csrc/`` compiled at run time (NVRTC through cupy) on GPUs, and
run through the CPU simulator (``csrc/sim``) on CPU tensors when RNNOPS_CUDA_SIMULATOR=1
(how the tests run them). Registered as backend ``"cuda"``."""
from . import rnn, selective_scan  # noqa: F401  (registration)
