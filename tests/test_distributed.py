"""Sequence parallelism and DDP with the gloo backend, 2 processes on localhost: the split run
equals the single-process run (float64, 1e-10), outputs and every gradient."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import rnnops
from rnnops import distributed

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(family):
    torch.manual_seed(0)
    d = torch.float64
    if family == "selective_scan":
        return {"u": torch.randn(2, 12, 6, dtype=d), "delta": torch.randn(2, 12, 6, dtype=d),
                "B": torch.randn(2, 12, 4, dtype=d), "C": torch.randn(2, 12, 4, dtype=d),
                "z": torch.randn(2, 12, 6, dtype=d), "initial_state": torch.randn(2, 6, 4, dtype=d)}
    x = {"q": torch.randn(2, 12, 3, 8, dtype=d), "k": F.normalize(torch.randn(2, 12, 3, 8, dtype=d), dim=-1),
         "v": torch.randn(2, 12, 3, 5, dtype=d), "g": -torch.rand(2, 12, 3, dtype=d),
         "initial_state": torch.randn(2, 3, 8, 5, dtype=d)}
    if family == "delta_rule":
        x["beta"] = torch.rand(2, 12, 3, dtype=d)
    return x


def _call(family, module, x):
    A = -torch.arange(1, 25, dtype=torch.float64).view(6, 4) / 10
    if family == "linear_attn":
        return module.linear_attn(x["q"], x["k"], x["v"], x["g"], initial_state=x["initial_state"],
                                  **({"output_final_state": True} if module is rnnops else {}))
    if family == "delta_rule":
        return module.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"],
                                 **({"output_final_state": True} if module is rnnops else {}))
    return module.selective_scan(x["u"], x["delta"], A, x["B"], x["C"], None, x["z"], None, True,
                                 initial_state=x["initial_state"],
                                 **({"return_last_state": True} if module is rnnops else {}))


def _worker(rank, port, family, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x = _inputs(family)
        half = x[next(iter(x))].shape[1] // WORLD
        local = {k: (v.detach()[:, rank * half:(rank + 1) * half].clone() if k != "initial_state" else v.clone())
                 .requires_grad_() for k, v in x.items()}
        out, final = _call(family, distributed, local)
        generator = torch.Generator().manual_seed(1)
        cotangent = torch.randn(x[next(iter(x))].shape[:2] + out.shape[2:], generator=generator, dtype=out.dtype)
        local_cotangent = cotangent[:, rank * half:(rank + 1) * half]
        (out * local_cotangent).sum().backward()
        results[rank] = {"out": out.detach(), "final": final,
                         "grads": {k: v.grad for k, v in local.items() if v.grad is not None}}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["linear_attn", "delta_rule", "selective_scan"])
def test_sequence_parallel_equals_single_process(family):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), family, results), nprocs=WORLD, join=True)
    x = {k: v.clone().requires_grad_() for k, v in _inputs(family).items()}
    out, final = _call(family, rnnops, x)
    generator = torch.Generator().manual_seed(1)
    cotangent = torch.randn(out.shape, generator=generator, dtype=out.dtype)
    (out * cotangent).sum().backward()
    half = out.shape[1] // WORLD
    torch.testing.assert_close(torch.cat([results[r]["out"] for r in range(WORLD)], dim=1), out.detach(),
                               rtol=1e-10, atol=1e-10)
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["final"], final.detach(), rtol=1e-10, atol=1e-10)
    for name, tensor in x.items():
        if name == "initial_state":
            got = results[0]["grads"][name]  # only rank 0 uses it
        else:
            got = torch.cat([results[r]["grads"][name] for r in range(WORLD)], dim=1)
        torch.testing.assert_close(got, tensor.grad, rtol=1e-10, atol=1e-10)
    assert half > 0


def _ddp_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = rnnops.nn.LSTM(4, 8, num_layers=2, batch_first=True, dtype=torch.float64)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        data = torch.randn(WORLD * 3, 5, 4, dtype=torch.float64)
        ddp(data[rank * 3:(rank + 1) * 3])[0].sum().backward()
        results[rank] = {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


def test_nn_lstm_trains_under_ddp():
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
    torch.manual_seed(0)
    model = rnnops.nn.LSTM(4, 8, num_layers=2, batch_first=True, dtype=torch.float64)
    data = torch.randn(WORLD * 3, 5, 4, dtype=torch.float64)
    (model(data)[0].sum() / WORLD).backward()  # DDP averages the ranks' gradients
    for name, p in model.named_parameters():
        for r in range(WORLD):
            torch.testing.assert_close(results[r][name], p.grad, rtol=1e-10, atol=1e-10)
