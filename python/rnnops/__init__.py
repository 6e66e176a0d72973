"""rnnops: fast nonlinear and linear RNN ops for PyTorch.

Families (layouts are batch-first and head-split; see each function's docstring):

- :func:`rnn` / :func:`rnn_step`: fused LSTM, GRU, sLSTM and Elman cells with heads.
- :func:`linear_attn` / :func:`linear_attn_step`: chunked linear attention, optional scalar or
  per-key log-decay.
- :func:`delta_rule`, :func:`delta_product` and their ``_step`` forms.
- :func:`selective_scan` / :func:`selective_state_update`: Mamba-1.

Every op takes ``backend="auto"|"reference"|"chunked"|...``; :func:`available_backends` lists
what an op has. :mod:`rnnops.nn` has drop-ins for ``torch.nn.LSTM`` and ``torch.nn.GRU``.
Each op is also the operator ``torch.ops.rnnops.<name>``, so torch.compile(fullgraph=True) and
torch.export trace models that use them (``rnnops._library``).
"""
from . import chunked, cuda_backend, reference, triton_backend  # noqa: F401  (register the backends)
from ._dispatch import available as available_backends
from ._version import __version__
from .ops.delta_rule import delta_product, delta_product_step, delta_rule, delta_rule_step
from .ops.linear_attn import linear_attn, linear_attn_step
from .ops.rnn import rnn, rnn_step
from .ops.selective_scan import selective_scan, selective_state_update
from . import nn  # noqa: E402  (needs the ops above)

__all__ = [
    "__version__",
    "available_backends",
    "delta_product",
    "delta_product_step",
    "delta_rule",
    "delta_rule_step",
    "linear_attn",
    "linear_attn_step",
    "nn",
    "rnn",
    "rnn_step",
    "selective_scan",
    "selective_state_update",
]
