"""Scaling out: fastdl.models' GPT trained with DistributedDataParallel and FSDP2 (fully_shard)
on 2 CPU processes (gloo) gives the losses of one process on the same global batch.

The global batch is the spec's first GLOBAL sequences (256 tokens each), split evenly across
the ranks: small enough for a 2-core CI machine, still the model's full context."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from fastdl.models import specs
from fastdl.models import train as training

STEPS = 3
WORLD = 2
GLOBAL = 2
MODES = ("ddp", "fsdp2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(spec, step: int):
    (x,), y = spec.batch(torch.Generator().manual_seed(step), torch.device("cpu"))
    return x[:GLOBAL], y[:GLOBAL]


def _losses(model, spec, rank: int, world: int) -> list[float]:
    """STEPS AdamW steps on each rank's share of the global batches; the global mean losses."""
    opt = training.optimizer(model, spec)
    losses = []
    for i in range(STEPS):
        x, y = _global_batch(spec, i)
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss = training.step(model, opt, spec, (x[share],), y[share])
        if world > 1:  # equal shares: the mean of the ranks' means is the global mean
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def _wrap(model, mode: str):
    if mode == "ddp":
        return DistributedDataParallel(model)
    # One FSDP unit for the whole model: each GPT block applies the next block's norm (fused
    # with its residual add), so per-block units would read another unit's still-sharded
    # weights (a DTensor beside plain tensors, which the op rejects).
    return fully_shard(model)


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine: no oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)  # fmt: skip
    try:
        spec = specs()["gpt"]
        losses = {}
        for mode in MODES:
            torch.manual_seed(0)
            losses[mode] = _losses(_wrap(spec.build(), mode), spec, rank, WORLD)
        if rank == 0:
            torch.save(losses, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The losses of one process on the global batches, and of 2 processes in each mode, all
    from the same initial weights."""
    spec = specs()["gpt"]
    torch.manual_seed(0)
    single = _losses(spec.build(), spec, 0, 1)
    out = str(tmp_path_factory.mktemp("distributed") / "losses.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return single, torch.load(out)


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_match_one(mode, runs):
    single, losses = runs
    assert len(losses[mode]) == STEPS and losses[mode][0] > losses[mode][-1], losses[mode]
    torch.testing.assert_close(losses[mode], single, rtol=1e-4, atol=0)
