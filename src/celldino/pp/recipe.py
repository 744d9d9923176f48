"""`celldino profile`: the configured chain of stages, from shards to written profile files.

The aggregated profiles are cached beside the output (`<out stem>.aggregated.h5ad`) with a
fingerprint of the aggregation settings and a record of the input files (`celldino.io.provenance`:
each file's size and modification time), so a rerun after a failure in a later stage (or with
other normalisation settings) skips the expensive pass over the cells; a rerun after an input
file changed aggregates again, saying which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path

import anndata as ad
import numpy as np

from celldino.config import ProfileConfig
from celldino.errors import DataError, IncompleteInputError
from celldino.io import provenance
from celldino.io.embeddings import (
    MANIFEST,
    manifest_path,
    read_manifest,
    require_complete,
    shard_name,
)
from celldino.io.files import fingerprint, require_writable
from celldino.io.lock import input_lock, output_lock
from celldino.io.profiles import (
    read_h5ad,
    shard_paths,
    write_h5ad,
    write_table,
)
from celldino.io.provenance import refuse_overwriting_inputs
from celldino.log import get_logger
from celldino.pp.aggregate import aggregate
from celldino.pp.clip import clip
from celldino.pp.consensus import consensus
from celldino.pp.controls import annotate
from celldino.pp.feature_select import feature_select
from celldino.pp.fit_split import (
    ACTIVITY_FIT_COLUMN,
    ACTIVITY_LAYER,
    FIT_COLUMN,
    fitted_marks,
    mark,
    split_controls,
)
from celldino.pp.harmony import harmony
from celldino.pp.inputs import already_normalized
from celldino.pp.inverse_normal import inverse_normal
from celldino.pp.nonfinite import handle_nonfinite
from celldino.pp.normalize import normalize
from celldino.pp.pca import pca
from celldino.pp.presets import Steps, _shrinkage, resolve
from celldino.pp.sphere import sphere
from celldino.pp.steps import CONTROL_COLUMN, record

logger = get_logger(__name__)


def _features(spec: str | tuple[str, ...] | list[str]) -> list[str] | None:
    """profile.features as tokens ('a,b' or a list; `pp.aggregate.resolve_features` reads each
    as a column name or a prefix, or 'infer'); empty: every numeric non-Metadata_ column."""
    items = [spec] if isinstance(spec, str) else list(spec or ())
    tokens = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    return tokens or None


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
    identities: dict[Path, dict] = {}
    for folder in dict.fromkeys(folders):
        if not manifest_path(folder).exists():
            continue  # plain tables of the user's: no manifest to check against
        identities[folder] = read_manifest(folder) or {}
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
                folder,
                manifest.get("complete", False),
                len(missing),
                n,
                f": {', '.join(missing[:10])}" if missing else "",
            )
    _check_same_extraction(identities)
    return partial


# what makes two extractions' features the same features (the data they cover may differ)
IDENTITY_KEYS = ("checkpoint", "features", "channels", "n_features")


def _check_same_extraction(manifests: dict[Path, dict]) -> None:
    """Extraction folders profiled together must hold the same features: the same checkpoint
    (hash and network), feature options, channels and width. Plates extracted separately with
    one checkpoint are fine; two checkpoints' embeddings averaged together are not."""
    if len(manifests) < 2:
        return
    (first, ref), *rest = manifests.items()
    for folder, man in rest:
        for key in IDENTITY_KEYS:
            if man.get(key) != ref.get(key):
                raise DataError(
                    f"profile.input mixes extractions: {first} and {folder} differ in their "
                    f"{MANIFEST} key {key!r} ({ref.get(key)!r} vs {man.get(key)!r}); profile "
                    "extractions of one checkpoint with the same feature settings together, "
                    "others separately"
                )


