"""Chunked backend: chunk-parallel PyTorch, the fast path on the CPU.

Sequences are cut into chunks; work inside a chunk is batched matrix products over all chunks
at once, and only a short loop over chunks carries the state. Decays are handled in log space
with per-chunk cumulative sums, and every exponential is of a non-positive number, so nothing
overflows for long sequences or strong decay. Registers functions under backend ``"chunked"``.
"""
from . import delta_rule, linear_attn, selective_scan  # noqa: F401  (registration)
