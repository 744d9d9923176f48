"""Processes and devices for `train` and `extract`: one torchrun / DDP set-up shared by both.

`setup(device, key=...)` resolves the device (`auto` → `cuda:<LOCAL_RANK>` when a GPU is there,
else cpu) and, when torchrun started several processes (WORLD_SIZE > 1), joins the process
group: NCCL on GPU, gloo on CPU. On a GPU `torch.cuda.set_device` comes before
`init_process_group`, so each rank's NCCL communicator is built on its own GPU (without it every
rank's first collective lands on cuda:0). A group that the caller initialised is used as it is
and left alone by `teardown`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from celldino.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this process initialised the group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        barrier()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_device(name: str, local_rank: int = 0, *, key: str = "train.device") -> torch.device:
    """'auto' → cuda:<local_rank> when a GPU is there, else cpu; 'cuda' → cuda:<local_rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from celldino.config import ConfigError

        raise ConfigError(
            f"{key}={name} but no CUDA GPU is visible; use {key}=cpu (or auto)", key=key
        )
    return dev


def setup(device: str = "auto", *, key: str = "train.device") -> DistInfo:
    """Join the process group started by torchrun (WORLD_SIZE > 1), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, key=key)
    if _initialized():  # the caller's group
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    if world > 1 and dist.is_available():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # before NCCL builds its communicator
        dist.init_process_group(backend=backend)
        logger.info("distributed: %s, rank %d of %d", backend, dist.get_rank(), world)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=True)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(0, 1, local_rank, dev)


def teardown(info: DistInfo | None = None) -> None:
    """Destroy the process group `setup` initialised (with no `info`: any group)."""
    if _initialized() and (info is None or info.owns_group):
        dist.destroy_process_group()


def barrier() -> None:
    if _initialized():
        dist.barrier()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average logged scalars over ranks (identity when not distributed)."""
    if not _initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))
