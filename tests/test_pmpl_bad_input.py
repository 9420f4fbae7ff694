"""What a user can get wrong, and what a shared file can hold, must never run code, train on nonsense,
write over another run or end in a traceback: checkpoints load without unpickling code, settings are
checked where they enter, a run refuses an occupied --out folder, and the CLI answers every expected
failure with one ``error: ...`` line. Each probe is one row of a table; the loaders are fuzzed."""
from __future__ import annotations

import gzip
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from metapool_kernels.models import meta_layers
from metapool_kernels.pmpl import data as pdata
from metapool_kernels.pmpl import runs
from metapool_kernels.pmpl.cli import build_parser, main as cli_main, _config
from metapool_kernels.pmpl.search import SearchConfig, run_search
from metapool_kernels.pmpl.train import TrainConfig, run_eval, run_train
from test_pmpl import TinyNet, synthetic_bundle, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = dict(log=lambda *a: None)


def cli(argv, capsys):
    """(exit status, stderr) of the CLI; an expected failure must be one ``error:`` line."""
    try:
        rc = cli_main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors exit; the others return
        rc = e.code
    err = capsys.readouterr().err
    if rc != 0:
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return rc, err


# ---------------------------------------------------------------------------------------------
# Settings: checked where they enter (configs, the CLI).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kw, match", [
    (SearchConfig, dict(width=0), "width must be a positive finite number"),
    (SearchConfig, dict(width=-1), "width must be a positive"),
    (SearchConfig, dict(width=float("nan")), "width must be"),
    (SearchConfig, dict(lr=float("nan")), "lr must be a positive finite number"),
    (SearchConfig, dict(lr=float("inf")), "lr must be"),
    (SearchConfig, dict(lr=0), "lr must be"),
    (SearchConfig, dict(momentum=1.0), "momentum must be a number in \\[0, 1\\)"),
    (SearchConfig, dict(weight_decay=-1e-4), "weight_decay must be a finite number >= 0"),
    (SearchConfig, dict(epochs=0), "epochs must be a positive integer"),
    (SearchConfig, dict(epochs=2.5), "epochs must be a positive integer"),
    (SearchConfig, dict(batch_size=0), "batch_size must be a positive integer"),
    (SearchConfig, dict(batch_size=True), "batch_size must be a positive integer"),
    (SearchConfig, dict(workers=-1), "workers must be an integer >= 0"),
    (SearchConfig, dict(subset=0), "subset must be None or a positive integer"),
    (SearchConfig, dict(image_size=-28), "image_size must be"),
    (SearchConfig, dict(seed=-1), "seed must be an integer"),
    (SearchConfig, dict(device="tpu"), "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (SearchConfig, dict(device="cuda:x"), "device must be"),
    (SearchConfig, dict(out_dir=""), "out_dir must be a path"),
    (SearchConfig, dict(overwrite="yes"), "overwrite must be True or False"),
    (SearchConfig, dict(candidates=("skip", "conv3")), "unknown candidate"),
    (SearchConfig, dict(candidates=()), "at least one op"),
    (SearchConfig, dict(rho=0), "rho must be a number in \\(0, 1\\]"),
    (SearchConfig, dict(rho=1.5), "rho must be"),
    (SearchConfig, dict(alpha_lr=float("nan")), "alpha_lr must be"),
    (SearchConfig, dict(meta_fraction=1.0), "meta_fraction must be a number strictly between 0 and 1"),
    (SearchConfig, dict(alpha_betas=(0.5,)), "alpha_betas must be two numbers"),
    (SearchConfig, dict(alpha_betas=(0.5, 1.0)), "alpha_betas must be a number in \\[0, 1\\)"),
    (SearchConfig, dict(grad_clip=0.0), "grad_clip must be None or a positive"),
    (SearchConfig, dict(fix_every="batch"), "fix_every must be 'step' or 'epoch'"),
    (TrainConfig, dict(label_smoothing=1.0), "label_smoothing must be a number in \\[0, 1\\)"),
    (TrainConfig, dict(eval_every=-1), "eval_every must be an integer >= 0"),
    (TrainConfig, dict(enhancer=""), "enhancer must be None or a non-empty string"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_configs_refuse_bad_settings(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_configs_store_paths_as_strings(tmp_path):
    cfg = SearchConfig(out_dir=tmp_path / "run", data_dir=tmp_path)
    assert cfg.out_dir == str(tmp_path / "run") and cfg.data_dir == str(tmp_path)


@pytest.mark.parametrize("argv, match", [
    (["search", "--width", "0"], "argument --width: expected a positive finite number, got '0'"),
    (["search", "--width", "-1"], "argument --width"),
    (["search", "--lr", "nan"], "argument --lr: expected a positive finite number, got 'nan'"),
    (["search", "--lr", "inf"], "argument --lr"),
    (["search", "--lr", "fast"], "argument --lr: expected a positive finite number, got 'fast'"),
    (["search", "--momentum", "1"], "argument --momentum"),
    (["search", "--rho", "0"], "argument --rho: expected a number in \\(0, 1\\]"),
    (["search", "--meta-fraction", "1"], "argument --meta-fraction"),
    (["search", "--alpha-betas", "1", "0.9"], "argument --alpha-betas"),
    (["search", "--alpha-lr", "-1"], "argument --alpha-lr"),
    (["search", "--grad-clip", "0"], "argument --grad-clip"),
    (["search", "--workers", "-1"], "argument --workers: expected an integer >= 0"),
    (["search", "--seed", "-3"], "argument --seed"),
    (["search", "--epochs", "0"], "argument --epochs"),
    (["search", "--candidates", "skip,conv3"], "argument --candidates"),
    (["search", "--device", "tpu"], "argument --device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["search", "--bogus"], "unrecognized arguments: --bogus"),
    (["retrain", "--label-smoothing", "1"], "argument --label-smoothing"),
    (["retrain", "--eval-every", "-1"], "argument --eval-every"),
    (["retrain", "--enhancer", "bananas"], "unknown enhancer 'bananas'"),
    (["eval", "CKPT", "--batch-size", "0"], "argument --batch-size"),
    (["eval", "CKPT", "--device", "tpu"], "argument --device"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_refuses_bad_flags_in_one_line(argv, match, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(tmp_path / "x.pt") if a == "CKPT" else a for a in argv]
    if argv[0] != "eval":
        argv += ["--out", str(out)] + ([] if "--device" in argv else ["--device", "cpu"])
    rc, err = cli(argv, capsys)
    assert rc == 2 and re.search(match, err), err
    assert not out.exists()  # nothing written for a run that never started


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_a_gpu(tmp_path, capsys):
    rc, err = cli(["search", "--device", "cuda", "--out", tmp_path / "out"], capsys)
    assert rc == 2 and "device 'cuda': torch sees no CUDA device" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["out-is-a-file", "genotype-is-a-folder", "genotype-missing", "eval-folder",
                                  "eval-missing", "data-dir-is-a-file"])
def test_cli_names_the_wrong_path(case, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    out = tmp_path / "out"
    argv, match = {
        "out-is-a-file": (["search", "--out", a_file], "output folder .*notes.txt \\(--out\\) is a file"),
        "genotype-is-a-folder": (["retrain", "--genotype", tmp_path, "--out", out], "is not a file \\(a folder\\?"),
        "genotype-missing": (["retrain", "--genotype", tmp_path / "g.json", "--out", out],
                             "genotype file not found: .*g.json"),
        "eval-folder": (["eval", tmp_path], f"checkpoint {tmp_path} is not a file"),
        "eval-missing": (["eval", tmp_path / "c.pt"], "checkpoint not found: .*c.pt"),
        "data-dir-is-a-file": (["search", "--data-dir", a_file, "--out", out], "notes.txt is a file"),
    }[case]
    rc, err = cli(argv + ["--device", "cpu"], capsys)
    assert rc == 2 and re.search(match, err), err
    assert not out.exists() and a_file.read_text() == "hello"


# ---------------------------------------------------------------------------------------------
# Checkpoints never run code.
# ---------------------------------------------------------------------------------------------
class Payload:
    """What a crafted checkpoint would carry: unpickling it runs ``code``."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def crafted_checkpoint(path: Path, marker: Path, kind: str) -> Path:
    torch.save({"kind": kind, "version": 1, "config": {}, "model": Payload(f"open({str(marker)!r}, 'w').write('ran')")},
               path)
    return path


def test_the_crafted_checkpoint_is_live(tmp_path):
    """The payload the next tests refuse does run when a checkpoint is unpickled the unsafe way."""
    marker = tmp_path / "ran.txt"
    torch.load(crafted_checkpoint(tmp_path / "evil.pt", marker, "train"), weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("command", ["eval", "search --resume", "retrain --resume"])
def test_a_crafted_checkpoint_runs_nothing(command, tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    kind = "train" if command != "search --resume" else "search"
    evil = crafted_checkpoint(tmp_path / "evil.pt", marker, kind)
    argv = (["eval", evil] if command == "eval" else
            [command.split()[0], "--resume", evil, "--out", tmp_path / "out"]) + ["--device", "cpu"]
    rc, err = cli(argv, capsys)
    assert rc == 2 and "is refused: it holds more than tensors and plain values" in err and "exec" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# A run never writes over another run.
# ---------------------------------------------------------------------------------------------
def snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished search of the tiny network (genotype.json, checkpoint.pt, log.jsonl, plot)."""
    out = tmp_path_factory.mktemp("search")
    torch.manual_seed(0)
    run_search(tiny_config(out, epochs=1, alpha_lr=0.3, rho=0.1), model=TinyNet(), data=synthetic_bundle(), **QUIET)
    return out


def fixed_net():
    net = TinyNet()
    for layer, op in zip(meta_layers(net), ("avg3", "strip", "max5")):
        layer.fix(op)
    return net


def train_config(out, **kw):
    base = dict(epochs=1, batch_size=16, device="cpu", progress=False, channels_last=False, eval_every=0,
                out_dir=str(out))
    return TrainConfig(**{**base, **kw})


def test_a_run_refuses_a_folder_holding_another_run(searched):
    before = snapshot(searched)
    assert {"checkpoint.pt", "genotype.json", "log.jsonl"} <= before.keys()
    with pytest.raises(FileExistsError, match="already holds .* file\\(s\\).*--resume .*checkpoint.pt.*--overwrite"):
        run_search(tiny_config(searched), model=TinyNet(), data=synthetic_bundle(), **QUIET)
    with pytest.raises(FileExistsError, match="a run never writes over another"):
        run_train(train_config(searched), model=fixed_net(), data=synthetic_bundle(), **QUIET)
    assert snapshot(searched) == before


def test_a_folder_with_any_file_is_refused(tmp_path):
    (tmp_path / "README").write_text("mine")
    with pytest.raises(FileExistsError, match="README"):
        run_train(train_config(tmp_path), model=fixed_net(), data=synthetic_bundle(), **QUIET)


def test_overwrite_replaces_the_run_files_only(searched, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name, data in snapshot(searched).items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("mine")
    run_train(train_config(folder, overwrite=True), model=fixed_net(), data=synthetic_bundle(), **QUIET)
    left = snapshot(folder)
    # No stale genotype or plot from the search beside the retraining's checkpoint; foreign files stay.
    assert set(left) == {"checkpoint.pt", "log.jsonl", "notes.txt"} and left["notes.txt"] == b"mine"
    assert runs.load_checkpoint(folder / "checkpoint.pt")["kind"] == "train"
    assert '"kind": "train"' in left["log.jsonl"].decode() and '"kind": "search"' not in left["log.jsonl"].decode()


def test_overwrite_never_deletes_what_the_run_reads(searched, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name, data in snapshot(searched).items():
        (folder / name).write_bytes(data)
    before = snapshot(folder)
    with pytest.raises(ValueError, match="--overwrite would delete .*genotype.json, which this run reads"):
        run_train(train_config(folder, overwrite=True, genotype=str(folder / "genotype.json")), **QUIET)
    assert snapshot(folder) == before


def test_a_failed_start_leaves_nothing_behind(searched, tmp_path, monkeypatch):
    monkeypatch.setattr(pdata, "FASHION_MNIST_DIR", tmp_path / "no-data")
    new = tmp_path / "new"
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found"):
        run_train(train_config(new, enhancer="none"), **QUIET)
    assert not new.exists()
    # With --overwrite, a start that fails keeps the old run intact.
    before = snapshot(searched)
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found"):
        run_train(train_config(searched, enhancer="none", overwrite=True), **QUIET)
    assert snapshot(searched) == before


def test_resume_continues_in_its_own_folder_only(searched, tmp_path):
    ckpt = str(searched / "checkpoint.pt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "log.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="other"):
        run_search(tiny_config(other, resume=ckpt), model=TinyNet(), data=synthetic_bundle(), **QUIET)
    # The CLI's --resume without --out continues in the checkpoint's folder.
    ns = build_parser().parse_args(["search", "--resume", ckpt])
    assert Path(_config(SearchConfig, ns).out_dir) == searched
    ns = build_parser().parse_args(["retrain"])
    assert _config(TrainConfig, ns).out_dir == TrainConfig.out_dir


SEARCH_MUTATIONS = {
    "state.epoch": lambda g: {**g, "state": {**g["state"], "epoch": "1"}},
    "state.bogus": lambda g: {**g, "state": {**g["state"], "bogus": 1}},
    "state.history": lambda g: {**g, "state": {**g["state"], "history": [3]}},
    "fixed": lambda g: {**g, "fixed": ["max3", None, None]},
    "a_opt.betas": lambda g: {**g, "a_opt": {**g["a_opt"], "param_groups": [
        dict(group, betas=0.5) for group in g["a_opt"]["param_groups"]]}},
    "w_opt.groups": lambda g: {**g, "w_opt": {**g["w_opt"], "param_groups": []}},
    "model.alpha": lambda g: {**g, "model": {**g["model"], "mp0.alpha": torch.zeros(10)}},
    "model.candidates": lambda g: {**g, "model": {**g["model"], "mp1._extra_state": {
        "fixed": None, "candidates": ["strip", "skip", "avg3", "avg5", "avg7", "max3", "max5", "max7"]}}},
    "config.rho": lambda g: {**g, "config": {**g["config"], "rho": 5.0}},
    "config.missing": lambda g: {**g, "config": {k: v for k, v in g["config"].items() if k != "lr"}},
}


@pytest.mark.parametrize("label, match", [
    ("state.epoch", "epoch must be an integer >= 0"), ("state.bogus", "unexpected keyword argument 'bogus'"),
    ("state.history", "history must be a list of dicts"), ("fixed", "fixed set disagrees"),
    ("a_opt.betas", "betas'\\] should be a list of 2"), ("w_opt.groups", "expected 1 parameter group"),
    ("model.alpha", "size mismatch for mp0.alpha"), ("model.candidates", "mp1._extra_state: the state was saved"),
    ("config.rho", "rho must be a number in \\(0, 1\\]"), ("config.missing", "lacks the fields \\['lr'\\]"),
])
def test_a_broken_search_checkpoint_is_named_on_resume(label, match, searched, tmp_path):
    good = runs.load_checkpoint(searched / "checkpoint.pt")
    bad = tmp_path / "bad.pt"
    torch.save(SEARCH_MUTATIONS[label](good), bad)
    with pytest.raises(ValueError, match=f"{bad}: .*{match}"):
        run_search(tiny_config(tmp_path / "out", resume=str(bad)), model=TinyNet(), data=synthetic_bundle(), **QUIET)
    assert not (tmp_path / "out").exists()


def test_the_demo_writes_into_a_fresh_folder_each_time(tmp_path):
    from metapool_kernels.demo import fresh_folder

    a, b = fresh_folder(tmp_path), fresh_folder(tmp_path)
    assert a != b and a.parent == b.parent == tmp_path and not list(a.iterdir()) and not list(b.iterdir())


# ---------------------------------------------------------------------------------------------
# Non-finite losses and α stop the run, naming the step.
# ---------------------------------------------------------------------------------------------
def test_search_stops_at_a_nan_loss(tmp_path):
    model = TinyNet()
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(FloatingPointError,
                       match="search step 1: loss_tr = nan, loss_mt = nan, .* not finite; lower the learning rates"):
        run_search(tiny_config(tmp_path), model=model, data=synthetic_bundle(), **QUIET)


def test_search_stops_at_a_non_finite_alpha(tmp_path, monkeypatch):
    from metapool_kernels.pmpl import search

    real_step = search.bilevel_step
    calls = []

    def poisoned(*args, **kw):  # the third step leaves an infinite α behind
        stats = real_step(*args, **kw)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                args[2][1].alpha[0] = float("inf")
        return stats

    monkeypatch.setattr(search, "bilevel_step", poisoned)
    with pytest.raises(FloatingPointError, match="search step 3: alpha of layer\\(s\\) \\[1\\] not finite"):
        run_search(tiny_config(tmp_path), model=TinyNet(), data=synthetic_bundle(), **QUIET)


def test_retrain_stops_at_a_nan_loss(tmp_path):
    net = fixed_net()
    with torch.no_grad():
        net.head.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="epoch 1, step 1: the training loss is nan; lower --lr"):
        run_train(train_config(tmp_path), model=net, data=synthetic_bundle(), **QUIET)


# ---------------------------------------------------------------------------------------------
# Data files: corrupt ones are named, with the problem.
# ---------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = gzip.compress(header + array.astype(np.uint8).tobytes())
    path.write_bytes(data[:len(data) - truncate] if truncate else data)


def fake_fashion(root: Path, **broken) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        images, labels = pdata.FASHION_MNIST_FILES[split]
        write_idx(root / images, rng.integers(0, 255, (n, 28, 28)), truncate=broken.get(images, 0))
        write_idx(root / labels, rng.integers(0, 10, (n,)), truncate=broken.get(labels, 0))
    return root


@pytest.mark.parametrize("problem, match", [
    ("truncated", "t10k-images-idx3-ubyte.gz is truncated or corrupt"),
    ("not-gzip", "t10k-images-idx3-ubyte.gz is truncated or corrupt"),
    ("header", "t10k-images-idx3-ubyte.gz: header says"),
    ("labels", "t10k-labels-idx1-ubyte.gz holds labels outside 0..9"),
    ("shape", "holds images of shape \\(28,\\), not 28x28"),
])
def test_corrupt_fashion_mnist_names_the_file(problem, match, tmp_path, monkeypatch, capsys):
    root = fake_fashion(tmp_path / "fm")
    test_images, test_labels = pdata.FASHION_MNIST_FILES["test"]
    if problem == "truncated":
        fake_fashion(root, **{test_images: 300})
    elif problem == "not-gzip":
        (root / test_images).write_bytes(b"\x1f\x8b this is no gzip stream")
    elif problem == "header":
        write_idx(root / test_images, np.zeros((20, 28, 28)))
        data = gzip.decompress((root / test_images).read_bytes())
        (root / test_images).write_bytes(gzip.compress(data[:-100]))
    elif problem == "labels":
        write_idx(root / test_labels, np.full((20,), 12))
    else:
        write_idx(root / test_images, np.zeros((20, 28)))
    with pytest.raises(ValueError, match=match):
        pdata.build_data(fashion_root=str(root), batch_size=8)
    monkeypatch.setattr(pdata, "FASHION_MNIST_DIR", root)
    rc, err = cli(["retrain", "--enhancer", "none", "--out", tmp_path / "out", "--device", "cpu"], capsys)
    assert rc == 2 and str(root) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_non_image_in_an_image_folder_is_named(workers, tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (60 * i, 90, 0)).save(d / f"{i}.png")
    bad = tmp_path / "val" / "dog" / "notes.png"
    bad.write_text("not an image at all")
    bundle = pdata.build_data(data_dir=str(tmp_path), image_size=8, batch_size=4, workers=workers, meta_fraction=None)
    with pytest.raises(ValueError) as exc:
        list(bundle.test)
    msg = str(exc.value)
    assert msg.startswith(f"{bad} is not a readable image") and "\n" not in msg, msg


# ---------------------------------------------------------------------------------------------
# Checkpoints: wrong kinds, missing entries, a model for other data; a fuzz of the loader.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished retraining of a narrow MobileNetV2 (model_config stored: eval and resume rebuild it)
    on 1-channel synthetic 12x12 images in 4 classes; its checkpoint's contents."""
    out = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    run_train(train_config(out, width=0.35, enhancer="avgpool"), data=synthetic_bundle(n=32), **QUIET)
    return out / "checkpoint.pt", runs.load_checkpoint(out / "checkpoint.pt")


def image_folder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b", "c", "d"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (12, 12), (50, 100, 150)).save(root / split / c / "0.png")
    return root


def test_eval_refuses_a_network_for_other_images(trained, tmp_path, capsys):
    path, _ = trained
    folder = image_folder(tmp_path / "rgb")
    with pytest.raises(ValueError, match="holds a network for 1-channel images in 4 classes; .* has 3-channel"):
        run_eval(str(path), data_dir=str(folder), device="cpu", workers=0, progress=False, **QUIET)
    rc, err = cli(["eval", path, "--data-dir", folder, "--device", "cpu", "--workers", "0"], capsys)
    assert rc == 2 and "1-channel" in err


@pytest.mark.parametrize("change, match", [
    (dict(kind="bananas"), "not a metapool_kernels.pmpl checkpoint \\(kind 'bananas'"),
    (dict(kind=None), "kind None"),
    (dict(version=7), "checkpoint version 7"),
    (dict(opt=None), "entry 'opt' is a NoneType"),
    (dict(epoch="3"), "entry 'epoch' is a str"),
], ids=str)
def test_bad_checkpoints_are_refused_before_use(change, match, trained, tmp_path, capsys):
    path, good = trained
    bad = tmp_path / "bad.pt"
    torch.save({**good, **change}, bad)
    with pytest.raises(ValueError, match=match):
        runs.load_checkpoint(bad)
    rc, err = cli(["eval", bad, "--device", "cpu"], capsys)
    assert rc == 2 and str(bad) in err


@pytest.mark.parametrize("missing", ["config", "model", "opt", "sched", "epoch", "history", "rng", "model_config"])
def test_a_checkpoint_missing_an_entry_is_named(missing, trained, tmp_path, capsys):
    path, good = trained
    bad = tmp_path / "bad.pt"
    torch.save({k: v for k, v in good.items() if k != missing}, bad)
    rc, err = cli(["retrain", "--resume", bad, "--out", tmp_path / "out", "--device", "cpu"], capsys)
    assert rc == 2 and f"has no {missing!r} entry" in err
    assert not (tmp_path / "out").exists()


def _mutations(good):
    """(label, checkpoint) pairs: entries replaced by values of the right type that the loader cannot
    judge alone, and wrong values inside the config, the network's description, its weights, the
    optimiser, scheduler and RNG states."""
    for key, value in [("name", None), ("name", "x"), ("world_size", 42), ("data", {}), ("history", []),
                       ("model_config", None), ("model_config", {}), ("config", {}), ("epoch", 42), ("sched", {}),
                       ("rng", []), ("opt", {})]:
        yield f"{key}={value!r}", {**good, key: value}

    def nested(key, sub, value):
        inner = dict(good[key])
        if value is KeyError:
            inner.pop(sub)
        else:
            inner[sub] = value
        return {**good, key: inner}

    for sub, value in [("width", -1), ("lr", "x"), ("candidates", ["conv"]), ("bogus", 1), ("epochs", 0),
                       ("seed", 2.5), ("data_dir", 5), ("image_size", [28])]:
        yield f"config.{sub}", nested("config", sub, value)
    for sub, value in [("in_chans", 0), ("enhancer", "bananas"), ("enhancer", [3]), ("bogus", 1),
                       ("width_mult", float("nan")), ("num_classes", "4"), ("enhancer", KeyError)]:
        yield f"model_config.{sub}", nested("model_config", sub, value)
    first = next(iter(good["model"]))
    extra = next(k for k in good["model"] if k.endswith("_extra_state"))
    for sub, value in [(first, torch.zeros(3)), (first, KeyError), ("bogus.weight", torch.zeros(1)),
                       (extra, 42), (extra, {"fixed": "max3", "candidates": ["avg3"]}), (first, "x")]:
        yield f"model.{sub}", nested("model", sub, value)
    groups = [dict(g, lr="x") for g in good["opt"]["param_groups"]]
    yield "opt.lr", {**good, "opt": {**good["opt"], "param_groups": groups}}
    yield "opt.groups", {**good, "opt": {**good["opt"], "param_groups": []}}
    state = {i: {k: torch.zeros(1) for k in s} for i, s in good["opt"]["state"].items()}
    yield "opt.state-shape", {**good, "opt": {**good["opt"], "state": state}}
    yield "sched.last_epoch", nested("sched", "last_epoch", "x")
    yield "sched.base_lrs", nested("sched", "base_lrs", [1.0, 2.0, 3.0])
    yield "rng.empty-dict", {**good, "rng": [{}]}
    yield "rng.torch", {**good, "rng": [{**good["rng"][0], "torch": torch.zeros(3)}]}
    yield "rng.numpy", {**good, "rng": [{**good["rng"][0], "numpy": {"key": 1}}]}
    yield "rng.python", {**good, "rng": [{**good["rng"][0], "python": (3, (1, 2), None)}]}
    yield "history", {**good, "history": [1, 2]}
    yield "epoch", {**good, "epoch": -1}


def test_checkpoint_loader_fuzz(trained, tmp_path):
    """Random bytes, truncations and entries of wrong types: a ValueError naming the file from
    load_checkpoint; wrong values inside the entries: a ValueError naming the file from eval and
    from resume, or a run that works (an entry it does not use). Never another exception."""
    path, good = trained
    raw = path.read_bytes()
    bad = tmp_path / "bad.pt"
    rng = random.Random(0)
    blobs = [raw[:n] for n in sorted({0, 1, 10, 100, len(raw) // 3, len(raw) // 2, len(raw) - 1}
                                     | {rng.randrange(len(raw)) for _ in range(8)})]
    blobs += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))) for _ in range(12)]
    blobs += [raw[:1000] + bytes(rng.randrange(256) for _ in range(500)) + raw[1500:]]
    for blob in blobs:
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match=str(bad)):
            runs.load_checkpoint(bad)
    for value in ([1, 2], "text", 3.5, None, (1,)):
        torch.save(value, bad)
        with pytest.raises(ValueError, match="not a metapool_kernels.pmpl checkpoint"):
            runs.load_checkpoint(bad)
    # Every entry of the wrong type (on a checkpoint without weights, which the loader need not read).
    light = {**good, "model": {}, "opt": {}, "sched": {}, "rng": [], "history": [], "data": {}}
    for key in good:
        for value in (None, 42, "x", {}, [], torch.zeros(2), 1.5, True):
            torch.save({**light, key: value}, bad)
            try:
                runs.load_checkpoint(bad)
            except ValueError as e:
                assert str(bad) in str(e), (key, value, e)
            else:  # accepted: then the value has the entry's type
                accepted = type(value) is type(light[key]) or value is None and key in ("name", "model_config")
                assert accepted, (key, value)

    folder = image_folder(tmp_path / "data")
    outcomes = {}
    for n, (label, ckpt) in enumerate(_mutations(good)):
        torch.save(ckpt, bad)
        part = label.split(".")[0]
        # Eval reads the config, the network's description and its weights; resume everything else
        # too, but of the description only the enhancer.
        entries = (("resume",) if part in ("opt", "sched", "rng", "history", "epoch") else
                   ("eval",) if part == "model_config" and label != "model_config.enhancer" else ("eval", "resume"))
        for entry in entries:
            try:
                if entry == "eval":
                    run_eval(str(bad), device="cpu", test_subset=4, batch_size=4, progress=False, **QUIET,
                             data_dir=str(folder), workers=0)
                else:
                    run_train(train_config(tmp_path / f"resume{n}", resume=str(bad)), data=synthetic_bundle(n=32),
                              **QUIET)
                outcomes[label, entry] = "ran"
            except ValueError as e:
                assert str(bad) in str(e), (label, entry, e)
                outcomes[label, entry] = "refused"
    # Eval on 3-channel images is always refused (the network is for 1 channel), by the mismatch if
    # not before; resume refuses every broken entry it uses.
    assert all(v == "refused" for (label, entry), v in outcomes.items() if entry == "eval"), outcomes
    ran = sorted(label for (label, entry), v in outcomes.items() if entry == "resume" and v == "ran")
    # What resume may ignore: values of the right type in the entries it only reports (name, world
    # size, loader state), no history, and the stored network description (a resumed run rebuilds
    # the network from its config and data).
    assert set(ran) == {"name=None", "name='x'", "world_size=42", "history=[]", "data={}", "model_config=None",
                        "model_config={}"}, ran
    assert ("model_config.enhancer", "resume") in outcomes and outcomes["model_config.enhancer", "resume"] == "refused"
