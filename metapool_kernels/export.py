"""Deployment: the package's custom ops as standard ops, for ``torch.onnx`` and ``torch.export``.

A Meta-Pooling layer runs through the package's op ``metapool::meta_pool`` (its strip term is
computed inside it); ``metapool::strip_gate`` is the fused gate for code that calls it directly.
No runtime outside this package knows either. This module gives each op a decomposition into ATen
ops, written with the reference functions (reference.py, the contract) except that each k×k
window is two separable passes (``separable_local_op``), and registers it in ``torch._decomp``'s
decomposition table. That table is where the standard exporters look:

- ``torch.onnx.export(model, (x,), path, dynamo=True)`` decomposes every op found there before
  translating, so the ONNX model holds standard ops only (MaxPool, AveragePool, ReduceMean, Conv,
  Sigmoid, Mul, Add); nothing to pass, no module to swap.
- ``torch.export.export(model, (x,))`` keeps the package's ops in the program, where they run with
  the package's kernels. For a runtime without this package (ExecuTorch, AOTInductor),
  ``ep.run_decompositions(decomposition_table())`` lowers them to core ATen as well: torch's
  default table only decomposes ATen ops and CompositeImplicitAutograd ops, so it needs this entry.

Why this table and not another registration: a CompositeImplicitAutograd kernel (C++ or
``py_impl``) is skipped by every tracer for an op that has a backend kernel, so it decomposes
nothing here, and inductor copies every such op into its own decomposition table, which would trade
the fused kernels for the decomposition under ``torch.compile``. ``torch.onnx``'s
``custom_translation_table`` would work but has to be passed by the user on every call.

The normal paths are untouched: eager dispatch never reads this table and inductor's table does not
include these ops. One reader remains: FakeTensorMode propagates shapes with Python decompositions
when sizes are symbolic (``torch.compile(dynamic=True)``, exporting with a dynamic batch), so each
decomposition returns exactly the dtype, shape and memory format of its op's fake kernel
(tests/test_export.py checks that they agree).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F

from . import _extension  # defines the metapool ops
from .ops.layout import output_format
from .reference import compute_dtype, kernel_size, strip_gate, strip_means

__all__ = ["decomposition_table", "register", "to_onnx", "onnx_op_types"]


def _gate_logits(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The strip gate's pointwise Conv1d, parameters cast to the compute dtype of z."""
    return F.conv1d(z, weight.to(z.dtype), bias.to(z.dtype))


