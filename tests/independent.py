"""An independent float64 implementation of docs/DESIGN.md's semantics.

Written from the text of the design, not from the package: no F.avg_pool2d / F.max_pool2d /
F.conv1d, no import from metapool_kernels. Windows are explicit loops over the k×k offsets of a
padded copy; the gate convs are explicit matrix products. Everything is differentiable, so its
autograd gradients are the reference gradients too. Every function returns float64.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

CANDIDATES = ("skip", "avg3", "avg5", "avg7", "max3", "max5", "max7", "strip")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def _windows(padded: torch.Tensor, k: int, h: int, w: int):
    """Yield the k*k shifted (N, C, H, W) views of a padded tensor, in row-major window order."""
    for di in range(k):
        for dj in range(k):
            yield padded[:, :, di:di + h, dj:dj + w]


def avg_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """k×k mean, stride 1, padding k//2, dividing by the number of in-image elements."""
    x = _f64(x)
    n, c, h, w = x.shape
    p = k // 2
    padded = F.pad(x, (p, p, p, p), value=0.0)
    inside = F.pad(torch.ones(1, 1, h, w, dtype=torch.float64, device=x.device), (p, p, p, p), value=0.0)
    total = torch.zeros_like(x)
    count = torch.zeros(1, 1, h, w, dtype=torch.float64, device=x.device)
    for win, ones in zip(_windows(padded, k, h, w), _windows(inside, k, h, w)):
        total = total + win
        count = count + ones
    return total / count


def max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """k×k max, stride 1, padding k//2 (padding never wins). NaN in a window gives NaN; among
    equal maxima the first in row-major window order is selected, so its gradient goes there."""
    x = _f64(x)
    n, c, h, w = x.shape
    p = k // 2
    padded = F.pad(x, (p, p, p, p), value=float("-inf"))
    best = None
    for win in _windows(padded, k, h, w):
        if best is None:
            best = win
            continue
        take = ((win > best) | win.isnan()) & ~best.isnan()
        best = torch.where(take, win, best)
    return best


def kernel_size(name: str) -> int:
    return int(name[3:])


def local_op(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "skip":
        return _f64(x)
    if name.startswith("avg"):
        return avg_pool(x, kernel_size(name))
    if name.startswith("max"):
        return max_pool(x, kernel_size(name))
    raise ValueError(f"not a local candidate: {name!r}")


def sigmoid(g: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-_f64(g)))


def strip_means(x: torch.Tensor):
    """(mean over W: (N, C, H), mean over H: (N, C, W))."""
    x = _f64(x)
    return x.sum(3) / x.shape[3], x.sum(2) / x.shape[2]


def pointwise_conv(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """nn.Conv1d(C, C, 1) on (N, C, L): out[n, o, l] = Σ_c weight[o, c, 0] z[n, c, l] + bias[o]."""
    wm = _f64(weight).reshape(weight.shape[0], weight.shape[1])
    return torch.einsum("oc,ncl->nol", wm, _f64(z)) + _f64(bias)[None, :, None]


def strip_gate(x, g_h, g_w, base: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None):
    """base + weight * x * σ(g_h)[..., :, None] * σ(g_w)[..., None, :] (base 0, weight 1 if absent)."""
    y = _f64(x) * sigmoid(g_h)[..., :, None] * sigmoid(g_w)[..., None, :]
    if weight is not None:
        y = _f64(weight).reshape(()) * y
    if base is not None:
        y = _f64(base) + y
    return y


def strip_op(x: torch.Tensor, gates: Dict[str, torch.Tensor]) -> torch.Tensor:
    z_h, z_w = strip_means(x)
    g_h = pointwise_conv(z_h, gates["gate_h.weight"], gates["gate_h.bias"])
    g_w = pointwise_conv(z_w, gates["gate_w.weight"], gates["gate_w.bias"])
    return strip_gate(x, g_h, g_w)


def candidate_op(name: str, x: torch.Tensor, gates: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    if name == "strip":
        if gates is None:
            raise ValueError("strip needs the gate conv parameters")
        return strip_op(x, gates)
    return local_op(name, x)


def softmax(alpha: torch.Tensor) -> torch.Tensor:
    a = _f64(alpha)
    e = torch.exp(a - a.max())
    return e / e.sum()


def mixture(x: torch.Tensor, alpha: torch.Tensor, candidates: Sequence[str],
            gates: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Σ_k softmax(alpha)_k op_k(x)."""
    pi = softmax(alpha)
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for k, name in enumerate(candidates):
        out = out + pi[k] * candidate_op(name, x, gates)
    return out


def module_params(module, requires_grad: bool = True) -> Dict[str, torch.Tensor]:
    """float64 leaf copies of a Meta-Pooling layer's parameters, keyed as in its state_dict."""
    params = {name: p.detach().to(torch.float64).clone().requires_grad_(requires_grad)
              for name, p in module.named_parameters()}
    return params


def meta_pooling(x: torch.Tensor, params: Dict[str, torch.Tensor], candidates: Sequence[str],
                 fixed: Optional[str] = None) -> torch.Tensor:
    """What a Meta-Pooling layer computes: the single op when fixed, else the α-mixture."""
    gates = params if "strip" in candidates else None
    if fixed is not None:
        return candidate_op(fixed, x, gates)
    return mixture(x, params["alpha"], candidates, gates)
