"""Table 3 of the Meta-Pooling paper on Fashion-MNIST: ``python -m experiments.ablation``.

Five variants of MobileNetV2 (small input, width 0.35 by default), each retrained from scratch with
the same budget on the full training set (60,000 images) and evaluated on the test set (10,000),
for several seeds:

========  =====================================================================================
No        plain MobileNetV2 (skip after every block)
Local     avg3 after every block (Table 3: "an average pooling layer with a kernel size of 3")
Global    strip, the global context enhancer, after every block
Random    each block draws one of skip / avg3 / strip ("a random selection from three
          enhancers"); a new draw per seed
PMPL      a PMPL search over the paper's 8 candidates (Algorithm 1, ρ = 0.2, the paper's
          optimisers), then the derived genotype retrained like the others
========  =====================================================================================

A seed sets the data order and augmentation, the initialisation, the Random draw and the search.

The budget (see :class:`AblationConfig` and :func:`scaled_alpha_lr`): the paper searches 30 epochs
of ImageNet (≈150,000 bi-level steps) and retrains 200 epochs; on a 2-core CPU the whole table gets
about three hours (2.5 with ``--jobs 2``), so the retraining is 2 epochs and the search 6 epochs of
D_tr (1,404 steps). With 150,000 / 1,404 ≈ 107 times fewer steps, α's Adam learning rate is scaled
by √107 (0.0031 instead of 3e-4): the random-walk part of α's travel, η·√S, is then the paper's
(≈0.12, a third of the smallest logit gap Eq. 4 needs at ρ = 0.2), so noise alone does not fix
layers, while the drift a consistent gradient can produce, η·S ≈ 4.4, is what the step count allows
(the paper's ≈45 would take η = 0.032, whose noise travel ≈1.2 exceeds the Eq. 4 gap: layers would
be fixed on noise, as in a short demo). Nothing here is tuned on the test set.

Layout of ``--out`` (default ``runs/ablation``): ``settings.json`` (what every run shares; resuming
with other settings is refused), ``runs/<variant>-seed<k>/`` per run (``search/`` for PMPL,
``retrain/``, ``genotype.json`` for Random, ``console.log`` with ``--jobs`` above 1 and
``result.json`` once finished), and the report: ``results.json``, ``RESULTS.md`` and
``layer_choices.png`` (into ``--report`` if given). Finished runs are skipped; an interrupted one
resumes from its last epoch's checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from metapool_kernels.reference import PAPER_CANDIDATES
from . import report
from bench.common import cpu_model
from metapool_kernels.pmpl.search import SearchConfig, run_search
from metapool_kernels.pmpl.train import TrainConfig, run_train

# Table 3's variants, in its column order: key → (label, what it is).
VARIANTS: Dict[str, Tuple[str, str]] = {
    "none": ("No", "plain MobileNetV2"),
    "local": ("Local", "avg3 after every block"),
    "global": ("Global", "strip after every block"),
    "random": ("Random", "one of skip / avg3 / strip per block, a new draw per seed"),
    "pmpl": ("PMPL", "PMPL search, then the derived genotype"),
}
TABLE3_ENHANCERS = ("skip", "avg3", "strip")  # what "Random" draws from
_FIXED_ENHANCER = {"none": "none", "local": "avgpool", "global": "strip"}

# The paper's search (§3.1): 30 epochs of ImageNet's D_tr (half of 1,281,167 images) at batch 128,
# Adam lr 3e-4 for α.
PAPER_ALPHA_LR = 3e-4
PAPER_SEARCH_STEPS = 30 * ((1_281_167 // 2) // 128)

FASHION_MNIST_TRAIN = 60_000


def scaled_alpha_lr(search_steps: int) -> float:
    """α's Adam learning rate for a search of ``search_steps`` steps: the paper's, scaled so that
    α's random-walk travel η·√S equals the paper's (see the module docstring)."""
    if search_steps < 1:
        raise ValueError(f"the search needs at least one step, got {search_steps}")
    return PAPER_ALPHA_LR * math.sqrt(PAPER_SEARCH_STEPS / search_steps)


@dataclass
class AblationConfig:
    """The ablation. Every field above ``variants`` is shared by all runs and fixed once started."""
    # The network and data. Width 0.35 (8 to 112 channels in the blocks after torchvision's rounding
    # to multiples of 8) is the demo's: within a fixed three hours a wider network buys fewer steps.
    width: float = 0.35
    batch_size: int = 128
    subset: Optional[int] = None          # training images (default all 60,000)
    test_subset: Optional[int] = None     # test images (default all 10,000)
    # retraining, identical for every variant (paper §3.1 optimiser, shorter schedule).
    # The default budget: 15 retrainings of 2 × 468 steps (≈1.05 plain steps each on average) plus
    # 3 searches of 6 × 234 steps, a search step taken as 2 × 1.3 plain steps (two supernet passes
    # at the fused CPU kernels' goal), plus evaluation: ≈26,000 plain-step equivalents, ≈2.9 h at the
    # ≈0.4 s a plain step of width 0.35, batch 128 takes on 2 idle cores. `--estimate` re-measures.
    retrain_epochs: int = 2
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 4e-5
    # the PMPL search (paper §3.1, except the number of epochs and α's lr, scaled to them)
    search_epochs: int = 6
    meta_fraction: float = 0.5
    alpha_lr: Optional[float] = None      # None: scaled_alpha_lr(search steps)
    alpha_weight_decay: float = 1e-3
    alpha_betas: Tuple[float, float] = (0.5, 0.999)
    rho: float = 0.2
    candidates: Tuple[str, ...] = PAPER_CANDIDATES
    # what this invocation runs, and how
    variants: Tuple[str, ...] = tuple(VARIANTS)
    seeds: Tuple[int, ...] = (0, 1, 2)
    out_dir: str = "runs/ablation"
    report_dir: Optional[str] = None      # default: out_dir
    device: str = "cpu"
    threads: Optional[int] = None         # None: torch's default (divided among the jobs)
    jobs: int = 1                         # runs at a time, each in its own process
    progress: bool = True

    RUN_FIELDS = ("variants", "seeds", "out_dir", "report_dir", "device", "threads", "jobs", "progress")

    def __post_init__(self):
        self.candidates, self.variants = tuple(self.candidates), tuple(self.variants)
        self.seeds, self.alpha_betas = tuple(self.seeds), tuple(self.alpha_betas)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        for name in ("retrain_epochs", "search_epochs", "batch_size", "jobs", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def settings(self) -> Dict[str, Any]:
        """The fields every run shares (what ``settings.json`` holds)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k not in self.RUN_FIELDS}


