"""Compile the CUDA kernels with nvcc for a real architecture and read ptxas' report: registers,
spills, stack, shared memory per kernel; and a kernel's innermost loop from its SASS. Used by
the tests: every default configuration, and every configuration the autotuner's spaces accept,
must compile for sm_80 and sm_90a without spills, and the scan's loop over state elements stays
within an instruction budget. :func:`scan_kernel` and :func:`rnn_kernel` name the kernel
templates' instantiations (also for NVRTC)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .._ptxas import KernelReport, parse_log
from .._sass import Loop, innermost_exponential_loop
from .simulator import csrc_dir


@dataclass(frozen=True)
class Instantiation:
    header: str  # relative to csrc/
    kernel: str  # e.g. "rnnops::scan::selective_scan_fwd<__nv_bfloat16, 4, 8, true>"


def scan_kernel(phase: str, ctype: str, warps: int, items: int, staged: bool = True) -> Instantiation:
    """selective_scan_fwd / _bwd (``phase`` "fwd" or "bwd") for element type ``ctype`` ("float",
    "__half", "__nv_bfloat16"), a tile of ``warps`` warps by ``items`` steps, and B and C staged
    in shared memory or read from global memory (rnnops.cuda_backend.selective_scan._rows_shared)."""
    return Instantiation("scan/selective_scan.cuh",
                         f"rnnops::scan::selective_scan_{phase}<{ctype}, {warps}, {items}, {str(staged).lower()}>")


def rnn_kernel(phase: str, ctype: str, cell: int, units: int) -> Instantiation:
    """rnn_fwd / rnn_bwd for element type ``ctype``, cell id (rnnops._fused_rnn.CELL_IDS) and
    ``units`` units of a head per block."""
    return Instantiation("rnn/rnn.cuh", f"rnnops::rnn::rnn_{phase}<{ctype}, {cell}, {units}>")


def nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)


def source(instantiations: list[Instantiation]) -> str:
    headers = sorted({i.header for i in instantiations})
    lines = [f'#include "{h}"' for h in headers] + ["void rnnops_instantiate() {"]
    lines += [f"  (void)&{i.kernel};" for i in instantiations] + ["}"]
    return "\n".join(lines) + "\n"


def _compile(instantiations: list[Instantiation], arch: str) -> tuple[str, bytes]:
    """(ptxas' verbose log, the cubin) for ``arch`` (e.g. "sm_80", "sm_90a"); raises RuntimeError
    with nvcc's output on a compile error."""
    compiler = nvcc()
    if compiler is None:
        raise FileNotFoundError("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        cu, cubin = Path(tmp) / "instantiate.cu", Path(tmp) / "out.cubin"
        cu.write_text(source(instantiations))
        result = subprocess.run([compiler, "-std=c++17", "-Werror", "all-warnings", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-I",
                                 str(csrc_dir()), "-o", str(cubin), str(cu)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed for {arch}:\n{result.stdout}\n{result.stderr}")
        return result.stdout + result.stderr, cubin.read_bytes()


def ptxas_reports(instantiations: list[Instantiation], arch: str) -> list[KernelReport]:
    """Compile for ``arch`` and parse ``-Xptxas -v``: one report per kernel."""
    return parse_log(_compile(instantiations, arch)[0])


def inner_loop(instantiation: Instantiation, arch: str) -> Loop:
    """The kernel's innermost loop that evaluates exponentials, from its SASS (rnnops._sass): for
    the selective scan, the loop over state elements, one iteration per n for ITEMS steps."""
    return innermost_exponential_loop(_compile([instantiation], arch)[1])
