"""How long solving each kernel's space takes (the target: well under 100 ms for any shape):
``pytest bench --benchmark-only -k spaces``."""
import pytest
import torch

from rnnops.autotune import hardware, kernels, tuner


@pytest.mark.parametrize("tunable", kernels.TUNABLES, ids=lambda t: t.name)
def test_solve_space(benchmark, tunable):
    shape = tuner.standard_shapes(tunable.op)[0]
    hw = hardware.named("H100")
    benchmark(lambda: tunable.space(shape, torch.bfloat16, hw).legal())
