"""Processes and devices for `train` and `extract`: one torchrun / DDP set-up shared by both.

`setup(device, key=...)` resolves the device (`auto` → `cuda:<LOCAL_RANK>` when a GPU is there,
else cpu) and, when torchrun started several processes (WORLD_SIZE > 1), joins the process
group: NCCL on GPU, gloo on CPU. On a GPU `torch.cuda.set_device` comes before
`init_process_group`, so each rank's NCCL communicator is built on its own GPU (without it every
rank's first collective lands on cuda:0). A group that the caller initialised is used as it is
and left alone by `teardown`.

`set_threads(n, workers=...)` sets torch's CPU threads for the process (`train.threads`,
`extract.threads`); `auto_threads` is its rule for n = 0 (auto). DataLoader workers need nothing:
torch's worker loop sets one thread in each (tests/test_threads.py checks it).
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


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (itself when not distributed): one reading of the shared
    folder that every rank acts on, rather than each rank's own, possibly later, reading."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] when not distributed)."""
    if not _initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the OS has one, else all."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _positive_int(text: str | None) -> int:
    """The leading positive integer of an environment value ('4', '4,2' → 4), else 0."""
    head = (text or "").split(",")[0].strip()
    return int(head) if head.isdigit() and int(head) > 0 else 0


def auto_threads(
    cores: int, *, omp_num_threads: str | None = None, local_ranks: int = 1, workers: int = 0
) -> int:
    """Torch threads for one process under `train.threads=0` / `extract.threads=0` (auto).

    A user's OMP_NUM_THREADS (a positive number) is the answer as it stands. Otherwise the
    `cores` this process may use are split evenly among the `local_ranks` processes torchrun
    started on this machine (LOCAL_WORLD_SIZE), and each of the process's `workers` DataLoader
    workers (one thread each) takes one of its rank's cores: max(1, cores // local_ranks -
    workers). More threads than free cores is the expensive mistake: OpenMP's threads wait on
    each other at every parallel region, so one thread whose core is taken stalls all of them.
    """
    if n := _positive_int(omp_num_threads):
        return n
    per_rank = max(1, cores // max(1, local_ranks))
    return max(1, per_rank - max(0, workers))


def set_threads(requested: int, *, workers: int = 0, key: str = "train.threads") -> int:
    """Set torch's intra-op threads (`requested`, or `auto_threads` when 0) and, once per
    process where torch still allows it, its inter-op threads; returns the previous intra-op
    count (for callers that restore it)."""
    if requested < 0:
        from celldino.config import ConfigError

        raise ConfigError(f"{key}={requested}: must be 0 (auto) or more", key=key)
    previous = torch.get_num_threads()
    n = requested or auto_threads(
        available_cores(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        local_ranks=_positive_int(os.environ.get("LOCAL_WORLD_SIZE")) or 1,
        workers=workers,
    )
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:  # allowed once, before any inter-op work: a second train() in a process skips it
            torch.set_num_interop_threads(n)
        except RuntimeError:
            pass
    logger.info("%s=%s: %d torch thread%s", key, requested or "0 (auto)", n, "s"[: n != 1])
    return previous


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average logged scalars over ranks (identity when not distributed)."""
    if not _initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))
