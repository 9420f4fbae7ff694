"""pytest plumbing of the bench suites: options, case parametrisation, and one result file per run.

Options (each also read from an environment variable, which is how `make bench` passes them):
  --bench-scope    smoke | quick | default | full   (BENCH_SCOPE, default "default")
  --bench-device   auto | cpu | cuda                (BENCH_DEVICE, default "auto": CUDA when present)
  --bench-threads  CPU thread counts, comma-separated (BENCH_THREADS, default "1,all"): a number,
                   "all" (every core this process may use) or 0 (torch's default); with several,
                   every CPU test runs once per count (ids end in -t1, -t2, ...)
  --bench-out      folder for the result JSON       (BENCH_OUT, default bench/results)
  --bench-genotype genotype JSON for the derived rows (BENCH_GENOTYPE; default cases.DERIVED_GENOTYPE)
  --bench-compile-backend  torch.compile backend    (BENCH_COMPILE_BACKEND, default "inductor")
  --bench-deadline seconds after which the remaining cases are skipped, the profile suite still running
                   (BENCH_DEADLINE, default 0: none); the skipped test ids are recorded in the result file
pytest-benchmark's --benchmark-disable is honoured: every variant runs once, untimed, nothing is written.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

import pytest
import torch

from .cases import (BenchError, DEPLOY_RUNTIMES, cpu_model_variants, model_variants, op_cases, strip_gate_cases,
                    TRAIN_VARIANTS)
from .common import (ONCE, RESULTS_DIR, SCOPES, TIMING, Results, TimingConfig, copy_bandwidth, device_name,
                     environment, parse_threads)

# Tests whose rows are CPU rows whatever the main device is; with several thread counts they run once per count.
CPU_ONLY_PARAMS = ("strip_gate_case", "cpu_model_variant", "deploy_runtime", "cpu_profile_goal")


def pytest_addoption(parser):
    g = parser.getgroup("bench", "metapool_kernels benchmarks")
    g.addoption("--bench-scope", default=os.environ.get("BENCH_SCOPE") or "default", choices=SCOPES,
                help="how much of the matrix to run (default: %(default)s)")
    g.addoption("--bench-device", default=os.environ.get("BENCH_DEVICE") or "auto", choices=("auto", "cpu", "cuda"))
    # One thread and every core by default: the single-thread rows are the reproducible ones on a
    # shared machine, where a multi-threaded run also measures the neighbours (see README.md).
    g.addoption("--bench-threads", default=os.environ.get("BENCH_THREADS") or "1,all",
                help="CPU thread counts, e.g. 1 | all | 0 (torch's default) | 1,all (default %(default)s)")
    g.addoption("--bench-out", default=os.environ.get("BENCH_OUT") or str(RESULTS_DIR))
    g.addoption("--bench-genotype", default=os.environ.get("BENCH_GENOTYPE") or None,
                help="genotype JSON (metapool_kernels.models.save_genotype) for the derived-network rows")
    g.addoption("--bench-compile-backend", default=os.environ.get("BENCH_COMPILE_BACKEND") or "inductor")
    g.addoption("--bench-deadline", type=float, default=float(os.environ.get("BENCH_DEADLINE") or 0),
                help="seconds after which the remaining cases are skipped (the profile suite still runs); "
                     "0: no limit")


class BenchRun:
    """Settings of this run, the rows measured so far, and the copy bandwidth per device."""

    def __init__(self, config):
        self.scope: str = config.getoption("bench_scope")
        want = config.getoption("bench_device")
        if want == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("--bench-device=cuda but torch sees no CUDA device")
        self.device: str = "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"
        self.started = time.monotonic()
        self.deadline_s: float = config.getoption("bench_deadline")
        self.thread_counts: List[int] = parse_threads(config.getoption("bench_threads"))
        torch.set_num_threads(self.thread_counts[0])
        if self.device == "cuda":
            # Model latency with cuDNN's own algorithm choice, as a deployment would run.
            torch.backends.cudnn.benchmark = True
        self.out = Path(config.getoption("bench_out"))
        self.compile_backend: str = config.getoption("bench_compile_backend")
        self.disabled: bool = bool(config.getoption("benchmark_disable", default=False))
        genotype_path = config.getoption("bench_genotype")
        self.genotype = None
        if genotype_path:
            from metapool_kernels.models import check_genotype, load_genotype
            self.genotype = check_genotype(load_genotype(genotype_path))
        self.results = Results(environment(self.device, self.scope))
        self.results.env["thread_counts"] = self.thread_counts
        if self.deadline_s:
            self.results.env["deadline_s"] = self.deadline_s
            self.results.env["skipped_at_deadline"] = []
        if genotype_path:
            self.results.env["genotype_file"] = str(genotype_path)
        self.results.env["benchmark_disabled"] = self.disabled

    def timing(self, suite: str, device: Optional[str] = None) -> TimingConfig:
        return ONCE if self.disabled else TIMING[(suite, device or self.device)]

    def copy_gbps(self, device: Optional[str] = None) -> Optional[float]:
        """The device's copy bandwidth, measured once per run, before the first row that needs it."""
        device = device or self.device
        name = device_name(device)
        if name not in self.results.copy:
            if self.disabled:
                return None
            self.results.copy[name] = copy_bandwidth(device)
        return self.results.copy[name]["gbps"]

    def run(self, suite: str, case_id: str, fn: Callable[..., Any], *args, **kwargs):
        """Run a case, keep its rows (failed variants included), fail the test if any variant failed."""
        try:
            rows = fn(*args, **kwargs)
        except BenchError as e:
            self.results.add(e.rows)
            pytest.fail(f"{case_id}: {e}", pytrace=False)
        except Exception as e:
            self.results.add([{"suite": suite, "case": case_id, "device": self.device,
                               "device_name": device_name(self.device), "error": f"{type(e).__name__}: {e}"[:400]}])
            raise
        self.results.add(rows)
        return rows


