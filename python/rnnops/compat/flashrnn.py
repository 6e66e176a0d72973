"""FlashRNN's entry function on rnnops.

``flashrnn(Wx, R, b, states=None, function="lstm", config=None, backend="cuda_fused",
dtype="bfloat16")`` with FlashRNN's default layouts: Wx [B, T, G, H, D], R [G, H, D, D] (output
unit first), b [G, H, D], states [S, B, 1, H, D] (the layout of last_h, so a call can resume
from the previous one). Returns (h, last_h) as FlashRNN does: h
[S, B, T, H, D] and last_h [S, B, 1, H, D]. ``backend`` and ``config`` are FlashRNN's and are
ignored (rnnops dispatches itself); ``dtype`` casts the inputs, as in FlashRNN.

Differences: h holds every state for every step only for h itself; the other states (c, ...)
are in last_h for the last step only, so h has S = 1. GRU uses FlashRNN's gate layout (R and
b: the recurrent n part first, then r, z; a fourth bias on the input n part), converted with a
copy of R and of Wx's n gate. Not supported (a ValueError): "slstm" (FlashRNN floors the
normaliser at 1 and special-cases the first step, which rnnops' xLSTM sLSTM does not).
"""
from __future__ import annotations

import torch

import rnnops

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def flashrnn(Wx, R, b, states=None, function="lstm", config=None, backend="cuda_fused", dtype="bfloat16"):
    del config, backend
    if function not in ("lstm", "gru", "elman"):
        raise ValueError(f"flashrnn: function={function!r} is not supported by rnnops (lstm, gru, elman)")
    if dtype not in _DTYPES:
        raise ValueError(f"flashrnn: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    Wx = Wx.to(_DTYPES[dtype])
    if function == "gru":  # FlashRNN: R gates (n, r, z); biases (n recurrent, r, z, n input)
        R = R[[1, 2, 0]]
        Wx = torch.cat([Wx[:, :, :2], Wx[:, :, 2:3] + b[3].to(Wx.dtype)], dim=2)
        b = torch.stack([b[1], b[2], b[0]])
    if states is not None and (states.dim() != 5 or states.shape[2] != 1):
        raise ValueError(f"flashrnn: states must be [S, B, 1, H, D], got shape {tuple(states.shape)}")
    state = None if states is None else tuple(states[:, :, 0].unbind(0))
    h, final = rnnops.rnn(Wx, R.to(Wx.dtype), b, state, cell=function)
    return h[None], torch.stack(final)[:, :, None].to(h.dtype)