def strip_gate_decomposition(x: torch.Tensor, g_h: torch.Tensor, g_w: torch.Tensor,
                             base: Optional[torch.Tensor] = None,
                             weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``base + weight * x * σ(g_h)[..., None] * σ(g_w)[..., None, :]`` as the C++ kernels compute it:
    in the compute dtype, base rounded to x's dtype first, the result in x's dtype and layout."""
    _extension.keep_kernels_under_inductor()  # fake tracing with dynamic shapes reads this, not the fake kernel
    acc = compute_dtype(x.dtype)
    out = strip_gate(x.to(acc), g_h.to(acc), g_w.to(acc))
    if weight is not None:
        out = weight.to(acc).reshape(()) * out
    if base is not None:
        out = base.to(x.dtype).to(acc) + out
    return out.to(x.dtype).contiguous(memory_format=output_format(x))


def separable_local_op(name: str, x: torch.Tensor) -> torch.Tensor:
    """A k×k local candidate as a 1×k pass then a k×1 pass: 2k instead of k² work in any runtime.

    The max is exactly the k×k max (max is associative, the padding is -inf, NaN propagates through
    both passes). The average is the k×k one up to rounding: with count_include_pad=False the window
    count at (h, w) is count_h(h) · count_w(w), and the row pass's count_w(w) is the same for every
    row the column pass adds, so mean_h(mean_w(x)) = Σ x / (count_h · count_w).
    """
    if name == "skip":
        return x
    k = kernel_size(name)
    r = k // 2
    if name.startswith("max"):
        rows = F.max_pool2d(x, (1, k), stride=1, padding=(0, r))
        return F.max_pool2d(rows, (k, 1), stride=1, padding=(r, 0))
    rows = F.avg_pool2d(x, (1, k), stride=1, padding=(0, r), count_include_pad=False)
    return F.avg_pool2d(rows, (k, 1), stride=1, padding=(r, 0), count_include_pad=False)


def meta_pool_output_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of meta_pool's output: the one its kernels and fake kernel (ops/meta_pool.py) give."""
    return output_format(x)


def meta_pool_decomposition(x: torch.Tensor, pi: Optional[torch.Tensor],
                            gate_h_weight: Optional[torch.Tensor], gate_h_bias: Optional[torch.Tensor],
                            gate_w_weight: Optional[torch.Tensor], gate_w_bias: Optional[torch.Tensor],
                            candidates: str):
    """(Σ_k π_k op_k(x), z_h, z_w) as the op returns it; π is None for a fixed layer (one op, no
    weight). z_h, z_w are the strip means in the compute dtype, (N, C, 0) without 'strip'."""
    _extension.keep_kernels_under_inductor()  # fake tracing with dynamic shapes reads this, not the fake kernel
    names = candidates.split(",")
    acc = compute_dtype(x.dtype)
    xc = x.to(acc)
    n, c = x.shape[0], x.shape[1]
    z_h, z_w = xc.new_empty((n, c, 0)), xc.new_empty((n, c, 0))
    out = None
    for k, name in enumerate(names):
        if name == "strip":
            z_h, z_w = (z.contiguous() for z in strip_means(xc))
            term = strip_gate(xc, _gate_logits(z_h, gate_h_weight, gate_h_bias),
                              _gate_logits(z_w, gate_w_weight, gate_w_bias))
        else:
            # A fixed 'skip' would otherwise return x itself: an op's output never aliases its input.
            term = separable_local_op(name, xc) if name != "skip" or pi is not None else xc.clone()
        if pi is not None:
            term = pi[k].to(acc) * term
        out = term if out is None else out + term
    return out.to(x.dtype).contiguous(memory_format=meta_pool_output_format(x)), z_h, z_w


# The package's forward ops, by name in the metapool namespace. Their backward ops have no entry:
# an exported inference program never calls them.
DECOMPOSITIONS: Dict[str, Callable] = {
    "strip_gate": strip_gate_decomposition,
    "meta_pool": meta_pool_decomposition,
}


def _defined_ops():
    """(op overload, decomposition) for every op of DECOMPOSITIONS defined so far: meta_pool's schema
    exists once ops/meta_pool.py has been imported."""
    for name, decomposition in DECOMPOSITIONS.items():
        if hasattr(torch.ops.metapool, name):
            yield getattr(torch.ops.metapool, name).default, decomposition


def register() -> None:
    """Add the decompositions of the ops defined so far to torch._decomp's table (idempotent)."""
    for op, decomposition in _defined_ops():
        if op not in torch._decomp.decomposition_table:
            torch._decomp.register_decomposition(op)(decomposition)


def decomposition_table() -> Dict[torch._ops.OperatorBase, Callable]:
    """torch.export's default table (core ATen) plus the package's ops, for
    ``ExportedProgram.run_decompositions``: a program of core ATen ops only."""
    register()
    table = torch.export.default_decompositions()
    for op, decomposition in _defined_ops():
        table[op] = decomposition
    return table


# ---------------------------------------------------------------------------------------------
# ONNX.
# ---------------------------------------------------------------------------------------------
MIN_OPSET = 17
STANDARD_DOMAINS = ("", "ai.onnx")


def onnx_op_types(model) -> List[str]:
    """The sorted op types of an ``onnx.ModelProto``'s graph, as ``domain::type`` outside the standard domain."""
    return sorted({n.op_type if n.domain in STANDARD_DOMAINS else f"{n.domain}::{n.op_type}" for n in model.graph.node})


def to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Union[str, os.PathLike]) -> Path:
    """Export an eval-mode model to one ONNX file with a dynamic batch dimension, and check it.

    ``torch.onnx.export(..., dynamo=True)`` with the decompositions registered above; then
    ``onnx.checker``, and a check that every node is a standard ONNX op of opset ≥ 17 (a custom
    domain would need this package at run time, which is what exporting is meant to avoid).
    """
    import onnx

    if model.training:
        raise ValueError("export an eval-mode model (call model.eval() first): "
                         "BatchNorm and dropout behave differently in training mode")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A batch of 2 as the example: torch.export specialises a dimension whose example size is 1.
    batch = torch.export.Dim("batch")
    example = torch.cat([example[:1]] * 2)
    torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},),
                      external_data=False, verbose=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    custom = [t for t in onnx_op_types(proto) if "::" in t]
    if custom:
        raise RuntimeError(f"{path}: the exported model holds non-standard ops {custom}; a metapool op without "
                           f"a decomposition reached the exporter (see metapool_kernels/export.py)")
    opset = max(o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS)
    if opset < MIN_OPSET:
        raise RuntimeError(f"{path}: opset {opset}, expected at least {MIN_OPSET}")
    return path


register()
