"""Every eval function taking (meta, X) takes an AnnData too, with the identical result."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from celldino import eval as E
from celldino.eval.spec import drop_controls, profiles_of

MOA, CPD = "Metadata_MoA", "Metadata_Compound"


def _profiles() -> tuple[pd.DataFrame, np.ndarray]:
    """4 MoAs × 3 compounds × 2 doses × 2 plates plus DMSO; a MoA shifts a block of features."""
    rng = np.random.default_rng(0)
    rows, X = [], []
    for m in range(4):
        for c in range(3):
            for dose in (1, 10):
                for p in range(2):
                    x = rng.normal(size=12)
                    x[3 * m : 3 * m + 3] += 4.0
                    X.append(x)
                    rows.append(
                        {
                            CPD: f"cpd{m}{c}",
                            MOA: f"moa{m}",
                            "Metadata_Dose": dose,
                            "Metadata_Plate": f"P{p}",
                            "Metadata_Well": f"W{m}{c}{dose}",
                            "Metadata_pert_type": "trt",
                            "Metadata_assay": int(m < 2),
                        }
                    )
    for i in range(6):
        X.append(rng.normal(size=12))
        rows.append(
            {
                CPD: "DMSO",
                MOA: "control",
                "Metadata_Dose": 0,
                "Metadata_Plate": f"P{i % 2}",
                "Metadata_Well": f"C{i}",
                "Metadata_pert_type": "control",
                "Metadata_assay": 0,
            }
        )
    return pd.DataFrame(rows), np.array(X)


def _same(a, b) -> None:
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif dataclasses.is_dataclass(a):
        _same(dataclasses.asdict(a), dataclasses.asdict(b))
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b or (a != a and b != b)  # NaN == NaN here


MAP = {"null_size": 50, "show_progress": False}
SPLIT = {"split_by": CPD, "seed": 0}
CALLS = {  # one per kind of function: retrieval, matching, classifiers, biology
    "nsc_nscb": lambda d, X: E.nsc_nscb(
        d, X, moa=MOA, compound=CPD, treatment=[CPD, "Metadata_Dose"], batch="Metadata_Plate"
    ),
    "nearest_moa": lambda d, X: E.nearest_moa(
        *drop_controls(*profiles_of(d, X)), moa=MOA, compound=CPD
    ),
    "average_precision": lambda d, X: E.average_precision(
        d, X, pos_sameby=[CPD], neg_diffby=[CPD], show_progress=False
    ),
    "retrieval_map": lambda d, X: E.retrieval_map(d, X, by=[CPD], negatives="others", **MAP),
    "moa_map": lambda d, X: E.moa_map(d, X, moa=MOA, compound=CPD, **MAP),
    "phenotypic_activity": lambda d, X: E.phenotypic_activity(d, X, by=[CPD], **MAP),
    "enrichment": lambda d, X: E.enrichment(d, X, moa=MOA, compound=CPD, percentiles=(5,)),
    "knn_f1": lambda d, X: E.knn_f1(d, X, label=MOA, ks=(1, 5), **SPLIT),
    "linear_probe": lambda d, X: E.linear_probe(d, X, label=MOA, **SPLIT),
    "classify": lambda d, X: E.classify(d, X, label=MOA, classifiers=("knn",), ks=(3,), **SPLIT),
    "lowshot_curve": lambda d, X: E.lowshot_curve(
        d, X, label=MOA, fractions=(0.5, 1.0), classifiers=("knn",), ks=(3,), **SPLIT
    ),
    "moa_prediction": lambda d, X: E.moa_prediction(d, X, moa=MOA, compound=CPD, n_folds=3),
    "multitask_activity": lambda d, X: E.multitask_activity(
        d, X, tasks=["Metadata_assay"], split_by=CPD, epochs=2
    ),
    "factor_mutual_information": lambda d, X: E.factor_mutual_information(
        d, X, factors=[MOA, "Metadata_Plate"]
    ),
    "group_similarity": lambda d, X: E.group_similarity(d, X, group=MOA),
    "field_std": lambda d, X: E.field_std(d, X, fields=["Metadata_Plate"], treatment=CPD),
    "heterogeneity": lambda d, X: E.heterogeneity(
        # a field (plate, MoA) holds 3 compounds, ranked as one treatment under their joined
        # names ('cpd00' alone matches none: not evaluable since issue 22)
        d,
        X,
        fields=["Metadata_Plate", MOA],
        treatment=CPD,
        annotated=["cpd00|cpd01|cpd02"],
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_anndata_input_gives_the_identical_result(name):
    meta, X = _profiles()
    adata = ad.AnnData(X=X, obs=meta.set_axis(meta.index.astype(str)))
    adata.strings_to_categoricals()  # as read back from .h5ad
    _same(CALLS[name](meta, X), CALLS[name](adata, None))


def test_pseudotime_takes_an_anndata():
    pytest.importorskip("scanpy")
    meta, X = _profiles()
    adata = ad.AnnData(X=X, obs=meta.set_axis(meta.index.astype(str)))
    kw = {"root_by": MOA, "root_value": "moa0", "n_neighbors": 5}
    _same(E.diffusion_pseudotime(meta, X, **kw), E.diffusion_pseudotime(adata, **kw))


def test_anndata_and_a_matrix_together_is_an_error():
    meta, X = _profiles()
    with pytest.raises(TypeError, match="AnnData alone"):
        E.knn_f1(ad.AnnData(X=X), X, label=MOA, split_by=CPD)
    with pytest.raises(TypeError, match="no feature matrix"):
        E.knn_f1(meta, label=MOA, split_by=CPD)
