"""The Meta-Pooling mixture ``Σ_k π_k op_k(x)`` as one op with a kernel per device.

    metapool::meta_pool(x, pi, gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias, candidates)
        -> (out, z_h, z_w)
    metapool::meta_pool_backward(grad, x, pi, gates..., z_h, z_w, candidates)
        -> (grad_x, grad_pi, grad_gate_h_weight, grad_gate_h_bias, grad_gate_w_weight, grad_gate_w_bias)

``candidates`` is a comma-joined list of op names (docs/DESIGN.md); ``pi`` their weights softmax(α) in
the compute dtype, or None for a fixed layer (its single op, no weight); the gates are the strip
candidate's two pointwise Conv1d (None without 'strip'); ``z_h``, ``z_w`` the strip means, returned
so the backward need not recompute them (``(N, C, 0)`` without 'strip'). The output keeps a
channels_last input channels_last and is contiguous otherwise.

Schemas: csrc/metapool.cpp. Kernels: C++ for CPU tensors (csrc/cpu/meta_pool_kernel.cpp), Triton
for CUDA tensors (:mod:`metapool_kernels.ops.meta_pool_triton`, imported on first use so that
importing the package does not import Triton); autograd, once for every device, in C++
(csrc/autograd/meta_pool_autograd.cpp). This file registers the Triton kernels and the fake kernels.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from typing import Optional, Sequence, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import _extension  # loads the C++ ops and their CPU kernels
from ..reference import check_candidates, check_input, check_same_device, compute_dtype
from .layout import output_format

__all__ = ["meta_pool", "mix", "triton_on_cpu"]

GATE_NAMES = ("gate_h.weight", "gate_h.bias", "gate_w.weight", "gate_w.bias")


def _names(candidates: str) -> Tuple[str, ...]:
    return tuple(candidates.split(","))


# ---------------------------------------------------------------------------------------------
# CUDA kernels: Triton.
# ---------------------------------------------------------------------------------------------
def _meta_pool_cuda(x, pi, gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias, candidates):
    from . import meta_pool_triton
    return meta_pool_triton.forward(x, pi, gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias, candidates)


def _meta_pool_backward_cuda(grad, x, pi, gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias, z_h, z_w,
                             candidates):
    from . import meta_pool_triton
    return meta_pool_triton.backward(grad, x, pi, gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias,
                                     z_h, z_w, candidates)


torch.library.register_kernel("metapool::meta_pool", "cuda", _meta_pool_cuda)
torch.library.register_kernel("metapool::meta_pool_backward", "cuda", _meta_pool_backward_cuda)

# The Triton kernels on CPU tensors, through Triton's interpreter: how they are tested without a
# GPU. While active, both ops' CPU kernels are the Triton ones (a dispatcher override, undone on
# exit). The op's autograd is C++ (csrc/autograd/) for every device; under the override a Python
# one stands in front of it on CPU tensors, because a backward may run after the context has been
# left (``loss.backward()`` outside a layer's forward) and must still run the Triton backward.
_override_lock = threading.Lock()
_override = {"depth": 0, "lib": None}


@contextlib.contextmanager
def triton_on_cpu():
    """Run ``metapool::meta_pool`` and its backward on CPU tensors with the Triton kernels
    (needs ``TRITON_INTERPRET=1``, set before Triton is first imported)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors")
    with _override_lock:
        if _override["depth"] == 0:
            lib = torch.library.Library("metapool", "IMPL")
            with _quiet_override():
                lib.impl("meta_pool", _meta_pool_cuda, "CPU")
                lib.impl("meta_pool_backward", _meta_pool_backward_cuda, "CPU")
                lib.impl("meta_pool", _InterpretedMetaPool.call, "AutogradCPU")
            _override["lib"] = lib
        _override["depth"] += 1
    try:
        yield
    finally:
        with _override_lock:
            _override["depth"] -= 1
            if _override["depth"] == 0:
                _override["lib"]._destroy()
                _override["lib"] = None


class _InterpretedMetaPool(torch.autograd.Function):
    """meta_pool's autograd on CPU tensors under :func:`triton_on_cpu`: the forward runs below
    autograd (the interpreted Triton kernel) and the backward re-enters the override."""

    @staticmethod
    def forward(ctx, x, pi, ghw, ghb, gww, gwb, candidates):
        with torch._C._AutoDispatchBelowAutograd():
            out, z_h, z_w = torch.ops.metapool.meta_pool(x, pi, ghw, ghb, gww, gwb, candidates)
        ctx.save_for_backward(x, pi, ghw, ghb, gww, gwb, z_h, z_w)
        ctx.candidates = candidates
        ctx.mark_non_differentiable(z_h, z_w)
        return out, z_h, z_w

    @staticmethod
    def backward(ctx, grad_out, _grad_zh, _grad_zw):
        x, pi, ghw, ghb, gww, gwb, z_h, z_w = ctx.saved_tensors
        with triton_on_cpu():
            gx, gpi, *gates = torch.ops.metapool.meta_pool_backward(
                grad_out, x, pi, ghw, ghb, gww, gwb, z_h, z_w, ctx.candidates)
        if "strip" not in _names(ctx.candidates):
            gates = (None, None, None, None)
        return gx, (gpi if pi is not None else None), *gates, None

    @staticmethod
    def call(x, pi, ghw, ghb, gww, gwb, candidates):
        return _InterpretedMetaPool.apply(x, pi, ghw, ghb, gww, gwb, candidates)


