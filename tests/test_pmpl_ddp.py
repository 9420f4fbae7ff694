"""PMPL under DistributedDataParallel: two gloo processes on the CPU search a tiny network on
different shards of the data; α, its Adam state, the fixed set and θ must agree on both ranks."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metapool_kernels.models import meta_layers
from metapool_kernels.pmpl.search import run_search
from test_pmpl import TinyNet, synthetic_bundle, tiny_config

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = TinyNet()
        meta_layers(model)[0].fix("max3")  # its strip gates never get a gradient: DDP must cope
        gates0 = [p.detach().clone() for p in meta_layers(model)[0].gate_h.parameters()]
        data = synthetic_bundle(n=128, batch_size=16, rank=rank, world_size=WORLD)
        first = next(iter(data.train))[1]
        res = run_search(tiny_config(out_dir, epochs=2, alpha_lr=0.5, rho=0.05), model=model, data=data,
                         log=lambda *a: None)
        torch.save({"alphas": [m.alpha.detach().clone() for m in meta_layers(model)],
                    "fixed": [m.fixed for m in meta_layers(model)],
                    "theta": {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
                    "adam": res.alpha_optimizer_state["state"], "events": res.events, "genotype": res.genotype,
                    "steps": res.steps, "first_labels": first,
                    "gates_unchanged": all(torch.equal(a, b) for a, b in
                                           zip(gates0, meta_layers(model)[0].gate_h.parameters()))},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.filterwarnings("ignore:Grad strides do not match")
def test_two_gloo_ranks_keep_alpha_adam_state_and_fixed_set_identical(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert not torch.equal(r0["first_labels"], r1["first_labels"])  # the ranks did see different data
    assert r0["steps"] == r1["steps"] > 0
    assert r0["fixed"] == r1["fixed"] and r0["events"] == r1["events"] and r0["genotype"] == r1["genotype"]
    assert r0["fixed"][0] == "max3" and r0["gates_unchanged"] and r1["gates_unchanged"]
    assert r0["events"], "no layer was fixed by Eq. 4 during the run"
    for a, b in zip(r0["alphas"], r1["alphas"]):
        assert torch.equal(a, b)
    assert r0["alphas"][1].abs().sum() > 0  # α did move
    assert r0["adam"].keys() == r1["adam"].keys() and r0["adam"]
    for i in r0["adam"]:
        for name in r0["adam"][i]:
            assert torch.equal(torch.as_tensor(r0["adam"][i][name]), torch.as_tensor(r1["adam"][i][name])), (i, name)
    for k in r0["theta"]:
        assert torch.equal(r0["theta"][k], r1["theta"][k]), k
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "genotype.json").is_file()
