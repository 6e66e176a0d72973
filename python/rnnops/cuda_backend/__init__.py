"""CUDA backend: kernels from ``csrc/`` compiled at run time (NVRTC through cupy) on GPUs, and
run through the CPU simulator (``csrc/sim``) on CPU tensors for tests."""
