"""Ahead-of-time compiles of the Triton kernels exactly as the launchers launch them, for a GPU
target, without a GPU; and what the compiled code says about speed.

    python -m bench.aot < jobs.json > results.json      # the compile worker (interpreter off)

A *launch* is captured by running the launchers of :mod:`metapool_kernels.ops.meta_pool_triton`
on fake CUDA tensors (``FakeTensorMode``) with the kernels replaced by recorders, under the GPU
launch layout of a given SM count: the kernel, its arguments, constexprs and warps are the real
ones. A *job* is a launch made JSON: pointer dtypes, integer arguments specialised the way Triton's
JIT specialises them under each kernel's ``do_not_specialize`` settings (1 → constexpr, multiples
of 16 → divisible by 16; tensors are 16-byte aligned), so the compiled code is the code a GPU
would run, and launches with equal :func:`compile_key` share one compile. The worker compiles each job with
``triton.compile`` for ``GPUTarget('cuda', arch, 32)`` and reports registers, spills, shared
memory (ptxas) and the global load/store instructions of the PTX with their widths.

Triton fixes interpreted-or-compiled when a kernel is defined, so the compiles run in a child
process with ``TRITON_INTERPRET=0`` (:func:`compile_jobs`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("_meta_pool_forward_kernel", "_meta_pool_backward_kernel", "_strip_reduce_kernel", "_strip_gate_kernel")
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# H100 SXM (sm_90): 132 SMs, per SM 64 K registers, 64 warps, 32 blocks, 228 KiB shared memory.
# Issue: 4 schedulers per SM, each one warp instruction per clock, at the 1.755 GHz boost clock;
# memory: 3.0 TB/s, what streaming kernels reach of the 3.35 TB/s HBM3 peak.
H100 = dict(sms=132, regs_per_sm=65536, max_warps=64, max_blocks=32, smem_per_sm=228 * 1024,
            smem_reserved_per_block=1024, hbm_bytes_per_s=3.0e12, issue_per_sm_per_s=4 * 1.755e9)


# ---------------------------------------------------------------------------------------------
# Capturing launches
# ---------------------------------------------------------------------------------------------
class _Recorder:
    def __init__(self, name: str, launches: List[Dict[str, Any]]):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            num_warps = kwargs.pop("num_warps")
            maxnreg = kwargs.pop("maxnreg", None)
            self.launches.append(dict(kernel=self.name, grid=tuple(int(g) for g in grid), args=list(args),
                                      constexprs=kwargs, num_warps=num_warps, maxnreg=maxnreg))
        return launch


@contextlib.contextmanager
def _fake_op(shape: Sequence[int], names: Sequence[str], dtype: torch.dtype, channels_last: bool, fixed: bool,
             sms: int):
    """The op's launchers on fake CUDA tensors under the GPU layout of ``sms`` SMs: yields the
    module, its real kernels by name (the caller may stand recorders in for them; they are put
    back after), and the op's inputs (x, π or None, the four gate parameters, candidates)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from metapool_kernels.ops import meta_pool_triton as mpt
    saved = {k: getattr(mpt, k) for k in KERNELS + ("_on_device",)}
    try:
        mpt._on_device = lambda t: contextlib.nullcontext()
        C = shape[1]
        with FakeTensorMode(), mpt.gpu_layout(sms):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.empty(tuple(shape), dtype=dtype, device="cuda").contiguous(memory_format=fmt)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            pi = None if fixed else torch.empty(len(names), dtype=acc, device="cuda")
            gates = [torch.empty(s, device="cuda") for s in ((C, C, 1), (C,), (C, C, 1), (C,))]
            yield mpt, {k: saved[k] for k in KERNELS}, (x, pi, *gates, ",".join(names))
    finally:
        for k, v in saved.items():
            setattr(mpt, k, v)


