"""``python -m metapool_kernels.pmpl search|retrain|eval|export``: the PMPL command line.

Defaults are the paper's §3.1 settings. Under ``torchrun --nproc_per_node=N`` every command runs on
N processes with DistributedDataParallel (nccl on CUDA, gloo on CPU); ``--batch-size`` stays the
global batch.

Every expected failure (a bad flag, a missing or corrupt file, an occupied --out folder, a diverging
run) ends with one line ``error: ...`` and exit status 2; a traceback means a bug.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, NoReturn, Optional

from ..reference import PAPER_CANDIDATES
from .checks import (BELOW_ONE, DEVICE, NON_NEGATIVE, NON_NEGATIVE_INT, OPEN_UNIT, POSITIVE, POSITIVE_INT, SEED,
                     UP_TO_ONE)
from .runs import one_line
from .export import DEFAULT_ATOL
from .search import SearchConfig
from .train import TrainConfig

EXAMPLES = """examples:
  python -m metapool_kernels.pmpl search --width 0.5 --epochs 30 --out runs/search
  python -m metapool_kernels.pmpl search --subset 6000 --epochs 2 --rho 0.1 --alpha-lr 0.01   # quick look
  python -m metapool_kernels.pmpl search --resume runs/search/checkpoint.pt   # continues in runs/search
  python -m metapool_kernels.pmpl search --arch timm:mobilenetv3_small_100 --out runs/mnv3   # any network
  python -m metapool_kernels.pmpl search --arch mynets:build_net --out runs/mine   # your own (mynets.py)
  python -m metapool_kernels.pmpl retrain --genotype runs/search/genotype.json --width 0.5 --epochs 200
  python -m metapool_kernels.pmpl retrain --enhancer none --width 0.5 --epochs 200 --out runs/none
  python -m metapool_kernels.pmpl eval runs/retrain/checkpoint.pt
  python -m metapool_kernels.pmpl export --checkpoint runs/retrain/checkpoint.pt --out runs/retrain/model.onnx
  torchrun --nproc_per_node=4 -m metapool_kernels.pmpl search --data-dir /data/imagenet
