"""Build metapool_kernels and its extension metapool_kernels._C.

The CPU kernels are always built. The CUDA kernels are built whenever a CUDA toolkit is found
(even on a machine without a GPU, so nvcc checks them), for the architectures in
TORCH_CUDA_ARCH_LIST (default: 8.0 and 9.0), with PTX of the newest one embedded so that newer
GPUs JIT-compile it. METAPOOL_NO_CUDA=1 turns them off.
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def source_hash() -> str:
    """Hash of every file under csrc/: baked into the binary so a stale build is detected."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, ROOT).encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()[:16]


def is_toolkit(path) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The folder that really holds bin/nvcc and include/.

    An `nvcc` on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc), which makes torch guess
    CUDA_HOME=/usr/local. Ask nvcc itself where it lives instead (`--dryrun` prints its TOP).
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if is_toolkit(candidate):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu", "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if "TOP=" in line:
                    top = os.path.realpath(line.split("TOP=", 1)[1].strip().strip('"'))
                    if is_toolkit(top):
                        return top
        except (OSError, subprocess.SubprocessError):
            pass
        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if is_toolkit(guess):
            return guess
    for guess in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if is_toolkit(guess):
            return guess
    return None


def with_ptx(arch_list: str) -> str:
    """The arch list with PTX of its newest architecture embedded ("+PTX"): a newer GPU than any
    listed JIT-compiles that PTX instead of failing with "no kernel image is available"."""
    archs = [a.strip() for a in arch_list.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    if not archs or any(a.endswith("+PTX") for a in archs):
        return ";".join(archs)
    newest = max(range(len(archs)), key=lambda i: float(re.match(r"[0-9.]*", archs[i]).group() or 0))
    archs[newest] += "+PTX"
    return ";".join(archs)


def want_cuda() -> bool:
    return os.environ.get("METAPOOL_NO_CUDA", "0") not in ("1", "true", "yes")


CUDA_HOME = find_cuda_home() if want_cuda() else None
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ["TORCH_CUDA_ARCH_LIST"] = with_ptx(os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))

TORCH_MISSING = """
metapool_kernels compiles its C++ extension against the torch of the environment it is installed
into, and this build cannot import torch ({error}). pip builds packages in an isolated environment
by default, which has no torch: install torch first (https://pytorch.org/get-started/), then install
this package with `pip install --no-build-isolation <path or git URL>` (add `-e` for a checkout you
edit), which builds it against that torch.
"""

try:
    import torch  # noqa: E402
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402
except ImportError as e:
    raise SystemExit(TORCH_MISSING.format(error=e)) from None


def cpu_vector_flags():
    """Compile the CPU kernels for the vector units of the machine that builds them (the package is
    built where it runs, like -march=native): AVX2 + FMA where the CPU has them, ATen's portable
    vectors otherwise. METAPOOL_CPU_ISA=default forces the portable build."""
    isa = os.environ.get("METAPOOL_CPU_ISA", "auto").strip().lower()
    if isa == "default":
        return []
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if isa == "avx2" or {"avx2", "fma", "f16c"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def openmp_link_args():
    """Link the OpenMP runtime torch itself loads, so that both share one thread pool and
    torch.set_num_threads governs this library's loops too; the compiler's own libgomp otherwise."""
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    own = sorted(glob.glob(os.path.join(torch_lib, "libgomp*.so*")))
    return [own[0]] if own else ["-fopenmp"]


def extension():
    # The build information goes into a generated header that metapool.cpp alone includes, so an
    # edit to one kernel recompiles that kernel and metapool.cpp, not every file.
    info_dir = os.path.join(ROOT, "build", "generated")
    os.makedirs(info_dir, exist_ok=True)
    info = (f'#define METAPOOL_SOURCE_HASH "{source_hash()}"\n'
            f'#define METAPOOL_TORCH_VERSION "{torch.__version__}"\n')
    info_path = os.path.join(info_dir, "metapool_build_info.h")
    if not os.path.exists(info_path) or open(info_path).read() != info:
        with open(info_path, "w") as f:
            f.write(info)
    defines = []
    sources = [os.path.join("csrc", "metapool.cpp")] + sorted(
        glob.glob(os.path.join("csrc", "autograd", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fopenmp: ATen's at::parallel_for is an inline template, so it runs on the threads of torch's
    # OpenMP pool only if this library is compiled with OpenMP; without it every loop is serial.
    # -Wno-unknown-pragmas: torch's vector headers carry other compilers' `#pragma unroll`.
    cxx = ["-O3", "-Wall", "-Wno-unknown-pragmas", "-fopenmp"] + cpu_vector_flags()  # the C++ standard is torch.utils.cpp_extension's
    if os.environ.get("METAPOOL_WERROR", "0") == "1":
        cxx.append("-Werror")
    link = openmp_link_args()
    if CUDA_HOME:
        print(f"metapool_kernels: building CUDA kernels with {CUDA_HOME}/bin/nvcc "
              f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        return CUDAExtension(
            "metapool_kernels._C",
            sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
            define_macros=defines + [("METAPOOL_WITH_CUDA", None)],
            include_dirs=[info_dir],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=link,
        )
    reason = "METAPOOL_NO_CUDA is set" if not want_cuda() else "no CUDA toolkit found"
    print(f"metapool_kernels: building CPU kernels only ({reason})")
    return CppExtension("metapool_kernels._C", sources, define_macros=defines, include_dirs=[info_dir],
                        extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    name="metapool_kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for Meta-Pooling (learnable receptive fields) and the PMPL trainer",
    packages=find_packages(include=["metapool_kernels", "metapool_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    # Only the Triton kernels for CUDA tensors import triton (on first use), and triton ships Linux
    # wheels only. "triton" is the extra's older name.
    extras_require={"cuda": ['triton; platform_system == "Linux"'],
                    "triton": ['triton; platform_system == "Linux"'],
                    "train": ["torchvision", "tqdm", "matplotlib", "timm"],
                    "export": ["onnx", "onnxscript", "onnxruntime"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
