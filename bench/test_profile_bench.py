"""Profile suite, run after every other suite: for each CPU goal this run missed, torch.profiler's
top operators of every variant the goal compares, at the configuration that decides it. The report
prints them under the missed goal, so each miss is explained from this run's own profile."""
import pytest

from .common import device_name
from .goals import evaluate
from .profiling import profile_target


def test_profile(bench, cpu_profile_goal):
    if bench.disabled:
        pytest.skip("--benchmark-disable: nothing timed, no goal to check")
    name = device_name("cpu")
    rows = [r for r in bench.results.rows if r.get("device_name") == name]
    check = next(c for c in evaluate(rows) if c.key == cpu_profile_goal)
    if check.ok is not False:
        pytest.skip(f"{check.key}: {check.status.strip('*')} in this run, nothing to explain")
    if check.target is None:
        pytest.skip(f"{check.key}: its rows are the explanation (no single configuration to profile)")
    if check.target["kind"] == "deploy":
        pytest.skip(f"{check.key}: decided in {check.target['runtime']}, which torch.profiler does not see")
    bench.run("profile", f"profile-{check.key}", profile_target, check.key, check.target, "cpu",
              compile_backend=bench.compile_backend, genotype=bench.genotype)
