"""A short run of Meta-Pooling on a batch of real Fashion-MNIST images."""
from __future__ import annotations

import time

import torch
from torch import nn

from metapool_kernels import MetaPooling, ops
from metapool_kernels.pmpl.data import load_fashion_mnist
from metapool_kernels.reference import strip_gate as strip_gate_reference


def main() -> None:
    torch.manual_seed(0)
    images, labels = load_fashion_mnist("train")
    x = images[:256].float().div(255).unsqueeze(1)
    stem = nn.Conv2d(1, 16, 3, padding=1)
    with torch.no_grad():
        feats = torch.relu(stem(x))
    print(f"Fashion-MNIST batch: {tuple(x.shape)}, features {tuple(feats.shape)}, labels {labels[:10].tolist()}")

    layer = MetaPooling(16)
    out = layer(feats)
    out.square().mean().backward()
    print(f"MetaPooling (reference): out {tuple(out.shape)}, π = {[round(p, 3) for p in layer.probs().tolist()]}")
    print("  ∂loss/∂α =", [f"{g:+.2e}" for g in layer.alpha.grad.tolist()])

    with torch.no_grad():
        z_h, z_w = feats.mean(3), feats.mean(2)
        g_h, g_w = layer.gate_h(z_h), layer.gate_w(z_w)
        t0 = time.perf_counter()
        fused = ops.strip_gate(feats, g_h, g_w)
        t_fused = time.perf_counter() - t0
        t0 = time.perf_counter()
        eager = strip_gate_reference(feats, g_h, g_w)
        t_eager = time.perf_counter() - t0
    err = ((fused - eager).norm() / eager.norm()).item()
    print(f"strip_gate (C++ CPU kernel) vs eager: relative error {err:.2e}; "
          f"{t_fused * 1e3:.2f} ms vs {t_eager * 1e3:.2f} ms on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
