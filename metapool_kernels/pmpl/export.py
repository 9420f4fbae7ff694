"""``python -m metapool_kernels.pmpl export``: a retrained network as one ONNX file, checked with
ONNX Runtime on real test images of the data set it was trained on.

The network, its genotype and its input shape come from the checkpoint; the file holds standard
ONNX ops only (see metapool_kernels/export.py), so it runs wherever ONNX Runtime (or TensorRT,
OpenVINO, ...) does, without this package.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from ..export import onnx_op_types, to_onnx
from . import networks, runs
from .data import build_data

# Logits of ONNX Runtime and PyTorch may differ by float32 rounding, which grows with depth and with
# the logits' size (an undertrained network's reach the hundreds): the tolerance is on the largest
# difference relative to the largest logit, when that exceeds 1. A larger one means the exported
# graph computes something else.
DEFAULT_ATOL = 1e-3


@dataclass
class ExportResult:
    path: Path
    images: int               # test images both runtimes classified
    top1_agreement: float     # % of them given the same top-1 class by ONNX Runtime and PyTorch
    max_abs_error: float      # largest |logit difference|
    input_shape: tuple        # ("batch", C, H, W): the input the model takes, its batch dynamic
    opset: int
    onnx_ops: List[str]


def export_checkpoint(checkpoint: str, out: str, *, images: int = 1000, batch_size: int = 100,
                      data_dir: Optional[str] = None, atol: float = DEFAULT_ATOL, arch: Optional[str] = None,
                      log: Callable[..., None] = print) -> ExportResult:
    """Export the network of a retrain checkpoint to ``out`` and verify it with ONNX Runtime on
    ``images`` test images; raises ValueError when the two runtimes' logits differ by more than ``atol``.
    ``arch``: the factory of one's own network (a checkpoint never names code to run)."""
    import onnx
    import onnxruntime

    ckpt = runs.load_checkpoint(checkpoint, kind="train")
    if not ckpt.get("model_config"):
        raise ValueError(f"{checkpoint} was written for a model built in Python; export it with "
                         "metapool_kernels.export.to_onnx")
    cfg = ckpt["config"]
    model = networks.model_from_checkpoint(ckpt, checkpoint, arch)
    model.eval()

    data = build_data(data_dir=data_dir if data_dir is not None else cfg.get("data_dir"), batch_size=batch_size,
                      meta_fraction=None, test_subset=images, train=False, workers=0,
                      image_size=cfg.get("image_size"), seed=cfg.get("seed", 0))
    first, _ = next(iter(data.test))
    path = to_onnx(model, first, out).resolve()
    proto = onnx.load(str(path))
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    count = agree = 0
    max_err = scale = 0.0
    with torch.no_grad():
        for x, _ in data.test:
            expected = model(x)
            (got,) = session.run(None, {input_name: x.numpy()})
            got = torch.from_numpy(got)
            max_err = max(max_err, (got - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
            agree += (got.argmax(1) == expected.argmax(1)).sum().item()
            count += x.shape[0]
    result = ExportResult(path=path, images=count, top1_agreement=100.0 * agree / count, max_abs_error=max_err,
                          input_shape=("batch", *first.shape[1:]), opset=opset, onnx_ops=onnx_op_types(proto))
    log(f"ONNX model: {result.path} ({path.stat().st_size / 2 ** 20:.1f} MiB, opset {opset}, "
        f"input (batch, {', '.join(map(str, first.shape[1:]))}), batch dynamic)")
    log(f"  ops: {', '.join(result.onnx_ops)}")
    log(f"  verified with ONNX Runtime {onnxruntime.__version__} on {count} {data.name} test images: "
        f"top-1 agreement with PyTorch {result.top1_agreement:.2f} %, max abs logit error {max_err:.2e}")
    if not max_err <= atol * max(1.0, scale):  # NaN fails too
        raise ValueError(f"{path}: ONNX Runtime's logits differ from PyTorch's by {max_err:.3g} > {atol:g} x "
                         f"{max(1.0, scale):.3g} (the largest logit); the exported model does not compute the "
                         "trained network")
    return result
