"""ptxas' verbose report (``-v``) parsed per kernel: registers, spills, stack, shared memory;
which tensor-core instructions a kernel's PTX uses, and its sums across lanes that leave the
lanes disagreeing. Shared by the CUDA and the Triton compile checks."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelReport:
    name: str  # as ptxas names it (mangled for CUDA C++)
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int  # static shared memory for CUDA C++; Triton's (all dynamic) from its metadata
    threads: int = 0  # per program where the launch is known (Triton: num_warps * 32), else 0
    tensor_cores: str = ""  # tensor_core_path of its PTX where it was read, else ""
    lane_divergent_sums: int = 0  # lane_divergent_sums of its PTX where it was read, else 0
    # per iteration of its innermost loop with exponentials (rnnops._sass), where read: instructions,
    # exponentials (MUFU.EX2, about one per (step, channel, state element) in a scan), warp shuffles
    # (SHFL: sums across lanes) and block barriers (BAR: two per layout conversion through shared
    # memory in a Triton cell's step)
    loop_instructions: int = 0
    loop_exponentials: int = 0
    loop_shuffles: int = 0
    loop_barriers: int = 0


_FUNCTION = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_log(log: str) -> list[KernelReport]:
    """One report per kernel in the order ptxas printed them."""
    reports, current, stack = [], None, None
    for line in log.splitlines():
        if (m := _FUNCTION.search(line)):
            current = m.group(1)
        elif (m := _STACK.search(line)) and current:
            stack = tuple(int(x) for x in m.groups())
        elif (m := _USED.search(line)) and current and stack:
            reports.append(KernelReport(current, int(m.group(1)), stack[1], stack[2], stack[0], int(m.group(2) or 0)))
            current, stack = None, None
    return reports


_MMA_INSTRUCTIONS = (("wgmma.mma_async", "wgmma"), ("mma.sync", "mma"))


def tensor_core_path(ptx: str) -> str:
    """"wgmma" if the PTX issues warpgroup matrix products (``wgmma.mma_async``, assembled to
    HGMMA: Hopper's fastest path, sm_90a), else "mma" for warp-level ones (``mma.sync``, HMMA: the
    only kind before Hopper and a slower path on it), else "none" (CUDA cores only). ptxas keeps
    the kind the PTX names, so the PTX answers what disassembling the machine code would (and
    without the second per kernel that cuobjdump takes)."""
    for instruction, path in _MMA_INSTRUCTIONS:
        if instruction in ptx:
            return path
    return "none"


_BUTTERFLY = re.compile(r"shfl\.sync\.bfly\.b32\s+(%r\d+),")
_FMA = re.compile(r"fma\.rn\.f32\s+%r\d+, %r\d+, %r\d+, (%r\d+);")
_PRODUCT = re.compile(r"mul\.f32\s+(%r\d+),")  # no rounding mode: ptxas may fuse it into an add
_ADD = re.compile(r"add\.f32\s+%r\d+, (%r\d+), (%r\d+);")


def lane_divergent_sums(ptx: str) -> int:
    """Steps of a sum across lanes in Triton's PTX (float32 values in %r registers) that fuse a
    lane's own product into it: an FMA whose addend is a butterfly shuffle's result, or an add of
    a shuffle's result and a product ptxas may fuse (``mul.f32`` without a rounding mode). Each
    lane's own product enters unrounded and its partner's rounded, which is not symmetric, so
    the lanes end with different last bits of the same sum (Triton fuses a product into the add
    after it unless told not to). Lanes holding copies of a value that differ make its consumers
    depend on which copy they read, and their writes of it to shared memory race
    (compute-sanitizer racecheck reports each as an error)."""
    shuffled, products = set(_BUTTERFLY.findall(ptx)), set(_PRODUCT.findall(ptx))
    fused = sum(addend in shuffled for addend in _FMA.findall(ptx))
    return fused + sum((a in shuffled and b in products) or (b in shuffled and a in products)
                       for a, b in _ADD.findall(ptx))
