"""Compile Triton kernels ahead of time for real GPU targets; used by test_aot_compile.py.

Reads a JSON list of jobs on stdin, writes a JSON list of results on stdout. Runs with
TRITON_INTERPRET=0 so the kernels are JIT functions that Triton's compiler accepts.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from metapool_kernels.ops import meta_pool as mp


def compile_kernel(fn, pointers: dict, ints: list, constexprs: dict, num_warps: int, arch: int):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in ints:
            signature[name] = "i32"
        else:
            raise ValueError(f"no type for argument {name}")
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def resources(kernel, arch: int):
    """(registers, spill store bytes, spill load bytes) from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(ptx), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return regs, int(spills.group(1)), int(spills.group(2))


def main() -> None:
    jobs = json.load(sys.stdin)
    results = []
    for job in jobs:
        try:
            fn = getattr(mp, job["kernel"])
            kernel = compile_kernel(fn, job["pointers"], job["ints"], job["constexprs"], job["num_warps"], job["arch"])
            regs, st, ld = resources(kernel, job["arch"])
            results.append(dict(id=job["id"], registers=regs, spill_stores=st, spill_loads=ld))
        except Exception:  # reported per job, so one bad configuration does not hide the others
            results.append(dict(id=job["id"], error=traceback.format_exc()))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
