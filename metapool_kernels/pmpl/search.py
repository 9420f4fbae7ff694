"""Progressive Meta-Pooling Learning: the search (paper §2.2, Algorithm 1, Eq. 3-4; §3.1 settings).

Each step is the first-order bi-level update of Eq. 3:

1. ``g = ∇θ L_tr(θ, α)`` on a batch of D_tr (α held constant, so α receives nothing from L_tr);
2. the virtual step ``θ' = θ − ζ g`` (ζ the current SGD learning rate), taken in place;
3. ``α ← Adam(α, ∇α L_mt(θ', α))`` on a batch of D_mt, θ' held constant (first order), only α
   differentiated, so θ receives nothing from L_mt;
4. θ restored exactly, then the real step ``θ ← SGD(θ, ∇θ L_tr(θ, α))``.

After the α update (every step, as Algorithm 1, or once per epoch) progressive early stopping (Eq. 4)
fixes every layer whose ``min_{m≠k}(π_k − π_m) ≥ ρ`` (π = softmax(α), π_k its largest entry) to op
k: its α stops updating and the layer computes only op k from then on. The search ends when every
layer is fixed, or after ``epochs`` epochs with the argmax for the rest.

The real step reuses g by default: Algorithm 1 evaluates ∇θ L_tr(θ, α) after α has moved by one
Adam step, on the same θ and batch, and the difference does not justify a third forward/backward per
step; ``fresh_train_grad=True`` recomputes it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..models import alpha_parameters, derive, meta_layers, weight_parameters
from ..reference import MetaPooling
from . import distributed, networks, runs
from .checks import BELOW_ONE, FLAG, NON_NEGATIVE, NON_NEGATIVE_INT, OPEN_UNIT, POSITIVE, POSITIVE_INT, UP_TO_ONE, Rule
from .data import DataBundle
from .progress import progress
from .report import genotype_table, plot_alpha_history


@dataclass
class SearchConfig(runs.RunConfig):
    """Everything a search depends on. Defaults are the paper's §3.1 settings."""
    meta_fraction: float = 0.5
    epochs: int = 30
    alpha_lr: float = 3e-4
    alpha_weight_decay: float = 1e-3
    # DARTS' architecture optimiser, whose lr and weight decay §3.1 repeats, uses β1 = 0.5.
    alpha_betas: Tuple[float, float] = (0.5, 0.999)
    rho: float = 0.2
    fix_every: str = "step"
    fresh_train_grad: bool = False
    grad_clip: Optional[float] = None
    out_dir: str = "runs/search"
    history_points: int = 50

    RULES: ClassVar[Dict[str, Rule]] = {
        **runs.RunConfig.RULES, "meta_fraction": OPEN_UNIT, "alpha_lr": POSITIVE,
        "alpha_weight_decay": NON_NEGATIVE, "rho": UP_TO_ONE, "fresh_train_grad": FLAG,
        "grad_clip": POSITIVE.optional(), "history_points": POSITIVE_INT,
    }

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.alpha_betas, (list, tuple)) or len(self.alpha_betas) != 2:
            raise ValueError(f"alpha_betas must be two numbers (β1, β2), got {self.alpha_betas!r}")
        self.alpha_betas = tuple(self.alpha_betas)
        for beta in self.alpha_betas:
            BELOW_ONE.check("alpha_betas", beta)
        if self.fix_every not in ("step", "epoch"):
            raise ValueError(f"fix_every must be 'step' or 'epoch', got {self.fix_every!r}")


@dataclass
class SearchState:
    epoch: int = 0          # epochs completed
    step: int = 0           # bi-level steps taken
    done: bool = False
    history: List[Dict[str, Any]] = field(default_factory=list)
    events: List[Dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):  # a restored state is checked here, before the loop relies on it
        for name in ("epoch", "step"):
            NON_NEGATIVE_INT.check(name, getattr(self, name))
        FLAG.check("done", self.done)
        for name in ("history", "events"):
            if not isinstance(getattr(self, name), list) or not all(isinstance(h, dict) for h in getattr(self, name)):
                raise ValueError(f"{name} must be a list of dicts")


