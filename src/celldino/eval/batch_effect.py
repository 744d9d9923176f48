"""Do the profiles separate by plate more than by treatment? A batch-effect check.

`plate_effect` scores the same profiles twice with the silhouette (scikit-learn, cosine
distance by default): once with the plate as the label, once with the treatment as the label.
A silhouette near 0 means the label does not structure the profiles; the check flags the
profiles when the plate silhouette exceeds the treatment silhouette by more than `margin`
(default 0): then a profile's nearest neighbours are more often from its plate than from its
treatment, and plate (batch) correction is due before any retrieval number means much.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import silhouette_samples

from celldino.eval.spec import NotEvaluable, profiles_of


def _labels(meta: pd.DataFrame, cols: Sequence[str]) -> np.ndarray:
    return meta[list(cols)].astype(str).agg(" | ".join, axis=1).to_numpy()


def plate_effect(
    meta,
    X=None,
    *,
    plate: str = "Metadata_Plate",
    treatment: str | Sequence[str] = "Metadata_Compound",
    metric: str = "cosine",
    margin: float = 0.0,
) -> tuple[dict, pd.DataFrame]:
    """Silhouette of the profiles with plate labels vs with treatment labels.

    Returns ({silhouette_plate, silhouette_treatment, plate_minus_treatment, plate_dominates
    (1.0 when plate − treatment > margin, else 0.0), margin, n_profiles, n_plates,
    n_treatments}, a per-plate table of the mean silhouette of its profiles under each label).
    Raises NotEvaluable when either label has fewer than 2 values or as many values as profiles.
    """
    meta, X = profiles_of(meta, X)
    X = np.asarray(X, dtype=np.float64)
    treatment = [treatment] if isinstance(treatment, str) else list(treatment)
    for col in [plate, *treatment]:
        if col not in meta.columns:
            raise KeyError(f"column '{col}' not in the profiles' metadata")
    by_plate, by_treat = _labels(meta, [plate]), _labels(meta, treatment)
    n = len(meta)
    for what, lab in (("plate", by_plate), ("treatment", by_treat)):
        k = len(np.unique(lab))
        if not 2 <= k <= n - 1:
            raise NotEvaluable(
                f"the silhouette with {what} labels needs 2 to {n - 1} distinct values over "
                f"{n} profiles; {what} ({', '.join([plate] if what == 'plate' else treatment)}) "
                f"has {k}"
            )
    s_plate = silhouette_samples(X, by_plate, metric=metric)
    s_treat = silhouette_samples(X, by_treat, metric=metric)
    diff = float(s_plate.mean() - s_treat.mean())
    metrics = {
        "silhouette_plate": float(s_plate.mean()),
        "silhouette_treatment": float(s_treat.mean()),
        "plate_minus_treatment": diff,
        "plate_dominates": float(diff > margin),
        "margin": float(margin),
        "n_profiles": n,
        "n_plates": len(np.unique(by_plate)),
        "n_treatments": len(np.unique(by_treat)),
    }
    table = (
        pd.DataFrame(
            {"plate": by_plate, "silhouette_plate": s_plate, "silhouette_treatment": s_treat}
        )
        .groupby("plate", sort=True)
        .agg(
            n_profiles=("silhouette_plate", "size"),
            silhouette_plate=("silhouette_plate", "mean"),
            silhouette_treatment=("silhouette_treatment", "mean"),
        )
        .reset_index()
    )
    return metrics, table
