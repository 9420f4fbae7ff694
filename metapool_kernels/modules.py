"""The drop-in fused layer.

``FusedMetaPooling`` is ``MetaPooling`` (same constructor, parameters, state_dict keys, ``probs``,
``fix``) with the computation routed to kernels. Validation and the search/fixed logic are the
reference's; backends differ only in which kernels run:

- ``"triton"``: the fused Triton pass (every local candidate, the α-mixture and the strip means in
  one read of x) and the C++/CUDA strip gate. On CPU tensors it needs ``TRITON_INTERPRET=1``.
- ``"cpu"``: torch's pooling for the local candidates and the C++ CPU strip-gate kernel.
- ``"torch"``: the pure-PyTorch reference.
- ``"auto"`` (default): ``"triton"`` on CUDA tensors, ``"cpu"`` on CPU tensors. The environment
  variable ``METAPOOL_BACKEND`` (``triton``/``cpu``/``torch``) overrides ``auto``.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from . import ops
from .reference import (PAPER_CANDIDATES, MetaPooling, compute_dtype, gate_conv, local_op, strip_means)

BACKENDS = ("auto", "triton", "cpu", "torch")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend == "auto":
        backend = os.environ.get("METAPOOL_BACKEND", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"METAPOOL_BACKEND={backend!r} is not one of {list(BACKENDS)}")
    if backend == "auto":
        return "triton" if x.is_cuda else "cpu"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 "
                           "(the Triton interpreter); use backend='auto' or 'cpu' for CPU kernels")
    if backend == "cpu" and x.is_cuda:
        raise RuntimeError("backend='cpu' was asked for but x is on CUDA")
    return backend


class FusedMetaPooling(MetaPooling):
    """Meta-Pooling with fused kernels; numbers match :class:`MetaPooling` up to float rounding."""

    def __init__(self, channels: int, candidates: Sequence[str] = PAPER_CANDIDATES, backend: str = "auto"):
        super().__init__(channels, candidates)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.backend = backend

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def _gates(self):
        if self.gate_h is None:
            return None
        return (self.gate_h.weight, self.gate_h.bias, self.gate_w.weight, self.gate_w.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._validate(x)
        backend = resolve_backend(self.backend, x)
        if backend == "torch":
            return super().forward(x)
        names, pi = self._mixture(x)
        if backend == "triton":
            from .ops.meta_pool import mix  # Triton is imported only when it is used
            return mix(x, pi, names, self._gates())
        return self._forward_cpu(x, names, pi)

    def _mixture(self, x: torch.Tensor):
        """(ops to compute, their weights): a fixed layer's one op with no weight, else every
        candidate with softmax(α) in x's compute dtype."""
        if self.fixed is not None:
            return (self.fixed,), None
        return self.candidates, torch.softmax(self.alpha.to(compute_dtype(x.dtype)), dim=0)

    def _forward_cpu(self, x: torch.Tensor, names, pi) -> torch.Tensor:
        xc = x.to(compute_dtype(x.dtype))
        local = None
        for k, name in enumerate(names):
            if name == "strip":
                continue
            term = local_op(name, xc)
            term = term if pi is None else pi[k] * term
            local = term if local is None else local + term
        if "strip" not in names:
            return local.to(x.dtype)
        z_h, z_w = strip_means(xc)
        g_h, g_w = gate_conv(z_h, self.gate_h), gate_conv(z_w, self.gate_w)
        weight = None if pi is None else pi[names.index("strip")]
        base = None if local is None else local.to(x.dtype)
        return ops.strip_gate(x, g_h, g_w, base, weight)