def capture_launches(shape: Sequence[int], names: Sequence[str], dtype: torch.dtype = torch.float32,
                     channels_last: bool = False, fixed: bool = False, sms: int = H100["sms"],
                     backward: bool = True) -> List[Dict[str, Any]]:
    """Every kernel launch of one forward (and backward) of the op on CUDA tensors of ``shape``."""
    launches: List[Dict[str, Any]] = []
    with _fake_op(shape, names, dtype, channels_last, fixed, sms) as (mpt, kernels, (x, pi, *gates, cands)):
        for k in KERNELS:
            setattr(mpt, k, _Recorder(k, launches))
        out, z_h, z_w = mpt.forward(x, pi, *gates, cands)
        if backward:
            mpt.backward(torch.empty_like(out), x, pi, *gates, z_h, z_w, cands)
    for launch in launches:
        fn = kernels[launch["kernel"]]
        names = [n for n in fn.arg_names if n not in launch["constexprs"]]
        launch["ints"] = {n: a for a, n in zip(launch["args"], names) if isinstance(a, int) and not isinstance(a, bool)}
        launch["args"] = [_describe_arg(a, n) for a, n in zip(launch["args"], names)]
        launch["constexprs"] = {k: _describe_constexpr(v) for k, v in launch["constexprs"].items()}
    return launches


# aten ops that only describe memory (views, allocations): they launch nothing on the device.
_NO_LAUNCH = {"view", "_unsafe_view", "reshape", "permute", "expand", "t", "transpose", "unsqueeze", "squeeze",
              "slice", "select", "as_strided", "alias", "detach", "empty", "empty_like", "empty_strided",
              "new_empty", "new_empty_strided", "lift_fresh", "sym_size", "sym_stride", "sym_numel",
              "sym_storage_offset", "is_contiguous", "split", "unbind", "device", "dim", "size", "stride",
              "numel"}


