"""ptxas' verbose report (``-v``) parsed per kernel: registers, spills, stack, shared memory;
and which tensor-core instructions a compiled kernel's machine code (SASS) uses. Shared by the
CUDA and the Triton compile checks."""
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
    tensor_cores: str = ""  # tensor_core_path of its SASS where it was read, else ""


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


_MMA_OPCODES = (("HGMMA", "wgmma"), ("HMMA", "mma"))


def tensor_core_path(sass: str) -> str:
    """"wgmma" if the SASS (cuobjdump -sass) issues warpgroup matrix products (HGMMA: Hopper's
    fastest path, sm_90a), else "mma" for warp-level ones (HMMA: mma.sync, the only kind before
    Hopper and a slower path on it), else "none" (CUDA cores only)."""
    for opcode, path in _MMA_OPCODES:
        if re.search(rf"\b{opcode}\.", sass):
            return path
    return "none"
