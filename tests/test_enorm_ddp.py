"""ENorm under DistributedDataParallel (2 gloo ranks on CPU): replicas stay bit-identical.

Each rank sees different data and keeps its own BatchNorm running statistics
(``broadcast_buffers=False``), so anything rank-local leaking into ENorm would split the ranks.
"""

import gc
import json
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from normlab.enorm import ENorm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(x + self.conv2(x))
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc(x.flatten(1))


def _gap(tensor: torch.Tensor, world: int) -> float:
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers' deprecation notice
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    try:
        for order in ("sequential", "simultaneous"):
            torch.manual_seed(0)
            model = nn.parallel.DistributedDataParallel(Net(), broadcast_buffers=False)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            enorm = ENorm(model, opt, c=1.1, order=order)
            gen = torch.Generator().manual_seed(100 + rank)  # rank-local data
            for _ in range(4):
                x = torch.randn(6, 3, 8, 8, generator=gen)
                y = torch.randint(0, 4, (6,), generator=gen)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                enorm.step()
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            param_gap = _gap(flat, world)
            stats = dict(model.module.named_buffers())["bn.running_mean"]
            stats_gap = _gap(stats.clone(), world)
            result[order] = (param_gap, stats_gap)
            # Release DDP's reducer while the group is alive: a reducer torn down after
            # destroy_process_group can abort the process ("terminate called ...").
            del model, opt, enorm
            gc.collect()
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
        dist.barrier()  # nobody leaves while a peer still talks to it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranks_stay_identical(tmp_path):
    out = tmp_path / "gaps.json"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    for order in ("sequential", "simultaneous"):
        param_gap, stats_gap = result[order]
        assert stats_gap > 0  # the ranks really saw different data
        assert param_gap == 0.0, order
