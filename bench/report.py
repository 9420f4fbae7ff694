"""Render bench/RESULTS.md from every result file in bench/results/.

    python -m bench.report [--results bench/results] [--out bench/RESULTS.md]

Rows are grouped per device (a GPU, or a CPU model with its thread count). Where several runs
measured the same row, the newest is shown. Each device gets: its runs, the goals with measured
values, the op tables (search mode and fixed ops), the paper's Table 1 and Table 4 with measured
latency, the training step, and the strip-gate rows.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import goals
from .common import RESULTS_DIR, load_results

OUT_FILE = Path(__file__).resolve().parent / "RESULTS.md"


# Why a goal was missed, per device: bench/results/reasons.json maps a device name to
# {goal-name prefix: analysis}. Each analysis must come from a profile of that device's run.
REASONS_FILE = Path(__file__).resolve().parent / "results" / "reasons.json"


def load_reasons(path: Path = REASONS_FILE) -> Dict[str, Dict[str, str]]:
    return json.loads(path.read_text()) if path.is_file() else {}


def reason_for(reasons: Dict[str, Dict[str, str]], device: str, goal: str) -> str:
    for prefix, text in reasons.get(device, {}).items():
        if goal.startswith(prefix):
            return "> **Reason (from a profile):** " + text
    return REASON_PLACEHOLDER


REASON_PLACEHOLDER = ("> **Reason (from a profile): not yet analysed.** Fill this in from a profile of the "
                      "missed configuration (torch.profiler, Nsight Systems / Compute); not from guesses.")

# The Meta-Pooling paper's own numbers (its Table 1), eager PyTorch on the authors' hardware.
PAPER_TABLE1 = {  # variant -> (Lat. ms, F. M, P. M)
    "skip": ("7.37", "320.24", "3.50"),
    "maxpool-eager": ("7.59", "320.81", "3.50"),
    "avgpool-eager": ("7.70", "320.81", "3.50"),
    "derived-eager": ("16.97", "322.12", "3.55"),
}
PAPER_TABLE4 = {  # variant -> (Params, GFLOPs)
    "skip": ("3.50M", "0.32"), "se": ("3.56M", "0.32"), "cbam": ("3.57M", "0.32"), "sk": ("5.28M", "0.35"),
    "coordatt": ("3.95M", "0.33"), "derived-fused": ("3.91M", "0.32"),
}
TABLE4_ORDER = ("skip", "se", "cbam", "sk", "coordatt", "derived-fused", "derived-eager", "meta-search-fused")
OP_ORDER = ("search", "skip", "avg3", "avg5", "avg7", "max3", "max5", "max7", "strip")


# ---------------------------------------------------------------------------------------------
# Formatting.
# ---------------------------------------------------------------------------------------------
def num(v: Optional[float], sig: int = 3) -> str:
    """Significant digits without exponents; '—' for missing values."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if v == 0:
        return "0"
    digits = max(0, sig - 1 - int(math.floor(math.log10(abs(v)))))
    return f"{v:,.{digits}f}"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def times(v: Optional[float]) -> str:
    return "—" if v is None else f"{num(v)}×"


def pct(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.1f}%" if signed else f"{v:.1f}%"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[str] = None) -> str:
    # A bare "|" inside a cell (as in 3|x|) would end the cell.
    rows = [[("—" if c is None else str(c)).replace("|", "\\|") for c in r] for r in rows]
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def shape_str(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape)


# ---------------------------------------------------------------------------------------------
# Merging runs.
# ---------------------------------------------------------------------------------------------
def row_key(r: Dict[str, Any]) -> Tuple:
    s = r.get("suite")
    if s == "ops":
        return (s, r.get("op"), r.get("mode"), r.get("dtype"), tuple(r.get("shape") or ()),
                r.get("memory_format", "contiguous"), r.get("provider"), r.get("repeat", 0))
    if s == "profile":
        return (s, r.get("goal"), r.get("variant"))
    if s == "strip_gate":
        return (s, r.get("mode"), r.get("dtype"), tuple(r.get("shape") or ()), r.get("provider"), r.get("repeat", 0))
    if s == "model":
        return (s, r.get("variant"), r.get("batch"), r.get("dtype"), r.get("resolution"), r.get("memory_format"))
    if s == "train":
        return (s, r.get("variant"), r.get("batch"), r.get("resolution"), r.get("memory_format"))
    if s == "deploy":
        return (s, r.get("network", "derived"), r.get("runtime"), r.get("batch"), r.get("resolution"))
    return (s, r.get("case"), r.get("error"))


