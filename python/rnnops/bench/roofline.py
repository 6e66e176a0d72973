"""Work per op (flops and bytes) and the roofline floor it implies on a given GPU.

Bytes are the algorithmic minimum: every input read once, every output written once (weights
and decays included, states excluded as the standard cases start from zero). Flops follow the
chunked algorithms the kernels implement (full C x C blocks, as kernels compute them), the
backward counted as twice the forward's flops and bytes (its inputs plus the output gradient
in, one gradient per input out). Exponentials are counted where they are per element of the
work (the selective scan's e^(dt A) for every step, channel and state element; SASS shows one
MUFU.EX2 each), since the special function units, 16 per SM per clock, bound such a kernel
before its flops do. The floor is max(bytes / bandwidth, flops / peak, exponentials / rate).
"""
from __future__ import annotations

from dataclasses import dataclass

from rnnops.autotune.hardware import Hardware, dtype_name


@dataclass(frozen=True)
class Work:
    """Forward flops and bytes, and the compute dtype whose peak bounds the flops."""

    flops: float
    bytes: float
    peak_dtype: str
    exponentials: float = 0.0

    def phase(self, phase: str) -> tuple[float, float]:
        """(flops, bytes) of "fwd" or "fwd_bwd" (= 3x the forward)."""
        factor = {"fwd": 1.0, "fwd_bwd": 3.0}[phase]
        return self.flops * factor, self.bytes * factor

    def floor_seconds(self, hardware: Hardware, phase: str) -> float | None:
        """The roofline's lower bound on the time, or None if the hardware's peaks are unknown."""
        peak = hardware.peak(self.peak_dtype)
        if not peak or not hardware.memory_bandwidth:
            return None
        flops, moved = self.phase(phase)
        exponentials = self.exponentials * {"fwd": 1.0, "fwd_bwd": 3.0}[phase]
        special = exponentials / hardware.exp_rate if hardware.exp_rate else 0.0
        return max(moved / hardware.memory_bandwidth, flops / peak, special)


def linear_attn(B, T, H, K, V, gate: str, dtype, chunk=64, qk_heads=None) -> Work:
    """``qk_heads``: q and k's heads where grouped (read once per group)."""
    s = dtype.itemsize
    gate_elems = {"none": 0, "scalar": 1, "per-key": K}[gate]
    moved = (B * T * H * (2 * V + gate_elems) + B * T * (qk_heads or H) * 2 * K) * s
    flops = 2 * B * T * H * (chunk * K + chunk * V + 2 * K * V)
    return Work(flops, moved, dtype_name(dtype))


def ssd(B, T, H, P, N, G, dtype, chunk=64) -> Work:
    """Mamba-2's SSD (x, z-less output, dt per head, B and C per group of heads): the scores C B^T
    counted once per group, as the algorithm shares them (rnnops computes them per head)."""
    s = dtype.itemsize
    moved = (B * T * H * (2 * P + 1) + 2 * B * T * G * N) * s
    flops = 2 * B * T * (G * chunk * N + H * (chunk * P + 2 * N * P))
    return Work(flops, moved, dtype_name(dtype))


def delta_rule(B, T, H, K, V, gated: bool, dtype, chunk=64, num_householder=1, qk_heads=None) -> Work:
    """``qk_heads``: q and k's heads where grouped (read once per group)."""
    s = dtype.itemsize
    steps = T * num_householder
    Hk = qk_heads or H
    moved = (B * T * (Hk * K + H * V + (H if gated else 0)) + B * steps * (Hk * K + H * (V + 1))) * s
    # the UT inverse as the kernels compute it: chunk / 16 products of chunk^3 per chunk (blocked)
    per_step_macs = 2 * chunk * K + (chunk // 16) * chunk * chunk + chunk * (K + V) + 3 * K * V + chunk * V
    return Work(2 * B * steps * H * per_step_macs, moved, dtype_name(dtype))


def selective_scan(B, T, Dm, N, dtype, groups: int = 1) -> Work:
    s = dtype.itemsize
    moved = (4 * B * T * Dm + 2 * B * T * groups * N) * s + 4 * (Dm * N + 2 * Dm)
    return Work(7 * B * T * Dm * N, moved, "float32", exponentials=B * T * Dm * N)


def rnn(B, T, H, D, gates: int, dtype) -> Work:
    """With the input projection (input size H * D) that every compared target runs."""
    s = dtype.itemsize
    hidden = H * D
    moved = (2 * B * T * hidden + gates * hidden * hidden + gates * H * D * D + 2 * gates * hidden) * s
    flops = 2 * B * T * gates * hidden * hidden + 2 * B * T * gates * H * D * D + 10 * B * T * gates * hidden
    return Work(flops, moved, dtype_name(dtype))
