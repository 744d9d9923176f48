"""`celldino profile`: the configured chain of stages, from shards to written profile files.

The aggregated profiles are cached beside the output (`<out stem>.aggregated.h5ad`) with a
fingerprint of the inputs and aggregation settings, so a rerun after a failure in a later
stage (or with other normalisation settings) skips the expensive pass over the cells.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import anndata as ad
import numpy as np

from celldino.config import ProfileConfig
from celldino.errors import DataError, IncompleteInputError
from celldino.io.embeddings import manifest_path, read_manifest, require_complete, shard_name
from celldino.io.files import fingerprint, require_writable
from celldino.io.profiles import (
    read_h5ad,
    shard_paths,
    write_h5ad,
    write_table,
)
from celldino.log import get_logger
from celldino.pp.aggregate import aggregate
from celldino.pp.consensus import consensus
from celldino.pp.controls import annotate
from celldino.pp.feature_select import feature_select
from celldino.pp.harmony import harmony
from celldino.pp.inverse_normal import inverse_normal
from celldino.pp.nonfinite import handle_nonfinite
from celldino.pp.normalize import normalize
from celldino.pp.sphere import sphere

logger = get_logger(__name__)


def _features(spec: str) -> str | list[str] | None:
    if not spec:
        return None
    if "," in spec:
        return [s.strip() for s in spec.split(",") if s.strip()]
    return spec


def _outputs(out: Path, formats: tuple[str, ...], suffix: str = "") -> dict[str, Path]:
    ext = {"h5ad": ".h5ad", "parquet": ".parquet", "csv": ".csv"}
    # profile.out may name any of the formats: runs/p.parquet → runs/p.h5ad, runs/p.csv too
    stem = next((out.name[: -len(e)] for e in ext.values() if out.name.endswith(e)), out.name)
    bad = [f for f in formats if f not in ext]
    if bad:
        raise DataError(f"unknown profile.formats {bad}; choose from {list(ext)}")
    return {f: out.with_name(stem + suffix + ext[f]) for f in formats}


def check_inputs(cfg: ProfileConfig) -> dict[str, list[str]]:
    """Refuse an extraction folder whose manifest says it is unfinished or misses shards
    (IncompleteInputError), unless `profile.allow_partial`; then the missing shards of each
    folder are returned (and warned about) so the output can record them."""
    partial: dict[str, list[str]] = {}
    folders = [Path(i) for i in cfg.input if Path(i).is_dir()]
    # shards named by files or globs are checked against their folder's manifest too
    files = shard_paths(list(cfg.input))
    folders += [Path(f).parent for f in files if re.fullmatch(r"part-\d+\.parquet", Path(f).name)]
    for folder in dict.fromkeys(folders):
        if not manifest_path(folder).exists():
            continue  # plain tables of the user's: no manifest to check against
        try:
            require_complete(folder)
        except IncompleteInputError:
            if not cfg.allow_partial:
                raise
            manifest = read_manifest(folder) or {}
            n = len(manifest.get("shards", []))
            missing = [shard_name(k) for k in range(n) if not (folder / shard_name(k)).exists()]
            partial[str(folder)] = missing
            logger.warning(
                "profile.allow_partial=true: profiling the unfinished extraction %s "
                "(manifest complete=%s; %d of %d shard(s) missing%s); the profiles record it",
                folder, manifest.get("complete", False), len(missing), n,
                f": {', '.join(missing[:10])}" if missing else "",
            )  # fmt: skip
    return partial


def aggregate_cached(cfg: ProfileConfig) -> ad.AnnData:
    """Aggregate per cfg, reusing `<out>.aggregated.h5ad` when inputs and settings match."""
    partial = check_inputs(cfg)
    files = shard_paths(list(cfg.input))
    key = fingerprint({
        "files": [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files],
        "features": cfg.features, "by": cfg.by, "via": cfg.via, "method": cfg.method,
        "version": 2,  # 2: file column names kept, plate_well obs_names, steps as JSON text
    })  # fmt: skip
    cache = _outputs(Path(cfg.out), ("h5ad",), ".aggregated")["h5ad"]
    if cache.exists() and not partial:
        cached = read_h5ad(cache)
        if cached.uns.get("celldino", {}).get("aggregate_key") == key:
            logger.info("reusing aggregated profiles %s (inputs unchanged)", cache)
            return cached
    levels = [list(cfg.by) + list(cfg.via)] if cfg.via else []
    adata = aggregate(
        files, by=list(cfg.by), features=_features(cfg.features), method=cfg.method,
        levels=levels, memory_limit=cfg.memory_limit, threads=cfg.threads,
    )  # fmt: skip
    adata.uns["celldino"]["aggregate_key"] = key
    if partial:
        adata.uns["celldino"]["partial_input"] = {
            "folders": list(partial),
            "missing_shards": [f"{k}/{m}" for k, ms in partial.items() for m in ms],
        }
    write_h5ad(adata, cache)
    return adata


def _check(adata: ad.AnnData, step: str, cfg: ProfileConfig) -> ad.AnnData:
    """No step may leave 0 profiles, 0 features or NaN/inf behind silently."""
    where = f"profile.input {list(cfg.input)}"
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(
            f"{where}: after the {step} step {adata.n_obs} profiles × {adata.n_vars} features "
            "are left; nothing to write"
        )
    X = np.asarray(adata.X)
    if not np.isfinite(X).all():
        bad = np.flatnonzero(~np.isfinite(X).all(axis=0))
        raise DataError(
            f"{where}: the {step} step made {int((~np.isfinite(X)).sum())} NaN/inf values in "
            f"{len(bad)} feature(s) ({', '.join(map(str, adata.var_names[bad[:5]]))}); "
            f"check the {step} settings (e.g. a constant feature, too few controls)"
        )
    return adata


def check_settings(cfg: ProfileConfig) -> None:
    """Settings that cannot work together, found before any data is read (`celldino run` may
    call this before its first stage): normalisation or sphering on controls without any."""
    uses = []
    if cfg.normalize != "none" and cfg.normalize_reference == "controls":
        uses.append("profile.normalize_reference=controls")
    if cfg.sphere != "none":
        uses.append(f"profile.sphere={cfg.sphere} (fitted on the controls)")
    if uses and not cfg.controls.strip():
        raise DataError(
            f"profile.controls is empty but {' and '.join(uses)} needs negative controls: "
            "set profile.controls to a query such as \"Metadata_pert_type == 'control'\", or "
            "set profile.normalize_reference=all (normalise against every profile)"
            + (" and profile.sphere=none" if cfg.sphere != "none" else "")
        )


def process(adata: ad.AnnData, cfg: ProfileConfig) -> ad.AnnData:
    """Every configured stage after aggregation, in the field's usual order."""
    check_settings(cfg)
    _check_rows(adata, cfg)
    handle_nonfinite(adata, policy=cfg.nonfinite)
    _check(adata, "nonfinite", cfg)
    if cfg.controls.strip():
        annotate(adata, controls=cfg.controls)
    if cfg.normalize != "none":
        normalize(
            adata, method=cfg.normalize, by=cfg.normalize_by or None,
            reference=cfg.normalize_reference, epsilon=cfg.mad_epsilon,
        )  # fmt: skip
        _check(adata, "normalize", cfg)
    if cfg.select:
        feature_select(
            adata, operations=list(cfg.select), min_variance=cfg.min_variance,
            corr_threshold=cfg.corr_threshold, blocklist=list(cfg.blocklist),
        )  # fmt: skip
        _check(adata, "feature_select", cfg)
    if cfg.sphere != "none":
        sphere(adata, method=cfg.sphere, epsilon=cfg.sphere_epsilon, by=cfg.sphere_by or None)
        _check(adata, "sphere", cfg)
    if cfg.harmony_key:
        harmony(adata, key=cfg.harmony_key)
        _check(adata, "harmony", cfg)
    if cfg.inverse_normal:
        inverse_normal(adata)
        _check(adata, "inverse_normal", cfg)
    return adata


