"""Patch tokens and last-layer attention of a chosen subset of cells, for subcellular analyses
and attention plots.

`attention.zarr` (a Zarr group in the embeddings folder) holds, for n cells:
- `cls` (n, D) float32: class token after the final norm;
- `patch` (n, N, D) float32: patch tokens after the final norm;
- `attn` (n, heads, T, T) float32: last block's attention, T = 1 + registers + N;
- `attn_maps` (n, heads, h, w) float32: the class token's attention over the patch grid (the
  DINO attention maps); channel-adaptive models: (n, heads, C, h, w);
and attrs `cell_ids` (row i ↔ cell i), `grid` [h, w], `num_registers`, `channels`.
A channelwise model gives C·heads heads (channel 0's heads first). `read_attention(path, id)`
returns one cell's arrays by its `Metadata_CellID`.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from celldino.errors import DataError

ATTENTION = "attention.zarr"


class UnknownCellError(DataError, KeyError):
    """Cell ids that are not in the cells table (a `KeyError` too, for Python callers)."""

    __str__ = Exception.__str__  # the message, without KeyError's quotes


def pick_cells(cell_ids: Sequence[str], requested: Sequence[str], sample: int) -> list[int]:
    """Row indices of the requested cell ids (unknown ids are an error) plus `sample` cells
    spread evenly over the table; sorted, without duplicates."""
    index = {str(c): i for i, c in enumerate(cell_ids)}
    unknown = [c for c in requested if str(c) not in index]
    if unknown:
        raise UnknownCellError(
            f"extract.attention_cells: {len(unknown)} ids not in Metadata_CellID "
            f"(first: {unknown[0]!r}; ids look like {str(cell_ids[0])!r})"
        )
    rows = {index[str(c)] for c in requested}
    n = len(cell_ids)
    if sample > 0 and n:
        rows |= {int(i) for i in np.linspace(0, n - 1, min(sample, n)).round()}
    return sorted(rows)


def attention_outputs(
    model: torch.nn.Module, x: torch.Tensor, *, channel_ids: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Forward (B, C, H, W) with the attention of the last block; float32 arrays to save."""
    out = model(x, channel_ids=channel_ids, return_attention=True)
    attn = out["attn"].float()  # (B, heads, T, T)
    patch = out["patch"].float()  # (B, N, D)
    p = _patch_size(model)
    h, w = x.shape[-2] // p, x.shape[-1] // p
    N = patch.shape[1]
    first = attn.shape[-1] - N  # class + registers
    maps = attn[:, :, 0, first:]  # (B, heads, N)
    if N == h * w:
        maps = maps.reshape(*maps.shape[:2], h, w)  # (B, heads, h, w)
    else:  # channel-adaptive: N = C·h·w
        maps = maps.reshape(*maps.shape[:2], N // (h * w), h, w)  # (B, heads, C, h, w)
    return {"cls": out["cls"].float(), "patch": patch, "attn": attn, "attn_maps": maps}


def _patch_size(model: torch.nn.Module) -> int:
    return int(getattr(model, "patch_size", None) or model.backbone.patch_size)


def write_attention(
    path: Path,
    arrays: dict[str, np.ndarray],
    *,
    cell_ids: list[str],
    channels: list[str],
    grid: tuple[int, int],
    num_registers: int,
) -> Path:
    """Write the Zarr group (to a temporary folder, then renamed: never half written)."""
    import zarr

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    g = zarr.open_group(str(tmp), mode="w")
    for name, a in arrays.items():
        g.create_array(name, data=np.ascontiguousarray(a), chunks=(1, *a.shape[1:]))
    g.attrs.update(
        {
            "cell_ids": [str(c) for c in cell_ids],
            "channels": list(channels),
            "grid": [int(grid[0]), int(grid[1])],
            "num_registers": int(num_registers),
        }
    )
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def read_attention(path: str | Path, cell_id: str) -> dict[str, np.ndarray]:
    """One cell's `cls`, `patch`, `attn` and `attn_maps` from an attention.zarr (or its folder)."""
    import zarr

    path = Path(path)
    if path.is_dir() and (path / ATTENTION).exists():
        path = path / ATTENTION
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `celldino extract` with extract.attention_cells=[...] "
            "or extract.attention_sample=N"
        )
    g = zarr.open_group(str(path), mode="r")
    ids = list(g.attrs["cell_ids"])
    if str(cell_id) not in ids:
        raise KeyError(f"cell {cell_id!r} not in {path} ({len(ids)} cells, e.g. {ids[:3]})")
    i = ids.index(str(cell_id))
    return {name: np.asarray(g[name][i]) for name in ("cls", "patch", "attn", "attn_maps")}
