#!/usr/bin/env bash
# Builds mamba_ssm's selective-scan CUDA extension for the lent GPU machines (sm_90: H100, H200)
# here, on a machine without a GPU, and packs it with the mamba_ssm Python modules that
# selective_scan_fn and Mamba-2's mamba_chunk_scan_combined (Triton) need as a wheel in .whl/,
# which bench/gpu_suite.sh installs like the other peers. mamba_ssm publishes no wheel on PyPI
# and the GPU machine has no network; building there takes minutes of its device time (ten CUDA
# files, about 40 s to 4 min each on one core here).
#
#   bash bench/build_mamba_ssm.sh        # network (PyPI), nvcc 13, g++, Python 3.12's headers
#
# The extension links against the GPU machine's torch (2.11.0+cu130, Python 3.12: the suite prints
# both), whose headers and libraries come from that torch's PyPI wheel, unpacked in the build
# directory; nothing is installed here. The wheel's mamba_ssm/__init__.py keeps only the version:
# the package's own imports its models, which need transformers, tilelang and CUTLASS's Python
# DSL, none of them on the GPU machine. Nothing built or downloaded here is committed (.whl/ is
# ignored). Override the versions with MAMBA=, TORCH=, PY= and the target with ARCH= (90).
set -euo pipefail
MAMBA=${MAMBA:-2.3.2.post1}
TORCH=${TORCH:-2.11.0}
PY=${PY:-3.12}
ARCH=${ARCH:-90}
cd "$(dirname "$0")/.."
REPO=$PWD
BUILD=${BUILD:-/tmp/rnnops-mamba-build}
CUDA_HOME=${CUDA_HOME:-$(ls -d /usr/local/cuda-13* /usr/local/cuda 2>/dev/null | head -1 || true)}
PY_INCLUDE=${PY_INCLUDE:-$(ls -d /root/.pyenv/versions/"$PY".*/include/python"$PY" /usr/include/python"$PY" 2>/dev/null | head -1 || true)}
tag=cp${PY/./}
[ -f "$PY_INCLUDE/Python.h" ] || { echo "no Python.h for Python $PY (set PY_INCLUDE)" >&2; exit 1; }
[ -f "$CUDA_HOME/include/cuda_runtime_api.h" ] || { echo "no CUDA toolkit at $CUDA_HOME (set CUDA_HOME)" >&2; exit 1; }
mkdir -p "$BUILD" && cd "$BUILD"

