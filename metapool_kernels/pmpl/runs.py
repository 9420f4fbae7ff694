"""What every run shares: its config, its folder (a run never writes over another's files),
checkpoints (tensors and plain values only, versioned by one constant), JSON-lines logs and the start
of a run."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..reference import PAPER_CANDIDATES, check_candidates
from .checks import (BELOW_ONE, DEVICE, FLAG, NON_NEGATIVE, NON_NEGATIVE_INT, PATH, POSITIVE, POSITIVE_INT, SEED,
                     TEXT, Rule, check_fields)
from .data import DataBundle, build_data
from .distributed import DistEnv, seed_everything, setup_distributed

def default_workers(cores: int) -> int:
    """Data-loading processes: 4, or fewer on a machine with fewer cores (DataLoader warns above that)."""
    return max(1, min(4, cores))


DEFAULT_WORKERS = default_workers(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                  else (os.cpu_count() or 1))


# The files a run writes into its folder.
RUN_FILES = ("checkpoint.pt", "checkpoint.pt.tmp", "log.jsonl", "genotype.json", "alpha_history.json",
             "alpha_history.png")


class RunFolder:
    """The folder a run writes into (``--out``). A run never writes over another run's files.

    The folder must be empty or absent, unless the run continues the checkpoint it holds (resume
    from a checkpoint in it) or ``overwrite`` is given; then the run files (``RUN_FILES``) found
    there are removed, other files left alone, and never a file the run reads (``inputs``, such as
    its genotype). Checks happen at construction; nothing is created or removed until the run
    writes its first file (:meth:`file`), so a run that fails to start leaves no folder behind and
    an overwritten run intact.
    """

    def __init__(self, path: Path | str, *, resume: Optional[str] = None, overwrite: bool = False,
                 inputs: Sequence[Optional[str]] = ()):
        self.path = Path(path)
        self.claimed = False
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"output folder {self.path} (--out) is a file, not a folder")
        entries = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        continuing = resume is not None and Path(resume).resolve().parent == self.path.resolve()
        self.replaced: List[str] = []
        if entries and not continuing:
            if not overwrite:
                shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
                raise FileExistsError(
                    f"output folder {self.path} (--out) already holds {len(entries)} file(s) ({shown}); a run never "
                    f"writes over another: choose a new --out, continue the run saved there with --resume "
                    f"{self.path / 'checkpoint.pt'}, or pass --overwrite to replace its run files")
            self.replaced = [n for n in RUN_FILES if n in entries]
            read = {Path(p).resolve() for p in inputs if p}
            clash = [n for n in self.replaced if (self.path / n).resolve() in read]
            if clash:
                raise ValueError(f"--overwrite would delete {self.path / clash[0]}, which this run reads; "
                                 f"choose another --out")

    def file(self, name: str) -> Path:
        """Where to write ``name``; the first call removes the replaced run's files and creates the folder."""
        if not self.claimed:
            for old in self.replaced:
                (self.path / old).unlink(missing_ok=True)
            self.path.mkdir(parents=True, exist_ok=True)
            self.claimed = True
        return self.path / name

    def __truediv__(self, name: str) -> Path:
        """Where ``name`` is (or would be), without writing anything."""
        return self.path / name


