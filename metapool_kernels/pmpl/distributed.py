"""Device and processes (torchrun's process group), seeds and every generator's state."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checks import DEVICE

@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0



def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    DEVICE.check("device", device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA device here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def setup_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or run alone.

    A process group that already exists (a test that spawned its own processes) is used as is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistEnv(rank, world, local_rank, resolve_device(device, local_rank))
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local_rank)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistEnv(0, 1, 0, resolve_device(device))


def broadcast_buffers(model: nn.Module, env: DistEnv) -> None:
    """Rank 0's BatchNorm statistics everywhere: DDP syncs them before each forward, so after the last
    forward of an epoch each rank holds statistics updated by its own batch."""
    if env.distributed:
        for b in model.buffers():
            dist.broadcast(b.data, 0)


def all_reduce_sum(values: Sequence[float], env: DistEnv) -> List[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(t)
    return t.tolist()


def memory_format(channels_last: Optional[bool], device: torch.device) -> torch.memory_format:
    use = device.type == "cpu" if channels_last is None else channels_last
    return torch.channels_last if use else torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# Seeds and RNG state.
# ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """Every generator's state as tensors and plain values, so that checkpoints load with
    ``weights_only=True``."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate()}  # (version, tuple of ints, float or None)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    npy = state["numpy"]
    key = npy["key"]
    if not isinstance(key, torch.Tensor):
        raise TypeError(f"numpy's key must be a tensor, got {type(key).__name__}")
    torch.set_rng_state(state["torch"])
    np.random.set_state((npy["name"], key.numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(env: DistEnv) -> List[Dict[str, Any]]:
    """Every rank's RNG state, on every rank (each rank draws its own dropout masks)."""
    mine = rng_state()
    if not env.distributed:
        return [mine]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, mine)
    return out


def restore_rng_states(states: List[Dict[str, Any]], env: DistEnv) -> bool:
    """Restore this rank's RNG state; False when the checkpoint came from another world size."""
    if not states:
        raise ValueError("the checkpoint holds no RNG state")
    if len(states) != env.world_size:
        return False
    set_rng_state(states[env.rank])
    return True
