"""Pure-PyTorch Meta-Pooling: the contract every fused kernel is held to.

Meta-Pooling (Dong et al., "Progressive Meta-Pooling Learning for Lightweight Image
Classification Model") places a parameterized spatial enhancer after each block of a
lightweight CNN: a softmax(alpha)-weighted mixture of candidate pooling ops (no enhancer,
local average / max pooling of several sizes, and a global strip-pooling enhancer).

Everything here is written for clarity, not speed. The fused modules in
:mod:`metapool_kernels.modules` must produce the same numbers up to float rounding.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

PAPER_CANDIDATES: Tuple[str, ...] = ("skip", "avg3", "avg5", "avg7", "max3", "max5", "max7", "strip")
LOCAL_CANDIDATES: Tuple[str, ...] = PAPER_CANDIDATES[:-1]


# --------------------------------------------------------------------------------------------
# Validation, shared by every backend.
# --------------------------------------------------------------------------------------------
def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(
            f"{name} must be a real floating-point tensor (float32, float16, bfloat16 or float64), "
            f"got dtype {t.dtype}"
        )


def check_input(x: torch.Tensor, channels: Optional[int] = None, name: str = "x") -> None:
    """Raise a clear error for any input the ops do not accept (before any kernel launch)."""
    check_floating(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{name} has {x.shape[1]} channels but this layer was built for {channels} "
            f"(shape {tuple(x.shape)})"
        )


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on the same device, got {listing}")


def check_candidates(candidates: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(candidates, str):
        raise TypeError("candidates must be a sequence of op names, not a single string")
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("candidates must name at least one op")
    unknown = [c for c in candidates if c not in PAPER_CANDIDATES]
    if unknown:
        raise ValueError(f"unknown candidate op(s) {unknown}; known ops are {list(PAPER_CANDIDATES)}")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"candidates must not repeat an op, got {list(candidates)}")
    return candidates


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Candidate ops.
# --------------------------------------------------------------------------------------------
def kernel_size(name: str) -> int:
    """Window size of a local candidate ('avg5' -> 5); 1 for skip, 0 for strip."""
    if name == "skip":
        return 1
    if name == "strip":
        return 0
    return int(name[3:])


def avg_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)


def max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(x, k, stride=1, padding=k // 2)


def local_op(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "skip":
        return x
    k = kernel_size(name)
    return avg_pool(x, k) if name.startswith("avg") else max_pool(x, k)


def strip_means(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """z_h = mean over W, shape (N, C, H); z_w = mean over H, shape (N, C, W)."""
    return x.mean(3), x.mean(2)


def gate_conv(z: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    # Parameters stay float32; a float64 input (gradcheck) runs the conv in float64.
    return F.conv1d(z, conv.weight.to(z.dtype), conv.bias.to(z.dtype))


def strip_gate(x: torch.Tensor, g_h: torch.Tensor, g_w: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(g_h)[..., :, None] * sigmoid(g_w)[..., None, :]."""
    return x * torch.sigmoid(g_h)[..., :, None] * torch.sigmoid(g_w)[..., None, :]


def strip_op(x: torch.Tensor, gate_h: nn.Conv1d, gate_w: nn.Conv1d) -> torch.Tensor:
    z_h, z_w = strip_means(x)
    return strip_gate(x, gate_conv(z_h, gate_h), gate_conv(z_w, gate_w))


def candidate_op(name: str, x: torch.Tensor, gate_h=None, gate_w=None) -> torch.Tensor:
    if name == "strip":
        return strip_op(x, gate_h, gate_w)
    return local_op(name, x)


OP_DOCS: Dict[str, str] = {
    "skip": "identity",
    "avg3": "3x3 average pooling, stride 1, padding 1, count_include_pad=False",
    "avg5": "5x5 average pooling, stride 1, padding 2, count_include_pad=False",
    "avg7": "7x7 average pooling, stride 1, padding 3, count_include_pad=False",
    "max3": "3x3 max pooling, stride 1, padding 1",
    "max5": "5x5 max pooling, stride 1, padding 2",
    "max7": "7x7 max pooling, stride 1, padding 3",
    "strip": "global strip-pooling enhancer x * sigmoid(gate_h(mean_W x)) * sigmoid(gate_w(mean_H x))",
}


# --------------------------------------------------------------------------------------------
# The module.
# --------------------------------------------------------------------------------------------
def _in_torchscript_onnx_export() -> bool:
    for name in ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals"):
        try:
            return bool(importlib.import_module(name).GLOBALS.in_onnx_export)
        except (ImportError, AttributeError):
            continue
    return False


