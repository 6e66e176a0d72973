"""Peer-compatible entry points: switch from a peer by changing one import.

- :mod:`rnnops.compat.fla`: flash-linear-attention's chunk_* / fused_recurrent_* functions.
- :mod:`rnnops.compat.mamba_ssm`: selective_scan_fn, selective_scan_ref, selective_state_update.
- :mod:`rnnops.compat.flashrnn`: FlashRNN's ``flashrnn`` entry function.

Arguments keep the peers' names, defaults, layouts and return conventions; tensors are passed as
views wherever strides allow. What a peer offers and rnnops does not is refused with a clear
error (listed in each module's docstring) rather than silently approximated.
"""
