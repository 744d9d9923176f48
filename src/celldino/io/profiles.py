"""Profiles on disk: per-cell Parquet shards in, AnnData (.h5ad) and Parquet/CSV tables out.

A profile table is `Metadata_*` columns plus feature columns (the pycytominer / copairs
convention). In memory a profile is an `anndata.AnnData`: `X` = features (float64),
`obs` = metadata (`obs_names` = plate_well, or the profile's keys), `uns['celldino']['steps']` =
JSON text of the list of {step, params} that made it (HDF5 cannot hold a list of dicts or None;
`celldino.pp.history(adata)` parses it). Inputs may be Parquet, CSV or gzipped CSV.
"""

from __future__ import annotations

import errno
import glob
import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from celldino.errors import DataError, MissingInputError
from celldino.io.embeddings import manifest_path, manifest_shards
from celldino.io.files import WRITE_ERRNOS, write_error
from celldino.log import get_logger

logger = get_logger(__name__)

_STEPS_JSON = "steps_json"  # the key of files written before the steps became JSON in memory


def table_kind(path: str | Path) -> str:
    """'parquet' or 'csv' by the file name's ending, else a DataError naming the file."""
    name = str(path).lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    raise DataError(
        f"{path}: unknown table format; per-cell inputs are Parquet (.parquet), CSV (.csv) "
        "or gzipped CSV (.csv.gz)"
    )


def _literal_prefix(pattern: str) -> str:
    """`pattern` with its leading folders that exist escaped: in `emb[1]/part-*.parquet` the
    folder `emb[1]` is a name, not the class `[1]` (which would match `emb1`)."""
    parts = Path(pattern).parts
    k = 0
    while k < len(parts) - 1 and Path(*parts[: k + 1]).is_dir():
        k += 1
    if k == 0:
        return pattern
    rest = parts[k:]
    return str(Path(glob.escape(str(Path(*parts[:k]))), *rest))


def _listed_only(files: list[str]) -> list[str]:
    """Of glob hits inside extraction folders, the shards their manifests list (a stray
    `part-00001.parquet` left beside a finished extraction is not part of it)."""
    listed: dict[str, set[str]] = {}
    kept = []
    for f in files:
        folder = str(Path(f).parent)
        if folder not in listed:
            listed[folder] = (
                {p.name for p in manifest_shards(folder)}
                if manifest_path(folder).exists()
                else set()
            )
        if listed[folder] and Path(f).name not in listed[folder]:
            logger.warning("%s: not listed in %s/_manifest.json, so not read", f, folder)
            continue
        kept.append(f)
    return kept


