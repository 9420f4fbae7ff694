"""Deployment suite: the derived MobileNetV2-1.0 (224 px, float32, batch 1 and 32) exported with
``metapool_kernels.export.to_onnx`` and run by ONNX Runtime on the CPU, against PyTorch eager and
torch.compile of the same network on the same CPU and thread count."""
from .cases import DERIVED_GENOTYPE, deploy_setting, run_deploy_case


def test_deploy(bench, deploy_runtime, tmp_path):
    bench.run("deploy", f"deploy-{deploy_runtime}", run_deploy_case, deploy_runtime,
              bench.genotype or DERIVED_GENOTYPE, deploy_setting(bench.scope), bench.timing("model", "cpu"),
              tmp_path, compile_backend=bench.compile_backend)