# Presets for --budget; single flags (--retrain-epochs, ...) override them.
BUDGETS: Dict[str, Dict[str, Any]] = {
    "full": {},
    # Minutes: the pipeline end to end on a small slice, not a result.
    "smoke": dict(subset=1024, test_subset=512, batch_size=64, retrain_epochs=1, search_epochs=1, seeds=(0, 1)),
}


# ---------------------------------------------------------------------------------------------
# The plan: steps per run, α's lr, the map size of every layer.
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    retrain_steps_per_epoch: int
    search_steps_per_epoch: int
    search_epochs: int
    alpha_lr: float
    map_sizes: List[int]

    @property
    def search_steps(self) -> int:
        return self.search_steps_per_epoch * self.search_epochs


def make_plan(cfg: AblationConfig) -> Plan:
    """Loader lengths from the real loaders (the split sizes do not depend on the seed)."""
    from metapool_kernels.pmpl.data import build_data

    retrain = build_data(batch_size=cfg.batch_size, meta_fraction=None, subset=cfg.subset,
                         test_subset=cfg.test_subset, seed=0)
    search = build_data(batch_size=cfg.batch_size, meta_fraction=cfg.meta_fraction, subset=cfg.subset,
                        test_subset=cfg.test_subset, seed=0)
    s_steps = len(search.train)
    alpha_lr = cfg.alpha_lr if cfg.alpha_lr is not None else scaled_alpha_lr(s_steps * cfg.search_epochs)
    return Plan(len(retrain.train), s_steps, cfg.search_epochs, alpha_lr, layer_map_sizes(cfg, retrain.image_size))


def layer_map_sizes(cfg: AblationConfig, image_size: int) -> List[int]:
    """The feature-map side after each of the 17 blocks, from one forward of a blank image."""
    from metapool_kernels.models import mobilenet_v2

    model = mobilenet_v2("avgpool", width_mult=cfg.width, num_classes=10, in_chans=1, small_input=True).eval()
    sizes: List[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
             for m in model.features[1:18]]
    with torch.no_grad():
        model(torch.zeros(1, 1, image_size, image_size))
    for h in hooks:
        h.remove()
    return sizes


