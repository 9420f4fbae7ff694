"""Retraining from scratch and evaluation (paper §2.2, last paragraph, and §3.1).

Once PMPL has fixed every layer, "we adapt the learned spatial enhancer to the original task and
train the lightweight network from scratch": the derived network (a genotype, one op per block) is
built anew and trained with SGD (lr 0.05, cosine, momentum 0.9, weight decay 4e-5, batch 128; 200
epochs in the paper) on the whole training set, then evaluated (top-1, top-5) on the test split.
Any enhancer name (``none``, ``se``, ``strip``, ...) trains the corresponding baseline the same way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import distributed, networks, runs
from .metrics import evaluate
from .checks import BELOW_ONE, NON_NEGATIVE_INT, PATH, POSITIVE_INT, TEXT, Rule
from .data import DataBundle, build_data
from .progress import progress
from .report import format_table


@dataclass
class TrainConfig(runs.RunConfig):
    """A retraining run. Give ``genotype`` (a genotype JSON path) or ``enhancer`` (a name)."""
    genotype: Optional[str] = None
    enhancer: Optional[str] = None
    epochs: int = 200  # paper §3.1
    label_smoothing: float = 0.0
    out_dir: str = "runs/retrain"
    eval_every: int = 1

    RUNTIME_FIELDS: ClassVar[Tuple[str, ...]] = runs.RunConfig.RUNTIME_FIELDS + ("eval_every",)
    RULES: ClassVar[Dict[str, Rule]] = {
        **runs.RunConfig.RULES, "genotype": PATH.optional(), "enhancer": TEXT.optional(),
        "label_smoothing": BELOW_ONE, "eval_every": NON_NEGATIVE_INT,
    }


@dataclass
class TrainResult:
    name: str
    enhancer: Any
    top1: float
    top5: float
    loss: float
    params: int
    macs: Optional[int]
    epochs: int
    seconds: float
    train_acc: float
    checkpoint_path: Optional[Path]
    history: List[Dict[str, Any]]
    classes: int = 0


def resolve_enhancer(cfg: TrainConfig, genotype_file: Optional[Dict[str, Any]] = None):
    """The genotype list from ``cfg.genotype`` (validated), else the enhancer name (default none)."""
    from ..models import ENHANCERS, read_genotype_file

    if cfg.genotype and cfg.enhancer:
        raise ValueError("give either a genotype file or an enhancer name, not both")
    if cfg.genotype:  # its length is checked against the network's blocks where it is built
        return (genotype_file or read_genotype_file(cfg.genotype))["genotype"]
    name = cfg.enhancer or "none"
    if name == "meta":
        raise ValueError("enhancer 'meta' is the searchable network: run `search`, then retrain its genotype")
    if name not in ENHANCERS:
        raise ValueError(f"unknown enhancer {name!r}; use one of {[e for e in ENHANCERS if e != 'meta']} "
                         f"or --genotype FILE")
    return name


def genotype_network(cfg: TrainConfig, genotype_file: Dict[str, Any]) -> TrainConfig:
    """``cfg`` with the arch of the network the genotype was searched for (refused when cfg names
    another; one's own network only when cfg names its factory again)."""
    described = genotype_file.get("model_config")
    arch_key = isinstance(described, dict) and "arch" in described
    recorded = described["arch"] if arch_key else None
    arch = networks.resolve_arch(recorded, cfg.arch, f"genotype file {cfg.genotype!r}",
                                 recorded_as_code=arch_key and recorded is None)
    return dataclasses.replace(cfg, arch=arch)


def _searched_width(genotype_file: Optional[Dict[str, Any]]) -> Optional[float]:
    model_config = (genotype_file or {}).get("model_config")
    return model_config.get("width_mult") if isinstance(model_config, dict) else None


def run_train(cfg: TrainConfig, *, model: Optional[nn.Module] = None, data: Optional[DataBundle] = None,
              name: Optional[str] = None, stop_after_epochs: Optional[int] = None, log=print) -> TrainResult:
    """Train from scratch, checkpoint every epoch, evaluate top-1/top-5 on the test split."""
    t_start = time.perf_counter()
    cfg, ckpt, env, log, folder, logger = runs.start_run(cfg, "train", log, model_given=model is not None)
    enhancer = None
    if ckpt and ckpt.get("model_config"):
        with runs.restoring(cfg.resume, "the network"):
            enhancer = ckpt["model_config"]["enhancer"]
    genotype_file = None
    if model is None and enhancer is None:
        if cfg.genotype:
            from ..models import read_genotype_file

            genotype_file = read_genotype_file(cfg.genotype)
            cfg = genotype_network(cfg, genotype_file)
        enhancer = resolve_enhancer(cfg, genotype_file)
        searched = _searched_width(genotype_file)
        if searched is not None and searched != cfg.width:
            log(f"note: the genotype was searched at width {searched}; retraining at width {cfg.width}")
    if name is None and ckpt is not None:
        name = ckpt.get("name")
    if name is None:
        name = ("model" if enhancer is None else f"{networks.network_name(cfg.arch)} + " +
                ("genotype" if isinstance(enhancer, list) else enhancer))

    if data is None:
        data = runs.run_data(cfg, env, None)
    model_cfg = None
    if model is None:
        # The blocks the enhancers follow: the genotype's, or those a resumed run recorded.
        described = (ckpt or {}).get("model_config") or genotype_file or {}
        blocks = described.get("blocks") if isinstance(described, dict) else None
        # A resumed enhancer comes from the checkpoint: a bad one is the file's fault.
        with runs.restoring(cfg.resume, "the network") if ckpt else contextlib.nullcontext():
            model, model_cfg = networks.build_for_run(cfg, enhancer, data, blocks=blocks)
    fmt = distributed.memory_format(cfg.channels_last, env.device)
    model.to(env.device, memory_format=fmt)
    info = networks.describe_model(model, data.in_chans, data.image_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(data.train)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    epoch, history = 0, []
    if ckpt is not None:
        with runs.restoring(cfg.resume, "the training run"):
            model.load_state_dict(ckpt["model"])
            runs.restore_optimizer(opt, ckpt["opt"], "opt")
            runs.restore_scheduler(sched, ckpt["sched"], "sched")
            epoch, history = ckpt["epoch"], ckpt["history"]
            NON_NEGATIVE_INT.check("epoch", epoch)
            if epoch > cfg.epochs:
                raise ValueError(f"it is at epoch {epoch} of a run of {cfg.epochs}")
            if not all(isinstance(h, dict) and isinstance(h.get("test", {}), dict) for h in history):
                raise ValueError("history must be a list of dicts")
            if not distributed.restore_rng_states(ckpt["rng"], env):
                distributed.seed_everything(cfg.seed + 7919 * epoch + env.rank)
        log(f"resumed {name} from {cfg.resume} at epoch {epoch}")
    else:
        torch.manual_seed(cfg.seed + 1 + env.rank)
        logger.log("start", kind="train", name=name, config=dataclasses.asdict(cfg), enhancer=enhancer,
                   world_size=env.world_size, device=str(env.device), data=data.describe(), **info)
        log(f"retrain {name} on {env.device} x{env.world_size}: {info['params']:,} parameters, "
            f"{cfg.epochs} epochs x {steps_per_epoch} steps; {data.describe()}")
    net = model
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    metrics: Dict[str, float] = history[-1].get("test", {}) if history else {}
    if not {"top1", "top5", "loss"} <= metrics.keys():  # evaluated at the end instead
        metrics = {}
    epochs_run = 0
    train_acc = history[-1].get("acc", float("nan")) if history else float("nan")
    while epoch < cfg.epochs and (stop_after_epochs is None or epochs_run < stop_after_epochs):
        data.train.set_epoch(epoch)
        t_epoch = time.perf_counter()
        loss_sum = correct = seen = 0.0
        bar = progress(data.train, f"{name} {epoch + 1}/{cfg.epochs}", enabled=cfg.progress and env.is_main)
        for step, (x, y) in enumerate(bar, start=1):
            logits = net(x.contiguous(memory_format=fmt))
            loss = crit(logits, y)
            loss_value = loss.item()
            if not math.isfinite(loss_value):  # stop before the optimiser spreads it into every weight
                raise FloatingPointError(f"{name}: epoch {epoch + 1}, step {step}: the training loss is {loss_value}; "
                                         f"lower --lr (or check the data)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = y.numel()
            loss_sum += loss_value * n
            correct += (logits.detach().argmax(1) == y).sum().item()
            seen += n
            bar.set_postfix_str(f"loss {loss_value:.3f} acc {100.0 * correct / seen:.1f}% "
                                f"lr {sched.get_last_lr()[0]:.4f}")
        bar.close()
        distributed.broadcast_buffers(model, env)
        loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], env)
        epoch += 1
        epochs_run += 1
        train_acc = 100.0 * correct / max(seen, 1)
        record: Dict[str, Any] = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "acc": train_acc,
                                  "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - t_epoch, 2)}
        if epoch == cfg.epochs or (cfg.eval_every > 0 and epoch % cfg.eval_every == 0):
            metrics = evaluate(model, data.test, env, progress=cfg.progress, fmt=fmt)
            record["test"] = metrics
        history.append(record)
        logger.log("epoch", name=name, **record)
        test = record.get("test")
        log(f"{name} epoch {epoch}/{cfg.epochs}: loss {record['loss']:.3f} train acc {train_acc:.1f}%"
            + (f"  test top-1 {test['top1']:.2f}%" + (f" top-5 {test['top5']:.2f}%" if shows_top5(test) else "")
               if test else "")
            + f"  ({record['seconds']:.0f} s)")
        state = {"kind": "train", "version": runs.CHECKPOINT_VERSION, "config": dataclasses.asdict(cfg),
                 "model_config": model_cfg,
                 "name": name, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "epoch": epoch, "history": history, "rng": distributed.gather_rng_states(env),
                 "world_size": env.world_size, "data": {"train": data.train.state_dict()}}
        if env.is_main:
            runs.save_checkpoint(state, folder.file("checkpoint.pt"))
    if not metrics:
        metrics = evaluate(model, data.test, env, progress=cfg.progress, fmt=fmt)
    if epoch >= cfg.epochs:
        logger.log("done", name=name, **metrics, **info, seconds=round(time.perf_counter() - t_start, 2))
    ckpt_path = folder / "checkpoint.pt"
    return TrainResult(name=name, enhancer=enhancer, top1=metrics["top1"], top5=metrics["top5"],
                       loss=metrics["loss"], params=info["params"], macs=info["macs"], epochs=epoch,
                       seconds=time.perf_counter() - t_start, train_acc=train_acc,
                       checkpoint_path=ckpt_path if ckpt_path.exists() else None, history=history,
                       classes=metrics.get("classes", 0))


def run_eval(checkpoint: str, *, data_dir: Optional[str] = None, test_subset: Optional[int] = None,
             batch_size: int = 256, workers: Optional[int] = None, device: str = "auto", progress: bool = True,
             arch: Optional[str] = None, log=print) -> Dict[str, Any]:
    """Top-1/top-5 of a checkpoint (``train`` or ``search``) on the test split of its data set
    (``arch``: the factory of one's own network, which a checkpoint never names to run)."""
    from .search import SearchConfig

    POSITIVE_INT.check("batch_size", batch_size)
    workers = runs.DEFAULT_WORKERS if workers is None else workers
    NON_NEGATIVE_INT.check("workers", workers)
    POSITIVE_INT.optional().check("test_subset", test_subset)
    ckpt = runs.load_checkpoint(checkpoint)
    with runs.restoring(checkpoint, "the run's config"):
        cfg = (SearchConfig if ckpt["kind"] == "search" else TrainConfig)(**ckpt["config"])
    model = networks.model_from_checkpoint(ckpt, checkpoint, arch)
    env = distributed.setup_distributed(device)
    log = log if env.is_main else (lambda *a, **k: None)
    data = build_data(data_dir=data_dir if data_dir is not None else cfg.data_dir, batch_size=batch_size,
                      meta_fraction=None, test_subset=test_subset, train=False, workers=workers,
                      image_size=cfg.image_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                      device=env.device)
    trained = (ckpt["model_config"].get("in_chans"), ckpt["model_config"].get("num_classes"))
    if trained != (data.in_chans, data.num_classes):
        raise ValueError(f"{checkpoint} holds a network for {trained[0]}-channel images in {trained[1]} classes; "
                         f"{data.name} has {data.in_chans}-channel images in {data.num_classes} classes")
    fmt = distributed.memory_format(None, env.device)
    model.to(env.device, memory_format=fmt)
    metrics = evaluate(model, data.test, env, progress=progress, fmt=fmt)
    info = networks.describe_model(model, data.in_chans, data.image_size)
    name = ckpt.get("name") or ("PMPL search network" if ckpt["kind"] == "search" else "model")
    log(accuracy_table([{"name": name, **info, **metrics, "epochs": ckpt.get("epoch", ckpt.get("state", {}).get("epoch"))}],
                       title=f"Evaluation of {checkpoint} on {data.name} ({metrics['samples']} test images)"))
    return {"name": name, **info, **metrics}


def shows_top5(metrics: Dict[str, Any]) -> bool:
    """Top-5 means something only with more than 5 classes (older logs have no class count)."""
    return metrics.get("classes", 0) == 0 or metrics["classes"] > 5


def accuracy_table(rows: List[Dict[str, Any]], title: str = "Accuracy") -> str:
    """Model, parameters, multiply-adds per image, epochs, test top-1 / top-5 (— with ≤ 5 classes)."""
    def fmt_macs(m):
        return "" if m is None else f"{m / 1e6:.2f}M"
    body = [(r["name"], f"{r['params']:,}", fmt_macs(r.get("macs")), r.get("epochs", ""),
             f"{r['top1']:.2f}", f"{r['top5']:.2f}" if shows_top5(r) else "—") for r in rows]
    return format_table(("model", "params", "MACs", "epochs", "top-1 %", "top-5 %"), body, title=title)


def result_row(res: TrainResult) -> Dict[str, Any]:
    return {"name": res.name, "params": res.params, "macs": res.macs, "epochs": res.epochs,
            "top1": res.top1, "top5": res.top5, "classes": res.classes}

