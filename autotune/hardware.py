"""The hardware model: the limits that decide which kernel configurations are legal and fast.

A :class:`Hardware` comes from the live device (:func:`from_device`) or, offline, from a named
GPU (:func:`named`), so that search spaces and rooflines can be computed and tested on a
machine without a GPU. Offline figures are the vendors' published dense numbers (no
sparsity) for the SXM / desktop parts named.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TERA = 1e12


@dataclass(frozen=True)
class Hardware:
    name: str
    compute_capability: tuple[int, int]
    sm_count: int
    warp_size: int = 32
    max_threads_per_block: int = 1024
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    registers_per_sm: int = 65536
    registers_per_block: int = 65536
    max_registers_per_thread: int = 255
    shared_memory_per_block: int = 48 * KIB  # the opt-in maximum for one block
    shared_memory_per_sm: int = 64 * KIB
    l2_bytes: int = 0
    memory_bytes: int = 0
    memory_bandwidth: float = 0.0  # bytes / s
    peak_flops: dict[str, float] = field(default_factory=dict)  # per compute dtype, FLOP / s
    clock_hz: float = 0.0  # boost clock of the SMs
    mma_shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # (m, n, k) per dtype

    @property
    def exp_rate(self) -> float:
        """Exponentials / s: 2^x on the special function units, 16 per SM per clock on sm_70 ..
        sm_90 (0 without a clock); follows the live SM count (from_device)."""
        return self.sm_count * 16 * self.clock_hz

    @property
    def arch(self) -> str:
        """e.g. "sm_90" (Hopper's wgmma / TMA need "sm_90a" when compiling)."""
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def programs_per_sm(self, threads: int, registers: int, shared_bytes: int) -> tuple[int, str]:
        """(how many programs of ``threads`` threads, ``registers`` per thread and ``shared_bytes``
        of shared memory one SM holds at once, the limit that decides it). Registers go to warps
        in blocks of 256, and each block reserves 1 KB of shared memory (compute capability 8.0
        and later; CUDA's occupancy rules)."""
        warps = -(-threads // self.warp_size)
        per_warp = -(-registers * self.warp_size // 256) * 256
        reserved = 1024 if self.compute_capability >= (8, 0) else 0
        limits = {"threads": self.max_threads_per_sm // max(threads, 1), "blocks": self.max_blocks_per_sm,
                  "registers": self.registers_per_sm // max(per_warp * warps, 1),
                  "shared memory": self.shared_memory_per_sm // (shared_bytes + reserved) if shared_bytes else
                  self.max_blocks_per_sm}
        limiter = min(limits, key=limits.get)
        return limits[limiter], limiter

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for matrix work in ``dtype`` ("bfloat16", "float16", "tf32", "float32");
        0 when unknown or unsupported."""
        return self.peak_flops.get(dtype, 0.0)


def dtype_name(dtype) -> str:
    """A torch dtype as the name ``peak`` and the cache keys use: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


_AMPERE_MMA = {"bfloat16": (16, 8, 16), "float16": (16, 8, 16), "tf32": (16, 8, 8)}

OFFLINE: dict[str, Hardware] = {
    gpu.name: gpu
    for gpu in (
        Hardware("V100", (7, 0), 80, max_blocks_per_sm=32, shared_memory_per_block=96 * KIB,
                 shared_memory_per_sm=96 * KIB, l2_bytes=6 * MIB, memory_bytes=32 * GIB, memory_bandwidth=900e9,
                 peak_flops={"float16": 125 * TERA, "float32": 15.7 * TERA},
                 clock_hz=1.53e9, mma_shapes={"float16": (16, 16, 16)}),
        Hardware("A100", (8, 0), 108, shared_memory_per_block=163 * KIB, shared_memory_per_sm=164 * KIB,
                 l2_bytes=40 * MIB, memory_bytes=80 * GIB, memory_bandwidth=2039e9,
                 peak_flops={"bfloat16": 312 * TERA, "float16": 312 * TERA, "tf32": 156 * TERA,
                             "float32": 19.5 * TERA},
                 clock_hz=1.41e9, mma_shapes=_AMPERE_MMA),
        Hardware("L4", (8, 9), 58, max_threads_per_sm=1536, max_blocks_per_sm=24, shared_memory_per_block=99 * KIB,
                 shared_memory_per_sm=100 * KIB, l2_bytes=48 * MIB, memory_bytes=24 * GIB, memory_bandwidth=300e9,
                 peak_flops={"bfloat16": 121 * TERA, "float16": 121 * TERA, "tf32": 60 * TERA, "float32": 30.3 * TERA},
                 clock_hz=2.04e9, mma_shapes=_AMPERE_MMA),
        Hardware("RTX 4090", (8, 9), 128, max_threads_per_sm=1536, max_blocks_per_sm=24,
                 shared_memory_per_block=99 * KIB, shared_memory_per_sm=100 * KIB, l2_bytes=72 * MIB,
                 memory_bytes=24 * GIB, memory_bandwidth=1008e9,
                 peak_flops={"bfloat16": 165 * TERA, "float16": 165 * TERA, "tf32": 82.6 * TERA,
                             "float32": 82.6 * TERA},
                 clock_hz=2.52e9, mma_shapes=_AMPERE_MMA),
        Hardware("H100", (9, 0), 132, shared_memory_per_block=227 * KIB, shared_memory_per_sm=228 * KIB,
                 l2_bytes=50 * MIB, memory_bytes=80 * GIB, memory_bandwidth=3350e9,
                 peak_flops={"bfloat16": 989 * TERA, "float16": 989 * TERA, "tf32": 495 * TERA, "float32": 67 * TERA},
                 clock_hz=1.98e9, mma_shapes=_AMPERE_MMA),
        Hardware("H100 PCIe", (9, 0), 114, shared_memory_per_block=227 * KIB, shared_memory_per_sm=228 * KIB,
                 l2_bytes=50 * MIB, memory_bytes=80 * GIB, memory_bandwidth=2000e9,
                 peak_flops={"bfloat16": 756 * TERA, "float16": 756 * TERA, "tf32": 378 * TERA, "float32": 51 * TERA},
                 clock_hz=1.755e9, mma_shapes=_AMPERE_MMA),
        Hardware("H200", (9, 0), 132, shared_memory_per_block=227 * KIB, shared_memory_per_sm=228 * KIB,
                 l2_bytes=50 * MIB, memory_bytes=141 * GIB, memory_bandwidth=4800e9,
                 peak_flops={"bfloat16": 989 * TERA, "float16": 989 * TERA, "tf32": 495 * TERA, "float32": 67 * TERA},
                 clock_hz=1.98e9, mma_shapes=_AMPERE_MMA),
    )
}


def named(name: str) -> Hardware:
    """The offline model of a GPU by name ("H100", "A100", ...; case-insensitive)."""
    for key, gpu in OFFLINE.items():
        if key.lower() == name.lower():
            return gpu
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(OFFLINE)}")


def match_name(device_name: str) -> Hardware | None:
    """The offline entry a device name such as "NVIDIA H100 80GB HBM3" refers to, if any
    (the longest matching key wins, so "H100 PCIe" beats "H100")."""
    text = device_name.lower().replace("geforce ", "")
    hits = [gpu for key, gpu in OFFLINE.items() if key.lower() in text]
    return max(hits, key=lambda gpu: len(gpu.name)) if hits else None


def from_device(index: int = 0) -> Hardware:
    """The model of a live CUDA device: limits read from the driver, peak rates from the
    offline entry its name matches (none when it matches none)."""
    import torch

    props = torch.cuda.get_device_properties(index)
    known = match_name(props.name)
    base = known if known is not None else Hardware(props.name, (props.major, props.minor), props.multi_processor_count)

    def read(attr, default):
        value = getattr(props, attr, None)
        return value if value else default

    return dataclasses.replace(
        base,
        name=props.name,
        compute_capability=(props.major, props.minor),
        sm_count=props.multi_processor_count,
        warp_size=read("warp_size", base.warp_size),
        max_threads_per_sm=read("max_threads_per_multi_processor", base.max_threads_per_sm),
        registers_per_sm=read("regs_per_multiprocessor", base.registers_per_sm),
        shared_memory_per_block=read("shared_memory_per_block_optin", base.shared_memory_per_block),
        shared_memory_per_sm=read("shared_memory_per_multiprocessor", base.shared_memory_per_sm),
        l2_bytes=read("L2_cache_size", base.l2_bytes),
        memory_bytes=props.total_memory,
    )


@functools.cache
def _device_hardware(device) -> Hardware | None:
    """from_device of a CUDA ``device`` (its index, or the current device); None for other devices."""
    import torch

    if device.type != "cuda":
        return None
    return from_device(device.index if device.index is not None else torch.cuda.current_device())


def sm_registers(device) -> int | None:
    """The 32-bit registers of one SM of a CUDA ``device`` (from_device); None for other devices
    (Triton's interpreter: no limit)."""
    hardware = _device_hardware(device)
    return None if hardware is None else hardware.registers_per_sm


def block_shared_memory(device) -> int | None:
    """The opt-in shared memory of one block on a CUDA ``device`` (from_device); None for other
    devices (Triton's interpreter, the CUDA simulator: no limit)."""
    hardware = _device_hardware(device)
    return None if hardware is None else hardware.shared_memory_per_block
