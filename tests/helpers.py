"""Shared test utilities: devices, the docs/DESIGN.md tolerances, one verbose comparison, layouts."""
from __future__ import annotations

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

# ‖out − ref‖ / ‖ref‖ against a float64 reference computed on the same (rounded) inputs.
TOL = {
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.5e-2,
    torch.float64: 1e-12,
}
# docs/DESIGN.md: gradients of x may be 5x looser, gradients of alpha and of the gate convs 20x.
X_GRAD_MULT = 5
PARAM_GRAD_MULT = 20

LOW_PRECISION = (torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "noncontiguous")


def _describe_worst(out: torch.Tensor, ref: torch.Tensor, bad: torch.Tensor, limit: int = 5) -> str:
    """The first ``limit`` positions of ``bad`` (row-major), with both values."""
    idx = bad.nonzero()[:limit]
    lines = []
    for i in idx.tolist():
        pos = tuple(i)
        lines.append(f"    at {pos}: got {out[pos].item()!r}, expected {ref[pos].item()!r}")
    more = int(bad.sum()) - len(lines)
    if more > 0:
        lines.append(f"    ... and {more} more")
    return "\n".join(lines)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "",
                     scale: float = 0.0) -> None:
    """Fail unless ‖out − ref‖ / max(‖ref‖, scale) ≤ tol (in float64) and non-finite values
    agree exactly.

    NaN must sit where the reference has NaN and ±Inf where it has the same ±Inf; any other
    non-finite value fails whatever the tolerance, so a NaN can never hide inside a norm.
    ``scale`` is for references that vanish by cancellation (the gradient of alpha when two
    candidates coincide on a tiny plane): they are held to the size of the terms that cancelled.
    """
    label = f"{name}: " if name else ""
    if not isinstance(out, torch.Tensor):
        raise AssertionError(f"{label}expected a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"{label}shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    if out.numel() == 0:
        return
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)

    o_nan, r_nan = o.isnan(), r.isnan()
    o_inf, r_inf = o.isinf(), r.isinf()
    nonfinite_bad = (o_nan != r_nan) | (o_inf != r_inf) | (o_inf & r_inf & (o.sign() != r.sign()))
    if nonfinite_bad.any():
        raise AssertionError(
            f"{label}NaN/Inf mismatch at {int(nonfinite_bad.sum())} of {o.numel()} elements "
            f"(output has {int(o_nan.sum())} NaN / {int(o_inf.sum())} Inf, reference "
            f"{int(r_nan.sum())} NaN / {int(r_inf.sum())} Inf)\n"
            + _describe_worst(o, r, nonfinite_bad)
        )

    finite = o.isfinite() & r.isfinite()
    diff = torch.where(finite, o - r, torch.zeros_like(o))
    ref_norm = torch.where(finite, r, torch.zeros_like(r)).norm().item()
    err_norm = diff.norm().item()
    denom = max(ref_norm, scale)
    # An all-zero reference with no scale (a gradient that must vanish) is held to an absolute bound.
    rel = err_norm / denom if denom > 0 else err_norm
    if not rel <= tol:
        abs_diff = diff.abs()
        flat = abs_diff.flatten()
        k = min(5, flat.numel())
        worst = flat.topk(k).indices
        lines = []
        for fi in worst.tolist():
            pos = tuple(int(p) for p in torch.unravel_index(torch.tensor(fi), o.shape)) if o.dim() else ()
            lines.append(f"    at {pos}: got {o[pos].item()!r}, expected {r[pos].item()!r} "
                         f"(|diff| {abs_diff[pos].item():.3e})")
        rms_ref = ref_norm / o.numel() ** 0.5
        n_bad = int((abs_diff > tol * rms_ref).sum())
        raise AssertionError(
            f"{label}relative error {rel:.3e} exceeds tolerance {tol:.1e} "
            f"(‖out−ref‖ = {err_norm:.3e}, ‖ref‖ = {ref_norm:.3e}, scale {scale:.3e}, "
            f"shape {tuple(o.shape)}, dtype {out.dtype}, {n_bad} elements off by more than tol × RMS(ref))\n"
            "  worst elements:\n" + "\n".join(lines)
        )


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``x`` in another memory layout (a new tensor, detached from ``x``'s graph).

    "noncontiguous" is a view with stride 2 in every dim but the first, into a larger buffer whose
    gaps hold NaN, so a kernel that ignores strides reads NaN and fails loudly.
    """
    x = x.detach()
    if layout == "contiguous":
        return x.clone(memory_format=torch.contiguous_format)
    if layout == "channels_last":
        if x.dim() != 4:
            raise ValueError(f"channels_last needs a 4-D tensor, got {x.dim()}-D")
        return x.clone(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        if x.dim() == 0:
            return x.clone()
        shape = [x.shape[0]] + [2 * s for s in x.shape[1:]]
        buf = torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
        view = buf[(slice(None),) + (slice(None, None, 2),) * (x.dim() - 1)]
        view.copy_(x)
        return view
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(shape, seed: int, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Seeded standard-normal values, drawn on the CPU in float64 so every dtype and device
    sees the same numbers (rounded once to ``dtype``)."""
    g = make_generator(seed)
    t = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale
    return t.to(device=device, dtype=dtype)
