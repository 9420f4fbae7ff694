"""The drop-in fused layer.

``FusedMetaPooling`` is ``MetaPooling`` (same constructor, parameters, state_dict keys, ``probs``,
``fix``) with the computation routed to one op, ``metapool::meta_pool``, whose kernel the tensor's
device picks: C++ on CPU tensors, Triton on CUDA tensors. Validation and the search/fixed logic are
the reference's. Backends:

- ``"auto"`` (default): the op; the device picks its kernels.
- ``"triton"``: the Triton kernels whatever the device; on CPU tensors through Triton's
  interpreter (``TRITON_INTERPRET=1``), which is how they are tested without a GPU.
- ``"torch"``: the pure-PyTorch reference.
The environment variable ``METAPOOL_BACKEND`` (``triton``/``torch``) overrides ``auto``; it is read
when the layer is built (or its ``backend`` assigned), never per call.

The call path is kept thin because a derived network at batch 1 calls a layer per block on maps of
a few hundred bytes, where Python costs as much as the kernel: the input is validated once per
(shape, dtype, device), the op's candidate string is built once per candidate set.
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch

from .ops.meta_pool import mix, triton_on_cpu
from .reference import PAPER_CANDIDATES, MetaPooling, compute_dtype

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str) -> str:
    """The backend a layer built with ``backend`` runs: ``METAPOOL_BACKEND`` resolves ``"auto"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("METAPOOL_BACKEND", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"METAPOOL_BACKEND={backend!r} is not one of {list(BACKENDS)}")
    return backend


def _check_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 "
                           "(the Triton interpreter); use backend='auto' for the C++ CPU kernels")


class FusedMetaPooling(MetaPooling):
    """Meta-Pooling with fused kernels; numbers match :class:`MetaPooling` up to float rounding."""

    def __init__(self, channels: int, candidates: Sequence[str] = PAPER_CANDIDATES, backend: str = "auto"):
        super().__init__(channels, candidates)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._route = resolve_backend(value)
        self._backend = value
        self._validated = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def _gates(self):
        # Straight from _modules: nn.Module.__getattr__ costs microseconds a lookup on this path.
        gate_h, gate_w = self._modules.get("gate_h"), self._modules.get("gate_w")
        if gate_h is None:
            return None
        return (gate_h.weight, gate_h.bias, gate_w.weight, gate_w.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self._route
        # Traced (torch.jit.trace, the TorchScript ONNX exporter), the layer records the reference's
        # standard ops, so a traced file runs without this package.
        if route == "torch" or torch.jit.is_tracing():
            return super().forward(x)
        alpha = self._parameters["alpha"]
        # Everything _validate looks at lives on the host; a new key is checked once.
        # Under torch.compile the check runs once at trace time and the cache would be a guarded
        # side effect, so it is bypassed there.
        if torch.compiler.is_compiling():
            self._validate(x)
        else:
            key = (x.shape, x.dtype, x.device, alpha.shape, alpha.device)
            if key != self._validated:
                self._validate(x)
                self._validated = key
        if self.fixed is not None:
            names, pi = (self.fixed,), None
        else:
            names, pi = self.candidates, torch.softmax(alpha.to(compute_dtype(x.dtype)), dim=0)
        if route == "triton" and not x.is_cuda:
            _check_interpreter()
            with triton_on_cpu():
                return mix(x, pi, names, self._gates())
        return mix(x, pi, names, self._gates())