class Device:
    """Everything measured on one device, newest row per key."""

    def __init__(self, name: str):
        self.name = name
        self.kind = "cpu"
        self.rows: "OrderedDict[Tuple, Dict[str, Any]]" = OrderedDict()
        self.runs: List[Dict[str, Any]] = []
        self.copy: Optional[Dict[str, Any]] = None

    def suite(self, name: str, ok_only: bool = True) -> List[Dict[str, Any]]:
        return [r for r in self.rows.values() if r.get("suite") == name and (not ok_only or not r.get("error"))]

    @property
    def errors(self) -> List[Dict[str, Any]]:
        return [r for r in self.rows.values() if r.get("error")]


def collect(runs: Sequence[Dict[str, Any]]) -> List[Device]:
    devices: Dict[str, Device] = OrderedDict()
    for i, run in enumerate(runs):  # oldest first: later rows replace earlier ones
        for r in run["rows"]:
            name = r.get("device_name") or run["env"].get("device_name", "unknown device")
            d = devices.setdefault(name, Device(name))
            if r.get("device") == "cuda":
                d.kind = "cuda"
            r = dict(r, _run=i)
            d.rows[row_key(r)] = r
            if not d.runs or d.runs[-1] is not run:
                d.runs.append(run)
        for name, c in (run.get("copy") or {}).items():
            d = devices.setdefault(name, Device(name))
            d.copy = dict(c, _run=i)
            if run not in d.runs:
                d.runs.append(run)
    ordered = sorted(devices.values(), key=lambda d: (d.kind != "cuda", d.name))
    return [d for d in ordered if d.rows or d.copy]


# ---------------------------------------------------------------------------------------------
# Sections.
# ---------------------------------------------------------------------------------------------
def runs_section(d: Device, runs: Sequence[Dict[str, Any]]) -> str:
    rows = []
    for run in d.runs:
        e = run["env"]
        c = (run.get("copy") or {}).get(d.name)
        threads = ", ".join(str(t) for t in e.get("thread_counts") or [e.get("threads")])
        rows.append([f"`{run['file']}`", e.get("date"), f"`{e.get('command')}`", e.get("scope"),
                     e.get("torch"), e.get("triton") or "—",
                     threads if d.kind == "cpu" else (e.get("cuda") or {}).get("capability", "—"),
                     num(c["gbps"]) if c else "—", _load_text(e),
                     f"{(e.get('git_commit') or '?')[:10]}{' +local changes' if e.get('git_dirty') else ''}"])
    head = ["file", "date (UTC)", "command", "scope", "torch", "triton",
            "threads" if d.kind == "cpu" else "compute capability", "copy GB/s",
            "load avg, 1 min: start / peak / end", "commit"]
    out = [table(head, rows, "l" * len(head))]
    for run in d.runs:
        skipped = run["env"].get("skipped_at_deadline")
        if skipped:
            out.append(f"\n`{run['file']}` reached its time limit ({num(run['env']['deadline_s'])} s, "
                       f"`--bench-deadline`): {len(skipped)} test(s) were skipped, their rows are absent "
                       f"(first: `{skipped[0]}`).")
    if d.copy:
        out.append(f"\nCopy bandwidth: `y.copy_(x)` on {num(d.copy['bytes'] / 2**20)} MiB of float32, "
                   f"{num(d.copy['gbps'])} GB/s counting bytes read plus written ({d.copy.get('method', '')}). "
                   "Every “% copy” below is against the copy bandwidth of the row's own run.")
    return "\n".join(out)


def _load_text(env: Dict[str, Any]) -> str:
    vals = [env.get(k) for k in ("loadavg_start", "loadavg_peak", "loadavg_end")]
    return " / ".join(f"{v[0]:.2f}" if v else "—" for v in vals)


def _med(rs: Dict[str, Dict[str, Any]], key: str) -> Optional[float]:
    r = rs.get(key)
    return r.get("median_ms") if r else None


# ---------------------------------------------------------------------------------------------
# Goals (goals.py, one mechanism for every device), each missed one with its reason and this
# run's profile.
# ---------------------------------------------------------------------------------------------
def one_run_rows(d: Device) -> List[Dict[str, Any]]:
    """Per suite, the device's rows from the newest run that measured that suite, so every goal's
    ratio compares rows of one run."""
    newest: Dict[str, int] = {}
    for r in d.rows.values():
        newest[r["suite"]] = max(newest.get(r["suite"], -1), r["_run"])
    return [r for r in d.rows.values() if r["_run"] == newest[r["suite"]]]


