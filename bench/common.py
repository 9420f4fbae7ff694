"""Machinery shared by the suites: the environment record, timing, byte floors, result files.

Timing follows one recipe on every device (``time_events``): one call, a short estimate, warm-up
calls, then per-call start/end events, and the median with the 20th and 80th percentiles. On CUDA
the events are CUDA events and, for the op suites, the L2 cache is flushed before every call (as
``triton.testing.do_bench`` does); on the CPU the events read the host clock. Keeping one code path
lets the CPU runs and the smoke test exercise the logic the GPU runs depend on.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

SCHEMA = 1
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCOPES = ("smoke", "quick", "default", "full")


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"

# MobileNetV2-1.0 at 224 px: the distinct (C, H, W) of the 17 block outputs, where the enhancers run.
# tests/test_bench_smoke.py checks this against the model itself.
MBV2_FEATURE_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (16, 112, 112), (24, 56, 56), (32, 28, 28), (64, 14, 14), (96, 14, 14), (160, 7, 7), (320, 7, 7),
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# Environment.
# ---------------------------------------------------------------------------------------------
def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_name(device: str, threads: Optional[int] = None) -> str:
    """How results name a device: the GPU's name, or the CPU model with the thread count used."""
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    threads = torch.get_num_threads() if threads is None else threads
    return f"{cpu_model()} ({threads} thread{'s' if threads != 1 else ''})"


def cuda_properties() -> Dict[str, Any]:
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "multiprocessors": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2 ** 30, 1),
        "l2_cache_mib": round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1),
        "driver_cuda": torch.version.cuda,
    }


def l2_cache_bytes(device: str) -> int:
    if device != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0))


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def command_line() -> str:
    """The command as one could retype it, with the BENCH_* settings `make bench` passes as variables."""
    argv = list(sys.argv)
    if argv and argv[0].replace("\\", "/").endswith(("pytest/__main__.py", "/pytest", "py.test")):
        argv = ["python", "-m", "pytest"] + argv[1:]
    elif argv and argv[0].endswith(".py"):
        argv = ["python", os.path.relpath(argv[0], ROOT) if os.path.isabs(argv[0]) else argv[0]] + argv[1:]
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_") and v]
    return " ".join(settings + argv)