@dataclass
class SearchResult:
    genotype: List[str]
    probs: List[List[float]]
    events: List[Dict[str, Any]]
    history: List[Dict[str, Any]]
    epochs: int
    steps: int
    steps_per_epoch: int
    done: bool
    out_dir: Path
    genotype_path: Optional[Path]
    plot_path: Optional[Path]
    checkpoint_path: Optional[Path]
    table: str
    seconds: float
    model: nn.Module = field(repr=False, default=None)
    alpha_optimizer_state: Dict[str, Any] = field(repr=False, default=None)


# ---------------------------------------------------------------------------------------------
# Building blocks of one step, each testable on its own.
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def alphas_frozen(layers: Sequence[MetaPooling]):
    """α as constants for L_tr: no gradient reaches α, and the kernels skip computing one."""
    searching = [m for m in layers if m.alpha.requires_grad]
    for m in searching:
        m.alpha.requires_grad_(False)
    try:
        yield
    finally:
        for m in searching:
            m.alpha.requires_grad_(True)


def margin(probs: torch.Tensor) -> Tuple[int, float]:
    """(k, min_{m≠k}(π_k − π_m)) with π_k the largest entry: the left side of Eq. 4."""
    probs = probs.double()
    k = int(probs.argmax())
    if probs.numel() == 1:
        return k, math.inf
    others = torch.cat([probs[:k], probs[k + 1:]])
    return k, float(probs[k] - others.max())


def progressive_early_stopping(layers: Sequence[MetaPooling], rho: float) -> List[Dict[str, Any]]:
    """Fix every searchable layer that satisfies Eq. 4 to its argmax; return what was fixed.

    π is computed in float64 from α so that the decision, taken independently on every process,
    depends only on α (which is identical everywhere) and not on float32 rounding of the softmax.
    """
    fixed = []
    for i, layer in enumerate(layers):
        if layer.fixed is not None:
            continue
        probs = torch.softmax(layer.alpha.detach().double(), dim=0)
        k, gap = margin(probs)
        if gap >= rho:
            layer.fix(layer.candidates[k])
            fixed.append({"layer": i, "op": layer.candidates[k], "prob": float(probs[k]),
                          "margin": gap if math.isfinite(gap) else 1.0})
    return fixed


def layer_probs(layers: Sequence[MetaPooling]) -> List[List[float]]:
    return [torch.softmax(m.alpha.detach().double(), dim=0).tolist() for m in layers]


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def check_finite(stats: Dict[str, float], layers: Sequence[MetaPooling], step: int) -> None:
    """Stop the search at the first non-finite loss or α: nothing after it would mean anything."""
    searching = any(m.fixed is None for m in layers)  # else L_mt was not computed (NaN by design)
    bad = [f"{k} = {v}" for k, v in stats.items()
           if k.startswith("loss") and not math.isfinite(v) and (searching or k != "loss_mt")]
    if not bool(torch.isfinite(torch.cat([m.alpha.detach().reshape(-1) for m in layers])).all()):
        bad.append(f"alpha of layer(s) {[i for i, m in enumerate(layers) if not torch.isfinite(m.alpha).all()]}")
    if bad:
        raise FloatingPointError(f"search step {step}: {', '.join(bad)} not finite; lower the learning rates "
                                 f"(--lr, --alpha-lr) or set --grad-clip")


