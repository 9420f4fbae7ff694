"""The Table 3 ablation runner: real (tiny) runs on Fashion-MNIST, resume after an interruption,
results and table computed from those runs; the statistics behind its reading; progress output."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import sys

import pytest

from metapool_kernels.pmpl.progress import progress

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # experiments/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from experiments.ablation import report  # noqa: E402
from experiments.ablation import run as ablation  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t, df", [(12.7062, 1), (4.302653, 2), (2.776445, 4), (2.228139, 10), (1.959964, 1e7)])
def test_t_test_p_is_005_at_the_tabulated_critical_values(t, df):
    assert report.t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-6)
    assert report.t_two_sided_p(-t, df) == pytest.approx(0.05, abs=2e-6)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 3.0, 40.0])
def test_t_test_p_matches_the_cauchy_closed_form(t):
    # One degree of freedom: P(|T| >= t) = 1 - 2 atan(t) / pi.
    assert report.t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-9, abs=1e-12)


def test_welch_by_hand():
    w = report.welch([1.0, 2.0, 3.0], [4.0, 5.0, 7.0])
    va, vb = 1.0 / 3, statistics.variance([4.0, 5.0, 7.0]) / 3
    assert w["delta"] == pytest.approx(-10 / 3)
    assert w["se"] == pytest.approx(math.sqrt(va + vb))
    assert w["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2))
    assert w["p"] == pytest.approx(report.t_two_sided_p(w["t"], w["df"]))
    with pytest.raises(ValueError, match="two values a side"):
        report.welch([1.0], [2.0, 3.0])


def _run(variant, seed, top1, genotype=None):
    return {"variant": variant, "seed": seed, "top1": top1, "top5": 99.0, "params": 1000, "macs": 10,
            "retrain_seconds": 1.0, "genotype": genotype}


def test_reading_separates_only_differences_beyond_the_seed_spread():
    runs = ([_run("pmpl", s, v) for s, v in enumerate([90.0, 90.1, 89.9])]
            + [_run("none", s, v) for s, v in enumerate([85.0, 85.2, 84.9])]
            + [_run("random", s, v) for s, v in enumerate([89.9, 90.3, 89.7])])
    summary = report.summarize(runs, ["none", "random", "pmpl"])
    assert summary["pmpl"]["top1_mean"] == pytest.approx(90.0)
    assert summary["none"]["top1_std"] == pytest.approx(statistics.stdev([85.0, 85.2, 84.9]))
    comparisons = {(c["a"], c["b"]): c for c in report.compare(summary)}
    assert comparisons[("pmpl", "none")]["exceeds_spread"]
    assert not comparisons[("pmpl", "random")]["exceeds_spread"]
    text = "\n".join(report.reading(summary, list(comparisons.values()), None, None,
                                    {k: v[0] for k, v in ablation.VARIANTS.items()}))
    assert "PMPL beats No by 4.97 points, more than the seed spread (p < 0.001)" in text
    assert "PMPL and Random are within the seed spread" in text


def test_layer_choices_counts_agreement_and_deep_strip():
    sizes = [28] * 3 + [14] * 3 + [7] * 7 + [4] * 4
    g0 = ["skip"] * 6 + ["strip"] * 11
    g1 = ["avg3"] * 6 + ["strip"] * 10 + ["max5"]
    info = report.layer_choices([_run("pmpl", 0, 1.0, g0), _run("pmpl", 1, 1.0, g1)], "pmpl", sizes)
    assert info["agree_layers"] == list(range(6, 16))
    assert info["deep_layers"] == list(range(6, 17))
    assert info["strip_deep"] == (21, 22) and info["strip_shallow"] == (0, 12)
    assert info["wide_deep"] == (1, 22)


def test_scaled_alpha_lr_keeps_the_papers_random_walk():
    assert ablation.scaled_alpha_lr(ablation.PAPER_SEARCH_STEPS) == pytest.approx(ablation.PAPER_ALPHA_LR)
    steps = 1404
    lr = ablation.scaled_alpha_lr(steps)
    assert lr * math.sqrt(steps) == pytest.approx(ablation.PAPER_ALPHA_LR * math.sqrt(ablation.PAPER_SEARCH_STEPS))
    with pytest.raises(ValueError):
        ablation.scaled_alpha_lr(0)


# ---------------------------------------------------------------------------------------------
# The runner, end to end on a slice of Fashion-MNIST.
# ---------------------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def tiny(tmp_path, **kw) -> ablation.AblationConfig:
    base = dict(subset=96, test_subset=48, batch_size=32, retrain_epochs=2, search_epochs=1, seeds=(0, 1),
                variants=("none", "random", "pmpl"), out_dir=str(tmp_path / "abl"), progress=False, threads=1)
    base.update(kw)
    return ablation.AblationConfig(**base)


def test_ablation_resumes_and_reports_what_its_runs_measured(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    real_train, real_search = ablation.run_train, ablation.run_search
    calls = []

    def interrupted_train(tcfg, **kw):
        # "Random seed 1" stops after its first epoch, as a killed process would.
        calls.append((kw["name"], tcfg.resume))
        if kw["name"] == "Random seed 1" and tcfg.resume is None:
            real_train(tcfg, stop_after_epochs=1, **kw)
            raise Interrupted
        return real_train(tcfg, **kw)

    monkeypatch.setattr(ablation, "run_train", interrupted_train)
    with pytest.raises(Interrupted):
        ablation.run_ablation(cfg, log=lambda *a: None)
    assert [c[0] for c in calls] == ["No seed 0", "Random seed 0", "PMPL seed 0", "No seed 1", "Random seed 1"]
    interrupted = Path(cfg.out_dir) / "runs" / "random-seed1"
    assert not (interrupted / "result.json").exists() and (interrupted / "retrain" / "checkpoint.pt").is_file()
    first_epoch = [json.loads(l) for l in (interrupted / "retrain" / "log.jsonl").read_text().splitlines()
                   if json.loads(l)["event"] == "epoch"]
    assert len(first_epoch) == 1

    # Second invocation: finished runs are skipped, the interrupted one resumes from its checkpoint.
    calls.clear()
    results = ablation.run_ablation(cfg, log=lambda *a: None)
    assert calls == [("Random seed 1", str(interrupted / "retrain" / "checkpoint.pt")), ("PMPL seed 1", None)]
    epochs = [json.loads(l) for l in (interrupted / "retrain" / "log.jsonl").read_text().splitlines()
              if json.loads(l)["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[0] == first_epoch[0]

    # Every number in results.json comes from the runs' own logs and files.
    runs = {(r["variant"], r["seed"]): r for r in results["runs"]}
    assert len(runs) == 6
    for (variant, seed), r in runs.items():
        folder = Path(cfg.out_dir) / "runs" / f"{variant}-seed{seed}"
        log = [json.loads(l) for l in (folder / "retrain" / "log.jsonl").read_text().splitlines()]
        last = [e for e in log if e["event"] == "epoch"][-1]
        assert last["epoch"] == 2 and r["top1"] == pytest.approx(last["test"]["top1"])
        assert last["test"]["samples"] == 48
        if variant == "pmpl":
            searched = json.loads((folder / "search" / "genotype.json").read_text())
            assert r["genotype"] == searched["genotype"] and r["search"]["steps"] == searched["steps"] > 0
        if variant == "random":
            assert set(r["genotype"]) <= set(ablation.TABLE3_ENHANCERS)
    assert runs[("random", 0)]["genotype"] != runs[("random", 1)]["genotype"]  # a new draw per seed
    for variant in cfg.variants:
        top1 = [runs[(variant, s)]["top1"] for s in cfg.seeds]
        s = results["summary"][variant]
        assert s["top1"] == top1
        assert s["top1_mean"] == pytest.approx(statistics.fmean(top1))
        assert s["top1_std"] == pytest.approx(statistics.stdev(top1))
    assert json.loads((Path(cfg.out_dir) / "results.json").read_text())["summary"] == results["summary"]
    assert {(c["a"], c["b"]) for c in results["comparisons"]} == {("pmpl", "random"), ("pmpl", "none"),
                                                                  ("random", "none")}

    md_path = Path(cfg.out_dir) / "RESULTS.md"
    md = md_path.read_text()
    for variant in cfg.variants:
        s = results["summary"][variant]
        assert f"{s['top1_mean']:.2f} ± {s['top1_std']:.2f}" in md
    assert "2 epoch(s) × 3 steps" in md and "6 finished run(s) of 6 planned" in md
    assert (Path(cfg.out_dir) / "layer_choices.png").stat().st_size > 10_000

    # The demo quotes these results when they are present.
    from metapool_kernels.demo import what_this_shows

    quoted = "\n".join(what_this_shows(1, 80, report_dir=Path(cfg.out_dir)))
    for variant in cfg.variants:
        s = results["summary"][variant]
        assert f"{ablation.VARIANTS[variant][0]:<7} top-1 {s['top1_mean']:.2f} ± {s['top1_std']:.2f} %" in quoted
    assert "no results found in" in "\n".join(what_this_shows(1, 80, report_dir=tmp_path / "none"))

    # A third invocation runs nothing and keeps the hand-written interpretation.
    md_path.write_text(md.split(report.INTERPRETATION_HEADING)[0] + report.INTERPRETATION_HEADING
                       + "\n\nWritten by hand.\n")

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation, "run_train", no_training)
    monkeypatch.setattr(ablation, "run_search", no_training)
    ablation.run_ablation(cfg, log=lambda *a: None)
    assert md_path.read_text().rstrip().endswith("Written by hand.")

    # Other settings in the same folder are refused, naming what differs.
    with pytest.raises(ValueError, match="retrain_epochs: 2 there, 3 now"):
        ablation.run_ablation(tiny(tmp_path, retrain_epochs=3), log=lambda *a: None)
    monkeypatch.setattr(ablation, "run_search", real_search)


def test_jobs_run_in_processes_with_the_results_of_one_job(tmp_path):
    # Two runs at a time (worker processes) give the same numbers as one after the other, each run's
    # output lands in its own console.log, and the report holds every run.
    kw = dict(variants=("none", "pmpl"), seeds=(0, 1), retrain_epochs=1)
    serial = ablation.run_ablation(tiny(tmp_path / "one", **kw), log=lambda *a: None)
    lines = []
    cfg = tiny(tmp_path / "two", jobs=2, **kw)
    parallel = ablation.run_ablation(cfg, log=lines.append)
    key = lambda r: (r["variant"], r["seed"])  # noqa: E731
    one, two = sorted(serial["runs"], key=key), sorted(parallel["runs"], key=key)
    assert [key(r) for r in two] == [("none", 0), ("none", 1), ("pmpl", 0), ("pmpl", 1)]
    for a, b in zip(one, two):
        assert (a["top1"], a["loss"], a["genotype"]) == (b["top1"], b["loss"], b["genotype"])
        assert (a["jobs"], b["jobs"], b["threads"]) == (1, 2, 1)
    for variant, seed in map(key, two):
        console = (Path(cfg.out_dir) / "runs" / f"{variant}-seed{seed}" / "console.log").read_text()
        assert "epoch 1/1: loss" in console, console[-500:]
    assert "2 runs at a time" in (Path(cfg.out_dir) / "RESULTS.md").read_text()
    assert any("4 run(s) to go, 2 at a time x 1 thread(s)" in line for line in lines)

    # The report counts each run's MACs again from its architecture, whatever the run stored.
    from metapool_kernels.models import count_macs, mobilenet_v2

    path = Path(cfg.out_dir) / "runs" / "pmpl-seed0" / "result.json"
    stale = json.loads(path.read_text())
    path.write_text(json.dumps({**stale, "macs": 1}))
    again = {key(r): r for r in ablation.write_report(cfg, ablation.make_plan(cfg))["runs"]}
    model = mobilenet_v2(stale["genotype"], width_mult=cfg.width, num_classes=10, in_chans=1, small_input=True)
    assert again[("pmpl", 0)]["macs"] == count_macs(model, (1, 1, 28, 28)) > 1


def test_a_failed_job_is_named_and_the_finished_runs_are_kept(tmp_path):
    cfg = tiny(tmp_path, variants=("none", "pmpl"), seeds=(0,), retrain_epochs=1, jobs=2)
    # A search folder with files but no checkpoint: the run refuses to start over it.
    leftover = Path(cfg.out_dir) / "runs" / "pmpl-seed0" / "search"
    leftover.mkdir(parents=True)
    (leftover / "genotype.json.tmp").write_text("{}")
    with pytest.raises(RuntimeError, match=r"pmpl seed 0 failed: .*no checkpoint.pt to resume from"):
        ablation.run_ablation(cfg, log=lambda *a: None)
    assert (Path(cfg.out_dir) / "runs" / "none-seed0" / "result.json").is_file()
    assert not (Path(cfg.out_dir) / "runs" / "pmpl-seed0" / "result.json").exists()


def test_list_schedule_and_the_order_the_jobs_start_runs(tmp_path):
    assert ablation.list_schedule([5, 1, 1, 1, 1], 2) == 5
    assert ablation.list_schedule([1, 1, 1, 1, 5], 2) == 7
    assert ablation.list_schedule([3, 2, 2], 1) == 7
    runs = [(v, s) for s in (0, 1) for v in ("none", "pmpl", "local")]
    assert ablation.start_order(tiny(tmp_path), runs) == runs
    assert ablation.start_order(tiny(tmp_path, jobs=2), runs) == [
        ("pmpl", 0), ("pmpl", 1), ("none", 0), ("local", 0), ("none", 1), ("local", 1)]
    cfg = tiny(tmp_path, variants=("none", "pmpl"), batch_size=4, seeds=(0, 1), retrain_epochs=1, test_subset=4,
               jobs=2)
    plan = ablation.Plan(retrain_steps_per_epoch=10, search_steps_per_epoch=10, search_epochs=1, alpha_lr=0.01,
                         map_sizes=[])
    est = ablation.estimate(cfg, plan, {"none": 1.0, "pmpl": 1.0, "search": 4.0})
    # runs: pmpl 0, pmpl 1 (10.35 + 40 s each) on both workers, then none 0 and none 1 (10.35 s each)
    assert est["wall_hours_measured"] * 3600 == pytest.approx(50.35 + 10.35)
    assert est["hours_measured"] * 3600 == pytest.approx(2 * 50.35 + 2 * 10.35)
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        tiny(tmp_path, jobs=0)


def test_cli_rejects_an_unknown_variant(capsys):
    from experiments.ablation.run import main

    assert main(["--variants", "none,bogus", "--estimate"]) == 2
    assert "unknown variant(s) ['bogus']" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Progress output in a log.
# ---------------------------------------------------------------------------------------------
def test_progress_prints_lines_not_frames_when_not_a_terminal(capsys):
    bar = progress(range(250), "train 1/3", every=100)
    bar.set_postfix_str("loss 0.5")
    assert list(bar) == list(range(250))
    out = capsys.readouterr()
    assert out.out.splitlines() == ["  train 1/3: step 100/250 loss 0.5 (0 s)",
                                    "  train 1/3: step 200/250 loss 0.5 (0 s)"]
    assert "\r" not in out.err + out.out
    assert list(progress(range(5), "eval", every=None)) == list(range(5))
    assert list(progress(range(500), "off", enabled=False)) == list(range(500))
    assert capsys.readouterr().out == ""


def test_estimate_adds_up_every_run(tmp_path):
    cfg = tiny(tmp_path, variants=("none", "pmpl"), batch_size=4, seeds=(0, 1, 2), retrain_epochs=2, test_subset=40)
    plan = ablation.Plan(retrain_steps_per_epoch=10, search_steps_per_epoch=5, search_epochs=3, alpha_lr=0.01,
                         map_sizes=[])
    steps = ablation.measure_step_seconds(cfg, steps=1)
    assert set(steps) == {"none", "pmpl", "search"} and all(v > 0 for v in steps.values())
    fake = {"none": 1.0, "pmpl": 2.0, "search": 5.0}
    est = ablation.estimate(cfg, plan, fake)
    retrain = (1.0 + 2.0) * 2 * 10 * 3
    evals = (1.0 + 2.0) * 0.35 * 40 / 4 * 3
    assert est["hours_measured"] * 3600 == pytest.approx(retrain + evals + 5.0 * 15 * 3)
    assert est["hours_at_goal"] * 3600 == pytest.approx(retrain + evals + 2 * 1.3 * 1.0 * 15 * 3)
    assert est["wall_hours_measured"] == pytest.approx(est["hours_measured"])  # one job: the sum


def test_cli_help_lists_the_budget_knobs(capsys):
    from experiments.ablation.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--budget", "--estimate", "--retrain-epochs", "--search-epochs", "--seeds", "--report", "--out"):
        assert flag in out
