"""Functional ops. Each file holds one op: its kernels' launchers, fake kernels and autograd.

- ``strip_gate`` (C++/CUDA): ``base + weight * x * σ(g_h)[..., None] * σ(g_w)[..., None, :]``.
- ``meta_pool.meta_pool`` (Triton): the Meta-Pooling mixture ``Σ softmax(α)_k op_k(x)``; import it
  from ``metapool_kernels.ops.meta_pool``. It is not imported here so that importing the package
  does not import Triton, which fixes interpreted-or-compiled mode when its kernels are defined.
"""
from .strip_gate import strip_gate

__all__ = ["strip_gate"]
