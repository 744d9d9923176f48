"""Profiles on disk: per-cell Parquet shards in, AnnData (.h5ad) and Parquet/CSV tables out.

A profile table is `Metadata_*` columns plus feature columns (the pycytominer / copairs
convention). In memory a profile is an `anndata.AnnData`: `X` = features (float64),
`obs` = metadata, `uns['celldino']['steps']` = the list of {step, params} that made it.
HDF5 cannot hold a list of dicts, so the steps travel as JSON text inside the .h5ad.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

_STEPS_JSON = "steps_json"


def shard_paths(inputs: str | Path | list | tuple) -> list[str]:
    """Expand folders (their *.parquet), files and globs into a sorted list of Parquet files."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    out: list[str] = []
    for item in items:
        s = str(item)
        if any(ch in s for ch in "*?["):
            hits = sorted(glob.glob(s, recursive=True))
            if not hits:
                raise FileNotFoundError(f"no Parquet files match {s!r}")
            out += hits
        elif Path(s).is_dir():
            hits = sorted(
                str(p)
                for p in Path(s).rglob("*.parquet")
                if not p.name.startswith((".", "_"))  # temporary / hidden files of writers
            )
            if not hits:
                raise FileNotFoundError(f"folder {s} holds no *.parquet shards")
            out += hits
        elif Path(s).is_file():
            out.append(s)
        else:
            raise FileNotFoundError(f"profile input {s} does not exist (a folder, file or glob)")
    return out


def frame_to_anndata(df: pd.DataFrame, features: list[str] | None = None) -> ad.AnnData:
    """A profile table → AnnData; features default to every non-`Metadata_` numeric column."""
    if features is None:
        features = [
            c
            for c in df.columns
            if not str(c).startswith("Metadata_") and pd.api.types.is_numeric_dtype(df[c])
        ]
    missing = [f for f in features if f not in df.columns]
    if missing:
        raise KeyError(f"feature columns not in the table: {missing[:5]} ({len(missing)} missing)")
    meta = [c for c in df.columns if c not in set(features)]
    X = df[features].to_numpy(dtype=np.float64)  # (n_profiles, n_features)
    obs = df[meta].reset_index(drop=True)
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(features, dtype=str)))
    adata.uns["celldino"] = {"steps": []}
    return adata


def anndata_to_frame(adata: ad.AnnData) -> pd.DataFrame:
    """AnnData → `Metadata_*` columns followed by the feature columns (as pycytominer expects)."""
    X = np.asarray(adata.X)
    feats = pd.DataFrame(X, columns=list(adata.var_names))
    obs = adata.obs.reset_index(drop=True)
    return pd.concat([obs, feats], axis=1)


def _h5ad_safe(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    for col in out.obs.columns:
        if out.obs[col].dtype == object:
            out.obs[col] = out.obs[col].astype(str)
    meta = dict(out.uns.get("celldino", {}))
    steps = meta.pop("steps", [])
    meta[_STEPS_JSON] = json.dumps(steps, default=_json_default)
    out.uns["celldino"] = meta
    return out


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_h5ad(adata: ad.AnnData, path: str | Path) -> Path:
    """Write AnnData atomically (temporary file, then rename); steps kept as JSON text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    _h5ad_safe(adata).write_h5ad(tmp)
    os.replace(tmp, path)
    return path


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an .h5ad written by `write_h5ad`; `uns['celldino']['steps']` is a list again."""
    adata = ad.read_h5ad(path)
    meta = dict(adata.uns.get("celldino", {}))
    if _STEPS_JSON in meta:
        meta["steps"] = json.loads(str(meta.pop(_STEPS_JSON)))
    meta.setdefault("steps", [])
    adata.uns["celldino"] = meta
    return adata


def write_table(adata: ad.AnnData, path: str | Path) -> Path:
    """Export as Parquet (.parquet) or CSV (.csv / .csv.gz), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = anndata_to_frame(adata)
    tmp = _tmp(path)
    name = path.name.lower()
    if name.endswith(".parquet"):
        df.to_parquet(tmp, index=False)
    elif name.endswith((".csv", ".csv.gz")):
        df.to_csv(tmp, index=False, compression="gzip" if name.endswith(".gz") else None)
    else:
        raise ValueError(f"{path}: unknown table format (use .parquet, .csv or .csv.gz)")
    os.replace(tmp, path)
    return path


def read_profiles(path: str | Path, features: list[str] | None = None) -> ad.AnnData:
    """Read a profile file (.h5ad, .parquet, .csv, .csv.gz) as AnnData."""
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise FileNotFoundError(f"profile file {path} does not exist")
    if name.endswith(".h5ad"):
        return read_h5ad(path)
    if name.endswith(".parquet"):
        return frame_to_anndata(pd.read_parquet(path), features)
    if name.endswith((".csv", ".csv.gz")):
        return frame_to_anndata(pd.read_csv(path), features)
    raise ValueError(f"{path}: unknown profile format (use .h5ad, .parquet, .csv or .csv.gz)")
