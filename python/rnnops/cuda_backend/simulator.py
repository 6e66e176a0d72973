"""Build and load the simulator extension: the project's CUDA kernels compiled by the host C++
compiler against csrc/sim, taking CPU tensors (torch.utils.cpp_extension, ninja; cached under
TORCH_EXTENSIONS_DIR). ``asan=True`` builds a separate copy with AddressSanitizer, which only
loads into a process started with libasan preloaded (see :func:`asan_environment`)."""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from pathlib import Path

import rnnops


def csrc_dir() -> Path:
    """The CUDA sources: rnnops/csrc in an installed wheel, the repository's csrc/ otherwise."""
    package = Path(rnnops.__file__).resolve().parent
    for candidate in (package / "csrc", package.parents[1] / "csrc"):
        if (candidate / "common" / "runtime.h").exists():
            return candidate
    raise FileNotFoundError("rnnops' CUDA sources (csrc/) are missing from this installation")


def _digest(root: Path) -> str:
    """A hash of every CUDA source: part of the build flags, so that editing a header rebuilds."""
    files = sorted(p for p in root.rglob("*") if p.suffix in (".h", ".cuh", ".cu", ".cpp"))
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def load(asan: bool = False):
    from torch.utils import cpp_extension

    root = csrc_dir()
    flags = ["-std=c++20", "-O1" if asan else "-O2", "-pthread", f"-DRNNOPS_CSRC_DIGEST={_digest(root)}"]
    ldflags = ["-pthread"]
    if asan:
        # (RNNOPS_SIM_ASAN: only the instantiations the AddressSanitizer test runs, csrc/bindings/sim_ext.cpp)
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-DRNNOPS_SIM_ASAN"]
        ldflags += ["-fsanitize=address"]
    return cpp_extension.load(
        name="rnnops_sim_asan" if asan else "rnnops_sim",
        sources=[str(root / "bindings" / "sim_ext.cpp")],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(root)],
        verbose=os.environ.get("RNNOPS_VERBOSE_BUILD", "0") == "1",
        with_cuda=False,
    )


def asan_environment() -> dict[str, str]:
    """Environment for a child process that loads the AddressSanitizer build."""
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
                RNNOPS_CUDA_SIMULATOR="1", RNNOPS_CUDA_SIMULATOR_ASAN="1")
