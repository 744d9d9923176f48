"""The classification and biology analyses through `celldino evaluate`'s runner."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from celldino.config import EvaluateConfig
from celldino.eval.classify import knn_f1
from celldino.eval.runner import ANALYSES, evaluate


def planted_profiles(tmp_path):
    """4 MoAs × 3 compounds × 3 doses × 2 plates, plus DMSO; MoA shifts a feature block."""
    rng = np.random.default_rng(0)
    rows = []
    for m in range(4):
        for c in range(3):
            for dose in (1, 3, 10):
                for p in range(2):
                    x = rng.normal(size=12)
                    x[3 * m : 3 * m + 3] += 4.0
                    meta = {
                        "Metadata_Compound": f"cpd{m}{c}",
                        "Metadata_MoA": f"moa{m}",
                        "Metadata_Dose": dose,
                        "Metadata_Plate": f"P{p}",
                        "Metadata_Well": f"W{m}{c}{dose}",
                        "Metadata_pert_type": "trt",
                    }
                    rows.append({**meta, **{f"emb_{j:04d}": v for j, v in enumerate(x)}})
    for i in range(6):
        x = rng.normal(size=12)
        meta = {
            "Metadata_Compound": "DMSO",
            "Metadata_MoA": "control",
            "Metadata_Dose": 0,
            "Metadata_Plate": f"P{i % 2}",
            "Metadata_Well": f"C{i}",
            "Metadata_pert_type": "control",
        }
        rows.append({**meta, **{f"emb_{j:04d}": v for j, v in enumerate(x)}})
    df = pd.DataFrame(rows)
    path = tmp_path / "profiles.parquet"
    df.to_parquet(path)
    return df, path


def test_bio_analyses_are_registered():
    for name in (
        "classify",
        "lowshot",
        "moa_prediction",
        "multitask",
        "factors",
        "similarity",
        "heterogeneity",
        "pseudotime",
    ):
        assert name in ANALYSES


def test_evaluate_runs_classification_and_biology_side_by_side(tmp_path):
    df, path = planted_profiles(tmp_path)
    spec = {
        "name": "learned",
        "derived": {"pca": {"pca": "learned", "n_components": 4}},
        "analyses": {
            "classify": {"classifiers": ["knn", "linear"], "ks": [1, 5]},
            "lowshot": {"fractions": [0.1, 1.0], "ks": [5]},
            "moa_prediction": {"n_folds": 3},
            "factors": {},
            "similarity": {},
        },
    }
    out = evaluate(path, spec=spec, cfg=EvaluateConfig(out_dir=str(tmp_path / "eval")))
    metrics = pd.read_csv(out / "metrics.csv")
    m = metrics.set_index(["feature_set", "analysis", "metric"]).value
    assert set(metrics.feature_set) == {"learned", "pca"}
    assert m["learned", "moa_prediction", "micro_pr_auc"] > 0.7  # prevalence 0.25
    assert m["learned", "classify", "knn_k5_macro_f1"] > 0.9
    assert m["learned", "factors", "fraction_top_Metadata_MoA"] == 1.0
    # same split (by compound, controls dropped, seed 0) as a direct call
    trt = df[df.Metadata_pert_type == "trt"].reset_index(drop=True)
    X = trt.filter(like="emb_").to_numpy()
    direct = knn_f1(trt, X, label="Metadata_MoA", split_by="Metadata_Compound", ks=(1,))
    assert m["learned", "classify", "knn_k1_macro_f1"] == pytest.approx(direct.macro_f1.iloc[0])
    sim = pd.read_parquet(out / "tables" / "similarity__learned__similarity.parquet")
    assert set(sim.group_a) == {"moa0", "moa1", "moa2", "moa3"}
    assert (out / "tables" / "lowshot__pca__lowshot.parquet").exists()
