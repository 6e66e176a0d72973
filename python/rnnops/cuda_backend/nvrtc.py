"""Run the CUDA kernels on a GPU: NVRTC through cupy (imported lazily), one compiled module per
(kernel family, instantiations, architecture), cached by cupy on disk, launched on torch's
current stream. Exposes the same functions as the simulator extension."""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .compile_check import Instantiation, rnn_fragments_kernel, rnn_kernel, scan_kernel, scan_segment_kernel
from .simulator import csrc_dir

_DTYPE_NAMES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


def _cupy():
    try:
        import cupy
    except ImportError as error:
        raise RuntimeError("the cuda backend needs cupy (pip install 'rnnops[cuda]')") from error
    return cupy


@functools.cache
def toolkit_include_dir() -> Path:
    """The CUDA toolkit's include folder, for the headers that NVRTC's own include path may lack.

    CUDA 13's pip wheels ship ``mma.h`` without the ``crt/mma.h`` it includes, and cupy compiles
    against those wheels when they are installed; the toolkit (``$CUDA_HOME``, ``$CUDA_PATH``, the
    ``nvcc`` on ``PATH`` or ``/usr/local/cuda``) has the whole set."""
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(nvcc).resolve().parent.parent) if nvcc else None, "/usr/local/cuda"]
    for root in filter(None, roots):
        include = Path(root) / "include"
        if (include / "crt" / "mma.h").is_file():
            return include
    raise RuntimeError("the cuda backend needs the CUDA toolkit headers (include/crt/mma.h) for NVRTC: "
                       "install the CUDA toolkit or set CUDA_HOME to it")


@functools.cache
def sources_digest() -> str:
    """A digest of every CUDA source under csrc/: part of each module's code, so that cupy's disk
    cache (keyed by the code text, which only includes the headers) compiles again when they change."""
    digest = hashlib.sha256()
    for path in sorted(csrc_dir().rglob("*")):
        if path.suffix in (".h", ".cuh"):
            digest.update(path.relative_to(csrc_dir()).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _module(header: str, names: tuple[str, ...], arch: str, cooperative: bool):
    """The compiled module; ``cooperative`` modules launch their kernels with cudaLaunchCooperativeKernel
    (cupy takes that choice per module, not per launch)."""
    cupy = _cupy()
    code = f'// rnnops csrc {sources_digest()}\n#include "{header}"\n'
    return cupy.RawModule(code=code, options=compile_options(arch), name_expressions=names,
                          enable_cooperative_groups=cooperative)


def compile_options(arch: str) -> tuple[str, ...]:
    """NVRTC's options for the kernels (``arch``: e.g. "sm_90a"); compile_check.nvrtc_compile uses
    the same."""
    return ("-std=c++17", f"-I{csrc_dir()}", f"-I{toolkit_include_dir()}", f"--gpu-architecture={arch}")


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if major == 9 else "")


def _pointer(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr() if t.numel() else 0)


# the kernels' by-value struct arguments, as numpy (C-aligned) record types: csrc's Operand,
# BCOperand, ScanShape and the cells' shape (field order as there)
_OPERAND = np.dtype([("b", "<i8"), ("t", "<i8"), ("d", "<i8")], align=True)
_BC_OPERAND = np.dtype([("data", "<u8"), ("mode", "<i4"), ("b", "<i8"), ("t", "<i8"), ("g", "<i8"), ("n", "<i8"),
                        ("channels_per_group", "<i4")], align=True)
_SCAN_SHAPE = np.dtype([(name, "<i4") for name in ("Dm", "N", "packed", "has_d", "has_z", "has_bias", "softplus",
                                                   "segments")], align=True)
_RNN_SHAPE = np.dtype([(name, "<i4") for name in ("B", "T", "H", "D", "splits", "has_bias", "has_initial", "save_pre",
                                                  "stage", "gradient_chunks", "pad_rows", "group_begin")], align=True)


def _struct(dtype: np.dtype, values: tuple):
    """A by-value kernel argument: ``values`` as a C struct of record type ``dtype``."""
    return np.array(values, dtype=dtype)[()]


class _StreamHandle:
    """A CUDA stream in the CUDA stream protocol (``__cuda_stream__``: version 0, the handle)."""

    def __init__(self, pointer: int):
        self.pointer = pointer

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.pointer


def _cupy_stream(cupy, pointer: int):
    """cupy's view of the CUDA stream ``pointer`` (torch's current stream), which cupy neither owns
    nor destroys: ``Stream.from_external`` where cupy has it (14 and later, which deprecate
    ExternalStream), else ``ExternalStream``."""
    from_external = getattr(getattr(cupy.cuda, "Stream", None), "from_external", None)
    if from_external is None:
        return cupy.cuda.ExternalStream(pointer)
    return from_external(_StreamHandle(pointer))