@contextlib.contextmanager
def _quiet_override():
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        yield


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and memory formats of the real ones, for torch.compile/export.
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("metapool::meta_pool")
def _meta_pool_fake(x, pi, gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias, candidates):
    _extension.keep_kernels_under_inductor()
    N, C, H, W = x.shape
    acc = compute_dtype(x.dtype)
    strip = "strip" in _names(candidates)
    return (torch.empty_like(x, memory_format=output_format(x)),
            x.new_empty((N, C, H if strip else 0), dtype=acc),
            x.new_empty((N, C, W if strip else 0), dtype=acc))


@torch.library.register_fake("metapool::meta_pool_backward")
def _meta_pool_backward_fake(grad, x, pi, gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias, z_h, z_w,
                             candidates):
    _extension.keep_kernels_under_inductor()
    strip = "strip" in _names(candidates)
    gates = [torch.empty_like(t) if strip else x.new_empty(0)
             for t in (gate_h_weight, gate_h_bias, gate_w_weight, gate_w_bias)]
    grad_pi = torch.empty_like(pi) if pi is not None else x.new_empty(0, dtype=compute_dtype(x.dtype))
    return (torch.empty_like(x, memory_format=output_format(x)), grad_pi, *gates)


# ---------------------------------------------------------------------------------------------
# Flops for torch.utils.flop_counter (count_macs, the ablation's and the demo's MAC columns).
# The kernels run the strip gate's pointwise convs inside the op, out of the counter's sight; they
# are counted as torch counts the reference's nn.Conv1d: 2 flops a multiply-add, no bias, and the
# backward twice the forward (grad input + grad weight). Pooling, as in torch's counter, is free.
# ---------------------------------------------------------------------------------------------
def _gate_flops(x_shape, gate_h_weight_shape, gate_w_weight_shape, candidates) -> int:
    if "strip" not in _names(candidates) or gate_h_weight_shape is None or gate_w_weight_shape is None:
        return 0
    n, _, h, w = x_shape
    return 2 * n * (math.prod(gate_h_weight_shape) * h + math.prod(gate_w_weight_shape) * w)


@register_flop_formula(torch.ops.metapool.meta_pool)
def _meta_pool_flops(x_shape, pi_shape, gate_h_weight_shape, gate_h_bias_shape, gate_w_weight_shape,
                     gate_w_bias_shape, candidates, **kwargs) -> int:
    return _gate_flops(x_shape, gate_h_weight_shape, gate_w_weight_shape, candidates)


@register_flop_formula(torch.ops.metapool.meta_pool_backward)
def _meta_pool_backward_flops(grad_shape, x_shape, pi_shape, gate_h_weight_shape, gate_h_bias_shape,
                              gate_w_weight_shape, gate_w_bias_shape, z_h_shape, z_w_shape, candidates,
                              **kwargs) -> int:
    return 2 * _gate_flops(x_shape, gate_h_weight_shape, gate_w_weight_shape, candidates)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def meta_pool(
    x: torch.Tensor,
    alpha: Optional[torch.Tensor],
    candidates: Sequence[str],
    gates: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """``Σ_k softmax(alpha)_k op_k(x)`` over ``candidates``, on x's device's kernels.

    alpha: (K,) logits, or None with a single candidate (a fixed layer: that op alone, no weight).
    gates: (gate_h.weight, gate_h.bias, gate_w.weight, gate_w.bias), required with 'strip'.
    Accumulates in float32 (float64 for float64 x) and returns x's dtype, in x's memory format
    when that is channels_last (contiguous otherwise).
    """
    names = check_candidates(candidates)
    check_input(x)
    if alpha is None:
        if len(names) != 1:
            raise ValueError(f"alpha is required with several candidates, got {list(names)}")
        pi = None
    else:
        if alpha.shape != (len(names),):
            raise ValueError(f"alpha must have shape ({len(names)},) for candidates {list(names)}, got {tuple(alpha.shape)}")
        pi = torch.softmax(alpha.to(compute_dtype(x.dtype)), dim=0)
    if "strip" in names:
        if gates is None or len(gates) != 4 or any(g is None for g in gates):
            raise ValueError("the 'strip' candidate needs gates=(gate_h.weight, gate_h.bias, gate_w.weight, gate_w.bias)")
        C = x.shape[1]
        for name, g, shape in zip(GATE_NAMES, gates, ((C, C, 1), (C,), (C, C, 1), (C,))):
            if tuple(g.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for {C} channels, got {tuple(g.shape)}")
    else:
        gates = (None, None, None, None)
    check_same_device(x=x, alpha=pi, **{f"gate{i}": g for i, g in enumerate(gates)})
    return mix(x, pi, names, gates)


def mix(x: torch.Tensor, pi: Optional[torch.Tensor], names: Tuple[str, ...], gates) -> torch.Tensor:
    """The op call behind :func:`meta_pool`, for arguments already validated (``FusedMetaPooling``
    checks its input once and its candidates and gates when built).

    pi: softmax(α) in the compute dtype, or None for a fixed layer (its one op, weight 1).
    """
    if names == ("skip",):
        return x  # a fixed skip layer computes nothing
    if "strip" not in names:
        gates = (None, None, None, None)
    # Dynamo traces through an lru_cache wrapper (and warns); the join is traced once anyway.
    arg = ",".join(names) if torch.compiler.is_compiling() else _candidates_arg(names)
    out, _, _ = torch.ops.metapool.meta_pool(x, pi, *gates, arg)
    return out


@functools.lru_cache(maxsize=None)
def _candidates_arg(names: Tuple[str, ...]) -> str:
    # The op's string argument, built once per candidate set rather than on every call.
    return ",".join(names)