def _check_distinct_cells(cfg: ProfileConfig, files: list[str]) -> None:
    """The same cells reached through two inputs (one screen extracted twice into two folders)
    would be counted twice: refuse when Metadata_CellID repeats across the inputs."""
    if len(cfg.input) < 2 and len({str(Path(f).parent) for f in files}) < 2:
        return
    import duckdb

    from celldino.pp.aggregate import _connect, _reader, duck_paths, schema

    # the aggregation's memory limit and spilling: a count of distinct ids over 3x10^7 cells
    # took 2.9 GiB on a plain connection (10^8: ~10 GiB), 2 GiB on this one
    con = _connect(cfg.memory_limit, cfg.threads, None)
    try:
        if "Metadata_CellID" not in schema(files, con):
            return
        reader = _reader(files).replace("union_by_name=true", "union_by_name=true, filename=true")
        n, distinct = con.execute(
            f'SELECT count(*), count(DISTINCT "Metadata_CellID") FROM {reader}', [duck_paths(files)]
        ).fetchone()
        if n == distinct:
            return
        cid, where = con.execute(
            f'SELECT "Metadata_CellID", list(DISTINCT filename ORDER BY filename) FROM {reader} '
            'GROUP BY "Metadata_CellID" HAVING count(*) > 1 ORDER BY 1 LIMIT 1',
            [duck_paths(files)],
        ).fetchone()
    except duckdb.Error:
        return  # unreadable inputs are named by the aggregation itself
    finally:
        con.close()
    raise DataError(
        f"profile.input {list(cfg.input)}: {n - distinct} cell(s) appear more than once, e.g. "
        f"Metadata_CellID {cid!r} in {', '.join(map(str, where))}; the same cells were given "
        "twice (one screen extracted twice?): give each extraction once"
    )


_OURS: set[str] = set()  # aggregation files this process wrote or reused (see run_profile)


def _cache_paths(cfg: ProfileConfig) -> tuple[Path, Path]:
    """The aggregation cache of `profile.out`, and where an aggregation waits that differs from
    the one a finished run left there (moved over it only when its run succeeds)."""
    cache = _outputs(Path(cfg.out), ("h5ad",), ".aggregated")["h5ad"]
    return cache, cache.with_name(cache.name[: -len(".h5ad")] + ".pending.h5ad")


def check_columns(cfg: ProfileConfig, columns) -> None:
    """Every column a setting names must be in the aggregated metadata: refused naming the
    setting before anything is written."""
    columns = [str(c) for c in columns]
    settings = {
        "profile.normalize_by": [cfg.normalize_by] if cfg.normalize != "none" else [],
        "profile.sphere_by": (
            [cfg.sphere_by] if cfg.sphere != "none" and cfg.sphere_by != "global" else []
        ),
        "profile.harmony_key": [cfg.harmony_key],
        "profile.consensus": list(cfg.consensus),
    }
    for setting, names in settings.items():
        missing = [n for n in names if n and n not in columns]
        if missing:
            meta = [c for c in columns if c.startswith("Metadata_")] or columns
            raise DataError(
                f"{setting}: {', '.join(map(repr, missing))} is not a column of the aggregated "
                f"profiles (metadata columns: {', '.join(meta[:20])}); set {setting} to one of "
                "them (columns that vary within a profile's wells are not carried)"
            )