def count_launches(shape: Sequence[int], names: Sequence[str], dtype: torch.dtype = torch.float32,
                   channels_last: bool = False, fixed: bool = False, sms: int = H100["sms"]) -> Dict[str, Any]:
    """Device kernels one forward and one backward of the op launch on CUDA tensors of ``shape``:
    the Triton kernels plus every aten op that computes (each one CUDA kernel at least), with
    the ops by name. Fake tensors: nothing runs, no GPU is needed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: List[Any] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _NO_LAUNCH:
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    result: Dict[str, Any] = {}
    with _fake_op(shape, names, dtype, channels_last, fixed, sms) as (mpt, _, (x, pi, *gates, cands)):
        grad = torch.empty_like(x)
        for direction in ("forward", "backward"):
            ops = _Ops()
            for k in KERNELS:
                setattr(mpt, k, _Recorder(k, ops.ops))  # a Triton launch is one entry among the aten ops
            with ops:
                if direction == "forward":
                    out, z_h, z_w = mpt.forward(x, pi, *gates, cands)
                else:
                    mpt.backward(grad, x, pi, *gates, z_h, z_w, cands)
            kernels = [o if isinstance(o, str) else o["kernel"].strip("_") for o in ops.ops]
            result[direction] = dict(launches=len(kernels), kernels=kernels)
    return result


def _describe_arg(a, name: str):
    """A kernel argument as the JIT sees it: a pointer's dtype, or an integer with its
    specialisation under the kernels' do_not_specialize settings (Triton's rule: 1 becomes a
    constant, a multiple of 16 is marked divisible, unless the parameter opts out). The settings
    are read from the lists the kernels' decorator is built from, which the interpreter, where
    the kernels are plain functions, keeps too."""
    from metapool_kernels.ops import meta_pool_triton as mpt
    if isinstance(a, torch.Tensor):
        return {"pointer": TRITON_DTYPES[a.dtype]}
    if isinstance(a, bool) or not isinstance(a, int):
        raise TypeError(f"unexpected kernel argument {a!r}")
    ty = "i32" if -2**31 <= a < 2**31 else "i64"
    if name in mpt._RUNTIME_INTS:
        spec = [ty, None]
    elif a == 1:
        spec = ["constexpr", 1]
    else:
        spec = [ty, "D" if a % 16 == 0 and name not in mpt._MAYBE_UNIT_STRIDES else ""]
    return {"int": a, "spec": spec}


def compile_key(launch: Dict[str, Any]) -> str:
    """What Triton's JIT caches a compiled kernel by: the kernel, its constexprs, each argument's
    specialisation and the warps. Two launches with the same key share one compile."""
    args = [a.get("spec", a) for a in launch["args"]]
    return json.dumps([launch["kernel"], launch["constexprs"], args, launch["num_warps"], launch["maxnreg"]],
                      sort_keys=True)


def _describe_constexpr(v):
    import triton.language as tl
    if isinstance(v, tl.dtype):
        return {"dtype": str(v)}
    return v


def job(launch: Dict[str, Any], arch: int, job_id: str) -> Dict[str, Any]:
    keys = ("kernel", "args", "constexprs", "num_warps", "maxnreg")
    return dict(id=job_id, arch=arch, **{k: launch[k] for k in keys})


# ---------------------------------------------------------------------------------------------
# The worker: compile and inspect (runs with the interpreter off)
# ---------------------------------------------------------------------------------------------
def _compile(job: Dict[str, Any]):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from metapool_kernels.ops import meta_pool_triton as mpt
    fn = getattr(mpt, job["kernel"])
    dtypes = {str(t): t for t in (tl.float16, tl.bfloat16, tl.float32, tl.float64)}
    constexprs = {k: (dtypes[v["dtype"]] if isinstance(v, dict) else v) for k, v in job["constexprs"].items()}
    runtime = [n for n in fn.arg_names if n not in constexprs]
    if len(runtime) != len(job["args"]):
        raise ValueError(f"{job['kernel']} takes {len(runtime)} runtime arguments, the launch gave {len(job['args'])}")
    signature, attrs = {}, {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        arg = job["args"][runtime.index(name)]
        idx = (fn.arg_names.index(name),)
        if "pointer" in arg:
            signature[name] = "*" + arg["pointer"]
            attrs[idx] = [["tt.divisibility", 16]]  # the caching allocator aligns every tensor
        elif arg["spec"][0] == "constexpr":  # the JIT turned an integer 1 into a constant
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = arg["spec"][0]
            if arg["spec"][1] == "D":
                attrs[idx] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": job["num_warps"]}
    if job.get("maxnreg") is not None:
        options["maxnreg"] = job["maxnreg"]
    return triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=options)


def _ptxas(ptx: str, arch: int) -> Dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(path), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    smem = re.search(r"(\d+) bytes smem", res.stderr)
    return dict(registers=regs, spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                ptxas_smem=int(smem.group(1)) if smem else 0)


_MEMORY_OP = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)+)")
_ASYNC_COPY = re.compile(r"\bcp\.async\.\w+\.shared\.global(?:\.[\w:]+)*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def ptx_memory_ops(ptx: str) -> Dict[str, Dict[str, int]]:
    """Static count of global loads and stores in the PTX, by access width in bits."""
    counts: Dict[str, Counter] = {"ld": Counter(), "st": Counter()}
    for m in _MEMORY_OP.finditer(ptx):
        vec, bits = 1, 0
        for token in m.group(2).split(".")[1:]:
            if re.fullmatch(r"v\d", token):
                vec = int(token[1:])
            elif re.fullmatch(r"[bfus]\d+", token):
                bits = int(token[1:])
        counts[m.group(1)][str(vec * bits)] += 1
    # Loads the software pipeliner turned into asynchronous copies to shared memory (the next
    # rows' data fetched while the current row computes): their last operand is the size in bytes.
    for m in _ASYNC_COPY.finditer(ptx):
        counts["ld"][str(int(m.group(1), 0) * 8)] += 1
    return {op: dict(sorted(c.items(), key=lambda kv: int(kv[0]))) for op, c in counts.items()}


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin, from the nvdisasm that ships with Triton."""
    from triton.backends.nvidia.compiler import get_ptxas
    nvdisasm = Path(get_ptxas(90).path).with_name("nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    return res.stdout


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):", re.M)


