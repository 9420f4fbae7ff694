"""The networks a run trains, and their description in checkpoints and genotype files."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from torch import nn

from .data import DataBundle
from .runs import RunConfig, restoring

def default_small_input(image_size: int, small_input: Optional[bool]) -> bool:
    return image_size <= 64 if small_input is None else small_input


def run_model_config(cfg: RunConfig, enhancer, data: DataBundle) -> Dict[str, Any]:
    """The MobileNetV2 a config describes, for ``data``'s images and classes."""
    return model_config(enhancer, width_mult=cfg.width, num_classes=data.num_classes, in_chans=data.in_chans,
                        small_input=default_small_input(data.image_size, cfg.small_input),
                        candidates=cfg.candidates, seed=cfg.seed)


def build_model(model_config: Dict[str, Any]) -> nn.Module:
    """MobileNetV2 from the description a checkpoint stores (see :func:`model_config`)."""
    from ..models import mobilenet_v2

    cfg = dict(model_config)
    return mobilenet_v2(enhancer=cfg.pop("enhancer"), **cfg)


def model_from_checkpoint(ckpt: Dict[str, Any], path: Path | str) -> nn.Module:
    """The network a checkpoint describes (``model_config``), with its saved weights."""
    if not ckpt.get("model_config"):
        raise ValueError(f"{path} was written for a custom model; evaluate it with metapool_kernels.pmpl.evaluate")
    with restoring(path, "the network"):
        model = build_model(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    return model


def model_config(enhancer, *, width_mult: float, num_classes: int, in_chans: int, small_input: bool,
                 candidates: Sequence[str], seed: int) -> Dict[str, Any]:
    return {"enhancer": list(enhancer) if not isinstance(enhancer, str) else enhancer, "width_mult": width_mult,
            "num_classes": num_classes, "in_chans": in_chans, "small_input": small_input,
            "candidates": list(candidates), "seed": seed}


def describe_model(model: nn.Module, in_chans: int, image_size: int) -> Dict[str, Any]:
    """Parameters and multiply-adds of one image (MACs only for the library's MobileNetV2)."""
    from ..models import count_macs, count_params

    info: Dict[str, Any] = {"params": count_params(model)}
    try:
        info["macs"] = count_macs(model, (1, in_chans, image_size, image_size))
    except Exception:  # a custom model the flop counter cannot trace: leave MACs out
        info["macs"] = None
    return info


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