def save_checkpoint(state: Dict[str, Any], path: Path | str) -> None:
    """Write atomically, so an interrupted save never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@dataclass
class RunConfig:
    """What a search and a retraining share: data, model, θ's SGD (paper §3.1) and the run itself.

    Every field is checked on construction (``RULES``), so a bad value, from the Python API or from
    the config a checkpoint stores, stops the run before it starts.
    """
    # data
    data_dir: Optional[str] = None
    subset: Optional[int] = None
    test_subset: Optional[int] = None
    batch_size: int = 128
    workers: int = DEFAULT_WORKERS
    image_size: Optional[int] = None
    # model: arch names the network (networks.py; None: the package's MobileNetV2, the one network
    # width and small_input shape)
    arch: Optional[str] = None
    width: float = 1.0
    small_input: Optional[bool] = None
    candidates: Tuple[str, ...] = PAPER_CANDIDATES
    # θ: SGD with momentum and a cosine schedule
    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 4e-5
    # run
    device: str = "auto"
    # None: channels_last on CPU, where torch's pooling kernels are several times faster in it.
    channels_last: Optional[bool] = None
    seed: int = 0
    out_dir: str = "runs"
    resume: Optional[str] = None
    # Replace the run files of a non-empty out_dir instead of refusing it (see RunFolder).
    overwrite: bool = False
    progress: bool = True

    # Fields a resumed run takes from the caller; everything else comes from the checkpoint.
    RUNTIME_FIELDS: ClassVar[Tuple[str, ...]] = ("device", "workers", "resume", "progress", "out_dir", "overwrite")
    # Fields added since the first checkpoints; their defaults are what those runs did.
    LATER_FIELDS: ClassVar[Tuple[str, ...]] = ("arch",)
    RULES: ClassVar[Dict[str, Rule]] = {
        "data_dir": PATH.optional(), "subset": POSITIVE_INT.optional(), "test_subset": POSITIVE_INT.optional(),
        "batch_size": POSITIVE_INT, "workers": NON_NEGATIVE_INT, "image_size": POSITIVE_INT.optional(),
        "arch": TEXT.optional(), "width": POSITIVE, "small_input": FLAG.optional(), "epochs": POSITIVE_INT,
        "lr": POSITIVE, "momentum": BELOW_ONE, "weight_decay": NON_NEGATIVE, "device": DEVICE, "channels_last": FLAG.optional(),
        "seed": SEED, "out_dir": PATH, "resume": PATH.optional(), "overwrite": FLAG, "progress": FLAG,
    }

    def __post_init__(self):
        from .networks import PACKAGE_ARCH, check_arch

        self.candidates = check_candidates(self.candidates)
        check_fields(self, self.RULES)
        check_arch(self.arch)
        if self.arch not in (None, PACKAGE_ARCH) and (self.width != 1.0 or self.small_input is not None):
            raise ValueError(f"width and small_input shape the package's MobileNetV2, not {self.arch}; name the "
                             "variant in arch instead (e.g. timm:mobilenetv3_small_050)")


def resume_config(cfg: RunConfig, kind: str, model_given: bool = False):
    """(config, checkpoint) for a run that may resume: the checkpoint's saved config, except the
    fields that only say how this invocation runs (``RUNTIME_FIELDS``), which the caller's config
    keeps, and the arch, which must be named again where it is one's own code (unless the caller
    hands over the model itself, ``model_given``). Without ``cfg.resume``: (cfg, None)."""
    if not cfg.resume:
        return cfg, None
    ckpt = load_checkpoint(cfg.resume, kind=kind)
    saved = dict(ckpt["config"])
    names = {f.name for f in fields(cfg)}
    unknown = sorted(set(saved) - names)
    missing = sorted(names - set(saved) - set(cfg.RUNTIME_FIELDS) - set(cfg.LATER_FIELDS))
    if unknown or missing:
        raise ValueError(f"{cfg.resume}: its config " + (f"has unknown fields {unknown}" if unknown else
                                                         f"lacks the fields {missing}"))
    from .networks import resolve_arch

    # A checkpoint never names code to run: a run of one's own network resumes only when the
    # caller names its factory again.
    if not model_given:  # the caller builds the network from the config
        described = ckpt.get("model_config")
        handed_over = isinstance(described, dict) and "arch" in described and described["arch"] is None
        saved["arch"] = resolve_arch(saved.get("arch"), cfg.arch, str(cfg.resume), recorded_as_code=handed_over)
    saved.update({k: getattr(cfg, k) for k in cfg.RUNTIME_FIELDS})
    try:
        return type(cfg)(**saved), ckpt
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg.resume}: its config is not valid: {e}") from e


def start_run(cfg: RunConfig, kind: str, log, model_given: bool = False):
    """The start every run shares: resume, the run folder, processes, logging (main process only),
    seeds. Nothing is written here.

    Returns (cfg, checkpoint or None, DistEnv, log, RunFolder, JsonlLogger).
    """
    cfg, ckpt = resume_config(cfg, kind, model_given)
    # Every process checks the folder before any of them can write into it (init_process_group
    # waits for all; the barrier does the same where the group already exists).
    folder = RunFolder(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                       inputs=[getattr(cfg, "genotype", None)])
    env = setup_distributed(cfg.device)
    if env.distributed:
        dist.barrier()
    log = log if env.is_main else (lambda *a, **k: None)
    logger = JsonlLogger(folder, enabled=env.is_main)
    seed_everything(cfg.seed)
    return cfg, ckpt, env, log, folder, logger


def run_data(cfg: RunConfig, env: "DistEnv", meta_fraction: Optional[float]) -> DataBundle:
    """The data set a config names, split for this process (and into D_tr / D_mt with meta_fraction)."""
    return build_data(data_dir=cfg.data_dir, batch_size=cfg.batch_size, meta_fraction=meta_fraction,
                      subset=cfg.subset, test_subset=cfg.test_subset, workers=cfg.workers,
                      image_size=cfg.image_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                      device=env.device)


CHECKPOINT_VERSION = 1
# What each kind of checkpoint holds beyond "kind" and "version", and the type of each entry.
CHECKPOINT_ENTRIES: Dict[str, Dict[str, type]] = {
    "search": {"config": dict, "model": dict, "w_opt": dict, "a_opt": dict, "sched": dict, "state": dict,
               "fixed": list, "rng": list, "world_size": int, "data": dict},
    "train": {"config": dict, "model": dict, "opt": dict, "sched": dict, "epoch": int, "history": list,
              "rng": list, "world_size": int, "data": dict, "name": (str, type(None))},
}


def one_line(e: BaseException, limit: int = 600) -> str:
    """An exception's message on one line (at most ``limit`` characters), or its type's name."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_checkpoint(path: Path | str, kind: Optional[str] = None) -> Dict[str, Any]:
    """A checkpoint written by search or retrain, loaded with ``weights_only=True``: tensors and
    plain values only, so a crafted file cannot run code. Anything but a well-formed checkpoint (of
    ``kind``, when given) is a ValueError naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("WeightsUnpickler error:", 1)[-1].strip().split("\n\n")[0].split(". ")[0]
        raise ValueError(f"{path} is refused: it holds more than tensors and plain values ({one_line(reason, 200)}), "
                         f"and unpickling it could run code; checkpoints of this package never do") from e
    except Exception as e:  # truncated, or not a torch file at all
        raise ValueError(f"{path} is not a readable checkpoint (truncated or another format): {one_line(e)}") from e
    if not isinstance(state, dict) or not isinstance(state.get("kind"), str) or state["kind"] not in CHECKPOINT_ENTRIES:
        found = repr(state.get("kind")) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a metapool_kernels.pmpl checkpoint (kind {found}; expected one of "
                         f"{list(CHECKPOINT_ENTRIES)})")
    if kind is not None and state["kind"] != kind:
        raise ValueError(f"{path} is a {state['kind']!r} checkpoint, expected a {kind!r} one")
    if type(state.get("version")) is not int or state["version"] != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {state.get('version')!r}; this package reads version "
                         f"{CHECKPOINT_VERSION}")
    entries = dict(CHECKPOINT_ENTRIES[state["kind"]], model_config=(dict, type(None)))
    for name, types in entries.items():
        if name not in state:
            raise ValueError(f"{path}: the {state['kind']!r} checkpoint has no {name!r} entry")
        if not isinstance(state[name], types) or isinstance(state[name], bool):
            raise ValueError(f"{path}: entry {name!r} is a {type(state[name]).__name__}, not what a checkpoint holds")
    return state


@contextlib.contextmanager
def restoring(path: Path | str, what: str):
    """Turn an error while restoring ``what`` from a checkpoint's contents into one naming the file."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"{path}: cannot restore {what} from it: {one_line(e)}") from e