# ---------------------------------------------------------------------------------------------
# One run.
# ---------------------------------------------------------------------------------------------
def run_dir(cfg: AblationConfig, variant: str, seed: int) -> Path:
    return Path(cfg.out_dir) / "runs" / f"{variant}-seed{seed}"


def _checkpoint_or_clean(folder: Path) -> Optional[str]:
    """The checkpoint to resume from, or None after clearing what a start that never finished an
    epoch left behind (its log), so the run starts afresh in an empty folder."""
    ckpt = folder / "checkpoint.pt"
    if ckpt.is_file():
        return str(ckpt)
    if folder.exists():
        leftovers = [p.name for p in folder.iterdir() if p.name not in ("log.jsonl", "checkpoint.pt.tmp")]
        if leftovers:
            raise ValueError(f"{folder} holds {leftovers} but no checkpoint.pt to resume from; "
                             f"move it away to run this part again")
        shutil.rmtree(folder)
    return None


def _common(cfg: AblationConfig, seed: int) -> Dict[str, Any]:
    return dict(subset=cfg.subset, test_subset=cfg.test_subset, batch_size=cfg.batch_size, width=cfg.width,
                small_input=True, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                device=cfg.device, seed=seed, progress=cfg.progress, workers=0)


def _epoch_seconds(log_path: Path) -> float:
    if not log_path.is_file():
        return 0.0
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return sum(r.get("seconds", 0.0) for r in records if r.get("event") == "epoch")


def _search(cfg: AblationConfig, plan: Plan, seed: int, folder: Path, log) -> Path:
    """PMPL's search for one seed (resumed if interrupted); returns its genotype file."""
    genotype = folder / "genotype.json"
    if genotype.is_file():
        return genotype
    resume = _checkpoint_or_clean(folder)
    scfg = SearchConfig(epochs=cfg.search_epochs, meta_fraction=cfg.meta_fraction, alpha_lr=plan.alpha_lr,
                        alpha_weight_decay=cfg.alpha_weight_decay, alpha_betas=cfg.alpha_betas, rho=cfg.rho,
                        candidates=cfg.candidates, out_dir=str(folder), resume=resume, **_common(cfg, seed))
    result = run_search(scfg, log=log)
    if not result.done or result.genotype_path is None:
        raise RuntimeError(f"the search in {folder} stopped before its end")
    return genotype


def _random_genotype(cfg: AblationConfig, seed: int, folder: Path) -> Path:
    """The Random variant's draw for ``seed`` (models' 'random' enhancer over skip / avg3 / strip)."""
    from metapool_kernels.models import derive, mobilenet_v2, save_genotype

    path = folder / "genotype.json"
    if not path.is_file():
        drawn = derive(mobilenet_v2("random", width_mult=cfg.width, num_classes=10, in_chans=1, small_input=True,
                                    candidates=TABLE3_ENHANCERS, seed=seed))
        folder.mkdir(parents=True, exist_ok=True)
        save_genotype(drawn, path, drawn_from=list(TABLE3_ENHANCERS), seed=seed)
    return path


def run_one(cfg: AblationConfig, plan: Plan, variant: str, seed: int, log=print) -> Dict[str, Any]:
    """Search (PMPL), draw (Random), retrain and evaluate one variant for one seed; the result dict."""
    from metapool_kernels.models import load_genotype

    folder = run_dir(cfg, variant, seed)
    label = f"{VARIANTS[variant][0]} seed {seed}"
    search_info = None
    if variant in _FIXED_ENHANCER:
        what: Dict[str, Any] = {"enhancer": _FIXED_ENHANCER[variant]}
    else:
        if variant == "pmpl":
            geno_path = _search(cfg, plan, seed, folder / "search", log)
            meta = json.loads(geno_path.read_text())
            search_info = {k: meta.get(k) for k in ("probs", "fix_events", "argmax_layers", "steps", "epochs",
                                                    "steps_per_epoch", "all_fixed", "rho", "candidates")}
            search_info["alpha_lr"] = plan.alpha_lr
            search_info["seconds"] = _epoch_seconds(folder / "search" / "log.jsonl")
        else:
            geno_path = _random_genotype(cfg, seed, folder)
        what = {"genotype": str(geno_path)}
    retrain = folder / "retrain"
    tcfg = TrainConfig(epochs=cfg.retrain_epochs, eval_every=0, out_dir=str(retrain),
                       resume=_checkpoint_or_clean(retrain), **what, **_common(cfg, seed))
    res = run_train(tcfg, name=label, log=log)
    genotype = load_genotype(what["genotype"]) if "genotype" in what else None
    return {"variant": variant, "seed": seed, "name": label, "genotype": genotype, "top1": res.top1,
            "top5": res.top5, "loss": res.loss, "train_acc": res.train_acc, "params": res.params, "macs": res.macs,
            "epochs": res.epochs, "retrain_steps": res.epochs * plan.retrain_steps_per_epoch,
            "retrain_seconds": sum(h.get("seconds", 0.0) for h in res.history), "search": search_info,
            "device": cfg.device, "threads": torch.get_num_threads(), "jobs": cfg.jobs, "cpu": cpu_model()}


