"""Smoke test of bench/: every helper the suites use runs once on tiny shapes (untimed), and the
report renders from a CPU run plus a synthetic CUDA run, so the GPU tables and goal checks are
exercised on machines without a GPU. The numbers here are not benchmarks."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import cases, common, report  # noqa: E402
from bench.common import ONCE, Results, TimingConfig  # noqa: E402

TINY = (1, 4, 6, 7)
SYNTH_GPU = "NVIDIA H100 80GB HBM3 (synthetic test data)"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_feature_shapes_are_mobilenet_v2s():
    from metapool_kernels.models import EnhancedBlock, mobilenet_v2
    model = mobilenet_v2("none").to("meta").eval()
    seen = []
    for m in model.modules():
        if isinstance(m, EnhancedBlock):
            m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape[1:])))
    model(torch.empty(1, 3, 224, 224, device="meta"))
    assert len(seen) == 17
    assert tuple(dict.fromkeys(seen)) == common.MBV2_FEATURE_SHAPES


def test_floors():
    assert common.floor_factor("search", "fwd")[0] == 3
    assert common.floor_factor("search", "fwd+bwd")[0] == 6
    assert common.floor_factor("avg5", "fwd")[0] == 2
    assert common.floor_factor("avg5", "fwd+bwd")[0] == 4
    assert common.floor_factor("max3", "fwd+bwd")[0] == 5
    assert common.floor_factor("skip", "fwd+bwd")[0] == 0
    assert common.floor_factor("strip_gate", "fwd+bwd")[0] == 5
    with pytest.raises(ValueError):
        common.floor_factor("avg3", "bwd")


def test_time_events_with_cuda_like_events():
    """The CUDA timing path with stand-in events: loop sizes, flush before every timed call."""
    log = []

    class FakeEvent(common.HostEvent):
        def record(self, stream=None):
            log.append("record")
            super().record()

    cfg = TimingConfig(warmup_ms=1, rep_ms=2, min_reps=4, max_reps=6, flush_l2=True)
    t = common.time_events(lambda: log.append("call"), cfg, event=FakeEvent, synchronize=lambda: log.append("sync"),
                           flush=lambda: log.append("flush"), label="fake events")
    assert 4 <= t.reps <= 6 and t.p20_ms <= t.median_ms <= t.p80_ms
    timed = log[log.index("sync", log.index("sync") + 1) + 1:]  # after the estimate
    calls = [i for i, e in enumerate(timed) if e == "call"]
    for i in calls[-t.reps:]:
        assert timed[i - 1] == "record" and timed[i - 2] == "flush"
    once = common.time_events(lambda: None, ONCE)
    assert once.reps == 1


def test_case_matrices():
    cuda = cases.op_cases("cuda", "default")
    assert len(cuda) == 9 * 7 * 3 * 2 * 2
    assert {c.shape[0] for c in cuda} == {1, 32, 128}
    assert {c.op for c in cuda} == {"search", *cases.FIXED_OPS}
    compiled = [c for c in cuda if c.compile]
    assert len(compiled) == 7 * 2 * 2 and all(c.op == "search" and c.shape[0] == 128 for c in compiled)
    cpu = cases.op_cases("cpu", "default")
    assert len(cpu) == (2 + len(cases.FIXED_OPS)) * 5 * 2 * 2
    uncompiled = {(c.op, c.mode, c.memory_format) for c in cpu if not c.compile}
    assert uncompiled == {("search", "fwd+bwd", "contiguous")}  # the costliest graph: channels_last only
    assert {c.shape[0] for c in cpu} == {1, 8} and {c.memory_format for c in cpu} == {"contiguous", "channels_last"}
    assert {c.shape[2] for c in cpu} == {112, 56, 28, 14, 7}
    assert {(c.op, c.mode) for c in cpu if c.op != "search"} == {(op, "fwd") for op in cases.FIXED_OPS}
    assert len({c.id for c in cuda}) == len(cuda) and len({c.id for c in cpu}) == len(cpu)
    assert len(cases.model_settings("cuda", "default")) == 4
    assert cases.train_setting("cuda", "default").batch == 128
    assert cases.rotation_count(10 ** 9, "cpu") == 2 and cases.rotation_count(1000, "cpu") == 8


@pytest.fixture(scope="module")
def cpu_rows():
    """Rows from one untimed call of each CPU suite helper on tiny inputs."""
    rows = []
    for op, mode in (("search", "fwd+bwd"), ("max5", "fwd"), ("skip", "fwd+bwd"), ("strip", "fwd+bwd")):
        rows += cases.run_op_case(cases.OpCase(op, mode, "float32", TINY), "cpu", ONCE, copy_gbps=10.0)
    rows += cases.run_op_case(cases.OpCase("search", "fwd", "bfloat16", TINY), "cpu", ONCE, copy_gbps=10.0)
    rows += cases.run_op_case(cases.OpCase("max5", "fwd", "float32", TINY, compile=True, memory_format="channels_last"),
                              "cpu", ONCE, copy_gbps=10.0, compile_backend="eager")
    rows += cases.run_strip_gate_case(TINY, "float32", "fwd+bwd", "cpu", ONCE, copy_gbps=10.0)
    variants = {v.key: v for v in cases.model_variants()}
    setting = [cases.ModelSetting(1, "float32", 32, "channels_last")]
    for key in ("skip", "derived-fused", "se", "skip-again"):
        rows += cases.run_model_case(variants[key], "cpu", setting, ONCE, macs_resolution=32)
    compiled = {v.key: v for v in cases.cpu_model_variants() if v.compiled}
    for key in ("skip-compiled", "derived-fused-compiled"):  # dynamo with its eager backend: no code generation
        rows += cases.run_model_case(compiled[key], "cpu", setting, ONCE, macs_resolution=None, compile_backend="eager")
    small = cases.train_setting("cpu", "smoke")
    for key in ("plain", "search-fused", "supernet-sgd-fused"):
        rows += cases.run_train_case(key, "cpu", small, ONCE)
    return rows


def test_cpu_helpers_produce_rows(cpu_rows):
    assert not [r for r in cpu_rows if r.get("error")]
    ops = [r for r in cpu_rows if r["suite"] == "ops"]
    assert {r["provider"] for r in ops} == {"fused", "eager", "compile"}
    cl = [r for r in ops if r["memory_format"] == "channels_last"]
    assert {r["provider"] for r in cl} == {"fused", "eager", "compile"} and all(r["op"] == "max5" for r in cl)
    search = next(r for r in ops if r["op"] == "search" and r["provider"] == "fused" and not r["repeat"]
                  and r["mode"] == "fwd+bwd")
    assert search["floor_bytes"] == 6 * search["x_bytes"] and search["rel_err"] < 1e-5
    assert search["pct_copy"] == pytest.approx(100 * search["gbps"] / 10.0)
    assert all(r["gbps"] is None for r in ops if r["op"] == "skip")
    derived = next(r for r in cpu_rows if r.get("variant") == "derived-fused")
    assert derived["params"] == 3_550_457 and derived["genotype"] == list(cases.DERIVED_GENOTYPE)
    assert {r["variant"] for r in cpu_rows if r["suite"] == "train"} == {"plain", "search-fused", "supernet-sgd-fused"}
    comp = next(r for r in cpu_rows if r.get("variant") == "derived-fused-compiled")
    assert comp["compiled"] and comp["baseline"] == "skip-compiled" and comp["compile_s"] > 0


def test_compile_variant_runs():
    """The torch.compile variant's plumbing, with dynamo's eager backend (no code generation)."""
    case = cases.OpCase("search", "fwd", "float32", TINY, compile=True)
    rows = cases.run_op_case(case, "cpu", ONCE, None, compile_backend="eager", repeat=False)
    comp = next(r for r in rows if r["provider"] == "compile")
    assert "error" not in comp and comp["compile_s"] > 0 and comp["rel_err"] < 1e-6


def test_triton_variant_runs():
    """The fused variant as it runs on CUDA: the Triton kernels (interpreted on CPU tensors)."""
    if torch.cuda.is_available():
        device, backend = "cuda", "auto"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device, backend = "cpu", "triton"
    else:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    case = cases.OpCase("search", "fwd", "float32", TINY)  # forward only: the interpreter is slow
    rows = cases.run_op_case(case, device, ONCE, None, fused_backend=backend, repeat=False)
    fused = next(r for r in rows if r["provider"] == "fused")
    assert "'triton'" in fused["impl"] and fused["rel_err"] < 1e-5


def synthetic_cuda_rows(cpu_rows):
    """The CPU rows re-labelled as a GPU run with made-up times, and the rows only GPU runs have
    (torch.compile, batch 128, bfloat16), so the report's GPU paths have data to render."""
    rows = []
    fused_ms = {"fwd": 0.010, "fwd+bwd": 0.030}
    for r in cpu_rows:
        r = dict(r, device="cuda", device_name=SYNTH_GPU, method="synthetic")
        if r["suite"] == "strip_gate":
            continue  # CPU-only suite
        if r["suite"] == "ops":
            if r["provider"] == "compile" or r.get("memory_format") == "channels_last":
                continue  # CPU-only rows; the GPU's compile rows are made below
            for batch in (1, 128):
                s = dict(r, shape=[batch] + r["shape"][1:], batch=batch, x_bytes=r["x_bytes"] * batch,
                         floor_bytes=r["floor_bytes"] * batch)
                ms = fused_ms[r["mode"]] * batch * {"fused": 1.0, "eager": 6.0}[r["provider"]] * (1.02 if r["repeat"] else 1)
                s.update(median_ms=ms, p20_ms=ms * 0.98, p80_ms=ms * 1.02)
                if s["floor_factor"]:
                    s["gbps"] = s["floor_bytes"] / ms / 1e6
                    s["pct_copy"] = 80.0 if batch == 128 else 5.0
                rows.append(s)
                if r["provider"] == "fused" and not r["repeat"] and r["op"] == "search" and batch == 128:
                    rows.append(dict(s, provider="compile", impl="torch.compile(...)", median_ms=ms * 1.5,
                                     compile_s=12.0))
        elif r["suite"] == "model":
            if r.get("compiled"):
                continue
            for batch in (1, 128):
                for dtype in ("float32", "bfloat16"):
                    ms = 5.0 * batch * (1.03 if r["variant"] == "derived-fused" else 1.4 if r["variant"] == "se" else 1.0)
                    rows.append(dict(r, batch=batch, dtype=dtype, resolution=224, memory_format="contiguous",
                                     median_ms=ms, p20_ms=ms, p80_ms=ms))
        elif r["suite"] == "train":
            ms = 100.0 * (2.0 if r["variant"].startswith("search") else 1.0)
            rows.append(dict(r, batch=128, resolution=224, memory_format="contiguous", median_ms=ms, p20_ms=ms,
                             p80_ms=ms))
    rows.append({"suite": "ops", "case": "search-fwd-float16-b1-4x6x7", "device": "cuda", "device_name": SYNTH_GPU,
                 "error": "RuntimeError: synthetic failure"})
    return rows