def goals_section(d: Device) -> str:
    """The goals of the device's kind, on its newest run's rows."""
    rows = one_run_rows(d)
    checks = goals.evaluate(rows, d.kind)
    body = []
    for c in checks:
        status = c.status
        if c.unresolved:
            status += (f" ({len(c.unresolved)} setting(s) not resolved — the plain network timed twice differs by "
                       f"≥ {goals.target('derived-vs-plain', d.kind):g}%: {', '.join(c.unresolved)})")
        body.append((c.name, c.measured, status))
    parts = [table(["goal", "measured (this run)", "status"], body, "lll"),
             "\nEach ratio compares rows of one run at this thread count; “worst” is the row that decides the goal."]
    known = load_reasons()
    profiles = [r for r in rows if r["suite"] == "profile"]
    for c in checks:
        if c.ok is False:
            parts.append(f"\n**{c.name}: missed.**\n\n{reason_for(known, d.name, c.name)}")
            prof = profile_table([r for r in profiles if r["goal"] == c.key])
            if prof:
                parts.append("\n" + prof)
    return "\n".join(parts)


def profile_table(rows: Sequence[Dict[str, Any]], top: int = 6) -> str:
    """The profiled variants side by side: self CPU ms per iteration of each one's top operators."""
    if not rows:
        return ""
    t = rows[0]["target"]
    if t["kind"] == "op":
        fmt = ", channels_last" if t["memory_format"] == "channels_last" else ""
        where = f"`{t['op']}` {t['mode']}, {t['dtype']}, {shape_str(t['shape'])}{fmt}"
    elif t["kind"] == "model":
        where = f"batch {t['batch']}, {t['resolution']} px, {t['memory_format']}, inference"
    else:
        where = f"batch {t['batch']}, {t['resolution']} px, {t['memory_format']}, one training step"
    names: List[str] = []
    for r in rows:
        for e in r["top"][:top]:
            if e["name"] not in names:
                names.append(e["name"])
    head = ["operator (self CPU ms per iteration)"] + [f"{r['variant']}" for r in rows]
    body = []
    for n in names:
        line = [f"`{n}`"]
        for r in rows:
            e = next((e for e in r["top"] if e["name"] == n), None)
            line.append(f"{num(e['self_ms'])} ({e['pct']:.0f}%)" if e else "·")
        body.append(line)
    body.append(["**all operators, self CPU**"] + [f"**{num(r['self_ms_per_iter'])}**" for r in rows])
    body.append(["wall ms per iteration (profiled)"] + [num(r["wall_ms_per_iter"]) for r in rows])
    iters = ", ".join(f"{r['variant']} {r['iters']}" for r in rows)
    return (f"torch.profiler, this run, {where}, {rows[0].get('threads', '?')} thread(s); iterations: {iters}. "
            "“·”: not among that variant's top operators.\n\n" + table(head, body))


def _setting_label(r: Dict[str, Any]) -> str:
    fmt = ", channels_last" if r.get("memory_format") == "channels_last" else ""
    return f"b{r['batch']} {r['dtype']} {r['resolution']}px{fmt}"


def _settings(rows: Sequence[Dict[str, Any]]) -> List[Tuple]:
    keys = {(r["batch"], r["dtype"], r["resolution"], r.get("memory_format", "contiguous")) for r in rows}
    return sorted(keys, key=lambda k: (k[3] != "contiguous", k[1] != "float32", k[0], k[2]))


