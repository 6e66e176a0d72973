"""Compile the CUDA kernels with nvcc for a real architecture and read ptxas' report: registers,
spills, stack, shared memory per kernel; and a kernel's innermost loop from its SASS. Used by
the tests: every default configuration, and every configuration the autotuner's spaces accept,
must compile for sm_80 and sm_90a without spills, and the scan's loop over state elements stays
within an instruction budget. :func:`scan_kernel` and :func:`rnn_kernel` name the kernel
templates' instantiations (also for NVRTC)."""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .._ptxas import KernelReport, parse_log
from .._sass import ROUND_BREAKS, Loop, innermost_exponential_loop, load_rounds, longest_mma_chain
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


def scan_segment_kernel(phase: str, ctype: str | None = None, staged: bool = True,
                        reverse: bool = False) -> Instantiation:
    """The selective scan's segment kernels: selective_scan_fwd_local / _bwd_local (``phase``
    "fwd_local", "bwd_local") for element type ``ctype``, their rows staged in shared memory or
    read per lane; or selective_scan_compose ("compose"), the segments in order or ``reverse``."""
    arguments = str(reverse).lower() if phase == "compose" else f"{ctype}, {str(staged).lower()}"
    return Instantiation("scan/selective_scan.cuh", f"rnnops::scan::selective_scan_{phase}<{arguments}>")


def rnn_kernel(phase: str, ctype: str, cell: int, units: int) -> Instantiation:
    """rnn_fwd / rnn_bwd for element type ``ctype``, cell id (rnnops._fused_rnn.CELL_IDS) and
    ``units`` units of a head per block."""
    return Instantiation("rnn/rnn.cuh", f"rnnops::rnn::rnn_{phase}<{ctype}, {cell}, {units}>")


def rnn_fragments_kernel(phase: str, ctype: str, cell: int, k_steps: int) -> Instantiation:
    """rnn_fwd_fragments / rnn_bwd_fragments for element type ``ctype`` (a half type), cell id and a
    head of up to 16 ``k_steps`` units (rnnops.cuda_backend.rnn.FRAGMENT_K_STEPS)."""
    return Instantiation("rnn/rnn.cuh", f"rnnops::rnn::rnn_{phase}_fragments<{ctype}, {cell}, {k_steps}>")


def nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)


def source(instantiations: list[Instantiation]) -> str:
    headers = sorted({i.header for i in instantiations})
    lines = [f'#include "{h}"' for h in headers] + ["void rnnops_instantiate() {"]
    lines += [f"  (void)&{i.kernel};" for i in instantiations] + ["}"]
    return "\n".join(lines) + "\n"


def _compile(instantiations: list[Instantiation], arch: str) -> tuple[str, bytes]:
    """(ptxas' verbose log, the cubin) for ``arch`` (e.g. "sm_80", "sm_90a"); raises RuntimeError
    with nvcc's output on a compile error. Kept per process (the tests ask several questions of
    one kernel's SASS; the sources do not change while a process runs)."""
    return _compiled(tuple(instantiations), arch)


