"""Deterministic, resumable, distributed-aware samplers over step-sized batches.

Every rank draws the same global order from (seed, epoch) and takes its own contiguous slice of
each global batch, so the data is sharded by rank and a run can restart at any step: the sampler
position is just the step. Incomplete last batches are dropped (equal batches on every rank).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from celldino.errors import DataError


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, 0x5EED])


class StepBatchSampler:
    """Yields, for one epoch, the index lists of this rank's share of each global batch.

    `set_epoch(e)` picks the epoch, `start_step` (set by `set_epoch(e, start_step=k)`) skips the
    first k batches of that epoch when resuming. Items are ints (image indices).
    """

    def __init__(
        self, n: int, global_batch: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if global_batch % world_size:
            raise DataError(
                f"train.batch_size={global_batch} is not divisible by the {world_size} ranks"
            )
        if n < global_batch:
            raise DataError(
                f"the dataset has {n} images, fewer than one batch of train.batch_size="
                f"{global_batch}: lower train.batch_size to at most {n}, or prepare more cells"
            )
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def global_items(self) -> Sequence:
        """The epoch's item order, identical on every rank."""
        return _rng(self.seed, self.epoch).permutation(self.n).tolist()

    def __iter__(self) -> Iterator[list]:
        items = self.global_items()
        lo = self.rank * self.local_batch
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + lo
            yield list(items[start : start + self.local_batch])


class WeakLabelPairSampler(StepBatchSampler):
    """WS-DINO: items are pairs (i, j) of different images with the same weak label.

    Each draw picks a weak-label group uniformly (so groups are balanced whatever their sizes),
    then image i uniformly in the group and a partner j ≠ i in the same group (j = i only when
    the group holds a single image). Global crops come from i, local crops from j.
    An epoch holds as many pairs as there are images.
    """

    def __init__(
        self,
        labels: Sequence,
        global_batch: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(len(labels), global_batch, seed=seed, rank=rank, world_size=world_size)
        codes, uniques = _factorize(labels)
        self.groups = [np.flatnonzero(codes == g) for g in range(len(uniques))]
        self.group_names = list(uniques)

    def global_items(self) -> Sequence:
        rng = _rng(self.seed, self.epoch)
        g = rng.integers(0, len(self.groups), size=self.n)
        pairs = []
        for gi in g:
            members = self.groups[gi]
            a = int(rng.integers(0, len(members)))
            if len(members) > 1:
                b = int(rng.integers(0, len(members) - 1))
                b += b >= a  # any other member
            else:
                b = a
            pairs.append((int(members[a]), int(members[b])))
        return pairs


def _factorize(labels: Sequence) -> tuple[np.ndarray, list]:
    arr = np.asarray([str(x) for x in labels])
    uniques, codes = np.unique(arr, return_inverse=True)
    if any(u in ("", "nan", "None") for u in uniques):
        bad = [i for i, x in enumerate(arr) if x in ("", "nan", "None")][:5]
        raise DataError(
            f"the weak-label column has missing values (rows {bad}...); fill them or drop those "
            "cells before WS-DINO training"
        )
    return codes, list(uniques)