def test_report_renders_cpu_and_synthetic_gpu(cpu_rows, tmp_path):
    cpu_run = Results(common.environment("cpu", "smoke", command="python -m pytest bench --bench-scope=smoke"))
    cpu_run.copy[cpu_rows[0]["device_name"]] = {"device": "cpu", "bytes": 1 << 20, "gbps": 10.0, "method": "test"}
    cpu_run.add(cpu_rows)
    cpu_path = cpu_run.write(tmp_path)

    env = dict(common.environment("cpu", "default", command="python -m pytest bench"), device="cuda",
               device_name=SYNTH_GPU, cuda={"name": SYNTH_GPU, "capability": "9.0", "multiprocessors": 132})
    gpu_run = Results(env)
    gpu_run.copy[SYNTH_GPU] = {"device": "cuda", "bytes": 1 << 30, "gbps": 3000.0, "method": "synthetic"}
    gpu_run.add(synthetic_cuda_rows(cpu_rows))
    gpu_path = gpu_run.write(tmp_path)
    assert cpu_path != gpu_path and json.loads(gpu_path.read_text())["env"]["device"] == "cuda"
    (tmp_path / "not-ours.json").write_text(json.dumps({"benchmarks": []}))  # e.g. pytest-benchmark output

    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    gpu, cpu = text.index(f"## {SYNTH_GPU}"), text.index(f"## {cpu_rows[0]['device_name']}")
    assert gpu < cpu  # GPUs first
    gpu_text = text[gpu:cpu]
    for needle in ("× compile", "compile ms", "b128 bfloat16 224px ms", "Search mode (all 8 candidates), float32, fwd+bwd",
                   "Attention baselines", "+SE", "× plain step", "Failed variants", "synthetic failure",
                   "Skip, timed again last", "plain timed again +0.0%"):
        assert needle in gpu_text, needle
    # The GPU's goals: the same checks as the CPU's (goals.py), with the GPU's thresholds.
    goals = gpu_text[gpu_text.index("### Goals"):gpu_text.index("### Op suite")]
    assert "Search mode fwd+bwd ≥ 5× the eager reference | worst 6×" in goals
    assert "Search mode fwd+bwd ≥ 2× torch.compile(reference) | worst 1.5×" in goals
    assert "≥ 70% of the run's copy bandwidth" in goals and "PMPL search step (fused) ≤ 1.5×" in goals
    assert "Supernet training step" not in goals  # not one of the GPU's goals
    assert goals.count("**met**") == 3 and goals.count("**missed**") == 3
    assert goals.count("Reason (from a profile): not yet analysed") == 3
    assert "6\\|x\\|" in gpu_text and "| 6|x| |" not in gpu_text
    assert "Strip gate: C++ op vs eager" in text[cpu:] and "CPU: batch-1 inference" in text[cpu:]

    # When the baseline's own two timings differ by more than the 5% margin, the goal decides nothing.
    noisy = [dict(r, median_ms=r["median_ms"] * 1.2) if r.get("variant") == "skip-again" else r
             for r in gpu_run.rows]
    runs = [dict(gpu_run.to_json(), rows=noisy, file="noisy.json")]
    assert "not resolved — the plain network timed twice differs by ≥ 5%" in report.render(runs)
    assert "CPU: batch-1 inference" not in gpu_text


