"""Triton kernels (``rnnops.triton_kernels``), one module per op family.

Kernels land here with the ``triton`` backend; on the CPU they are tested under
``TRITON_INTERPRET=1``.
"""