# ---------------------------------------------------------------------------------------------
# The whole table.
# ---------------------------------------------------------------------------------------------
def check_settings(cfg: AblationConfig) -> None:
    """Write ``settings.json`` on the first start; refuse to resume under different settings."""
    path = Path(cfg.out_dir) / "settings.json"
    mine = cfg.settings()
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            said = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{cfg.out_dir} holds an ablation with other settings ({said}); "
                             f"use another --out, or the same settings to resume it")
    else:
        report.write_json(mine, path)


def finished_runs(cfg: AblationConfig) -> List[Dict[str, Any]]:
    runs = []
    for seed in cfg.seeds:
        for variant in cfg.variants:
            path = run_dir(cfg, variant, seed) / "result.json"
            if path.is_file():
                runs.append(json.loads(path.read_text()))
    return runs


def run_ablation(cfg: AblationConfig, log=print, run: Callable = run_one) -> Dict[str, Any]:
    """Every (seed, variant) run not finished yet, the report rewritten after each; returns the
    results dict. One job runs them seed by seed (so a partial table already holds every variant);
    several jobs run them in separate processes, the searches first (they are the longest runs)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        check_settings(cfg)
        plan = make_plan(cfg)
        pending = []
        for seed in cfg.seeds:
            for variant in cfg.variants:
                if (run_dir(cfg, variant, seed) / "result.json").is_file():
                    log(f"{variant} seed {seed}: finished before, skipped")
                else:
                    pending.append((variant, seed))
        log(f"ablation in {cfg.out_dir}: variants {', '.join(cfg.variants)} x seeds {list(cfg.seeds)}; "
            f"retrain {cfg.retrain_epochs} epoch(s) x {plan.retrain_steps_per_epoch} steps, search "
            f"{cfg.search_epochs} epoch(s) x {plan.search_steps_per_epoch} steps, α lr {plan.alpha_lr:.3g}, "
            f"{len(pending)} run(s) to go, {min(cfg.jobs, max(1, len(pending)))} at a time x "
            f"{job_threads(cfg)} thread(s)")

        def finished(variant: str, seed: int, result: Dict[str, Any]) -> None:
            report.write_json(result, run_dir(cfg, variant, seed) / "result.json")
            write_report(cfg, plan)

        t0 = time.perf_counter()
        if cfg.jobs == 1:
            for variant, seed in pending:
                log(f"--- {variant} seed {seed} ({time.perf_counter() - t0:.0f} s into this invocation)")
                finished(variant, seed, run(cfg, plan, variant, seed, log=log))
        else:
            if run is not run_one:
                raise ValueError("a custom run function needs jobs=1 (it is not sent to other processes)")
            for variant, seed, result in _in_processes(cfg, plan, start_order(cfg, pending), log):
                log(f"--- {variant} seed {seed}: top-1 {result['top1']:.2f} % "
                    f"({time.perf_counter() - t0:.0f} s into this invocation)")
                finished(variant, seed, result)
        return write_report(cfg, plan, log=log)
    finally:
        torch.set_num_threads(threads)


def start_order(cfg: AblationConfig, runs: List[Tuple[str, int]]) -> List[Tuple[str, int]]:
    """Seed by seed with one job; with several, the PMPL runs (a search each: the longest) first, so
    that no search starts while the other workers run out of work."""
    return sorted(runs, key=lambda vs: vs[0] != "pmpl") if cfg.jobs > 1 else list(runs)


def job_threads(cfg: AblationConfig) -> int:
    """Threads per run: --threads, or torch's default shared among the jobs."""
    return cfg.threads or max(1, torch.get_num_threads() // cfg.jobs)


# Separate processes, not threads: each run is a training loop holding the GIL between kernels, and
# the small network's steps scale poorly over intra-op threads: on 2 cores a retraining step takes
# ≈0.42 s on 2 threads and ≈0.67 s on 1 thread beside a second run, a search step ≈1.2 and ≈1.6 s.
# "spawn": a forked child of a process whose OpenMP pool has started can deadlock.
def _start_job(threads: int) -> None:
    torch.set_num_threads(threads)


def _job_pool(cfg: AblationConfig, workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_job, initargs=(job_threads(cfg),))


def _job(cfg: AblationConfig, plan: Plan, variant: str, seed: int) -> Dict[str, Any]:
    """One run in a worker process; its output goes to its own console.log, not the shared terminal."""
    folder = run_dir(cfg, variant, seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "console.log", "a", encoding="utf-8") as out, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        return run_one(cfg, plan, variant, seed, log=lambda *a: print(*a, flush=True))


def _in_processes(cfg: AblationConfig, plan: Plan, runs: List[Tuple[str, int]], log):
    """Yields (variant, seed, result) as runs finish in ``cfg.jobs`` worker processes, in the order
    given. After a run fails, nothing new starts; the runs under way finish and are yielded, then the
    failure is raised (every finished run is kept, as with one job)."""
    if not runs:
        return
    log(f"each run writes its output to {run_dir(cfg, '<variant>', 0).parent}/<variant>-seed<k>/console.log")
    failure: Optional[BaseException] = None
    with _job_pool(cfg, min(cfg.jobs, len(runs))) as pool:
        futures = {pool.submit(_job, cfg, plan, variant, seed): (variant, seed) for variant, seed in runs}
        for future in as_completed(futures):
            variant, seed = futures[future]
            if future.cancelled():
                continue
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - re-raised below, naming the run
                if failure is None:
                    failure = RuntimeError(f"{variant} seed {seed} failed: {exc} (its output: "
                                           f"{run_dir(cfg, variant, seed) / 'console.log'})")
                    failure.__cause__ = exc
                    for other in futures:
                        other.cancel()
                continue
            yield variant, seed, result
    if failure is not None:
        raise failure


def budget_lines(cfg: AblationConfig, plan: Plan) -> List[str]:
    n_train = min(cfg.subset or FASHION_MNIST_TRAIN, FASHION_MNIST_TRAIN)
    n_meta = int(round(n_train * cfg.meta_fraction))
    sizes = sorted(set(plan.map_sizes), reverse=True)
    return [
        f"Data: Fashion-MNIST, {n_train:,} training images (28×28, pad-4 random crop and horizontal flip), "
        f"{cfg.test_subset or 10_000:,} test images.",
        f"Network: MobileNetV2 ×{cfg.width}, 1 input channel, small input (stride 1 in the stem and the first "
        f"24-channel block): the 17 blocks see maps of {', '.join(f'{s}×{s}' for s in sizes)}.",
        f"Retraining, identical for every variant: {cfg.retrain_epochs} epoch(s) × {plan.retrain_steps_per_epoch} "
        f"steps, batch {cfg.batch_size}, SGD lr {cfg.lr} (cosine to 0), momentum {cfg.momentum}, weight decay "
        f"{cfg.weight_decay} — the paper's optimiser; the paper retrains 200 epochs of ImageNet.",
        f"PMPL search: {cfg.search_epochs} epoch(s) × {plan.search_steps_per_epoch} steps = {plan.search_steps:,} "
        f"bi-level steps on D_tr = {n_train - n_meta:,} / D_mt = {n_meta:,} images; θ as above; α: Adam "
        f"lr {plan.alpha_lr:.3g}, betas {tuple(cfg.alpha_betas)}, weight decay {cfg.alpha_weight_decay}; "
        f"ρ = {cfg.rho}; candidates {', '.join(cfg.candidates)}.",
        (f"α's learning rate: the paper's {PAPER_ALPHA_LR} × √({PAPER_SEARCH_STEPS:,} / {plan.search_steps:,}) — "
         f"the paper's search has ≈{PAPER_SEARCH_STEPS:,} steps; this scaling keeps α's random-walk travel η·√S "
         f"at the paper's {PAPER_ALPHA_LR * math.sqrt(PAPER_SEARCH_STEPS):.2f} (below the 0.4–1.1 logit gap "
         f"Eq. 4 needs at ρ = 0.2), while the most a consistent gradient can move α, η·S = "
         f"{plan.alpha_lr * plan.search_steps:.1f}, falls short of the paper's "
         f"{PAPER_ALPHA_LR * PAPER_SEARCH_STEPS:.0f}." if cfg.alpha_lr is None else
         f"α's learning rate {cfg.alpha_lr} was set by hand (η·S = {plan.alpha_lr * plan.search_steps:.1f})."),
        f"Seeds {', '.join(map(str, cfg.seeds))}: a seed sets the data order, augmentation, initialisation, "
        f"the Random draw and the search.",
    ]


def recount_macs(cfg: AblationConfig, runs: List[Dict[str, Any]]) -> None:
    """Each run's MACs, counted again from its architecture with the current counter (a run stores
    what the counter said when it finished; kernels that hide work from it would leave stale numbers).
    The rebuilt network must have the run's parameter count, or the run is left as it is."""
    from metapool_kernels.models import count_macs, count_params, mobilenet_v2

    for r in runs:
        enhancer = _FIXED_ENHANCER.get(r["variant"]) or r.get("genotype")
        if not enhancer:
            continue
        model = mobilenet_v2(enhancer, width_mult=cfg.width, num_classes=10, in_chans=1, small_input=True)
        if count_params(model) == r.get("params"):
            r["macs"] = count_macs(model, (1, 1, 28, 28))


def write_report(cfg: AblationConfig, plan: Plan, log=None) -> Dict[str, Any]:
    runs = finished_runs(cfg)
    recount_macs(cfg, runs)
    summary = report.summarize(runs, cfg.variants)
    labels = {k: v[0] for k, v in VARIANTS.items()}
    total_seconds = sum(r["retrain_seconds"] + ((r.get("search") or {}).get("seconds") or 0.0) for r in runs)
    where = sorted({(f"{r.get('cpu')}, {r.get('threads')} thread(s)" if r.get("device") == "cpu" else
                     str(r.get("device"))) + (f", {r['jobs']} runs at a time" if r.get("jobs", 1) > 1 else "")
                    for r in runs})
    lines = budget_lines(cfg, plan) + [
        f"Compute: {total_seconds / 3600:.2f} h of training and search, summed over the runs so far, on "
        f"{'; '.join(where) or 'nothing yet'} (torch {torch.__version__}).",
        "Nothing was tuned on the test set: every setting above was fixed before the runs.",
    ]
    results = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": cfg.settings(), "seeds": list(cfg.seeds), "variants": list(cfg.variants), "labels": labels,
        "descriptions": {k: v[1] for k, v in VARIANTS.items()},
        "planned_runs": len(cfg.seeds) * len(cfg.variants), "candidates": list(cfg.candidates),
        "budget": {"lines": lines, "retrain_steps": cfg.retrain_epochs * plan.retrain_steps_per_epoch,
                   "search_steps": plan.search_steps, "alpha_lr": plan.alpha_lr,
                   "alpha_lr_rule": "given" if cfg.alpha_lr is not None else "paper lr x sqrt(paper steps / steps)",
                   "seconds": total_seconds},
        "map_sizes": plan.map_sizes, "summary": summary, "comparisons": report.compare(summary),
        "pmpl_layers": report.layer_choices(runs, "pmpl", plan.map_sizes),
        "random_layers": report.layer_choices(runs, "random", plan.map_sizes),
        "runs": runs,
    }
    out = Path(cfg.report_dir or cfg.out_dir)
    report.write_json(results, out / "results.json")
    md = out / "RESULTS.md"
    md.write_text(report.render_markdown(results, report.read_interpretation(md)))
    report.plot_layer_choices(results, out / "layer_choices.png")
    if log is not None:
        log(md.read_text())
    return results


