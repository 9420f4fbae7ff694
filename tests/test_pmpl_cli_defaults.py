"""What the CLI does when a user leaves things out: retrain names the network it needs, a
genotype brings the network and data it was searched for, top-5 is shown only where it means
something, and the loader does not ask for more processes than the machine has."""
import json
import os

import pytest

from metapool_kernels.models import NUM_BLOCKS
from metapool_kernels.pmpl import cli, runs
from metapool_kernels.pmpl.metrics import evaluate
from metapool_kernels.pmpl.cli import main as cli_main
from metapool_kernels.pmpl.train import accuracy_table


def test_retrain_without_a_network_is_refused(tmp_path, capsys):
    rc = cli_main(["retrain", "--out", str(tmp_path / "r"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: retrain needs --genotype") and "--enhancer none" in err, err
    assert not (tmp_path / "r").exists()


def write_genotype(path, **config):
    path.write_text(json.dumps({"genotype": ["skip"] * NUM_BLOCKS, "config": config}))
    return path


def parse(argv):
    return cli.build_parser().parse_args(argv), argv


def test_retrain_takes_the_genotypes_search_settings_unless_a_flag_sets_them(tmp_path):
    geno = write_genotype(tmp_path / "g.json", width=0.35, image_size=32, small_input=True, data_dir="/data/mine")
    args, argv = parse(["retrain", "--genotype", str(geno), "--width", "0.5", "--no-small-input"])
    notes = cli._settings_from_genotype(args, argv)
    assert (args.width, args.image_size, args.small_input, args.data_dir) == (0.5, 32, False, "/data/mine")
    assert sorted(n.split("=")[0] for n in notes) == ["data_dir", "image_size"]

    args, argv = parse(["retrain", "--genotype", str(geno), "--image-size=48"])
    cli._settings_from_genotype(args, argv)
    assert (args.width, args.image_size, args.small_input) == (0.35, 48, True)


def test_a_genotype_without_search_settings_changes_nothing(tmp_path):
    geno = tmp_path / "g.json"
    geno.write_text(json.dumps({"genotype": ["skip"] * NUM_BLOCKS}))
    args, argv = parse(["retrain", "--genotype", str(geno)])
    before = dict(vars(args))
    assert cli._settings_from_genotype(args, argv) == [] and vars(args) == before


@pytest.mark.parametrize("classes,shown", [(3, False), (5, False), (10, True), (0, True)])
def test_top5_is_shown_only_with_more_than_five_classes(classes, shown):
    row = {"name": "m", "params": 10, "macs": None, "epochs": 1, "top1": 91.25, "top5": 99.5}
    if classes:
        row["classes"] = classes
    text = accuracy_table([row])
    assert ("99.50" in text) == shown and ("—" in text) != shown


def test_loader_processes_fit_the_machine():
    assert [runs.default_workers(c) for c in (1, 2, 3, 4, 16)] == [1, 2, 3, 4, 4]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert runs.DEFAULT_WORKERS == runs.default_workers(cores)
    assert cli.build_parser().parse_args(["retrain"]).workers == runs.DEFAULT_WORKERS


def test_layers_chosen_by_noise_are_named():
    from metapool_kernels import MetaPooling
    from metapool_kernels.pmpl.search import NOISE_MARGIN_OF_RHO, noise_chosen_layers
    layers = [MetaPooling(4, ("skip", "avg3", "max3")) for _ in range(3)]
    layers[2].fix("max3")
    rho = 0.2
    lead = NOISE_MARGIN_OF_RHO * rho
    probs = [[0.34, 0.33, 0.33],                          # within noise of uniform: named
             [0.2, 0.4 - lead / 2, 0.4 + lead / 2],       # leads by exactly the margin: a choice
             [0.34, 0.33, 0.33]]                          # fixed by Eq. 4: a choice
    assert noise_chosen_layers(layers, probs, rho) == [0]


def test_evaluate_needs_no_distributed_setup():
    import torch
    from test_pmpl import TinyNet, synthetic_bundle
    torch.manual_seed(0)
    metrics = evaluate(TinyNet(), synthetic_bundle().test)
    assert metrics["samples"] == 96 and metrics["classes"] == 4 and 0 <= metrics["top1"] <= 100
