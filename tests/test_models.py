"""MobileNetV2 with enhancers: shapes, gradients, genotypes, and the Meta-Pooling paper's Table 4 sizes."""
import json

import pytest
import torch

from metapool_kernels import PAPER_CANDIDATES, FusedMetaPooling, MetaPooling
from metapool_kernels.models import (
    ENHANCER_DOCS, ENHANCERS, NUM_BLOCKS, alpha_parameters, count_flops, count_macs, count_params, derive,
    load_genotype, meta_layers, mobilenet_v2, save_genotype, searchable_layers, weight_parameters,
)



pytestmark = pytest.mark.usefixtures("one_thread")


GENOTYPE = ["skip", "avg3", "avg5", "avg7", "max3", "max5", "max7", "strip"] * 2 + ["strip"]


def small(enhancer, width=0.35, **kw):
    kw.setdefault("num_classes", 10)
    return mobilenet_v2(enhancer, width_mult=width, small_input=True, **kw)


def test_enhancer_names_are_the_contract():
    assert ENHANCERS == ("none", "maxpool", "avgpool", "strip", "random", "meta", "se", "cbam", "coordatt", "sk")
    assert set(ENHANCER_DOCS) == set(ENHANCERS)


@pytest.mark.parametrize("width", [1.0, 0.75, 0.5])
@pytest.mark.parametrize("enhancer", list(ENHANCERS) + ["genotype"])
def test_output_shape(enhancer, width):
    model = small(GENOTYPE if enhancer == "genotype" else enhancer, width).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_full_size_stem_and_1000_classes():
    model = mobilenet_v2("meta", width_mult=0.35).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
        assert model.features(torch.randn(1, 3, 64, 64)).shape[-2:] == (2, 2)  # total stride 32


def test_grayscale_small_input_keeps_spatial_extent():
    model = small("meta", in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        # stem and first 24-channel block at stride 1: total stride 8, so 28x28 ends at 4x4
        assert model.features(x).shape[-2:] == (4, 4)
    assert model.features[0][0].in_channels == 1


@pytest.mark.parametrize("enhancer", list(ENHANCERS) + ["genotype"])
def test_gradients_reach_every_trainable_parameter(enhancer):
    torch.manual_seed(0)
    model = small(GENOTYPE if enhancer == "genotype" else enhancer).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
        else:  # only the alpha of a fixed layer is frozen
            assert name.endswith("alpha") and p.grad is None, name
    for layer in meta_layers(model):
        if layer.fixed is None:
            assert layer.alpha.grad.abs().sum() > 0


def test_fused_and_reference_models_agree():
    torch.manual_seed(0)
    fused, ref = small("meta"), small("meta", fused=False)
    assert all(type(m) is FusedMetaPooling for m in meta_layers(fused))
    assert all(type(m) is MetaPooling for m in meta_layers(ref))
    with torch.no_grad():
        for layer in meta_layers(fused):
            layer.alpha.normal_()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


def test_meta_layers_and_searchable_layers():
    model = small("meta")
    layers = meta_layers(model)
    assert len(layers) == NUM_BLOCKS == 17
    assert [m.channels for m in layers] == [m.out_channels for m in model.features[1:18]]
    assert all(m.candidates == PAPER_CANDIDATES for m in layers)
    layers[3].fix("avg5")
    assert len(searchable_layers(model)) == 16 and layers[3] not in searchable_layers(model)
    assert len(meta_layers(small("strip"))) == 17 and searchable_layers(small("strip")) == []
    for enhancer in ("none", "se", "cbam", "coordatt", "sk"):
        assert meta_layers(small(enhancer)) == []


def test_alpha_and_weight_parameters_split():
    model = small("meta")
    alphas, weights = alpha_parameters(model), weight_parameters(model)
    assert len(alphas) == 17 and all(a.shape == (len(PAPER_CANDIDATES),) for a in alphas)
    alpha_ids, weight_ids = {id(p) for p in alphas}, {id(p) for p in weights}
    assert not alpha_ids & weight_ids
    assert alpha_ids | weight_ids == {id(p) for p in model.parameters()}
    assert len(alphas) + len(weights) == len(list(model.parameters()))
    gates = [p for m in meta_layers(model) for p in (*m.gate_h.parameters(), *m.gate_w.parameters())]
    assert all(id(p) in weight_ids for p in gates)
    assert alpha_parameters(small("none")) == []


def test_derive_and_genotype_json_round_trip(tmp_path):
    model = small("meta")
    wanted = GENOTYPE[::-1]
    with torch.no_grad():
        for layer, op in zip(meta_layers(model), wanted):
            layer.alpha[layer.candidates.index(op)] = 1.0
    meta_layers(model)[0].fix("max7")
    genotype = derive(model)
    assert genotype == ["max7"] + wanted[1:]

    path = tmp_path / "genotype.json"
    save_genotype(genotype, path, epoch=12, dataset="fashion-mnist")
    data = json.loads(path.read_text())
    assert data == {"genotype": genotype, "epoch": 12, "dataset": "fashion-mnist"}
    assert load_genotype(path) == genotype

    derived = small(load_genotype(path))
    assert derive(derived) == genotype
    for layer, op in zip(meta_layers(derived), genotype):
        assert layer.candidates == (op,) and layer.fixed == op
        assert (layer.gate_h is not None) == (op == "strip")


def test_fixed_ops_survive_state_dict():
    model = small("meta")
    meta_layers(model)[5].fix("strip")
    fresh = small("meta")
    fresh.load_state_dict(model.state_dict())
    assert meta_layers(fresh)[5].fixed == "strip" and len(searchable_layers(fresh)) == 16


def test_fixed_enhancers_and_random():
    assert derive(small("maxpool")) == ["max3"] * 17
    assert derive(small("avgpool")) == ["avg3"] * 17
    assert derive(small("strip")) == ["strip"] * 17
    three = ("skip", "avg3", "strip")
    a, b = derive(small("random", seed=1, candidates=three)), derive(small("random", seed=1, candidates=three))
    assert a == b and set(a) <= set(three) and len(set(a)) > 1
    assert derive(small("random", seed=2)) != derive(small("random", seed=3))


def test_derive_rejects_models_without_meta_layers():
    with pytest.raises(ValueError, match="Meta-Pooling"):
        derive(small("se"))


@pytest.mark.parametrize("bad, match", [
    (GENOTYPE[:-1], "16 ops.*17 blocks"),
    (GENOTYPE + ["skip"], "18 ops"),
    (GENOTYPE[:-1] + ["avg9"], "unknown op.*avg9"),
    (GENOTYPE[:-1] + [3], "unknown op"),
    ("meta-ish", "unknown enhancer"),
    ({"genotype": GENOTYPE}, "list of op names"),
])
def test_bad_genotype_or_enhancer(bad, match):
    with pytest.raises(ValueError, match=match):
        mobilenet_v2(bad)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"ops": ["skip"]}', "no 'genotype' key"),
    ('["skip"]', "no 'genotype' key"),
    ('{"genotype": "skip"}', "list of op names"),
    ('{"genotype": ["skip", "avg4"]}', "unknown op.*avg4"),
])
def test_load_genotype_rejects_bad_files(tmp_path, text, match):
    path = tmp_path / "g.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_genotype(path)