def ops_section(d: Device) -> str:
    rows = d.suite("ops")
    if not rows:
        return ""
    out = []
    floors = sorted({(r["op"] if r["op"] in ("search", "strip") else ("avg" if r["op"].startswith("avg") else
                      "max" if r["op"].startswith("max") else r["op"]), r["mode"], r["floor"]) for r in rows})
    out.append("Byte floors used (|x| = bytes of x; docs/DESIGN.md, §2 Budgets):\n")
    out.append(table(["op", "mode", "floor"], [(f"`{o}`", m, f) for o, m, f in floors], "lll"))
    out.append("\nColumns: medians in ms; “2nd” is the fused variant timed again at the end of its case "
               "(the spread between the two is this run's noise); GB/s = floor bytes / fused median; "
               "“× eager” and “× compile” = their median / fused median; “err” = ‖fused − eager‖ / ‖eager‖ "
               "on the first input. Forward runs under `torch.no_grad()`; forward+backward returns the gradients "
               "of x, α and the gate convs (`torch.autograd.grad`).")
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda t: t != "float32")
    for search in (True, False):
        for dtype in dtypes:
            for mode in ("fwd", "fwd+bwd"):
                ops_here = [o for o in OP_ORDER if (o == "search") == search]
                groups = defaultdict(dict)
                for r in rows:
                    if r["dtype"] == dtype and r["mode"] == mode and r["op"] in ops_here:
                        key = (r["op"], tuple(r["shape"]), r.get("memory_format", "contiguous"))
                        groups[key][r["provider"] + ("#2" if r.get("repeat") else "")] = r
                if not groups:
                    continue
                has_compile = any("compile" in g for g in groups.values())
                has_layouts = len({k[2] for k in groups}) > 1
                head = (["op", "N×C×H×W"] + (["layout"] if has_layouts else []) +
                        ["floor", "fused ms", "2nd", "eager ms"] + (["compile ms"] if has_compile else []) +
                        ["fused GB/s", "% copy"] + (["compile % copy"] if has_compile else []) +
                        ["× eager"] + (["× compile"] if has_compile else []) + ["err"])
                body = []
                for key in sorted(groups, key=lambda k: (OP_ORDER.index(k[0]), k[2] != "contiguous", k[1][1:], k[1][0])):
                    op, shape, layout = key
                    g = groups[key]
                    f = g.get("fused", {})
                    line = [f"`{op}`", shape_str(shape)] + (["CL" if layout == "channels_last" else "NCHW"]
                                                            if has_layouts else [])
                    line += [_floor(f), num(_med(g, "fused")), num(_med(g, "fused#2")), num(_med(g, "eager"))]
                    if has_compile:
                        line.append(num(_med(g, "compile")))
                    line += [num(f.get("gbps")), pct(f.get("pct_copy"))]
                    if has_compile:
                        line.append(pct(g.get("compile", {}).get("pct_copy")))
                    line.append(times(ratio(_med(g, "eager"), _med(g, "fused"))))
                    if has_compile:
                        line.append(times(ratio(_med(g, "compile"), _med(g, "fused"))))
                    line.append(f"{f['rel_err']:.1e}" if f.get("rel_err") is not None else "—")
                    body.append(line)
                title = (f"#### Search mode (all 8 candidates), {dtype}, {mode}" if search
                         else f"Fixed ops, {dtype}, {mode}")
                fixed_cols = 4 if has_layouts else 3
                tbl = table(head, body, "l" * fixed_cols + "r" * (len(head) - fixed_cols))
                if search:
                    out.append(f"\n{title}\n\n{tbl}")
                else:
                    out.append(f"\n<details><summary>{title} ({len(body)} rows)</summary>\n\n{tbl}\n\n</details>")
    noise = []
    for g in _all_groups(rows):
        a, b = _med(g, "fused"), _med(g, "fused#2")
        if a and b:
            noise.append(abs(a - b) / min(a, b) * 100.0)
    if noise:
        noise.sort()
        out.insert(0, f"Noise: the two fused timings of a case differ by a median of {noise[len(noise) // 2]:.1f}% "
                      f"(90th percentile {noise[int(0.9 * (len(noise) - 1))]:.1f}%, {len(noise)} cases); differences "
                      "between variants smaller than that are not resolved by this run.\n")
    return "\n".join(out)


def _floor(row: Dict[str, Any]) -> str:
    k = row.get("floor_factor")
    return "—" if k is None else "0" if k == 0 else f"{k}|x|"


def _all_groups(rows):
    groups = defaultdict(dict)
    for r in rows:
        key = (r["op"], r["mode"], r["dtype"], tuple(r["shape"]), r.get("memory_format", "contiguous"))
        groups[key][r["provider"] + ("#2" if r.get("repeat") else "")] = r
    return groups.values()


def cpu_models_section(d: Device) -> str:
    """The CPU's batch-1 rows of plain and derived MobileNetV2 on their own, thread count stated."""
    rows = [r for r in d.suite("model") if r["variant"] in ("skip", "derived-eager", "derived-fused", "skip-again")
            and r["batch"] == 1]
    if d.kind != "cpu" or not rows:
        return ""
    threads = sorted({str(run["env"].get("threads")) for run in d.runs})
    return (f"`torch.get_num_threads()` = {', '.join(threads)}; the full model tables above hold the same rows.\n\n"
            + model_section(d, 0))


