"""Top-1 / top-5 evaluation, summed across processes."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .distributed import DistEnv, all_reduce_sum

@torch.no_grad()
def evaluate(model: nn.Module, loader, env: Optional[DistEnv] = None, progress: bool = False, desc: str = "eval",
             fmt: torch.memory_format = torch.contiguous_format) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over ``loader`` (batches of (x, y) on the
    model's device), summed across processes under ``torchrun``; ``env`` is needed only there."""
    from .progress import progress as progress_bar

    if env is None:
        ref = next(iter(model.parameters()), None)
        env = DistEnv(rank=0, world_size=1, local_rank=0, device=ref.device if ref is not None else torch.device("cpu"))

    was_training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    classes = 0
    try:
        for x, y in progress_bar(loader, desc, enabled=progress and env.is_main, every=None):
            logits = model(x.contiguous(memory_format=fmt))
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            classes = logits.shape[1]
            k = min(5, classes)
            top = logits.topk(k, dim=1).indices
            hits = top.eq(y[:, None])
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            count += y.numel()
    finally:
        model.train(was_training)
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], env)
    if count == 0:
        raise ValueError("the evaluation split is empty")
    # classes: with 5 or fewer, top-5 is 100% by construction and is not shown.
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss_sum / count,
            "samples": int(count), "classes": int(classes)}
