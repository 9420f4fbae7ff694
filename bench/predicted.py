"""GPU speed *predicted* from the ahead-of-time compiled Triton kernels, without a GPU.

    python -m bench.predicted            # recompile and rewrite bench/predicted/h100-sm90.json

For MobileNetV2-1.0's search-mode Meta-Pooling layers at batch 128 (224×224 input), the launches
an H100 (132 SMs) would get are captured from the launchers (bench/aot.py), compiled for sm_90,
and read: registers, spills, shared memory, resident blocks and warps per SM, the global
load/store instructions of the PTX and their widths, the bytes each kernel moves by design, and
the roofline lower bound on time at the H100's HBM bandwidth. Nothing here is measured; bench/
report.py renders it as a separate, clearly labelled section of RESULTS.md, and regenerates the
file when the kernels or this script changed.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import aot

OUT_FILE = Path(__file__).resolve().parent / "predicted" / "h100-sm90.json"
SOURCES = [aot.ROOT / "metapool_kernels" / "ops" / "meta_pool_triton.py", Path(aot.__file__), Path(__file__)]
BATCH = 128
# MobileNetV2-1.0's inverted-residual block outputs (C, H = W) at 224×224: one Meta-Pooling layer each.
MOBILENET_V2_LAYERS = ([(16, 112)] + [(24, 56)] * 2 + [(32, 28)] * 3 + [(64, 14)] * 4 + [(96, 14)] * 3
                       + [(160, 7)] * 3 + [(320, 7)])
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Passes over a tensor of x's size each kernel makes by design (reads + writes).
PASSES = {("_strip_reduce_kernel", False): 1,  # forward: read x
          ("_meta_pool_forward_kernel", None): 2,  # read x, write out
          ("_strip_reduce_kernel", True): 2,  # backward: read grad, x
          ("_meta_pool_backward_kernel", None): 3}  # read grad, x; write grad_x
NAMES = ("skip", "avg3", "avg5", "avg7", "max3", "max5", "max7", "strip")


def sources_hash() -> str:
    h = hashlib.sha256()
    for path in SOURCES:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _passes(launch: Dict[str, Any]) -> int:
    weighted = launch["constexprs"].get("WEIGHTED") if launch["kernel"] == "_strip_reduce_kernel" else None
    return PASSES[(launch["kernel"], weighted)]


def generate(out_file: Path = OUT_FILE) -> Dict[str, Any]:
    import triton
    gpu = aot.H100
    configs: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    layers: List[Dict[str, Any]] = []
    for dtype_name, dtype in DTYPES.items():
        itemsize = torch.empty(0, dtype=dtype).element_size()
        for layout in ("NCHW", "NHWC"):
            for (C, H), count in Counter(MOBILENET_V2_LAYERS).items():
                shape = (BATCH, C, H, H)
                numel = BATCH * C * H * H
                row = dict(dtype=dtype_name, layout=layout, shape=list(shape), layers=count, forward=[], backward=[])
                launches = aot.capture_launches(shape, NAMES, dtype, layout == "NHWC", sms=gpu["sms"])
                for launch in launches:
                    key = json.dumps([launch["kernel"], launch["args"], launch["constexprs"], launch["num_warps"]],
                                     sort_keys=True)
                    if key not in configs:
                        configs[key] = dict(launch=launch, id=f"k{len(configs)}", dtype=dtype_name, layout=layout,
                                            shapes=[])
                    cfg = configs[key]
                    cfg["shapes"].append(list(shape))
                    direction = "backward" if (launch["kernel"] == "_meta_pool_backward_kernel" or
                                               launch["constexprs"].get("WEIGHTED")) else "forward"
                    nbytes = _passes(launch) * numel * itemsize
                    row[direction].append(dict(config=cfg["id"], bytes=nbytes, grid=launch["grid"]))
                layers.append(row)
    results = aot.compile_jobs([aot.job(c["launch"], 90, c["id"]) for c in configs.values()])
    table = []
    for cfg in configs.values():
        launch, r = cfg["launch"], results[cfg["id"]]
        c = launch["constexprs"]
        entry = dict(id=cfg["id"], kernel=launch["kernel"].strip("_"), dtype=cfg["dtype"], layout=cfg["layout"],
                     weighted=c.get("WEIGHTED"), pb=c["PB"], block=c["BLOCK"], num_warps=launch["num_warps"],
                     elements_per_thread=c["PB"] * c["BLOCK"] / (32 * launch["num_warps"]),
                     passes=_passes(launch), shapes=cfg["shapes"])
        if "error" in r:
            entry["error"] = r["error"].strip().splitlines()[-1]
        else:
            entry.update({k: r[k] for k in ("registers", "spill_stores", "spill_loads", "shared", "ld", "st")})
            entry.update(aot.occupancy(r["registers"], r["shared"], launch["num_warps"], gpu))
        table.append(entry)
    for row in layers:
        for direction in ("forward", "backward"):
            total = sum(k["bytes"] for k in row[direction])
            row[f"{direction}_bytes"] = total
            row[f"{direction}_roofline_us"] = total / gpu["hbm_bytes_per_s"] * 1e6
    data = dict(note="predicted from the compiled code, not measured", gpu="H100 SXM (sm_90, 132 SMs, 3.35 TB/s HBM3)",
                triton=triton.__version__, torch=torch.__version__, sources_hash=sources_hash(), batch=BATCH,
                layers=layers, configs=table)
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


# ---------------------------------------------------------------------------------------------
# Rendering (called by bench/report.py)
# ---------------------------------------------------------------------------------------------
def _widths(counts: Dict[str, int]) -> str:
    return " + ".join(f"{n}×{bits}b" for bits, n in counts.items()) or "—"


def _table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _merged(configs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Configurations that differ only in their shapes' strides, as one row with all their shapes."""
    rows: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    for c in configs:
        key = json.dumps({k: v for k, v in c.items() if k not in ("id", "shapes")}, sort_keys=True)
        if key in rows:
            rows[key]["shapes"] = rows[key]["shapes"] + c["shapes"]
        else:
            rows[key] = dict(c)
    return list(rows.values())