def test_deploy_suite_rows_and_report(tmp_path):
    """The deployment suite untimed at 32 px: the ONNX file runs in ONNX Runtime, agrees with eager,
    and the report renders its section."""
    setting = cases.deploy_setting("smoke")
    rows = []
    for runtime in ("eager", "onnxruntime"):
        rows += cases.run_deploy_case(runtime, cases.DERIVED_GENOTYPE, setting, ONCE, tmp_path)
    assert not [r for r in rows if r.get("error")]
    ort = next(r for r in rows if r["runtime"] == "onnxruntime")
    assert ort["export_s"] > 0 and ort["rel_err_vs_eager"] < 1e-4
    assert next(r for r in rows if r["runtime"] == "eager")["rel_err_vs_eager"] == 0
    run = Results(common.environment("cpu", "smoke", command="python -m pytest bench -k deploy"))
    run.add(rows)
    text = report.render([dict(run.to_json(), file="deploy.json")])
    section = text[text.index("### Deployment: ONNX Runtime vs PyTorch eager vs torch.compile"):]
    assert "ONNX Runtime (CPUExecutionProvider)" in section and "PyTorch eager (FusedMetaPooling)" in section
    assert " ".join(cases.DERIVED_GENOTYPE) in section


def test_parse_threads():
    assert common.parse_threads("1") == [1]
    assert common.parse_threads("1, all") == [1, len(os.sched_getaffinity(0))] or len(os.sched_getaffinity(0)) == 1
    assert common.parse_threads("0") == [torch.get_num_threads()]
    assert common.parse_threads("2,2") == [2]
    with pytest.raises(ValueError, match="not a thread count"):
        common.parse_threads("1,many")


