"""Crops for extraction, read a batch at a time in row order.

`CropBatches[b]` is the (B, C, H, W) batch of rows [start, stop) = `ranges[b]`, read and
normalised by `CropDataset.__getitems__` (one read per touched Zarr chunk, the same normalisation
as single crops); the DataLoader then only moves whole batches between processes.
"""

from __future__ import annotations

import torch


class CropBatches(torch.utils.data.Dataset):
    """Item b: normalised float32 crops (B, C, H, W) of rows [start, stop) = `ranges[b]`."""

    def __init__(self, crops, ranges: list[tuple[int, int]]):
        self.crops = crops  # a celldino.data.CropDataset (reopens its Zarr store per worker)
        self.ranges = ranges

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, b: int) -> torch.Tensor:
        start, stop = self.ranges[b]
        return torch.stack(self.crops.__getitems__(list(range(start, stop))))  # (B, C, H, W)