def pytest_configure(config):
    config._bench_run = None


def _run_state(config) -> BenchRun:
    if config._bench_run is None:
        config._bench_run = BenchRun(config)
    return config._bench_run


@pytest.fixture(scope="session")
def bench(request) -> BenchRun:
    return _run_state(request.config)


@pytest.fixture(autouse=True)
def bench_threads(request):
    """torch's CPU thread count for this test: its parameter when the run has several counts."""
    s = _run_state(request.config)
    if (s.deadline_s and time.monotonic() - s.started > s.deadline_s
            and "cpu_profile_goal" not in request.fixturenames):
        s.results.env["skipped_at_deadline"].append(request.node.nodeid)
        pytest.skip(f"past the run's time limit of {s.deadline_s:g} s (--bench-deadline)")
    n = getattr(request, "param", None)
    if n is not None:
        torch.set_num_threads(n)
    s.results.sample_load()
    return torch.get_num_threads()


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if not any(n in names for n in ("op_case", "model_variant", "train_key", "cpu_profile_goal") + CPU_ONLY_PARAMS):
        return
    s = _run_state(metafunc.config)
    if len(s.thread_counts) > 1 and (s.device == "cpu" or any(n in names for n in CPU_ONLY_PARAMS)):
        # First, so it varies slowest: every case at the first count, then every case at the next.
        metafunc.parametrize("bench_threads", s.thread_counts, ids=[f"t{n}" for n in s.thread_counts],
                             indirect=True)
    if "op_case" in names:
        cases = op_cases(s.device, s.scope)
        metafunc.parametrize("op_case", cases, ids=[c.id for c in cases])
    if "model_variant" in names:
        variants = (cpu_model_variants(s.genotype) if s.device == "cpu" and s.scope != "full"
                    else model_variants(s.genotype))
        metafunc.parametrize("model_variant", variants, ids=[v.key for v in variants])
    if "cpu_model_variant" in names:
        variants = cpu_model_variants(s.genotype)
        metafunc.parametrize("cpu_model_variant", variants, ids=[v.key for v in variants])
    if "cpu_profile_goal" in names:
        from .goals import goal_keys
        metafunc.parametrize("cpu_profile_goal", goal_keys("cpu"))
    if "train_key" in names:
        metafunc.parametrize("train_key", [k for k, _ in TRAIN_VARIANTS])
    if "deploy_runtime" in names:
        metafunc.parametrize("deploy_runtime", [k for k, _ in DEPLOY_RUNTIMES])
    if "strip_gate_case" in names:
        cases = strip_gate_cases(s.scope)
        metafunc.parametrize("strip_gate_case", cases,
                             ids=[f"{m}-{d}-b{sh[0]}-{sh[1]}x{sh[2]}x{sh[3]}" for sh, d, m in cases])


def pytest_sessionfinish(session, exitstatus):
    s: Optional[BenchRun] = getattr(session.config, "_bench_run", None)
    if s is None or not s.results.rows or s.disabled:
        return
    s.written = s.results.write(s.out)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    s: Optional[BenchRun] = getattr(config, "_bench_run", None)
    if s is None:
        return
    path = getattr(s, "written", None)
    errors = sum(1 for r in s.results.rows if r.get("error"))
    if path is not None:
        terminalreporter.write_line(f"bench: {len(s.results.rows)} rows ({errors} failed) -> {path}; "
                                    f"render with `python -m bench.report`")
    elif s.disabled:
        terminalreporter.write_line("bench: --benchmark-disable, nothing timed or written")
