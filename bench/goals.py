"""The goals of every device, checked on the rows of one run (on a CPU: at one thread count).

One mechanism for CPUs and GPUs: the same goals, measured on the same suites' rows, with the
thresholds of the device's kind (``TARGETS``; a goal without a threshold there is not one of that
device's). ``evaluate(rows, kind)`` returns one ``GoalCheck`` per goal: the measured numbers, met /
missed / not measured, and the configuration that decides it (the worst row). The report renders these; the
profile suite (test_profile_bench.py) profiles the deciding configuration of every missed goal, so
the report can say why from this run's own torch.profiler output.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

GOAL_KEYS: Tuple[str, ...] = (
    "search-fwd+bwd-vs-eager", "search-fwd+bwd-vs-compile", "search-fwd-vs-compile",
    "fixed-bandwidth", "fixed-vs-compile", "derived-vs-plain", "supernet-step", "search-step", "gate-weights",
)

# Per device kind, each goal's threshold (× for speed-ups and step ratios, % for bandwidth, overhead
# and spread). The CPU's are set by what its vector kernels reach against ATen's; the GPU's by the
# package's purpose (the paper's eager path more than doubles MobileNetV2's latency there).
TARGETS: Dict[str, Dict[str, Optional[float]]] = {
    "cpu": {"search-fwd+bwd-vs-eager": 20.0, "search-fwd+bwd-vs-compile": 3.0, "search-fwd-vs-compile": 3.0,
            "fixed-bandwidth": 50.0, "fixed-vs-compile": 1.0, "derived-vs-plain": 5.0, "supernet-step": 1.2,
            "search-step": None, "gate-weights": 10.0},
    "cuda": {"search-fwd+bwd-vs-eager": 5.0, "search-fwd+bwd-vs-compile": 2.0, "search-fwd-vs-compile": 2.0,
             "fixed-bandwidth": 70.0, "fixed-vs-compile": 1.0, "derived-vs-plain": 5.0, "supernet-step": None,
             "search-step": 1.5, "gate-weights": 10.0},
}
THREAD_SCALING_X = 1.7  # CPU only: 2 threads against 1 (thread_scaling)


def target(key: str, kind: str = "cpu") -> Optional[float]:
    return TARGETS["cpu" if kind == "cpu" else "cuda"][key]


def goal_keys(kind: str = "cpu") -> Tuple[str, ...]:
    """The goals of a device of ``kind``, in report order."""
    return tuple(k for k in GOAL_KEYS if target(k, kind) is not None)


@dataclass
class GoalCheck:
    key: str
    name: str
    measured: str
    ok: Optional[bool]                 # None: the rows it needs are absent
    shortfall: str = ""                # how far a missed goal is off
    # What decides the goal, for profiling: {"kind": "op", "op", "mode", "dtype", "shape", "memory_format",
    # "providers"}, {"kind": "model", "variants", "memory_format", ...} or {"kind": "train", ...}.
    target: Optional[Dict[str, Any]] = None
    unresolved: List[str] = field(default_factory=list)
    headline: str = ""                 # the deciding number, for the summary table

    def __post_init__(self):
        if not self.headline:
            self.headline = self.measured.split("; ")[0]

    @property
    def status(self) -> str:
        if self.ok is None:
            return "not measured"
        return "**met**" if self.ok else "**missed**" + (f": {self.shortfall}" if self.shortfall else "")


def _times(v: float) -> str:
    return f"{v:.3g}×" if v < 100 else f"{v:,.0f}×"


def _shape(r: Dict[str, Any]) -> str:
    fmt = ", channels_last" if r.get("memory_format") == "channels_last" else ""
    return "×".join(str(s) for s in r["shape"]) + fmt


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def op_groups(rows: Sequence[Dict[str, Any]], op_filter, mode: str) -> Dict[Tuple, Dict[str, Dict[str, Any]]]:
    """(op, dtype, shape, memory format) -> provider -> row (first timing only), for one mode."""
    out: Dict[Tuple, Dict[str, Dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if (r.get("suite") == "ops" and not r.get("error") and r["mode"] == mode and op_filter(r["op"])
                and not r.get("repeat")):
            out[(r["op"], r["dtype"], tuple(r["shape"]), r.get("memory_format", "contiguous"))][r["provider"]] = r
    return out


def _op_target(fused: Dict[str, Any], providers: Sequence[str]) -> Dict[str, Any]:
    return {"kind": "op", "op": fused["op"], "mode": fused["mode"], "dtype": fused["dtype"],
            "shape": list(fused["shape"]), "memory_format": fused.get("memory_format", "contiguous"),
            "providers": list(providers)}


def _speedup_goal(key: str, name: str, rows, op_filter, mode: str, other: str, target: float,
                  strictly_faster: bool = False) -> GoalCheck:
    speed = []
    for g in op_groups(rows, op_filter, mode).values():
        f, o = g.get("fused"), g.get(other)
        if f and o and f["median_ms"] > 0:
            speed.append((o["median_ms"] / f["median_ms"], f))
    if not speed:
        return GoalCheck(key, name, "—", None)
    worst_x, worst = min(speed, key=lambda s: s[0])
    below = [s for s in speed if (s[0] <= target if strictly_faster else s[0] < target)]
    ops = sorted({f["op"] for _, f in speed})
    label = f"{worst['op']} " if len(ops) > 1 else ""
    measured = (f"worst {_times(worst_x)} ({label}{_shape(worst)}: fused {worst['median_ms']:.3g} ms, {other} "
                f"{worst_x * worst['median_ms']:.3g} ms); geomean {_times(_geomean([s[0] for s in speed]))} over "
                f"{len(speed)} rows")
    short = (f"{len(below)} of {len(speed)} rows below; worst is {target / worst_x:.3g}× short" if below else "")
    headline = f"worst {_times(worst_x)} ({label}{_shape(worst)}), geomean {_times(_geomean([s[0] for s in speed]))}"
    return GoalCheck(key, name, measured, not below, short, _op_target(worst, ("fused", other)), headline=headline)


def _bandwidth_goal(rows, goal: float) -> GoalCheck:
    key, name = "fixed-bandwidth", (f"Every fixed op, forward: ≥ {goal:g}% of the run's copy bandwidth "
                                    "at the largest shapes")
    fused = [g["fused"] for g in op_groups(rows, lambda op: op not in ("search", "skip"), "fwd").values()
             if g.get("fused") and g["fused"].get("pct_copy") is not None]
    if not fused:
        return GoalCheck(key, name, "—", None)
    top_batch = max(r["batch"] for r in fused)
    fused = [r for r in fused if r["batch"] == top_batch]
    largest = sorted({r["x_bytes"] for r in fused})[-2:]
    chosen = [r for r in fused if r["x_bytes"] in largest]
    worst = min(chosen, key=lambda r: r["pct_copy"])
    below = [r for r in chosen if r["pct_copy"] < goal]
    shapes = sorted({"×".join(map(str, r["shape"])) for r in chosen})
    measured = (f"worst {worst['pct_copy']:.1f}% ({worst['op']}, {_shape(worst)}, {worst['gbps']:.3g} GB/s); "
                f"best {max(r['pct_copy'] for r in chosen):.1f}%; {len(chosen)} rows over {', '.join(shapes)}, "
                "both layouts")
    short = (f"{len(below)} of {len(chosen)} rows below; worst is {goal - worst['pct_copy']:.1f} points short"
             if below else "")
    return GoalCheck(key, name, measured, not below, short, _op_target(worst, ("fused", "compile")))


def _model_rows(rows) -> Dict[Tuple[str, str], Dict[str, Any]]:
    return {(r["variant"], r.get("memory_format", "contiguous")): r for r in rows
            if r.get("suite") == "model" and not r.get("error") and r.get("batch") == 1}


def _derived_goal(rows, goal: float) -> GoalCheck:
    key = "derived-vs-plain"
    name = (f"Derived MobileNetV2-1.0 (batch 1, 224 px) within {goal:g}% of plain, contiguous and "
            "channels_last, eager and torch.compile, and through ONNX Runtime")
    m = _model_rows(rows)
    checks = []  # (label, overhead %, noise %, target)
    for compiled, derived, plain, again in ((False, "derived-fused", "skip", "skip-again"),
                                            (True, "derived-fused-compiled", "skip-compiled", "skip-compiled-again")):
        for fmt in ("contiguous", "channels_last"):
            d, p, a = m.get((derived, fmt)), m.get((plain, fmt)), m.get((again, fmt))
            if not (d and p):
                continue
            over = 100.0 * (d["median_ms"] / p["median_ms"] - 1.0)
            noise = 100.0 * (a["median_ms"] / p["median_ms"] - 1.0) if a else None
            label = f"{'compiled' if compiled else 'eager'}, {fmt}"
            checks.append((label, over, noise, d["median_ms"], p["median_ms"],
                           {"kind": "model", "variants": [derived, plain], "memory_format": fmt, "batch": 1,
                            "resolution": d["resolution"], "dtype": d["dtype"], "genotype": d.get("genotype")}))
    # The deploy suite's runtimes besides PyTorch (ONNX Runtime on the exported file), derived
    # against plain in the same runtime, batch 1.
    deploy = {(r["runtime"], r["network"]): r for r in rows
              if r.get("suite") == "deploy" and not r.get("error") and r.get("batch") == 1}
    for runtime in sorted({rt for rt, _ in deploy if rt not in ("eager", "compile")}):
        d, p = deploy.get((runtime, "derived")), deploy.get((runtime, "plain"))
        if not (d and p):
            continue
        over = 100.0 * (d["median_ms"] / p["median_ms"] - 1.0)
        checks.append((p.get("label", runtime).split(" on ")[0], over, None, d["median_ms"], p["median_ms"],
                       {"kind": "deploy", "runtime": runtime, "batch": 1, "resolution": d["resolution"]}))
    if not checks:
        return GoalCheck(key, name, "—", None)
    measured = "; ".join(f"{c[0]}: {c[1]:+.1f}% ({c[3]:.3g} vs {c[4]:.3g} ms"
                         + (f"; plain timed again {c[2]:+.1f}%" if c[2] is not None else "") + ")" for c in checks)
    resolved = [c for c in checks if c[2] is None or abs(c[2]) < goal]
    unresolved = [c[0] for c in checks if c not in resolved]
    above = [c for c in resolved if c[1] > goal]
    if not resolved:
        return GoalCheck(key, name, measured, None, unresolved=unresolved)
    worst = max(resolved, key=lambda c: c[1])
    short = f"worst {worst[1]:+.1f}% ({worst[0]}), {worst[1] - goal:.1f} points over" if above else ""
    return GoalCheck(key, name, measured, not above, short, worst[5], unresolved,
                     headline=f"worst {worst[1]:+.1f}% ({worst[0]})")


def _step_goal(rows, key: str, variant: str, name: str, goal: float) -> GoalCheck:
    """A training step of ``variant`` against a plain step, at most ``goal`` ×."""
    steps = {r["variant"]: r for r in rows if r.get("suite") == "train" and not r.get("error")}
    plain, step = steps.get("plain"), steps.get(variant)
    if not (plain and step):
        return GoalCheck(key, name, "—", None)
    x = step["median_ms"] / plain["median_ms"]
    extra = "".join(f"; {label}: {_times(steps[v]['median_ms'] / plain['median_ms'])}"
                    for v, label in (("search-fused", "the bi-level search step"), ("search-eager", "eager search"))
                    if v in steps and v != variant)
    measured = (f"{_times(x)}: {step['median_ms']:.4g} ms vs {plain['median_ms']:.4g} ms, batch {plain['batch']} at "
                f"{plain['resolution']} px, {plain['memory_format']}{extra}")
    where = {"kind": "train", "variants": [variant, "plain"], "batch": plain["batch"],
             "resolution": plain["resolution"], "memory_format": plain["memory_format"],
             "num_classes": plain["num_classes"], "small_input": plain["small_input"]}
    return GoalCheck(key, name, measured, x <= goal, f"{x / goal:.3g}× over the target" if x > goal else "", where)


def _gate_weights_goal(rows, goal: float) -> GoalCheck:
    key = "gate-weights"
    name = (f"Fixed strip layer: trainable / frozen / inference_mode forwards within {goal:g}% "
            "of each other")
    by_shape = defaultdict(dict)
    for r in rows:
        if r.get("suite") == "gate_weights" and not r.get("error"):
            by_shape[tuple(r["shape"])][r["variant"]] = r["median_ms"]
    if not by_shape:
        return GoalCheck(key, name, "—", None)
    parts, worst = [], (0.0, None)
    for shape, times in sorted(by_shape.items()):
        spread = 100.0 * (max(times.values()) / min(times.values()) - 1.0)
        parts.append(f"{'×'.join(map(str, shape))}: " + ", ".join(f"{v} {t * 1e3:.0f} µs" for v, t in times.items())
                     + f" (spread {spread:.0f}%)")
        if spread >= worst[0]:
            worst = (spread, shape)
    ok = worst[0] <= goal
    short = "" if ok else f"spread {worst[0]:.0f}% at {'×'.join(map(str, worst[1]))}"
    return GoalCheck(key, name, "; ".join(parts), ok, short,
                     headline=f"largest spread {worst[0]:.0f}% ({'×'.join(map(str, worst[1]))})")


def evaluate(rows: Sequence[Dict[str, Any]], kind: str = "cpu") -> List[GoalCheck]:
    """Every goal of a device of ``kind`` ("cpu" or "cuda") on rows of one device (on a CPU, one
    model at one thread count) from one run."""
    search = lambda op: op == "search"  # noqa: E731
    fixed = lambda op: op != "search"  # noqa: E731
    build = {
        "search-fwd+bwd-vs-eager": lambda x: _speedup_goal(
            "search-fwd+bwd-vs-eager", f"Search mode fwd+bwd ≥ {x:g}× the eager reference", rows, search,
            "fwd+bwd", "eager", x),
        "search-fwd+bwd-vs-compile": lambda x: _speedup_goal(
            "search-fwd+bwd-vs-compile", f"Search mode fwd+bwd ≥ {x:g}× torch.compile(reference)", rows, search,
            "fwd+bwd", "compile", x),
        "search-fwd-vs-compile": lambda x: _speedup_goal(
            "search-fwd-vs-compile", f"Search mode forward ≥ {x:g}× torch.compile(reference)", rows, search,
            "fwd", "compile", x),
        "fixed-bandwidth": lambda x: _bandwidth_goal(rows, x),
        "fixed-vs-compile": lambda x: _speedup_goal(
            "fixed-vs-compile", "Every fixed op, forward: faster than torch.compile of the same op in every row",
            rows, fixed, "fwd", "compile", x, strictly_faster=True),
        "derived-vs-plain": lambda x: _derived_goal(rows, x),
        "supernet-step": lambda x: _step_goal(
            rows, "supernet-step", "supernet-sgd-fused",
            f"Supernet training step (all candidates, all 17 layers) ≤ {x:g}× a plain step", x),
        "search-step": lambda x: _step_goal(
            rows, "search-step", "search-fused", f"PMPL search step (fused) ≤ {x:g}× a plain training step", x),
        "gate-weights": lambda x: _gate_weights_goal(rows, x),
    }
    return [build[key](target(key, kind)) for key in goal_keys(kind)]


def thread_scaling(one: Sequence[Dict[str, Any]], many: Sequence[Dict[str, Any]], threads: int) -> GoalCheck:
    """The fused op at batch 8 on ``threads`` threads against 1 thread (rows of two runs of one
    machine, each compared within its own thread count elsewhere): search and fixed ops, fwd and fwd+bwd."""
    key = "thread-scaling"
    name = f"Fused op at batch 8: {threads} threads ≥ {THREAD_SCALING_X:g}× 1 thread (search and fixed, fwd and fwd+bwd)"

    def fused(rows):
        return {(r["op"], r["mode"], r["dtype"], tuple(r["shape"]), r.get("memory_format", "contiguous")): r
                for r in rows if r.get("suite") == "ops" and not r.get("error") and r.get("provider") == "fused"
                and not r.get("repeat") and r.get("batch") == 8 and r["op"] != "skip"}
    a, b = fused(one), fused(many)
    pairs = [(a[k]["median_ms"] / b[k]["median_ms"], b[k]) for k in a.keys() & b.keys() if b[k]["median_ms"] > 0]
    if not pairs:
        return GoalCheck(key, name, "—", None)
    worst_x, worst = min(pairs, key=lambda p: p[0])
    below = [p for p in pairs if p[0] < THREAD_SCALING_X]
    where = f"{worst['op']} {worst['mode']} {_shape(worst)}"
    measured = (f"worst {_times(worst_x)} ({where}); geomean {_times(_geomean([p[0] for p in pairs]))} over "
                f"{len(pairs)} rows; {len(below)} below")
    return GoalCheck(key, name, measured, not below,
                     f"{len(below)} of {len(pairs)} rows below" if below else "",
                     headline=f"worst {_times(worst_x)} ({where}), geomean {_times(_geomean([p[0] for p in pairs]))}")
