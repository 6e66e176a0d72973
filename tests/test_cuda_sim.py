"""The CUDA simulator itself (csrc/sim): barriers, shuffles, votes, wmma, grid sync, poisoned
shared memory, and the AddressSanitizer build."""
import subprocess
import sys
import textwrap

import pytest
import torch

from rnnops.cuda_backend import simulator


@pytest.fixture(scope="module")
def sim():
    return simulator.load()


def test_block_reduction(sim):
    x = torch.randn(1000)
    expected = torch.cat([x, x.new_zeros(24)]).view(16, 64).sum(1)  # 16 blocks of 64, the last one partial
    torch.testing.assert_close(sim.block_sum(x, False), expected, rtol=1e-5, atol=1e-4)


def test_missing_barrier_is_caught(sim):
    """Without the barrier, some reads see another thread's slot before it is written (the
    simulator's shared memory starts as NaN): wrong in at least one of ten runs."""
    x = torch.randn(640)
    expected = x.view(-1, 64).sum(1)
    wrong = sum(not torch.allclose(sim.block_sum(x, True), expected, rtol=1e-5, atol=1e-4) for _ in range(10))
    assert wrong >= 1


def test_warp_scan_shuffles_and_votes(sim):
    x = torch.randn(256)
    x[32:64] = x[32:64].abs() + 0.1  # warp 1: all positive
    out, mask, all_positive = sim.warp_scan(x)
    torch.testing.assert_close(out, x.view(-1, 32).cumsum(1).view(-1), rtol=1e-5, atol=1e-5)
    bits = (x.view(-1, 32) > 0).long() << torch.arange(32)
    assert mask.tolist() == bits.sum(1).tolist()
    assert all_positive.tolist() == (x.view(-1, 32) > 0).all(1).int().tolist()


def test_wmma_matmul(sim):
    a, b = torch.randn(48, 64).half(), torch.randn(64, 32).half()
    torch.testing.assert_close(sim.wmma_matmul(a, b, 0.5), 0.5 * (a.float() @ b.float()), rtol=1e-5, atol=1e-4)


def test_grid_barrier(sim):
    assert sim.grid_barrier(5).tolist() == [15] * 5


def _in_asan_child(code: str) -> subprocess.CompletedProcess:
    script = "import torch\nfrom rnnops.cuda_backend import simulator\nsim = simulator.load(asan=True)\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], env=simulator.asan_environment(), capture_output=True,
                          text=True, timeout=600)


def test_address_sanitizer_build_runs_clean_kernels_and_catches_an_out_of_bounds_read():
    clean = _in_asan_child("""
        x = torch.randn(1000)
        assert torch.allclose(sim.block_sum(x, False).sum(), x.sum(), atol=1e-3)
        a, b = torch.randn(32, 32).half(), torch.randn(32, 32).half()
        sim.wmma_matmul(a, b, 1.0)
        sim.warp_scan(torch.randn(128))
        import rnnops  # every CUDA kernel on small cases, forward and backward
        # the scan over two chunks, 13 state elements: staged, every warp owns a group, the last padded
        x = {k: torch.randn(1, 33, 6, requires_grad=True) for k in ("u", "delta", "z")}
        A, B = -torch.rand(6, 13), torch.randn(1, 33, 13)
        for C in (torch.randn(1, 33, 3, 13), torch.randn(1, 33, 13)):  # B, C from global memory / staged in shared
            y, last = rnnops.selective_scan(x["u"], x["delta"], A, B, C, torch.randn(6), x["z"], torch.randn(6), True,
                                            initial_state=torch.randn(1, 6, 13), return_last_state=True, backend="cuda")
            (y.sum() + last.sum()).backward()
        for dtype in (torch.float32, torch.bfloat16):  # CUDA cores / tensor cores
            for D in (16, 80):  # a head in one block (h and the gate gradients kept on chip) / split over blocks
                x_gates = torch.randn(3, 4, 4, 2, D).to(dtype).requires_grad_()
                R = (torch.randn(4, 2, D, D) / D**0.5).requires_grad_()
                h_seq, final = rnnops.rnn(x_gates, R, None, None, cell="lstm", backend="cuda")
                (h_seq.float().sum() + final[1].sum()).backward()
    """)
    assert clean.returncode == 0, clean.stderr[-3000:]
    bad = _in_asan_child("sim.out_of_bounds(torch.randn(7))")
    assert bad.returncode != 0 and "heap-buffer-overflow" in bad.stderr