def sass_loops(sass: str) -> List[Dict[str, int]]:
    """The loops of a kernel's SASS: each backward branch closes one, from its target label to the
    branch. Per loop: its instructions (NOPs excluded; one pass of the body) and its barriers
    (BAR.SYNC, one per shared-memory round trip of the block), innermost loops first."""
    lines = sass.splitlines()
    labels, instrs = {}, []  # label -> index of the next instruction; [(text)]
    for line in lines:
        m = _SASS_LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _SASS_LINE.search(line)
        if m:
            instrs.append(m.group(2))
    loops = []
    for end, text in enumerate(instrs):
        m = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", text)
        if m and labels.get(m.group(1), end + 1) <= end:
            body = instrs[labels[m.group(1)]:end + 1]
            loops.append(dict(start=labels[m.group(1)], end=end,
                              instructions=sum(1 for t in body if not t.startswith("NOP")),
                              barriers=sum(1 for t in body if "BAR.SYNC" in t)))
    innermost = [lp for lp in loops if not any(o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"]
                                               for o in loops)]
    return sorted(innermost, key=lambda lp: -lp["instructions"]) + [lp for lp in loops if lp not in innermost]


def compile_job(job: Dict[str, Any]) -> Dict[str, Any]:
    kernel = _compile(job)
    ptx = kernel.asm["ptx"]
    res = dict(id=job["id"], **_ptxas(ptx, job["arch"]))
    res["shared"] = int(getattr(kernel.metadata, "shared", 0))
    res.update(ptx_memory_ops(ptx))
    sass = disassemble(kernel.asm["cubin"])
    loops = sass_loops(sass)
    # The row loop: the innermost loop with the most instructions (each kernel has one row loop;
    # a loop the compiler adds, e.g. for a division, is smaller).
    res["sass_instructions"] = sum(1 for m in _SASS_LINE.finditer(sass) if not m.group(2).startswith("NOP"))
    res["loop_instructions"] = loops[0]["instructions"] if loops else 0
    res["loop_barriers"] = loops[0]["barriers"] if loops else 0
    # The largest loop with what it holds (for a kernel whose steps are an outer loop, the gates' GEMM).
    res["outer_loop_instructions"] = max((lp["instructions"] for lp in loops), default=0)
    return res


def main() -> None:
    results = []
    for j in json.load(sys.stdin):
        try:
            results.append(compile_job(j))
        except Exception:  # reported per job, so one bad configuration does not hide the others
            results.append(dict(id=j["id"], error=traceback.format_exc()))
    json.dump(results, sys.stdout)


def compile_jobs(jobs: Sequence[Dict[str, Any]], timeout: int = 1800) -> Dict[str, Dict[str, Any]]:
    """Compile ``jobs`` in a child process with the interpreter off; results by job id."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    res = subprocess.run([sys.executable, "-m", "bench.aot"], input=json.dumps(jobs), capture_output=True, text=True,
                         env=env, timeout=timeout, cwd=str(ROOT))
    if res.returncode != 0:
        raise RuntimeError(f"AOT compile worker failed:\n{res.stderr[-5000:]}")
    return {r["id"]: r for r in json.loads(res.stdout)}


# ---------------------------------------------------------------------------------------------
# What the compiled code predicts
# ---------------------------------------------------------------------------------------------
def occupancy(registers: int, shared: int, num_warps: int, gpu: Dict[str, Any] = H100) -> Dict[str, int]:
    """Resident blocks and warps per SM: registers are allocated per warp in units of 256."""
    regs_per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = gpu["regs_per_sm"] // (regs_per_warp * num_warps)
    by_warps = gpu["max_warps"] // num_warps
    by_smem = gpu["smem_per_sm"] // (shared + gpu["smem_reserved_per_block"]) if shared else gpu["max_blocks"]
    blocks = min(by_regs, by_warps, by_smem, gpu["max_blocks"])
    return dict(blocks=blocks, warps=blocks * num_warps)


if __name__ == "__main__":
    main()
