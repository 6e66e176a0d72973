"""Chunk layout helpers shared by the chunked algorithms."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._varlen import Padding


def pad_time(x: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Zero-pad the time axis (dim 1) of a (B, T, ...) tensor to ``length``."""
    if x is None or x.shape[1] == length:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], length - x.shape[1]) + x.shape[2:])], dim=1)


SEGMENT_ELEMENTS = 1 << 16


def run_in_chunks(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    chunk_size: int,
    cu_seqlens: torch.Tensor | None,
    time_major: Sequence[torch.Tensor | None],
    initial_state: torch.Tensor | None,
    *,
    per_token_elements: int,
    heads: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a chunked algorithm ``fn(*chunked, state, chunk) -> (out, final_state)``.

    The (B, T, ...) inputs are zero-padded along T to a multiple of ``chunk = min(chunk_size,
    longest sequence)`` (packed sequences, cu_seqlens, become a padded batch first; zero
    padding must leave the state unchanged: zero keys/inputs, zero log-decay) and laid out
    chunk-major: (B, n, C, ...), or with ``heads`` (B, T, H, ...) -> (B, n, H, C, ...) in one
    copy. ``fn`` sees segments of whole chunks (dim 1) in turn, the state carried from one to
    the next, sized so that the temporaries (about ``per_token_elements`` per token) stay near
    ``SEGMENT_ELEMENTS``: cache-sized, and reused by the allocator instead of page-faulted in
    afresh. It returns its output in the same layout; the result is unpadded (B, T, ...).
    """
    if cu_seqlens is None:
        time = time_major[0].shape[1]
        chunk = min(chunk_size, time)
        padded = [pad_time(x, -(-time // chunk) * chunk) for x in time_major]
    else:
        padding = Padding(cu_seqlens, chunk_size)
        chunk = padding.chunk
        padded = [padding.to_padded(x) for x in time_major]
    batch, length = padded[0].shape[:2]

    def to_chunks(x):
        if x is None:
            return None
        x = x.reshape((batch, length // chunk, chunk) + x.shape[2:])
        return x.transpose(2, 3).contiguous() if heads else x

    chunked = [to_chunks(x) for x in padded]
    segment = max(1, SEGMENT_ELEMENTS // (per_token_elements * chunk))
    # one split per input (slicing it per segment would add a full-size gradient per segment)
    segments = [[None] * -(-(length // chunk) // segment) if x is None else x.split(segment, dim=1) for x in chunked]
    outs, state = [], initial_state
    for parts in zip(*segments):
        out, state = fn(*parts, state, chunk)
        outs.append(out)
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    if heads:
        out = out.transpose(2, 3)
    out = out.reshape((batch, length) + out.shape[3:])
    return (out[:, :time] if cu_seqlens is None else padding.from_padded(out)), state


def cumulative_log_decay(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Inclusive cumulative sum of the log-decay within each chunk, in float64.

    Decay factors are exponentials of differences G_i - G_j; in float32 a difference of two
    sums of -640 each would lose ~1e-4 of relative accuracy, float64 keeps it exact enough."""
    return g.to(torch.float64).cumsum(dim)


def pair_decay(G: torch.Tensor, causal: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(G_i - G_j) where causal[i, j], else 0, in ``dtype``; G (..., C) -> (..., C, C)."""
    diff = G[..., :, None] - G[..., None, :]
    return torch.where(causal, diff, float("-inf")).exp().to(dtype)


def scan_chunks(
    transition: Callable[..., torch.Tensor],
    state: torch.Tensor,
    *per_chunk: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``state <- transition(state, *(x[:, i] for x in per_chunk))`` over the chunks (dim 1
    of each ``per_chunk`` tensor); returns the state entering each chunk, stacked on dim 1
    (B, n, ...), and the final state. Each tensor is taken apart by one unbind: indexing it per
    chunk would give its gradient a zero-filled full-size addition per chunk."""
    entering = []
    for parts in zip(*(x.unbind(1) for x in per_chunk)):
        entering.append(state)
        state = transition(state, *parts)
    return torch.stack(entering, dim=1), state