"""


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one ``error: ...`` line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


_positive_int = POSITIVE_INT.arg(int)
_nonneg_int = NON_NEGATIVE_INT.arg(int)


def _candidates(text: str):
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in PAPER_CANDIDATES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown op(s) {unknown}; choose from {','.join(PAPER_CANDIDATES)}")
    return names


def _add_data(p: argparse.ArgumentParser, defaults, meta: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="ImageFolder tree with train/ and val/ (or test/); default: Fashion-MNIST from "
                        "Debian's dataset-fashion-mnist package")
    g.add_argument("--subset", type=_positive_int, default=None, metavar="N",
                   help="use N training images (drawn with --seed) for a quick run")
    g.add_argument("--test-subset", type=_positive_int, default=None, metavar="N", help="evaluate on N test images")
    if meta:
        g.add_argument("--meta-fraction", type=OPEN_UNIT.arg(), default=defaults.meta_fraction, metavar="F",
                       help="share of the training images held out as the meta set D_mt (default %(default)s)")
    g.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size,
                   help="global batch, split across processes (default %(default)s)")
    g.add_argument("--workers", type=_nonneg_int, default=defaults.workers,
                   help="loader processes per rank for --data-dir (Fashion-MNIST is augmented in memory) "
                        "(default %(default)s)")
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help="input size for --data-dir (default 224; <= 64 uses pad-and-crop augmentation)")


ARCH_HELP = ("the network: mobilenetv2 (the package's, default; --width and --small-input apply), timm:NAME, "
             "torchvision:NAME, or MODULE:FUNCTION (your function returning the network without enhancers, "
             "called with num_classes= and in_chans= where it takes them); an enhancer follows every block")


def _add_model(p: argparse.ArgumentParser, defaults) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, metavar="ARCH", help=ARCH_HELP)
    g.add_argument("--width", type=POSITIVE.arg(), default=defaults.width,
                   help="MobileNetV2 width multiplier (default %(default)s)")
    g.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="stride 1 in the stem and first 24-channel block (default: on for images <= 64 px)")
    g.add_argument("--candidates", type=_candidates, default=",".join(defaults.candidates), metavar="OPS",
                   help="comma-separated Meta-Pooling ops (default: the paper's %(default)s)")


def _add_sgd(p: argparse.ArgumentParser, defaults) -> None:
    g = p.add_argument_group("weights θ (SGD, cosine schedule)")
    g.add_argument("--epochs", type=_positive_int, default=defaults.epochs, help="(default %(default)s)")
    g.add_argument("--lr", type=POSITIVE.arg(), default=defaults.lr,
                   help="ζ, the initial SGD learning rate (default %(default)s)")
    g.add_argument("--momentum", type=BELOW_ONE.arg(), default=defaults.momentum, help="(default %(default)s)")
    g.add_argument("--weight-decay", type=NON_NEGATIVE.arg(), default=defaults.weight_decay,
                   help="(default %(default)s)")


def _add_run(p: argparse.ArgumentParser, defaults) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--device", type=DEVICE.arg(str), default=defaults.device,
                   help="auto (cuda if available), cpu, cuda or cuda:N")
    g.add_argument("--seed", type=SEED.arg(int), default=defaults.seed, help="(default %(default)s)")
    g.add_argument("--out", dest="out_dir", default=None, metavar="DIR",
                   help=f"output folder: checkpoint.pt, log.jsonl, ...; must be empty or new (default "
                        f"{defaults.out_dir}, or CKPT's folder with --resume)")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue the run saved in CKPT (its settings are used; --device/--workers/--out may change)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run files (checkpoint, log, genotype, plots) of a non-empty --out folder")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last tensors (default: on for CPU, off for CUDA)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m metapool_kernels.pmpl",
        description="Progressive Meta-Pooling Learning (PMPL): search the enhancer after every block of a network "
                    "(the package's MobileNetV2, a timm or torchvision model, or your own: --arch), "
                    "retrain the derived network from scratch, evaluate it.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{search,retrain,eval,export}")

    sd = SearchConfig()
    ps = sub.add_parser("search", help="PMPL search (Algorithm 1); writes genotype.json and alpha_history.png",
                        description="PMPL search (paper Algorithm 1): first-order bi-level updates of θ (SGD on D_tr) "
                                    "and α (Adam on D_mt), progressive early stopping (Eq. 4). Writes genotype.json, "
                                    "alpha_history.png/.json, log.jsonl and checkpoint.pt (every epoch) to --out.",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data(ps, sd, meta=True)
    _add_model(ps, sd)
    _add_sgd(ps, sd)
    g = ps.add_argument_group("meta-parameters α (Adam) and early stopping")
    g.add_argument("--alpha-lr", type=POSITIVE.arg(), default=sd.alpha_lr, help="η (default %(default)s)")
    g.add_argument("--alpha-weight-decay", type=NON_NEGATIVE.arg(), default=sd.alpha_weight_decay,
                   help="(default %(default)s)")
    g.add_argument("--alpha-betas", type=BELOW_ONE.arg(), nargs=2, default=sd.alpha_betas, metavar=("B1", "B2"),
                   help="Adam betas (default %(default)s, as DARTS)")
    g.add_argument("--rho", type=UP_TO_ONE.arg(), default=sd.rho,
                   help="ρ: fix a layer once min_{m≠k}(π_k − π_m) ≥ ρ (Eq. 4) (default %(default)s)")
    g.add_argument("--fix-every", choices=("step", "epoch"), default=sd.fix_every,
                   help="check Eq. 4 after every α update (Algorithm 1) or once per epoch (default %(default)s)")
    g.add_argument("--fresh-train-grad", action="store_true",
                   help="recompute ∇θ L_tr after the α update for the real step instead of reusing the "
                        "virtual step's gradient (one more forward/backward per step)")
    g.add_argument("--grad-clip", type=POSITIVE.arg(), default=None, metavar="NORM", help="clip θ's gradient norm")
    _add_run(ps, sd)

    td = TrainConfig()
    pr = sub.add_parser("retrain", help="train a genotype or a baseline enhancer from scratch, evaluate top-1/top-5",
                        description="Train the derived network (--genotype) or a baseline (--enhancer) from scratch "
                                    "with SGD and a cosine schedule on the whole training set; evaluate top-1/top-5 "
                                    "on the test split. Writes checkpoint.pt (every epoch) and log.jsonl to --out.",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = pr.add_argument_group("network").add_mutually_exclusive_group()
    what.add_argument("--genotype", default=None, metavar="JSON", help="genotype file written by `search`")
    what.add_argument("--enhancer", default=None,
                      help="baseline: none (default), maxpool, avgpool, strip, random, se, cbam, coordatt, sk")
    _add_data(pr, td, meta=False)
    _add_model(pr, td)
    _add_sgd(pr, td)
    pr.add_argument("--label-smoothing", type=BELOW_ONE.arg(), default=td.label_smoothing,
                    help="(default %(default)s)")
    pr.add_argument("--eval-every", type=_nonneg_int, default=td.eval_every,
                    help="evaluate every N epochs, 0: only at the end (default %(default)s)")
    _add_run(pr, td)

    pe = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on the test split",
                        description="Evaluate a retrain (or search) checkpoint on the test split of its data set.",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pe.add_argument("checkpoint", help="checkpoint.pt written by retrain or search")
    pe.add_argument("--data-dir", default=None, help="override the data set the checkpoint was trained on")
    pe.add_argument("--test-subset", type=_positive_int, default=None, metavar="N")
    pe.add_argument("--batch-size", type=_positive_int, default=256)
    pe.add_argument("--workers", type=_nonneg_int, default=None,
                    help="data-loading processes (default: 4, or the number of cores if fewer)")
    pe.add_argument("--device", type=DEVICE.arg(str), default="auto")
    pe.add_argument("--arch", default=None, metavar="MODULE:FUNCTION",
                    help="for a network of your own code: the function that builds it (a checkpoint never names "
                         "code to run); a timm or torchvision network is rebuilt from the checkpoint")
    pe.add_argument("--no-progress", dest="progress", action="store_false")

    px = sub.add_parser("export", help="the retrained network as an ONNX model, verified with ONNX Runtime",
                        description="Export the network of a retrain checkpoint (genotype and input shape from the "
                                    "checkpoint) to one ONNX file of standard ops with a dynamic batch dimension, "
                                    "then run it with ONNX Runtime on real test images and compare with PyTorch.",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    px.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint.pt written by retrain")
    px.add_argument("--out", required=True, metavar="ONNX", help="path of the ONNX file to write")
    px.add_argument("--images", type=_positive_int, default=1000, help="test images to verify on (default %(default)s)")
    px.add_argument("--data-dir", default=None, help="override the data set the checkpoint was trained on")
    px.add_argument("--atol", type=float, default=DEFAULT_ATOL, metavar="TOL",
                    help="largest logit difference accepted between ONNX Runtime and PyTorch, relative to the largest "
                         "logit where that exceeds 1 (default %(default)g)")
    px.add_argument("--arch", default=None, metavar="MODULE:FUNCTION",
                    help="for a network of your own code: the function that builds it")
    return parser


# What a genotype file's search settings give a retrain that does not set them itself: the network
# it was searched for (width, input size, stem) on the same data.
GENOTYPE_SETTINGS = (("arch", "--arch"), ("width", "--width"), ("image_size", "--image-size"),
                     ("small_input", "--small-input"), ("data_dir", "--data-dir"))


def _given(argv: List[str], flag: str) -> bool:
    negated = "--no-" + flag[2:]
    return any(a == flag or a.startswith(flag + "=") or a == negated for a in argv)


def _settings_from_genotype(args: argparse.Namespace, argv: List[str]) -> List[str]:
    """Fill retrain's unset network and data flags from the genotype file's search config; returns
    a note per setting taken."""
    from ..models import read_genotype_file
    from .networks import is_own_code

    searched = read_genotype_file(args.genotype).get("config")
    if not isinstance(searched, dict):
        return []
    notes = []
    for key, flag in GENOTYPE_SETTINGS:
        if key == "arch" and is_own_code(searched.get(key)):
            continue  # a file never names code to run: the caller names it (--arch), or is told to
        if key in searched and not _given(argv, flag) and searched[key] != getattr(args, key):
            setattr(args, key, searched[key])
            notes.append(f"{key}={searched[key]!r}")
    return notes


def _config(cls, ns: argparse.Namespace):
    values = {k: v for k, v in vars(ns).items() if k in cls.__dataclass_fields__}
    if values["out_dir"] is None:  # a resumed run continues in its own folder
        values["out_dir"] = str(Path(ns.resume).parent) if ns.resume else cls.out_dir
    return cls(**values)


def _is_main() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "search":
            from .search import run_search
            run_search(_config(SearchConfig, args))
        elif args.command == "retrain":
            if args.genotype is None and args.enhancer is None and args.resume is None:
                raise ValueError("retrain needs --genotype JSON (the network a search derived) or --enhancer NAME "
                                 "(a baseline; --enhancer none for the plain network)")
            if args.genotype is not None and args.resume is None:
                notes = _settings_from_genotype(args, argv)
                if notes and _is_main():
                    print(f"retraining with the genotype's search settings: {', '.join(notes)} "
                          f"(set {', '.join(f for _, f in GENOTYPE_SETTINGS)} to override)")
            from .train import accuracy_table, result_row, run_train
            res = run_train(_config(TrainConfig, args))
            if _is_main():
                print(accuracy_table([result_row(res)], title=f"Test accuracy after {res.epochs} epochs"))
        elif args.command == "export":
            from .export import export_checkpoint
            export_checkpoint(args.checkpoint, args.out, images=args.images, data_dir=args.data_dir, atol=args.atol,
                              arch=args.arch)
        else:
            from .train import run_eval
            run_eval(args.checkpoint, data_dir=args.data_dir, test_subset=args.test_subset,
                     batch_size=args.batch_size, workers=args.workers, device=args.device, progress=args.progress,
                     arch=args.arch)
    except (OSError, ValueError, FloatingPointError) as e:
        # Missing or corrupt files, bad settings, an occupied --out, a diverging run: the message
        # names the file or flag and what to do; no traceback.
        print(f"error: {one_line(e, limit=2000)}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