# the file a PyPI simple index lists for a project, by a regular expression on its name
pypi_url() {
  python3 - "$1" "$2" <<'PY'
import re, sys, urllib.request
project, pattern = sys.argv[1], sys.argv[2]
page = urllib.request.urlopen(f"https://pypi.org/simple/{project}/").read().decode()
urls = [u for u in re.findall(r'href="([^"]+)"', page) if re.search(pattern, u.split("#")[0].rsplit("/", 1)[-1])]
if not urls:
    sys.exit(f"no file matching {pattern} for {project} on PyPI")
print(urls[-1].split("#")[0])
PY
}
[ -f "mamba_ssm-$MAMBA.tar.gz" ] || curl -sSfLo "mamba_ssm-$MAMBA.tar.gz" "$(pypi_url mamba-ssm "^mamba_ssm-${MAMBA//./\\.}\\.tar\\.gz$")"
[ -d "mamba_ssm-$MAMBA" ] || tar xzf "mamba_ssm-$MAMBA.tar.gz"
if [ ! -d torch/lib ]; then
  wheel="torch-$TORCH-$tag-$tag-manylinux_2_28_x86_64.whl"
  [ -f "$wheel" ] || curl -sSfLo "$wheel" "$(pypi_url torch "^${wheel//./\\.}$")"
  python3 -m zipfile -e "$wheel" torch-unpacked >/dev/null
  mv torch-unpacked/torch . && rm -rf torch-unpacked
fi
grep -q "__version__ = '$TORCH" torch/version.py || { echo "torch/version.py is not torch $TORCH" >&2; exit 1; }

SRC=$BUILD/mamba_ssm-$MAMBA/csrc/selective_scan
INCLUDES=(-I"$SRC" -I"$BUILD/torch/include" -I"$BUILD/torch/include/torch/csrc/api/include" -I"$PY_INCLUDE"
          -I"$CUDA_HOME/include")
DEFINES=(-DTORCH_EXTENSION_NAME=selective_scan_cuda -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1)
# torch.utils.cpp_extension's CUDA flags, then mamba_ssm's setup.py's (which undo the half-type ones)
NVCC_FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
            -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr --compiler-options -fPIC -std=c++17 -O3
            -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_OPERATORS__
            -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -U__CUDA_NO_BFLOAT162_OPERATORS__ -U__CUDA_NO_BFLOAT162_CONVERSIONS__
            --expt-extended-lambda --use_fast_math -lineinfo -gencode "arch=compute_$ARCH,code=sm_$ARCH")
mkdir -p objects
export SRC CUDA_HOME
export INCLUDES_LINE="${INCLUDES[*]} ${DEFINES[*]}" NVCC_FLAGS_LINE="${NVCC_FLAGS[*]}"
# the heaviest (backward) files first, as many at once as there are cores; an object already
# built is kept (delete $BUILD/objects to rebuild)
ls "$SRC"/selective_scan_bwd_*.cu "$SRC"/selective_scan_fwd_*.cu | xargs -P "$(nproc)" -I{} bash -c '
  object=objects/$(basename {} .cu).o
  [ -f "$object" ] || { "$CUDA_HOME/bin/nvcc" -c {} -o "$object.part" $INCLUDES_LINE $NVCC_FLAGS_LINE && mv "$object.part" "$object" && echo "built $object"; }'
g++ -c "$SRC/selective_scan.cpp" -o objects/selective_scan.o -fPIC -O3 -std=c++17 "${INCLUDES[@]}" "${DEFINES[@]}"
so=selective_scan_cuda.cpython-${PY/./}-x86_64-linux-gnu.so
g++ -shared -o "$so" objects/*.o -L"$BUILD/torch/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python -lc10_cuda -ltorch_cuda \
  -L"$CUDA_HOME/lib" -L"$CUDA_HOME/lib64" -lcudart
# every symbol the extension needs from torch must be one its libraries export
missing=$(comm -23 <(nm -D --undefined-only "$so" | awk '{print $2}' | grep -E '^_ZN(2at|3c10|5torch)' | sort -u) \
                   <(for lib in torch/lib/lib{c10,torch,torch_cpu,torch_python,c10_cuda,torch_cuda}.so; do
                       nm -D --defined-only "$lib" | awk '{print $3}'; done | sort -u) || true)
[ -z "$missing" ] || { echo "symbols torch $TORCH does not export:"; echo "$missing" | head; exit 1; }

python3 - "$BUILD" "$MAMBA" "$so" "$tag" "$REPO/.whl" <<'PY'
"""The wheel: selective_scan_interface, ssd_combined and what they import, __init__ with the version only."""
import base64, hashlib, pathlib, sys, zipfile
build, version, so, tag, out = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], pathlib.Path(sys.argv[5])
package = build / f"mamba_ssm-{version}" / "mamba_ssm"
files = {f"mamba_ssm/{name}": (package / name).read_bytes() for name in (
    "ops/__init__.py", "ops/selective_scan_interface.py", "ops/triton/__init__.py", "ops/triton/layer_norm.py",
    "ops/triton/selective_state_update.py", "ops/triton/softplus.py", "utils/__init__.py", "utils/determinism.py",
    "utils/torch.py",
    # Mamba-2's SSD (Triton; mamba_chunk_scan_combined) and the Triton modules it imports
    "ops/triton/ssd_combined.py", "ops/triton/ssd_bmm.py", "ops/triton/ssd_chunk_scan.py",
    "ops/triton/ssd_chunk_state.py", "ops/triton/ssd_state_passing.py", "ops/triton/k_activations.py",
    "ops/triton/layernorm_gated.py")}
files["mamba_ssm/__init__.py"] = f'__version__ = "{version}"\n'.encode()
files[so] = (build / so).read_bytes()
info = f"mamba_ssm-{version}.dist-info"
files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: mamba-ssm\nVersion: {version}\n".encode()
files[f"{info}/WHEEL"] = f"Wheel-Version: 1.0\nGenerator: rnnops\nRoot-Is-Purelib: false\nTag: {tag}-{tag}-linux_x86_64\n".encode()
record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
          for name, data in files.items()]
files[f"{info}/RECORD"] = ("\n".join(record + [f"{info}/RECORD,,"]) + "\n").encode()
out.mkdir(exist_ok=True)
wheel = out / f"mamba_ssm-{version}-{tag}-{tag}-linux_x86_64.whl"
with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
    for name, data in files.items():
        archive.writestr(name, data)
print(f"{wheel}: {wheel.stat().st_size / 2**20:.1f} MiB")
PY