# ---------------------------------------------------------------------------------------------
# Step costs: what the budget will take on this machine.
# ---------------------------------------------------------------------------------------------
def measure_step_seconds(cfg: AblationConfig, steps: int = 4) -> Dict[str, float]:
    """Seconds per training step of every variant (and per bi-level search step), on random batches
    of the configured size, after one warm-up step. PMPL's retraining uses a genotype drawn from all
    candidates as a stand-in for the one the search will find."""
    import random

    from torch import nn

    from metapool_kernels.models import alpha_parameters, meta_layers, mobilenet_v2, weight_parameters
    from metapool_kernels.pmpl.search import bilevel_step

    fmt = torch.channels_last
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 1, 28, 28, generator=gen).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (cfg.batch_size,), generator=gen)
    kw = dict(width_mult=cfg.width, num_classes=10, in_chans=1, small_input=True)
    rng = random.Random(0)
    out: Dict[str, float] = {}
    for variant in cfg.variants:
        if variant == "random":
            model = mobilenet_v2("random", candidates=TABLE3_ENHANCERS, seed=0, **kw)
        elif variant == "pmpl":
            model = mobilenet_v2([rng.choice(cfg.candidates) for _ in range(17)], **kw)
        else:
            model = mobilenet_v2(_FIXED_ENHANCER[variant], **kw)
        model.to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

        def step():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out[variant] = _time(step, steps)
    if "pmpl" in cfg.variants:
        model = mobilenet_v2("meta", candidates=cfg.candidates, **kw).to(memory_format=fmt)
        layers, weights = meta_layers(model), weight_parameters(model)
        w_opt = torch.optim.SGD(weights, lr=cfg.lr, momentum=cfg.momentum)
        a_opt = torch.optim.Adam(alpha_parameters(model), lr=1e-3)
        out["search"] = _time(lambda: bilevel_step(model, model, layers, weights, w_opt, a_opt, (x, y), (x, y),
                                                   lr=cfg.lr), steps)
    return out


