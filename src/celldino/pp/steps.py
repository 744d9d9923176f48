"""Provenance of a profile: every stage appends {step, params} to `uns['celldino']['steps']`.

The list is kept as JSON text (in memory and on disk), because HDF5 / Zarr cannot hold a list
of dicts or a None: an AnnData that went through any `pp` step can be written again with plain
`adata.write_h5ad(...)`. `history(adata)` returns the list, `steps(adata)` the step names.
"""

from __future__ import annotations

import json
from typing import Any

import anndata as ad
import numpy as np

CONTROL_COLUMN = "Metadata_celldino_control"  # bool obs column written by pp.annotate


def history(adata: ad.AnnData) -> list[dict[str, Any]]:
    """The list of {step, params} applied so far, in order (parsed from the JSON text)."""
    raw = adata.uns.get("celldino", {}).get("steps", [])
    if isinstance(raw, (str, bytes)):
        raw = json.loads(raw or "[]")
    return [dict(s) for s in raw]


def record(adata: ad.AnnData, step: str, params: dict[str, Any]) -> None:
    """Append one step and its parameters (plain JSON-able values) to the provenance list."""
    meta = adata.uns.setdefault("celldino", {})
    done = history(adata)
    done.append({"step": step, "params": {str(k): _plain(v) for k, v in params.items()}})
    meta["steps"] = json.dumps(done)


def steps(adata: ad.AnnData) -> list[str]:
    """Names of the steps already applied, in order."""
    return [s["step"] for s in history(adata)]


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)  # JSON has no NaN / inf
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)
