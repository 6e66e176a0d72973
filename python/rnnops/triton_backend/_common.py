"""Host-side helpers shared by the Triton ops: device checks, chunk layout, dot precision."""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def join_reasons(*reasons: str | None) -> str | None:
    """A backend's ``supports`` answer from its checks: None if all passed, else their reasons."""
    return "; ".join(r for r in reasons if r) or None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None if they can)."""
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


def dtype_reason(dtype: torch.dtype) -> str | None:
    if dtype in KERNEL_DTYPES:
        return None
    return f"supports float16, bfloat16 and float32 inputs, got {dtype}"


def head_dim_reason(name: str, size: int) -> str | None:
    if size % 16 == 0 and 16 <= size <= 256:
        return None
    return f"{name} must be a multiple of 16 in [16, 256], got {size}"


def chunk_reason(chunk: int) -> str | None:
    if chunk in (16, 32, 64, 128):
        return None
    return f"chunk_size must be 16, 32, 64 or 128, got {chunk}"


def register_cap(programs_per_sm: int, num_warps: int, sm_registers: int | None) -> dict:
    """Launch options capping a kernel's registers a thread (Triton's ``maxnreg``, ptxas's
    -maxrregcount) so that ``programs_per_sm`` programs of ``num_warps`` warps fit an SM's
    ``sm_registers``: a multiple of 8 (registers go to warps in blocks of 256), at most 255; none
    where ``programs_per_sm`` is 1 or the SM is unknown (Triton's interpreter). ptxas otherwise
    takes what its schedule likes up to 255, whatever that leaves of the SM for other programs:
    e.g. the scalar decay's dq/dk kernel at 64 x 64 tiles and 8 warps, 135 registers, one program
    an SM, and 128 capped, two, neither spilling (Triton 3.6, sm_90, bf16)."""
    if programs_per_sm <= 1 or sm_registers is None:
        return {}
    return {"maxnreg": min(255, sm_registers // (programs_per_sm * num_warps * 32) // 8 * 8)}


def dot_precision(dtype: torch.dtype, allow_tf32: bool | None = None, tile_dims: tuple[int, ...] = ()) -> str:
    """``input_precision`` of the kernels' dot products. float32 inputs get "tf32x3" (each operand
    split into two TF32 parts, three tensor-core products: float32 accuracy at tensor-core speed;
    "ieee" would run on CUDA cores and spill) unless the user allowed TF32 (by default through
    torch.backends.cuda.matmul.allow_tf32). Half inputs get "tf32" for the float32 intermediates
    their kernels multiply (half operands ignore it).

    Kernels with a head-dim tile (``tile_dims``: the K/V or unit blocks, the dots' reduction and
    output widths) of 16 get "ieee" whatever the dtype: on an H100 with Triton 3.6, linear attention
    at K = 16 in float32 came out wrong with "tf32" (relative error 2) and faulted (illegal memory
    access) with "tf32x3", while 16-row chunks and GLA's 16 x 16 sub-chunks at K = 64 were exact;
    16-wide tiles are small enough for CUDA cores."""
    if tile_dims and min(tile_dims) <= 16:
        return "ieee"
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32x3" if dtype == torch.float32 and not allow_tf32 else "tf32"


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, every Triton launch of rnnops. Products are fused into
    the adds after them (``enable_fp_fusion=True``), as every Triton before 3.10 does unless told
    otherwise: 3.10 turns that default off (Triton 3.9 warns), which would add an instruction to
    every multiply-add of the recurrences and change their rounding from what the tests bound
    and the benchmarks time. A launch whose pipelined tiles need more shared memory
    than the GPU has (a configuration chosen for a larger GPU, or a default on a ~100 KB GPU;
    Triton raises OutOfResources when it loads the kernel) runs again with ``num_stages=1``, one
    copy of each tile (e.g. the float32 delta-rule state kernels at K = V = 128: 185 KB with two
    stages, 96 KB with one), with a warning naming the kernel."""
    from triton.runtime.errors import OutOfResources

    kwargs.setdefault("enable_fp_fusion", True)
    try:
        return kernel[grid](*args, **kwargs)
    except OutOfResources as error:
        if kwargs.get("num_stages", 1) <= 1 or "shared" not in str(error):
            raise
        warnings.warn(f"rnnops: {kernel.__name__} with num_stages={kwargs['num_stages']} {error}; launching it "
                      "with num_stages=1 (tune this GPU to pick a configuration that fits: python -m rnnops autotune)",
                      RuntimeWarning, stacklevel=2)
        return kernel[grid](*args, **dict(kwargs, num_stages=1))


@dataclass
class ChunkLayout:
    """Every batch as packed sequences: offsets ``cu_seqlens`` (N + 1), and per program the
    (sequence, chunk) it handles.

    ``chunk_offsets[i]`` is sequence i's first global chunk; ``chunk_indices`` (programs, 2)
    maps each program to (sequence, chunk in sequence), or (-1, -1) past the real chunk count.
    For packed input the number of chunks is bounded without reading the offsets (ceil(T / BT)
    + N), so nothing synchronises with the device.
    """

    cu_seqlens: torch.Tensor
    chunk_offsets: torch.Tensor
    chunk_indices: torch.Tensor
    sequences: int
    total_rows: int

    @property
    def programs(self) -> int:
        return self.chunk_indices.shape[0]

    @classmethod
    def build(cls, batch: int, time: int, chunk: int, cu_seqlens: torch.Tensor | None, device) -> ChunkLayout:
        """The layout of this call; batches of equal-length sequences share one per (batch, time,
        chunk, device) (the kernels only read it), so a call launches no index-building ops. While
        a CUDA graph is being captured the layout is built, not cached: captured ops fill their
        outputs only when the graph replays."""
        if cu_seqlens is None:
            device = torch.device(device)
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return _dense_layout.__wrapped__(batch, time, chunk, device)
            return _dense_layout(batch, time, chunk, device)
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        sequences = cu.numel() - 1
        counts = (cu[1:] - cu[:-1] + chunk - 1) // chunk
        offsets = torch.cat([cu.new_zeros(1), counts.cumsum(0).to(torch.int32)])
        programs = -(-time // chunk) + sequences
        index = torch.arange(programs, device=device, dtype=torch.int32)
        seq = torch.searchsorted(offsets[1:], index, right=True).to(torch.int32)
        valid = seq < sequences
        within = index - offsets[seq.clamp(max=sequences - 1)]
        indices = torch.stack([torch.where(valid, seq, -1), torch.where(valid, within, -1)], dim=1)
        return cls(cu, offsets, indices.contiguous(), sequences, time)


@functools.lru_cache(maxsize=64)
def _dense_layout(batch: int, time: int, chunk: int, device: torch.device) -> ChunkLayout:
    """ChunkLayout of ``batch`` sequences of ``time`` steps (cached: read-only index tensors)."""
    per_seq = -(-time // chunk)
    seqs = torch.arange(batch, device=device, dtype=torch.int32)
    cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * time
    offsets = torch.arange(batch + 1, device=device, dtype=torch.int32) * per_seq
    indices = torch.stack([seqs.repeat_interleave(per_seq),
                           torch.arange(per_seq, device=device, dtype=torch.int32).repeat(batch)], dim=1)
    return ChunkLayout(cu, offsets, indices.contiguous(), batch, batch * time)
