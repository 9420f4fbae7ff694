"""insert_enhancers: Meta-Pooling after every block of torchvision and timm networks, found without
configuration; state_dict and genotype round trips; genotypes refused across networks; a derived
network of every family through ONNX Runtime; and the bad inputs, each with a message."""
import copy

import onnxruntime
import pytest
import timm
import torch
import torchvision

from metapool_kernels import FusedMetaPooling, MetaPooling, find_blocks, insert_enhancers
from metapool_kernels.export import to_onnx
from metapool_kernels.insert import EnhancedBlock, block_names
from metapool_kernels.models import derive

# (library, name, blocks the architecture has)
FAMILIES = [
    ("torchvision", "mobilenet_v2", 17), ("torchvision", "mobilenet_v3_small", 11),
    ("torchvision", "shufflenet_v2_x0_5", 16), ("torchvision", "mnasnet0_5", 16),
    ("torchvision", "efficientnet_b0", 16), ("torchvision", "regnet_x_400mf", 22),
    ("torchvision", "resnet18", 8),
    ("timm", "mobilenetv3_small_050", 11), ("timm", "efficientnet_b0", 16), ("timm", "resnet18", 8),
    ("timm", "regnetx_002", 13),
]
IDS = [f"{lib}:{name}" for lib, name, _ in FAMILIES]


def build(lib: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if lib == "torchvision":
        return getattr(torchvision.models, name)(weights=None, num_classes=10)
    return timm.create_model(name, pretrained=False, num_classes=10)


def image(batch=2, size=64, seed=1):
    return torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


def searched(model: torch.nn.Module) -> torch.nn.Module:
    """Give every layer distinct, non-uniform α, as a search would."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MetaPooling):
                m.alpha.copy_(torch.randn(m.alpha.shape, generator=g) * 3)
    return model


@pytest.mark.parametrize("lib,name,count", FAMILIES, ids=IDS)
def test_every_block_of_the_family_gets_an_enhancer(lib, name, count, tmp_path):
    model = insert_enhancers(build(lib, name), "meta")
    layers = [m for m in model.modules() if isinstance(m, FusedMetaPooling)]
    assert len(layers) == len(block_names(model)) == count
    assert model(image()).shape == (2, 10)

    # state_dict round trip into a second network built the same way
    searched(model)
    twin = insert_enhancers(build(lib, name), "meta")
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    x = image(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))

    # the genotype, with the block names, builds the derived network; it runs and exports
    genotype = {"genotype": derive(model), "blocks": block_names(model)}
    derived = insert_enhancers(build(lib, name), genotype).eval()
    assert derive(derived) == genotype["genotype"]
    assert all(m.fixed is not None for m in derived.modules() if isinstance(m, MetaPooling))
    path = to_onnx(derived, image(), tmp_path / f"{name}.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = image(batch=3, seed=5)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = derived(x)
    assert (torch.from_numpy(out) - expected).abs().max().item() <= 1e-3 * max(1.0, expected.abs().max().item())
    # TorchScript by tracing (many deployment stacks still take it): standard ops, same logits
    with torch.no_grad():
        traced = torch.jit.trace(derived, image(batch=3, seed=5))
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)


def test_a_genotype_is_refused_for_another_network():
    resnet = insert_enhancers(build("torchvision", "resnet18"), "meta")
    genotype = {"genotype": derive(resnet), "blocks": block_names(resnet)}
    with pytest.raises(ValueError, match="found for a network whose blocks are"):
        insert_enhancers(build("timm", "regnetx_002"), genotype)
    with pytest.raises(ValueError, match="the genotype has 8 ops but the network has 16 blocks"):
        insert_enhancers(build("torchvision", "shufflenet_v2_x0_5"), genotype["genotype"])


def test_baselines_and_fixed_ops():
    for enhancer, expect in (("maxpool", "max3"), ("avg5", "avg5"), ("strip", "strip")):
        model = insert_enhancers(build("torchvision", "resnet18"), enhancer)
        assert derive(model) == [expect] * 8
    assert len(set(derive(insert_enhancers(build("torchvision", "resnet18"), "random", seed=3)))) > 1
    se = insert_enhancers(build("torchvision", "resnet18"), "se")
    assert se(image()).shape == (2, 10)
    none = insert_enhancers(build("torchvision", "resnet18"), "none")
    assert all(isinstance(m.enhancer, torch.nn.Identity) for m in none.modules() if isinstance(m, EnhancedBlock))


def test_blocks_by_name_or_predicate():
    model = build("torchvision", "resnet18")
    insert_enhancers(model, "max3", blocks=["layer2", "layer4"])
    assert block_names(model) == ["layer2", "layer4"]
    assert model(image()).shape == (2, 10)
    model = build("torchvision", "resnet18")
    insert_enhancers(model, "avg3", blocks=lambda name, m: name in ("layer1.1", "layer3.0"))
    assert block_names(model) == ["layer1.1", "layer3.0"]


def test_channels_come_from_the_model():
    model = insert_enhancers(build("torchvision", "shufflenet_v2_x0_5"), "meta")
    channels = [m.enhancer.channels for m in model.modules() if isinstance(m, EnhancedBlock)]
    assert channels == [48] * 4 + [96] * 8 + [192] * 4


class Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


@pytest.mark.parametrize("call,match", [
    (lambda: insert_enhancers(Plain()), r"no blocks found in this Plain.*Pass blocks="),
    (lambda: insert_enhancers(Plain(), blocks=["conv", "head"]), r"does not have: \['head'\]"),
    (lambda: insert_enhancers(Plain(), blocks=["fc"]), r"block 'fc' returns a 2-D tensor, not a 4-D"),
    (lambda: insert_enhancers(Plain(), blocks="conv"), "a list of module names"),
    (lambda: insert_enhancers(Plain(), ["max3", "avg3"], blocks=["conv"]), "has 2 ops but the network has 1 block"),
    (lambda: insert_enhancers(Plain(), ["max9"], blocks=["conv"]), "not candidates"),
    (lambda: insert_enhancers(Plain(), "bananas", blocks=["conv"]), "unknown enhancer 'bananas'"),
    (lambda: insert_enhancers(Plain(), "sk", blocks=["conv"]), "only metapool_kernels.models.mobilenet_v2"),
    (lambda: insert_enhancers(insert_enhancers(Plain(), blocks=["conv"]), blocks=["conv"]), "already has enhancers"),
])
def test_bad_inputs_say_what_to_do(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_pmpl_searches_a_timm_network_and_its_genotype_rebuilds_it(tmp_path):
    import json

    from metapool_kernels.models import read_genotype_file
    from metapool_kernels.pmpl import run_search
    from test_pmpl import synthetic_bundle, tiny_config

    torch.manual_seed(0)
    model = insert_enhancers(timm.create_model("resnet18", pretrained=False, num_classes=4, in_chans=1),
                             "meta", input_size=12)
    res = run_search(tiny_config(tmp_path, epochs=1), model=model, data=synthetic_bundle(), log=lambda *a: None)
    saved = read_genotype_file(res.genotype_path)
    assert saved["genotype"] == res.genotype and saved["blocks"] == block_names(model)
    rebuilt = insert_enhancers(timm.create_model("resnet18", pretrained=False, num_classes=4, in_chans=1),
                               saved, input_size=12)
    assert derive(rebuilt) == res.genotype
    with pytest.raises(ValueError, match="found for a network whose blocks are"):
        insert_enhancers(timm.create_model("regnetx_002", pretrained=False, num_classes=4, in_chans=1), saved,
                         input_size=12)
    assert json.loads(res.genotype_path.read_text())["blocks"][0] == "layer1.0"
