"""The network a run trains, and its description in checkpoints and genotype files.

``arch`` names it:

- ``None`` or ``"mobilenetv2"``: the package's MobileNetV2 (``--width``, ``--small-input`` apply);
- ``"timm:NAME"``: ``timm.create_model(NAME)``; ``"torchvision:NAME"``: ``torchvision.models.get_model(NAME)``
  (untrained, with the data's classes and input channels);
- ``"MODULE:FUNCTION"``: one's own code, a function returning the plain network (called with
  ``num_classes=`` and ``in_chans=`` where it takes them).

Every network but the package's gets its enhancers from :func:`metapool_kernels.insert_enhancers`,
after the blocks a genotype names (or the known blocks of its family). A file records the arch, but
a file never names code to run: a checkpoint or genotype of one's own network is rebuilt only when
the caller names the same ``MODULE:FUNCTION`` again (``--arch``).
"""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from torch import nn

from .data import DataBundle
from .runs import RunConfig, restoring

PACKAGE_ARCH = "mobilenetv2"
LIBRARY_PREFIXES = ("timm:", "torchvision:")
_CODE_ARCH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def check_arch(arch: Optional[str]) -> Optional[str]:
    """``arch`` if it names a network in one of the accepted forms (module docstring), else ValueError."""
    if arch is None or arch == PACKAGE_ARCH:
        return arch
    if not isinstance(arch, str):
        raise ValueError(f"arch is a string such as 'timm:mobilenetv3_small_100', got {arch!r}")
    if arch.startswith(LIBRARY_PREFIXES):
        if not arch.split(":", 1)[1]:
            raise ValueError(f"arch {arch!r} names no model after the prefix")
        return arch
    if not _CODE_ARCH.match(arch):
        raise ValueError(f"arch {arch!r}: use {PACKAGE_ARCH!r}, 'timm:NAME', 'torchvision:NAME' or 'MODULE:FUNCTION' "
                         "(a function returning your network without enhancers)")
    return arch


def is_own_code(arch: Optional[str]) -> bool:
    return arch is not None and arch != PACKAGE_ARCH and not arch.startswith(LIBRARY_PREFIXES)


def _first_conv_to(model: nn.Module, in_chans: int) -> None:
    """Give the network's first convolution ``in_chans`` inputs (torchvision's take 3)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels != in_chans:
                conv = nn.Conv2d(in_chans, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                 m.groups if m.groups == 1 else in_chans, m.bias is not None, m.padding_mode)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, conv)
            return
    raise ValueError(f"found no Conv2d in this {type(model).__name__} to take {in_chans}-channel images")


def plain_network(arch: str, num_classes: int, in_chans: int) -> nn.Module:
    """The network ``arch`` names, without enhancers, untrained."""
    kind, _, name = arch.partition(":")
    if kind == "timm":
        import timm

        if not timm.is_model(name):  # names with a pretrained tag (NAME.TAG) count; weights are not loaded
            raise ValueError(f"timm has no model {name!r} (timm.list_models() lists them)")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"torchvision has no model {name!r} (torchvision.models.list_models() lists them)")
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        _first_conv_to(model, in_chans)
        return model
    try:
        factory = getattr(importlib.import_module(kind), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"arch {arch!r}: cannot import {name} from {kind} ({e}); is the module on the Python path?")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if takes_any or k in params}
    try:
        model = factory(**kwargs)
    except TypeError as e:  # it takes other arguments than the ones a run can give
        called = f"{kind}.{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        raise ValueError(f"arch {arch!r}: {called} failed: {e}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"arch {arch!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def default_small_input(image_size: int, small_input: Optional[bool]) -> bool:
    return image_size <= 64 if small_input is None else small_input


def run_model_config(cfg: RunConfig, enhancer, data: DataBundle, blocks: Optional[Sequence[str]] = None,
                     ) -> Dict[str, Any]:
    """The network a config describes, for ``data``'s images and classes (``blocks``: the genotype's)."""
    if cfg.arch in (None, PACKAGE_ARCH):
        return model_config(enhancer, width_mult=cfg.width, num_classes=data.num_classes, in_chans=data.in_chans,
                            small_input=default_small_input(data.image_size, cfg.small_input),
                            candidates=cfg.candidates, seed=cfg.seed)
    return arch_config(cfg.arch, enhancer, num_classes=data.num_classes, in_chans=data.in_chans,
                       candidates=cfg.candidates, seed=cfg.seed, blocks=blocks)


def build_for_run(cfg: RunConfig, enhancer, data: DataBundle, blocks: Optional[Sequence[str]] = None):
    """(model, its description) for a run: the network ``cfg`` names with ``enhancer``; a network
    other than the package's records the blocks its enhancers follow, for commands that rebuild it."""
    from ..insert import block_names

    model_cfg = run_model_config(cfg, enhancer, data, blocks)
    model = build_model(model_cfg, cfg.arch)
    if "arch" in model_cfg:
        model_cfg["blocks"] = block_names(model)
    return model, model_cfg