def _check_rows(adata: ad.AnnData, cfg: ProfileConfig) -> None:
    if adata.n_obs == 0:
        raise DataError(f"profile.input {list(cfg.input)}: 0 profiles were aggregated")


def run_profile(cfg: ProfileConfig) -> dict[str, Path]:
    """Aggregate, process and write profiles (and consensus profiles); returns written paths."""
    if Path(cfg.out).is_dir():
        raise DataError(
            f"profile.out={cfg.out} is a folder; give a file name, e.g. "
            f"profile.out={Path(cfg.out) / 'profiles.h5ad'}"
        )
    _outputs(Path(cfg.out), tuple(cfg.formats))  # a bad format fails before any work
    require_writable(Path(cfg.out).parent, "profile.out")
    check_settings(cfg)
    adata = aggregate_cached(cfg)
    try:
        adata = process(adata, cfg)
    except DataError as e:  # name the input the profiles came from
        text = str(e.args[0] if e.args else e)
        if not text.startswith("profile.input"):
            raise type(e)(f"profile.input {list(cfg.input)}: {text}") from None
        raise
    written: dict[str, Path] = {}
    targets = {"well": adata}
    if cfg.consensus:
        targets["consensus"] = consensus(adata, by=list(cfg.consensus),
                                         method=cfg.consensus_method)  # fmt: skip
    for name, data in targets.items():
        suffix = "" if name == "well" else ".consensus"
        for fmt, path in _outputs(Path(cfg.out), tuple(cfg.formats), suffix).items():
            write_h5ad(data, path) if fmt == "h5ad" else write_table(data, path)
            written[f"{name}.{fmt}"] = path
    logger.info("wrote %d profiles × %d features: %s", adata.n_obs, adata.n_vars,
                ", ".join(map(str, written.values())))  # fmt: skip
    return written
