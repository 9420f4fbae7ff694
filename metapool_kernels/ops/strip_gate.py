"""Fused sigmoid strip gating (the global context enhancer's last step), a C++/CUDA op.

    strip_gate(x, g_h, g_w)               = x * σ(g_h)[..., :, None] * σ(g_w)[..., None, :]
    strip_gate(x, g_h, g_w, base, weight) = base + weight * x * σ(g_h)[..., :, None] * σ(g_w)[..., None, :]

The second form is how the Meta-Pooling mixture adds its strip term (weight = softmax(α)_strip) to
the local mixture in one pass over x. Kernels: csrc/cpu/strip_gate_kernel.cpp and
csrc/cuda/strip_gate_kernel.cu; autograd, which routes gradients to every tensor input through
``metapool::strip_gate_backward``: csrc/autograd/strip_gate_autograd.cpp; schemas: csrc/metapool.cpp.
This file registers the fake kernels that let torch.compile trace the op.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension  # loads the C++ ops
from ..reference import check_floating, check_input, check_same_device, compute_dtype
from .layout import output_format

__all__ = ["strip_gate"]


def strip_gate(
    x: torch.Tensor,
    g_h: torch.Tensor,
    g_w: torch.Tensor,
    base: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``base + weight * x * sigmoid(g_h)[..., None] * sigmoid(g_w)[..., None, :]``.

    x: (N, C, H, W); g_h: (N, C, H); g_w: (N, C, W) gate logits; base: optional, x's shape;
    weight: optional one-element tensor. Accumulates in float32 (float64 for float64 x) and
    returns x's dtype. Differentiable in every tensor argument.
    """
    check_input(x)
    check_floating("g_h", g_h)
    check_floating("g_w", g_w)
    n, c, h, w = x.shape
    if tuple(g_h.shape) != (n, c, h):
        raise ValueError(f"g_h must have shape (N, C, H) = {(n, c, h)}, got {tuple(g_h.shape)}")
    if tuple(g_w.shape) != (n, c, w):
        raise ValueError(f"g_w must have shape (N, C, W) = {(n, c, w)}, got {tuple(g_w.shape)}")
    if base is not None:
        check_floating("base", base)
        if base.shape != x.shape:
            raise ValueError(f"base must have the shape of x {tuple(x.shape)}, got {tuple(base.shape)}")
    if weight is not None:
        check_floating("weight", weight)
        if weight.numel() != 1:
            raise ValueError(f"weight must hold one element, got shape {tuple(weight.shape)}")
    check_same_device(x=x, g_h=g_h, g_w=g_w, base=base, weight=weight)
    return torch.ops.metapool.strip_gate(x, g_h, g_w, base, weight)


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and strides of the real ones (outputs in layout.output_format).
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("metapool::strip_gate")
def _strip_gate_fake(x, g_h, g_w, base=None, weight=None):
    _extension.keep_kernels_under_inductor()
    return torch.empty_like(x, memory_format=output_format(x))


@torch.library.register_fake("metapool::strip_gate_backward")
def _strip_gate_backward_fake(grad, x, g_h, g_w, weight=None):
    _extension.keep_kernels_under_inductor()
    acc = compute_dtype(x.dtype)
    return (
        torch.empty_like(x, memory_format=output_format(x)),
        g_h.new_empty(g_h.shape, dtype=acc),
        g_w.new_empty(g_w.shape, dtype=acc),
        x.new_empty((), dtype=acc),
    )
