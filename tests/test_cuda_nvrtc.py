"""The NVRTC engine (rnnops.cuda_backend.nvrtc) without a GPU: cupy is replaced by a recorder, the
CUDA backend's host code runs on CPU tensors and its launches go to the NVRTC engine instead of
the simulator. Every launch is checked against the kernel's C++ signature parsed from csrc/:
argument count; each pointer parameter receives the tensor the engine was given under the same
name (so a swapped argument fails); structs by value whose numpy layout (size, offsets, field
widths) equals g++'s of the same struct; and the CUDA launch limits. The simulator tests
cover what the kernels compute; this covers the only code they do not run."""
import inspect
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch

from rnnops._fused_rnn import CELL_IDS
from rnnops.autotune import cache, kernels
from rnnops.cuda_backend import engines, nvrtc
from rnnops.cuda_backend import rnn as cuda_rnn
from rnnops.cuda_backend import selective_scan as cuda_scan
from rnnops.cuda_backend.simulator import csrc_dir
from test_triton_rnn import GATES
from test_triton_rnn import make_inputs as rnn_inputs
from test_triton_rnn import run as rnn_run
from test_triton_selective_scan import make_inputs as scan_inputs
from test_triton_selective_scan import scan


class _Function:
    """cupy's kernel call as of cupy 14: whether the launch is cooperative is the module's choice (a
    call that also passes enable_cooperative_groups raises there: "got multiple values"). As
    cupy 14's RawKernel it has no ``ptr``: its ``kernel`` (a Function) has the CUfunction handle
    (an H200 run of 2026-11-27 failed every split head on ``function.ptr``)."""

    def __init__(self, name, launches, cooperative):
        self.name, self.launches, self.cooperative, self.max_dynamic_shared_size_bytes = name, launches, cooperative, 0
        self.kernel = SimpleNamespace(ptr=self)  # (the handle: the stand-in itself, for the occupancy query to check)

    def __call__(self, grid, block, args, *, shared_mem=0):
        self.launches.append(SimpleNamespace(name=self.name, grid=grid, block=block, args=args, shared=shared_mem,
                                             cooperative=self.cooperative,
                                             shared_opt_in=self.max_dynamic_shared_size_bytes,
                                             stream=_Stream.entered[-1] if _Stream.entered else None))


class _Stream:
    """cupy 14's stream, made from a foreign one by the CUDA stream protocol (its ExternalStream
    is deprecated: the stand-in cupy has none); a launch records the stream it ran in."""
    entered: ClassVar[list[int]] = []

    def __init__(self, pointer):
        self.pointer = pointer

    @classmethod
    def from_external(cls, handle):
        version, pointer = handle.__cuda_stream__()
        assert version == 0, "the protocol's version 0: (0, handle)"
        return cls(pointer)

    def __enter__(self):
        _Stream.entered.append(self.pointer)
        return self

    def __exit__(self, *exc):
        _Stream.entered.pop()
        return False

    def synchronize(self):
        pass


@pytest.fixture
def launches(monkeypatch):
    """Launches recorded by a stand-in cupy, with the cuda backend's engine set to NVRTC for CPU tensors."""
    recorded, modules, calls = [], [], []

    class RawModule:
        def __init__(self, code, options, name_expressions, enable_cooperative_groups=False):
            self.code, self.options, self.names = code, options, name_expressions
            self.cooperative = enable_cooperative_groups
            modules.append(self)

        def get_function(self, name):
            assert name in self.names, f"{name} was not among the module's name expressions {self.names}"
            return _Function(name, recorded, self.cooperative)

    def occupancy(function, threads, shared):  # cuOccupancyMaxActiveBlocksPerMultiprocessor's stand-in
        occupancy_queries.append((function, threads, shared))
        return 1

    occupancy_queries = []
    driver = SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=occupancy)
    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace(RawModule=RawModule,
                                                             cuda=SimpleNamespace(Stream=_Stream, driver=driver)))
    monkeypatch.setenv(engines.SIMULATOR_ENV, "1")  # the backend takes CPU tensors
    monkeypatch.setattr(nvrtc, "_arch", lambda device: "sm_90a")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=7))
    for name in ("scan_forward", "scan_backward", "scan_forward_local", "scan_backward_local", "scan_compose",
                 "rnn_forward", "rnn_forward_fragments", "rnn_backward", "rnn_backward_fragments"):
        monkeypatch.setattr(nvrtc.Engine, name, _recording(getattr(nvrtc.Engine, name), calls))
    for module in (cuda_scan, cuda_rnn):
        monkeypatch.setattr(module, "engine", lambda device: nvrtc.Engine(device))
    nvrtc._module.cache_clear()
    yield SimpleNamespace(launches=recorded, modules=modules, calls=calls, occupancy_queries=occupancy_queries)
    nvrtc._module.cache_clear()