def handed_over_config(cfg: RunConfig, enhancer, data: DataBundle, model: nn.Module) -> Optional[Dict[str, Any]]:
    """The description of a model handed to the Python API, where insert_enhancers put its
    enhancers (None otherwise: no command can rebuild it)."""
    from ..insert import block_names

    blocks = block_names(model)
    return arch_config(cfg.arch, enhancer, num_classes=data.num_classes, in_chans=data.in_chans,
                       candidates=cfg.candidates, seed=cfg.seed, blocks=blocks) if blocks else None


def arch_config(arch: Optional[str], enhancer, *, num_classes: int, in_chans: int, candidates: Sequence[str],
                seed: int, blocks: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The description of a network that is not the package's MobileNetV2 (``arch`` None: a model
    handed to the Python API; a command can rebuild it only from an ``arch`` named there)."""
    return {"arch": arch, "enhancer": list(enhancer) if not isinstance(enhancer, str) else enhancer,
            "num_classes": num_classes, "in_chans": in_chans, "candidates": list(candidates), "seed": seed,
            "blocks": list(blocks) if blocks is not None else None}


def resolve_arch(recorded: Optional[str], given: Optional[str], where: str,
                 recorded_as_code: bool = False) -> Optional[str]:
    """The arch to rebuild a file's network with: the recorded one, unless it is one's own code,
    which the caller must name (``given``) for it to run."""
    if given is not None:
        check_arch(given)
    if recorded_as_code or is_own_code(recorded):
        if given is None:
            named = f"the network built by {recorded!r} (your code)" if recorded else \
                "a network handed to the Python API"
            raise ValueError(f"{where} holds {named}; a file never names code to run: pass --arch MODULE:FUNCTION "
                             f"(arch=) naming the function that builds it without enhancers")
        if recorded is not None and given != recorded:
            raise ValueError(f"{where} was made with arch {recorded!r}, not {given!r}")
        return given
    if given is not None and given != (recorded or PACKAGE_ARCH):
        raise ValueError(f"{where} was made with arch {recorded or PACKAGE_ARCH!r}, not {given!r}")
    return recorded


def build_model(model_config: Dict[str, Any], arch: Optional[str] = None) -> nn.Module:
    """The network a description holds (see :func:`run_model_config`); ``arch``: the caller's,
    already checked against a file's record (:func:`resolve_arch`), for a network the description
    cannot name (a model handed to the Python API)."""
    from ..insert import insert_enhancers
    from ..models import mobilenet_v2

    cfg = dict(model_config)
    if "arch" not in cfg:  # the package's MobileNetV2
        return mobilenet_v2(enhancer=cfg.pop("enhancer"), **cfg)
    arch = arch or cfg["arch"]
    if arch is None:
        raise ValueError("the description is of a model handed to the Python API: pass arch= (--arch) naming the "
                         "function that builds it without enhancers")
    model = plain_network(arch, cfg["num_classes"], cfg["in_chans"])
    enhancer = cfg["enhancer"]
    if isinstance(enhancer, list):  # a genotype: refused unless it fits the network's blocks
        enhancer = {"genotype": enhancer, "blocks": cfg.get("blocks")}
    return insert_enhancers(model, enhancer, cfg["candidates"], blocks=cfg.get("blocks"), seed=cfg["seed"])


def model_from_checkpoint(ckpt: Dict[str, Any], path: Path | str, arch: Optional[str] = None) -> nn.Module:
    """The network a checkpoint describes (``model_config``), with its saved weights."""
    description = ckpt.get("model_config")
    if not description:
        raise ValueError(f"{path} was written for a model built in Python without insert_enhancers; evaluate "
                         "it with metapool_kernels.pmpl.evaluate")
    if "arch" in description:
        arch = resolve_arch(description["arch"], arch, str(path), recorded_as_code=description["arch"] is None)
    elif arch not in (None, PACKAGE_ARCH):
        raise ValueError(f"{path} holds the package's MobileNetV2, not {arch!r}")
    with restoring(path, "the network"):
        model = build_model(description, arch)
        model.load_state_dict(ckpt["model"])
    return model


def model_config(enhancer, *, width_mult: float, num_classes: int, in_chans: int, small_input: bool,
                 candidates: Sequence[str], seed: int) -> Dict[str, Any]:
    """The description of the package's MobileNetV2."""
    return {"enhancer": list(enhancer) if not isinstance(enhancer, str) else enhancer, "width_mult": width_mult,
            "num_classes": num_classes, "in_chans": in_chans, "small_input": small_input,
            "candidates": list(candidates), "seed": seed}


def network_name(arch: Optional[str]) -> str:
    return "MobileNetV2" if arch in (None, PACKAGE_ARCH) else arch.split(":", 1)[1]


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
