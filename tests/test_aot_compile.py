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
            key = f"sm{arch}:" + aot.compile_key(launch)
            if key not in jobs:
                c = launch["constexprs"]
                mode = "fixed-" + names[0] if fixed else ("search" if len(names) > 1 else names[0])
                layout = "nhwc" if channels_last else "nchw"
                job_id = (f"{launch['kernel'].strip('_')}-sm{arch}-{SHORT[dtype]}-{mode}-{layout}-"
                          f"pb{c.get('PB', c.get('BO'))}-b{c.get('BLOCK', c.get('BS'))}-w{launch['num_warps']}-{len(jobs)}")
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
    # float64 is the exact path, not a fast one: its search-mode backward (nine delay lines of doubles)
    # may spill a little; every other configuration must not.
    if "-fp64-" not in job["id"]:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, "registers spill to local memory"


def test_capture_is_the_real_launch_layout():
    """The captured launches follow the GPU layout: the 8-channel cap, one lane per thread for
    the search-mode kernels and four for the strip reductions."""
    launches = aot.capture_launches(SHAPES[4], PAPER_CANDIDATES)
    gates = [la for la in launches if la["kernel"] == "_strip_gate_kernel"]
    # forward and backward: per sample, both gates, blocks of 64 output channels
    assert [la["grid"] for la in gates] == [(SHAPES[4][0], 2, SHAPES[4][1] // 64)] * 2
    for launch in launches:
        if launch in gates:
            continue
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
    for needle in ("memory-bound by the SASS", "no spills", "resident warps", "instructions per element",
                   "barriers per row step", "launches", "search step (fwd + bwd)", "derived, every layer max3"):
        assert needle in text, needle
    assert all("error" not in c for c in data["configs"]), [c["error"] for c in data["configs"] if "error" in c]


# MobileNetV2-1.0's 17 Meta-Pooling layers (C, H = W) at 224×224.
MOBILENET_V2_LAYERS = ([(16, 112)] + [(24, 56)] * 2 + [(32, 28)] * 3 + [(64, 14)] * 4 + [(96, 14)] * 3
                       + [(160, 7)] * 3 + [(320, 7)])


def _compile_keys(batch, names_per_layer, dtype=torch.float32, channels_last=False):
    """The distinct compiles (Triton's cache keys) one step of the network's layers needs."""
    keys = set()
    for (C, H), names in zip(MOBILENET_V2_LAYERS, names_per_layer):
        fixed = len(names) == 1
        for launch in aot.capture_launches((batch, C, H, H), names, dtype, channels_last, fixed):
            keys.add(aot.compile_key(launch))
    return keys


def _tile_classes(keys):
    """The same keys with the argument specialisations dropped: one per (kernel, constexprs, warps)."""
    return {json.dumps([k[0], k[1], k[3], k[4]], sort_keys=True) for k in map(json.loads, keys)}


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)])
def test_a_search_compiles_once_per_tile_class(dtype, channels_last):
    """A 17-layer search step compiles one kernel per (kernel, op set, tile class): no layer shape,
    stride or batch size adds a variant, so a new batch size (a last partial batch, batch 1)
    compiles nothing new."""
    search = [PAPER_CANDIDATES] * len(MOBILENET_V2_LAYERS)
    keys = _compile_keys(128, search, dtype, channels_last)
    assert len(keys) == len(_tile_classes(keys))
    assert _compile_keys(100, search, dtype, channels_last) | _compile_keys(1, search, dtype, channels_last) <= keys
    print(f"\nsearch step, {dtype} {'NHWC' if channels_last else 'NCHW'}: {len(keys)} compiles for 17 layers")


def test_a_derived_network_compiles_once_per_tile_class():
    """A derived network (each layer one fixed op) at batch 1 and 128: the same compiles."""
    ops = [n for n in PAPER_CANDIDATES if n != "skip"]
    derived = [(ops[i % len(ops)],) for i in range(len(MOBILENET_V2_LAYERS))]
    keys = _compile_keys(1, derived)
    assert len(keys) == len(_tile_classes(keys))
    assert _compile_keys(128, derived) == keys and _compile_keys(7, derived) == keys
    print(f"\nderived network: {len(keys)} compiles for 17 layers")


def test_compile_key_sees_specialisation():
    """The key would see a variant: an integer argument Triton specialises (here the unit stride
    of a column-sliced input becomes 2, no longer the constant 1)."""
    keys = {aot.compile_key(la) for la in aot.capture_launches((2, 8, 14, 14), ("max3",), fixed=True)}
    assert aot._describe_arg(1, "sxw")["spec"] == ["constexpr", 1] and aot._describe_arg(2, "sxw")["spec"] == ["i32", ""]
    assert aot._describe_arg(1, "sxh")["spec"] == aot._describe_arg(32, "sxh")["spec"] == ["i32", None]
    assert len(keys) == 2  # forward and backward


SASS_SNIPPET = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
.L_x_0:
        /*0030*/                   FADD R3, R3, R2 ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
        /*0050*/                   NOP;
        /*0060*/               @P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
.L_x_2:
        /*0080*/                   BRA `(.L_x_2);
"""


def test_sass_loop_reader():
    """Loops are read off backward branches, innermost first; NOPs are not instructions."""
    loops = aot.sass_loops(SASS_SNIPPET)
    assert [(lp["instructions"], lp["barriers"]) for lp in loops] == [(2, 0), (1, 0), (5, 1)]


def test_launch_bounds():
    """Issue time counts the busiest SM's programs; the prediction is the larger bound."""
    from bench import predicted
    gpu = aot.H100
    b = predicted.launch_bounds("_meta_pool_forward_kernel", (gpu["sms"] + 1, 1, 1), 8, 10, 100, 3_000_000)
    assert b["issue_us"] == pytest.approx(2 * 8 * 10 * 100 / gpu["issue_per_sm_per_s"] * 1e6)
    assert b["memory_us"] == pytest.approx(1.0) and b["predicted_us"] == max(b["issue_us"], b["memory_us"])


@pytest.mark.parametrize("op", [n for n in PAPER_CANDIDATES if n not in ("skip", "strip")])
def test_a_fixed_pooling_layer_launches_one_kernel_each_way(op):
    """A derived network's pooling layer is one device kernel forward and one backward: no torch op
    around it (counted on fake CUDA tensors, where nothing runs)."""
    for channels_last in (False, True):
        counts = aot.count_launches((1, 96, 14, 14), (op,), channels_last=channels_last, fixed=True)
        assert counts["forward"]["kernels"] == ["meta_pool_forward_kernel"], counts
        assert counts["backward"]["kernels"] == ["meta_pool_backward_kernel"], counts


def test_launch_counter_sees_torch_ops():
    """A search layer's forward is three launches (strip sums, both gates, the mixing pass); the
    counter sees the torch ops around the kernels too (the backward's gate adjoints)."""
    counts = aot.count_launches((2, 8, 14, 14), PAPER_CANDIDATES)
    fwd = counts["forward"]["kernels"]
    assert fwd == ["strip_reduce_kernel", "strip_gate_kernel", "meta_pool_forward_kernel"]
    bwd = counts["backward"]["kernels"]
    assert bwd[0] == "strip_gate_kernel" and "mm" in bwd and bwd[-1] != "strip_gate_kernel"
    print(f"\nsearch layer: {counts['forward']['launches']} launches forward, {counts['backward']['launches']} backward")
