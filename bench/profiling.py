"""torch.profiler summaries of the configurations that decide a missed CPU goal.

The profile suite (test_profile_bench.py) runs after every other suite of a run, checks the goals
on that run's rows (goals.evaluate), and for each missed goal profiles the deciding
configuration with every variant the goal compares (fused against torch.compile, derived against
plain, ...). Each variant becomes a "profile" row: its self CPU time per iteration and its top
operators by self CPU time, which the report prints under the missed goal.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from .cases import (ModelSetting, OpCase, TrainSetting, build_model, cpu_model_variants, model_inference_fn,
                    op_variant_fn, train_step_fn)
from .common import device_name

TOP_OPS = 8
PROFILE_SECONDS = 0.5   # per variant; at least MIN_ITERS iterations
MIN_ITERS = 3


def top_ops(fn: Callable[[], Any], *, seconds: float = PROFILE_SECONDS, min_iters: int = MIN_ITERS,
            top: int = TOP_OPS) -> Dict[str, Any]:
    """Profile ``fn`` (after one untimed call) over about ``seconds``; operators by self CPU time."""
    fn()
    t0 = time.perf_counter()
    fn()
    per_call = max(time.perf_counter() - t0, 1e-6)
    iters = max(min_iters, int(seconds / per_call))
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return {
        "iters": iters,
        "wall_ms_per_iter": wall * 1e3 / iters,
        "self_ms_per_iter": total_us / 1e3 / iters,
        "top": [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3 / iters, "calls": e.count / iters,
                 "pct": 100.0 * e.self_cpu_time_total / total_us} for e in events[:top]],
    }


def _variant_fns(target: Dict[str, Any], device: str, compile_backend: str,
                 genotype: Optional[Sequence[str]]) -> Dict[str, Callable[[], Any]]:
    kind = target["kind"]
    if kind == "op":
        case = OpCase(target["op"], target["mode"], target["dtype"], tuple(target["shape"]), compile=True,
                      memory_format=target["memory_format"])
        return {p: op_variant_fn(case, p, device, compile_backend=compile_backend) for p in target["providers"]}
    if kind == "model":
        variants = {v.key: v for v in cpu_model_variants(genotype)}
        setting = ModelSetting(target["batch"], target["dtype"], target["resolution"], target["memory_format"])
        return {k: model_inference_fn(build_model(variants[k]).eval(), variants[k], setting, device, compile_backend)
                for k in target["variants"]}
    if kind == "train":
        setting = TrainSetting(target["batch"], target["resolution"], target["num_classes"], target["small_input"],
                               target["memory_format"])
        return {k: train_step_fn(k, device, setting)[0] for k in target["variants"]}
    raise ValueError(f"no profile for a target of kind {kind!r}")


def profile_target(goal: str, target: Dict[str, Any], device: str, *, compile_backend: str = "inductor",
                   genotype: Optional[Sequence[str]] = None, seconds: float = PROFILE_SECONDS,
                   min_iters: int = MIN_ITERS) -> List[Dict[str, Any]]:
    """One "profile" row per variant of the goal's deciding configuration."""
    rows = []
    # Build and profile one variant at a time, so a compiled variant's graph is the only one alive.
    for variant in (target.get("providers") or target["variants"]):
        fn = _variant_fns(dict(target, providers=[variant], variants=[variant]), device, compile_backend,
                          genotype)[variant]
        summary = top_ops(fn, seconds=seconds, min_iters=min_iters)
        rows.append({"suite": "profile", "device": device, "device_name": device_name(device), "goal": goal,
                     "variant": variant, "target": target, "threads": torch.get_num_threads(), **summary})
    return rows