def aggregate_cached(cfg: ProfileConfig) -> ad.AnnData:
    """Aggregate per cfg, reusing `<out>.aggregated.h5ad` when inputs and settings match.

    A new aggregation never replaces the cache a finished run left before this run succeeds:
    it waits as `<out>.aggregated.pending.h5ad` (reused by a rerun) and `run_profile` moves it
    over the cache at the end."""
    partial = check_inputs(cfg)
    files = shard_paths(list(cfg.input))
    _check_distinct_cells(cfg, files)
    key = fingerprint(  # the aggregation settings (the files' state is in the record below)
        {
            "files": files,
            "features": _features(cfg.features),
            "by": cfg.by,
            "via": cfg.via,
            "method": cfg.method,
            # 2: file column names kept, plate_well obs_names, steps as JSON text; 3: feature
            # tokens (names or prefixes, infer), Image_Metadata_ aliases, profiles as input;
            # 4: the input files' sizes and times in a provenance record beside the key
            "version": 4,
        }
    )
    cache, pending = _cache_paths(cfg)
    for path in (cache, pending):
        if path.exists() and not partial:
            cached = read_h5ad(path)
            made = cached.uns.get("celldino", {})
            if made.get("aggregate_key") != key:
                continue
            what = _inputs_changed(made.get("aggregate_inputs"), files)
            if what:  # the same settings, but the files were replaced or re-made since
                logger.warning(
                    "profile.input changed since %s was aggregated (%s): aggregating again",
                    path,
                    "; ".join(what),
                )
                continue
            logger.info("reusing aggregated profiles %s (inputs unchanged)", path)
            check_columns(cfg, cached.obs.columns)
            _OURS.add(str(path))
            return cached
    inputs = provenance.record(files, hash_up_to=-1)  # before reading: a later change is seen
    _check_keys(cfg, files)
    levels = [list(cfg.by) + list(cfg.via)] if cfg.via else []
    adata = aggregate(
        files,
        by=list(cfg.by),
        features=_features(cfg.features),
        method=cfg.method,
        levels=levels,
        memory_limit=cfg.memory_limit,
        threads=cfg.threads,
    )
    adata.uns["celldino"]["aggregate_key"] = key
    adata.uns["celldino"]["aggregate_inputs"] = json.dumps(inputs)
    if partial:
        adata.uns["celldino"]["partial_input"] = {
            "folders": list(partial),
            "missing_shards": [f"{k}/{m}" for k, ms in partial.items() for m in ms],
        }
    check_columns(cfg, adata.obs.columns)
    target = pending if cache.exists() else cache
    write_h5ad(adata, target)
    _OURS.add(str(target))
    return adata


def _inputs_changed(recorded, files: list[str]) -> list[str]:
    """What changed in the input files since the cache's record (`celldino.io.provenance`); a
    cache without a readable record counts as changed."""
    try:
        old = json.loads(recorded) if isinstance(recorded, str) else None
    except ValueError:
        old = None
    if not isinstance(old, dict):
        return ["the cache holds no record of its input files"]
    return provenance.changed(old, files)


def _check_keys(cfg: ProfileConfig, files: list[str]) -> None:
    """profile.by and profile.via name columns of the input (the setting named; cytotable's
    Image_Metadata_X counts as Metadata_X). A table that is already profiles is checked by the
    aggregation itself (taken as is when each key is one row, refused otherwise)."""
    from celldino.pp.aggregate import _names, input_names, schema

    cols = schema(files)
    orig = _names(files, list(cols))
    names = input_names(files, cols, orig)
    known = {n.lower() for n in [*names.values(), *orig.values()]}
    where = files[0] if len(files) == 1 else f"{len(files)} files of profile.input"
    for setting, keys in (("profile.by", cfg.by), ("profile.via", cfg.via)):
        missing = [k for k in keys if k.lower() not in known]
        if missing:
            meta = [n for n in names.values() if n.startswith("Metadata_")]
            raise DataError(
                f"{setting}: {', '.join(map(repr, missing))} is not a column of {where} "
                f"(metadata columns: {', '.join(meta)})"
            )


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
    normalizes = cfg.normalize not in ("none", "") or (cfg.normalize == "" and cfg.recipe != "none")
    if normalizes and cfg.normalize_reference == "controls":
        uses.append("profile.normalize_reference=controls")
    if cfg.sphere not in ("none", ""):
        uses.append(f"profile.sphere={cfg.sphere} (fitted on the controls)")
    if uses and not cfg.controls.strip():
        raise DataError(
            f"profile.controls is empty but {' and '.join(uses)} needs negative controls: "
            "set profile.controls to a query such as \"Metadata_pert_type == 'control'\", or "
            "set profile.normalize_reference=all (normalise against every profile)"
            + (" and profile.sphere=none" if cfg.sphere not in ("none", "") else "")
        )
    _shrinkage(cfg.sphere_shrinkage or "oas")  # a bad number is refused before any work