def _op_row(op, mode, shape, fmt, provider, ms, pct=None):
    n = shape[0] * shape[1] * shape[2] * shape[3] * 4
    return {"suite": "ops", "device": "cpu", "device_name": "Test CPU (1 thread)", "op": op, "mode": mode,
            "dtype": "float32", "shape": list(shape), "batch": shape[0], "memory_format": fmt, "provider": provider,
            "repeat": 0, "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "x_bytes": n, "floor_factor": 2,
            "floor": "2|x|", "floor_bytes": 2 * n, "gbps": None if pct is None else pct / 10.0, "pct_copy": pct}


def synthetic_cpu_goal_rows():
    """One CPU run's rows with made-up times: the search speedup over compile (2.5×) and one fixed op
    (0.9× of compile) miss, the bandwidth floor is met at the largest shapes only, the compiled
    derived network is 8% over plain, the supernet step is met."""
    rows = []
    for fmt in ("contiguous", "channels_last"):
        for shape in ((1, 16, 112, 112), (8, 16, 112, 112), (8, 24, 56, 56), (8, 320, 7, 7)):
            for mode, eager, comp in (("fwd+bwd", 25.0, 2.5), ("fwd", 30.0, 4.0)):
                rows += [_op_row("search", mode, shape, fmt, "fused", 1.0), _op_row("search", mode, shape, fmt, "eager", eager),
                         _op_row("search", mode, shape, fmt, "compile", comp)]
            small = shape[2] == 7
            for op in ("max5", "avg3"):
                slow = op == "avg3" and small and fmt == "channels_last"
                rows += [_op_row(op, "fwd", shape, fmt, "fused", 1.0, 40.0 if small else 60.0),
                         _op_row(op, "fwd", shape, fmt, "compile", 0.9 if slow else 2.0)]
    for variant, fmt, ms in (("skip", "contiguous", 10.0), ("derived-fused", "contiguous", 10.3),
                             ("skip-again", "contiguous", 10.1), ("skip-compiled", "contiguous", 8.0),
                             ("derived-fused-compiled", "contiguous", 8.64), ("skip-compiled-again", "contiguous", 8.1)):
        rows.append({"suite": "model", "device": "cpu", "device_name": "Test CPU (1 thread)", "variant": variant,
                     "label": variant, "table": 1, "batch": 1, "dtype": "float32", "resolution": 224,
                     "memory_format": fmt, "params": 1, "macs": None, "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
                     "genotype": list(cases.DERIVED_GENOTYPE) if "derived" in variant else None,
                     "baseline": "skip-compiled" if "compiled" in variant else "skip"})
    for variant, ms in (("plain", 100.0), ("supernet-sgd-fused", 120.0)):
        rows.append({"suite": "train", "device": "cpu", "device_name": "Test CPU (1 thread)", "variant": variant,
                     "label": variant, "batch": 16, "resolution": 64, "num_classes": 10, "small_input": False,
                     "memory_format": "channels_last", "params": 1, "median_ms": ms, "p20_ms": ms, "p80_ms": ms})
    for variant, ms in zip(cases.GATE_WEIGHT_SETTINGS, (0.100, 0.104, 0.098)):
        rows.append({"suite": "gate_weights", "device": "cpu", "device_name": "Test CPU (1 thread)", "variant": variant,
                     "op": "strip", "mode": "fwd", "shape": [1, 320, 7, 7], "median_ms": ms})
    return rows