def _time(step: Callable[[], None], steps: int) -> float:
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def estimate(cfg: AblationConfig, plan: Plan, step_seconds: Dict[str, float]) -> Dict[str, float]:
    """Projected hours for every run in ``cfg``: as measured, and with the search step at 2 × 1.3
    plain steps (the fused CPU kernels' goal for a supernet pass). ``hours_*`` add every run up;
    ``wall_hours_*`` place the runs on ``cfg.jobs`` workers in the order :func:`run_ablation` starts
    them (with step costs measured with that many runs at once)."""
    eval_share = 0.35 * (cfg.test_subset or 10_000) / cfg.batch_size  # a forward ≈ a third of a step
    retrain_steps = cfg.retrain_epochs * plan.retrain_steps_per_epoch
    search_step = {"measured": step_seconds.get("search", 0.0),
                   "at_goal": 2 * 1.3 * step_seconds["none" if "none" in step_seconds else "pmpl"]}

    def run_seconds(variant: str, search: str) -> float:
        seconds = step_seconds[variant] * (retrain_steps + eval_share)
        return seconds + (search_step[search] * plan.search_steps if variant == "pmpl" else 0.0)

    order = start_order(cfg, [(v, s) for s in cfg.seeds for v in cfg.variants])
    out: Dict[str, float] = {}
    for search in ("measured", "at_goal"):
        runs = [run_seconds(v, search) for v, _ in order]
        out[f"hours_{search}"] = sum(runs) / 3600
        out[f"wall_hours_{search}"] = list_schedule(runs, cfg.jobs) / 3600
    n_seeds = len(cfg.seeds)
    out["retrain_hours"] = sum(step_seconds[v] for v in cfg.variants) * retrain_steps * n_seeds / 3600
    out["search_hours_measured"] = search_step["measured"] * plan.search_steps * n_seeds / 3600 \
        if "pmpl" in cfg.variants else 0.0
    out["search_hours_at_goal"] = search_step["at_goal"] * plan.search_steps * n_seeds / 3600 \
        if "pmpl" in cfg.variants else 0.0
    return out