MIN_SPHERE_CONTROLS = 3  # the recipe's sphering is skipped (with a warning) below this


def _to_pcs(adata: ad.AnnData, key: str) -> ad.AnnData:
    """A profile whose features are obsm[key] (PC1..PCk), metadata and provenance kept."""
    Z = np.asarray(adata.obsm[key], dtype=np.float64)
    out = ad.AnnData(Z, obs=adata.obs.copy(), uns=dict(adata.uns))
    out.var_names = [f"PC{i + 1}" for i in range(Z.shape[1])]
    return out


def _source_names(cfg: ProfileConfig) -> list[str]:
    """The input names the already-normalised rule reads: each profile.input as given and the
    files it stands for (globs, folders), when they can be listed."""
    names = [str(i) for i in cfg.input]
    try:
        names += shard_paths(list(cfg.input))
    except (DataError, OSError):  # not there (the Python API on an AnnData): the names given
        pass
    return names


def _skip_recipe_steps(steps: Steps, cfg: ProfileConfig) -> tuple[Steps, list[str]]:
    """The recipe's normalisation, selection, clipping and sphering off, explicit ones kept;
    returns the steps and the names of those skipped."""
    explicit_select = tuple(op for op in cfg.select if op != "recipe")
    new = dataclasses.replace(
        steps,
        normalize=cfg.normalize or "none",
        select=tuple(dict.fromkeys(explicit_select)),
        clip=cfg.clip if cfg.clip >= 0 else 0.0,
        sphere=cfg.sphere or "none",
    )
    skipped = [
        name
        for name, before, after in (
            ("normalize", steps.normalize, new.normalize),
            ("feature selection", bool(steps.select), bool(new.select)),
            ("clip", steps.clip > 0, new.clip > 0),
            ("sphere", steps.sphere, new.sphere),
        )
        if before != after and before not in ("none", False)
    ]
    return new, skipped


def _sphere_groups(
    adata: ad.AnnData, steps: Steps, sphere_: str, cfg: ProfileConfig, fit: np.ndarray
) -> Steps:
    """The recipe's sphering per batch (a `sphere_by` the user did not set) needs
    MIN_SPHERE_CONTROLS controls to fit on (`fit`) in every batch; otherwise one sphering over
    all profiles, with a warning naming the batches. Other steps are returned as they are."""
    if not steps.sphere_by or cfg.sphere_by or sphere_ == "none":
        return steps
    obs = adata.obs
    counts = obs.loc[np.asarray(fit, bool), steps.sphere_by].value_counts()
    few = [v for v in obs[steps.sphere_by].unique() if counts.get(v, 0) < MIN_SPHERE_CONTROLS]
    if not few:
        return steps
    logger.warning(
        "profile.recipe=%s: one sphering over all profiles instead of one per %s: %s %s "
        "fewer than %d control profiles to fit on (set profile.sphere_by to force it)",
        steps.recipe,
        steps.sphere_by,
        ", ".join(map(str, few[:5])) + (f" and {len(few) - 5} more" if len(few) > 5 else ""),
        "has" if len(few) == 1 else "have",
        MIN_SPHERE_CONTROLS,
    )
    return dataclasses.replace(steps, sphere_by="")