def _recording(method, calls):
    """``method`` of the engine, also recording its arguments by name."""
    def record(self, *args, **kwargs):
        calls.append(inspect.signature(method).bind(self, *args, **kwargs).arguments)
        return method(self, *args, **kwargs)
    return record


def _signature(header: str, function: str) -> list[str]:
    """The parameter declarations of the __global__ ``function`` in csrc/``header``."""
    text = (csrc_dir() / header).read_text()
    match = re.search(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?" + function + r"\s*\(([^)]*)\)", text)
    assert match, f"no __global__ {function} in {header}"
    return [" ".join(p.split()) for p in match.group(1).split(",")]


@pytest.fixture(scope="module")
def cpp_layouts():
    """g++'s (sizeof, {field: (offsetof, sizeof)}) of the structs the kernels take by value."""
    structs = {"rnnops::scan::Operand": ("b", "t", "d"),
               "rnnops::scan::BCOperand": ("data", "mode", "b", "t", "g", "n", "channels_per_group"),
               "rnnops::scan::ScanShape": ("Dm", "N", "packed", "has_d", "has_z", "has_bias", "softplus", "segments"),
               "rnnops::rnn::RNNShape": ("B", "T", "H", "D", "splits", "has_bias", "has_initial", "save_pre", "stage",
                                         "gradient_chunks", "pad_rows", "group_begin")}
    lines = ['#include <cstddef>', '#include <cstdio>', '#include "rnn/rnn.cuh"', '#include "scan/selective_scan.cuh"',
             "int main() {"]
    for struct, fields in structs.items():
        lines.append(f'  std::printf("{struct} %zu\\n", sizeof({struct}));')
        lines += [f'  std::printf("{struct}.{f} %zu %zu\\n", offsetof({struct}, {f}), sizeof({struct}::{f}));'
                  for f in fields]
    with tempfile.TemporaryDirectory() as tmp:
        cpp, binary = f"{tmp}/layout.cpp", f"{tmp}/layout"
        Path(cpp).write_text("\n".join(lines + ["}"]) + "\n")
        subprocess.run(["g++", "-std=c++20", "-pthread", "-I", str(csrc_dir()), cpp, "-o", binary], check=True,
                       capture_output=True)
        output = subprocess.run([binary], check=True, capture_output=True, text=True).stdout
    values = dict(line.split(" ", 1) for line in output.splitlines())
    return {struct.rsplit("::", 1)[1]: (int(values[struct]),
                                        {f: tuple(map(int, values[f"{struct}.{f}"].split())) for f in fields})
            for struct, fields in structs.items()}


def _address(tensor: torch.Tensor) -> int:
    return tensor.data_ptr() if tensor.numel() else 0


def check_launch(launch, call: dict, cpp_layouts) -> None:
    """The recorded ``launch`` (made by the engine ``call``) against its kernel's C++ signature and
    CUDA's launch limits."""
    header = "scan/selective_scan.cuh" if "::scan::" in launch.name else "rnn/rnn.cuh"
    function = re.match(r"rnnops::\w+::(\w+)<", launch.name).group(1)
    params = _signature(header, function)
    assert len(launch.args) == len(params), f"{launch.name}: {len(launch.args)} arguments for {len(params)} parameters"
    named = 0
    for arg, param in zip(launch.args, params):
        name = param.split()[-1].lstrip("*")
        if "*" in param:
            assert isinstance(arg, np.uint64), f"{launch.name}: {param} got {type(arg).__name__}"
            if isinstance(call.get(name), torch.Tensor):
                assert int(arg) == _address(call[name]), f"{launch.name}: {param} got another tensor"
                named += 1
            continue
        struct = param.removeprefix("const ").split()[0]
        if struct == "int":
            assert isinstance(arg, np.int32), f"{launch.name}: {param} got {type(arg).__name__}"
            continue
        size, fields = cpp_layouts[struct]
        assert isinstance(arg, np.void), f"{launch.name}: {param} got {type(arg).__name__}"
        assert arg.dtype.itemsize == size, f"{launch.name}: {struct} is {size} bytes, numpy packs {arg.dtype.itemsize}"
        packed = {f: (arg.dtype.fields[f][1], arg.dtype.fields[f][0].itemsize) for f in arg.dtype.names}
        assert packed == fields, f"{launch.name}: {struct} (offset, width) {packed} != g++'s {fields}"
        if struct == "BCOperand":  # B or C by its data pointer
            assert int(arg["data"]) == _address(call[name.removesuffix("m")]), f"{launch.name}: {param}"
    assert named == sum("*" in p for p in params), f"{launch.name}: a pointer parameter without a same-named tensor"
    assert 0 < np.prod(launch.block) <= 1024 and all(0 < g < 2**31 for g in launch.grid)
    assert launch.shared <= 48 * 1024 or launch.shared_opt_in >= launch.shared, "opt-in for > 48 KB of shared memory"


