"""Reading the attention store `attention.zarr` of an embeddings folder.

`celldino.extract.attention_store` writes it (arrays `cls`, `patch`, `attn`, `attn_maps`, one row
per cell; attrs `cell_ids`, `channels`, `grid`, `num_registers`); `read_attention_store` reads
whole arrays of it back for the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ATTENTION = "attention.zarr"

__all__ = ["ATTENTION", "read_attention_store"]


def read_attention_store(
    path: str | Path, names: tuple[str, ...] = ("attn_maps", "patch")
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays `names` of an attention store (or of the one in an embeddings folder) and its
    attrs."""
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
    return {name: np.asarray(g[name]) for name in names}, dict(g.attrs)