def test_cpu_goals_on_synthetic_rows():
    from bench import goals
    checks = {c.key: c for c in goals.evaluate(synthetic_cpu_goal_rows())}
    assert set(checks) == set(goals.goal_keys("cpu")) == set(goals.GOAL_KEYS) - {"search-step"}
    # One mechanism for every device: the same rows checked with a GPU's thresholds.
    gpu = {c.key: c for c in goals.evaluate(synthetic_cpu_goal_rows(), "cuda")}
    assert set(gpu) == set(goals.GOAL_KEYS) - {"supernet-step"}
    assert gpu["search-fwd+bwd-vs-compile"].name.startswith("Search mode fwd+bwd ≥ 2×")
    status = {k: c.ok for k, c in checks.items()}
    assert status == {"search-fwd+bwd-vs-eager": True, "search-fwd+bwd-vs-compile": False,
                      "search-fwd-vs-compile": True, "fixed-bandwidth": True, "fixed-vs-compile": False,
                      "derived-vs-plain": False, "supernet-step": True, "gate-weights": True}
    assert "worst 2.5× " in checks["search-fwd+bwd-vs-compile"].measured
    assert checks["search-fwd+bwd-vs-compile"].target["providers"] == ["fused", "compile"]
    slow = checks["fixed-vs-compile"].target
    assert (slow["op"], slow["memory_format"], slow["shape"][2]) == ("avg3", "channels_last", 7)
    assert "worst 60.0%" in checks["fixed-bandwidth"].measured  # 7×7 rows are not among the largest shapes
    derived = checks["derived-vs-plain"]
    assert "compiled, contiguous: +8.0%" in derived.measured and derived.target["variants"][0] == "derived-fused-compiled"
    assert "1.2×" in checks["supernet-step"].measured
    assert "spread 6%" in checks["gate-weights"].measured
    frozen_slow = [dict(r, median_ms=0.5) if r.get("variant") == "frozen, no_grad" else r
                   for r in synthetic_cpu_goal_rows()]
    gate = next(c for c in goals.evaluate(frozen_slow) if c.key == "gate-weights")
    assert gate.ok is False and "spread 410%" in gate.shortfall


