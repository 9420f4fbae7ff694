"""CPU rows, on every machine: the C++ CPU strip-gate kernel against eager PyTorch, and (when the
main device is a GPU) batch-1 inference of plain and derived MobileNetV2 on the host CPU. The rows
name the CPU model and torch's thread count."""
import pytest

from .cases import gate_weight_cases, model_settings, run_gate_weight_case, run_model_case, run_strip_gate_case


def test_strip_gate(bench, strip_gate_case):
    shape, dtype, mode = strip_gate_case
    bench.run("strip_gate", f"strip_gate-{mode}-{dtype}-{shape}", run_strip_gate_case, shape, dtype, mode,
              "cpu", bench.timing("ops", "cpu"), bench.copy_gbps("cpu"))


def test_cpu_model(bench, cpu_model_variant):
    if bench.device == "cpu":
        pytest.skip("the model suite already runs on the CPU in this run")
    settings = model_settings("cpu", bench.scope)
    bench.run("model", cpu_model_variant.key, run_model_case, cpu_model_variant, "cpu", settings,
              bench.timing("model", "cpu"), macs_resolution=32 if bench.scope == "smoke" else 224,
              compile_backend=bench.compile_backend)


@pytest.mark.parametrize("shape", gate_weight_cases("default"), ids=lambda s: "x".join(map(str, s)))
def test_gate_weights(bench, shape):
    if bench.scope == "smoke":
        shape = gate_weight_cases("smoke")[0]
    bench.run("gate_weights", f"gate_weights-{'x'.join(map(str, shape))}", run_gate_weight_case, shape, "cpu",
              bench.timing("ops", "cpu"))
