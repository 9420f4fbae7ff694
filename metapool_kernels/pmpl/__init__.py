"""Progressive Meta-Pooling Learning (PMPL, paper §2.2 and Algorithm 1): search, derive, retrain, evaluate.

- :mod:`.data`: Fashion-MNIST (default) and ImageFolder loaders, the train/meta split of Eq. 3.
- :mod:`.search`: the first-order bi-level search with progressive early stopping (Eq. 3-4).
- :mod:`.train`: retraining a genotype or a baseline from scratch; evaluation.
- :mod:`.networks`: the network a run trains (the package's MobileNetV2, a timm or torchvision model,
  or one's own), described in checkpoints and genotype files.
- :mod:`.runs`, :mod:`.distributed`, :mod:`.metrics`: run folders and checkpoints, processes and
  RNG state, top-1/top-5 evaluation.
- :mod:`.cli`: ``python -m metapool_kernels.pmpl search|retrain|eval|export``.
The paper's Table 3 ablation is an experiment beside the library: experiments/ablation.
"""
import importlib


def _missing_train_extra() -> list:
    missing = []
    for name in ("torchvision", "timm"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


# The trainer's networks and data come from torchvision and timm, which a base install (the kernels
# alone) does not pull in.
_MISSING = _missing_train_extra()
if _MISSING:
    raise ImportError(
        f"metapool_kernels.pmpl (the trainer) needs {' and '.join(_MISSING)}, which are "
        "in the package's 'train' extra: pip install --no-build-isolation '<path or git URL>[train]' "
        "(or pip install torchvision timm tqdm matplotlib)")

from .search import SearchConfig, SearchResult, bilevel_step, progressive_early_stopping, run_search  # noqa: E402
from .metrics import evaluate  # noqa: E402
from .train import TrainConfig, TrainResult, run_eval, run_train  # noqa: E402

__all__ = ["SearchConfig", "SearchResult", "TrainConfig", "TrainResult", "bilevel_step", "evaluate",
           "progressive_early_stopping", "run_eval", "run_search", "run_train"]