@functools.lru_cache(maxsize=64)
def _compiled(instantiations: tuple[Instantiation, ...], arch: str) -> tuple[str, bytes]:
    compiler = nvcc()
    if compiler is None:
        raise FileNotFoundError("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        cu, cubin = Path(tmp) / "instantiate.cu", Path(tmp) / "out.cubin"
        cu.write_text(source(instantiations))
        result = subprocess.run([compiler, "-std=c++17", "-Werror", "all-warnings", "-cubin", f"-arch={arch}",
                                 "-Xptxas", "-v", "-I", str(csrc_dir()), "-o", str(cubin), str(cu)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed for {arch}:\n{result.stdout}\n{result.stderr}")
        return result.stdout + result.stderr, cubin.read_bytes()


def libnvrtc() -> str | None:
    """A libnvrtc to load, the library that compiles the kernels on a GPU (through cupy):
    ``$RNNOPS_LIBNVRTC``, the CUDA toolkit's (beside nvcc), or the nvidia-cuda-nvrtc wheel's
    (``nvidia/cu13/lib`` or ``nvidia/cuda_nvrtc/lib`` on ``sys.path``); None where none is found."""
    if os.environ.get("RNNOPS_LIBNVRTC"):
        return os.environ["RNNOPS_LIBNVRTC"]
    compiler = nvcc()
    folders = [Path(compiler).resolve().parent.parent / "lib64"] if compiler else []
    folders += [Path(p) / "nvidia" / sub / "lib" for p in sys.path if p for sub in ("cu13", "cuda_nvrtc")]
    return next((str(lib) for folder in folders if folder.is_dir() for lib in sorted(folder.glob("libnvrtc.so*"))
                 if "builtins" not in lib.name and ".alt." not in lib.name), None)


def nvrtc_compile(instantiations: list[Instantiation], arch: str) -> None:
    """Compile ``instantiations`` (one header) with NVRTC as the GPU engine does (the module's code,
    its options, the kernels as name expressions), without a GPU; raises RuntimeError with NVRTC's
    log on a compile error. NVRTC refuses some C++ that nvcc accepts with a warning (a lambda
    capturing structured bindings, C++20: the scan backward on the GPU, 2026-11-27). cupy adds
    the include folder of its own copy of libcu++ (cuda/std/...); here the toolkit's stands in."""
    from .nvrtc import compile_options, toolkit_include_dir

    (header,) = {i.header for i in instantiations}
    path = libnvrtc()
    if path is None:
        raise FileNotFoundError("libnvrtc not found (set RNNOPS_LIBNVRTC)")
    for builtins in sorted(Path(path).parent.glob("libnvrtc-builtins.so*")):  # which it opens by name
        if ".alt." not in builtins.name:
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(path)
    program = ctypes.c_void_p()
    code = f'#include "{header}"\n'.encode()
    _nvrtc_check(lib, lib.nvrtcCreateProgram(ctypes.byref(program), code, b"rnnops.cu", 0, None, None), program)
    try:
        for instance in instantiations:
            _nvrtc_check(lib, lib.nvrtcAddNameExpression(program, instance.kernel.encode()), program)
        options = [option.encode() for option in compile_options(arch) + (f"-I{toolkit_include_dir() / 'cccl'}",)]
        _nvrtc_check(lib, lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options)),
                     program)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def _nvrtc_check(lib, status: int, program) -> None:
    if status == 0:
        return
    size = ctypes.c_size_t(0)
    log = ""
    if program and lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)) == 0 and size.value > 1:
        buffer = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(program, buffer)
        log = buffer.value.decode(errors="replace")
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    raise RuntimeError(f"NVRTC: {lib.nvrtcGetErrorString(status).decode()}\n{log}")


def ptxas_reports(instantiations: list[Instantiation], arch: str) -> list[KernelReport]:
    """Compile for ``arch`` and parse ``-Xptxas -v``: one report per kernel."""
    return parse_log(_compile(instantiations, arch)[0])


def inner_loop(instantiation: Instantiation, arch: str) -> Loop:
    """The kernel's innermost loop that evaluates exponentials, from its SASS (rnnops._sass): for
    the selective scan, the loop over state elements, one iteration per n for ITEMS steps."""
    return innermost_exponential_loop(_compile([instantiation], arch)[1])


def sass_load_rounds(instantiation: Instantiation, arch: str, load: str | tuple[str, ...],
                     breaks: tuple[str, ...] = ROUND_BREAKS) -> list[int]:
    """The kernel's rounds of the loads whose opcode starts with ``load`` (rnnops._sass.load_rounds,
    ``breaks`` ending a round): "LDG.E.U16" for a half-type kernel's activations (how many memory
    latencies its phases wait for them), "LDS" for shared memory."""
    return load_rounds(_compile([instantiation], arch)[1], load, breaks)


def mma_chain(instantiation: Instantiation, arch: str) -> int:
    """The kernel's longest chain of dependent tensor-core products (rnnops._sass.longest_mma_chain)."""
    return longest_mma_chain(_compile([instantiation], arch)[1])
