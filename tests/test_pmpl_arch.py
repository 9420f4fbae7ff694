"""PMPL on networks other than the package's MobileNetV2, through the command line on real
Fashion-MNIST images: timm and torchvision models by name (search, genotype, retrain, eval, export
verified with ONNX Runtime), and a network of one's own code searched through the Python API and
then evaluated, retrained and exported by the command line, which runs that code only when told to.
Small budgets: the point is that every step works on these networks, not their accuracy."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from metapool_kernels import find_blocks, insert_enhancers
from metapool_kernels.models import read_genotype_file
from metapool_kernels.pmpl import SearchConfig, run_search
from metapool_kernels.pmpl.cli import main
from metapool_kernels.pmpl.networks import plain_network
from metapool_kernels.pmpl.runs import load_checkpoint

QUICK = ["--subset", "256", "--test-subset", "128", "--epochs", "1", "--batch-size", "64", "--no-progress"]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.mark.parametrize("arch", ["timm:mobilenetv3_small_050", "torchvision:shufflenet_v2_x0_5"])
def test_search_retrain_eval_export_a_library_network(arch, tmp_path, capsys):
    blocks = find_blocks(plain_network(arch, num_classes=10, in_chans=1))
    run(["search", "--arch", arch, *QUICK, "--rho", "0.05", "--alpha-lr", "0.05", "--out", str(tmp_path / "s")],
        capsys)
    saved = read_genotype_file(tmp_path / "s" / "genotype.json")
    assert saved["blocks"] == blocks and len(saved["genotype"]) == len(blocks)
    assert saved["config"]["arch"] == arch and saved["model_config"]["arch"] == arch

    # retrain takes the network from the genotype, without --arch
    out = run(["retrain", "--genotype", str(tmp_path / "s" / "genotype.json"), *QUICK, "--out", str(tmp_path / "r")],
              capsys)
    assert "arch='" + arch + "'" in out
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt", kind="train")
    assert ckpt["config"]["arch"] == arch
    assert ckpt["model_config"]["enhancer"] == saved["genotype"] and ckpt["model_config"]["blocks"] == blocks

    out = run(["eval", str(tmp_path / "r" / "checkpoint.pt"), "--test-subset", "128", "--no-progress"], capsys)
    assert "128 test images" in out
    run(["eval", str(tmp_path / "s" / "checkpoint.pt"), "--test-subset", "64", "--no-progress"], capsys)
    out = run(["export", "--checkpoint", str(tmp_path / "r" / "checkpoint.pt"), "--out", str(tmp_path / "m.onnx"),
               "--images", "128"], capsys)
    assert "verified with ONNX Runtime" in out and (tmp_path / "m.onnx").stat().st_size > 0

    # the genotype is refused for another network
    other = "torchvision:mobilenet_v3_small" if arch.startswith("timm") else "timm:mobilenetv3_small_050"
    assert main(["retrain", "--genotype", str(tmp_path / "s" / "genotype.json"), "--arch", other, *QUICK,
                 "--out", str(tmp_path / "r2")]) == 2
    assert f"made with arch '{arch}', not '{other}'" in capsys.readouterr().err


OWN_NETWORK = '''
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x):
        return self.body(x)


def build(num_classes=10, in_chans=3):
    return nn.Sequential(Block(in_chans, 8, 1), Block(8, 16, 2), Block(16, 16, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
'''


def test_own_network_searched_in_python_continues_on_the_command_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent(OWN_NETWORK))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_nets", None)
    import my_nets

    torch.manual_seed(0)
    model = insert_enhancers(my_nets.build(num_classes=10, in_chans=1), "meta", blocks=["0", "1", "2"])
    cfg = SearchConfig(subset=256, test_subset=128, epochs=1, batch_size=64, rho=0.05, alpha_lr=0.05,
                       out_dir=str(tmp_path / "s"), progress=False)
    res = run_search(cfg, model=model, log=lambda *a: None)
    genotype = str(res.genotype_path)
    assert read_genotype_file(genotype)["blocks"] == ["0", "1", "2"]

    # A file never names code to run: each command needs --arch, and says so.
    search_ckpt = str(tmp_path / "s" / "checkpoint.pt")
    for argv in (["eval", search_ckpt, "--no-progress"],
                 ["retrain", "--genotype", genotype, *QUICK, "--out", str(tmp_path / "r")]):
        assert main(argv) == 2
        assert "pass --arch MODULE:FUNCTION" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

    out = run(["eval", search_ckpt, "--arch", "my_nets:build", "--test-subset", "64", "--no-progress"], capsys)
    assert "PMPL search network" in out
    run(["retrain", "--genotype", genotype, "--arch", "my_nets:build", *QUICK, "--out", str(tmp_path / "r")], capsys)
    retrained = str(tmp_path / "r" / "checkpoint.pt")
    assert load_checkpoint(retrained)["model_config"]["arch"] == "my_nets:build"
    assert main(["export", "--checkpoint", retrained, "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pass --arch MODULE:FUNCTION" in capsys.readouterr().err
    out = run(["export", "--checkpoint", retrained, "--out", str(tmp_path / "m.onnx"), "--images", "64",
               "--arch", "my_nets:build"], capsys)
    assert "verified with ONNX Runtime" in out
    # ... and another factory than the one recorded is refused
    assert main(["eval", retrained, "--arch", "my_nets:other", "--no-progress"]) == 2
    assert "made with arch 'my_nets:build', not 'my_nets:other'" in capsys.readouterr().err
    # a resumed run of it needs the factory named again, too; the search resumes with it
    assert main(["retrain", "--resume", retrained, "--no-progress"]) == 2
    assert "pass --arch MODULE:FUNCTION" in capsys.readouterr().err
    assert main(["search", "--resume", search_ckpt, "--no-progress"]) == 2
    assert "a network handed to the Python API" in capsys.readouterr().err
    out = run(["search", "--resume", search_ckpt, "--arch", "my_nets:build", "--no-progress"], capsys)
    assert "resumed from" in out and read_genotype_file(genotype)["genotype"] == res.genotype
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert log[0]["config"]["arch"] == "my_nets:build"


def test_library_names_with_a_tag_build_untrained():
    model = plain_network("timm:mobilenetv3_small_050.lamb_in1k", num_classes=3, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    model = plain_network("torchvision:mobilenet_v3_small", num_classes=3, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)  # the first conv takes the data's channels


@pytest.mark.parametrize("argv, message", [
    (["--arch", "timm:no_such_net"], "timm has no model 'no_such_net'"),
    (["--arch", "torchvision:no_such_net"], "torchvision has no model 'no_such_net'"),
    (["--arch", "not an arch"], "use 'mobilenetv2', 'timm:NAME', 'torchvision:NAME' or 'MODULE:FUNCTION'"),
    (["--arch", "no_such_module_here:build"], "cannot import build from no_such_module_here"),
    (["--arch", "timm:mobilenetv3_small_050", "--width", "0.5"], "name the variant in arch instead"),
    (["--arch", "json:JSONDecoder"], "returned a JSONDecoder, not an nn.Module"),
    (["--arch", "json:dumps"], "json.dumps(num_classes=10, in_chans=1) failed"),
])
def test_bad_arch_is_one_error_line(argv, message, tmp_path, capsys):
    assert main(["search", *argv, *QUICK, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