def render(data: Optional[Dict[str, Any]]) -> str:
    if not data:
        return ""
    out = [f"**Predicted, not measured.** Read from the Triton kernels compiled ahead of time for sm_90 "
           f"(Triton {data['triton']}) for {data['gpu']}; regenerated by `make bench-report` "
           "(`python -m bench.predicted`) whenever the kernels change. Shapes: MobileNetV2-1.0's 17 Meta-Pooling "
           f"layers in search mode (all eight candidates) at batch {data['batch']}, 224×224 input, with the launch "
           "layout the launchers choose for 132 SMs.", ""]
    out.append("Per kernel configuration: registers and spills from ptxas; resident blocks and warps per SM from "
               "registers, shared memory and warps (64 K registers, 64 warps, 32 blocks per SM); global memory "
               "instructions counted statically in the PTX with their access width; bytes per element = passes "
               "over an x-sized tensor by design × element size.\n")
    rows = []
    for c in _merged(data["configs"]):
        if "error" in c:
            rows.append([c["kernel"], c["dtype"], c["layout"], "—", "—", "—", "—", "—", "—", "—", "—", c["error"]])
            continue
        kernel = c["kernel"] + (" (backward)" if c["weighted"] else " (forward)" if c["weighted"] is False else "")
        itemsize = 4 if c["dtype"] == "float32" else 2
        rows.append([kernel, c["dtype"], c["layout"], f"{c['pb']}×{c['block']} / {c['num_warps']}",
                     f"{c['elements_per_thread']:g}", c["registers"], c["spill_stores"] + c["spill_loads"], c["shared"],
                     f"{c['blocks']} / {c['warps']}", _widths(c["ld"]), _widths(c["st"]),
                     f"{c['passes'] * itemsize} ({c['passes']} pass{'es' if c['passes'] > 1 else ''})",
                     ", ".join(sorted({f"{s[2]}²" for s in c["shapes"]}, key=lambda v: -int(v[:-1])))])
    out.append(_table(["kernel", "dtype", "layout", "channels×columns / warps", "elements per thread", "registers",
                       "spill bytes", "shared B", "resident blocks / warps per SM", "global loads (static)",
                       "global stores (static)", "bytes per element", "plane sizes"], rows))
    out.append("\nRoofline lower bound per layer shape (bytes by design ÷ 3.35 TB/s); a search step runs each "
               "layer's forward and backward once:\n")
    rows, totals = [], Counter()
    for r in data["layers"]:
        key = (r["dtype"], r["layout"])
        totals[key + ("forward",)] += r["forward_roofline_us"] * r["layers"]
        totals[key + ("backward",)] += r["backward_roofline_us"] * r["layers"]
        n, c, h, w = r["shape"]
        rows.append([r["dtype"], r["layout"], f"{n}×{c}×{h}×{w}", r["layers"], f"{r['forward_bytes'] / 2**20:.0f}",
                     f"{r['forward_roofline_us']:.0f}", f"{r['backward_bytes'] / 2**20:.0f}",
                     f"{r['backward_roofline_us']:.0f}"])
    out.append(_table(["dtype", "layout", "shape", "layers", "forward MiB", "forward µs ≥", "backward MiB",
                       "backward µs ≥"], rows))
    out.append("\nWhole network (17 layers), roofline lower bound:\n")
    rows = [[d, l, f"{totals[(d, l, 'forward')] / 1000:.2f}", f"{totals[(d, l, 'backward')] / 1000:.2f}",
             f"{(totals[(d, l, 'forward')] + totals[(d, l, 'backward')]) / 1000:.2f}"]
            for d, l in sorted({(k[0], k[1]) for k in totals})]
    out.append(_table(["dtype", "layout", "forward ms ≥", "backward ms ≥", "search step ms ≥"], rows))
    out.append("\n" + _steering(data))
    return "\n".join(out) + "\n"


def _steering(data: Dict[str, Any]) -> str:
    """The targets the compiled code is steered by, checked on every configuration."""
    ok = _merged([c for c in data["configs"] if "error" not in c])
    fwd = [c for c in ok if c["kernel"] == "meta_pool_forward_kernel"]
    lines = ["Targets, checked on the configurations above:", ""]

    def line(name, pool, bad):
        if not bad:
            lines.append(f"- {name}: met ({len(pool)} of {len(pool)} configurations)")
            return
        kernels = ", ".join(sorted({c["kernel"] for c in bad}))
        lines.append(f"- {name}: **not met** for {len(bad)} of {len(pool)} configurations ({kernels})")
    line("no spills", ok, [c for c in ok if c["spill_stores"] or c["spill_loads"]])
    line("forward: at least two resident 8-warp blocks (or 16 warps) per SM", fwd, [c for c in fwd if c["warps"] < 16])
    line("vectorised (≥ 64-bit) loads of the main streams (widest global load)", ok,
         [c for c in ok if max(int(b) for b in c["ld"]) < 64])
    return "\n".join(lines)


def main() -> int:
    data = generate()
    print(f"wrote {OUT_FILE} ({len(data['configs'])} kernel configurations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