def process(adata: ad.AnnData, cfg: ProfileConfig) -> ad.AnnData:
    """Every configured stage after aggregation, in the field's usual order: normalise →
    select → clip → sphere → (PCA → Harmony) → inverse-normal. Unset step settings come from
    `profile.recipe` (pp/presets.py); the resolved steps are logged and recorded."""
    check_settings(cfg)
    _check_rows(adata, cfg)
    handle_nonfinite(adata, policy=cfg.nonfinite)
    _check(adata, "nonfinite", cfg)
    has_controls = bool(cfg.controls.strip())
    if has_controls:
        annotate(adata, controls=cfg.controls)
    steps = resolve(
        cfg,
        list(map(str, adata.var_names)),
        has_controls=has_controls,
        columns=list(adata.obs.columns),
    )
    # an already-normalised input (pycytominer's tables, celldino's own) is not normalised,
    # selected, clipped or sphered again unless a step is set explicitly (pp/inputs.py)
    state = already_normalized(
        adata, sources=_source_names(cfg), by=cfg.normalize_by or None, state=cfg.input_state
    )
    if state.normalized:
        steps, skipped = _skip_recipe_steps(steps, cfg)
        logger.info(
            "profile.input_state=%s: the input is already normalised (%s)%s",
            cfg.input_state,
            "; ".join(state.evidence),
            f": {', '.join(skipped)} skipped (set them explicitly, or profile.input_state=raw, "
            "to run them)"
            if skipped
            else "; the explicitly set steps run",
        )
    prev = fitted_marks(adata.obs)  # an earlier celldino run's marks, kept
    # the controls the steps fit on: half of each plate's by default, the rest held out for
    # evaluate's activity (pp/fit_split.py)
    split_by = cfg.normalize_by or cfg.sphere_by
    fit = (
        split_controls(adata, mode=cfg.fit_controls, by=split_by)
        if has_controls
        else np.zeros(adata.n_obs, bool)
    )
    n_controls = int(fit.sum())
    sphere_ = steps.sphere
    if not cfg.sphere and sphere_ != "none" and n_controls < MIN_SPHERE_CONTROLS:
        logger.warning(
            "profile.recipe=%s: sphering skipped, %d control profile(s) are too few to fit it "
            "(profile.fit_controls=%s; set profile.sphere to force it)",
            steps.recipe,
            n_controls,
            cfg.fit_controls,
        )
        sphere_ = "none"
    steps = _sphere_groups(adata, steps, sphere_, cfg, fit)
    used_by = tuple(
        name
        for name, used in (
            ("normalize", steps.normalize != "none" and cfg.normalize_reference == "controls"),
            ("sphere", sphere_ != "none"),
        )
        if used
    )
    resolved = {**dataclasses.asdict(steps), "sphere": sphere_, "requested": cfg.recipe}
    resolved["fit_controls"] = cfg.fit_controls
    resolved["input"] = {
        "already_normalized": state.normalized,
        "evidence": list(state.evidence),
        "input_state": cfg.input_state,
    }
    resolved["sphere_shrinkage"] = (
        "none" if steps.sphere_shrinkage is None else steps.sphere_shrinkage
    )
    logger.info(
        "profile.recipe=%s%s: %s",
        cfg.recipe,
        f" → {steps.recipe}" if cfg.recipe == "auto" else "",
        ", ".join(f"{k}={v}" for k, v in resolved.items() if k not in ("recipe", "requested")),
    )
    record(adata, "recipe", resolved)
    fit = fit if used_by else np.zeros(adata.n_obs, bool)
    if has_controls and state.normalized and prev is None and not used_by:
        # normalised elsewhere, on which controls is unknown, and nothing fitted here: no
        # column, so evaluate says "unknown" instead of calling the controls held out (a step
        # fitted here marks its controls: a per-plate affine refit replaces the earlier one)
        logger.info(
            "the input was normalised before celldino (on which controls is unknown): no %s "
            "column is written, and evaluate's activity flags its negatives as unknown",
            FIT_COLUMN,
        )
    elif has_controls:
        mark(
            adata,
            fit | (prev if prev is not None else False),
            mode=cfg.fit_controls,
            by=split_by,
            used_by=used_by,
        )
        if used_by and cfg.fit_controls != "split":  # split: _activity_layer says it
            n_all = int(adata.obs[CONTROL_COLUMN].sum())
            logger.info(
                "profile.fit_controls=%s: %s fitted on %d of the %d control profiles%s; the "
                "other %d are held out (obs %s False) for evaluate's activity",
                cfg.fit_controls,
                " and ".join(used_by),
                n_controls,
                n_all,
                f" (half, at least 3, per {split_by})"
                if cfg.fit_controls == "half" and split_by
                else "",
                n_all - n_controls,
                FIT_COLUMN,
            )
    base = adata.copy() if cfg.fit_controls == "split" and used_by else None
    adata, selected = _fit_steps(adata, steps, sphere_, cfg, fit)
    layer = None
    if base is not None:
        layer = _activity_layer(base, selected, steps, sphere_, cfg, split_by, prev)
    if cfg.harmony_key:
        k = min(cfg.harmony_pcs, adata.n_obs - 1, adata.n_vars)
        pca(adata, n_components=k)
        harmony(adata, key=cfg.harmony_key, use_rep="X_pca")
        adata = _to_pcs(adata, "X_pca_harmony")
        _check(adata, "harmony", cfg)
    if steps.inverse_normal:
        inverse_normal(adata)
        _check(adata, "inverse_normal", cfg)
    if layer is not None and cfg.harmony_key:
        logger.warning(
            "profile.harmony_key: no held-out '%s' layer (Harmony's components are fitted on "
            "every profile); evaluate's activity on these profiles is in-sample (flagged)",
            ACTIVITY_LAYER,
        )
    elif layer is not None:
        if steps.inverse_normal:
            inverse_normal(layer)
        _check(layer, "held-out activity layer", cfg)
        adata.layers[ACTIVITY_LAYER] = np.asarray(layer.X, dtype=np.float64)
        adata.obs[ACTIVITY_FIT_COLUMN] = layer.obs[ACTIVITY_FIT_COLUMN].to_numpy(bool)
    return adata


