"""`make demo`: Progressive Meta-Pooling Learning end to end on real Fashion-MNIST images.

1. PMPL search (paper Algorithm 1) of a narrow MobileNetV2 with a Meta-Pooling layer after each of
   its 17 blocks, on a subset of Fashion-MNIST split into D_tr and D_mt;
2. derive the genotype (layers fixed by Eq. 4, argmax for the rest);
3. retrain the derived network from scratch, and the plain MobileNetV2 with the same budget;
4. print the genotype, the accuracy table and where the π-history plot is.

On a CPU the whole run takes a few minutes; with CUDA it uses more data and epochs. The search
budget is tiny next to the paper's (30 epochs of ImageNet), so the demo raises α's learning rate and
lowers ρ to let Eq. 4 fix layers within it; the CLI keeps the paper's values. A genotype decided
that early is noise, and one seed of a short retraining cannot rank enhancers, so the demo retrains
a Random genotype beside the PMPL one and the plain network, says what the table can and cannot
show, and points to the ablation (``make ablation`` in the repository, experiments/ablation: every
variant of the paper's Table 3, three seeds, mean ± std), whose committed results it prints when run
from the repository's root.
Each demo writes into a fresh folder, METAPOOL_DEMO_OUT/<date-time> (default runs/demo/<date-time>),
so it never writes over an earlier demo's results.
Environment: METAPOOL_DEMO_PROFILE (cpu, gpu, tiny) and METAPOOL_DEMO_OUT (default runs/demo).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .pmpl.search import SearchConfig, run_search
from .pmpl.train import TrainConfig, accuracy_table, result_row, run_train

# The ablation's committed results, where `make demo` runs (the repository's root); an installed
# package without the repository around it just points to the experiment.
ABLATION_REPORT = Path("bench") / "results" / "ablation"

PROFILES: Dict[str, Dict[str, Any]] = {
    # 2 idle CPU cores: about 5 minutes (8 on one core; much longer when other jobs share the cores).
    "cpu": dict(subset=10240, test_subset=5000, width=0.35, batch_size=64, search_epochs=1, retrain_epochs=1,
                retrain_subset=19200, alpha_lr=0.08, rho=0.1),
    # One GPU: the whole training set, more epochs, still minutes.
    "gpu": dict(subset=None, test_subset=None, width=0.5, batch_size=128, search_epochs=4, retrain_epochs=10,
                retrain_subset=None, alpha_lr=3e-3, rho=0.15),
    # The test suite's end-to-end check: a few steps of everything.
    "tiny": dict(subset=128, test_subset=64, width=0.35, batch_size=32, search_epochs=1, retrain_epochs=1,
                 retrain_subset=96, alpha_lr=0.05, rho=0.1),
}


def busy_cores(interval: float = 1.0) -> float:
    """Cores other processes keep busy right now (from /proc/stat while this one sleeps); the load
    average instead, where /proc/stat is missing."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (1.0 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def cpu_threads() -> int:
    """Threads for the CPU run: the cores other processes leave free (at least one).

    Each PyTorch CPU op is an OpenMP parallel region that waits for all its threads; on a 2-core
    machine where another process holds a core, two threads make every step many times slower than
    one. OMP_NUM_THREADS, when set, is obeyed as is.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    free = (os.cpu_count() or 1) - busy_cores()
    return max(1, min(torch.get_num_threads(), int(free + 0.5)))


def fresh_folder(root: Path) -> Path:
    """A new folder under ``root`` named after the current date and time."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free folder name for {stamp} under {root}")