def bilevel_step(net: nn.Module, model: nn.Module, layers: Sequence[MetaPooling], weights: Sequence[nn.Parameter],
                 w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer, batch_tr, batch_mt, *, lr: float,
                 world_size: int = 1, fresh_train_grad: bool = False, grad_clip: Optional[float] = None,
                 phase_hook=None) -> Dict[str, float]:
    """One step of Algorithm 1 (Eq. 3 then the real SGD step); see the module docstring.

    ``net`` computes L_tr (the DistributedDataParallel wrapper when there is one, which averages θ's
    gradient); ``model`` is the bare network, used for L_mt so that DDP neither reduces nor
    accumulates anything for θ there. α's gradient is averaged across processes here.
    ``phase_hook(name)`` is called after each phase ("train_grad", "virtual", "meta", "restore",
    "update") so tests can inspect gradients and parameters in between.
    """
    hook = phase_hook or (lambda name: None)
    crit = nn.functional.cross_entropy
    x_tr, y_tr = batch_tr
    x_mt, y_mt = batch_mt

    # 1. g = ∇θ L_tr(θ, α)
    w_opt.zero_grad(set_to_none=True)
    with alphas_frozen(layers):
        logits_tr = net(x_tr)
        loss_tr = crit(logits_tr, y_tr)
        loss_tr.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(weights, grad_clip)
    hook("train_grad")

    # 2. θ' = θ − ζ g, in place; θ and the BatchNorm statistics are saved to be restored in 4.
    params = [p for p in weights if p.grad is not None]
    grads = [p.grad for p in params]
    buffers = list(model.buffers())
    with torch.no_grad():
        saved_params = [p.detach().clone() for p in params]
        saved_buffers = [b.detach().clone() for b in buffers]
        if params:
            torch._foreach_add_(params, grads, alpha=-lr)
    hook("virtual")

    # 3. α ← Adam(α, ∇α L_mt(θ', α)); only α is differentiated, θ' is a constant.
    a_opt.zero_grad(set_to_none=True)
    searching = [m.alpha for m in layers if m.fixed is None]
    loss_mt_v = acc_mt = float("nan")
    if searching:
        logits_mt = model(x_mt)
        loss_mt = crit(logits_mt, y_mt)
        g_alpha = torch.autograd.grad(loss_mt, searching, allow_unused=True)
        g_alpha = [torch.zeros_like(a) if g is None else g for a, g in zip(searching, g_alpha)]
        if world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in g_alpha])
            dist.all_reduce(flat)
            flat /= world_size
            g_alpha = list(torch.split(flat, [a.numel() for a in searching]))
        for a, g in zip(searching, g_alpha):
            a.grad = g.view_as(a).clone()
        a_opt.step()
        loss_mt_v, acc_mt = loss_mt.item(), accuracy(logits_mt.detach(), y_mt)
    hook("meta")

    # 4. θ ← θ restored exactly, then the real SGD step on ∇θ L_tr(θ, α).
    with torch.no_grad():
        if params:
            torch._foreach_copy_(params, saved_params)
        for b, s in zip(buffers, saved_buffers):
            b.copy_(s)
    hook("restore")
    if fresh_train_grad:
        w_opt.zero_grad(set_to_none=True)
        with alphas_frozen(layers):
            crit(net(x_tr), y_tr).backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(weights, grad_clip)
    w_opt.step()
    hook("update")
    return {"loss_tr": loss_tr.item(), "acc_tr": accuracy(logits_tr.detach(), y_tr),
            "loss_mt": loss_mt_v, "acc_mt": acc_mt}


# ---------------------------------------------------------------------------------------------
# Consistency across processes.
# ---------------------------------------------------------------------------------------------
def fixed_codes(layers: Sequence[MetaPooling], device) -> torch.Tensor:
    return torch.tensor([-1 if m.fixed is None else m.candidates.index(m.fixed) for m in layers],
                        dtype=torch.long, device=device)


def verify_fixed(layers: Sequence[MetaPooling], env: distributed.DistEnv) -> None:
    """Every process must hold the same fixed set; fixing is decided locally from α, so check it."""
    if not env.distributed:
        return
    codes = fixed_codes(layers, env.device)
    both = torch.cat([codes, -codes])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, neg_lo = both.split(len(codes))
    if not torch.equal(hi, -neg_lo):
        raise RuntimeError(f"rank {env.rank}: the fixed layers differ across processes "
                           f"(here {codes.tolist()}, max {hi.tolist()}, min {(-neg_lo).tolist()})")


def verify_alphas(layers: Sequence[MetaPooling], env: distributed.DistEnv) -> None:
    """α must be bitwise identical on every process (rank 0's copy is the reference)."""
    if not env.distributed:
        return
    flat = torch.cat([m.alpha.detach().reshape(-1) for m in layers])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    mismatch = torch.tensor([0 if torch.equal(flat, ref) else 1], device=flat.device)
    dist.all_reduce(mismatch)
    if mismatch.item():
        raise RuntimeError(f"α differs across processes on {int(mismatch.item())} rank(s)")


def unused_parameter_names(model: nn.Module) -> List[str]:
    """Parameters no forward touches any more: the strip gates of layers fixed to another op."""
    names = []
    for prefix, m in model.named_modules():
        if isinstance(m, MetaPooling) and m.fixed not in (None, "strip") and m.gate_h is not None:
            names += [f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters() if n.startswith("gate_")]
    return names


