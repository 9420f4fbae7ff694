"""MobileNetV2 with a spatial enhancer after every block, and the genotype helpers PMPL needs.

Papers:
- Meta-Pooling: Dong et al., "Progressive Meta-Pooling Learning for Lightweight Image
  Classification Model". Tables 1-4 define the enhancers built here.
- MobileNetV2: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
- SE: Hu et al., "Squeeze-and-Excitation Networks", TPAMI 2020.
- CBAM: Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018.
- Coordinate Attention: Hou et al., "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021.
- SKNet: Li et al., "Selective Kernel Networks", CVPR 2019.

The backbone is torchvision's MobileNetV2; the attention baselines are timm's modules, configured so
that the parameter counts match the Meta-Pooling paper's Table 4 (see ``ENHANCER_DOCS``).

Parameters of MobileNetV2-1.0, 1000 classes (paper Table 4 in brackets): none 3,504,872 (3.50M);
se 3,563,492 (3.56M); cbam 3,565,192 (3.57M); coordatt 3,951,504 (3.95M); sk 5,279,584 (5.28M);
meta 3,963,440 while searching (3.91M: a derived network has between 3.50M and 3.96M, depending on
how many of its layers chose 'strip', the only op with parameters).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torchvision
from timm.layers import SEModule
from timm.layers.cbam import CbamModule
from timm.layers.coord_attn import CoordAttn
from timm.layers.selective_kernel import SelectiveKernel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .insert import EnhancedBlock, init_new_modules as _init_new, insert_enhancers
from .reference import PAPER_CANDIDATES, MetaPooling

__all__ = [
    "ENHANCERS", "ENHANCER_DOCS", "NUM_BLOCKS", "SMALL_INPUT_STRIDE1", "EnhancedBlock", "mobilenet_v2",
    "meta_layers", "searchable_layers", "derive", "alpha_parameters", "weight_parameters",
    "check_genotype", "save_genotype", "load_genotype", "read_genotype_file", "count_params", "count_macs",
    "count_flops",
]

NUM_BLOCKS = 17  # inverted-residual blocks in MobileNetV2, at every width multiplier
BLOCK_NAMES = tuple(f"features.{i + 1}" for i in range(NUM_BLOCKS))

ENHANCERS: Tuple[str, ...] = ("none", "maxpool", "avgpool", "strip", "random", "meta",
                              "se", "cbam", "coordatt", "sk")

ENHANCER_DOCS: Dict[str, str] = {
    "none": "No enhancer (nn.Identity): plain MobileNetV2. Table 1 'Skip', Table 3 'No', Table 4 baseline.",
    "maxpool": "Every block followed by 3x3 max pooling, stride 1 (a layer fixed to 'max3'). Table 1 'MaxPool'.",
    "avgpool": "Every block followed by 3x3 average pooling, stride 1 (a layer fixed to 'avg3'). "
               "Table 1 'AveragePool'; Table 3 'Local' (an average pooling layer with kernel size 3).",
    "strip": "Every block followed by the global context enhancer (spatial separable pooling, fixed to "
             "'strip'). Table 3 'Global'.",
    "random": "Each block followed by one op drawn at random from `candidates` with `seed`, fixed. "
              "Table 3 'Random' draws from the three enhancers: pass candidates=('skip', 'avg3', 'strip').",
    "meta": "Each block followed by a searchable Meta-Pooling layer over `candidates` (softmax(alpha) "
            "mixture; PMPL fixes it). Table 3 'PMPL', Table 4 '+Meta-Pooling'. A genotype (list of 17 op "
            "names) builds the derived network, each layer computing only its op.",
    "se": "timm SEModule after every block, reduction 8, fc biases. Table 4 '+SE' (3.56M); timm's default "
          "(reduction 16, divisor 8) would give 3.54M, reduction 8 reproduces the table.",
    "cbam": "timm CbamModule after every block, reduction 8, MLP biases, 7x7 spatial conv with BN. "
            "Table 4 '+CBAM' (3.57M); reduction 8 reproduces the table, as for SE.",
    "coordatt": "timm CoordAttn placed as in the Coordinate Attention paper's MobileNetV2: inside every "
                "block, after the depthwise conv (not after the block), with mip = max(8, C // 32), conv "
                "biases and h-swish. Table 4 '+CoordAttention' (3.95M); after the block, the same module gives "
                "3.55M (and still only 4.20M with no reduction at all).",
    "sk": "Every 3x3 depthwise conv replaced by an SK conv (SKNet paper, Sec. 3.1 and its MobileNet / "
          "ShuffleNet use): M=2 depthwise paths, 3x3 and 3x3 dilation 2, each conv-BN-ReLU6; fuse by global "
          "average pooling and fc (no bias) + BN + ReLU to d = max(C/r, L); select by softmax across paths. "
          "Table 4 '+SK' (5.28M) is reproduced by r=8 (the reduction the table's SE and CBAM rows use) and "
          "L=16; SKNet's typical r=16, L=32 would give 4.53M, and r=8, L=32 5.31M.",
}

# small_input=True makes the stem conv and the first block of the 24-channel stage stride 1 (the usual
# CIFAR adaptation of MobileNetV2): the total stride goes from 32 to 8, so 28x28 and 32x32 inputs end
# at 4x4 rather than 1x1, and the 5x5/7x7 pooling candidates still see a spatial map in late layers.
SMALL_INPUT_STRIDE1 = ("features.0 (stem conv)", "block 1 (first 24-channel block)")

# Reduction ratios and floors, chosen to reproduce the Meta-Pooling paper's Table 4 (see ENHANCER_DOCS).
SE_RD_RATIO = 1.0 / 8
COORD_GROUPS, COORD_MIN = 32, 8
SK_R, SK_L = 8, 16


# --------------------------------------------------------------------------------------------
# Genotypes.
# --------------------------------------------------------------------------------------------
def check_genotype(genotype, length: Optional[int] = NUM_BLOCKS) -> List[str]:
    """Return ``genotype`` as a list of op names, or raise ValueError saying what is wrong."""
    if isinstance(genotype, str) or not isinstance(genotype, (list, tuple)):
        raise ValueError(f"a genotype is a list of op names, one per block, got {type(genotype).__name__} "
                         f"{genotype!r}")
    if length is not None and len(genotype) != length:
        raise ValueError(f"genotype has {len(genotype)} ops, MobileNetV2 has {length} blocks: {list(genotype)}")
    bad = [(i, op) for i, op in enumerate(genotype) if not isinstance(op, str) or op not in PAPER_CANDIDATES]
    if bad:
        raise ValueError(f"genotype has unknown op(s) {bad} (block index, op); known ops are "
                         f"{list(PAPER_CANDIDATES)}")
    return list(genotype)


def save_genotype(genotype: Sequence[str], path: Union[str, os.PathLike], **meta) -> None:
    """Write ``{"genotype": [...], **meta}`` as JSON; meta values must be JSON-serialisable (lists, not
    tensors)."""
    text = json.dumps({"genotype": check_genotype(genotype, length=None), **meta}, indent=2)
    with open(path, "w") as f:  # serialised first, so a bad meta value leaves no half-written file
        f.write(text + "\n")


def read_genotype_file(path: Union[str, os.PathLike]) -> Dict:
    """The JSON object a genotype file holds, its ``genotype`` validated; ValueError (or
    FileNotFoundError) naming the file and the problem for anything else."""
    name = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"genotype file not found: {name!r}")
    if not os.path.isfile(path):
        raise ValueError(f"genotype file {name!r} is not a file (a folder? give the genotype.json inside it)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"genotype file {name!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or "genotype" not in data:
        raise ValueError(f"genotype file {name!r} has no 'genotype' key "
                         f"(expected {{\"genotype\": [op, ...], ...}})")
    try:
        data["genotype"] = check_genotype(data["genotype"], length=None)
    except ValueError as e:
        raise ValueError(f"genotype file {name!r}: {e}") from e
    return data


def load_genotype(path: Union[str, os.PathLike]) -> List[str]:
    """Read a genotype written by :func:`save_genotype`, validating every op name."""
    return read_genotype_file(path)["genotype"]


# --------------------------------------------------------------------------------------------
# Building.
# --------------------------------------------------------------------------------------------
def _check_enhancer(enhancer, candidates: Sequence[str]) -> None:
    """Refuse what MobileNetV2 cannot be built with, in its own terms (17 blocks); insert_enhancers
    then expands the name into one enhancer per block."""
    if not isinstance(enhancer, str):
        check_genotype(enhancer)
    elif enhancer not in ENHANCERS:
        raise ValueError(f"unknown enhancer {enhancer!r}; use one of {list(ENHANCERS)} or a genotype "
                         f"(a list of {NUM_BLOCKS} op names from {list(PAPER_CANDIDATES)})")
    elif enhancer == "random" and not check_genotype(candidates, length=None):
        raise ValueError("enhancer='random' needs at least one candidate")


def _depthwise_index(block: nn.Module) -> int:
    for i, layer in enumerate(block.conv):
        if isinstance(layer, nn.Sequential) and layer[0].groups > 1:
            return i
    raise RuntimeError(f"no depthwise conv found in {block}")


def _sk_conv(dw: nn.Sequential) -> SelectiveKernel:
    conv = dw[0]
    c = conv.out_channels
    return SelectiveKernel(c, c, kernel_size=[3, 5], stride=conv.stride[0], groups=c,
                           rd_channels=max(c // SK_R, SK_L), keep_3x3=True, split_input=False,
                           act_layer=nn.ReLU6)


def attention_enhancer(name: str, channels: int) -> nn.Module:
    """The Table 4 attention baselines that follow a block: SE or CBAM, sized as the paper's."""
    if name == "se":
        return SEModule(channels, rd_ratio=SE_RD_RATIO, rd_divisor=1)
    if name == "cbam":
        return CbamModule(channels, rd_ratio=SE_RD_RATIO, rd_divisor=1, mlp_bias=True)
    raise ValueError(f"unknown attention enhancer {name!r}")


