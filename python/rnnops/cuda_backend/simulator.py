"""Build and load the simulator extension: the project's CUDA kernels compiled by the host C++
compiler against csrc/sim, taking CPU tensors (torch.utils.cpp_extension, ninja; cached under
TORCH_EXTENSIONS_DIR). ``load("address")`` and ``load("thread")`` build separate copies with
AddressSanitizer (out-of-bounds and use-after-free accesses) or ThreadSanitizer (shared-memory races:
a CUDA thread is a CPU thread and the simulator's barriers are std::barrier, so a read of another
thread's write with no barrier between is reported even where the run happened to get it right),
which load only into a process started with the sanitizer's runtime preloaded (see
:func:`sanitizer_environment`)."""
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


# the extension's translation units (csrc/bindings), compiled side by side by ninja
SOURCES = ("sim_ext.cpp", "sim_scan.cpp", "sim_rnn_forward.cpp", "sim_rnn_backward.cpp")
# sanitizer -> (its runtime library, the environment variable of its options, the options: stop at
# the first report with a non-zero exit status)
SANITIZERS = {
    "address": ("libasan.so", "ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1"),
    "thread": ("libtsan.so", "TSAN_OPTIONS", "halt_on_error=1:report_signal_unsafe=0"),
}
# "address" or "thread" (the sanitizer tests' instantiations), "thread:every" (all of them)
SANITIZER_ENV = "RNNOPS_CUDA_SIMULATOR_SANITIZER"


@functools.cache
def load(sanitizer: str | None = None, every_instantiation: bool = False):
    """The extension; a sanitizer's build instantiates only what tests/test_cuda_sim.py runs unless
    ``every_instantiation`` (bench/sim_racecheck.py: every simulator test under ThreadSanitizer)."""
    from torch.utils import cpp_extension

    root = csrc_dir()
    flags = ["-std=c++20", "-O1" if sanitizer else "-O2", "-pthread", f"-DRNNOPS_CSRC_DIGEST={_digest(root)}"]
    ldflags = ["-pthread"]
    if sanitizer:
        if sanitizer not in SANITIZERS:
            raise ValueError(f"sanitizer must be one of {sorted(SANITIZERS)}, got {sanitizer!r}")
        # (RNNOPS_SIM_SANITIZED: only the instantiations the sanitizer tests run, csrc/bindings/sim_ext.cpp)
        flags += [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer"]
        flags += [] if every_instantiation else ["-DRNNOPS_SIM_SANITIZED"]
        ldflags += [f"-fsanitize={sanitizer}"]
        # the runtime preloaded into this process is not for the compilers it starts (g++ crashes
        # under libtsan)
        os.environ.pop("LD_PRELOAD", None)
    return cpp_extension.load(
        name=f"rnnops_sim_{sanitizer}{'_every' if every_instantiation else ''}" if sanitizer else "rnnops_sim",
        sources=[str(root / "bindings" / name) for name in SOURCES],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(root)],
        verbose=os.environ.get("RNNOPS_VERBOSE_BUILD", "0") == "1",
        with_cuda=False,
    )


def load_from_environment():
    """The build this process's environment names (SANITIZER_ENV, as sanitizer_environment sets
    it; none: the plain build)."""
    sanitizer, _, scope = os.environ.get(SANITIZER_ENV, "").partition(":")
    return load(sanitizer or None, every_instantiation=scope == "every")


def sanitizer_environment(sanitizer: str, every_instantiation: bool = False) -> dict[str, str]:
    """Environment for a child process whose CUDA kernels run in ``sanitizer``'s build (start it
    as sys.executable, not through a shell script such as pyenv's shims: bash crashes under libtsan)."""
    library, options_variable, options = SANITIZERS[sanitizer]
    runtime = subprocess.run(["g++", f"-print-file-name={library}"], capture_output=True, text=True).stdout.strip()
    # libgomp is not built with ThreadSanitizer, which then sees torch's OpenMP-parallel ops (e.g. a
    # sum over more than its 32768-element grain: the fused cells' db) race on their own buffers;
    # the kernels' simulated threads synchronise through std::barrier, which it does see
    threads = {"OMP_NUM_THREADS": "1"} if sanitizer == "thread" else {}
    return dict(os.environ, LD_PRELOAD=runtime, **{options_variable: options}, RNNOPS_CUDA_SIMULATOR="1",
                **{SANITIZER_ENV: f"{sanitizer}:every" if every_instantiation else sanitizer}, **threads)
