"""Meta-Pooling in any network: an enhancer after every block.

The paper puts its spatial enhancer "after each layer of a lightweight network". ``insert_enhancers``
does that for a model one already has: it finds the blocks of the common torchvision and timm
families by their classes (or takes ``blocks=``), measures each block's output channels with one
dry run, and replaces every block ``b`` by ``EnhancedBlock(b, enhancer)``, so the block's own
state_dict keys move under ``<name>.block.`` and the enhancer's are ``<name>.enhancer.``.

A genotype can carry the names of the blocks it was found for (``{"genotype": [...], "blocks":
[...]}``, as the search writes it); it is then refused for a network whose blocks differ.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .modules import FusedMetaPooling
from .reference import PAPER_CANDIDATES, MetaPooling

__all__ = ["KNOWN_BLOCKS", "EnhancedBlock", "find_blocks", "block_names", "fixed_layer", "insert_enhancers"]

# Block classes by the package that defines them (matched on the class's module and name, so
# neither library is imported here).
KNOWN_BLOCKS: Dict[str, Sequence[str]] = {
    # MobileNetV2/V3 and ShuffleNetV2 (InvertedResidual), MNASNet, EfficientNet V1/V2, RegNet, ResNet.
    "torchvision": ("InvertedResidual", "_InvertedResidual", "MBConv", "FusedMBConv", "ResBottleneckBlock",
                    "BasicBlock", "Bottleneck"),
    # The EfficientNet / MobileNet family's `blocks`, ResNet, RegNet.
    "timm": ("DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual", "UniversalInvertedResidual",
             "CondConvResidual", "BasicBlock", "Bottleneck"),
}

# Baselines that are one fixed op after every block (the paper's Table 1 and Table 3).
FIXED_BASELINES = {"maxpool": "max3", "avgpool": "avg3", "strip": "strip"}
BLOCK_ENHANCERS = ("none", "meta", "random", "se", "cbam") + tuple(FIXED_BASELINES)

BlockSpec = Union[None, Sequence[str], Callable[[str, nn.Module], bool]]


class EnhancedBlock(nn.Module):
    """A block followed by its spatial enhancer: ``enhancer(block(x))``."""

    def __init__(self, block: nn.Module, enhancer: nn.Module, out_channels: Optional[int] = None):
        super().__init__()
        self.block = block
        self.enhancer = enhancer
        self.out_channels = out_channels if out_channels is not None else block.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enhancer(self.block(x))


def _is_known_block(m: nn.Module) -> bool:
    cls = type(m)
    package = cls.__module__.split(".", 1)[0]
    return cls.__name__ in KNOWN_BLOCKS.get(package, ())


def find_blocks(model: nn.Module, blocks: BlockSpec = None) -> List[str]:
    """The names of the blocks an enhancer follows, in the model's order.

    blocks: None (the known block classes of torchvision and timm, outermost only), a list of
    module names, or a predicate ``(name, module) -> bool``.
    """
    enhanced = block_names(model)
    if enhanced:
        raise ValueError(f"the model already has enhancers after its blocks ({enhanced[0]!r}, ...); "
                         "insert them into the network without them")
    modules = dict(model.named_modules())
    if blocks is not None and not callable(blocks):
        if isinstance(blocks, str):
            raise ValueError(f"blocks= is a list of module names, got the string {blocks!r}")
        names = list(blocks)
        missing = [n for n in names if n not in modules or n == ""]
        if missing:
            raise ValueError(f"blocks= names modules this {type(model).__name__} does not have: {missing}; "
                             f"its top-level modules are {[n for n, _ in model.named_children()]}")
        if len(set(names)) != len(names):
            raise ValueError(f"blocks= names a module twice: {names}")
        order = {n: i for i, n in enumerate(modules)}
        return sorted(names, key=order.__getitem__)
    pick = blocks if callable(blocks) else (lambda _name, m: _is_known_block(m))
    names: List[str] = []
    for name, m in modules.items():
        if name and pick(name, m) and not any(name.startswith(p + ".") for p in names):
            names.append(name)
    if not names:
        known = ", ".join(f"{pkg}: {', '.join(cls)}" for pkg, cls in KNOWN_BLOCKS.items())
        raise ValueError(
            f"no blocks found in this {type(model).__name__}: without blocks= the enhancers follow the blocks of "
            f"the torchvision and timm families ({known}). Pass blocks= a list of module names (e.g. "
            f"{[n for n, _ in model.named_children()][:3]}) or a predicate (name, module) -> bool")
    return names


def block_names(model: nn.Module) -> List[str]:
    """The names of the blocks that carry an enhancer, in order (what a genotype records)."""
    return [n for n, m in model.named_modules() if isinstance(m, EnhancedBlock)]


def _input_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f"found no Conv2d in this {type(model).__name__} to tell its input channels")


def _block_channels(model: nn.Module, names: Sequence[str], input_size: int) -> List[int]:
    """Each block's output channels, from one dry run on a zero image of ``input_size`` pixels."""
    modules = dict(model.named_modules())
    seen: Dict[str, object] = {}
    hooks = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: seen.setdefault(n, out)) for n in names]
    ref = next(iter(model.parameters()), None)
    x = torch.zeros((1, _input_channels(model), input_size, input_size),
                    device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    channels = []
    for n in names:
        out = seen.get(n)
        if out is None:
            raise ValueError(f"block {n!r} did not run in a forward pass of the model, so no enhancer can follow it")
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            what = f"a {out.dim()}-D tensor" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"block {n!r} returns {what}, not a 4-D (N, C, H, W) feature map: an enhancer cannot "
                             "follow it; leave it out of blocks=")
        channels.append(int(out.shape[1]))
    return channels