class MetaPooling(nn.Module):
    """Parameterized spatial enhancer: ``sum_k softmax(alpha)_k * op_k(x)``.

    Once :meth:`fix` names an op, the layer computes exactly that op (no weight) and nothing else.
    The fixed choice and the candidate list travel with ``state_dict()`` (as extra state): checkpoints
    restore the choice, and a layer refuses a state saved from other candidates.
    """

    def __init__(self, channels: int, candidates: Sequence[str] = PAPER_CANDIDATES):
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.candidates: Tuple[str, ...] = check_candidates(candidates)
        self.alpha = nn.Parameter(torch.zeros(len(self.candidates)))
        if "strip" in self.candidates:
            self.gate_h = nn.Conv1d(channels, channels, 1)
            self.gate_w = nn.Conv1d(channels, channels, 1)
        else:
            self.gate_h = None
            self.gate_w = None
        self.fixed: Optional[str] = None

    # -- search state ---------------------------------------------------------------------
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.alpha, dim=0)

    def fix(self, name: str) -> None:
        """Compute only op ``name`` from now on. A fixed layer stays fixed: fixing it again to its own
        op does nothing, to another op is refused (the choice of Eq. 4 is final; build a new layer,
        or load a state_dict, to choose again)."""
        if name not in self.candidates:
            raise ValueError(f"cannot fix to {name!r}: not among this layer's candidates {list(self.candidates)}")
        if self.fixed is not None and self.fixed != name:
            raise ValueError(f"this layer is already fixed to {self.fixed!r}; it cannot be fixed again to {name!r}")
        self.fixed = name
        self.alpha.requires_grad_(False)

    def get_extra_state(self):
        # The candidates travel with α: α's k-th entry means op k only for this candidate list.
        return {"fixed": self.fixed, "candidates": list(self.candidates)}

    def set_extra_state(self, state) -> None:
        """Restore the fixed op; refuse a state saved from a layer with other candidates (or in
        another order). States without ``candidates`` (older checkpoints) are accepted."""
        if not isinstance(state, dict) or not set(state) <= {"fixed", "candidates"}:
            raise ValueError(f"expected {{'fixed': op or None, 'candidates': [op, ...]}}, got {state!r}")
        saved = state.get("candidates")
        if saved is not None and (not isinstance(saved, (list, tuple)) or tuple(saved) != self.candidates):
            raise ValueError(f"the state was saved from a layer with candidates {saved!r}, this layer has "
                             f"{list(self.candidates)}: alpha's entries would mean other ops")
        fixed = state.get("fixed")
        if fixed is not None and fixed not in self.candidates:
            raise ValueError(f"the state is fixed to {fixed!r}, not among this layer's candidates "
                             f"{list(self.candidates)}")
        self.fixed = fixed
        self.alpha.requires_grad_(fixed is None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The TorchScript-based ONNX exporter (torch.onnx.export(..., dynamo=False)) takes every
        # state_dict value for a tensor; the fixed op is in the traced graph already.
        if _in_torchscript_onnx_export():
            destination.pop(prefix + "_extra_state", None)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (its forward dispatches in Python). "
            "For a TorchScript file use torch.jit.trace on a derived network (every layer fixed): it records "
            "standard ops and loads without this package. For other deployments use torch.export.export or "
            "torch.onnx.export(..., dynamo=True).")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        except ValueError as e:  # from set_extra_state: say which layer
            raise ValueError(f"{prefix}_extra_state: {e}") from e

    def extra_repr(self) -> str:
        s = f"{self.channels}, candidates={list(self.candidates)}"
        if self.fixed is not None:
            s += f", fixed={self.fixed!r}"
        return s

    # -- compute ----------------------------------------------------------------------------
    def _validate(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing():
            # Traced, sizes are graph values: the checks hold for the example input and would only
            # warn that a comparison of sizes is recorded as a constant.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                check_input(x, self.channels)
            return
        check_input(x, self.channels)
        check_same_device(x=x, alpha=self.alpha)
        if self.alpha.shape != (len(self.candidates),):  # shapes live on the host: no synchronisation
            raise ValueError(f"alpha has shape {tuple(self.alpha.shape)} but this layer has "
                             f"{len(self.candidates)} candidates {list(self.candidates)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._validate(x)
        xc = x.to(compute_dtype(x.dtype))
        if self.fixed is not None:
            out = candidate_op(self.fixed, xc, self.gate_h, self.gate_w)
        else:
            pi = torch.softmax(self.alpha.to(xc.dtype), dim=0)  # float64 inputs stay float64 throughout
            out = sum(pi[k] * candidate_op(name, xc, self.gate_h, self.gate_w)
                      for k, name in enumerate(self.candidates))
        return out.to(x.dtype)