def model_section(d: Device, which: int) -> str:
    rows = d.suite("model")
    if not rows:
        return ""
    by_variant: Dict[str, Dict[Tuple, Dict[str, Any]]] = defaultdict(dict)
    info: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        k = (r["batch"], r["dtype"], r["resolution"], r.get("memory_format", "contiguous"))
        by_variant[r["variant"]][k] = r
        info.setdefault(r["variant"], r)
    settings = _settings(rows)
    compiled = ("skip-compiled", "derived-fused-compiled", "skip-compiled-again")
    if which == 1:
        order = [v for v in ("skip", "maxpool-eager", "maxpool-fused", "avgpool-eager", "avgpool-fused",
                             "meta-search-eager", "meta-search-fused", "derived-eager", "derived-fused") + compiled
                 + ("skip-again",) if v in by_variant]
    elif which == 0:
        order = [v for v in ("skip", "derived-eager", "derived-fused") + compiled + ("skip-again",) if v in by_variant]
        settings = [s for s in settings if s[0] == 1]
    else:
        order = [v for v in TABLE4_ORDER if v in by_variant]
    if which == 4 and not any(info[v]["table"] == 4 for v in order):
        return ""
    head = ["model", "params", "MACs (M)"]
    for s in settings:
        fmt = ", CL" if s[3] == "channels_last" else ""
        head += [f"b{s[0]} {s[1]} {s[2]}px{fmt} ms", "vs Skip"]
    head += {1: ["paper Lat. ms / F. M / P. M"], 4: ["paper Params / GFLOPs"]}.get(which, [])
    body = []
    for v in order:
        r0 = info[v]
        # Compiled networks are compared with the compiled plain network, eager ones with the eager one.
        base_key = r0.get("baseline", "skip")
        base = by_variant.get(base_key, {})
        line = [r0["label"], f"{r0['params'] / 1e6:.3f}M", num(r0["macs"] / 1e6, 4) if r0.get("macs") else "—"]
        for s in settings:
            r = by_variant[v].get(s)
            b = base.get(s)
            line.append(num(r["median_ms"]) if r else "—")
            line.append(pct(100.0 * (r["median_ms"] / b["median_ms"] - 1.0), True) if (r and b and v != base_key) else "—")
        if which in (1, 4):
            paper = (PAPER_TABLE1 if which == 1 else PAPER_TABLE4).get(v)
            line.append(" / ".join(paper) if paper else "")
        body.append(line)
    if which == 0:
        return table(head, body)
    notes = []
    genos = {tuple(info[v]["genotype"]) for v in order if info[v].get("genotype")}
    for g in genos:
        notes.append(f"Derived genotype (block 1…17): `{', '.join(g)}`.")
    mac_res = {info[v].get("macs_resolution") for v in order if info[v].get("macs")}
    if mac_res:
        notes.append(f"MACs of one {'/'.join(str(m) for m in sorted(mac_res))} px image, counted by "
                     "`torch.utils.flop_counter` on the eager build (convolutions, linear layers and matmuls; "
                     "pooling and gating multiply no weights and are not counted).")
    notes.append("Latency: inference (`eval()`, `torch.no_grad()`), median ms per forward of one batch; "
                 "“vs Skip” is the overhead against plain MobileNetV2 in the same setting (a torch.compile row "
                 "against the compiled plain network); CL = channels_last. "
                 "“Skip, timed again last” is plain MobileNetV2 measured once more after every other model: its "
                 "“vs Skip” is the run's noise, and overheads smaller than it are not resolved. "
                 "The paper's numbers come from its authors' eager implementation on their own hardware.")
    return table(head, body, "l" + "r" * (len(head) - 2) + "l") + "\n\n" + "\n".join(notes)


def train_section(d: Device) -> str:
    rows = d.suite("train")
    if not rows:
        return ""
    plain = {(r["batch"], r["resolution"], r["memory_format"]): r for r in rows if r["variant"] == "plain"}
    order = ("plain", "supernet-sgd-fused", "search-eager", "search-fused")
    body = []
    for r in sorted(rows, key=lambda r: order.index(r["variant"]) if r["variant"] in order else 99):
        p = plain.get((r["batch"], r["resolution"], r["memory_format"]))
        body.append([r["label"], r["batch"], f"{r['resolution']}px", r["memory_format"], f"{r['params'] / 1e6:.3f}M",
                     num(r["median_ms"]), num(r["p20_ms"]), num(r["p80_ms"]), num(r.get("images_per_s")),
                     times(ratio(r["median_ms"], p["median_ms"] if p else None))])
    head = ["step", "batch", "size", "format", "params", "median ms", "p20", "p80", "images/s", "× plain step"]
    note = ("float32, `train()` mode, random images and labels. The search step is "
            "`metapool_kernels.pmpl.search.bilevel_step` with the trainer's default optimisers (SGD on θ, Adam on α); "
            "the supernet row is one ordinary SGD step of the same supernet with α frozen.")
    return table(head, body, "llllrrrrrr") + "\n\n" + note