def _check_build_args(width_mult, num_classes, in_chans, small_input, fused, seed) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not (
            math.isfinite(width_mult) and width_mult > 0):
        raise ValueError(f"width_mult must be a positive finite number, got {width_mult!r}")
    for name, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("small_input", small_input), ("fused", fused)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")


def mobilenet_v2(enhancer: Union[str, Sequence[str]] = "meta", width_mult: float = 1.0,
                 num_classes: int = 1000, in_chans: int = 3, small_input: bool = False,
                 candidates: Sequence[str] = PAPER_CANDIDATES, fused: bool = True,
                 seed: int = 0) -> nn.Module:
    """torchvision's MobileNetV2 with an enhancer after each of its 17 inverted-residual blocks.

    Args:
        enhancer: a name from ``ENHANCERS`` (see ``ENHANCER_DOCS``) or a genotype: a list of 17 op
            names, one per block, each layer then computing only its op.
        width_mult, num_classes: as torchvision's ``mobilenet_v2``; no pretrained weights.
        in_chans: input channels of the stem conv (1 for grayscale).
        small_input: for images of at most 64 px: stride 1 in the stem and the first 24-channel
            block (total stride 8; 28x28 ends at 4x4). See ``SMALL_INPUT_STRIDE1``.
        candidates: the ops of 'meta' layers, and the pool 'random' draws from.
        fused: Meta-Pooling layers are ``FusedMetaPooling`` if True, the reference ``MetaPooling`` if not.
        seed: the draw of 'random'.
    """
    _check_build_args(width_mult, num_classes, in_chans, small_input, fused, seed)
    _check_enhancer(enhancer, candidates)
    name = enhancer if isinstance(enhancer, str) else "genotype"
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult, num_classes=num_classes)

    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_chans, stem.out_channels, 3, 1 if small_input else 2, 1, bias=False)
    _init_new(model.features[0][0])
    if small_input:
        first24 = model.features[2]
        first24.conv[_depthwise_index(first24)][0].stride = (1, 1)
        first24.stride = 1

    for i in range(NUM_BLOCKS):
        block = model.features[i + 1]
        if name in ("sk", "coordatt"):
            layers = list(block.conv)
            k = _depthwise_index(block)
            if name == "sk":
                layers[k] = _sk_conv(layers[k])
                _init_new(layers[k])
            else:
                c = layers[k][0].out_channels
                attn = CoordAttn(c, rd_channels=max(COORD_MIN, c // COORD_GROUPS), bias=True)
                _init_new(attn)
                layers.insert(k + 1, attn)
            block.conv = nn.Sequential(*layers)
    # The enhancers after the blocks: the same mechanism as for any other network.
    after = "none" if name in ("sk", "coordatt") else enhancer
    insert_enhancers(model, after, candidates, blocks=BLOCK_NAMES, fused=fused, seed=seed,
                     channels=[model.features[i + 1].out_channels for i in range(NUM_BLOCKS)])
    return model


# --------------------------------------------------------------------------------------------
# Search helpers.
# --------------------------------------------------------------------------------------------
def meta_layers(model: nn.Module) -> List[MetaPooling]:
    """The Meta-Pooling enhancers (reference or fused), in block order."""
    return [m for m in model.modules() if isinstance(m, MetaPooling)]


def searchable_layers(model: nn.Module) -> List[MetaPooling]:
    """The Meta-Pooling enhancers not yet fixed to an op."""
    return [m for m in meta_layers(model) if m.fixed is None]


def derive(model: nn.Module) -> List[str]:
    """The genotype: per Meta-Pooling layer its fixed op, or the argmax of softmax(alpha)."""
    layers = meta_layers(model)
    if not layers:
        raise ValueError("derive() needs a model with Meta-Pooling layers (enhancer 'meta', a genotype, "
                         "'maxpool', 'avgpool', 'strip' or 'random'); this model has none")
    genotype = []
    for i, m in enumerate(layers):
        if m.fixed is None and not bool(torch.isfinite(m.alpha).all()):
            raise ValueError(f"Meta-Pooling layer {i}: alpha is not finite ({m.alpha.detach().tolist()}); "
                             f"no op can be derived from it")
        genotype.append(m.fixed if m.fixed is not None else m.candidates[int(m.probs().argmax())])
    return genotype


def alpha_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The architecture parameters: ``alpha`` of every Meta-Pooling layer (fixed ones included)."""
    return [m.alpha for m in meta_layers(model)]


def weight_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Every parameter that is not an ``alpha`` (the gate convs included)."""
    alphas = {id(p) for p in alpha_parameters(model)}
    return [p for p in model.parameters() if id(p) not in alphas]


# --------------------------------------------------------------------------------------------
# Cost.
# --------------------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: Tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """FLOPs of one forward as ``torch.utils.flop_counter`` counts them: 2 per multiply-add of the
    convolutions, linear layers and matmuls; pooling, norms, activations and gating are not counted."""
    param = next(model.parameters())
    x = torch.zeros(input_size, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_size: Tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """Multiply-adds of one forward, the unit of the papers' 'FLOPs' / 'M-Adds' (``count_flops // 2``)."""
    return count_flops(model, input_size) // 2