class Engine:
    """The launches on one device (``engine(device)`` keeps one per device). What a launch needs
    besides its arguments is looked up once and kept: each kernel's function (a driver call to
    find it) with the dynamic shared memory it was allowed so far (a driver call to allow more:
    only when a launch needs more than before), and cupy's wrapper of each torch stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.arch = _arch(device)
        self._co_resident: dict[tuple, int] = {}  # rnn_co_resident_blocks' answers
        self._functions: dict[tuple[Instantiation, bool], list] = {}  # -> [function, shared bytes allowed]
        self._streams: dict[int, object] = {}  # torch's stream handle -> cupy's view of it

    def _function(self, instance: Instantiation, shared_bytes: int, cooperative: bool):
        entry = self._functions.get((instance, cooperative))
        if entry is None:
            module = _module(instance.header, (instance.kernel,), self.arch, cooperative)
            entry = self._functions[instance, cooperative] = [module.get_function(instance.kernel), 48 * 1024]
        if shared_bytes > entry[1]:  # above 48 KB a block needs the function's opt-in (an attribute, kept)
            entry[0].max_dynamic_shared_size_bytes = entry[1] = shared_bytes
        return entry[0]

    def _stream(self, cupy):
        pointer = torch.cuda.current_stream(self.device).cuda_stream
        if pointer not in self._streams:
            self._streams[pointer] = _cupy_stream(cupy, pointer)
        return self._streams[pointer]

    def _launch(self, instance: Instantiation, grid, block, shared_bytes: int, args, cooperative: bool = False):
        cupy = _cupy()
        kernel = instance.kernel
        function = self._function(instance, shared_bytes, cooperative)
        stream = self._stream(cupy)
        try:
            with stream:
                function(tuple(grid), tuple(block), args, shared_mem=shared_bytes)
            if os.environ.get("RNNOPS_DEBUG", "0") not in ("", "0"):
                stream.synchronize()
        except Exception as error:
            raise RuntimeError(f"CUDA kernel {kernel} (grid {grid}, block {block}) failed: {error}") from error

    # ------------------------------------------------------------ selective scan

    def _scan_args(self, strides, b_layout, B, c_layout, C, shape):
        ops = [_struct(_OPERAND, tuple(strides[3 * k: 3 * k + 3])) for k in range(len(strides) // 3)]
        bcs = [_struct(_BC_OPERAND, (int(_pointer(M)), *layout)) for M, layout in ((B, b_layout), (C, c_layout))]
        return ops, bcs, _struct(_SCAN_SHAPE, tuple(shape))

    def scan_forward(self, u, delta, A, B, C, D, z, delta_bias, out, chunk_states, initial_state, final_state,
                     cu_seqlens, chunk_offsets, strides, b_layout, c_layout, shape, launch_shape):
        grid_x, grid_y, warps, items, shared, staged = launch_shape
        ops, (bm, cm), scan_shape = self._scan_args(strides, b_layout, B, c_layout, C, shape)
        args = (_pointer(u), ops[0], _pointer(delta), ops[1], _pointer(A), bm, cm, _pointer(D), _pointer(z), ops[2],
                _pointer(delta_bias), _pointer(out), ops[3], _pointer(chunk_states), _pointer(initial_state),
                _pointer(final_state), _pointer(cu_seqlens), _pointer(chunk_offsets), scan_shape)
        self._launch(scan_kernel("fwd", _DTYPE_NAMES[u.dtype], warps, items, bool(staged)), (grid_x, grid_y),
                     (32 * warps,), shared, args)

    def scan_backward(self, u, delta, A, B, C, D, z, delta_bias, d_out, chunk_states, d_final, d_initial, du, d_delta,
                      dz, dA, dB, dC, dD, d_bias, cu_seqlens, chunk_offsets, strides, b_layout, c_layout, shape,
                      launch_shape):
        grid_x, grid_y, warps, items, shared, staged = launch_shape
        ops, (bm, cm), scan_shape = self._scan_args(strides, b_layout, B, c_layout, C, shape)
        args = (_pointer(u), ops[0], _pointer(delta), ops[1], _pointer(A), bm, cm, _pointer(D), _pointer(z), ops[2],
                _pointer(delta_bias), _pointer(d_out), ops[3], _pointer(chunk_states), _pointer(d_final),
                _pointer(d_initial), _pointer(du), _pointer(d_delta), _pointer(dz), ops[4], _pointer(dA), _pointer(dB),
                _pointer(dC), _pointer(dD), _pointer(d_bias), _pointer(cu_seqlens), _pointer(chunk_offsets), scan_shape)
        self._launch(scan_kernel("bwd", _DTYPE_NAMES[u.dtype], warps, items, bool(staged)), (grid_x, grid_y),
                     (32 * warps,), shared, args)

    def scan_forward_local(self, u, delta, A, B, delta_bias, segment_states, dt_sums, cu_seqlens, chunk_offsets,
                           strides, b_layout, shape, launch_shape):
        grid_x, grid_y, chunk, shared, staged = launch_shape
        ops, (bm, _), scan_shape = self._scan_args(strides, b_layout, B, b_layout, B, shape)
        args = (_pointer(u), ops[0], _pointer(delta), ops[1], _pointer(A), bm, _pointer(delta_bias),
                _pointer(segment_states), _pointer(dt_sums), _pointer(cu_seqlens), _pointer(chunk_offsets), scan_shape,
                np.int32(chunk))
        self._launch(scan_segment_kernel("fwd_local", _DTYPE_NAMES[u.dtype], bool(staged)), (grid_x, grid_y), (32,),
                     shared, args)

    def scan_backward_local(self, delta, z, d_out, A, C, delta_bias, segment_grads, dt_sums, cu_seqlens,
                            chunk_offsets, strides, c_layout, shape, launch_shape):
        grid_x, grid_y, chunk, shared, staged = launch_shape
        ops, (cm, _), scan_shape = self._scan_args(strides, c_layout, C, c_layout, C, shape)
        args = (_pointer(delta), ops[0], _pointer(z), ops[1], _pointer(d_out), ops[2], _pointer(A), cm,
                _pointer(delta_bias), _pointer(segment_grads), _pointer(dt_sums), _pointer(cu_seqlens),
                _pointer(chunk_offsets), scan_shape, np.int32(chunk))
        self._launch(scan_segment_kernel("bwd_local", _DTYPE_NAMES[delta.dtype], bool(staged)), (grid_x, grid_y),
                     (32,), shared, args)

    def scan_compose(self, values, dt_sums, A, entering, leaving, sizes):
        channels, N, segments, reverse, sequences = sizes
        args = (_pointer(values), _pointer(dt_sums), _pointer(A), _pointer(entering), _pointer(leaving),
                np.int32(channels), np.int32(N), np.int32(segments))
        self._launch(scan_segment_kernel("compose", reverse=bool(reverse)), (-(-channels * N // 128), sequences),
                     (128,), 0, args)

    # ------------------------------------------------------------ fused recurrent cells

    def _rnn(self, kernel, args, shape, launch_shape):
        grid_x, grid_y, grid_z, threads, shared = launch_shape
        rnn_shape = _struct(_RNN_SHAPE, tuple(shape))
        self._launch(kernel, (grid_x, grid_y, grid_z), (threads,), shared, (*args, rnn_shape), cooperative=grid_z > 1)

    def rnn_co_resident_blocks(self, phase, dtype, cell, units, threads, shared) -> int:
        """Blocks of an rnn kernel that can be resident at once on this GPU (its occupancy at
        ``threads`` and ``shared`` bytes, times the SMs): no cooperative launch may have more.
        Asked before every launch of a split head, so kept per engine."""
        key = (phase, dtype, cell, units, threads, shared)
        if key not in self._co_resident:
            function = self._function(rnn_kernel(phase, _DTYPE_NAMES[dtype], cell, units), shared, True)
            # get_function gives a RawKernel (cupy 14) or a Function (older); the driver wants the CUfunction
            pointer = getattr(function, "kernel", function).ptr
            per_sm = _cupy().cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(pointer, threads, shared)
            self._co_resident[key] = per_sm * torch.cuda.get_device_properties(self.device).multi_processor_count
        return self._co_resident[key]

    def rnn_forward(self, x, R, bias, initial, states, pre, h_seq, shape, cell, units, launch_shape):
        args = tuple(_pointer(t) for t in (x, R, bias, initial, states, pre, h_seq))
        self._rnn(rnn_kernel("fwd", _DTYPE_NAMES[x.dtype], cell, units), args, shape, launch_shape)

    def rnn_forward_fragments(self, x, R, bias, initial, states, pre, h_seq, shape, cell, k_steps, launch_shape):
        args = tuple(_pointer(t) for t in (x, R, bias, initial, states, pre, h_seq))
        self._rnn(rnn_fragments_kernel("fwd", _DTYPE_NAMES[x.dtype], cell, k_steps), args, shape, launch_shape)

    def rnn_backward(self, R, initial, states, pre, d_h_seq, carry, dx, drec_n, shape, cell, units, launch_shape):
        args = tuple(_pointer(t) for t in (R, initial, states, pre, d_h_seq, carry, dx, drec_n))
        self._rnn(rnn_kernel("bwd", _DTYPE_NAMES[R.dtype], cell, units), args, shape, launch_shape)

    def rnn_backward_fragments(self, R, initial, states, pre, d_h_seq, carry, dx, drec_n, shape, cell, k_steps,
                               launch_shape):
        args = tuple(_pointer(t) for t in (R, initial, states, pre, d_h_seq, carry, dx, drec_n))
        self._rnn(rnn_fragments_kernel("bwd", _DTYPE_NAMES[R.dtype], cell, k_steps), args, shape, launch_shape)


@functools.cache
def engine(device: torch.device) -> Engine:
    return Engine(device)
