"""The drop-in fused layer.

``FusedMetaPooling`` is ``MetaPooling`` (same constructor, parameters, state_dict keys, ``probs``,
``fix``) with the computation routed to one op, ``metapool::meta_pool``, whose kernel the tensor's
device picks: C++ on CPU tensors, Triton (+ the CUDA strip gate) on CUDA tensors. Validation and
the search/fixed logic are the reference's. Backends:

- ``"auto"`` (default): the op; the device picks its kernels.
- ``"triton"``: the Triton kernels whatever the device; on CPU tensors through Triton's
  interpreter (``TRITON_INTERPRET=1``), which is how they are tested without a GPU.
- ``"torch"``: the pure-PyTorch reference.
The environment variable ``METAPOOL_BACKEND`` (``triton``/``torch``) overrides ``auto``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch

from .ops.meta_pool import mix, triton_on_cpu
from .reference import PAPER_CANDIDATES, MetaPooling, compute_dtype

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend == "auto":
        backend = os.environ.get("METAPOOL_BACKEND", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"METAPOOL_BACKEND={backend!r} is not one of {list(BACKENDS)}")
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 "
                           "(the Triton interpreter); use backend='auto' for the C++ CPU kernels")
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
        if self.fixed is not None:
            names, pi = (self.fixed,), None
        else:
            names, pi = self.candidates, torch.softmax(self.alpha.to(compute_dtype(x.dtype)), dim=0)
        interpreted = backend == "triton" and not x.is_cuda
        with triton_on_cpu() if interpreted else contextlib.nullcontext():
            return mix(x, pi, names, self._gates())
