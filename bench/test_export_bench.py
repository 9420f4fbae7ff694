"""Deployment suite: the derived and the plain MobileNetV2-1.0 (224 px, float32, batch 1 and 32)
exported with ``metapool_kernels.export.to_onnx`` and run by ONNX Runtime on the CPU, against
PyTorch eager and torch.compile of the same network on the same CPU and thread count."""
import pytest

from .cases import DEPLOY_NETWORKS, DERIVED_GENOTYPE, deploy_setting, run_deploy_case


@pytest.mark.parametrize("network", DEPLOY_NETWORKS)
def test_deploy(bench, deploy_runtime, network, tmp_path):
    bench.run("deploy", f"deploy-{network}-{deploy_runtime}", run_deploy_case, deploy_runtime,
              bench.genotype or DERIVED_GENOTYPE, deploy_setting(bench.scope), bench.timing("model", "cpu"),
              tmp_path, network=network, compile_backend=bench.compile_backend)
