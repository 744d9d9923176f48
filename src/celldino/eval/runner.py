"""`celldino evaluate PROFILES --spec eval.yaml`: analyses × feature sets, side by side.

The spec (YAML, or a dict) names extra feature sets (baselines), derived ones (PCA of another
set), the metadata columns, and the analyses to run with their parameters; see
docs/evaluation.md. Every analysis runs on every feature set; the result is one tidy table
(`metrics.parquet` / `metrics.csv`: feature_set, analysis, metric, value), detail tables under
`tables/`, and `summary.json`. Finished (feature set, analysis) parts are kept under `parts/`
with a fingerprint of their inputs, so a rerun skips them.

This file reads the spec and the feature sets and runs the loop; the analyses and their
registry `ANALYSES` are in `celldino.eval.analyses`, the types they share (`Columns`,
`EvalContext`, `AnalysisResult`, `SpecError`) in `celldino.eval.spec`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from celldino.config import EvaluateConfig, yaml_key_lines
from celldino.errors import DataError, MissingInputError
from celldino.eval.analyses import (
    ANALYSES,
    DEFAULT_ANALYSES,
    _whole,
    activity_defaults,
    map_kwargs,
    mlp_options,
)
from celldino.eval.map import Unpaired
from celldino.eval.spec import (
    AnalysisResult,
    Columns,
    EvalContext,
    NotEvaluable,
    SpecError,
    is_control_row,
    obs_table,
)
from celldino.eval.stats import join_flags, metrics_table, stat_columns
from celldino.io import provenance, results
from celldino.io.files import (
    atomic_write_text,
    fingerprint,
    require_writable,
    write_json,
)
from celldino.io.lock import output_lock
from celldino.io.provenance import refuse_overwriting_inputs
from celldino.log import get_logger, progress
from celldino.names import safe_component

logger = get_logger(__name__)


# ---- the spec -----------------------------------------------------------------------------

_SPEC_KEYS = (
    "name",
    "inputs",
    "derived",
    "metadata_prefix",
    "feature_prefix",
    "columns",
    "analyses",
)


def _refuse_keys_set_twice(path: Path) -> None:
    """A key given twice in one mapping of the spec: YAML keeps the last silently (the config
    loader refuses it too)."""

    yaml_key_lines(yaml.compose(path.read_text()), str(path), SpecError)


def load_spec(spec: str | Path | dict | None) -> tuple[dict, Path]:
    """Read and check a spec; returns (spec dict, folder that relative paths start from)."""
    if spec is None or spec == "":
        return {}, Path.cwd()
    if isinstance(spec, dict):
        data, base = dict(spec), Path.cwd()
    else:
        path = Path(spec)
        if not path.is_file():
            raise SpecError(f"evaluation spec {path} does not exist (--spec or evaluate.spec)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}" if mark else str(path)
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SpecError(f"{where}: not valid YAML ({what}); fix the spec") from None
        except UnicodeDecodeError:
            raise SpecError(f"{path}: not UTF-8 text; save the spec as UTF-8") from None
        _refuse_keys_set_twice(path)
        base = path.resolve().parent
        if not isinstance(data, dict):
            raise SpecError(f"{path}: the spec must be a mapping (keys: {', '.join(_SPEC_KEYS)})")
    unknown = [k for k in data if k not in _SPEC_KEYS]
    if unknown:
        raise SpecError(f"unknown spec key(s) {unknown}; valid keys: {', '.join(_SPEC_KEYS)}")
    valid_cols = [f.name for f in dataclasses.fields(Columns)]
    bad = [k for k in (data.get("columns") or {}) if k not in valid_cols]
    if bad:
        raise SpecError(f"unknown column role(s) {bad} under 'columns'; valid: {valid_cols}")
    _check_set_names(data)
    return data, base


def _check_set_names(spec: dict) -> None:
    """Feature-set names become file and folder names (tables/<analysis>__<set>__<t>.parquet,
    embeddings/<set>/): each must be one safe path component (celldino.names)."""
    if "name" in spec:
        safe_component(spec["name"], "the spec's name")
    for key in ("inputs", "derived"):
        names = spec.get(key)
        for name in names if isinstance(names, dict) else ():
            safe_component(name, f"the spec's {key}: feature set {name!r}")


# analysis parameters read with int() / float(): YAML's yes/no would be 1/0 and int(1.5) 1
_COUNTS = {
    "epochs", "k", "max_cells", "max_iter", "max_tokens", "min_cells", "min_compounds",
    "n_bins", "n_components", "n_dcs", "n_neighbors", "n_pcs", "n_permutations", "n_repeats",
}  # fmt: skip
_NUMBERS = {"alpha", "margin", "purity", "temperature", "test_size"}


def _check_numbers(name: str, params: dict) -> None:
    for key in sorted(_COUNTS.intersection(params)):
        try:
            _whole(params[key])
        except (TypeError, ValueError):
            raise SpecError(
                f"analyses.{name}.{key} must be a whole number, got {params[key]!r}"
            ) from None
    for key in sorted(_NUMBERS.intersection(params)):
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SpecError(f"analyses.{name}.{key} must be a number, got {value!r}")
        try:
            float(value)
        except ValueError:
            raise SpecError(f"analyses.{name}.{key} must be a number, got {value!r}") from None


def _analyses(spec: dict) -> dict[str, dict]:
    raw = spec.get("analyses", list(DEFAULT_ANALYSES))
    if isinstance(raw, (list, tuple)):
        raw = {name: {} for name in raw}
    if not isinstance(raw, dict):
        raise SpecError("'analyses' must be a list of names or a mapping name → parameters")
    unknown = [a for a in raw if a not in ANALYSES]
    if unknown:
        raise SpecError(f"unknown analysis {unknown}; available: {', '.join(sorted(ANALYSES))}")
    out = {}
    for name, params in raw.items():
        if params is not None and not isinstance(params, dict):
            raise SpecError(f"analyses.{name}: parameters must be a mapping, got {params!r}")
        params = dict(params or {})
        valid = analysis_parameters(name)
        bad = [k for k in params if valid is not None and k not in valid]
        if bad:
            raise SpecError(
                f"analyses.{name}: unknown parameter(s) {bad}; valid parameters of {name}: "
                f"{', '.join(sorted(valid)) or '(none)'}"
            )
        _check_numbers(name, params)
        if "null_size" in params or "threshold" in params:
            map_kwargs(EvalContext(), params)  # values checked before any analysis runs
        if "mlp" in params:
            mlp_options(params, name)  # unknown MLP options too, before any analysis runs
        out[name] = params
    return out


def _reads(name: str, src: str) -> set[str]:
    """Keys read from the mapping `name` in source text: name.get("x"...) or name["x"]."""
    pat = rf"""\b{re.escape(name)}(?:\.get\(|\[)\s*["'](\w+)["']"""
    return set(re.findall(pat, src))


def analysis_parameters(name: str) -> set[str] | None:
    """The spec parameters an analysis reads (`params.get("x")` / `params["x"]` in its code and
    in the helpers it hands `params` to); an explicit `fn.parameters` wins. None: unknown (the
    function passes its parameters on unread, so they cannot be checked)."""
    fn = ANALYSES[name]
    if hasattr(fn, "parameters"):
        return set(fn.parameters)
    try:
        sig = inspect.signature(fn)
        src = inspect.getsource(fn)
    except (OSError, TypeError, ValueError):
        return None
    named = [p.name for p in list(sig.parameters.values())[3:] if p.kind == p.KEYWORD_ONLY]
    var = [p.name for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
    if not var:
        return set(named)
    kw = var[0]
    found = set(named) | _reads(kw, src)
    for helper in set(re.findall(rf"(\w+)\([^()]*\b{kw}\b", src)):
        obj = getattr(fn, "__globals__", {}).get(helper)
        if inspect.isfunction(obj) and obj is not fn:
            found |= _reads("params", inspect.getsource(obj))
    return found or None


def read_profile_table(path: str | Path) -> pd.DataFrame:
    """A profile table (.parquet, .csv[.gz]) as one frame of metadata + features (.h5ad files go
    through `_from_anndata`, which takes the features from X only)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"{path} is a folder; give one profile file (.parquet, .csv[.gz] or .h5ad), e.g. "
            "the profiles.h5ad that `celldino profile` wrote"
        )
    if not path.is_file():
        raise MissingInputError(
            f"profile file {path} does not exist; run `celldino profile` first or fix the path"
        )
    from celldino.io.tables import read_table

    try:
        return read_table(path, features=True)  # metadata as text, features checked
    except DataError:
        raise
    except (ValueError, OSError, UnicodeDecodeError) as e:  # pandas / pyarrow parse errors
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read the profile table ({msg})") from None


@dataclass
class FeatureSet:
    name: str
    meta: pd.DataFrame
    X: np.ndarray  # (profiles, features) float64
    features: list[str]
    source: str
    key: str  # fingerprint of the data, for resuming
    # activity's profiles fitted on half the controls (`celldino profile`'s `activity` layer,
    # fit_controls=split): the matrix scored and the metadata marking the controls it fitted
    activity: tuple[pd.DataFrame, np.ndarray] | None = None


def same_profile_pairs(sets: dict[str, FeatureSet]) -> set[frozenset[str]]:
    """Pairs of feature sets holding the same profiles (same metadata rows, features equal to
    float32 precision up to a column order): the same data under two names."""
    out = set()
    names = list(sets)
    rows: dict[str, np.ndarray] = {}  # each set's rows sorted once (features in another order)

    def sorted_rows(name: str) -> np.ndarray:
        if name not in rows:
            rows[name] = np.sort(sets[name].X, axis=1)
        return rows[name]

    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if sets[a].X.shape != sets[b].X.shape or not sets[a].meta.equals(sets[b].meta):
                continue
            if np.allclose(sorted_rows(a), sorted_rows(b), rtol=1e-6, atol=1e-7, equal_nan=True):
                out.add(frozenset((a, b)))
    return out


def no_variance(X: np.ndarray) -> str:
    """The flag of a feature matrix whose profiles are all the same (e.g. a collapsed
    embedding): every similarity ties, so a score on it is the chance level at best; '' else."""
    X = np.asarray(X)
    if len(X) > 1 and np.array_equal(X.min(axis=0), X.max(axis=0)):
        return "every profile is the same (no variance in any feature)"
    return ""


def _prefixes(prefix: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """A spec prefix setting as prefixes: 'Cells_', 'Cells_,Nuclei_' or [Cells_, Nuclei_]."""
    items = [prefix] if isinstance(prefix, str) else list(prefix or ())
    return tuple(t.strip() for i in items for t in str(i).split(",") if t.strip())


def cytotable_names(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """cytotable's `Image_Metadata_X` columns read as `Metadata_X` where the table has none (as
    `celldino profile` reads them), so they are metadata, not features."""
    have = {str(c).lower() for c in df.columns}
    rename = {}
    for c in df.columns:
        alias = "Metadata_" + str(c)[len("Image_Metadata_") :]
        if str(c).startswith("Image_Metadata_") and alias.lower() not in have:
            rename[c] = alias
            have.add(alias.lower())
    if rename:
        logger.info(
            "%s: read %s (cytotable's names)",
            source,
            ", ".join(f"{a} as {b}" for a, b in rename.items()),
        )
    return df.rename(columns=rename)


def split_features(
    df: pd.DataFrame,
    *,
    metadata_prefix: str = "Metadata_",
    feature_prefix: str | list[str] = "",
    source: str,
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Metadata = columns with `metadata_prefix`; features = columns with one of the
    `feature_prefix` prefixes ('a,b' or a list; none: every other column)."""
    meta_cols = [c for c in df.columns if str(c).startswith(metadata_prefix)]
    prefixes = _prefixes(feature_prefix)
    if prefixes:
        features = [c for c in df.columns if str(c).startswith(prefixes)]
    else:
        features = [c for c in df.columns if c not in set(meta_cols)]
    if not features:
        raise SpecError(f"{source}: no feature columns (prefix '{feature_prefix or '<any>'}')")
    non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        raise SpecError(
            f"{source}: feature columns {non_numeric[:5]} are not numeric; prefix metadata "
            f"columns with '{metadata_prefix}' or set feature_prefix in the spec"
        )
    return df[meta_cols].reset_index(drop=True), df[features].to_numpy(np.float64), features


def _from_anndata(
    path: Path, feature_prefix: str
) -> tuple[pd.DataFrame, np.ndarray, list[str], tuple[pd.DataFrame, np.ndarray] | None]:
    """An .h5ad: features are `X` (columns `var_names`), metadata every `obs` column; an obs
    column never becomes a feature, whatever its name or type. The last element is the held-out
    `activity` layer with its metadata (its fitted controls as FIT_COLUMN), or None."""
    from celldino.io.profiles import read_h5ad
    from celldino.marks import ACTIVITY_FIT_COLUMN, ACTIVITY_LAYER, FIT_COLUMN, fitted_marks

    adata = read_h5ad(path)
    features = list(map(str, adata.var_names))
    X = np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X, np.float64)
    layer = None
    if ACTIVITY_LAYER in adata.layers and ACTIVITY_FIT_COLUMN in adata.obs:
        layer = np.asarray(adata.layers[ACTIVITY_LAYER], np.float64)
    keep = list(range(len(features)))
    if _prefixes(feature_prefix):
        keep = [i for i, f in enumerate(features) if f.startswith(_prefixes(feature_prefix))]
        X, features = X[:, keep], [features[i] for i in keep]
    meta = obs_table(adata)
    activity = None
    if layer is not None:
        act_meta = meta.drop(columns=[ACTIVITY_FIT_COLUMN]).assign(
            **{FIT_COLUMN: fitted_marks(meta, ACTIVITY_FIT_COLUMN)}
        )
        activity = (act_meta, layer[:, keep])
        meta = meta.drop(columns=[ACTIVITY_FIT_COLUMN])
    return meta, X, features, activity


def _check_matrix(X: np.ndarray, features: list[str], source: str) -> None:
    if X.shape[0] == 0:
        raise DataError(f"{source}: 0 profile rows; nothing to evaluate")
    if X.shape[1] == 0:
        raise DataError(f"{source}: 0 feature columns; nothing to evaluate")
    bad = ~np.isfinite(X)
    if bad.any():
        cols = np.flatnonzero(bad.any(axis=0))
        rows = np.flatnonzero(bad.any(axis=1))
        raise DataError(
            f"{source}: {int(bad.sum())} NaN/inf values in {len(cols)} feature column(s) "
            f"({', '.join(features[j] for j in cols[:5])}) and {len(rows)} row(s) (first: row "
            f"{rows[0]}); drop or fix them (`celldino profile` handles them with "
            "profile.nonfinite)"
        )


def _derive(name: str, how: dict, sets: dict[str, FeatureSet], seed: int) -> FeatureSet:
    if not isinstance(how, dict) or "pca" not in how:
        raise SpecError(f"derived set '{name}': give {{pca: <feature set>, n_components: N}}")
    src = how["pca"]
    if src not in sets:
        raise SpecError(f"derived set '{name}': no feature set '{src}' (have {list(sets)})")
    from sklearn.decomposition import PCA

    base = sets[src]
    try:
        k = int(how.get("n_components", 50))
    except (TypeError, ValueError):
        raise SpecError(
            f"derived.{name}.n_components must be a whole number, got {how.get('n_components')!r}"
        ) from None
    k = max(1, min(k, base.X.shape[0], base.X.shape[1]))
    Z = PCA(n_components=k, random_state=seed).fit_transform(base.X)  # (n, k)
    return FeatureSet(
        name,
        base.meta,
        Z,
        [f"PC{i + 1}" for i in range(k)],
        f"pca({src}, {k})",
        fingerprint([base.key, "pca", k, seed]),
    )


def load_feature_sets(
    profiles: str | Path | None, spec: dict, base: Path, seed: int, where: str = "the spec"
) -> dict:
    """The feature sets named by PROFILES and the spec, in order (`where`: the spec file, for
    messages)."""
    mp = spec.get("metadata_prefix", "Metadata_")
    fp = spec.get("feature_prefix", "")
    _check_set_names(spec)
    paths: dict[str, Path] = {}
    if profiles:
        paths[spec.get("name", "learned")] = Path(profiles)
    for name, p in (spec.get("inputs") or {}).items():
        if name in paths:
            raise SpecError(f"feature set '{name}' is named twice (PROFILES and inputs)")
        p = Path(p)
        paths[name] = p if p.is_absolute() else base / p
        if not paths[name].exists():
            raise MissingInputError(
                f"{where}: inputs.{name}: {paths[name]} does not exist (relative paths start at "
                f"the spec's folder {base}); fix inputs.{name} or create the file"
            )
    if not paths:
        raise SpecError("no profiles: pass PROFILES or list feature sets under 'inputs'")
    sets: dict[str, FeatureSet] = {}
    for name, path in paths.items():
        activity = None
        if path.name.lower().endswith(".h5ad") and path.is_file():
            meta, X, features, activity = _from_anndata(path, fp)
        else:
            df = cytotable_names(read_profile_table(path), str(path))
            meta, X, features = split_features(
                df, metadata_prefix=mp, feature_prefix=fp, source=str(path)
            )
        _check_matrix(X, features, str(path))
        # its content (`celldino.io.provenance`): a part of a changed file is computed again;
        # and celldino's version: the statistics live in code (an upgrade computes them again)
        import celldino

        key = fingerprint([provenance.digest(path), mp, fp, celldino.__version__])
        sets[name] = FeatureSet(name, meta, X, features, str(path), key, activity)
    for name, how in (spec.get("derived") or {}).items():
        sets[name] = _derive(name, how, sets, seed)
    return sets


def check_columns(sets: dict, given: dict[str, str], where: dict[str, str]) -> None:
    """Before any analysis: every column role the user named (spec `columns`, or
    `evaluate.columns.*`) names a column of every feature set; `where[role]` says where it was
    named. Roles left at their default name may be absent: what needs them is skipped."""
    for role, col in given.items():
        if role in ("control", "control_value", "moa_sep") or not col:
            continue  # the control column: check_controls
        for fs in sets.values():
            if col not in fs.meta.columns:
                raise SpecError(
                    f"{where[role]} is {col!r}, which feature set '{fs.name}' ({fs.source}) "
                    f"lacks; its metadata columns: {', '.join(map(str, fs.meta.columns))}"
                )
    warn_default_dose_absent(sets, given)
    warn_moa_lists_unsplit(sets, given)
    dose, c = given.get("dose") or Columns().dose, Columns()
    controls = given.get("control_value", c.control_value)  # named by the dose: keep them
    keep = controls if (given.get("control") or c.control) == dose else ()
    many = isinstance(keep, (list, tuple))
    one_dose_per_number(sets, dose, keep=[str(v) for v in keep] if many else [str(keep)])


def one_dose_per_number(sets: dict, dose: str, keep: list[str] | tuple[str, ...] = ()) -> None:
    """Doses are read as text as written; `1` and `1.0` are one dose, so the spellings of one
    number become one (`io.tables.one_spelling_per_number`) before any treatment or replicate
    group is made, with a warning naming them. A set whose doses were merged gets another key:
    parts an older celldino computed with the spellings apart are not kept as done. Every
    spelling is read before any is changed (a derived set shares its base set's metadata). A
    spelling in `keep` (the control value, where the dose column names the controls) names its
    number, whichever came first."""
    from celldino.io.tables import one_spelling_per_number

    found = []
    for fs in sets.values():
        tables = [fs.meta] + ([fs.activity[0]] if fs.activity is not None else [])
        for k, meta in enumerate(tables):
            if dose in meta.columns:
                found.append((fs, k, meta, *one_spelling_per_number(meta[dose])))
    for fs, k, meta, values, merged in found:
        if not merged:
            continue
        for spellings in merged:
            kept = next((str(v) for v in keep if str(v) in spellings), spellings[0])
            values = values.mask(values == spellings[0], kept)
        meta[dose] = values
        fs.key = fingerprint([fs.key, "doses merged", dose, k, merged])
        if k == 0:
            logger.warning(
                "feature set '%s' (%s): column %s spells one dose several ways (%s); each "
                "number is one dose, named by its first spelling (or the control value)",
                fs.name,
                fs.source,
                dose,
                "; ".join(" = ".join(sp) for sp in merged[:5]),
            )


# separators that join several MoAs in one cell (LINCS / Drug Repurposing Hub write 'a|b')
MOA_SEPARATORS = ("|", ";")


def warn_moa_lists_unsplit(sets: dict, given: dict[str, str]) -> None:
    """MoA cells that look like lists ('a|b') while columns.moa_sep is unset: each combination
    is then its own MoA (LINCS's NSC was 0.000 that way, 0.125 split): say which separator."""
    if given.get("moa_sep"):
        return
    moa = given.get("moa") or Columns().moa
    for fs in sets.values():
        if moa not in fs.meta.columns:
            continue
        values = fs.meta[moa].dropna().astype(str)
        for sep in MOA_SEPARATORS:
            listed = values[values.str.contains(sep, regex=False)]
            if len(listed):
                logger.warning(
                    "feature set '%s': %d of the %d %s values hold '%s' (e.g. %r) but "
                    "columns.moa_sep is unset, so each combination is one MoA of its own; set "
                    "'evaluate.columns.moa_sep=%s' to read them as sets of MoAs",
                    fs.name,
                    len(listed),
                    len(values),
                    moa,
                    sep,
                    listed.iloc[0],
                    sep,
                )
                return


def warn_default_dose_absent(sets: dict, given: dict[str, str]) -> None:
    """The dose role left at its default name and absent: treatments and replicate groups are
    made of the compound alone (every dose of a compound one group), which is right for a
    one-dose screen and wrong when the doses are in a column of another name: say so."""
    default = Columns()
    if given.get("dose"):
        return
    compound = given.get("compound") or default.compound
    for fs in sets.values():
        if default.dose not in fs.meta.columns and compound in fs.meta.columns:
            logger.warning(
                "feature set '%s' (%s) has no %s column (the dose role's default): treatments "
                "and replicate groups are by %s alone; if the doses are in another column, set "
                "evaluate.columns.dose=<column>",
                fs.name,
                fs.source,
                default.dose,
                compound,
            )
            return


def check_controls(
    sets: dict, given: dict, cols: Columns, where: str | dict[str, str] = "the spec"
) -> None:
    """Before any analysis: a control column the user names must exist, and a control column
    that exists must hold `control_value` in some row. Otherwise the controls would silently
    count as one more compound (nsc, map). The default column may be absent (no controls)."""
    origin = where if isinstance(where, dict) else {r: f"{where}: columns.{r}" for r in given}
    for fs in sets.values():
        if cols.control not in fs.meta.columns:
            if "control" in given:
                raise SpecError(
                    f"{origin['control']} is {cols.control!r}, which feature set "
                    f"'{fs.name}' ({fs.source}) lacks; its metadata columns: "
                    f"{', '.join(map(str, fs.meta.columns))}"
                )
            continue
        if not is_control_row(fs.meta, cols.control, cols.control_value).any():
            values = pd.unique(fs.meta[cols.control].astype(str))
            shown = ", ".join(map(repr, values[:10])) + (" ..." if len(values) > 10 else "")
            named = origin.get("control_value") or origin.get("control")
            msg = (
                f"columns.control_value {cols.control_value!r} matches no row of "
                f"{cols.control!r} in feature set '{fs.name}' ({fs.source}); its values: {shown}"
            )
            if named:
                raise SpecError(f"{named}: {msg}; set the control value to the controls' value")
            logger.warning("%s: no negative controls, every profile is a treatment", msg)


def has_controls(fs: FeatureSet, cols: Columns) -> bool:
    """Whether a feature set holds negative-control profiles (column present, value found)."""
    return cols.control in fs.meta.columns and bool(
        is_control_row(fs.meta, cols.control, cols.control_value).any()
    )


def needs_controls(name: str, params: dict) -> bool:
    """Analyses that compare against negative controls: phenotypic activity (`activity`), any
    analysis asked for `negatives: controls`, and those marked `needs_controls = True`."""
    fn = ANALYSES[name]
    return bool(getattr(fn, "needs_controls", False) or params.get("negatives") == "controls")


# ---- running --------------------------------------------------------------------------------


def _as_result(out: Any) -> AnalysisResult:
    if isinstance(out, AnalysisResult):
        return out
    if isinstance(out, dict):
        return AnalysisResult({k: float(v) for k, v in out.items()})
    raise TypeError(f"an analysis must return AnalysisResult or dict, got {type(out).__name__}")


def _write_table(df: pd.DataFrame, path: Path) -> None:
    from celldino.io.tables import write_parquet

    df = df.copy()
    for col in df.columns:  # Parquet needs one type per column
        if df[col].dtype == object:
            df[col] = df[col].map(lambda v: v if v is None or isinstance(v, str) else str(v))
    write_parquet(df, path)


def _run_all(
    sets: dict[str, FeatureSet],
    analyses: dict[str, dict],
    ctx: EvalContext,
    cfg: EvaluateConfig,
    out: Path,
    allow_nothing: bool = False,
) -> dict:
    """Every analysis on every feature set, written under `out`; returns the summary. When
    every analysis was skipped: DataError naming each reason, or with `allow_nothing` (`celldino
    run`, whose report lists what could not be computed) the skip rows and summary alone."""
    # This run's parts and tables are written under pending/ and moved to parts/ and tables/
    # only when every analysis has finished, so a failing run never leaves parts/ or tables/
    # disagreeing with summary.json; a rerun resumes from either place.
    pending = out / "pending"
    (pending / "parts").mkdir(parents=True, exist_ok=True)
    (pending / "tables").mkdir(parents=True, exist_ok=True)
    ctx_key = {k: v for k, v in dataclasses.asdict(ctx).items() if k not in ("feature_set", "sets")}
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    moves: list[tuple[Path, Path]] = []
    jobs = [(fs, name, params) for fs in sets.values() for name, params in analyses.items()]
    no_controls = {n for n, fs in sets.items() if not has_controls(fs, ctx.cols)}
    for fs, name, params in progress(jobs, desc="evaluate"):
        part_name = f"{name}__{fs.name}.json"
        if fs.name in no_controls and needs_controls(name, params):
            c = ctx.cols
            none = (
                f"no row with {c.control!r} == {c.control_value!r}"
                if c.control in fs.meta.columns
                else f"no column {c.control!r}"
            )
            reason = (
                f"needs negative controls, and feature set '{fs.name}' has none ({none}); name "
                "them with evaluate.columns.control=<column> evaluate.columns.control_value=<value>"
            )
            skipped[f"{name} on {fs.name}"] = reason
            logger.info("%s on %s skipped: %s", name, fs.name, reason)  # grouped below
            continue
        key = fingerprint([fs.key, name, params, ctx_key])
        if getattr(ANALYSES[name], "reads_sets", False):  # mantel, cca: the other sets count too
            key = fingerprint([key, [s.key for s in sets.values()]])
        done, where = None, None
        for folder in (out, pending):
            p = folder / "parts" / part_name
            try:
                d = json.loads(p.read_bytes()) if p.exists() else None
            except ValueError:  # cut off by a crash or a full disk: not done, computed again
                logger.warning("%s is damaged (not JSON): %s on %s runs again", p, name, fs.name)
                d = None
            if d and d.get("key") == key:
                done, where = d, folder
                break
        if cfg.resume and done:
            logger.info("%s on %s: done before, kept", name, fs.name)
            metrics = dict(done["metrics"])  # stored as [name, value] pairs, in order
            stats = done.get("stats") or {}
            if where == pending:
                moves.append((pending / "parts" / part_name, out / "parts" / part_name))
                moves += [
                    (t, out / "tables" / t.name)
                    for t in (pending / "tables").glob(f"{name}__{fs.name}__*.parquet")
                ]
        else:
            logger.info("%s on %s (%d profiles × %d features)", name, fs.name, *fs.X.shape)
            try:
                run_ctx = dataclasses.replace(ctx, feature_set=fs.name, sets=sets)
                if fs.name in no_controls:  # no controls: every profile is a treatment
                    run_ctx = dataclasses.replace(
                        run_ctx, cols=dataclasses.replace(ctx.cols, control="")
                    )
                meta_, X_ = fs.meta, fs.X
                if name == "activity" and fs.activity is not None:  # the held-out layer
                    meta_, X_ = fs.activity
                res = _as_result(ANALYSES[name](meta_, X_, run_ctx, **params))
            except (Unpaired, NotEvaluable) as e:  # cannot run on these data: skip, say why
                reason = str(e.args[0] if e.args else e)
                skipped[f"{name} on {fs.name}"] = reason
                logger.info("%s on %s skipped: %s", name, fs.name, reason)  # grouped below
                continue
            except (ValueError, KeyError) as e:  # bad data or columns: say where, no traceback
                if isinstance(e, SpecError):
                    raise
                msg = e.args[0] if e.args else e
                raise SpecError(f"analysis '{name}' on feature set '{fs.name}': {msg}") from e
            metrics = {k: float(v) for k, v in res.metrics.items()}
            stats = res.stats
            for tname, table in res.tables.items():
                tfile = f"{name}__{fs.name}__{tname}.parquet"
                _write_table(table, pending / "tables" / tfile)
                moves.append((pending / "tables" / tfile, out / "tables" / tfile))
            part = pending / "parts" / part_name
            write_json(
                part,
                {"key": key, "metrics": [[k, v] for k, v in metrics.items()], "stats": stats},
            )
            moves.append((part, out / "parts" / part_name))
        flat = no_variance(fs.activity[1] if name == "activity" and fs.activity else fs.X)
        if flat:
            logger.warning("%s on %s: %s", name, fs.name, flat)
        rows += [
            {"feature_set": fs.name, "analysis": name, "metric": k, "value": v}
            | (sc := stat_columns(stats.get(k)))
            | {"flags": join_flags([sc["flags"], flat])}
            for k, v in metrics.items()
        ]
    if not rows and skipped and not allow_nothing:
        raise DataError(
            "no analysis could run on these profiles: "
            + "; ".join(f"{k}: {v}" for k, v in skipped.items())
        )
    (out / "parts").mkdir(exist_ok=True)
    (out / "tables").mkdir(exist_ok=True)
    for src, dst in moves:  # every analysis finished: this run's parts become the run's
        os.replace(src, dst)
    shutil.rmtree(pending, ignore_errors=True)
    # with chance, ci_low, ci_high, p_perm, n_queries, flags; equal scores are flagged only for
    # sets whose profiles are equal (two coarse NSCs over 12 queries tie by chance)
    tidy, flagged = metrics_table(rows, same_profiles=same_profile_pairs(sets))
    if skipped:  # one row per skipped (analysis, feature set): metric 'skipped', the reason
        skip_rows = [
            {"feature_set": k.split(" on ", 1)[1], "analysis": k.split(" on ", 1)[0]}
            | {"metric": "skipped", "value": np.nan, "flags": f"skipped: {why}"}
            for k, why in skipped.items()
        ]
        tidy = pd.concat([tidy, pd.DataFrame(skip_rows, columns=tidy.columns)], ignore_index=True)
    _write_table(tidy, out / results.METRICS)
    atomic_write_text(out / results.METRICS_CSV, tidy.to_csv(index=False))
    nested: dict[str, dict[str, dict[str, float | None]]] = {}
    for r in rows:
        v = r["value"]
        nested.setdefault(r["analysis"], {}).setdefault(r["metric"], {})[r["feature_set"]] = (
            None if np.isnan(v) else v
        )
    summary = {
        "feature_sets": {
            n: {
                "source": s.source,
                "n_profiles": int(s.X.shape[0]),
                "n_features": len(s.features),
            }
            for n, s in sets.items()
        },
        "analyses": analyses,
        "metrics": nested,
        "settings": ctx_key,
        "skipped": skipped,
        "flags": flagged,
    }
    write_json(out / results.SUMMARY, summary)
    if skipped:
        logger.warning(
            "evaluate skipped %d of %d analyses (each with its reason under 'skipped' in %s "
            "and in the report): %s",
            len(skipped),
            len(jobs),
            out / results.SUMMARY,
            skipped_by_reason(skipped),
        )
    return summary


def skipped_by_reason(skipped: dict[str, str]) -> str:
    """The skipped '<analysis> on <set>' → reason, one phrase per reason: an unlabelled screen
    skips 7 analyses on 4 sets for 3 reasons, which 28 warnings would bury. A reason's own
    analysis name and its list of the set's columns are left out of the grouping."""
    import re

    groups: dict[str, tuple[dict, dict]] = {}
    for key, why in skipped.items():
        name, fs = key.split(" on ", 1)
        head = why.split("; metadata columns")[0]
        head = re.sub(rf"^(analysis )?'?{re.escape(name)}'?:? ", "", head)
        names, sets = groups.setdefault(head, ({}, {}))
        names[name], sets[fs] = None, None
    return "; ".join(
        f"{', '.join(names)} on {', '.join(sets)}: {head}" for head, (names, sets) in groups.items()
    )


def _refuse_overwriting_inputs(profiles, spec: dict, base: Path, spec_src, out: Path) -> None:
    """evaluate.out_dir's files (metrics, summary, parts/, tables/) must not be the profiles or
    the spec it reads, nor lie in a folder of its inputs (`celldino.io.provenance`)."""
    inputs = [Path(profiles)] if profiles else []
    inputs += [
        Path(p) if Path(p).is_absolute() else base / p for p in (spec.get("inputs") or {}).values()
    ]
    if isinstance(spec_src, (str, Path)):
        inputs.append(Path(spec_src))
    inputs = [p for p in inputs if not p.is_dir()]  # a folder is refused as such when read
    refuse_overwriting_inputs(
        {
            "evaluate.out_dir": [
                out / results.METRICS,
                out / results.METRICS_CSV,
                out / results.SUMMARY,
            ]
        },
        {"the profiles": inputs},
        "evaluate",
        owned=[out / "parts", out / results.TABLES, out / "pending"],
    )


def evaluate(
    profiles: str | Path | None,
    *,
    spec: str | Path | dict | None = None,
    cfg: EvaluateConfig | None = None,
    allow_nothing: bool = False,
) -> Path:
    """Run the spec's analyses on every feature set; returns the output folder.

    Writes `metrics.parquet` and `metrics.csv` (feature_set, analysis, metric, value),
    `tables/<analysis>__<feature_set>__<table>.parquet` and `summary.json`. An analysis that
    cannot run on these profiles (a column role they lack, one plate to hold out, ...) is
    skipped with its reason; when none can run, DataError, unless `allow_nothing` (then the
    outputs list only what was skipped, and why).
    """
    cfg = cfg or EvaluateConfig()
    spec_dict, base = load_spec(spec if spec is not None else (cfg.spec or None))
    analyses = activity_defaults(_analyses(spec_dict), cfg.activity_negatives)
    spec_src = spec if spec is not None else (cfg.spec or None)
    where = f"spec {spec_src}" if isinstance(spec_src, (str, Path)) else "the spec"
    # column roles: the spec's, then evaluate.columns.* (config file / command line) role by role
    valid = [f.name for f in dataclasses.fields(Columns)]
    bad = [k for k in cfg.columns if k not in valid]
    if bad:
        raise SpecError(f"unknown column role(s) {bad} in evaluate.columns; valid: {valid}")
    given = {**(spec_dict.get("columns") or {}), **cfg.columns}
    origin = {
        r: f"evaluate.columns.{r}" if r in cfg.columns else f"{where}: columns.{r}" for r in given
    }
    cols = Columns(**given)
    ctx = EvalContext(
        cols=cols,
        seed=cfg.seed,
        null_size=cfg.null_size,
        threshold=cfg.threshold,
        map_method=cfg.map_method,
        block_bytes=cfg.map_memory_mb * 2**20,
        n_boot=cfg.n_boot,
    )
    _refuse_overwriting_inputs(profiles, spec_dict, base, spec_src, Path(cfg.out_dir))
    out = require_writable(cfg.out_dir, "evaluate.out_dir")  # before reading or computing anything
    with output_lock(out, "evaluate"):
        sets = load_feature_sets(profiles, spec_dict, base, cfg.seed, where)
        check_columns(sets, given, origin)
        check_controls(sets, given, cols, origin)
        _run_all(sets, analyses, ctx, cfg, out, allow_nothing)
    logger.info("evaluation written to %s", out)
    return out
