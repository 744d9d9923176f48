"""What every analysis shares: column roles, the run context, result types, spec errors, and
the two input rules (AnnData or `(meta, X)`; which rows are negative controls).

An analysis registered in `celldino.eval.analyses.ANALYSES` is `fn(meta, X, ctx, **params)`:
`meta` the metadata table, `X` the (profiles, features) matrix, `ctx` an `EvalContext` whose
`cols` names the metadata columns by role. It returns an `AnalysisResult` (or a dict of
metric → number), or raises `NotEvaluable` when it cannot run on these profiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from celldino.config import ConfigError
from celldino.errors import DataError

if TYPE_CHECKING:
    import anndata as ad


class SpecError(ConfigError):
    """An evaluation spec that cannot be run (names the key and what to do)."""


class NotEvaluable(DataError):
    """This analysis cannot run on these profiles (no MoA values, no replicate pairs, ...):
    the runner skips it, says why, and runs the others."""


# ---- inputs -----------------------------------------------------------------------------------


def obs_table(adata: ad.AnnData) -> pd.DataFrame:
    """An AnnData's `obs` as a plain metadata table: index reset, categoricals (how .h5ad stores
    strings) back to plain values."""
    meta = adata.obs.reset_index(drop=True)
    for c in meta.columns:
        if isinstance(meta[c].dtype, pd.CategoricalDtype):
            meta[c] = meta[c].astype(object).where(meta[c].notna(), None)
    return meta


def profiles_of(data, X=None) -> tuple[pd.DataFrame, object]:
    """(meta, X) from an AnnData (`obs`, `X`) or from a metadata table and its feature matrix.

    Every public function of `celldino.eval` that takes `(meta, X)` starts with this, so
    `fn(adata, ...)` and `fn(adata.obs, adata.X, ...)` give the same result.
    """
    if hasattr(data, "obs") and hasattr(data, "X") and hasattr(data, "var_names"):  # AnnData
        if X is not None:
            raise TypeError("pass an AnnData alone, or a metadata table and its feature matrix X")
        Xa = data.X
        return obs_table(data), Xa.toarray() if hasattr(Xa, "toarray") else Xa
    if X is None:
        raise TypeError(
            "no feature matrix: pass fn(adata, ...) with an AnnData, or fn(meta, X, ...) with the "
            "metadata table and the (profiles, features) matrix"
        )
    return data, X


def as_anndata(meta: pd.DataFrame, X) -> ad.AnnData:
    """An AnnData of a metadata table and its feature matrix (features named `_x0`, `_x1`, ...),
    to hand eval's arrays to `celldino.pp` functions; `profiles_of` turns the result back."""
    import anndata as ad

    X = np.asarray(X)
    obs = meta.reset_index(drop=True)
    obs.index = obs.index.astype(str)
    var = pd.DataFrame(index=pd.Index([f"_x{j}" for j in range(X.shape[1])], dtype=str))
    return ad.AnnData(X=X, obs=obs, var=var)


def is_control_row(
    meta: pd.DataFrame, control: str, control_value: str | Sequence[str] = "control"
) -> np.ndarray:
    """Boolean (n,): rows whose `control` column holds `control_value` (or one of several
    values), compared as strings; a clear KeyError when the column is missing. `control`
    None or '' means the screen has no controls: no row is one."""
    if not control:
        return np.zeros(len(meta), dtype=bool)
    if control not in meta.columns:
        raise KeyError(
            f"control column '{control}' not in the metadata (available: {list(meta.columns)});"
            " set the control column (e.g. Metadata_pert_type) or add it"
        )
    values = [control_value] if isinstance(control_value, str) else list(control_value)
    return meta[control].astype(str).isin([str(v) for v in values]).to_numpy()


def drop_controls(
    meta: pd.DataFrame,
    X,
    *,
    control: str | None = "Metadata_pert_type",
    control_value: str | Sequence[str] = "control",
) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows that are not negative controls: (meta with its index reset, X as an array).

    Nothing is dropped when `control` is None or not a column of `meta`.
    """
    meta = meta.reset_index(drop=True)
    X = np.asarray(X)
    if not control or control not in meta.columns:
        return meta, X
    keep = ~is_control_row(meta, control, control_value)
    return meta[keep].reset_index(drop=True), X[keep]


# ---- what analyses receive and return -------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """Metadata column names the analyses use (spec key `columns`)."""

    compound: str = "Metadata_Compound"
    dose: str = "Metadata_Dose"
    moa: str = "Metadata_MoA"
    batch: str = "Metadata_Batch"
    plate: str = "Metadata_Plate"
    well: str = "Metadata_Well"
    control: str = "Metadata_pert_type"
    control_value: str = "control"
    moa_sep: str | None = None  # split MoA strings into label sets (e.g. '|')

    def present(self, meta: pd.DataFrame, name: str) -> str | None:
        """The column for `name` if the table has it, else None."""
        col = getattr(self, name)
        return col if col and col in meta.columns else None

    def require(self, meta: pd.DataFrame, name: str, analysis: str) -> str:
        """The column of role `name`, or NotEvaluable: the analysis is skipped (the runner has
        refused columns the user named that the profiles lack, so this is a default name)."""
        col = getattr(self, name)
        if not col or col not in meta.columns:
            raise NotEvaluable(
                f"analysis '{analysis}' needs the {name} column '{col}', which the profiles lack; "
                f"set evaluate.columns.{name}=<column> (or columns.{name} in the spec); metadata "
                f"columns: {', '.join(map(str, meta.columns))}"
            )
        return col

    def drop_controls(self, meta: pd.DataFrame, X) -> tuple[pd.DataFrame, np.ndarray]:
        """`drop_controls` with this spec's control column and value."""
        return drop_controls(meta, X, control=self.control, control_value=self.control_value)


@dataclass(frozen=True)
class EvalContext:
    """Settings shared by every analysis of one run."""

    cols: Columns = field(default_factory=Columns)
    seed: int = 0
    null_size: int = 10000
    threshold: float = 0.05
    map_method: str = "auto"
    block_bytes: int = 256 * 2**20
    n_boot: int = 1000  # bootstrap resamples of the 95% intervals (eval.stats; 0: none)
    # set by the runner per analysis (not part of a part's fingerprint): the feature set being
    # evaluated and every feature set of the run by name (`.meta`, `.X`, `.source`, `.key`), for
    # the analyses that compare sets (mantel, cca, block_search) or read its run folder
    feature_set: str = field(default="", compare=False)
    sets: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class AnalysisResult:
    """Numbers for the tidy table plus optional detail tables."""

    metrics: dict[str, float]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    # metric → its chance level, interval, p-value, query count and flags (eval.stats.STAT_COLUMNS)
    stats: dict[str, dict] = field(default_factory=dict)
