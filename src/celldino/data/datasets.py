"""Datasets over a prep folder: single-cell crops (DINO) and whole fields (WS-DINO, field-level).

`CropDataset(prep_dir, channels=None, transform=None)[i]` → float32 tensor (C, H, W) of crop i,
normalised with the option and statistics recorded in crops.zarr; `.metadata` is cells.parquet
(row i ↔ item i) and `.channels` the channel names in tensor order.
`FieldDataset(prep_dir, ...)[i]` → the whole site (C, H, W) float32, illumination-corrected and
normalised the same way; `.metadata` is one row per QC-passing site (images.parquet).
The Zarr array is opened lazily in each worker process, so DataLoader workers are safe.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from celldino.data.illumination import apply_illumination, function_for
from celldino.data.imagesets import ImageSet
from celldino.data.intensity_normalization import (
    finite_image,
    image_percentiles,
    lo_hi_for,
    normalise,
)
from celldino.io.cropstore import CELLS, check_cells, open_crops, read_cells, read_rows
from celldino.io.files import read_json
from celldino.io.prepared import ILLUM, STATE, read_illumination, read_images


def _channel_index(available: list[str], wanted: list[str] | tuple[str, ...] | None) -> list[int]:
    if not wanted:
        return list(range(len(available)))
    missing = [c for c in wanted if c not in available]
    if missing:
        raise KeyError(f"channel '{missing[0]}' not in the prepared data (channels: {available})")
    return [available.index(c) for c in wanted]


class CropDataset(torch.utils.data.Dataset):
    """Single-cell crops of a prep folder as float32 tensors (C, H, W)."""

    def __init__(
        self,
        prep_dir: str | Path,
        channels: list[str] | tuple[str, ...] | None = None,
        transform: Callable | None = None,
    ):
        self.prep_dir = Path(prep_dir)
        cells = self.prep_dir / CELLS
        if not cells.exists():
            raise FileNotFoundError(f"{cells} not found: run `celldino prepare` first")
        self.metadata = read_cells(self.prep_dir)
        arr = open_crops(self.prep_dir)  # refuses chunks missing on disk
        check_cells(self.prep_dir, self.metadata, arr)  # the cells table the crops were made with
        attrs = dict(arr.attrs)
        self.all_channels = list(attrs["channels"])
        self.channel_index = _channel_index(self.all_channels, channels)
        self.channels = [self.all_channels[i] for i in self.channel_index]
        self.norm = dict(attrs.get("normalization", {"method": "none"}))
        self.transform = transform
        self._array = None
        n = len(self.metadata)
        # per-crop (C,) lo/hi for the percentile options
        self._lo = self._hi = None
        if self.norm.get("method") in ("percentile_image", "percentile_plate") and n:
            keys = self.metadata["Metadata_ImageKey"].astype(str)
            plates = self.metadata["Metadata_Plate"].astype(str)
            pairs = [lo_hi_for(self.norm, k, p) for k, p in zip(keys, plates)]
            self._lo = np.asarray([p[0] for p in pairs], np.float32)[
                :, self.channel_index
            ]  # (N, C)
            self._hi = np.asarray([p[1] for p in pairs], np.float32)[
                :, self.channel_index
            ]  # (N, C)

    def __len__(self) -> int:
        return len(self.metadata)

    @property
    def array(self):
        if self._array is None:
            self._array = open_crops(self.prep_dir, check=False)  # checked in __init__
        return self._array

    def __getstate__(self):  # DataLoader workers reopen the store
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    def raw(self, i: int) -> np.ndarray:
        """Crop i (C, H, W) in the source dtype, selected channels."""
        return read_rows(self.array, [int(i)], self.prep_dir)[0][self.channel_index]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.__getitems__([int(i)])[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        """Crops of many rows, reading each touched Zarr chunk once (DataLoader's batched fetch).

        One crop at a time decompresses its whole chunk per crop; a batch of 64 random crops read
        together was 4x faster on the demo screen's store.
        """
        idx = np.asarray(indices, dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)
        raw = read_rows(self.array, uniq, self.prep_dir)[:, self.channel_index][inverse]
        lo = None if self._lo is None else self._lo[idx]  # (B, C)
        hi = None if self._hi is None else self._hi[idx]
        x = torch.from_numpy(np.ascontiguousarray(normalise(raw, self.norm, lo, hi)))
        if self.transform is not None:
            return [self.transform(t) for t in x]
        return list(x)  # B tensors (C, H, W)


class FieldDataset(torch.utils.data.Dataset):
    """Whole fields of view (C, H, W) float32, from a prep folder's images.parquet."""

    def __init__(
        self,
        prep_dir: str | Path,
        channels: list[str] | tuple[str, ...] | None = None,
        transform: Callable | None = None,
        include_flagged: bool = False,
    ):
        self.prep_dir = Path(prep_dir)
        state = read_json(self.prep_dir / STATE)
        table = read_images(self.prep_dir)
        if not include_flagged and "QC_Pass" in table:
            table = table[table["QC_Pass"].astype(bool)]
        if "Skipped" in table:
            table = table[~table["Skipped"].astype(bool)]
        self.metadata = table.reset_index(drop=True)
        self.all_channels = list(state["channels"])
        self.channel_index = _channel_index(self.all_channels, channels)
        self.channels = [self.all_channels[i] for i in self.channel_index]
        self.norm = dict(state["normalization"])
        self.illum = (
            read_illumination(self.prep_dir / ILLUM, state["illumination"])
            if state.get("illumination")
            else {}
        )
        self._set = ImageSet(self.metadata.drop(columns=["Metadata_ImageKey"]), self.all_channels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.metadata)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = finite_image(self._set.read(int(i)))
        plate = str(self.metadata.at[int(i), "Metadata_Plate"])
        img = apply_illumination(img, function_for(self.illum, plate, img.shape))
        key = str(self.metadata.at[int(i), "Metadata_ImageKey"])
        if self.norm.get("method") == "percentile_image" and key not in self.norm.get("image", {}):
            lo, hi = image_percentiles(img, tuple(self.norm["percentiles"]))
        else:
            lo, hi = lo_hi_for(self.norm, key, plate)
        x = normalise(img, self.norm, lo, hi)[self.channel_index]
        t = torch.from_numpy(np.ascontiguousarray(x))  # (C, H, W)
        return self.transform(t) if self.transform is not None else t
