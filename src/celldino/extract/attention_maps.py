"""Patch tokens and last-layer attention of a chosen subset of cells, for subcellular analyses
and attention plots: which cells (`pick_cells`) and the forward pass that gives their arrays
(`attention_outputs`). `celldino.io.attention_store` writes them to `attention.zarr` and reads
them back; its docstring describes the arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from celldino.errors import DataError


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
