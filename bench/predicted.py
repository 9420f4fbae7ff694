"""GPU speed *predicted* from the ahead-of-time compiled Triton kernels, without a GPU.

    python -m bench.predicted            # recompile and rewrite bench/predicted/h100-sm90.json

For MobileNetV2-1.0's 17 Meta-Pooling layer shapes (224×224 input) at batch 128 and batch 1, in
search mode and as each fixed op, float32 and bfloat16, NCHW and channels_last, the launches an
H100 (132 SMs) would get are captured from the launchers (bench/aot.py), compiled for sm_90 and
read: registers, spills, shared memory, resident warps, the global memory instructions, and the
SASS of each kernel's row loop (instructions and barriers per row step). Per launch that gives two
lower bounds on its time, and the prediction is the larger one:

  memory time = bytes the kernel moves by design ÷ 3.0 TB/s
  issue time  = warp instructions the row loops execute on the busiest SM ÷ (4 per clock × 1.755 GHz)

A memory-bound kernel is one whose issue time is at most its memory time. Each call also launches
the small torch ops around the kernels (the strip gates' maths), counted on fake tensors
(aot.count_launches); a step costs at least HOST_US_PER_LAUNCH of host dispatch per launch, which
is the bound at batch 1. Nothing here is measured; bench/report.py renders it as a separate,
labelled section of RESULTS.md and regenerates the file when the kernels or these scripts change.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import aot

OUT_FILE = Path(__file__).resolve().parent / "predicted" / "h100-sm90.json"
BEFORE_FILE = OUT_FILE.with_name("h100-sm90-before.json")
SOURCES = [aot.ROOT / "metapool_kernels" / "ops" / "meta_pool_triton.py", Path(aot.__file__), Path(__file__)]
BATCHES = (128, 1)
# MobileNetV2-1.0's inverted-residual block outputs (C, H = W) at 224×224: one Meta-Pooling layer each.
MOBILENET_V2_LAYERS = ([(16, 112)] + [(24, 56)] * 2 + [(32, 28)] * 3 + [(64, 14)] * 4 + [(96, 14)] * 3
                       + [(160, 7)] * 3 + [(320, 7)])
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NAMES = ("skip", "avg3", "avg5", "avg7", "max3", "max5", "max7", "strip")
MODES = {"search": NAMES, **{op: (op,) for op in NAMES if op != "skip"}}  # a fixed skip launches nothing
# Passes over a tensor of x's size each kernel makes by design (reads + writes).
PASSES = {("_strip_reduce_kernel", False): 1,  # forward: read x
          ("_meta_pool_forward_kernel", None): 2,  # read x, write out
          ("_strip_reduce_kernel", True): 2,  # backward: read grad, x
          ("_meta_pool_backward_kernel", None): 3}  # read grad, x; write grad_x
HOST_US_PER_LAUNCH = 4.0  # assumed host cost of one eager launch (Python dispatch + cudaLaunchKernel)


def sources_hash() -> str:
    h = hashlib.sha256()
    for path in SOURCES:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _weighted(launch: Dict[str, Any]) -> Optional[bool]:
    return launch["constexprs"].get("WEIGHTED") if launch["kernel"] == "_strip_reduce_kernel" else None


def _direction(launch: Dict[str, Any]) -> str:
    backward = (launch["kernel"] == "_meta_pool_backward_kernel" or _weighted(launch)
                or launch["constexprs"].get("WRITE_Z") is False)  # the backward's gates only recompute σ
    return "backward" if backward else "forward"


def _row_steps(kernel: str, rows: int, radius: int) -> int:
    """Row-loop iterations of one program: its rows plus the halo rows its loop walks."""
    return rows + {"_meta_pool_forward_kernel": 2, "_meta_pool_backward_kernel": 4}.get(kernel, 0) * radius


def _bytes(launch: Dict[str, Any], numel: int, itemsize: int) -> int:
    """Bytes a launch moves by design. The gates read the strip sums' partials and write σ (and
    z, the means) in float32, (N·C, H + W) each; their weights stay in L2."""
    if launch["kernel"] == "_strip_gate_kernel":
        ints = launch["ints"]
        planes = launch["grid"][0] * ints["C"]
        streams = ints["n_h_parts"] + 1 + bool(launch["constexprs"]["WRITE_Z"])
        return 4 * planes * (ints["H"] + ints["W"]) * streams
    return PASSES[(launch["kernel"], _weighted(launch))] * numel * itemsize


def _steps(launch: Dict[str, Any]) -> int:
    """Iterations of the loop the issue bound counts: rows (with the halo rows) for the pooling
    kernels and the strip reductions, channel blocks of the GEMM for the gates."""
    if launch["kernel"] == "_strip_gate_kernel":
        return math.ceil(launch["ints"]["C"] / launch["constexprs"]["BC"])
    return _row_steps(launch["kernel"], launch["ints"]["rows_per_prog"], launch["constexprs"].get("R", 0))


def launch_bounds(kernel: str, grid, num_warps: int, steps: int, loop_instructions: int, nbytes: int,
                  gpu: Dict[str, Any] = aot.H100) -> Dict[str, float]:
    """Memory and issue lower bounds (µs) of one launch, and the prediction (the larger)."""
    programs = grid[0] * grid[1] * grid[2]
    per_sm = math.ceil(programs / gpu["sms"])  # programs on the busiest SM
    issue = per_sm * num_warps * steps * loop_instructions / gpu["issue_per_sm_per_s"] * 1e6
    memory = nbytes / gpu["hbm_bytes_per_s"] * 1e6
    return dict(memory_us=memory, issue_us=issue, predicted_us=max(memory, issue))


def generate(out_file: Path = OUT_FILE) -> Dict[str, Any]:
    import triton
    gpu = aot.H100
    configs: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    rows: List[Dict[str, Any]] = []
    shapes = list(OrderedDict.fromkeys(MOBILENET_V2_LAYERS))
    for mode, names in MODES.items():
        for batch in BATCHES:
            for dtype_name, dtype in DTYPES.items():
                itemsize = torch.empty(0, dtype=dtype).element_size()
                for layout in ("NCHW", "NHWC"):
                    for C, H in shapes:
                        shape = (batch, C, H, H)
                        numel = batch * C * H * H
                        fixed = mode != "search"
                        row = dict(mode=mode, batch=batch, dtype=dtype_name, layout=layout, shape=list(shape),
                                   layers=MOBILENET_V2_LAYERS.count((C, H)), forward=[], backward=[])
                        for launch in aot.capture_launches(shape, names, dtype, layout == "NHWC", fixed, gpu["sms"]):
                            key = aot.compile_key(launch)
                            if key not in configs:
                                configs[key] = dict(launch=launch, id=f"k{len(configs)}", dtype=dtype_name,
                                                    layout=layout, modes=set(), planes=set())
                            cfg = configs[key]
                            cfg["modes"].add(mode)
                            cfg["planes"].add(H)
                            row[_direction(launch)].append(dict(
                                config=cfg["id"], kernel=launch["kernel"], grid=launch["grid"],
                                num_warps=launch["num_warps"], bytes=_bytes(launch, numel, itemsize),
                                steps=_steps(launch)))
                        counts = aot.count_launches(shape, names, dtype, layout == "NHWC", fixed, gpu["sms"])
                        for direction in ("forward", "backward"):
                            row[f"{direction}_launches"] = counts[direction]["launches"]
                        rows.append(row)
    results = aot.compile_jobs([aot.job(c["launch"], 90, c["id"]) for c in configs.values()])
    table = {}
    for cfg in configs.values():
        launch, r = cfg["launch"], results[cfg["id"]]
        c = launch["constexprs"]
        entry = dict(id=cfg["id"], kernel=launch["kernel"].strip("_"), dtype=cfg["dtype"], layout=cfg["layout"],
                     weighted=c.get("WEIGHTED"), modes=sorted(cfg["modes"]), planes=sorted(cfg["planes"], reverse=True),
                     pb=c.get("PB", c.get("BO")), block=c.get("BLOCK", c.get("BS")), num_warps=launch["num_warps"])
        entry["elements_per_thread"] = entry["pb"] * entry["block"] / (32 * launch["num_warps"])
        if "error" in r:
            entry["error"] = r["error"].strip().splitlines()[-1]
        else:
            entry.update({k: r[k] for k in ("registers", "spill_stores", "spill_loads", "shared", "ld", "st",
                                             "loop_instructions", "loop_barriers", "outer_loop_instructions")})
            entry["instructions_per_element"] = r["loop_instructions"] / entry["elements_per_thread"]
            entry.update(aot.occupancy(r["registers"], r["shared"], launch["num_warps"], gpu))
        table[cfg["id"]] = entry
    for row in rows:
        for direction in ("forward", "backward"):
            total = dict(memory_us=0.0, issue_us=0.0, predicted_us=0.0)
            for k in row[direction]:
                cfg = table[k["config"]]
                loop = "outer_loop_instructions" if k["kernel"] == "_strip_gate_kernel" else "loop_instructions"
                k.update(launch_bounds(k["kernel"], k["grid"], k["num_warps"], k["steps"], cfg.get(loop, 0),
                                       k["bytes"], gpu))
                for key in total:
                    total[key] += k[key]
            row[f"{direction}_bounds"] = total
    data = dict(note="predicted from the compiled code, not measured",
                gpu="H100 SXM (sm_90, 132 SMs; 3.0 TB/s, 4 warp instructions per clock per SM at 1.755 GHz)",
                triton=triton.__version__, torch=torch.__version__, sources_hash=sources_hash(),
                host_us_per_launch=HOST_US_PER_LAUNCH, rows=rows, configs=list(table.values()))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(data, indent=1) + "\n")
    return data


def load(regenerate_if_stale: bool = True, path: Path = OUT_FILE) -> Optional[Dict[str, Any]]:
    """The predicted table, regenerated when its kernels or scripts changed (and Triton is here)."""
    data = json.loads(path.read_text()) if path.is_file() else None
    if regenerate_if_stale and (data is None or data.get("sources_hash") != sources_hash()):
        try:
            import triton  # noqa: F401
        except ImportError:
            return data
        data = generate(path)
    return data


def before_bounds(before: Optional[Dict[str, Any]]) -> Dict[tuple, Dict[str, Any]]:
    """The earlier kernels' search-mode rows (batch 128) through the same bounds: by (dtype,
    layout, H) and direction, the predicted µs and the instructions per element of each kernel."""
    if not before:
        return {}
    configs = {c["id"]: c for c in before["configs"]}
    out = {}
    for row in before["layers"]:
        H = row["shape"][2]
        for direction in ("forward", "backward"):
            total, per_element = 0.0, {}
            for k in row[direction]:
                c = configs[k["config"]]
                kernel = "_" + c["kernel"]
                steps = _row_steps(kernel, math.ceil(H / k["grid"][2]), 3)
                total += launch_bounds(kernel, k["grid"], c["num_warps"], steps, c["loop_instructions"],
                                       k["bytes"])["predicted_us"]
                per_element[c["kernel"]] = c["loop_instructions"] / c["elements_per_thread"]
            out[(row["dtype"], row["layout"], H, direction)] = dict(predicted_us=total, per_element=per_element)
    return out


# ---------------------------------------------------------------------------------------------
# Rendering (called by bench/report.py)
# ---------------------------------------------------------------------------------------------
def _widths(counts: Dict[str, int]) -> str:
    return " + ".join(f"{n}×{bits}b" for bits, n in counts.items()) or "—"


def _table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _kernel_name(c: Dict[str, Any]) -> str:
    return c["kernel"] + (" (backward)" if c["weighted"] else " (forward)" if c["weighted"] is False else "")


def _per_element(row: Dict[str, Any], direction: str, configs: Dict[str, Dict[str, Any]], kernel: str) -> str:
    values = [configs[k["config"]].get("instructions_per_element") for k in row[direction] if k["kernel"] == kernel]
    return "/".join(f"{v:.0f}" for v in values if v is not None) or "—"


def render(data: Optional[Dict[str, Any]], before: Optional[Dict[str, Any]] = None) -> str:
    if not data or "rows" not in data:
        return ""
    if before is None and BEFORE_FILE.is_file():
        before = json.loads(BEFORE_FILE.read_text())
    configs = {c["id"]: c for c in data["configs"]}
    host = data["host_us_per_launch"]
    out = [f"**Predicted, not measured.** Read from the Triton kernels compiled ahead of time for sm_90 "
           f"(Triton {data['triton']}) for {data['gpu']}; regenerated by `make bench-report` "
           "(`python -m bench.predicted`) whenever the kernels change. Shapes: MobileNetV2-1.0's 17 Meta-Pooling "
           "layers (224×224 input) at batch 128 and 1, in search mode and as each fixed op, with the launch layout "
           "the launchers choose for 132 SMs. Per launch: memory time = bytes by design ÷ 3.0 TB/s; issue time = "
           "the row loop's SASS instructions × row steps × warps on the busiest SM ÷ (4 × 1.755 GHz); predicted = "
           "the larger. Host dispatch is counted as "
           f"{host:g} µs per launch (assumed), the bound where kernels are short.", ""]
    bad = [c for c in configs.values() if "error" in c]
    ok = [c for c in configs.values() if "error" not in c]
    out.append("Kernel configurations (one compile each):\n")
    rows = []
    for c in sorted(ok, key=lambda c: (c["kernel"], str(c["weighted"]), c["dtype"], c["layout"], c["modes"] != ["search"],
                                       -c["planes"][0])):
        rows.append([_kernel_name(c), c["dtype"], c["layout"], "search" if "search" in c["modes"] else ", ".join(c["modes"]),
                     ", ".join(f"{h}²" for h in c["planes"]), f"{c['pb']}×{c['block']} / {c['num_warps']}",
                     f"{c['elements_per_thread']:g}", c["registers"], c["spill_stores"] + c["spill_loads"],
                     f"{c['warps']}", c["loop_instructions"], f"{c['instructions_per_element']:.0f}",
                     c["loop_barriers"], _widths(c["ld"])])
    rows += [[_kernel_name(c), c["dtype"], c["layout"], ", ".join(c["modes"]), "—", "—", "—", "—", "—", "—", "—", "—",
              "—", c["error"]] for c in bad]
    out.append(_table(["kernel", "dtype", "layout", "ops", "planes", "channels×columns / warps", "elements per thread",
                       "registers", "spill bytes", "resident warps per SM", "row-loop SASS instructions",
                       "instructions per element", "barriers per row step", "global loads (static)"], rows))

    old = before_bounds(before)
    out.append("\nSearch mode at batch 128, per layer shape (µs per layer; before = the earlier kernels through the "
               "same bounds):\n")
    rows = []
    for r in data["rows"]:
        if r["mode"] != "search" or r["batch"] != 128:
            continue
        n, c, h, w = r["shape"]
        cells = [r["dtype"], r["layout"], f"{n}×{c}×{h}×{w}", r["layers"]]
        for direction, kernel in (("forward", "_meta_pool_forward_kernel"), ("backward", "_meta_pool_backward_kernel")):
            b = r[f"{direction}_bounds"]
            prev = old.get((r["dtype"], r["layout"], h, direction))
            cells += [f"{b['memory_us']:.0f}", f"{b['issue_us']:.0f}", f"{b['predicted_us']:.0f}",
                      f"{prev['predicted_us']:.0f}" if prev else "—",
                      (f"{prev['per_element'].get(kernel.strip('_'), 0):.0f} → " if prev else "")
                      + _per_element(r, direction, configs, kernel), r[f"{direction}_launches"]]
        rows.append(cells)
    out.append(_table(["dtype", "layout", "shape", "layers",
                       "fwd memory µs", "fwd issue µs", "fwd predicted µs", "fwd before µs", "fwd kernel instr/element",
                       "fwd launches", "bwd memory µs", "bwd issue µs", "bwd predicted µs", "bwd before µs",
                       "bwd kernel instr/element", "bwd launches"], rows))

    out.append("\nWhole network, 17 layers (device = Σ predicted per Triton launch; the torch ops around them, the "
               "backward's gate adjoints, count as launches only; host = launches × "
               f"{host:g} µs; a step costs at least the larger):\n")
    totals: "OrderedDict[tuple, Dict[str, float]]" = OrderedDict()
    for r in data["rows"]:
        key = (r["mode"], r["batch"], r["dtype"], r["layout"])
        t = totals.setdefault(key, dict(fwd=0.0, bwd=0.0, fwd_launches=0, bwd_launches=0, before=0.0))
        t["fwd"] += r["forward_bounds"]["predicted_us"] * r["layers"]
        t["bwd"] += r["backward_bounds"]["predicted_us"] * r["layers"]
        t["fwd_launches"] += r["forward_launches"] * r["layers"]
        t["bwd_launches"] += r["backward_launches"] * r["layers"]
        if r["mode"] == "search" and r["batch"] == 128:
            for direction in ("forward", "backward"):
                prev = old.get((r["dtype"], r["layout"], r["shape"][2], direction))
                t["before"] += prev["predicted_us"] * r["layers"] if prev else float("nan")
    rows = []
    for (mode, batch, dtype, layout), t in totals.items():
        if mode != "search" and batch != 1:
            continue
        step = mode == "search"
        device = t["fwd"] + (t["bwd"] if step else 0.0)
        launches = t["fwd_launches"] + (t["bwd_launches"] if step else 0)
        rows.append([("search step (fwd + bwd)" if step else f"derived, every layer {mode} (fwd)"), batch, dtype, layout,
                     f"{device / 1000:.3f}", launches, f"{launches * host / 1000:.3f}",
                     f"{max(device, launches * host) / 1000:.3f}",
                     f"{t['before'] / 1000:.3f}" if step and batch == 128 and t["before"] == t["before"] else "—"])
    out.append(_table(["network", "batch", "dtype", "layout", "device ms ≥", "launches", "host ms ≥",
                       "predicted ms ≥", "device ms ≥ before"], rows))
    out.append("\n" + _steering(ok))
    return "\n".join(out) + "\n"


def _steering(ok: List[Dict[str, Any]]) -> str:
    """The targets the compiled code is steered by, checked on every configuration."""
    lines = ["Targets, checked on the configurations above:", ""]

    def line(name, pool, bad):
        if not bad:
            lines.append(f"- {name}: met ({len(pool)} of {len(pool)} configurations)")
            return
        kernels = ", ".join(sorted({_kernel_name(c) for c in bad}))
        lines.append(f"- {name}: **not met** for {len(bad)} of {len(pool)} configurations ({kernels})")

    # Issue ≤ memory per element: instructions per element ÷ lane issue rate ≤ bytes per element ÷ bandwidth.
    gpu = aot.H100
    lane_rate = gpu["sms"] * gpu["issue_per_sm_per_s"] * 32

    def bytes_per_element(c):
        kernel = "_" + c["kernel"]
        return PASSES[(kernel, c["weighted"])] * (4 if c["dtype"] == "float32" else 2)

    streams = [c for c in ok if c["kernel"] != "strip_gate_kernel"]  # the gates are a small GEMM, not a stream
    line("memory-bound by the SASS (issue time ≤ memory time per element)", streams,
         [c for c in streams if c["instructions_per_element"] / lane_rate > bytes_per_element(c) / gpu["hbm_bytes_per_s"]])
    line("no spills", ok, [c for c in ok if c["spill_stores"] or c["spill_loads"]])
    line("at least 16 resident warps per SM", ok, [c for c in ok if c["warps"] < 16])
    line("vectorised (≥ 64-bit) loads of the main streams (widest global load)", ok,
         [c for c in ok if max(int(b) for b in c["ld"]) < 64])
    return "\n".join(lines)


def main() -> int:
    data = generate()
    print(f"wrote {OUT_FILE} ({len(data['configs'])} kernel configurations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