def test_load_genotype_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.json"
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_genotype(path)


def test_save_genotype_rejects_unknown_ops(tmp_path):
    with pytest.raises(ValueError, match="unknown op"):
        save_genotype(["skip", "huge"], tmp_path / "g.json")


def test_load_genotype_names_a_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a file.*folder"):
        load_genotype(tmp_path)


def test_genotype_loader_fuzz(tmp_path):
    """Random bytes, every truncation of a real file, wrong types and deep nesting: always a
    ValueError naming the file, never another exception."""
    import random

    path = tmp_path / "g.json"
    save_genotype(GENOTYPE, path, probs=[0.5] * NUM_BLOCKS, model_config={"width_mult": 0.5})
    good = path.read_bytes()
    rng = random.Random(0)
    cases = [good[:n] for n in range(0, len(good) - 1, 7)]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(40)]
    cases += [good.replace(b'"skip"', b'"skip\\u0000"', 1), good.replace(b'"genotype"', b'"genotypes"'),
              b"[" * 100_000, b'{"genotype": ' + b"[" * 100_000 + b"}", b"\xff\xfe{}", b"null", b"42",
              b'{"genotype": null}', b'{"genotype": [null]}', b'{"genotype": {"0": "skip"}}', b'{"genotype": [NaN]}']
    for data in cases:
        path.write_bytes(data)
        with pytest.raises(ValueError, match="genotype file '.*g.json'"):
            load_genotype(path)


