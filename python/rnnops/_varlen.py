"""Packed variable-length sequences (``cu_seqlens``) for the PyTorch backends.

A packed batch has batch size 1 and time offsets ``cu_seqlens = [0, t1, ..., T]``; sequence i
is ``x[:, cu_seqlens[i]:cu_seqlens[i+1]]`` and has its own initial/final state ``state[i]``.
The reference backend runs each sequence on its own (:func:`per_sequence`); the chunked backend
scatters them into a zero-padded batch (:func:`to_padded`, :func:`from_padded`) so that all
sequences run in one batched computation. Both read the offsets on the host.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def per_sequence(
    run: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    cu_seqlens: torch.Tensor | None,
    time_major: Sequence[torch.Tensor | None],
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``run(*time_major, initial_state) -> (out, final_state)`` per packed sequence.

    ``time_major`` tensors have layout (B, T, ...); ``initial_state`` is (N, ...) or None.
    Returns the outputs concatenated along T and the final states stacked along N.
    """
    if cu_seqlens is None:
        return run(*time_major, initial_state)
    offsets = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:])]
    # one split per tensor (a slice per sequence would add a full-size gradient per sequence)
    pieces = [[None] * len(lengths) if x is None else x.split(lengths, dim=1) for x in time_major]
    states = [None] * len(lengths) if initial_state is None else initial_state.split(1)
    outs, finals = [], []
    for *sequence, state in zip(*pieces, states):
        out, final = run(*sequence, state)
        outs.append(out)
        finals.append(final)
    return torch.cat(outs, dim=1), torch.cat(finals, dim=0)


class Padding:
    """Index maps between a packed (1, T, ...) tensor and a padded (N, L, ...) batch.

    ``chunk`` is ``min(chunk_size, longest sequence)`` and ``length`` the longest sequence
    rounded up to a multiple of it; padded positions are filled with zeros, which every chunked
    algorithm treats as "no update".
    """

    def __init__(self, cu_seqlens: torch.Tensor, chunk_size: int):
        offsets = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
        self.total = offsets[-1]
        longest = max(max(lengths), 1)
        self.chunk = min(chunk_size, longest)
        self.length = -(-longest // self.chunk) * self.chunk
        device = cu_seqlens.device
        pos = torch.arange(self.length, device=device)
        starts = torch.tensor(offsets[:-1], device=device)
        lens = torch.tensor(lengths, device=device)
        valid = pos[None, :] < lens[:, None]
        # gather index into the packed tensor extended by one zero row at position T
        self.gather = torch.where(valid, starts[:, None] + pos[None, :], self.total)
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
        self.scatter = (seq, torch.arange(self.total, device=device) - starts[seq])

    def to_padded(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """(1, T, ...) -> (N, L, ...), zeros past each sequence's end."""
        if x is None:
            return None
        packed = torch.cat([x[0], x.new_zeros((1,) + x.shape[2:])], dim=0)
        return packed[self.gather]

    def from_padded(self, y: torch.Tensor) -> torch.Tensor:
        """(N, L, ...) -> (1, T, ...)."""
        return y[self.scatter].unsqueeze(0)
