"""PMPL trainer: the bi-level step of Eq. 3, progressive early stopping (Eq. 4), genotype files,
resume, data, the CLI and the demo. Tiny networks and data keep the whole file to seconds on a CPU."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from metapool_kernels import PAPER_CANDIDATES, FusedMetaPooling
from metapool_kernels.pmpl import data as pdata
from metapool_kernels.pmpl.cli import main as cli_main
from metapool_kernels.pmpl.data import DataBundle, TensorLoader, random_crop_flip, shard_order, split_indices
from metapool_kernels.models import alpha_parameters, meta_layers, weight_parameters
from metapool_kernels.pmpl.search import SearchConfig, bilevel_step, margin, progressive_early_stopping, run_search
from metapool_kernels.reference import candidate_op


# ---------------------------------------------------------------------------------------------
# A tiny searchable network and data it can learn (shared with test_pmpl_ddp.py).
# ---------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """Three Meta-Pooling layers between small conv stages; BatchNorm so buffers matter too."""

    def __init__(self, num_classes: int = 4, candidates=PAPER_CANDIDATES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.mp0 = FusedMetaPooling(6, candidates)
        self.down = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.mp1 = FusedMetaPooling(8, candidates)
        self.mp2 = FusedMetaPooling(8, candidates)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.mp2(self.mp1(self.down(self.mp0(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def synthetic_images(n: int = 96, size: int = 12, num_classes: int = 4, seed: int = 0):
    """uint8 images whose class sets which quadrant is bright, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randint(0, 90, (n, 1, size, size), generator=g)
    h = size // 2
    for c in range(num_classes):
        r, q = divmod(c, 2)
        images[labels == c, :, r * h:(r + 1) * h, q * h:(q + 1) * h] += 140
    return images.clamp(0, 255).to(torch.uint8), labels


def synthetic_bundle(n: int = 96, batch_size: int = 16, seed: int = 0, rank: int = 0, world_size: int = 1) -> DataBundle:
    images, labels = synthetic_images(n, seed=seed)
    train_idx, meta_idx = split_indices(torch.arange(n), 0.5, seed)
    kw = dict(mean=(0.4,), std=(0.3,), pad=2, rank=rank, world_size=world_size)
    per_rank = batch_size // world_size
    return DataBundle(
        train=TensorLoader(images, labels, train_idx, per_rank, train=True, seed=seed, **kw),
        meta=TensorLoader(images, labels, meta_idx, per_rank, train=True, seed=seed + 101, **kw),
        test=TensorLoader(images, labels, torch.arange(n), per_rank, train=False, seed=seed, **kw),
        num_classes=4, in_chans=1, image_size=12, name="synthetic")


def tiny_config(tmp_path, **kw) -> SearchConfig:
    base = dict(epochs=2, batch_size=16, lr=0.05, alpha_lr=0.05, rho=0.2, device="cpu", seed=0,
                out_dir=str(tmp_path), progress=False, channels_last=False)
    base.update(kw)
    return SearchConfig(**base)


def make_optimizers(model, lr=0.05, alpha_lr=0.05):
    alphas, weights = alpha_parameters(model), weight_parameters(model)
    w_opt = torch.optim.SGD(weights, lr=lr, momentum=0.9, weight_decay=4e-5)
    a_opt = torch.optim.Adam(alphas, lr=alpha_lr, betas=(0.5, 0.999), weight_decay=1e-3)
    return alphas, weights, w_opt, a_opt


def batches(seed=0):
    bundle = synthetic_bundle(seed=seed)
    return next(iter(bundle.train)), next(iter(bundle.meta))


