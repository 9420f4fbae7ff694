"""Progressive Meta-Pooling Learning (PMPL, paper §2.2 and Algorithm 1): search, derive, retrain, evaluate.

- :mod:`.data`: Fashion-MNIST (default) and ImageFolder loaders, the train/meta split of Eq. 3.
- :mod:`.search`: the first-order bi-level search with progressive early stopping (Eq. 3-4).
- :mod:`.train`: retraining a genotype or a baseline from scratch; evaluation.
- :mod:`.ablation`: the paper's Table 3 on Fashion-MNIST, several seeds (report: :mod:`.ablation_report`).
- :mod:`.cli`: ``python -m metapool_kernels.pmpl search|retrain|eval|ablation``.
"""
from .search import SearchConfig, SearchResult, bilevel_step, progressive_early_stopping, run_search
from .train import TrainConfig, TrainResult, run_eval, run_train

__all__ = ["SearchConfig", "SearchResult", "TrainConfig", "TrainResult", "bilevel_step",
           "progressive_early_stopping", "run_eval", "run_search", "run_train"]