def _fit_steps(
    adata: ad.AnnData,
    steps: Steps,
    sphere_: str,
    cfg: ProfileConfig,
    fit: np.ndarray,
    features: list[str] | None = None,
) -> tuple[ad.AnnData, list[str]]:
    """normalise → select → clip → sphere, each fitted step on the controls `fit`; with
    `features`, those features are kept instead of selecting (the held-out layer keeps X's).
    Returns the profiles and the features selected (sphering's inputs)."""
    if steps.normalize != "none":
        normalize(
            adata,
            method=steps.normalize,
            by=cfg.normalize_by or None,
            reference=cfg.normalize_reference,
            controls=fit if cfg.normalize_reference == "controls" else None,
            epsilon=cfg.mad_epsilon,
            scale_floor=steps.normalize_floor,
            floor_reference=steps.normalize_floor_reference,
        )
        _check(adata, "normalize", cfg)
    if features is not None:
        adata = adata[:, features].copy()
    elif steps.select:
        feature_select(
            adata,
            operations=list(steps.select),
            min_variance=cfg.min_variance,
            freq_cut=cfg.freq_cut,
            unique_cut=cfg.unique_cut,
            corr_threshold=cfg.corr_threshold,
            outlier_cutoff=cfg.outlier_cutoff,
            blocklist=list(cfg.blocklist) or None,
            replicate_key=list(cfg.replicate_key),
            replicate_threshold=cfg.replicate_threshold,
        )
        _check(adata, "feature_select", cfg)
    selected = list(map(str, adata.var_names))
    if steps.clip > 0:
        clip(adata, limit=steps.clip)
    if sphere_ != "none":
        sphere(
            adata,
            method=sphere_,
            epsilon=cfg.sphere_epsilon,
            shrinkage=steps.sphere_shrinkage,
            components=steps.sphere_components,
            by=steps.sphere_by or None,
            controls=fit,
        )
        _check(adata, "sphere", cfg)
    return adata, selected


