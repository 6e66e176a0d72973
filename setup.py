"""One pure-Python distribution: rnnops, rnnops.triton_kernels, rnnops.autotune, and the CUDA
sources (csrc/) as package data. Nothing is compiled at install time: CUDA kernels are built at
run time for the tile configuration the tuner picks."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _version() -> str:
    for line in (ROOT / "python" / "rnnops" / "_version.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("python/rnnops/_version.py has no __version__")


def _csrc_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*") if p.is_file())


setup(
    name="rnnops",
    version=_version(),
    description="Fast nonlinear and linear RNN kernels (LSTM/GRU/sLSTM, linear attention, "
    "delta rule, selective scan) for PyTorch",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={
        "": "python",
        "rnnops.triton_kernels": "triton_kernels",
        "rnnops.autotune": "autotune",
        "rnnops.csrc": "csrc",
    },
    packages=find_packages("python") + ["rnnops.triton_kernels", "rnnops.autotune", "rnnops.csrc"],
    package_data={"rnnops.csrc": _csrc_files(), "rnnops.autotune": ["defaults/*.json"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "python-constraint2>=2.0",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=7.4", "pytest-xdist>=3.3", "hypothesis>=6.80", "pytest-benchmark>=4.0", "ninja>=1.11",
                 "fla-core>=0.6.0", "flashrnn>=1.0.8"],  # ninja: the CUDA simulator's build; peers: adapter tests
        "cuda": ["cupy-cuda13x>=13.6"],
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["rnnops=rnnops.__main__:main"]},
)