def _leaves(inputs: dict) -> dict:
    return {k: v.requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


@pytest.mark.parametrize("layout_B,layout_C,staged", [("grouped", "static", "false"), ("shared", "shared", "true")])
def test_selective_scan_launches_match_the_kernels(launches, cpp_layouts, layout_B, layout_C, staged):
    """B and C rows are staged in shared memory where both are the same for all of a block's 32
    channels (static ones are per channel)."""
    x = _leaves(scan_inputs(layout_B=layout_B, layout_C=layout_C))
    out = scan("cuda", **x)
    config = cuda_scan.DEFAULT_CONFIG
    assert [launch.name for launch in launches.launches] == [
        f"rnnops::scan::selective_scan_fwd<float, {config.warps}, {config.items}, {staged}>"]
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert [launch.name for launch in launches.launches][1:] == [
        f"rnnops::scan::selective_scan_bwd<float, {config.warps}, {config.items}, {staged}>"]
    for launch, call in zip(launches.launches, launches.calls, strict=True):
        check_launch(launch, call, cpp_layouts)
    assert {launch.stream for launch in launches.launches} == {7}, "on torch's current stream"
    module = launches.modules[0]
    assert f"-I{csrc_dir()}" in module.options and "--gpu-architecture=sm_90a" in module.options


@pytest.mark.parametrize("layout_B,layout_C,staged", [("grouped", "static", "false"), ("shared", "shared", "true")])
def test_selective_scan_segment_launches_match_the_kernels(launches, cpp_layouts, monkeypatch, layout_B, layout_C,
                                                           staged):
    """In segments (ScanConfig.segments): each direction's LOCAL pass over the segments, their
    composition, then the main kernel over the segments (T = 23 in 8-step chunks: 3 segments)."""
    monkeypatch.setattr(cuda_scan, "DEFAULT_CONFIG", cuda_scan.ScanConfig(2, 4, segments=4))
    x = _leaves(scan_inputs(layout_B=layout_B, layout_C=layout_C))
    out = scan("cuda", **x)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    local = "rnnops::scan::selective_scan_{}_local<float, " + staged + ">"
    assert [launch.name for launch in launches.launches] == [
        local.format("fwd"), "rnnops::scan::selective_scan_compose<false>",
        f"rnnops::scan::selective_scan_fwd<float, 2, 4, {staged}>",
        local.format("bwd"), "rnnops::scan::selective_scan_compose<true>",
        f"rnnops::scan::selective_scan_bwd<float, 2, 4, {staged}>"]
    for launch, call in zip(launches.launches, launches.calls, strict=True):
        check_launch(launch, call, cpp_layouts)
    assert [launch.grid[1] for launch in launches.launches] == [2 * 3, 2, 2 * 3] * 2  # (B 2)


@pytest.mark.parametrize("cell", ["lstm", "gru", "slstm", "elman"])
def test_rnn_launches_match_the_kernels(launches, cpp_layouts, cell):
    x = _leaves(rnn_inputs(cell, T=3, H=2, D=80))
    out = rnn_run(cell)("cuda", **x)
    out[0].sum().backward()
    phases = [re.match(r"rnnops::rnn::rnn_(\w+)<", launch.name).group(1) for launch in launches.launches]
    assert phases == ["fwd", "bwd"], phases
    assert any(launch.cooperative for launch in launches.launches), "D=80 splits heads over blocks: a grid barrier"
    for launch, call in zip(launches.launches, launches.calls, strict=True):
        check_launch(launch, call, cpp_layouts)


@pytest.mark.parametrize("cell", ["lstm", "gru", "slstm", "elman"])
def test_fragment_kernel_launches_match_the_kernels(launches, cpp_layouts, cell):
    """RNNConfig.forward_fragments and backward_fragments: a block a (head, batch tile), D / 8 warps;
    forward, two padded h buffers; backward, R^T staged, then two padded gate-gradient buffers."""
    x = _leaves(rnn_inputs(cell, B=20, T=3, H=2, D=48, dtype=torch.bfloat16))
    bucket = kernels.bucket("rnn", kernels.rnn_shape(x["x_gates"], cell), torch.bfloat16)
    with cache.override("rnn", "cuda", bucket, {"units": 64, "threads": 128, "forward_fragments": 1,
                                                "backward_fragments": 1}):
        out = rnn_run(cell, torch.bfloat16)("cuda", **x)
        out[0].sum().backward()
    forward, backward = launches.launches
    for launch, phase in ((forward, "fwd"), (backward, "bwd")):
        assert launch.name == f"rnnops::rnn::rnn_{phase}_fragments<__nv_bfloat16, {CELL_IDS[cell]}, 4>"
        assert launch.grid == (2 * 2, 1, 1) and launch.block == (4 * 48,)
    assert forward.shared == 2 * 16 * (2 * 48 + 16)
    assert backward.shared == 48 * (GATES[cell] * 48 * 2 + 16)
    for launch, call in zip(launches.launches, launches.calls, strict=True):
        check_launch(launch, call, cpp_layouts)


def test_cupy_before_14_wraps_the_stream_in_external_stream():
    cupy = SimpleNamespace(cuda=SimpleNamespace(ExternalStream=lambda pointer: ("ExternalStream", pointer)))
    assert nvrtc._cupy_stream(cupy, 7) == ("ExternalStream", 7)


def test_module_code_carries_a_digest_of_the_sources(tmp_path, monkeypatch):
    """cupy caches compiled modules on disk keyed by their code text, which only includes the
    headers: the code carries a digest of csrc/, so an edited header compiles again."""
    shutil.copytree(csrc_dir(), tmp_path / "csrc")
    monkeypatch.setattr(nvrtc, "csrc_dir", lambda: tmp_path / "csrc")
    nvrtc.sources_digest.cache_clear()
    before = nvrtc.sources_digest()
    header = tmp_path / "csrc" / "rnn" / "rnn.cuh"
    header.write_text(header.read_text() + "\n// edited\n")
    nvrtc.sources_digest.cache_clear()
    try:
        assert nvrtc.sources_digest() != before
    finally:
        nvrtc.sources_digest.cache_clear()


def test_rnn_co_resident_blocks_asks_the_driver_for_the_launched_function(launches, monkeypatch):
    """The blocks a cooperative launch may have: the driver's occupancy for the function the launch
    uses (its cooperative module, the shared memory opted in) at the launch's threads and shared
    bytes, times the SMs."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    engine = nvrtc.Engine(torch.device("cuda"))
    for _ in range(2):  # (asked once)
        assert engine.rnn_co_resident_blocks("bwd", torch.bfloat16, 0, 16, 256, 200_000) == 132
    ((function, threads, shared),) = launches.occupancy_queries
    assert function.name == "rnnops::rnn::rnn_bwd<__nv_bfloat16, 0, 16>" and function.cooperative
    assert function.max_dynamic_shared_size_bytes == shared == 200_000 and threads == 256


def test_an_engine_finds_each_function_once_and_opts_in_only_to_more_shared_memory(launches, monkeypatch):
    """Per launch the engine looked its function up (a driver call), set its shared-memory opt-in
    (another) and wrapped torch's stream anew; one engine per device now keeps the function with
    the opt-in it has and the stream's wrapper, and asks the driver again only for more shared memory."""
    import cupy  # the fixture's stand-in

    found, wrapped = [], []
    get_function, from_external = cupy.RawModule.get_function, _Stream.from_external
    monkeypatch.setattr(cupy.RawModule, "get_function", lambda self, name: found.append(name) or get_function(self, name))
    monkeypatch.setattr(_Stream, "from_external", classmethod(lambda cls, handle: wrapped.append(handle) or
                                                              from_external.__func__(cls, handle)))
    engine = nvrtc.Engine(torch.device("cuda"))
    instance = nvrtc.scan_kernel("bwd", "__nv_bfloat16", 4, 8, True)
    for shared in (60_000, 50_000, 90_000, 20_000):
        engine._launch(instance, (1, 1), (128,), shared, ())
    assert found == [instance.kernel] and len(wrapped) == 1
    assert [launch.shared_opt_in for launch in launches.launches] == [60_000, 60_000, 90_000, 90_000]
