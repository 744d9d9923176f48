"""Provenance of a profile: every stage appends {step, params} to `uns['celldino']['steps']`."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np

CONTROL_COLUMN = "Metadata_celldino_control"  # bool obs column written by pp.annotate


def record(adata: ad.AnnData, step: str, params: dict[str, Any]) -> None:
    """Append one step and its parameters (plain JSON-able values) to the provenance list."""
    meta = adata.uns.setdefault("celldino", {})
    steps = list(meta.get("steps", []))
    steps.append({"step": step, "params": {k: _plain(v) for k, v in params.items()}})
    meta["steps"] = steps


def steps(adata: ad.AnnData) -> list[str]:
    """Names of the steps already applied, in order."""
    return [s["step"] for s in adata.uns.get("celldino", {}).get("steps", [])]


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)
