"""Elementwise math the kernels share."""
from __future__ import annotations

import triton
import triton.language as tl

LOG2_E = tl.constexpr(1.4426950408889634)


@triton.jit
def exp(x):
    """e^x (fp32) as the special-function unit's 2^(x log2 e), results below 2^-126 flushed to 0.
    tl.exp keeps those denormal results at two more instructions and a compare an element (SASS,
    sm_90, Triton 3.6: GLA's forward state walk 584 -> 482 instructions a chunk); the linear
    family's decays only reach them where a term is negligible anyway (< 1.2e-38 of its input)."""
    return tl.math.exp2(x * LOG2_E)
