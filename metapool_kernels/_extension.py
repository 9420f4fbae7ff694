"""Loads the compiled extension ``metapool_kernels._C`` once, with an actionable error.

Importing it registers the ``torch.ops.metapool`` ops. A build from older ``csrc/`` sources, or
against another torch, is refused: its ops would silently disagree with the Python side.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

BUILD_HINT = "build it from the repository root with `pip install -e . --no-build-isolation` (or `make build`)"
_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _source_hash() -> str | None:
    """Hash of csrc/ as setup.py computes it; None for an installed (non-editable) package."""
    if not _CSRC.is_dir():
        return None
    h = hashlib.sha256()
    root = _CSRC.parent
    for path in sorted(p for p in _CSRC.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _has_binary(folder: Path) -> bool:
    return any(folder.glob("_C*.so")) or any(folder.glob("_C*.pyd"))


def _installed_elsewhere(here: Path) -> Path | None:
    """Another metapool_kernels on sys.path that has a built extension, if any."""
    for entry in sys.path:
        candidate = Path(entry or os.getcwd()).resolve() / "metapool_kernels"
        if candidate != here and _has_binary(candidate):
            return candidate
    return None


def _load():
    try:
        from metapool_kernels import _C
    except ImportError as e:  # missing, or linked against another torch
        here = Path(__file__).resolve().parent
        if not _has_binary(here):
            installed = _installed_elsewhere(here)
            if installed is not None:
                # Python started inside the clone imports the clone's unbuilt sources before the
                # installed package; the bare ImportError then reads like a circular import.
                raise ImportError(
                    f"metapool_kernels was imported from the source tree {here}, which has no built "
                    f"extension, instead of the installed package {installed}: the current folder "
                    f"comes first on sys.path. Run Python from outside the clone, or build the "
                    f"clone in place with `pip install -e . --no-build-isolation`.") from None
            raise ImportError(f"metapool_kernels._C has not been built in {here}; {BUILD_HINT}") from None
        raise ImportError(f"metapool_kernels._C could not be loaded ({e}); {BUILD_HINT}") from e
    if os.environ.get("METAPOOL_SKIP_STALE_CHECK", "0") != "1":
        expected = _source_hash()
        if expected is not None and _C.source_hash() != expected:
            raise ImportError(
                f"metapool_kernels._C is stale: built from csrc/ hash {_C.source_hash()}, the sources "
                f"are now {expected}; re{BUILD_HINT}")
        if _C.torch_version() != torch.__version__:
            raise ImportError(
                f"metapool_kernels._C was built against torch {_C.torch_version()} but torch "
                f"{torch.__version__} is installed; re{BUILD_HINT}")
    return _C


C = _load()


def has_cuda_kernels() -> bool:
    return bool(C.with_cuda())


# The package's ops have decompositions registered for the exporters (metapool_kernels/export.py).
# Inductor takes a custom op that has one for a missing lowering (an AssertionError when the CI
# environment variable is set) unless the op is on its fallback allow-list, as torchvision's
# roi_align is; compiled, the ops must run their own kernels.
INDUCTOR_FALLBACKS = ("metapool::meta_pool", "metapool::meta_pool_backward",
                      "metapool::strip_gate", "metapool::strip_gate_backward")


def keep_kernels_under_inductor() -> None:
    """Put the ops on inductor's fallback allow-list once inductor is loaded (never imports it:
    the fake kernels call this, and inductor is loaded before it traces them)."""
    allow = getattr(sys.modules.get("torch._inductor.lowering"), "FALLBACK_ALLOW_LIST", None)
    if allow is not None and INDUCTOR_FALLBACKS[0] not in allow:
        allow.update(INDUCTOR_FALLBACKS)
