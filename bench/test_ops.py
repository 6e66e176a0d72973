"""Forward and forward+backward of every quick standard case and backend."""
import pytest
import torch

import rnnops
from rnnops.bench.cases import standard_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PAIRS = [(case, backend) for case in standard_cases(DEVICE) if case.quick
         for backend in rnnops.available_backends(case.op)
         if not (backend == "reference" and DEVICE.type == "cuda" and not case.time_reference)]
IDS = [f"{case.op}:{case.name}:{backend}" for case, backend in PAIRS]


def _synchronised(fn, device):
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


@pytest.mark.parametrize("case,backend", PAIRS, ids=IDS)
def test_forward(benchmark, case, backend, device, dtype):
    inputs = case.make(device, dtype)
    benchmark.group = f"{case.op} fwd"
    with torch.no_grad():
        benchmark(_synchronised(lambda: case.run(inputs, backend), device))


@pytest.mark.parametrize("case,backend", PAIRS, ids=IDS)
def test_forward_backward(benchmark, case, backend, device, dtype):
    inputs = {k: (v.requires_grad_(True) if v.is_floating_point() else v) for k, v in case.make(device, dtype).items()}
    out = case.run(inputs, backend)
    cotangent = torch.randn_like(out)
    benchmark.group = f"{case.op} fwd+bwd"

    def step():
        for value in inputs.values():
            value.grad = None
        case.run(inputs, backend).backward(cotangent)

    benchmark(_synchronised(step, device))
