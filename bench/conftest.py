"""pytest-benchmark suites: ``pytest bench --benchmark-only`` (not part of the default test run).

The same standard quick cases as ``python -m rnnops bench --quick``, on CUDA if available,
for regression tracking with pytest-benchmark's own storage and comparison
(``--benchmark-autosave``, ``--benchmark-compare``).
"""
import pytest
import torch


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32
