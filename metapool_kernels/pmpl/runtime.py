"""What search and retraining share: device and process group, seeding and RNG state, checkpoints,
JSON-lines logs, building a model from its stored description, and top-1/top-5 evaluation."""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..reference import PAPER_CANDIDATES
from .data import DataBundle, build_data


# ---------------------------------------------------------------------------------------------
# Device and processes.
# ---------------------------------------------------------------------------------------------
@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def setup_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or run alone.

    A process group that already exists (a test that spawned its own processes) is used as is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistEnv(rank, world, local_rank, resolve_device(device, local_rank))
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local_rank)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistEnv(0, 1, 0, resolve_device(device))


def broadcast_buffers(model: nn.Module, env: DistEnv) -> None:
    """Rank 0's BatchNorm statistics everywhere: DDP syncs them before each forward, so after the last
    forward of an epoch each rank holds statistics updated by its own batch."""
    if env.distributed:
        for b in model.buffers():
            dist.broadcast(b.data, 0)


def all_reduce_sum(values: Sequence[float], env: DistEnv) -> List[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# Seeds and RNG state.
# ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(env: DistEnv) -> List[Dict[str, Any]]:
    """Every rank's RNG state, on every rank (each rank draws its own dropout masks)."""
    mine = rng_state()
    if not env.distributed:
        return [mine]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, mine)
    return out


def restore_rng_states(states: List[Dict[str, Any]], env: DistEnv) -> bool:
    """Restore this rank's RNG state; False when the checkpoint came from another world size."""
    if len(states) != env.world_size:
        return False
    set_rng_state(states[env.rank])
    return True


# ---------------------------------------------------------------------------------------------
# Checkpoints and logs.
# ---------------------------------------------------------------------------------------------
def save_checkpoint(state: Dict[str, Any], path: Path | str) -> None:
    """Write atomically, so an interrupted save never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@dataclass
class RunConfig:
    """What a search and a retraining share: data, model, θ's SGD (paper §3.1) and the run itself."""
    # data
    data_dir: Optional[str] = None
    subset: Optional[int] = None
    test_subset: Optional[int] = None
    batch_size: int = 128
    workers: int = 4
    image_size: Optional[int] = None
    # model
    width: float = 1.0
    small_input: Optional[bool] = None
    candidates: Tuple[str, ...] = PAPER_CANDIDATES
    # θ: SGD with momentum and a cosine schedule
    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 4e-5
    # run
    device: str = "auto"
    # None: channels_last on CPU, where torch's pooling kernels are several times faster in it.
    channels_last: Optional[bool] = None
    seed: int = 0
    out_dir: str = "runs"
    resume: Optional[str] = None
    progress: bool = True

    # Fields a resumed run takes from the caller; everything else comes from the checkpoint.
    RUNTIME_FIELDS: ClassVar[Tuple[str, ...]] = ("device", "workers", "resume", "progress", "out_dir")

    def __post_init__(self):
        self.candidates = tuple(self.candidates)
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")


def resume_config(cfg: RunConfig, kind: str):
    """(config, checkpoint) for a run that may resume: the checkpoint's saved config, except the
    fields that only say how this invocation runs (``RUNTIME_FIELDS``), which the caller's config
    keeps. Without ``cfg.resume``: (cfg, None)."""
    if not cfg.resume:
        return cfg, None
    ckpt = load_checkpoint(cfg.resume, kind=kind)
    saved = dict(ckpt["config"])
    saved.update({k: getattr(cfg, k) for k in cfg.RUNTIME_FIELDS})
    return type(cfg)(**saved), ckpt


def start_run(cfg: RunConfig, kind: str, log):
    """The start every run shares: resume, processes, logging (main process only), seeds.

    Returns (cfg, checkpoint or None, DistEnv, log, out_dir, JsonlLogger).
    """
    cfg, ckpt = resume_config(cfg, kind)
    env = setup_distributed(cfg.device)
    log = log if env.is_main else (lambda *a, **k: None)
    out_dir = Path(cfg.out_dir)
    logger = JsonlLogger(out_dir / "log.jsonl", enabled=env.is_main)
    seed_everything(cfg.seed)
    return cfg, ckpt, env, log, out_dir, logger


def run_data(cfg: RunConfig, env: "DistEnv", meta_fraction: Optional[float]) -> DataBundle:
    """The data set a config names, split for this process (and into D_tr / D_mt with meta_fraction)."""
    return build_data(data_dir=cfg.data_dir, batch_size=cfg.batch_size, meta_fraction=meta_fraction,
                      subset=cfg.subset, test_subset=cfg.test_subset, workers=cfg.workers,
                      image_size=cfg.image_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                      device=env.device)


def default_small_input(image_size: int, small_input: Optional[bool]) -> bool:
    return image_size <= 64 if small_input is None else small_input


def run_model_config(cfg: RunConfig, enhancer, data: DataBundle) -> Dict[str, Any]:
    """The MobileNetV2 a config describes, for ``data``'s images and classes."""
    return model_config(enhancer, width_mult=cfg.width, num_classes=data.num_classes, in_chans=data.in_chans,
                        small_input=default_small_input(data.image_size, cfg.small_input),
                        candidates=cfg.candidates, seed=cfg.seed)


def load_checkpoint(path: Path | str, kind: Optional[str] = None) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which file, not just pickle's complaint
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from e
    if not isinstance(state, dict) or "kind" not in state:
        raise ValueError(f"{path} is not a metapool_kernels.pmpl checkpoint")
    if kind is not None and state["kind"] != kind:
        raise ValueError(f"{path} is a {state['kind']!r} checkpoint, expected a {kind!r} one")
    return state


class JsonlLogger:
    """One JSON object per line (epochs, fix events, results); only the main process writes."""

    def __init__(self, path: Optional[Path | str], enabled: bool = True):
        self.path = Path(path) if path is not None and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


# ---------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------
def build_model(model_config: Dict[str, Any]) -> nn.Module:
    """MobileNetV2 from the description a checkpoint stores (see :func:`model_config`)."""
    from ..models import mobilenet_v2

    cfg = dict(model_config)
    return mobilenet_v2(enhancer=cfg.pop("enhancer"), **cfg)


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


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, progress: bool = False, desc: str = "eval",
             fmt: torch.memory_format = torch.contiguous_format) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader, summed across processes."""
    from .progress import progress as progress_bar

    was_training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    try:
        for x, y in progress_bar(loader, desc, enabled=progress and env.is_main, every=None):
            logits = model(x.contiguous(memory_format=fmt))
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, logits.shape[1])
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
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss_sum / count,
            "samples": int(count)}


def memory_format(channels_last: Optional[bool], device: torch.device) -> torch.memory_format:
    use = device.type == "cpu" if channels_last is None else channels_last
    return torch.channels_last if use else torch.contiguous_format

