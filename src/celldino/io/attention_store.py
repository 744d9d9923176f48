"""The attention store `_attention.zarr` of an embeddings folder: patch tokens and last-layer
attention of a chosen subset of cells, for subcellular analyses and attention plots. Its name
begins with '_' so that `pd.read_parquet(<embeddings folder>)` reads the shards alone (pyarrow
skips such names); a folder of celldino 0.3.0 or earlier holds `attention.zarr`, still read.

A Zarr group holding, for n cells:
- `cls` (n, D) float32: class token after the final norm;
- `patch` (n, N, D) float32: patch tokens after the final norm;
- `attn` (n, heads, T, T) float32: last block's attention, T = 1 + registers + N;
- `attn_maps` (n, heads, h, w) float32: the class token's attention over the patch grid (the
  DINO attention maps); channel-adaptive models: (n, heads, C, h, w);
and attrs `cell_ids` (row i ↔ cell i), `grid` [h, w], `num_registers`, `channels`.
A channelwise model gives C·heads heads (channel 0's heads first).

`celldino.extract.attention_maps` computes the arrays and `write_attention` stores them;
`read_attention(path, id)` returns one cell's arrays by its `Metadata_CellID`,
`read_attention_store` whole arrays (for the report).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

# '_' first: pyarrow (pd.read_parquet(<embeddings folder>), DuckDB's folder reads) skips names
# beginning with '_' or '.', so the store does not stop the folder reading as one table
ATTENTION = "_attention.zarr"
LEGACY_ATTENTION = "attention.zarr"  # celldino 0.3.0 and earlier: still read

__all__ = [
    "ATTENTION",
    "LEGACY_ATTENTION",
    "read_attention",
    "read_attention_store",
    "store_in",
    "write_attention",
]


def store_in(folder: str | Path) -> Path:
    """The attention store of an embeddings folder: `_attention.zarr`, or an older run's
    `attention.zarr` when only that exists (the new name where neither does)."""
    folder = Path(folder)
    new, old = folder / ATTENTION, folder / LEGACY_ATTENTION
    return old if not new.exists() and old.exists() else new


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


def _open(path: str | Path):
    """The store at `path` (or the one in the embeddings folder `path`), opened read-only."""
    import zarr

    path = Path(path)
    if path.is_dir() and path.name not in (ATTENTION, LEGACY_ATTENTION):
        path = store_in(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `celldino extract` with extract.attention_cells=[...] "
            "or extract.attention_sample=N"
        )
    return path, zarr.open_group(str(path), mode="r")


def read_attention(path: str | Path, cell_id: str) -> dict[str, np.ndarray]:
    """One cell's `cls`, `patch`, `attn` and `attn_maps` from an attention.zarr (or its folder)."""
    path, g = _open(path)
    ids = list(g.attrs["cell_ids"])
    if str(cell_id) not in ids:
        raise KeyError(f"cell {cell_id!r} not in {path} ({len(ids)} cells, e.g. {ids[:3]})")
    i = ids.index(str(cell_id))
    return {name: np.asarray(g[name][i]) for name in ("cls", "patch", "attn", "attn_maps")}


def read_attention_store(
    path: str | Path, names: tuple[str, ...] = ("attn_maps", "patch")
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays `names` of an attention store (or of the one in an embeddings folder) and its
    attrs."""
    _, g = _open(path)
    return {name: np.asarray(g[name]) for name in names}, dict(g.attrs)