def shard_paths(inputs: str | Path | list | tuple) -> list[str]:
    """Expand folders, files and globs into a list of table files.

    A path that exists is taken literally (brackets in `emb[1]` are part of its name); only a
    path that does not exist and holds `*`, `?` or `[` is a glob. A folder holding a
    `_manifest.json` (a `celldino extract` output) gives the shards its manifest lists, in order
    (a stray `part-00001.parquet` it does not list is ignored); another folder gives its
    *.parquet (else *.csv / *.csv.gz) tables. A file reached twice (the same folder given twice,
    or a folder and a glob into it) is refused: its cells would be counted twice."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    out: list[str] = []
    origin: dict[str, str] = {}  # real path → the input item that gave it
    for item in items:
        s = str(item)
        hits: list[str] = []
        if Path(s).is_dir():
            if manifest_path(s).exists():
                hits = [str(p) for p in manifest_shards(s)]
            else:
                for pattern in ("*.parquet", "*.csv", "*.csv.gz"):
                    hits = sorted(
                        str(p)
                        for p in Path(s).rglob(pattern)
                        if not p.name.startswith((".", "_"))  # temporary / hidden files of writers
                    )
                    if hits:
                        break
            if not hits:
                raise MissingInputError(
                    f"folder {s} holds no *.parquet (or *.csv[.gz]) tables; run "
                    "`celldino extract` into it first or point profile.input at the shards"
                )
        elif Path(s).is_file():
            hits = [s]
        elif any(ch in s for ch in "*?["):
            hits = sorted(glob.glob(_literal_prefix(s), recursive=True))
            if not hits:
                raise MissingInputError(
                    f"no files match {s!r} (read as a glob: no such file or folder); "
                    "check profile.input"
                )
            hits = _listed_only(hits)
        else:
            raise MissingInputError(
                f"profile input {s} does not exist (give a folder, file or glob)"
            )
        for f in hits:
            real = os.path.realpath(f)
            if real in origin:
                raise DataError(
                    f"profile.input gives {f} twice (through {origin[real]!r} and {s!r}); "
                    "its cells would be counted twice: give each extraction once"
                )
            origin[real] = s
        out += hits
    for f in out:
        table_kind(f)
    return out


def obs_names(obs: pd.DataFrame, keys: list[str] | None = None) -> pd.Index:
    """Meaningful, unique profile names: the keys joined ('P1_A01'), else a cell id or plate_well
    (made unique with '-1', '-2', ...), else '0', '1', ..."""
    if keys is None:
        for cand in (
            ["Metadata_Plate", "Metadata_Well"],
            ["Metadata_Cell_ID"],
            ["Metadata_cell_id"],
        ):
            if all(k in obs.columns for k in cand):
                keys = cand
                break
    if keys and all(k in obs.columns for k in keys) and len(obs):
        names = obs[list(keys)].astype(str).agg("_".join, axis=1)
        return pd.Index(ad.utils.make_index_unique(pd.Index(names.to_numpy(dtype=str))))
    return pd.Index(np.arange(len(obs)).astype(str))


def frame_to_anndata(
    df: pd.DataFrame,
    features: list[str] | None = None,
    keys: list[str] | None = None,
    *,
    source: str = "the profile table",
) -> ad.AnnData:
    """A profile table → AnnData; features default to every non-`Metadata_` numeric column.

    `obs_names` are the `keys` joined (default plate_well), see `obs_names`."""
    if features is None:
        features = [
            c
            for c in df.columns
            if not str(c).startswith("Metadata_") and pd.api.types.is_numeric_dtype(df[c])
        ]
    missing = [f for f in features if f not in df.columns]
    if missing:
        raise DataError(
            f"{source}: feature columns not in the table: {missing[:5]} ({len(missing)} missing)"
        )
    meta = [c for c in df.columns if c not in set(features)]
    X = df[features].to_numpy(dtype=np.float64)  # (n_profiles, n_features)
    obs = df[meta].reset_index(drop=True)
    for c in obs.columns:  # dates (DuckDB reads CSV dates as such): ISO text, as in the file
        if pd.api.types.is_datetime64_any_dtype(obs[c]):
            t = obs[c]
            fmt = (
                "%Y-%m-%d"
                if (t.dropna() == t.dropna().dt.normalize()).all()
                else "%Y-%m-%dT%H:%M:%S"
            )
            obs[c] = t.dt.strftime(fmt).astype(object)
    obs.index = obs_names(obs, keys)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(features, dtype=str)))
    adata.uns["celldino"] = {"steps": "[]"}
    return adata


def anndata_to_frame(adata: ad.AnnData) -> pd.DataFrame:
    """AnnData → `Metadata_*` columns followed by the feature columns (as pycytominer expects)."""
    X = np.asarray(adata.X)
    feats = pd.DataFrame(X, columns=list(adata.var_names))
    obs = adata.obs.reset_index(drop=True)
    return pd.concat([obs, feats], axis=1)


def _category(col: pd.Series) -> pd.Series:
    """Object column → categorical of strings, missing values kept missing (not 'nan')."""
    return col.map(lambda v: v if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))


def _uns_safe(v: object) -> object:
    """uns values anndata can write: None entries dropped, nested or ragged lists as JSON text."""
    if isinstance(v, dict):
        return {str(k): _uns_safe(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)) and any(
        isinstance(x, (dict, list, tuple)) or x is None for x in v
    ):
        return json.dumps(v, default=_json_default)
    return v


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _h5ad_safe(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    for col in out.obs.columns:
        if out.obs[col].dtype == object:
            out.obs[col] = _category(out.obs[col]).astype("category")
    meta = dict(out.uns.get("celldino", {}))
    steps = meta.get("steps", "[]")
    if not isinstance(steps, str):  # a list of dicts (written by older code or by hand)
        steps = json.dumps(list(steps), default=_json_default)
    meta["steps"] = steps
    out.uns["celldino"] = _uns_safe(meta)
    return out


def _refuse_nul(adata: ad.AnnData, path: Path) -> None:
    """HDF5 cannot hold a NUL character in text: name the value rather than fail in h5py."""
    for col, values in [*adata.obs.items(), ("obs_names", adata.obs_names)]:
        if (
            col == "obs_names"
            or pd.api.types.is_string_dtype(values.dtype)
            or isinstance(values.dtype, pd.CategoricalDtype)
        ):
            text = pd.Series(np.asarray(values, dtype=object)).astype(str)
            bad = np.flatnonzero(text.str.contains("\x00", regex=False).to_numpy())
            if bad.size:
                where = "the profile names" if col == "obs_names" else f"column {col}"
                raise DataError(
                    f"cannot write {path}: {where} holds a NUL character (\\x00) in "
                    f"{bad.size} profile(s), e.g. {text.iloc[bad[0]]!r}; HDF5 text cannot hold "
                    "it: remove it from the input table"
                )


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_h5ad(adata: ad.AnnData, path: str | Path) -> Path:
    """Write AnnData atomically (temporary file, then rename); steps kept as JSON text."""
    path = Path(path)
    _refuse_nul(adata, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        _h5ad_safe(adata).write_h5ad(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # never a half-written temporary file left behind
        full = isinstance(e, OSError) and (
            e.errno in WRITE_ERRNOS or "errno = 28" in str(e) or "No space left" in str(e)
        )  # HDF5 reports a full disk as an OSError without errno, the C errno in its text
        if full:
            code = e.errno if e.errno in WRITE_ERRNOS else errno.ENOSPC  # type: ignore[union-attr]
            raise write_error(path, OSError(code, os.strerror(code)), what="profiles") from None
        raise
    return path


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an .h5ad written by `write_h5ad` (or any AnnData file): `uns['celldino']['steps']`
    is JSON text (files of older versions held it under `steps_json`)."""
    try:
        adata = ad.read_h5ad(path)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not a readable .h5ad file ({e}); rewrite it") from e
    # the checks read_table makes of a table's header: one name, one column
    twice = adata.var_names[adata.var_names.duplicated()].unique().tolist()
    if twice:
        raise DataError(
            f"{path}: feature(s) {twice[:5]} appear more than once in var_names; keep one of "
            "each (or rename: adata.var_names_make_unique())"
        )
    both = [c for c in adata.obs.columns if c in set(adata.var_names)]
    if both:
        raise DataError(
            f"{path}: {both[:5]} name both an obs (metadata) column and a feature in var_names; "
            "rename one of them"
        )
    meta = dict(adata.uns.get("celldino", {}))
    if _STEPS_JSON in meta:
        meta["steps"] = str(meta.pop(_STEPS_JSON))
    steps = meta.get("steps", "[]")
    meta["steps"] = steps if isinstance(steps, str) else json.dumps(list(steps), default=str)
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
        raise DataError(f"{path}: unknown table format (use .parquet, .csv or .csv.gz)")
    os.replace(tmp, path)
    return path


def read_profiles(path: str | Path, features: list[str] | None = None) -> ad.AnnData:
    """Read a profile file (.h5ad, .parquet, .csv, .csv.gz) as AnnData."""
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise MissingInputError(f"profile file {path} does not exist")
    if name.endswith(".h5ad"):
        return read_h5ad(path)
    if name.endswith((".parquet", ".csv", ".csv.gz")):  # the one reader of user tables
        from celldino.io.tables import read_table

        return frame_to_anndata(read_table(path, features=True), features, source=str(path))
    raise DataError(f"{path}: unknown profile format (use .h5ad, .parquet, .csv or .csv.gz)")
