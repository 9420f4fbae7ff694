"""Model suite: the Meta-Pooling paper's Table 1 (pooling enhancers) and Table 4 (attention
baselines) on MobileNetV2-1.0, with parameters, MACs and measured inference latency; and the time
of one PMPL search step against a plain training step."""
from .cases import model_settings, run_model_case, run_train_case, train_setting


def test_model(bench, model_variant):
    settings = model_settings(bench.device, bench.scope)
    bench.run("model", model_variant.key, run_model_case, model_variant, bench.device, settings,
              bench.timing("model"), macs_resolution=32 if bench.scope == "smoke" else 224,
              compile_backend=bench.compile_backend)


def test_train_step(bench, train_key):
    bench.run("train", train_key, run_train_case, train_key, bench.device,
              train_setting(bench.device, bench.scope), bench.timing("train"))
