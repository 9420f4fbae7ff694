"""Ahead-of-time compile of every Triton kernel configuration for sm_80 and sm_90.

The interpreter runs the kernels' arithmetic but not Triton's compiler: this catches what it lets
through (constexpr misuse, unsupported ops, type errors) on a machine without a GPU, and reports
registers and spills per configuration from ptxas. Configurations are the ones the launchers
produce for MobileNetV2's feature shapes: every candidate mode (search over all eight, each fixed
op) in float32, and every tile shape in float32, float16 and bfloat16.

Triton fixes interpreted-or-compiled when a kernel is defined, and this suite's other tests run
interpreted on CPU; so the compiles happen in one child process (``aot_compile.py``) with the
interpreter off, and each configuration's result is checked here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from metapool_kernels.ops import meta_pool as mp  # noqa: E402
from metapool_kernels.reference import PAPER_CANDIDATES  # noqa: E402

ARCHS = (90, 80)
# (N·C, H, W) of MobileNetV2-1.0 features at batch 128, one per distinct spatial size.
SHAPES = [(128 * 16, 112, 112), (128 * 24, 56, 56), (128 * 32, 28, 28), (128 * 96, 14, 14), (128 * 320, 7, 7)]
H100_SMS = 132
TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MODES = [PAPER_CANDIDATES] + [(n,) for n in PAPER_CANDIDATES if n != "skip"]  # a fixed skip launches nothing


def _forward_configs():
    seen = set()
    for dtype, modes in [(torch.float32, MODES), (torch.float16, [PAPER_CANDIDATES]), (torch.bfloat16, [PAPER_CANDIDATES])]:
        shapes = SHAPES if len(modes) == 1 else SHAPES[1:2]
        for planes, H, W in shapes:
            for names in modes:
                grid = mp._Grid(planes, H, W, 0, mp.FORWARD_MAX_BLOCK, sms=H100_SMS)
                R = mp._radius(names)
                key = (dtype, names, grid.pb, grid.block, grid.num_warps)
                if key not in seen:
                    seen.add(key)
                    yield key + (R,)
        if dtype == torch.float32:
            # every tile shape in search mode too
            for planes, H, W in SHAPES:
                grid = mp._Grid(planes, H, W, 0, mp.FORWARD_MAX_BLOCK, sms=H100_SMS)
                key = (dtype, PAPER_CANDIDATES, grid.pb, grid.block, grid.num_warps)
                if key not in seen:
                    seen.add(key)
                    yield key + (3,)


def _backward_configs():
    seen = set()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for planes, H, W in SHAPES:
            for names in (MODES if (dtype == torch.float32 and W == 56) else [PAPER_CANDIDATES]):
                R = mp._radius(names)
                grid = mp._Grid(planes, H, W, R, mp.BACKWARD_MAX_BLOCK, sms=H100_SMS)
                key = (dtype, names, grid.pb, grid.block, grid.num_warps)
                if key not in seen:
                    seen.add(key)
                    yield key + (R,)


def _ids(cfg):
    dtype, names, pb, block, warps, _ = cfg
    mode = "search" if len(names) > 1 else names[0]
    return f"{TT[dtype]}-{mode}-pb{pb}-b{block}-w{warps}"


def _jobs():
    """Every (kernel, configuration, arch) to compile, as JSON-ready dicts keyed by an id."""
    jobs = []
    for arch in ARCHS:
        for cfg in _forward_configs():
            dtype, names, pb, block, warps, R = cfg
            jobs.append(dict(
                id=f"forward-sm{arch}-{_ids(cfg)}", kernel="_meta_pool_forward_kernel", arch=arch, num_warps=warps,
                pointers={"x_ptr": TT[dtype], "w_ptr": "fp32", "out_ptr": TT[dtype], "zh_ptr": "fp32", "zw_ptr": "fp32"},
                ints=["H", "W", "rows_per_prog", "n_planes"],
                constexprs=dict(mp._flags(names), WRITE_LOCAL=any(n != "strip" for n in names),
                                STRIP_SUMS="strip" in names, R=R, RING=mp._ring(R), PB=pb, BLOCK=block)))
        for cfg in _backward_configs():
            dtype, names, pb, block, warps, R = cfg
            t = TT[dtype]
            jobs.append(dict(
                id=f"backward-sm{arch}-{_ids(cfg)}", kernel="_meta_pool_backward_kernel", arch=arch, num_warps=warps,
                pointers={"g_ptr": t, "x_ptr": t, "w_ptr": "fp32", "gx_ptr": t, "alpha_part_ptr": "fp32",
                          "scratch_ptr": "fp32", "sh_ptr": "fp32", "sw_ptr": "fp32", "gzh_ptr": "fp32",
                          "gzw_ptr": "fp32", "strip_w_ptr": "fp32"},
                ints=["H", "W", "rows_per_prog", "n_planes", "n_tiles", "n_chunks"],
                constexprs=dict(mp._flags(names), HAS_STRIP="strip" in names, R=R, RING=mp._ring(R), PB=pb, BLOCK=block)))
        for dtype in TT:
            planes, H, W = SHAPES[1]
            grid = mp._Grid(planes, H, W, 0, mp.FORWARD_MAX_BLOCK, sms=H100_SMS)
            jobs.append(dict(
                id=f"strip_reduce-sm{arch}-{TT[dtype]}-pb{grid.pb}-b{grid.block}-w{grid.num_warps}",
                kernel="_strip_reduce_kernel", arch=arch, num_warps=grid.num_warps,
                pointers={"g_ptr": TT[dtype], "x_ptr": TT[dtype], "sh_ptr": "fp32", "sw_ptr": "fp32",
                          "rows_out_ptr": "fp32", "cols_out_ptr": "fp32"},
                ints=["H", "W", "rows_per_prog", "n_planes"], constexprs=dict(PB=grid.pb, BLOCK=grid.block)))
    return jobs


JOBS = _jobs()


@pytest.fixture(scope="module")
def compiled():
    """Compile every job in one child process with the interpreter off."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    worker = Path(__file__).with_name("aot_compile.py")
    res = subprocess.run([sys.executable, str(worker)], input=json.dumps(JOBS), capture_output=True, text=True,
                         env=env, timeout=1800)
    assert res.returncode == 0, f"AOT compile worker failed:\n{res.stderr[-5000:]}"
    return {r["id"]: r for r in json.loads(res.stdout)}


@pytest.mark.parametrize("job", JOBS, ids=[j["id"] for j in JOBS])
def test_kernel_compiles(compiled, job):
    r = compiled[job["id"]]
    assert "error" not in r, f"{job['kernel']} did not compile for sm_{job['arch']}:\n{r.get('error')}"
    print(f"\n{job['kernel']} sm_{job['arch']} {job['id']}: {r['registers']} registers, "
          f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
    assert 0 < r["registers"] <= 255


