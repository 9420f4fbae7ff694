"""Ahead-of-time compile of every Triton kernel configuration for sm_90 and sm_80.

The interpreter runs the kernels' arithmetic but not Triton's compiler: this catches what it lets
through (constexpr misuse, unsupported ops, type errors) on a machine without a GPU, and reports
registers and spills per configuration from ptxas. The configurations are captured from the
launchers themselves (bench/aot.py): MobileNetV2-1.0's feature shapes at batch 128 under an H100's
launch layout, in NCHW and channels_last; every candidate mode (search over all eight, each fixed
op); float32, float16, bfloat16 and float64.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import aot  # noqa: E402
from metapool_kernels.reference import PAPER_CANDIDATES  # noqa: E402

# (N, C, H, W) of MobileNetV2-1.0 features at batch 128, one per distinct spatial size.
SHAPES = [(128, 16, 112, 112), (128, 24, 56, 56), (128, 32, 28, 28), (128, 96, 14, 14), (128, 320, 7, 7)]
FIXED = [n for n in PAPER_CANDIDATES if n != "skip"]  # a fixed skip layer launches nothing
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _cases():
    """(arch, shape, names, dtype, channels_last, fixed) to capture."""
    for channels_last in (False, True):
        for shape in SHAPES:
            yield 90, shape, PAPER_CANDIDATES, torch.float32, channels_last, False
        for dtype in (torch.float16, torch.bfloat16):
            for shape in (SHAPES[1], SHAPES[4]):
                yield 90, shape, PAPER_CANDIDATES, dtype, channels_last, False
        for name in FIXED:
            yield 90, SHAPES[1], (name,), torch.float32, channels_last, True
    yield 90, SHAPES[3], PAPER_CANDIDATES, torch.float64, False, False
    for dtype in (torch.float32, torch.bfloat16):
        yield 80, SHAPES[1], PAPER_CANDIDATES, dtype, False, False
        yield 80, SHAPES[1], PAPER_CANDIDATES, dtype, True, False


def _jobs():
    """Every distinct (kernel, configuration, arch) the cases launch, as JSON-ready jobs."""
    jobs = {}
    for arch, shape, names, dtype, channels_last, fixed in _cases():
        for launch in aot.capture_launches(shape, names, dtype, channels_last, fixed):
            key = json.dumps([arch, launch["kernel"], launch["args"], launch["constexprs"], launch["num_warps"]],
                             sort_keys=True)
            if key not in jobs:
                c = launch["constexprs"]
                mode = "fixed-" + names[0] if fixed else ("search" if len(names) > 1 else names[0])
                layout = "nhwc" if channels_last else "nchw"
                job_id = (f"{launch['kernel'].strip('_')}-sm{arch}-{SHORT[dtype]}-{mode}-{layout}-"
                          f"pb{c['PB']}-b{c['BLOCK']}-w{launch['num_warps']}-{len(jobs)}")
                jobs[key] = aot.job(launch, arch, job_id)
    return list(jobs.values())


JOBS = _jobs()


@pytest.fixture(scope="module")
def compiled():
    return aot.compile_jobs(JOBS)


@pytest.mark.parametrize("job", JOBS, ids=[j["id"] for j in JOBS])
def test_kernel_compiles(compiled, job):
    r = compiled[job["id"]]
    assert "error" not in r, f"{job['kernel']} did not compile for sm_{job['arch']}:\n{r.get('error')}"
    print(f"\n{job['id']}: {r['registers']} registers, spills {r['spill_stores']} B stores / "
          f"{r['spill_loads']} B loads, {r['shared']} B shared, global ld {r['ld']} st {r['st']}")
    assert 0 < r["registers"] <= 255
    # float64 is the exact path, not a fast one: its search-mode backward (nine rings of doubles)
    # may spill a little; every other configuration must not.
    if "-fp64-" not in job["id"]:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, "registers spill to local memory"


def test_capture_is_the_real_launch_layout():
    """The captured launches follow the GPU layout: the 8-channel cap, one lane per thread for
    the search-mode kernels and four for the strip reductions."""
    for launch in aot.capture_launches(SHAPES[4], PAPER_CANDIDATES):
        c = launch["constexprs"]
        per_thread = 4 if launch["kernel"] == "_strip_reduce_kernel" else 1
        assert c["PB"] <= 8 and c["PB"] * c["BLOCK"] <= 256 * per_thread
        assert launch["num_warps"] == max(1, min(8, c["PB"] * c["BLOCK"] // (32 * per_thread)))


def test_ptx_memory_op_parser():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.b32 %r5, [ %rd2 ];
    @%p2 st.global.v2.b16 [ %rd3 ], { %rs1, %rs2 };
    ld.global.nc.L1::evict_last.v2.b64 { %rd4, %rd5 }, [ %rd6 ];
    """
    assert aot.ptx_memory_ops(ptx) == {"ld": {"32": 1, "128": 2}, "st": {"32": 1}}


def test_predicted_table_renders():
    """The committed predicted table renders, labelled as predicted, with the steering targets."""
    from bench import predicted
    data = predicted.load(regenerate_if_stale=False)
    assert data is not None, f"{predicted.OUT_FILE} is missing: run python -m bench.predicted"
    text = predicted.render(data)
    assert text.startswith("**Predicted, not measured.**")
    assert "no spills" in text and "resident" in text and "roofline" in text.lower()
    assert all("error" not in c for c in data["configs"]), [c["error"] for c in data["configs"] if "error" in c]
