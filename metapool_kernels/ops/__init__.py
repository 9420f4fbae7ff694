"""Functional ops. Each file holds one op: its kernels' launchers, fake kernels and autograd.

- ``strip_gate`` (C++/CUDA): ``base + weight * x * σ(g_h)[..., None] * σ(g_w)[..., None, :]``.
- ``meta_pool`` (C++ on CPU, Triton on CUDA): the Meta-Pooling mixture ``Σ softmax(α)_k op_k(x)``.
  Its Triton kernels (``meta_pool_triton``) are imported on first use, so that importing the
  package does not import Triton, which fixes interpreted-or-compiled mode when its kernels are
  defined.
- ``layout.output_format``: the memory format every op gives its outputs.
"""
from .meta_pool import meta_pool
from .strip_gate import strip_gate

__all__ = ["meta_pool", "strip_gate"]