def list_schedule(durations: List[float], workers: int) -> float:
    """When the last of ``durations`` ends if each starts, in order, on the first free worker."""
    free = [0.0] * max(1, workers)
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


def print_estimate(cfg: AblationConfig, log=print) -> Dict[str, Any]:
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        plan = make_plan(cfg)
        if cfg.jobs == 1:
            steps = measure_step_seconds(cfg)
        else:
            # As the runs will be: cfg.jobs processes at once, sharing the cores and memory bandwidth.
            with _job_pool(cfg, cfg.jobs) as pool:
                each = list(pool.map(measure_step_seconds, [cfg] * cfg.jobs))
            steps = {k: sum(m[k] for m in each) / len(each) for k in each[0]}
        est = estimate(cfg, plan, steps)
        log(f"step cost on this machine ({cfg.jobs} run(s) at a time x {job_threads(cfg)} thread(s), batch "
            f"{cfg.batch_size}, width {cfg.width}): " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in steps.items()))
        log(f"plan: {len(cfg.seeds)} seed(s) x {len(cfg.variants)} variant(s); retrain {cfg.retrain_epochs} x "
            f"{plan.retrain_steps_per_epoch} steps, search {plan.search_steps} steps (α lr {plan.alpha_lr:.3g})")
        log(f"projected: {est['wall_hours_measured']:.2f} h with the search step as measured; "
            f"{est['wall_hours_at_goal']:.2f} h with it at 2 x 1.3 plain steps "
            f"(compute {est['hours_measured']:.2f} h, retraining {est['retrain_hours']:.2f} h of it)")
        return {"plan": dataclasses.asdict(plan), "step_seconds": steps, **est}
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Command line: python -m experiments.ablation (make ablation).
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from metapool_kernels.pmpl.cli import Parser

    d = AblationConfig()
    p = Parser(
        prog="python -m experiments.ablation",
        description="Retrain MobileNetV2 with No / Local (avg3) / Global (strip) / Random / PMPL-derived enhancers "
                    "on Fashion-MNIST with one budget and several seeds; writes results.json, RESULTS.md "
                    "(mean ± std, Welch tests, the budget) and layer_choices.png. Resumable: run the same "
                    "command again to continue.",
        epilog="examples:\n"
               "  python -m experiments.ablation --estimate          # step costs and projected hours\n"
               "  python -m experiments.ablation --jobs 2 --report bench/results/ablation   # the full table\n"
               "  python -m experiments.ablation --budget smoke --out runs/ablation-smoke\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=tuple(BUDGETS), default="full",
                   help="preset: full (the defaults below) or smoke (1,024 images, 1 epoch each, 2 seeds)")
    p.add_argument("--variants", type=lambda s: tuple(v.strip() for v in s.split(",") if v.strip()), default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default all)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="(default 0 1 2)")
    p.add_argument("--width", type=float, default=None, help=f"MobileNetV2 width (default {d.width})")
    p.add_argument("--batch-size", type=int, default=None, help=f"(default {d.batch_size})")
    p.add_argument("--retrain-epochs", type=int, default=None, help=f"(default {d.retrain_epochs})")
    p.add_argument("--search-epochs", type=int, default=None, help=f"(default {d.search_epochs})")
    p.add_argument("--alpha-lr", type=float, default=None,
                   help="α's Adam lr (default: 3e-4 x sqrt(150,120 / search steps), see RESULTS.md)")
    p.add_argument("--rho", type=float, default=None, help=f"(default {d.rho})")
    p.add_argument("--subset", type=int, default=None, help="training images (default all 60,000)")
    p.add_argument("--test-subset", type=int, default=None, help="test images (default all 10,000)")
    p.add_argument("--out", dest="out_dir", default=None, help=f"runs and checkpoints (default {d.out_dir})")
    p.add_argument("--report", dest="report_dir", default=None,
                   help="where results.json, RESULTS.md and layer_choices.png go (default: --out)")
    p.add_argument("--device", default=None, help=f"(default {d.device})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per run (default: torch's, divided among the jobs)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, each in its own process (default 1; on 2 cores 2 jobs of 1 thread "
                        "finish the table ≈1.3x sooner than 1 job of 2 threads)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--estimate", action="store_true", help="measure step costs, print the projected time, run nothing")
    return p


def config_from_args(args: argparse.Namespace) -> AblationConfig:
    values: Dict[str, Any] = dict(BUDGETS[args.budget])
    fields = AblationConfig.__dataclass_fields__
    values.update({k: v for k, v in vars(args).items() if k in fields and v is not None and k != "progress"})
    return AblationConfig(progress=args.progress, **values)


def main(argv: Optional[List[str]] = None) -> int:
    from metapool_kernels.pmpl.runs import one_line

    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.estimate:
            print_estimate(cfg)
        else:
            run_ablation(cfg)
    except (OSError, ValueError, FloatingPointError) as e:
        print(f"error: {one_line(e, limit=2000)}", file=sys.stderr)
        return 2
    return 0
