"""Data-parallel set-up for runs launched with ``torchrun --nproc_per_node=N``.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the loop then joins the process group
(gloo on CPU, NCCL on CUDA), wraps the model in ``DistributedDataParallel`` and lets each rank take its
share of every global batch. Only rank 0 writes files and draws a progress bar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_info() -> DistributedInfo:
    """The rank and world size torchrun gave this process (or a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedInfo()
    return DistributedInfo(
        int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))
    )


def init_distributed(info: DistributedInfo, device: torch.device) -> bool:
    """Join the default process group if torchrun started several processes.

    Returns True when this call created the group (so the caller owns its teardown); a group the
    user set up before calling :func:`normlab.train.train` is left alone.
    """
    if not info.enabled or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return True


def close_distributed() -> None:
    """Leave the process group after a successful run.

    The barrier keeps a rank from tearing down while a peer still talks to it; a group left to the
    interpreter's exit can abort the process ("terminate called without an active exception").
    Not called after an error: destroying a group while peers are mid-collective can deadlock.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank of the default process group arrives here."""
    dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistributedInfo) -> torch.Tensor:
    """Sum a tensor over ranks (SUM is portable across backends; AVG is not everywhere)."""
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def pick_device(name: str, info: DistributedInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info.enabled:
        name = f"cuda:{info.local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            from ..errors import ConfigError

            raise ConfigError(
                "device=cuda asked for, but torch sees no CUDA device; use device=cpu"
            )
        torch.cuda.set_device(device)
    return device