def _plan(enhancer, names: Sequence[str], candidates: Sequence[str], seed: int) -> List[str]:
    """Per block: an op name (a fixed layer), 'meta', 'none', 'se' or 'cbam'."""
    n = len(names)
    if isinstance(enhancer, dict):  # a genotype file's contents
        saved = enhancer.get("blocks")
        if saved is not None and list(saved) != list(names):
            raise ValueError(f"this genotype was found for a network whose blocks are {list(saved)[:4]}... "
                             f"({len(saved)} blocks); this one has {list(names)[:4]}... ({n} blocks)")
        enhancer = enhancer.get("genotype")
    if isinstance(enhancer, (list, tuple)):
        genotype = list(enhancer)
        bad = [op for op in genotype if op not in PAPER_CANDIDATES]
        if bad:
            raise ValueError(f"the genotype holds ops that are not candidates: {bad} (use {list(PAPER_CANDIDATES)})")
        if len(genotype) != n:
            raise ValueError(f"the genotype has {len(genotype)} ops but the network has {n} blocks")
        return genotype
    if not isinstance(enhancer, str):
        raise ValueError(f"enhancer is a name, an op, or a genotype (a list of ops), got {enhancer!r}")
    if enhancer in FIXED_BASELINES:
        return [FIXED_BASELINES[enhancer]] * n
    if enhancer == "random":
        pool = list(candidates)
        if not pool:
            raise ValueError("enhancer='random' needs at least one candidate")
        rng = random.Random(seed)
        return [rng.choice(pool) for _ in range(n)]
    if enhancer in ("none", "meta", "se", "cbam") or enhancer in PAPER_CANDIDATES:
        return [enhancer] * n
    if enhancer in ("sk", "coordatt"):
        raise ValueError(f"enhancer {enhancer!r} replaces parts inside MobileNetV2's blocks; "
                         "only metapool_kernels.models.mobilenet_v2 builds it")
    raise ValueError(f"unknown enhancer {enhancer!r}; use one of {list(BLOCK_ENHANCERS)}, an op from "
                     f"{list(PAPER_CANDIDATES)}, or a genotype")


def init_new_modules(module: nn.Module) -> None:
    """torchvision's MobileNetV2 initialisation (Kaiming fan-out convs, unit norms), for modules
    added to a network."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def fixed_layer(op: str, channels: int, fused: bool = True) -> MetaPooling:
    """A Meta-Pooling layer fixed to ``op``: it holds only that op's parameters (the gate convs for
    'strip') and computes only it."""
    layer = (FusedMetaPooling if fused else MetaPooling)(channels, (op,))
    layer.fix(op)
    return layer


def _build(what: str, channels: int, candidates: Sequence[str], fused: bool) -> nn.Module:
    if what == "none":
        return nn.Identity()
    if what == "meta":
        return (FusedMetaPooling if fused else MetaPooling)(channels, candidates)
    if what in ("se", "cbam"):
        from .models import attention_enhancer  # timm's modules, imported only when asked for
        module = attention_enhancer(what, channels)
        init_new_modules(module)
        return module
    return fixed_layer(what, channels, fused)


def insert_enhancers(model: nn.Module, enhancer: Union[str, Sequence[str], dict] = "meta",
                     candidates: Sequence[str] = PAPER_CANDIDATES, blocks: BlockSpec = None, *,
                     fused: bool = True, seed: int = 0, input_size: int = 64,
                     channels: Optional[Sequence[int]] = None) -> nn.Module:
    """Put an enhancer after every block of ``model`` (in place) and return it.

    enhancer: ``"meta"`` (a searchable Meta-Pooling layer over ``candidates``), one op name (a layer
        fixed to it), a genotype (one op per block, or a genotype file's ``{"genotype", "blocks"}``),
        or a baseline: ``none``, ``maxpool``, ``avgpool``, ``strip``, ``random`` (one of
        ``candidates`` per block, drawn with ``seed``), ``se``, ``cbam``.
    blocks: None for the torchvision / timm families' blocks, module names, or a predicate.
    fused: ``FusedMetaPooling`` (True) or the reference ``MetaPooling``.
    input_size: the image size of the dry run that measures each block's output channels;
    channels: those counts, when the caller knows them (no dry run).
    """
    names = find_blocks(model, blocks)
    plan = _plan(enhancer, names, candidates, seed)
    if channels is None:
        channels = _block_channels(model, names, input_size)
    elif len(channels) != len(names):
        raise ValueError(f"channels has {len(channels)} counts for {len(names)} blocks")
    modules = dict(model.named_modules())
    for name, what, c in zip(names, plan, channels):
        block = modules[name]
        after = _build(what, c, candidates, fused)
        ref = next(iter(block.parameters()), None)
        if ref is not None:
            after.to(device=ref.device)  # parameters stay float32, as in every Meta-Pooling layer
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, EnhancedBlock(block, after, c))
    return model