def strip_gate_section(d: Device) -> str:
    rows = d.suite("strip_gate")
    if not rows:
        return ""
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["dtype"], r["mode"], tuple(r["shape"]))][r["provider"] + ("#2" if r.get("repeat") else "")] = r
    body = []
    for (dtype, mode, shape) in sorted(groups, key=lambda k: (k[0] != "float32", k[1], k[2][1:])):
        g = groups[(dtype, mode, shape)]
        f = g.get("C++ op", {})
        body.append([shape_str(shape), dtype, mode, _floor(f), num(_med(g, "C++ op")),
                     num(_med(g, "C++ op#2")), num(_med(g, "eager")), times(ratio(_med(g, "eager"), _med(g, "C++ op"))),
                     num(f.get("gbps")), pct(f.get("pct_copy"))])
    head = ["N×C×H×W", "dtype", "mode", "floor", "C++ ms", "2nd", "eager ms", "× eager", "C++ GB/s", "% copy"]
    note = ("`metapool_kernels.ops.strip_gate(x, g_h, g_w)` against `reference.strip_gate` (cast back to x's dtype), "
            "float32 gate logits. Floors: forward 2|x| (read x, write out), backward 3|x| (read grad_out and x, "
            "write grad_x).")
    return table(head, body, "lllrrrrrrr") + "\n\n" + note


def deploy_section(d: Device) -> str:
    """ONNX Runtime vs PyTorch eager vs torch.compile for the exported networks, per batch, and the
    derived network's cost over the plain one in the same runtime."""
    rows = d.suite("deploy")
    if not rows:
        return ""
    order = {"eager": 0, "compile": 1, "onnxruntime": 2}
    net_order = {"plain": 0, "derived": 1}
    network = lambda r: r.get("network", "derived")  # noqa: E731  (rows before the plain network was timed)
    eager = {(network(r), r["batch"], r["resolution"]): r for r in rows if r["runtime"] == "eager"}
    plain = {(r["runtime"], r["batch"], r["resolution"]): r for r in rows if network(r) == "plain"}
    body = []
    for r in sorted(rows, key=lambda r: (r["resolution"], r["batch"], order.get(r["runtime"], 9),
                                         net_order.get(network(r), 9))):
        base = eager.get((network(r), r["batch"], r["resolution"]), {})
        over_plain = "" if network(r) == "plain" else times(ratio(
            r.get("median_ms"), plain.get((r["runtime"], r["batch"], r["resolution"]), {}).get("median_ms")))
        first = r.get("export_s") if r["runtime"] == "onnxruntime" else r.get("first_call_s")
        body.append([r["label"], network(r), r["batch"], r["resolution"], r.get("memory_format", ""),
                     num(r.get("median_ms")), f"{num(r.get('p20_ms'))}–{num(r.get('p80_ms'))}",
                     num(r.get("images_per_s")), times(ratio(base.get("median_ms"), r.get("median_ms"))),
                     over_plain, num(first),
                     "" if r.get("rel_err_vs_eager") is None else f"{r['rel_err_vs_eager']:.1e}"])
    head = ["runtime", "network", "batch", "px", "layout", "median ms", "p20–p80", "images/s", "× eager",
            "derived / plain", "first s", "rel. err vs eager"]
    genotypes = {" ".join(r["genotype"]) for r in rows if network(r) == "derived"}
    threads = sorted({str(r.get("threads")) for r in rows})
    versions = sorted({r["onnxruntime"] for r in rows if r.get("onnxruntime")})
    note = (f"MobileNetV2-1.0 (1000 classes, float32), plain and derived with genotype "
            f"`{' | '.join(sorted(genotypes))}`, "
            f"{', '.join(threads)} thread(s) for every runtime (ONNX Runtime {', '.join(versions) or '?'}: "
            "intra-op threads = torch's). The ONNX file comes from `metapool_kernels.export.to_onnx` (standard ops, "
            "each k×k window as a 1×k and a k×1 pool, dynamic batch) and is run with the CPUExecutionProvider at "
            "its default graph optimisations. `× eager`: against the same network in eager PyTorch; "
            "`derived / plain`: the derived network's median over the plain network's in the same runtime. "
            "`first s`: the export for ONNX Runtime, the first (compiling) call for torch.compile. "
            "`rel. err vs eager`: ‖logits − eager's‖ / ‖eager's‖ on the timed input.")
    return table(head, body, "llrrlrrrrrrr") + "\n\n" + note


def errors_section(d: Device) -> str:
    errs = d.errors
    if not errs:
        return ""
    body = [[r.get("suite"), r.get("case") or r.get("variant") or r.get("runtime") or "", r.get("provider") or "", f"`{r['error']}`"]
            for r in errs]
    return table(["suite", "case", "variant", "error"], body, "llll")


# ---------------------------------------------------------------------------------------------
# The summary a reader takes in first: every goal on every device, and one plot.
# ---------------------------------------------------------------------------------------------
SUMMARY_PLOT = "summary.png"
_THREADS = re.compile(r"^(?P<host>.*) \((?P<n>\d+) threads?\)$")


