"""The ablation's results: mean ± standard deviation per variant, Welch's t-test between variants,
which op each layer chose across the PMPL seeds, ``results.json``, ``RESULTS.md`` and
``layer_choices.png``. Every sentence in the Markdown "Reading" is computed from the runs; the
"Interpretation" section below it is written by hand and kept when the file is regenerated."""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Two variants differ "by more than the seed spread" when Welch's two-sided t-test over their seeds
# gives p below this; with 3 seeds a side that needs |Δ| of about 3-4 standard errors.
SIGNIFICANCE = 0.05

# (a, b) pairs the Reading compares: the paper's claims (Global and Local beat No; PMPL beats
# Random, and everything else) and Random against No.
COMPARISONS: Tuple[Tuple[str, str], ...] = (
    ("pmpl", "random"), ("pmpl", "none"), ("pmpl", "global"), ("pmpl", "local"),
    ("global", "none"), ("local", "none"), ("random", "none"),
)

INTERPRETATION_HEADING = "## Interpretation"
INTERPRETATION_PENDING = ("_Not written yet: read the numbers above once every run has finished, and write here "
                          "what they say (this section is kept when the runner regenerates the file)._")


# ---------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def welch(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Difference of means and Welch's two-sided t-test; needs at least two values on each side."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs two values a side, got {len(a)} and {len(b)}")
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    delta, se = ma - mb, math.sqrt(va + vb)
    if se == 0.0:
        return {"delta": delta, "se": 0.0, "t": math.inf if delta else 0.0, "df": float("nan"),
                "p": 0.0 if delta else 1.0}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = delta / se
    return {"delta": delta, "se": se, "t": t, "df": df, "p": t_two_sided_p(t, df)}


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Summaries.
# ---------------------------------------------------------------------------------------------
def summarize(runs: Sequence[Dict[str, Any]], variants: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Per variant: seeds, per-seed and mean ± std of top-1 / top-5, parameters, MACs, seconds."""
    out = {}
    for v in variants:
        mine = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
        if not mine:
            continue
        t1, t5 = [r["top1"] for r in mine], [r["top5"] for r in mine]
        out[v] = {"seeds": [r["seed"] for r in mine], "top1": t1, "top5": t5,
                  "top1_mean": mean_std(t1)[0], "top1_std": mean_std(t1)[1],
                  "top5_mean": mean_std(t5)[0], "top5_std": mean_std(t5)[1],
                  "params": statistics.fmean(r["params"] for r in mine),
                  "macs": statistics.fmean(r["macs"] for r in mine) if all(r["macs"] for r in mine) else None,
                  "retrain_seconds": statistics.fmean(r["retrain_seconds"] for r in mine)}
    return out


def compare(summary: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for a, b in COMPARISONS:
        if a in summary and b in summary and len(summary[a]["top1"]) > 1 and len(summary[b]["top1"]) > 1:
            w = welch(summary[a]["top1"], summary[b]["top1"])
            rows.append({"a": a, "b": b, **w, "exceeds_spread": w["p"] < SIGNIFICANCE})
    return rows


def layer_choices(runs: Sequence[Dict[str, Any]], variant: str, map_sizes: Sequence[int]) -> Optional[Dict[str, Any]]:
    """Which op each layer chose across the seeds of ``variant``, and how the choices spread."""
    mine = sorted((r for r in runs if r["variant"] == variant and r.get("genotype")), key=lambda r: r["seed"])
    if not mine:
        return None
    genotypes = [r["genotype"] for r in mine]
    n_layers = len(genotypes[0])
    agree = [i for i in range(n_layers) if len({g[i] for g in genotypes}) == 1]
    # "Deep": the layers on the two smallest feature maps (7x7 and 4x4 for 28x28 input at stride 8).
    small = sorted(set(map_sizes))[:2]
    deep = [i for i in range(n_layers) if map_sizes and map_sizes[i] in small]
    shallow = [i for i in range(n_layers) if i not in deep]

    def share(op: str, layers: Sequence[int]) -> Tuple[int, int]:
        return sum(g[i] == op for g in genotypes for i in layers), len(layers) * len(genotypes)

    info: Dict[str, Any] = {"seeds": [r["seed"] for r in mine], "genotypes": genotypes, "agree_layers": agree,
                            "deep_layers": deep, "shallow_layers": shallow,
                            "strip_deep": share("strip", deep), "strip_shallow": share("strip", shallow)}
    # On the small maps of the deep blocks a 5x5 and a 7x7 window both cover most of the map.
    wide = ("avg5", "avg7", "max5", "max7")
    info["wide_deep"] = (sum(g[i] in wide for g in genotypes for i in deep), len(deep) * len(genotypes))
    searches = [r.get("search") for r in mine]
    if all(searches):
        info["fixed_by_eq4"] = [len(s["fix_events"]) for s in searches]
        info["fixed_layers"] = [sorted(e["layer"] for e in s["fix_events"]) for s in searches]
        info["chosen_prob"] = [s["probs"] for s in searches]
        info["candidates"] = searches[0]["candidates"]
        argmax_probs = [s["probs"][i] for s in searches for i in s["argmax_layers"]]
        info["argmax_prob_mean"] = statistics.fmean(argmax_probs) if argmax_probs else None
    return info


# ---------------------------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------------------------
# The paper's Table 3 (MobileNetV2 on ImageNet), its single-enhancer rows and its two strategies
# over all three enhancers; it also has a Random draw over No / Global only (73.2).
PAPER_TABLE3 = ("Paper (ImageNet, Table 3): No 72.3 / Local 71.6 / Global 74.3 / Random 73.4 / PMPL 74.6 "
                "(Random and PMPL over No, Local and Global).")


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _verdict(c: Dict[str, Any], labels: Dict[str, str]) -> str:
    a, b = labels[c["a"]], labels[c["b"]]
    if not c["exceeds_spread"]:
        return f"{a} and {b} are within the seed spread (Δ {c['delta']:+.2f} points, {_p(c['p'])})"
    better, worse = (a, b) if c["delta"] > 0 else (b, a)
    return f"{better} beats {worse} by {abs(c['delta']):.2f} points, more than the seed spread ({_p(c['p'])})"


def reading(summary, comparisons, choices, random_choices, labels) -> List[str]:
    """The generated part of the reading: facts computed from the numbers, no interpretation."""
    lines: List[str] = []
    if not summary:
        return ["_No run has finished yet._"]
    stds = [s["top1_std"] for s in summary.values() if len(s["top1"]) > 1]
    if stds:
        lines.append(f"- Seed spread: the standard deviation of top-1 over seeds is {min(stds):.2f}–{max(stds):.2f} "
                     f"points across variants.")
    ranked = sorted(summary, key=lambda v: -summary[v]["top1_mean"])
    lines.append("- Ranking by mean top-1: " + " > ".join(f"{labels[v]} ({summary[v]['top1_mean']:.2f})" for v in ranked)
                 + ". A ranking is only meaningful where the test below separates the variants.")
    if comparisons:
        lines.append(f"- Differences, Welch's two-sided t-test over seeds (\"exceeds the seed spread\" means "
                     f"p < {SIGNIFICANCE}):")
        lines.append("")
        lines += _md_table(("comparison", "Δ top-1 (points)", "t", "p", "exceeds the seed spread"),
                           [(f"{labels[c['a']]} − {labels[c['b']]}", f"{c['delta']:+.2f}", f"{c['t']:.2f}",
                             _p_value(c["p"]), "yes" if c["exceeds_spread"] else "no") for c in comparisons])
        lines.append("")
        by_pair = {(c["a"], c["b"]): c for c in comparisons}
        for pair in (("pmpl", "random"), ("pmpl", "none")):
            if pair in by_pair:
                lines.append(f"- {_verdict(by_pair[pair], labels)}.")
        separated = [c for c in comparisons if c["exceeds_spread"]]
        if not separated:
            lines.append("- No difference between variants exceeds the seed spread at this budget.")
    else:
        lines.append("- Not enough seeds per variant yet to compare variants (two or more needed).")
    if choices:
        n_seeds, n_layers = len(choices["genotypes"]), len(choices["genotypes"][0])
        if "fixed_by_eq4" in choices:
            lines.append(f"- Eq. 4 fixed {', '.join(map(str, choices['fixed_by_eq4']))} of {n_layers} layers in the "
                         f"PMPL searches (seeds {', '.join(map(str, choices['seeds']))}); the others were decided by "
                         f"the argmax of π at the end of the search.")
            if choices.get("argmax_prob_mean") is not None:
                n_ops = len(choices["candidates"])
                lines.append(f"- Where the argmax decided, π of the chosen op averaged {choices['argmax_prob_mean']:.3f} "
                             f"(uniform over {n_ops} ops: {1 / n_ops:.3f}).")
        if n_seeds > 1:
            n_ops = len(choices.get("candidates") or []) or 8
            chance = n_layers / n_ops ** (n_seeds - 1)
            lines.append(f"- All {n_seeds} PMPL seeds chose the same op in {len(choices['agree_layers'])} of {n_layers} "
                         f"layers (layers {choices['agree_layers'] or 'none'}); choices drawn uniformly from "
                         f"{n_ops} ops would agree in {chance:.2f} layers on average.")
        sd, nd = choices["strip_deep"]
        ss, ns = choices["strip_shallow"]
        if nd and ns:
            lines.append(f"- PMPL chose strip in {sd} of {nd} deep-layer slots (the blocks on the two smallest maps: "
                         f"{_span(choices['deep_layers'])}) and in {ss} of {ns} shallow-layer slots "
                         f"({_span(choices['shallow_layers'])}); the paper saw deeper layers prefer strip.")
        wd, nwd = choices["wide_deep"]
        if nwd:
            lines.append(f"- {wd} of {nwd} deep-layer choices are avg5/avg7/max5/max7; on maps of 7×7 and smaller a "
                         f"5×5 and a 7×7 window cover most of the map, so these pairs compute nearly the same thing and "
                         f"Eq. 4's margin between them is small.")
    if random_choices:
        lines.append(f"- The Random draws (from skip / avg3 / strip) put strip in "
                     f"{random_choices['strip_deep'][0]} of {random_choices['strip_deep'][1]} deep-layer slots.")
    return lines


def _span(layers: Sequence[int]) -> str:
    return f"blocks {layers[0]}–{layers[-1]}" if layers else "none"


def render_markdown(results: Dict[str, Any], interpretation: Optional[str] = None) -> str:
    labels = results["labels"]
    summary, budget = results["summary"], results["budget"]
    done, planned = len(results["runs"]), results["planned_runs"]
    lines = ["# Table 3 of the Meta-Pooling paper on Fashion-MNIST: does PMPL help?", "",
             f"Generated by `python -m experiments.ablation` from {done} finished run(s) of {planned} "
             f"planned ({results['generated']}). Every number on this page comes from `results.json` beside it.", ""]
    if done < planned:
        lines += [f"**Incomplete: {planned - done} run(s) still to go; resume with the same command.**", ""]
    lines += ["## Budget", ""] + [f"- {b}" for b in budget["lines"]] + [""]
    lines += ["## Results (test set, 10,000 images unless the budget says otherwise)", ""]
    rows = []
    for v, s in summary.items():
        n = len(s["top1"])
        macs = f"{s['macs'] / 1e6:.2f}M" if s["macs"] else ""
        rows.append((labels[v], results["descriptions"][v], n, _pm(s["top1_mean"], s["top1_std"], n), _pm(s["top5_mean"], s["top5_std"], n),
                     ", ".join(f"{x:.2f}" for x in s["top1"]), f"{s['params']:,.0f}", macs,
                     f"{s['retrain_seconds'] / 60:.1f}"))
    lines += _md_table(("variant", "enhancers", "seeds", "top-1 % (mean ± std)", "top-5 % (mean ± std)", "top-1 per seed",
                        "params", "MACs", "retrain min/seed"), rows)
    lines += ["", PAPER_TABLE3, ""]
    lines += ["## Reading (generated from the numbers)", ""]
    lines += reading(summary, results["comparisons"], results.get("pmpl_layers"), results.get("random_layers"), labels)
    if results.get("pmpl_layers"):
        lines += ["", "Which op each layer chose (PMPL seeds, then the Random draws; ★: fixed by Eq. 4, "
                      "otherwise the argmax at the end of the search):", "",
                  "![layer choices](layer_choices.png)", ""]
        lines += _choice_table(results)
    lines += ["", INTERPRETATION_HEADING, "", (interpretation or INTERPRETATION_PENDING).strip(), ""]
    return "\n".join(lines)


def _choice_table(results: Dict[str, Any]) -> List[str]:
    pm, rnd, sizes = results["pmpl_layers"], results.get("random_layers"), results["map_sizes"]
    rows_src = [(f"PMPL seed {s}", g, set(f)) for s, g, f in
                zip(pm["seeds"], pm["genotypes"], pm.get("fixed_layers", [[]] * len(pm["seeds"])))]
    if rnd:
        rows_src += [(f"Random seed {s}", g, set()) for s, g in zip(rnd["seeds"], rnd["genotypes"])]
    headers = ["layer", "map"] + [r[0] for r in rows_src]
    body = [(i, f"{sizes[i]}×{sizes[i]}" if sizes else "") + tuple(f"{g[i]}{' ★' if i in f else ''}"
                                                                    for _, g, f in rows_src)
            for i in range(len(rows_src[0][1]))]
    return _md_table(headers, body)


def read_interpretation(path: Path) -> Optional[str]:
    """The hand-written interpretation of an existing RESULTS.md (None if absent or still pending)."""
    if not path.is_file():
        return None
    text = path.read_text()
    if INTERPRETATION_HEADING not in text:
        return None
    kept = text.split(INTERPRETATION_HEADING, 1)[1].strip()
    return None if not kept or kept == INTERPRETATION_PENDING else kept


# ---------------------------------------------------------------------------------------------
# The plot.
# ---------------------------------------------------------------------------------------------
def plot_layer_choices(results: Dict[str, Any], path: Path) -> Optional[Path]:
    """One row per PMPL seed (then per Random draw), one column per layer, coloured by op."""
    pm = results.get("pmpl_layers")
    if not pm:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ops = list(results["candidates"])
    rnd = results.get("random_layers")
    rows = [(f"PMPL seed {s}", g, set(f), p) for s, g, f, p in
            zip(pm["seeds"], pm["genotypes"], pm.get("fixed_layers", [[]] * len(pm["seeds"])),
                pm.get("chosen_prob", [None] * len(pm["seeds"])))]
    if rnd:
        rows += [(f"Random seed {s}", g, set(), None) for s, g in zip(rnd["seeds"], rnd["genotypes"])]
    n_layers = len(rows[0][1])
    colours = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * n_layers, 0.9 + 0.55 * len(rows)), layout="constrained")
    for r, (_, genotype, fixed, probs) in enumerate(rows):
        for i, op in enumerate(genotype):
            ax.add_patch(plt.Rectangle((i, r), 1, 1, facecolor=colours[ops.index(op) % 10],
                                       alpha=1.0 if (i in fixed or probs is None) else 0.45, edgecolor="white"))
            text = op + (" ★" if i in fixed else "")
            if probs is not None:
                text += f"\n{probs[i]:.2f}"
            ax.text(i + 0.5, r + 0.5, text, ha="center", va="center", fontsize=6.5)
    sizes = results["map_sizes"]
    ax.set_xlim(0, n_layers)
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([i + 0.5 for i in range(n_layers)],
                  [f"{i}\n{sizes[i]}²" if sizes else str(i) for i in range(n_layers)], fontsize=7)
    ax.set_yticks([r + 0.5 for r in range(len(rows))], [r[0] for r in rows], fontsize=8)
    ax.set_xlabel("layer (block) and its feature map")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    used = [op for op in ops if any(op in g for _, g, _, _ in rows)]
    fig.legend(handles=[Patch(color=colours[ops.index(op) % 10], label=op) for op in used],
               loc="outside lower center", ncol=len(used), frameon=False, fontsize=8)
    ax.set_title("Op chosen per layer. PMPL: ★ fixed by Eq. 4 (solid), otherwise argmax at the end (faded); "
                 "number: π of the op", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(obj: Any, path: Path) -> None:
    """Write atomically (a resumed runner may be interrupted while writing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
