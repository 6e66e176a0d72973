"""Reference backend: step-by-step PyTorch recurrences, one token at a time.

Short and obviously correct; float64-capable; the ground truth every other backend is tested
against. Each module registers its functions under backend ``"reference"``.
"""
from . import delta_rule, linear_attn, rnn, selective_scan  # noqa: F401  (registration)