def _cpu_by_threads(devices: Sequence[Device]) -> Dict[str, Dict[int, Device]]:
    hosts: Dict[str, Dict[int, Device]] = defaultdict(dict)
    for d in devices:
        m = _THREADS.match(d.name) if d.kind == "cpu" else None
        if m:
            hosts[m["host"]][int(m["n"])] = d
    return hosts


def _mark(ok: Optional[bool]) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[ok]


def summary_section(devices: Sequence[Device], plot: Optional[str]) -> str:
    hosts = _cpu_by_threads(devices)
    parts = []
    for host, by_n in hosts.items():
        counts = sorted(by_n)
        checks = {n: goals.evaluate(one_run_rows(by_n[n])) for n in counts}
        if 1 in by_n:
            for n in counts[1:]:
                scaling = goals.thread_scaling(one_run_rows(by_n[1]), one_run_rows(by_n[n]), n)
                checks[n].append(scaling)
        names = OrderedDict((c.key, c.name) for n in counts for c in checks[n])
        body = []
        for key, name in names.items():
            cells, oks = [], []
            for n in counts:
                c = next((c for c in checks[n] if c.key == key), None)
                cells.append("—" if c is None or c.ok is None else f"{c.headline} ({_mark(c.ok)})")
                if c is not None and c.ok is not None:
                    oks.append(c.ok)
            status = "not measured" if not oks else ("met" if all(oks) else "**missed**")
            body.append([name] + cells + [status])
        heads = ["goal"] + [f"{n} thread{'s' if n > 1 else ''}" for n in counts] + ["status"]
        parts.append(f"**{host}** (CPU; one run per thread count, every ratio within one run):\n\n"
                     + table(heads, body, "l" * len(heads)))
    gpus = [d for d in devices if d.kind == "cuda"]
    parts.append("**GPU:** " + (", ".join(f"[{d.name}](#{_anchor(d.name)})" for d in gpus) + " — see its section."
                                if gpus else "not yet measured (the last section is predicted from the compiled kernels, "
                                "not timed)."))
    if plot:
        parts.append(f"![fused vs eager vs torch.compile per shape, every thread count](results/{plot})")
    return "## Summary\n\n" + "\n\n".join(parts) + "\n"


