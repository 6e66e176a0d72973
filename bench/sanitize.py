"""One small case per CUDA kernel and cell slice shape, forward (also under no_grad) and backward, for
compute-sanitizer (memcheck, racecheck) in the GPU suite: ``compute-sanitizer --tool memcheck
python bench/sanitize.py``; and the Triton cells' resident kernels at a head padded to its tile
(48 units in 64), saving their pre-activations, recomputing them, and saving nothing (no_grad);
both scans' segment passes on packed sequences (some segments empty); the scans also under
no_grad; the CUDA scan also in mamba's (B, D, L) layout."""
import rnnops
import torch
from rnnops.cuda_backend import rnn as cuda_rnn
from rnnops.cuda_backend import selective_scan as cuda_scan
from rnnops.triton_backend import rnn as triton_rnn
from rnnops.triton_backend import selective_scan as triton_scan


def main() -> None:
    device = "cuda"
    torch.manual_seed(0)
    # the CUDA cells at the default slice (64 units, 128 threads) and at 16 units and 256 threads,
    # whose tensor-core products split each output tile's K steps over several warps
    for config in (cuda_rnn.DEFAULT_CONFIG, cuda_rnn.RNNConfig(units=16, threads=256)):
        for cell, gates in (("lstm", 4), ("gru", 3), ("slstm", 4), ("elman", 1)):
            for dim in (32, 96):  # one block per head, and a head split over blocks (grid barrier)
                x = torch.randn(3, 5, gates, 2, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
                R = (torch.randn(gates, 2, dim, dim, device=device) / dim**0.5).requires_grad_()
                h_seq, final = cuda_rnn.rnn(x, R, None, None, cell=cell, config=config)
                (h_seq.float().sum() + sum(s.sum() for s in final)).backward()
                with torch.no_grad():  # the inference forward: no pre-activation buffer
                    cuda_rnn.rnn(x, R, None, None, cell=cell, config=config)
    for cell, gates in (("lstm", 4), ("gru", 3), ("slstm", 4)):
        for recompute in (0, 1):  # the backward loading the saved pre-activations, or computing them again
            x = torch.randn(3, 5, gates, 2, 48, device=device, dtype=torch.bfloat16, requires_grad=True)
            R = (torch.randn(gates, 2, 48, 48, device=device) / 48**0.5).requires_grad_()
            b = torch.randn(gates, 2, 48, device=device, requires_grad=True)
            config = triton_rnn.RNNConfig(block_d=64, block_k=64, recompute=recompute)
            h_seq, final = triton_rnn.rnn(x, R, b, None, cell=cell, config=config)
            (h_seq.float().sum() + sum(s.sum() for s in final)).backward()
            with torch.no_grad():  # the inference forward: the last step's states only
                triton_rnn.rnn(x, R, b, None, cell=cell, config=config)
    u, delta, z = (torch.randn(2, 37, 40, device=device, requires_grad=True) for _ in range(3))
    A, B = -torch.rand(40, 16, device=device), torch.randn(2, 37, 16, device=device)
    D = torch.randn(40, device=device)
    # C in groups of 10 channels (every block reads B and C from global memory) or shared (each
    # block stages the chunk's B and C rows in shared memory, and its forward's four warps each
    # walk a group of four state elements; the second block 8 channels live)
    grouped_C, shared_C = torch.randn(2, 37, 4, 16, device=device), torch.randn(2, 37, 16, device=device)
    for C in (grouped_C, shared_C):
        y, last = rnnops.selective_scan(u, delta, A, B, C, D, z, None, True, return_last_state=True, backend="cuda")
        (y.sum() + last.sum()).backward()
        with torch.no_grad():  # the CUDA scan's inference forward: no chunk-state buffer
            rnnops.selective_scan(u, delta, A, B, C, D, z, None, True, return_last_state=True, backend="cuda")
    # mamba's (B, D, L) layout: the output and gradients in that order too, a lane's steps stored as
    # 16-byte words where they all exist and start aligned (bf16 at T 48; float32 at T 37: mixed)
    for dtype, T in ((torch.float32, 37), (torch.bfloat16, 48)):
        u_, delta_, z_ = (torch.randn(2, 40, T, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
                          for _ in range(3))
        B_ = torch.randn(2, T, 16, device=device)
        for C_ in (torch.randn(2, T, 4, 16, device=device), torch.randn(2, T, 16, device=device)):
            y, last = rnnops.selective_scan(u_, delta_, A, B_, C_, D, z_, None, True, return_last_state=True,
                                            backend="cuda")
            (y.float().sum() + last.sum()).backward()
    initial = torch.randn(3, 40, 16, device=device, requires_grad=True)

    def packed_triton_scan():
        return triton_scan.selective_scan(
            u[:1], delta[:1], A, B[:1], shared_C[:1], None, z[:1], None, True, initial_state=initial, output_final_state=True,
            cu_seqlens=torch.tensor([0, 5, 20, 37], device=device),
            config=triton_scan.SelectiveScanConfig(chunk=16, segments=3))

    y, last = packed_triton_scan()
    (y.sum() + last.sum()).backward()
    with torch.no_grad():  # the inference forward: no chunk states stored
        packed_triton_scan()
    # the CUDA scan's segments on the same packed sequences (4-step chunks: 2, 4 and 5 of them in 3
    # segments, one empty), rows staged (shared C) and read per lane (grouped C)
    for C in (grouped_C, shared_C):
        y, last = cuda_scan.selective_scan(
            u[:1], delta[:1], A, B[:1], C[:1], None, z[:1], None, True, initial_state=initial,
            output_final_state=True, cu_seqlens=torch.tensor([0, 5, 20, 37], device=device),
            config=cuda_scan.ScanConfig(1, 4, segments=3))
        (y.sum() + last.sum()).backward()
    torch.cuda.synchronize()
    print("sanitize: every CUDA kernel, the resident Triton cells and both scans' segments ran")


if __name__ == "__main__":
    main()
