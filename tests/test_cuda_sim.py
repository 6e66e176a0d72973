"""The CUDA simulator itself (csrc/sim): barriers, shuffles, votes, wmma, grid sync, asynchronous
copies, poisoned shared memory, and the AddressSanitizer and ThreadSanitizer builds."""
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


def test_async_copies_land_when_waited_for(sim):
    """copy_async16 (cp.async): a thread's copy is not there before it waits for its group (the
    simulator's shared memory is still NaN), is after (and, past a barrier, for the next thread);
    a misaligned address is an error of the launch, as it faults on a GPU."""
    x = torch.randn(132)
    before, after = sim.async_copy(x, 4)
    assert before.isnan().all()
    torch.testing.assert_close(after, x[4:].view(32, 4).roll(-1, 0).reshape(-1), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="not 16-byte aligned"):
        sim.async_copy(x, 1)


def _in_sanitized_child(sanitizer: str, code: str) -> subprocess.CompletedProcess:
    script = (f"import torch\nfrom rnnops.cuda_backend import simulator\nsim = simulator.load({sanitizer!r})\n"
              + textwrap.dedent(code))
    return subprocess.run([sys.executable, "-c", script], env=simulator.sanitizer_environment(sanitizer),
                          capture_output=True, text=True, timeout=600)


EVERY_KERNEL = """
    x = torch.randn(1000)
    assert torch.allclose(sim.block_sum(x, False).sum(), x.sum(), atol=1e-3)
    a, b = torch.randn(32, 32).half(), torch.randn(32, 32).half()
    sim.wmma_matmul(a, b, 1.0)
    sim.warp_scan(torch.randn(128))
    sim.grid_barrier(3)
    import rnnops  # every CUDA kernel on small cases, forward and backward, and the inference forward
    # the scan over two chunks, 13 state elements: staged, every warp owns a group, the last padded
    # (and in two segments: the LOCAL passes and their composition)
    from rnnops.autotune import cache, kernels
    x = {k: torch.randn(1, 33, 6, requires_grad=True) for k in ("u", "delta", "z")}
    A, B = -torch.rand(6, 13), torch.randn(1, 33, 13)
    bucket = kernels.bucket("selective_scan", kernels.selective_scan_shape(x["u"], A), torch.float32)
    for C in (torch.randn(1, 33, 3, 13), torch.randn(1, 33, 13)):  # B, C from global memory / staged in shared
        def scan():
            return rnnops.selective_scan(x["u"], x["delta"], A, B, C, torch.randn(6), x["z"], torch.randn(6), True,
                                         initial_state=torch.randn(1, 6, 13), return_last_state=True, backend="cuda")
        y, last = scan()
        (y.sum() + last.sum()).backward()
        with torch.no_grad():  # no chunk-state buffer
            scan()
        with cache.override("selective_scan", "cuda", bucket, {"segments": 2}):
            y, last = scan()
            (y.sum() + last.sum()).backward()
    for dtype in (torch.float32, torch.bfloat16):  # CUDA cores / tensor cores
        # two heads in one block each (h and the gate gradients kept on chip) / one split over blocks
        # (under ThreadSanitizer the simulated tensor-core products take most of the time)
        for D, heads in ((16, 2), (80, 1)):
            x_gates = torch.randn(3, 3, 4, heads, D).to(dtype).requires_grad_()
            R = (torch.randn(4, heads, D, D) / D**0.5).requires_grad_()
            h_seq, final = rnnops.rnn(x_gates, R, None, None, cell="lstm", backend="cuda")
            (h_seq.float().sum() + final[1].sum()).backward()
            with torch.no_grad():  # no pre-activation buffer
                rnnops.rnn(x_gates, R, None, None, cell="lstm", backend="cuda")
    # the fragment kernels: two buffers and one block barrier a step; 20 batch rows, two tiles
    x_gates = torch.randn(20, 3, 4, 2, 16).bfloat16().requires_grad_()
    R = (torch.randn(4, 2, 16, 16) / 4).requires_grad_()
    bucket = kernels.bucket("rnn", kernels.rnn_shape(x_gates, "lstm"), torch.bfloat16)
    with cache.override("rnn", "cuda", bucket, {"units": 16, "threads": 64, "forward_fragments": 1,
                                                "backward_fragments": 1}):
        h_seq, final = rnnops.rnn(x_gates, R, None, None, cell="lstm", backend="cuda")
        (h_seq.float().sum() + final[1].sum()).backward()
"""
# the defect each sanitizer must report: the code, and the words of its report
DEFECTS = {"address": ("sim.out_of_bounds(torch.randn(7))", "heap-buffer-overflow"),
           "thread": ("sim.block_sum(torch.randn(640), True)", "data race")}


@pytest.mark.parametrize("sanitizer", sorted(DEFECTS))
def test_sanitized_build_runs_every_kernel_clean_and_reports_a_defect(sanitizer):
    """AddressSanitizer: no out-of-bounds or freed memory touched. ThreadSanitizer: no shared-memory
    race, every read of another thread's write ordered by a barrier (std::barrier in the simulator;
    a kernel's missing barrier is reported in every run, where test_missing_barrier_is_caught needs
    several runs and the right interleaving)."""
    clean = _in_sanitized_child(sanitizer, EVERY_KERNEL)
    if "FATAL: ThreadSanitizer" in clean.stderr:  # its runtime cannot start here (address-space layout)
        pytest.skip(clean.stderr.strip().splitlines()[-1])
    assert clean.returncode == 0, clean.stderr[-3000:]
    code, report = DEFECTS[sanitizer]
    bad = _in_sanitized_child(sanitizer, code)
    assert bad.returncode != 0 and report in bad.stderr, bad.stderr[-3000:]