def test_profile_rows_render_under_missed_goal():
    """A missed goal's profile: real torch.profiler rows of a tiny op (dynamo's eager backend) under
    the goal in the CPU section, with the reason placeholder when reasons.json has none."""
    from bench import goals, profiling
    rows = synthetic_cpu_goal_rows()
    check = next(c for c in goals.evaluate(rows) if c.key == "search-fwd+bwd-vs-compile")
    target = dict(check.target, shape=[1, 4, 6, 7])
    prof = profiling.profile_target(check.key, target, "cpu", compile_backend="eager", seconds=0.01, min_iters=1)
    assert [r["variant"] for r in prof] == ["fused", "compile"]
    assert all(r["iters"] >= 1 and r["top"] and r["self_ms_per_iter"] > 0 for r in prof)
    rows += [dict(r, device_name="Test CPU (1 thread)") for r in prof]
    run = Results(dict(common.environment("cpu", "default", command="python -m pytest bench"),
                       device_name="Test CPU (1 thread)", thread_counts=[1], loadavg_start=[2.5, 2.0, 1.0]))
    run.add(rows)
    text = report.render([dict(run.to_json(), file="cpu.json")])
    goals = text[text.index("### Goals"):text.index("### Op suite")]
    assert goals.count("**missed**") == 3 and goals.count("**met**") == 5
    section = goals[goals.index("**Search mode fwd+bwd ≥ 3× torch.compile(reference): missed.**"):]
    assert "torch.profiler, this run, `search` fwd+bwd, float32, 1×4×6×7" in section
    assert "Reason (from a profile): not yet analysed" in section
    assert "The machine was shared with other work during `cpu.json`" in text
    assert "| CL |" in text and "compile % copy" in text