def environment(device: str, scope: str, command: Optional[str] = None) -> Dict[str, Any]:
    """Everything a result file needs to say where and how its rows were measured."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # the CPU suites do not need Triton
        triton_version = None
    import metapool_kernels
    env: Dict[str, Any] = {
        "device": device,
        "device_name": device_name(device),
        "host_cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "metapool_kernels": metapool_kernels.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else command_line(),
        "scope": scope,
        "bench_env": {k: v for k, v in os.environ.items() if k.startswith(("BENCH_", "METAPOOL_", "TRITON_"))},
        "loadavg_start": _loadavg(),
    }
    if device == "cuda":
        env["cuda"] = cuda_properties()
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return env


def parse_threads(spec: str) -> List[int]:
    """CPU thread counts from "1", "all", "0" (torch's default) or a comma-separated list of them."""
    counts = []
    for part in str(spec).replace(" ", "").split(","):
        if part == "all":
            n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        elif part.isdigit():
            n = int(part) or torch.get_num_threads()
        else:
            raise ValueError(f"BENCH_THREADS: {part!r} is not a thread count (a number, 'all' or 0) in {spec!r}")
        if n not in counts:
            counts.append(n)
    if not counts:
        raise ValueError(f"BENCH_THREADS: no thread count in {spec!r}")
    return counts


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimingConfig:
    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_reps: int
    flush_l2: bool = False
    estimate_calls: int = 3

    def describe(self) -> str:
        return (f"warm-up {self.warmup_ms:g} ms, repeats for {self.rep_ms:g} ms "
                f"({self.min_reps}-{self.max_reps} calls)" + (", L2 flushed before each call" if self.flush_l2 else ""))


ONCE = TimingConfig(warmup_ms=0, rep_ms=0, min_reps=1, max_reps=1)

# Per suite and device. Op-level runs are short and many; model-level runs are long and few, so
# they get a floor on the number of calls rather than a long time budget.
TIMING: Dict[Tuple[str, str], TimingConfig] = {
    ("ops", "cuda"): TimingConfig(warmup_ms=10, rep_ms=50, min_reps=10, max_reps=500, flush_l2=True),
    # Short on the CPU: 200 cases per thread count, each with four variants and a compilation.
    ("ops", "cpu"): TimingConfig(warmup_ms=5, rep_ms=40, min_reps=5, max_reps=100, estimate_calls=1),
    ("model", "cuda"): TimingConfig(warmup_ms=100, rep_ms=300, min_reps=10, max_reps=200),
    ("model", "cpu"): TimingConfig(warmup_ms=300, rep_ms=600, min_reps=3, max_reps=50, estimate_calls=1),
    ("train", "cuda"): TimingConfig(warmup_ms=300, rep_ms=1000, min_reps=5, max_reps=50),
    ("train", "cpu"): TimingConfig(warmup_ms=300, rep_ms=1500, min_reps=3, max_reps=20, estimate_calls=1),
}


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    method: str

    def as_row(self, prefix: str = "") -> Dict[str, Any]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


class HostEvent:
    """The host clock behind the interface of ``torch.cuda.Event``, for CPU timing."""

    def __init__(self, enable_timing: bool = True):
        self.t: Optional[float] = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.t - self.t) * 1e3


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (q in [0, 1])."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_events(fn: Callable[[], Any], cfg: TimingConfig, *, event: Callable[..., Any] = HostEvent,
                synchronize: Callable[[], None] = lambda: None, flush: Optional[Callable[[], None]] = None,
                label: str = "host clock") -> Timing:
    """Median of per-call times between start and end events (see the module docstring)."""
    flush = flush or (lambda: None)
    fn()
    synchronize()
    if cfg.max_reps <= 1:
        n_warmup, n_rep = 0, 1
    else:
        # Estimate with flushes included, as do_bench does: it only sizes the loops below.
        start, end = event(enable_timing=True), event(enable_timing=True)
        calls = max(1, cfg.estimate_calls)
        start.record()
        for _ in range(calls):
            flush()
            fn()
        end.record()
        synchronize()
        estimate = max(start.elapsed_time(end) / calls, 1e-4)
        n_warmup = min(cfg.max_reps, int(cfg.warmup_ms / estimate))
        n_rep = max(cfg.min_reps, min(cfg.max_reps, int(cfg.rep_ms / estimate)))
    for _ in range(n_warmup):
        fn()
    starts = [event(enable_timing=True) for _ in range(n_rep)]
    ends = [event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        flush()
        starts[i].record()
        fn()
        ends[i].record()
    synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return Timing(median_ms=percentile(times, 0.5), p20_ms=percentile(times, 0.2), p80_ms=percentile(times, 0.8),
                  reps=n_rep, method=f"{label}; {cfg.describe()}; median of {n_rep}")


_FLUSH_BUFFERS: Dict[str, torch.Tensor] = {}


def l2_flusher(device: str) -> Callable[[], None]:
    """Overwrites a buffer several times the L2 size, so no call finds its inputs cached."""
    if device not in _FLUSH_BUFFERS:
        nbytes = max(256 * 2 ** 20, 4 * l2_cache_bytes(device))
        _FLUSH_BUFFERS[device] = torch.empty(nbytes, dtype=torch.int8, device=device)
    buf = _FLUSH_BUFFERS[device]
    return buf.zero_


def measure(fn: Callable[[], Any], device: str, cfg: TimingConfig) -> Timing:
    if device == "cuda":
        return time_events(fn, cfg, event=torch.cuda.Event, synchronize=torch.cuda.synchronize,
                           flush=l2_flusher(device) if cfg.flush_l2 else None, label="CUDA events")
    return time_events(fn, cfg, label=f"host clock, {torch.get_num_threads()} threads")


def first_call_seconds(fn: Callable[[], Any], device: str) -> float:
    """Wall time of one call, synchronised: what compilation costs on first use."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Bandwidth.
# ---------------------------------------------------------------------------------------------
COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


def copy_bandwidth(device: str, nbytes: Optional[int] = None, cfg: Optional[TimingConfig] = None) -> Dict[str, Any]:
    """GB/s of ``y.copy_(x)`` on one large float32 tensor, counting the bytes read plus written."""
    nbytes = COPY_BYTES[device] if nbytes is None else nbytes
    n = max(1, nbytes // 4)
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    cfg = cfg or (TimingConfig(warmup_ms=50, rep_ms=400, min_reps=10, max_reps=200) if device == "cuda"
                  else TimingConfig(warmup_ms=100, rep_ms=800, min_reps=5, max_reps=50))
    t = measure(lambda: y.copy_(x), device, cfg)
    moved = 2 * n * 4
    return {"device": device, "bytes": n * 4, "moved_bytes": moved, "median_ms": t.median_ms,
            "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "gbps": moved / (t.median_ms * 1e-3) / 1e9,
            "method": t.method}


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms and ms > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# Byte floors (docs/DESIGN.md, §2 Budgets).
# ---------------------------------------------------------------------------------------------
def floor_factor(op: str, mode: str) -> Tuple[int, str]:
    """(k, why): the op must move at least k·|x| bytes.

    op is "search" (all candidates, strip among them), one candidate name, or "strip_gate" (the C++
    gating op alone, its gate logits given); mode "fwd" or "fwd+bwd".
    Forward: the strip gate needs the strip means before it can scale x, so x is read twice and
    out written once (3|x|); a local op reads x and writes out (2|x|); skip moves nothing.
    Backward: read grad_out and x, write grad_x (3|x|); avg needs no x (2|x|); skip passes grad_out on.
    """
    if op == "skip":
        fwd, bwd = (0, "returns x itself"), (0, "grad_out passes through")
    elif op in ("search", "strip"):
        fwd, bwd = (3, "read x twice, write out"), (3, "read grad_out and x, write grad_x")
    elif op.startswith("max") or op == "strip_gate":
        fwd, bwd = (2, "read x, write out"), (3, "read grad_out and x, write grad_x")
    elif op.startswith("avg"):
        fwd, bwd = (2, "read x, write out"), (2, "read grad_out, write grad_x")
    else:
        raise ValueError(f"no byte floor for op {op!r}")
    if mode == "fwd":
        return fwd[0], f"{fwd[0]}|x|: {fwd[1]}"
    if mode == "fwd+bwd":
        k = fwd[0] + bwd[0]
        return k, f"{k}|x| = fwd {fwd[0]}|x| ({fwd[1]}) + bwd {bwd[0]}|x| ({bwd[1]})"
    raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Result files.
# ---------------------------------------------------------------------------------------------
class Results:
    """The rows of one run and the environment they were measured in."""

    def __init__(self, env: Dict[str, Any]):
        self.env = env
        self.copy: Dict[str, Dict[str, Any]] = {}   # device name -> copy_bandwidth()
        self.rows: List[Dict[str, Any]] = []

    def add(self, rows: Iterable[Dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def sample_load(self) -> None:
        """Keep the highest 1-minute load average seen so far (sampled before each test)."""
        load = _loadavg()
        if load and load[0] > (self.env.get("loadavg_peak") or [0.0])[0]:
            self.env["loadavg_peak"] = load

    def to_json(self) -> Dict[str, Any]:
        env = dict(self.env)
        env["loadavg_end"] = _loadavg()
        return {"schema": SCHEMA, "env": env, "copy": self.copy, "rows": self.rows}

    def path_in(self, directory: Path) -> Path:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        return Path(directory) / f"{slugify(self.env['device_name'])}-{stamp}.json"

    def write(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = self.path_in(directory)
        k = 1
        while path.exists():  # two runs in one second (chunked runs) must not overwrite each other
            path = path.with_name(path.stem.rsplit("~", 1)[0] + f"~{k}.json")
            k += 1
        data = self.to_json()
        rows = data.pop("rows")
        head = json.dumps(data, indent=1, default=_json_default)
        # One row per line: compact, and a re-run diffs row by row.
        body = ",\n".join(json.dumps(r, default=_json_default, separators=(",", ":")) for r in rows)
        path.write_text(head[:-2] + ',\n "rows": [\n' + body + "\n ]\n}\n")
        return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    if isinstance(obj, (torch.Size, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def load_results(directory: Path) -> List[Dict[str, Any]]:
    """Every result file in ``directory``, oldest first, each with its file name under "file"."""
    runs = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable result file: {e}") from e
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or "rows" not in data:
            continue  # not ours (e.g. a pytest-benchmark JSON saved beside them)
        data["file"] = path.name
        runs.append(data)
    runs.sort(key=lambda r: r["env"].get("date", ""))
    return runs