def _check_types_like(saved: Any, fresh: Any, where: str) -> None:
    """``saved`` holds values of ``fresh``'s types wherever both have an entry (entries only one of
    them has are left to the loader: they differ between torch versions)."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            raise ValueError(f"{where} is a {type(saved).__name__}, expected a dict")
        for k in set(saved) & set(fresh):
            _check_types_like(saved[k], fresh[k], f"{where}[{k!r}]")
    elif isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(fresh):
            raise ValueError(f"{where} should be a list of {len(fresh)}, got {saved!r:.80}")
        for i, (a, b) in enumerate(zip(saved, fresh)):
            _check_types_like(a, b, f"{where}[{i}]")
    elif isinstance(fresh, bool) or fresh is None or isinstance(fresh, (str, torch.Tensor)):
        if type(saved) is not type(fresh) and not (isinstance(fresh, torch.Tensor) and isinstance(saved, torch.Tensor)):
            raise ValueError(f"{where} should be a {type(fresh).__name__}, got {saved!r:.80}")
    elif isinstance(fresh, (int, float)):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)):
            raise ValueError(f"{where} should be a number, got {saved!r:.80}")


def restore_optimizer(opt: torch.optim.Optimizer, saved: Dict[str, Any], name: str) -> None:
    """``opt.load_state_dict(saved)``, refusing hyper-parameters of the wrong type and per-parameter
    buffers (momentum, Adam moments) of the wrong shape, which would fail only steps later."""
    fresh = opt.state_dict()
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or len(groups) != len(fresh["param_groups"]):
        raise ValueError(f"{name}: expected {len(fresh['param_groups'])} parameter group(s)")
    for i, (g, f) in enumerate(zip(groups, fresh["param_groups"])):
        _check_types_like({k: v for k, v in g.items() if k != "params"} if isinstance(g, dict) else g,
                          {k: v for k, v in f.items() if k != "params"}, f"{name}.param_groups[{i}]")
    opt.load_state_dict(saved)
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if k != "step" and (not isinstance(v, torch.Tensor) or v.shape != p.shape):
                    raise ValueError(f"{name}: its {k!r} does not match a parameter of shape {tuple(p.shape)}")


def restore_scheduler(sched, saved: Dict[str, Any], name: str) -> None:
    missing = [k for k in ("last_epoch", "base_lrs") if k not in saved]
    if missing:
        raise ValueError(f"{name} has no {missing}")
    _check_types_like(saved, sched.state_dict(), name)
    sched.load_state_dict(saved)


class JsonlLogger:
    """One JSON object per line (epochs, fix events, results) in the run folder's log.jsonl; only the
    main process writes."""

    def __init__(self, folder: Optional[RunFolder], enabled: bool = True):
        self.folder = folder if enabled else None

    def log(self, event: str, **fields: Any) -> None:
        if self.folder is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.folder.file("log.jsonl"), "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)