def summary_plot(devices: Sequence[Device], path: Path) -> bool:
    """Search mode fwd+bwd and forward: the fused op's speed-up over eager and over torch.compile of
    the reference, per shape, one panel per thread count. Returns False when there is nothing to plot."""
    hosts = _cpu_by_threads(devices)
    panels = [(host, n, d) for host, by_n in hosts.items() for n, d in sorted(by_n.items())]
    panels = [p for p in panels if p[2].suite("ops")]
    if not panels:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, (host, n, d) in zip(axes[0], panels):
        groups = goals.op_groups(one_run_rows(d), lambda op: op == "search", "fwd+bwd")
        fwd = goals.op_groups(one_run_rows(d), lambda op: op == "search", "fwd")
        keys = sorted(groups.keys() | fwd.keys(), key=lambda k: (k[2], k[3]))
        labels, series = [], defaultdict(list)
        for k in keys:
            labels.append("×".join(map(str, k[2])) + (" cl" if k[3] == "channels_last" else ""))
            for mode, g in (("fwd+bwd", groups.get(k, {})), ("fwd", fwd.get(k, {}))):
                f = g.get("fused")
                for other in ("eager", "compile"):
                    o = g.get(other)
                    series[f"{mode} vs {other}"].append(o["median_ms"] / f["median_ms"] if f and o else float("nan"))
        width = 0.8 / max(1, len(series))
        for i, (label, values) in enumerate(series.items()):
            ax.bar([x + i * width for x in range(len(labels))], values, width, label=label)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(goals.target("search-fwd+bwd-vs-compile"), color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"search mode, {n} thread{'s' if n > 1 else ''}", fontsize=10)
        ax.set_ylabel("speed-up of the fused op (×)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{panels[0][0]}: fused vs eager and torch.compile (dashed: the 3× goal)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(runs: Sequence[Dict[str, Any]], source: str = "bench/results", plot: Optional[str] = None) -> str:
    devices = collect(runs)
    out = ["# metapool_kernels benchmark results", "",
           f"Generated by `python -m bench.report` from {len(runs)} result file(s) in `{source}/`; "
           "how the numbers are taken is in [bench/README.md](README.md). Every number below was measured "
           "on the device its section names; nothing is extrapolated between devices.", ""]
    if not devices:
        out.append("_No results yet: run `make bench`._")
        return "\n".join(out) + "\n"
    out.append(summary_section(devices, plot))
    out.append("Devices: " + ", ".join(f"[{d.name}](#{_anchor(d.name)})" for d in devices) + "\n")
    machine = cpu_machine_note(runs)
    if machine:
        out.append(machine + "\n")
    for d in devices:
        out.append(f"## {d.name}\n")
        out.append("### Runs\n\n" + runs_section(d, runs) + "\n")
        out.append("### Goals\n\n" + goals_section(d) + "\n")
        for title, body in (("Op suite: FusedMetaPooling vs eager vs torch.compile", ops_section(d)),
                            ("Model suite: the paper's Table 1 (pooling enhancers), MobileNetV2-1.0", model_section(d, 1)),
                            ("Attention baselines: the paper's Table 4 with measured latency", model_section(d, 4)),
                            ("Training step: PMPL search step vs plain SGD step", train_section(d)),
                            ("CPU: batch-1 inference, plain vs derived MobileNetV2", cpu_models_section(d)),
                            ("Strip gate: C++ op vs eager", strip_gate_section(d)),
                            ("Deployment: ONNX Runtime vs PyTorch eager vs torch.compile, derived MobileNetV2-1.0",
                             deploy_section(d)),
                            ("Failed variants", errors_section(d))):
            if body:
                out.append(f"### {title}\n\n{body}\n")
    return "\n".join(out)


SHARED_LOAD = 1.0


def cpu_machine_note(runs: Sequence[Dict[str, Any]]) -> str:
    """The CPU machine, the thread counts its runs used, and whether other work shared it: a
    1-minute load average above 1 at a run's start (before the run loads the machine), or above the
    run's own thread count plus 1 at its peak or end."""
    cpu_runs = [r for r in runs if r["env"].get("device") == "cpu" and any(x.get("device") == "cpu" for x in r["rows"])]
    if not cpu_runs:
        return ""
    lines = []
    for host in sorted({r["env"].get("host_cpu") for r in cpu_runs}):
        mine = [r for r in cpu_runs if r["env"].get("host_cpu") == host]
        cores = sorted({str(r["env"].get("cpu_count")) for r in mine})
        counts = sorted({t for r in mine for t in (r["env"].get("thread_counts") or [r["env"].get("threads")])})
        shared = []
        for r in mine:
            e = r["env"]
            own = max(e.get("thread_counts") or [e.get("threads") or 1])
            start = (e.get("loadavg_start") or [0])[0]
            later = max((e.get(k) or [0])[0] for k in ("loadavg_peak", "loadavg_end"))
            if start > SHARED_LOAD or later > own + SHARED_LOAD:
                shared.append(f"`{r['file']}` (load {_load_text(e)})")
        note = (f"**CPU machine:** {host}, {', '.join(cores)} cores; thread counts measured: "
                f"{', '.join(str(c) for c in counts)}.")
        if shared:
            note += (" **The machine was shared with other work during " + ", ".join(shared) + "** (1-minute load "
                     "average start / peak / end; above 1 at the start, or above the run's own thread count + 1 "
                     "later): its timings include that contention, and the noise lines below say how much.")
        else:
            note += " No other load was seen during its runs (1-minute load average ≤ 1 besides the run's own threads)."
        lines.append(note)
    return "\n\n".join(lines)


def predicted_section(regenerate: bool = True) -> str:
    """GPU speed predicted from the compiled kernels (bench/predicted.py), kept apart from every
    measured section; with ``regenerate``, recompiled first when the kernels changed."""
    from . import predicted
    body = predicted.render(predicted.load(regenerate_if_stale=regenerate))
    return f"\n## Predicted from the compiled kernels: H100 (not measured)\n\n{body}" if body else ""


def _anchor(text: str) -> str:
    keep = "".join(ch for ch in text.lower() if ch.isalnum() or ch in " -_")
    return keep.replace(" ", "-")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS_DIR), help="folder of result JSON files")
    ap.add_argument("--out", default=str(OUT_FILE), help="Markdown file to write")
    args = ap.parse_args(argv)
    runs = load_results(Path(args.results))
    src = Path(args.results)
    try:
        src = src.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    # The predicted section is recompiled (when stale) only for the repository's own RESULTS.md.
    plot = None
    if Path(args.out).resolve() == OUT_FILE and summary_plot(collect(runs), RESULTS_DIR / SUMMARY_PLOT):
        plot = SUMMARY_PLOT
    text = render(runs, source=str(src), plot=plot) + predicted_section(regenerate=Path(args.out).resolve() == OUT_FILE)
    Path(args.out).write_text(text)
    print(f"wrote {args.out} from {len(runs)} result file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
