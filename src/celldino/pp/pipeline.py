"""`celldino profile`: the configured chain of stages, from shards to written profile files.

The aggregated profiles are cached beside the output (`<out stem>.aggregated.h5ad`) with a
fingerprint of the inputs and aggregation settings, so a rerun after a failure in a later
stage (or with other normalisation settings) skips the expensive pass over the cells.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad

from celldino.config import ProfileConfig
from celldino.io.files import fingerprint
from celldino.io.profiles import read_h5ad, shard_paths, write_h5ad, write_table
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
        raise ValueError(f"unknown profile output format(s) {bad}; choose {list(ext)}")
    return {f: out.with_name(stem + suffix + ext[f]) for f in formats}


def aggregate_cached(cfg: ProfileConfig) -> ad.AnnData:
    """Aggregate per cfg, reusing `<out>.aggregated.h5ad` when inputs and settings match."""
    files = shard_paths(list(cfg.input))
    key = fingerprint({
        "files": [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files],
        "features": cfg.features, "by": cfg.by, "via": cfg.via, "method": cfg.method,
    })  # fmt: skip
    cache = _outputs(Path(cfg.out), ("h5ad",), ".aggregated")["h5ad"]
    if cache.exists():
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
    write_h5ad(adata, cache)
    return adata


def process(adata: ad.AnnData, cfg: ProfileConfig) -> ad.AnnData:
    """Every configured stage after aggregation, in the field's usual order."""
    adata = handle_nonfinite(adata, policy=cfg.nonfinite)
    if cfg.controls:
        annotate(adata, controls=cfg.controls)
    if cfg.normalize != "none":
        normalize(
            adata, method=cfg.normalize, by=cfg.normalize_by or None,
            reference=cfg.normalize_reference, epsilon=cfg.mad_epsilon,
        )  # fmt: skip
    if cfg.select:
        adata = feature_select(
            adata, operations=list(cfg.select), min_variance=cfg.min_variance,
            corr_threshold=cfg.corr_threshold, blocklist=list(cfg.blocklist),
        )  # fmt: skip
    if cfg.sphere != "none":
        adata = sphere(adata, method=cfg.sphere, epsilon=cfg.sphere_epsilon,
                       by=cfg.sphere_by or None)  # fmt: skip
    if cfg.harmony_key:
        harmony(adata, key=cfg.harmony_key)
    if cfg.inverse_normal:
        inverse_normal(adata)
    return adata


def run_profile(cfg: ProfileConfig) -> dict[str, Path]:
    """Aggregate, process and write profiles (and consensus profiles); returns written paths."""
    adata = process(aggregate_cached(cfg), cfg)
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