def wrap_ddp(model: nn.Module, env: distributed.DistEnv) -> nn.Module:
    """DDP for the θ that the forward uses.

    α is left out: it gets its gradient outside DDP's forward and :func:`bilevel_step` averages it.
    The strip gates of layers fixed to another op are left out too, so DDP needs no
    ``find_unused_parameters`` traversal every step; the search wraps the model again after each fix
    event (the fixed set is identical on every process, so all of them do).
    """
    if not env.distributed:
        return model
    ignore = [f"{prefix}.alpha" if prefix else "alpha" for prefix, m in model.named_modules()
              if isinstance(m, MetaPooling)] + unused_parameter_names(model)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


# ---------------------------------------------------------------------------------------------
# The search.
# ---------------------------------------------------------------------------------------------
def run_search(cfg: SearchConfig, *, model: Optional[nn.Module] = None, data: Optional[DataBundle] = None,
               stop_after_epochs: Optional[int] = None, log=print) -> SearchResult:
    """Algorithm 1 end to end: search, save checkpoints every epoch, derive and save the genotype.

    ``model``/``data`` replace the MobileNetV2 and the data set the config describes (tests pass a
    tiny network and synthetic data). ``stop_after_epochs`` ends this invocation early, as an
    interruption would; ``cfg.resume`` continues from a checkpoint.
    """
    t_start = time.perf_counter()
    cfg, ckpt, env, log, folder, logger = runs.start_run(cfg, "search", log, model_given=model is not None)
    if data is None:
        data = runs.run_data(cfg, env, cfg.meta_fraction)
    if data.meta is None:
        raise ValueError("the search needs a meta split (D_mt of Eq. 3); build the data with a meta_fraction")
    if model is None:
        described = (ckpt or {}).get("model_config") or {}  # a resumed run's blocks
        model, model_cfg = networks.build_for_run(cfg, "meta", data, blocks=described.get("blocks"))
    else:
        model_cfg = networks.handed_over_config(cfg, "meta", data, model)
    fmt = distributed.memory_format(cfg.channels_last, env.device)
    model.to(env.device, memory_format=fmt)
    layers = meta_layers(model)
    if not layers:
        raise ValueError("the model has no Meta-Pooling layers to search")
    # The two levels of Eq. 2: α of every Meta-Pooling layer, θ every other parameter.
    alphas, weights = alpha_parameters(model), weight_parameters(model)
    w_opt = torch.optim.SGD(weights, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    a_opt = torch.optim.Adam(alphas, lr=cfg.alpha_lr, betas=cfg.alpha_betas, weight_decay=cfg.alpha_weight_decay)
    steps_per_epoch = len(data.train)
    total_steps = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=total_steps)
    state = SearchState()

    if ckpt is not None:
        with runs.restoring(cfg.resume, "the search"):
            model.load_state_dict(ckpt["model"])
            runs.restore_optimizer(w_opt, ckpt["w_opt"], "w_opt")
            runs.restore_optimizer(a_opt, ckpt["a_opt"], "a_opt")
            runs.restore_scheduler(sched, ckpt["sched"], "sched")
            state = SearchState(**ckpt["state"])
            if [m.fixed for m in layers] != ckpt["fixed"]:
                raise ValueError("the restored fixed set disagrees with the checkpoint's record")
            if not distributed.restore_rng_states(ckpt["rng"], env):
                distributed.seed_everything(cfg.seed + 7919 * state.epoch + env.rank)
        log(f"resumed from {cfg.resume}: epoch {state.epoch}, step {state.step}, "
            f"{sum(m.fixed is not None for m in layers)}/{len(layers)} layers fixed")
    else:
        # Same θ on every process (DDP also broadcasts it); distinct dropout masks per process.
        torch.manual_seed(cfg.seed + 1 + env.rank)
        logger.log("start", kind="search", config=dataclasses.asdict(cfg), world_size=env.world_size,
                   device=str(env.device), data=data.describe(), steps_per_epoch=steps_per_epoch,
                   **networks.describe_model(model, data.in_chans, data.image_size))
        log(f"PMPL search on {env.device} x{env.world_size}: {data.describe()}")
        log(f"  {len(layers)} Meta-Pooling layers over {list(cfg.candidates)}; {cfg.epochs} epochs x "
            f"{steps_per_epoch} steps, ρ={cfg.rho}, α: Adam lr {cfg.alpha_lr} wd {cfg.alpha_weight_decay}, "
            f"θ: SGD lr {cfg.lr} cosine, momentum {cfg.momentum}, wd {cfg.weight_decay}")
    net = wrap_ddp(model, env)
    history_every = max(1, steps_per_epoch // max(1, cfg.history_points))
    if not state.history:
        state.history.append({"step": 0, "probs": layer_probs(layers)})

    def all_fixed() -> bool:
        return all(m.fixed is not None for m in layers)

    def fix_now(epoch: int) -> None:
        nonlocal net
        events = progressive_early_stopping(layers, cfg.rho)
        verify_fixed(layers, env)
        for e in events:
            e.update(step=state.step, epoch=epoch)
            state.events.append(e)
            logger.log("fix", **e)
        if events:
            state.history.append({"step": state.step, "probs": layer_probs(layers)})
            if env.distributed:
                net = wrap_ddp(model, env)

    epochs_run = 0
    while not state.done and state.epoch < cfg.epochs:
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            break
        epoch = state.epoch
        data.train.set_epoch(epoch)
        data.meta.set_epoch(epoch)
        meta_iter, meta_cycle = iter(data.meta), 0
        sums = {"loss_tr": 0.0, "acc_tr": 0.0, "loss_mt": 0.0, "acc_mt": 0.0, "n": 0}
        t_epoch = time.perf_counter()
        bar = progress(data.train, f"search {epoch + 1}/{cfg.epochs}", enabled=cfg.progress and env.is_main)
        for batch_tr in bar:
            try:
                batch_mt = next(meta_iter)
            except StopIteration:  # D_mt shorter than D_tr: go round it again, reshuffled
                meta_cycle += 1
                data.meta.set_epoch(epoch + 100_003 * meta_cycle)
                meta_iter = iter(data.meta)
                batch_mt = next(meta_iter)
            batch_tr = (batch_tr[0].contiguous(memory_format=fmt), batch_tr[1])
            batch_mt = (batch_mt[0].contiguous(memory_format=fmt), batch_mt[1])
            stats = bilevel_step(net, model, layers, weights, w_opt, a_opt, batch_tr, batch_mt,
                                 lr=sched.get_last_lr()[0], world_size=env.world_size,
                                 fresh_train_grad=cfg.fresh_train_grad, grad_clip=cfg.grad_clip)
            sched.step()
            state.step += 1
            check_finite(stats, layers, state.step)
            for k, v in stats.items():
                if not math.isnan(v):
                    sums[k] += v
            sums["n"] += 1
            if cfg.fix_every == "step":
                fix_now(epoch)
            if state.step % history_every == 0 and state.history[-1]["step"] != state.step:
                state.history.append({"step": state.step, "probs": layer_probs(layers)})
            n_fixed = sum(m.fixed is not None for m in layers)
            bar.set_postfix_str(f"L_tr {stats['loss_tr']:.3f} acc {stats['acc_tr']:.1f}% "
                                f"L_mt {stats['loss_mt']:.3f} fixed {n_fixed}/{len(layers)}")
            if all_fixed():
                break
        bar.close()
        if cfg.fix_every == "epoch":
            fix_now(epoch)
        verify_alphas(layers, env)
        distributed.broadcast_buffers(model, env)
        n = max(sums.pop("n"), 1)
        means = distributed.all_reduce_sum([v / n for v in sums.values()], env)
        means = {k: v / env.world_size for k, v in zip(sums, means)}
        state.epoch = epoch + 1
        epochs_run += 1
        state.done = all_fixed() or state.epoch >= cfg.epochs
        if state.history[-1]["step"] != state.step:
            state.history.append({"step": state.step, "probs": layer_probs(layers)})
        n_fixed = sum(m.fixed is not None for m in layers)
        record = {"epoch": state.epoch, "step": state.step, "lr": sched.get_last_lr()[0],
                  "fixed": n_fixed, "layers": len(layers), "seconds": round(time.perf_counter() - t_epoch, 2),
                  **{k: round(v, 4) for k, v in means.items()}}
        logger.log("epoch", **record, probs=layer_probs(layers))
        log(f"search epoch {state.epoch}/{cfg.epochs}: L_tr {means['loss_tr']:.3f} acc_tr {means['acc_tr']:.1f}% "
            f"L_mt {means['loss_mt']:.3f} acc_mt {means['acc_mt']:.1f}%  fixed {n_fixed}/{len(layers)}  "
            f"({record['seconds']:.0f} s)")
        ckpt_state = {
            "kind": "search", "version": runs.CHECKPOINT_VERSION, "config": dataclasses.asdict(cfg),
            "model_config": model_cfg,
            "model": model.state_dict(), "w_opt": w_opt.state_dict(), "a_opt": a_opt.state_dict(),
            "sched": sched.state_dict(), "state": dataclasses.asdict(state), "fixed": [m.fixed for m in layers],
            "rng": distributed.gather_rng_states(env), "world_size": env.world_size,
            "data": {"train": data.train.state_dict(), "meta": data.meta.state_dict()},
        }
        if env.is_main:
            runs.save_checkpoint(ckpt_state, folder.file("checkpoint.pt"))

    result = _finish(cfg, model, layers, state, steps_per_epoch, data, env, folder, logger, log, t_start, model_cfg)
    result.alpha_optimizer_state = a_opt.state_dict()
    return result


# A never-fixed layer whose top two weights differ by less than this share of ρ chose by noise.
NOISE_MARGIN_OF_RHO = 0.25


def noise_chosen_layers(layers, probs, rho: float) -> List[int]:
    """Indices of the layers Eq. 4 never fixed whose largest π leads the runner-up by less than
    NOISE_MARGIN_OF_RHO · ρ: their argmax is not a choice."""
    out = []
    for i, (m, p) in enumerate(zip(layers, probs)):
        top = sorted(p, reverse=True)
        if m.fixed is None and len(top) > 1 and top[0] - top[1] < NOISE_MARGIN_OF_RHO * rho:
            out.append(i)
    return out


def _finish(cfg, model, layers, state, steps_per_epoch, data, env, folder, logger, log, t_start,
            model_cfg) -> SearchResult:
    probs = layer_probs(layers)
    genotype = derive(model)  # fixed op, or the argmax for layers Eq. 4 never fixed
    table = genotype_table(genotype, probs, [m.candidates for m in layers], [m.channels for m in layers],
                           state.events, steps_per_epoch)
    geno_path = plot_path = None
    ckpt_path = folder / "checkpoint.pt"
    if state.done and env.is_main:
        from ..insert import block_names
        from ..models import save_genotype

        plot_path = plot_alpha_history(state.history, state.events, cfg.candidates, folder.file("alpha_history.png"),
                                       steps_per_epoch)
        geno_path = folder.file("genotype.json")
        with open(folder.file("alpha_history.json"), "w") as f:
            json.dump({"candidates": list(cfg.candidates), "steps_per_epoch": steps_per_epoch,
                       "history": state.history, "fix_events": state.events}, f)
        chosen = [p[m.candidates.index(op)] for m, op, p in zip(layers, genotype, probs)]
        save_genotype(genotype, geno_path, probs=chosen, fix_events=state.events,
                      argmax_layers=[i for i, m in enumerate(layers) if m.fixed is None],
                      epochs=state.epoch, steps=state.step, steps_per_epoch=steps_per_epoch,
                      all_fixed=all(m.fixed is not None for m in layers), rho=cfg.rho,
                      candidates=list(cfg.candidates), model_config=model_cfg, data=data.name,
                      config=dataclasses.asdict(cfg), blocks=block_names(model))
        logger.log("done", genotype=genotype, probs=chosen, epochs=state.epoch, steps=state.step,
                   seconds=round(time.perf_counter() - t_start, 2), genotype_path=str(geno_path),
                   plot=str(plot_path))
        log(table)
        noisy = noise_chosen_layers(layers, probs, cfg.rho)
        if noisy:
            log(f"warning: {len(noisy)} of {len(layers)} layers (blocks {', '.join(str(i + 1) for i in noisy)}) were "
                f"never fixed by Eq. 4 and their π is within noise of uniform (largest − runner-up < "
                f"{NOISE_MARGIN_OF_RHO:g}·ρ = {NOISE_MARGIN_OF_RHO * cfg.rho:.3g}): their ops in the genotype are "
                "argmaxes of noise. Search longer (--epochs) or with a larger --alpha-lr.")
        log(f"genotype → {geno_path}\nπ history plot → {plot_path}")
    return SearchResult(genotype=genotype, probs=probs, events=list(state.events), history=list(state.history),
                        epochs=state.epoch, steps=state.step, steps_per_epoch=steps_per_epoch, done=state.done,
                        out_dir=folder.path, genotype_path=geno_path, plot_path=plot_path,
                        checkpoint_path=ckpt_path if ckpt_path.exists() else None, table=table,
                        seconds=time.perf_counter() - t_start, model=model)