# ---------------------------------------------------------------------------------------------
# Eq. 3: who gets which gradient, and the virtual step.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fresh", [False, True], ids=["reuse-grad", "fresh-grad"])
def test_bilevel_step_gradients_flow_to_the_right_level(fresh):
    torch.manual_seed(0)
    model = TinyNet()
    layers = meta_layers(model)
    alphas, weights, w_opt, a_opt = make_optimizers(model)
    with torch.no_grad():  # break the symmetry of α = 0 so every gradient is non-trivial
        for a in alphas:
            a.normal_(0, 0.3)
    (x_tr, y_tr), (x_mt, y_mt) = batches()
    lr = 0.05
    before = copy.deepcopy(model)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers0 = {n: b.detach().clone() for n, b in model.named_buffers()}

    # Reference gradients on copies: ∇θ L_tr(θ, α) and ∇α L_mt(θ', α) with θ' = θ − lr ∇θ L_tr.
    ref = copy.deepcopy(before)
    nn.functional.cross_entropy(ref(x_tr), y_tr).backward()
    ref_theta_grad = {n: p.grad.clone() for n, p in ref.named_parameters() if not n.endswith("alpha")}
    virt = copy.deepcopy(before)
    with torch.no_grad():
        for n, p in virt.named_parameters():
            if n in ref_theta_grad:
                p -= lr * ref_theta_grad[n]
    meta_loss = nn.functional.cross_entropy(virt(x_mt), y_mt)
    ref_alpha_grad = torch.autograd.grad(meta_loss, [m.alpha for m in meta_layers(virt)])

    seen = {}

    def hook(phase):
        seen[phase] = True
        if phase == "train_grad":
            # L_tr reaches θ only: α has no gradient at all.
            assert all(a.grad is None for a in alphas)
            for n, p in model.named_parameters():
                if n in ref_theta_grad:
                    torch.testing.assert_close(p.grad, ref_theta_grad[n], rtol=1e-5, atol=1e-6)
            seen["theta_grad"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        elif phase == "virtual":
            for n, p in model.named_parameters():
                if n in ref_theta_grad:
                    torch.testing.assert_close(p, theta0[n] - lr * seen["theta_grad"][n])
        elif phase == "meta":
            # L_mt reaches α only: θ's gradient is exactly what L_tr left there.
            for n, p in model.named_parameters():
                if n in seen["theta_grad"]:
                    assert torch.equal(p.grad, seen["theta_grad"][n]), n
            for a, g in zip(alphas, ref_alpha_grad):
                torch.testing.assert_close(a.grad, g, rtol=1e-4, atol=1e-7)
            assert not all(torch.equal(a, theta0[n]) for n, a in model.named_parameters() if n.endswith("alpha"))
        elif phase == "restore":
            # θ (and the BatchNorm statistics the meta forward touched) exactly as before the virtual step;
            # the running statistics are those of the L_tr forward alone.
            for n, p in model.named_parameters():
                if not n.endswith("alpha"):
                    assert torch.equal(p, theta0[n]), n
            for n, b in model.named_buffers():
                assert torch.equal(b, dict(ref.named_buffers())[n]), n

    stats = bilevel_step(model, model, layers, weights, w_opt, a_opt, (x_tr, y_tr), (x_mt, y_mt), lr=lr,
                         fresh_train_grad=fresh, phase_hook=hook)
    assert set(seen) >= {"train_grad", "virtual", "meta", "restore", "update"}
    assert all(math.isfinite(v) for v in stats.values())
    assert all(a.requires_grad for a in alphas)  # the L_tr phase froze α only temporarily
    assert any(not torch.equal(p, theta0[n]) for n, p in model.named_parameters() if not n.endswith("alpha"))
    assert buffers0.keys() == dict(model.named_buffers()).keys()


def test_virtual_step_restores_parameters_bitwise_over_many_steps():
    torch.manual_seed(1)
    model = TinyNet()
    layers = meta_layers(model)
    _, weights, w_opt, a_opt = make_optimizers(model)
    bundle = synthetic_bundle()
    snapshots = {}

    def hook(phase):
        if phase == "train_grad":
            snapshots["theta"] = [p.detach().clone() for p in weights]
            snapshots["buffers"] = [b.detach().clone() for b in model.buffers()]
        elif phase == "virtual":
            assert any(not torch.equal(p, s) for p, s in zip(weights, snapshots["theta"]))
        elif phase == "restore":
            assert all(torch.equal(p, s) for p, s in zip(weights, snapshots["theta"]))
            assert all(torch.equal(b, s) for b, s in zip(model.buffers(), snapshots["buffers"]))

    for b_tr, b_mt in zip(bundle.train, bundle.meta):
        bilevel_step(model, model, layers, weights, w_opt, a_opt, b_tr, b_mt, lr=0.1, phase_hook=hook)


# ---------------------------------------------------------------------------------------------
# Eq. 4: progressive early stopping.
# ---------------------------------------------------------------------------------------------
def set_probs(layer, probs):
    with torch.no_grad():
        layer.alpha.copy_(torch.log(torch.tensor(probs, dtype=torch.float64)).float())


def test_margin_is_the_left_side_of_eq4():
    k, gap = margin(torch.tensor([0.1, 0.5, 0.3, 0.1]))
    assert k == 1 and gap == pytest.approx(0.2)
    assert margin(torch.tensor([1.0]))[1] == math.inf


@pytest.mark.parametrize("rho", [0.2, 0.1, 0.35])
def test_early_stopping_fixes_exactly_at_rho(rho):
    model = TinyNet()
    layers = meta_layers(model)
    eps = 1e-4
    rest = (1.0 - 0.45) / 7  # π_k = 0.45 on 'strip' for the first layer
    above = [rest] * 7 + [0.45]
    # Second layer: argmax 'max5' with margin ρ + eps over the runner-up; third: margin ρ − eps.
    def crafted(gap, k):
        top = 0.5
        second = top - gap
        others = (1.0 - top - second) / 6
        p = [others] * 8
        p[k], p[(k + 1) % 8] = top, second
        return p
    set_probs(layers[0], above)
    set_probs(layers[1], crafted(rho + eps, PAPER_CANDIDATES.index("max5")))
    set_probs(layers[2], crafted(rho - eps, PAPER_CANDIDATES.index("avg3")))
    events = progressive_early_stopping(layers, rho)
    margin0 = 0.45 - rest
    expect_first = margin0 >= rho
    assert (layers[0].fixed == "strip") == expect_first
    assert layers[1].fixed == "max5"
    assert layers[2].fixed is None and layers[2].alpha.requires_grad
    assert [e["layer"] for e in events] == ([0, 1] if expect_first else [1])
    ev = events[-1]
    assert ev["op"] == "max5" and ev["margin"] == pytest.approx(rho + eps, abs=1e-6)
    assert not layers[1].alpha.requires_grad
    # Already fixed layers are not reconsidered.
    assert progressive_early_stopping(layers, rho) == []


def test_early_stopping_boundary_is_inclusive():
    layer = meta_layers(TinyNet())[0]
    set_probs(layer, [0.05, 0.05, 0.05, 0.4, 0.2, 0.1, 0.1, 0.05])
    _, gap = margin(torch.softmax(layer.alpha.detach().double(), 0))
    assert progressive_early_stopping([layer], math.nextafter(gap, math.inf)) == []
    assert layer.fixed is None
    assert [e["op"] for e in progressive_early_stopping([layer], gap)] == ["avg7"]  # margin == ρ fixes


def test_fixed_layers_stop_updating_and_compute_only_their_op():
    torch.manual_seed(2)
    model = TinyNet()
    layers = meta_layers(model)
    _, weights, w_opt, a_opt = make_optimizers(model, alpha_lr=0.1)
    set_probs(layers[1], [0.04, 0.04, 0.04, 0.04, 0.6, 0.08, 0.08, 0.08])
    progressive_early_stopping(layers, 0.2)
    assert layers[1].fixed == "max3" and layers[0].fixed is None
    frozen = {n: p.detach().clone() for n, p in layers[1].named_parameters()}
    a0 = layers[0].alpha.detach().clone()
    bundle = synthetic_bundle()
    for b_tr, b_mt in zip(bundle.train, bundle.meta):
        bilevel_step(model, model, layers, weights, w_opt, a_opt, b_tr, b_mt, lr=0.1)
    for n, p in layers[1].named_parameters():  # α and the unused strip gates are untouched
        assert torch.equal(p, frozen[n]), n
    assert not torch.equal(layers[0].alpha, a0)  # searchable layers keep learning
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(layers[1](x), candidate_op("max3", x))


# ---------------------------------------------------------------------------------------------
# The search loop: genotype files, checkpoints, resume.
# ---------------------------------------------------------------------------------------------
def test_search_writes_genotype_plot_logs_and_round_trips(tmp_path):
    from metapool_kernels.models import load_genotype

    torch.manual_seed(0)
    res = run_search(tiny_config(tmp_path, epochs=2, alpha_lr=0.3, rho=0.1), model=TinyNet(),
                     data=synthetic_bundle(), log=lambda *a: None)
    assert res.done and res.genotype_path and res.plot_path and res.plot_path.stat().st_size > 10_000
    assert load_genotype(res.genotype_path) == res.genotype
    meta = json.loads(res.genotype_path.read_text())
    assert meta["rho"] == 0.1 and meta["candidates"] == list(PAPER_CANDIDATES)
    assert meta["blocks"] == []  # TinyNet's layers follow no EnhancedBlock; a network's block names otherwise
    assert len(meta["fix_events"]) == len(res.events) and res.events  # α lr 0.3 fixes some layers
    for e in res.events:
        assert res.genotype[e["layer"]] == e["op"] and e["margin"] >= 0.1
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    kinds = [r["event"] for r in logs]
    assert kinds[0] == "start" and kinds[-1] == "done" and "epoch" in kinds
    assert kinds.count("fix") == len(res.events)
    hist = json.loads((tmp_path / "alpha_history.json").read_text())
    assert hist["history"][0]["step"] == 0 and len(hist["history"][0]["probs"]) == 3
    assert "Genotype" in res.table and all(op in res.table for op in res.genotype)


def test_search_ends_when_every_layer_is_fixed(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    for layer, op in zip(meta_layers(model)[:2], ("skip", "strip")):
        layer.fix(op)
    res = run_search(tiny_config(tmp_path, epochs=5, alpha_lr=1.0, rho=0.05), model=model,
                     data=synthetic_bundle(), log=lambda *a: None)
    assert res.done and all(m.fixed for m in meta_layers(model))
    assert res.steps < 5 * res.steps_per_epoch  # stopped early, as "while not all fixed"
    assert res.genotype[:2] == ["skip", "strip"]


def test_resume_reaches_the_same_state(tmp_path):
    kw = dict(epochs=3, alpha_lr=0.2, rho=0.12)
    torch.manual_seed(0)
    full_model = TinyNet()
    full = run_search(tiny_config(tmp_path / "full", **kw), model=full_model, data=synthetic_bundle(),
                      log=lambda *a: None)

    torch.manual_seed(0)
    part_model = TinyNet()
    part = run_search(tiny_config(tmp_path / "part", **kw), model=part_model, data=synthetic_bundle(),
                      stop_after_epochs=1, log=lambda *a: None)
    assert not part.done and part.epochs == 1 and part.genotype_path is None
    torch.manual_seed(12345)  # a fresh process: different global RNG, rebuilt model and data
    resumed_model = TinyNet()
    resumed = run_search(tiny_config(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint.pt"), **kw),
                         model=resumed_model, data=synthetic_bundle(), log=lambda *a: None)

    assert resumed.done and resumed.steps == full.steps and resumed.epochs == full.epochs
    a, b = full_model.state_dict(), resumed_model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    assert resumed.events == full.events and resumed.genotype == full.genotype
    assert resumed.history == full.history
    ca = torch.load(full.checkpoint_path, weights_only=True)
    cb = torch.load(resumed.checkpoint_path, weights_only=True)
    for key in ("a_opt", "w_opt"):
        for (i, sa), (j, sb) in zip(sorted(ca[key]["state"].items()), sorted(cb[key]["state"].items())):
            for name in sa:
                assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), (key, i, name)
    assert ca["sched"]["last_epoch"] == cb["sched"]["last_epoch"]


def test_retrain_resume_reaches_the_same_state(tmp_path):
    from metapool_kernels.pmpl.train import TrainConfig, run_train

    def fixed_net():
        torch.manual_seed(0)
        net = TinyNet()
        for layer, op in zip(meta_layers(net), ("avg3", "strip", "max5")):
            layer.fix(op)
        return net

    kw = dict(epochs=3, batch_size=16, device="cpu", progress=False, channels_last=False, eval_every=2)
    full_net, part_net, resumed_net = fixed_net(), fixed_net(), fixed_net()
    full = run_train(TrainConfig(out_dir=str(tmp_path / "full"), **kw), model=full_net, data=synthetic_bundle(),
                     log=lambda *a: None)
    run_train(TrainConfig(out_dir=str(tmp_path / "part"), **kw), model=part_net, data=synthetic_bundle(),
              stop_after_epochs=2, log=lambda *a: None)
    torch.manual_seed(99)
    resumed = run_train(TrainConfig(out_dir=str(tmp_path / "part"), resume=str(tmp_path / "part" / "checkpoint.pt"),
                                    **kw), model=resumed_net, data=synthetic_bundle(), log=lambda *a: None)
    for (k, a), b in zip(full_net.state_dict().items(), resumed_net.state_dict().values()):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), k
    assert (resumed.top1, resumed.top5, resumed.epochs) == (full.top1, full.top5, 3)
    assert [h.get("test") for h in resumed.history] == [h.get("test") for h in full.history]


def test_resume_rejects_a_foreign_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"kind": "train"}, bad)
    with pytest.raises(ValueError, match="expected a 'search'"):
        run_search(tiny_config(tmp_path, resume=str(bad)), model=TinyNet(), data=synthetic_bundle())


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------
def test_batched_crop_flip_matches_per_sample_reference():
    x = torch.randn(6, 2, 5, 7)
    g = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, 2, g)
    g = torch.Generator().manual_seed(3)
    offsets = torch.randint(0, 5, (2, 6), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        oy, ox = offsets[:, i].tolist()
        ref = padded[i, :, oy:oy + 5, ox:ox + 7]
        torch.testing.assert_close(out[i], ref.flip(2) if flips[i] else ref)


def test_splits_are_seeded_disjoint_and_sharded():
    tr, mt = split_indices(torch.arange(100), 0.5, seed=4)
    assert len(tr) == len(mt) == 50 and not set(tr.tolist()) & set(mt.tolist())
    assert torch.equal(split_indices(torch.arange(100), 0.5, seed=4)[0], tr)
    shards = [shard_order(tr, shuffle=True, seed=0, epoch=1, rank=r, world_size=3) for r in range(3)]
    assert {len(s) for s in shards} == {17} and set(torch.cat(shards).tolist()) == set(tr.tolist())
    evals = [shard_order(tr, shuffle=False, seed=0, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert sorted(torch.cat(evals).tolist()) == sorted(tr.tolist())
    assert not torch.equal(shard_order(tr, shuffle=True, seed=0, epoch=1, rank=0, world_size=1),
                           shard_order(tr, shuffle=True, seed=0, epoch=2, rank=0, world_size=1))


def test_fashion_mnist_bundle_subset_and_split():
    bundle = pdata.build_data(subset=640, test_subset=100, batch_size=64)
    assert bundle.num_classes == 10 and bundle.in_chans == 1 and bundle.image_size == 28
    assert len(bundle.train) == 5 and len(bundle.meta) == 5 and len(bundle.test) == 2
    x, y = next(iter(bundle.train))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.3 and 0.7 < x.std().item() < 1.3


def test_missing_data_set_says_how_to_install(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        pdata.build_data(fashion_root=str(tmp_path))
    monkeypatch.setattr(pdata, "FASHION_MNIST_DIR", tmp_path)
    assert cli_main(["search", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and "apt-get install" in err and "Traceback" not in err


def test_image_folder_data(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (20, 20), (40 * i, 100 if c == "cat" else 200, 0)).save(d / f"{i}.png")
    bundle = pdata.build_data(data_dir=str(tmp_path), image_size=16, batch_size=4, workers=0)
    assert bundle.num_classes == 2 and bundle.in_chans == 3 and bundle.classes == ("cat", "dog")
    assert len(bundle.train) == 1 and len(bundle.meta) == 1
    x, y = next(iter(bundle.train))
    assert x.shape == (4, 3, 16, 16)
    (tmp_path / "train").rename(tmp_path / "training")
    with pytest.raises(FileNotFoundError, match="has no 'train' folder"):
        pdata.build_data(data_dir=str(tmp_path), image_size=16)


# ---------------------------------------------------------------------------------------------
# What a user sees.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [[], ["search"], ["retrain"], ["eval"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m metapool_kernels.pmpl" in out
    if argv == ["search"]:
        assert "--rho" in out and "--resume" in out and "--subset" in out and "(default 0.2)" in out


def test_cli_rejects_a_bad_genotype_file(tmp_path, capsys):
    bad = tmp_path / "genotype.json"
    bad.write_text(json.dumps({"genotype": ["skip", "conv9"]}))
    assert cli_main(["retrain", "--genotype", str(bad), "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown op" in err and "conv9" in err
    bad.write_text("{not json")
    assert cli_main(["retrain", "--genotype", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    from metapool_kernels import demo
    from metapool_kernels.pmpl.train import run_eval

    summary = demo.main(profile="tiny", out_dir=tmp_path)
    out = capsys.readouterr().out
    assert "Genotype" in out and "Accuracy" in out and "alpha_history.png" in out
    assert "What it cannot show: which enhancer is better" in out and "ablation" in out
    assert Path(summary["plot"]).is_file() and Path(summary["genotype"]).is_file()
    assert len(summary["genotype_ops"]) == 17
    rows = {r["name"]: r for r in summary["results"]}
    assert list(rows) == ["MobileNetV2 + PMPL genotype", "MobileNetV2 + Random genotype", "MobileNetV2 (no enhancer)"]
    derived = summary["results"][0]
    again = run_eval(str(derived["checkpoint"]), test_subset=summary["test_subset"], progress=False,
                     device="cpu", log=lambda *a: None)
    assert again["top1"] == pytest.approx(derived["top1"])