def _activity_layer(
    base: ad.AnnData,
    features: list[str],
    steps: Steps,
    sphere_: str,
    cfg: ProfileConfig,
    split_by: str,
    prev: np.ndarray | None,
) -> ad.AnnData:
    """`profile.fit_controls=split`: the same steps on X's features fitted on half of each
    plate's controls (pp/fit_split.py), the half marked in ACTIVITY_FIT_COLUMN."""
    half = split_controls(base, mode="half", by=split_by)
    if prev is not None:  # controls an earlier run fitted on stay fitted
        half = half | prev
    layer_steps = _sphere_groups(base, steps, sphere_, cfg, half)
    layer, _ = _fit_steps(base, layer_steps, sphere_, cfg, half, features=features)
    layer.obs[ACTIVITY_FIT_COLUMN] = half
    ctrl = base.obs[CONTROL_COLUMN].to_numpy(bool)
    n_ctrl, n_half = int(ctrl.sum()), int((half & ctrl).sum())
    logger.info(
        "profile.fit_controls=split: profiles fitted on all %d control profiles; the '%s' "
        "layer repeats the steps fitted on %d of them (obs %s), the other %d held out for "
        "evaluate's activity",
        n_ctrl,
        ACTIVITY_LAYER,
        n_half,
        ACTIVITY_FIT_COLUMN,
        n_ctrl - n_half,
    )
    return layer


def _check_rows(adata: ad.AnnData, cfg: ProfileConfig) -> None:
    if adata.n_obs == 0:
        raise DataError(f"profile.input {list(cfg.input)}: 0 profiles were aggregated")


def run_profile(cfg: ProfileConfig) -> dict[str, Path]:
    """Aggregate, process and write profiles (and consensus profiles); returns written paths."""
    if Path(cfg.out).is_dir() or str(cfg.out).endswith(("/", "\\")):  # 'sub/': a folder
        raise DataError(
            f"profile.out={cfg.out} is a folder; give a file name, e.g. "
            f"profile.out={Path(cfg.out) / 'profiles.h5ad'}"
        )
    outputs = _outputs(Path(cfg.out), tuple(cfg.formats))  # a bad format fails before any work
    _refuse_overwriting_inputs(cfg, outputs)
    require_writable(Path(cfg.out).parent, "profile.out")
    check_settings(cfg)
    # one writer per profile.out stem (profiles, consensus and aggregation cache); the
    # extraction folders read are held against a concurrent extract
    stem = next(iter(_outputs(Path(cfg.out), ("h5ad",)).values())).name[: -len(".h5ad")]
    with contextlib.ExitStack() as held:
        held.enter_context(output_lock(Path(cfg.out).parent, "profile", name=stem))
        for folder in dict.fromkeys(Path(i) for i in cfg.input):
            if folder.is_dir() and manifest_path(folder).exists():
                held.enter_context(input_lock(folder, "profile"))
        return _run_profile(cfg)


def _refuse_overwriting_inputs(cfg: ProfileConfig, outputs: dict[str, Path]) -> None:
    """profile.out (every format, consensus and aggregation cache) must not be an input shard or
    lie in an input folder (an extraction's shards, a folder of tables read on a rerun)."""
    written = list(outputs.values())
    written += list(_outputs(Path(cfg.out), tuple(cfg.formats), ".consensus").values())
    written += list(_cache_paths(cfg))
    folders = [i for i in cfg.input if Path(i).is_dir()]
    files = shard_paths(list(cfg.input))
    shard_folders = [str(Path(f).parent) for f in files if manifest_path(Path(f).parent).exists()]
    refuse_overwriting_inputs(
        {"profile.out": written},
        {"profile.input": [*files, *folders, *shard_folders]},
        "profile",
    )


def _run_profile(cfg: ProfileConfig) -> dict[str, Path]:
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
        targets["consensus"] = consensus(adata, by=list(cfg.consensus), method=cfg.consensus_method)
    for name, data in targets.items():
        suffix = "" if name == "well" else ".consensus"
        for fmt, path in _outputs(Path(cfg.out), tuple(cfg.formats), suffix).items():
            write_h5ad(data, path) if fmt == "h5ad" else write_table(data, path)
            written[f"{name}.{fmt}"] = path
    cache, pending = _cache_paths(cfg)
    if str(pending) in _OURS and pending.exists():  # this run's, kept aside until it succeeded
        os.replace(pending, cache)
    logger.info(
        "wrote %d profiles × %d features: %s",
        adata.n_obs,
        adata.n_vars,
        ", ".join(map(str, written.values())),
    )
    return written