@pytest.mark.parametrize("kw, match", [
    (dict(width_mult=0), "width_mult must be a positive finite number"),
    (dict(width_mult=-1), "width_mult must be a positive"),
    (dict(width_mult=float("nan")), "width_mult must be"),
    (dict(width_mult=float("inf")), "width_mult must be"),
    (dict(width_mult="1.0"), "width_mult must be"),
    (dict(width_mult=True), "width_mult must be"),
    (dict(num_classes=0), "num_classes must be a positive int"),
    (dict(num_classes=2.0), "num_classes must be a positive int"),
    (dict(in_chans=0), "in_chans must be a positive int"),
    (dict(in_chans=True), "in_chans must be a positive int"),
    (dict(small_input="yes"), "small_input must be True or False"),
    (dict(fused=1), "fused must be True or False"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(candidates=()), "at least one op"),
    (dict(candidates=("skip", "conv3")), "unknown candidate"),
    (dict(candidates="skip"), "not a single string"),
], ids=lambda v: repr(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}" for k in v))
def test_mobilenet_v2_rejects_bad_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mobilenet_v2("meta", **kw)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_derive_refuses_non_finite_alpha(value):
    model = small("meta")
    layers = meta_layers(model)
    layers[0].fix("strip")  # a fixed layer's α does not matter
    with torch.no_grad():
        layers[0].alpha[0] = value
        layers[4].alpha[2] = value
    with pytest.raises(ValueError, match="Meta-Pooling layer 4: alpha is not finite"):
        derive(model)


@pytest.mark.parametrize("cls", [MetaPooling, FusedMetaPooling])
def test_alpha_shape_checked_in_both_layers(cls):
    layer = cls(4)
    layer.alpha = torch.nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match="alpha has shape \\(10,\\) but this layer has 8 candidates"):
        layer(torch.randn(1, 4, 5, 5))


# Meta-Pooling paper, Table 4 (MobileNetV2-1.0, ImageNet, 1000 classes), and the exact counts built here.
# SE, CBAM and SK use reduction 8 and CoordAttention sits after each depthwise conv as in its own paper:
# those choices reproduce the table (see ENHANCER_DOCS); each count rounds to the table's value.
PAPER_PARAMS = {
    "none": (3.50, 3_504_872),
    "se": (3.56, 3_563_492),
    "cbam": (3.57, 3_565_192),
    "coordatt": (3.95, 3_951_504),
    "sk": (5.28, 5_279_584),
}


@pytest.mark.parametrize("enhancer", list(PAPER_PARAMS))
def test_parameter_counts_match_paper_table4(enhancer):
    paper_millions, exact = PAPER_PARAMS[enhancer]
    n = count_params(mobilenet_v2(enhancer))
    assert n == exact
    assert abs(n / 1e6 - paper_millions) <= 0.005


def test_meta_pooling_parameter_count():
    # Table 4 gives 3.91M for '+Meta-Pooling'. The searchable network has two C x C pointwise gate
    # convs per block plus 8 alphas (3.96M); a derived network keeps gates only where it chose 'strip',
    # so 3.91M is a genotype with 'strip' in most deep layers, which the paper does not list.
    assert count_params(mobilenet_v2("meta")) == 3_963_440
    assert count_params(mobilenet_v2(["skip"] * 17)) == 3_504_872 + 17  # one frozen alpha per layer
    # 'strip' in the last six blocks (96, 96, 160, 160, 160, 320 channels): 3.90M
    assert count_params(mobilenet_v2(["skip"] * 11 + ["strip"] * 6)) == 3_902_137


@pytest.mark.parametrize("candidates", [("strip",), ("skip", "avg3", "strip"), ("skip", "max3")])
def test_flops_of_the_fused_op_are_the_reference_convs(candidates):
    # The strip gate's pointwise convs run inside metapool::meta_pool; torch's flop counter must see
    # them as it sees the reference's nn.Conv1d, forward and backward.
    from torch.utils.flop_counter import FlopCounterMode

    totals = []
    for backend in ("auto", "torch"):
        torch.manual_seed(0)
        layer = FusedMetaPooling(24, candidates=candidates, backend=backend).double()
        x = torch.randn(3, 24, 9, 7, dtype=torch.float64, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            out = layer(x)
            forward = counter.get_total_flops()
            out.sum().backward()
        totals.append((forward, counter.get_total_flops()))
    assert totals[0] == totals[1]
    expected = 2 * 3 * 24 * 24 * (9 + 7) if "strip" in candidates else 0
    assert totals[0] == (expected, 3 * expected)


def test_macs_of_a_derived_network_count_its_strip_gates():
    kw = dict(width_mult=0.35, num_classes=10, in_chans=1, small_input=True)
    plain = count_macs(mobilenet_v2("none", **kw), (1, 1, 28, 28))
    strip = mobilenet_v2("strip", **kw)
    fused = count_macs(strip, (1, 1, 28, 28))
    for layer in meta_layers(strip):
        layer.backend = "torch"
    assert fused == count_macs(strip, (1, 1, 28, 28)) > plain


def test_macs_of_plain_mobilenet_v2():
    model = mobilenet_v2("none")
    flops = count_flops(model)
    assert flops % 2 == 0
    macs = flops // 2
    assert 300e6 <= macs <= 320e6  # torchvision's 300.8M multiply-adds; Table 1/4 report 0.30-0.32G
    assert count_macs(model, (1, 3, 224, 224)) == macs
    assert model.training  # mode restored