def main(profile: Optional[str] = None, out_dir: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """Run the demo; ``out_dir`` (empty or new) holds its runs, else a fresh folder under
    METAPOOL_DEMO_OUT."""
    profile = profile or os.environ.get("METAPOOL_DEMO_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    if profile not in PROFILES:
        raise ValueError(f"unknown demo profile {profile!r}; choose from {list(PROFILES)}")
    p = PROFILES[profile]
    out = Path(out_dir) if out_dir is not None else fresh_folder(Path(os.environ.get("METAPOOL_DEMO_OUT", "runs/demo")))
    device = "cuda" if profile == "gpu" else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(cpu_threads())
    try:
        return _run(profile, p, out, device)
    finally:
        torch.set_num_threads(threads)


def _run(profile: str, p: Dict[str, Any], out: Path, device: str) -> Dict[str, Any]:
    progress = profile != "tiny"
    t0 = time.perf_counter()
    search_defaults = SearchConfig()
    print(f"Meta-Pooling demo ({profile} profile, {device}, {torch.get_num_threads()} threads): Fashion-MNIST, "
          f"MobileNetV2 x{p['width']} (small input, 1 channel), outputs in {out}/")
    print(f"  search: {p['subset'] or 'all 60000'} training images split 50/50 into D_tr / D_mt, "
          f"{p['search_epochs']} epoch(s), batch {p['batch_size']}")
    print(f"  demo-only settings: α lr {p['alpha_lr']} and ρ = {p['rho']} so that Eq. 4 fixes layers within this "
          f"short search and the plot shows the mechanism (paper and CLI defaults: α lr {search_defaults.alpha_lr}, "
          f"ρ = {search_defaults.rho}); a genotype decided this early is noise, not a search result")

    common = dict(test_subset=p["test_subset"], batch_size=p["batch_size"], width=p["width"], small_input=True,
                  device=device, seed=0, progress=progress)
    search = run_search(SearchConfig(subset=p["subset"], epochs=p["search_epochs"], alpha_lr=p["alpha_lr"],
                                     rho=p["rho"], out_dir=str(out / "search"), **common))
    t_search = time.perf_counter() - t0
    n_fixed = len(search.events)
    print(f"search: {search.steps} steps in {t_search:.0f} s; {n_fixed} of {len(search.genotype)} layers fixed by "
          f"Eq. 4 (ρ = {p['rho']}), the rest by argmax")
    print("genotype:", " ".join(search.genotype))

    results = []
    # Random draws one of the paper's three enhancers per block (its Table 3 "Random"): what a
    # genotype chosen without any search gets from the same retraining.
    variants = (("MobileNetV2 + PMPL genotype", "retrain_derived", dict(genotype=str(search.genotype_path))),
                ("MobileNetV2 + Random genotype", "retrain_random",
                 dict(enhancer="random", candidates=("skip", "avg3", "strip"))),
                ("MobileNetV2 (no enhancer)", "retrain_none", dict(enhancer="none")))
    for name, folder, kw in variants:
        cfg = TrainConfig(subset=p["retrain_subset"], epochs=p["retrain_epochs"], eval_every=0,
                          out_dir=str(out / folder), **{**common, **kw})
        res = run_train(cfg, name=name)
        results.append({**result_row(res), "checkpoint": res.checkpoint_path, "seconds": res.seconds})

    total = time.perf_counter() - t0
    print()
    print(search.table)
    print()
    budget = (f"{p['retrain_epochs']} epoch(s) on {p['retrain_subset'] or 60000} images, "
              f"{p['test_subset'] or 10000} test images")
    print(accuracy_table(results, title=f"Accuracy after retraining from scratch ({budget}, one seed each)"))
    print()
    for line in what_this_shows(p["retrain_epochs"], search.steps):
        print(line)
    print()
    print(f"π history plot: {search.plot_path}")
    print(f"genotype file:  {search.genotype_path}")
    print(f"logs:           {out}/*/log.jsonl")
    retrain = " + ".join(f"{r['seconds']:.0f}" for r in results)
    print(f"total wall time {total:.0f} s (search {t_search:.0f} s, retraining {retrain} s)")
    onnx_path = _export_derived(results[0]["checkpoint"], out, p["test_subset"])
    return {"genotype_ops": search.genotype, "genotype": search.genotype_path, "plot": search.plot_path,
            "events": search.events, "results": results, "seconds": total, "test_subset": p["test_subset"],
            "profile": profile, "onnx": onnx_path}


def _export_derived(checkpoint: Path, out: Path, test_subset: Optional[int]) -> Path:
    """The deployment step after retraining: the derived network as ONNX, verified with ONNX Runtime."""
    from .pmpl.export import export_checkpoint

    path = out / "derived.onnx"
    print()
    print(f"export: python -m metapool_kernels.pmpl export --checkpoint {checkpoint} --out {path}")
    return export_checkpoint(str(checkpoint), str(path), images=min(test_subset or 10000, 1000)).path


def what_this_shows(retrain_epochs: int, search_steps: int, report_dir: Path = ABLATION_REPORT) -> List[str]:
    """What the demo's accuracy table can and cannot say, and where the real comparison is."""
    lines = [
        "What this table shows: the pipeline runs end to end (search, derive, retrain, evaluate).",
        f"What it cannot show: which enhancer is better. With one seed and {retrain_epochs} epoch(s) of training,",
        "gaps of a few points are within what another seed would change; and the PMPL genotype was decided",
        f"within {search_steps} search steps, on noise (another seed gives another genotype).",
    ]
    summary = _ablation_summary(report_dir)
    if summary:
        lines += [f"The comparison with seeds (Table 3 on Fashion-MNIST, {summary['what']}):", *summary["rows"],
                  f"  details, budget and reading: {report_dir / 'RESULTS.md'}"]
    else:
        lines += ["The comparison with seeds (the paper's Table 3 on Fashion-MNIST, three seeds, mean ± std):",
                  "  make ablation   (experiments/ablation in the repository; ≈2.5 h on 2 cores;",
                  f"  no results found in {report_dir})"]
    return lines


def _ablation_summary(report_dir: Path) -> Optional[Dict[str, Any]]:
    path = report_dir / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    summary, labels = results.get("summary") or {}, results.get("labels") or {}
    if not summary:
        return None
    rows = [f"  {labels.get(v, v):<7} top-1 {s['top1_mean']:.2f} ± {s['top1_std']:.2f} % over {len(s['top1'])} seed(s)"
            for v, s in summary.items()]
    what = (f"{len(results.get('runs', []))} of {results.get('planned_runs')} runs, "
            f"{results['budget']['retrain_steps']} retraining steps each")
    return {"rows": rows, "what": what}


if __name__ == "__main__":
    main()
