"""`celldino evaluate PROFILES --spec`: feature sets side by side, tidy tables, resume."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from copairs.map import average_precision as copairs_ap
from copairs.map import mean_average_precision as copairs_map
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from celldino import cli
from celldino.eval import runner
from celldino.eval.stats import STAT_COLUMNS


def _wells(seed: int, signal: float, d: int = 10) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows, vecs = [], []
    moa_centre = rng.normal(size=(3, d))
    for m in range(3):
        for c in range(3):
            cpd = moa_centre[m] + 0.5 * rng.normal(size=d)
            for dose in (1.0, 10.0):
                for rep in range(2):
                    rows.append((f"m{m}c{c}", dose, f"M{m}", f"B{(c + rep) % 2}", "trt"))
                    vecs.append(signal * cpd + rng.normal(size=d))
    for i in range(8):
        rows.append(("DMSO", 0.0, "control", f"B{i % 2}", "control"))
        vecs.append(rng.normal(size=d))
    meta = pd.DataFrame(
        rows,
        columns=[
            "Metadata_Compound",
            "Metadata_Dose",
            "Metadata_MoA",
            "Metadata_Batch",
            "Metadata_pert_type",
        ],
    )
    feats = pd.DataFrame(np.array(vecs), columns=[f"f{i}" for i in range(d)])
    return pd.concat([meta, feats], axis=1)


@pytest.fixture
def inputs(tmp_path):
    learned = _wells(0, signal=2.0)
    engineered = _wells(1, signal=1.0)
    random_init = _wells(2, signal=0.0)
    learned.to_parquet(tmp_path / "learned.parquet", index=False)
    engineered.to_csv(tmp_path / "engineered.csv", index=False)
    feat_cols = [c for c in random_init.columns if not c.startswith("Metadata_")]
    obs = random_init.drop(columns=feat_cols)
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(
        X=random_init[feat_cols].to_numpy(), obs=obs, var=pd.DataFrame(index=feat_cols)
    )
    adata.write_h5ad(tmp_path / "random.h5ad")
    spec = {
        "inputs": {"engineered": "engineered.csv", "random_init": "random.h5ad"},
        "derived": {"pca_engineered": {"pca": "engineered", "n_components": 4}},
        "analyses": {
            "nsc": {},
            "map_replicate": {"by": ["Metadata_Compound"]},
            "enrichment": {"percentiles": [10]},
        },
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path, {"learned": learned, "engineered": engineered, "random_init": random_init}


def _nsc_sklearn(df: pd.DataFrame) -> float:
    """Median per (compound, dose), first neighbour of another compound in sklearn's ranking."""
    trt = df[df.Metadata_pert_type == "trt"]
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    agg = trt.groupby(["Metadata_Compound", "Metadata_Dose", "Metadata_MoA"])[feats].median()
    X, keys = agg.to_numpy(), agg.index.to_frame(index=False)
    _, order = NearestNeighbors(n_neighbors=len(X), metric="cosine").fit(X).kneighbors(X)
    hits = [
        keys.Metadata_MoA[q]
        == keys.Metadata_MoA[
            next(j for j in order[q] if keys.Metadata_Compound[j] != keys.Metadata_Compound[q])
        ]
        for q in range(len(X))
    ]
    return float(np.mean(hits))


def test_evaluate_cli_side_by_side(inputs, capsys):
    tmp, frames = inputs
    out = tmp / "out"
    rc = cli.main(
        [
            "evaluate",
            str(tmp / "learned.parquet"),
            "--spec",
            str(tmp / "eval.yaml"),
            f"evaluate.out_dir={out}",
            "evaluate.null_size=300",
            "-q",
        ][:-1]
    )
    assert rc == 0
    assert str(out / "summary.json") in capsys.readouterr().out
    tidy = pd.read_parquet(out / "metrics.parquet")
    assert list(tidy.columns) == ["feature_set", "analysis", "metric", "value", *STAT_COLUMNS]
    csv = pd.read_csv(out / "metrics.csv").fillna({"flags": ""})
    pd.testing.assert_frame_equal(tidy, csv, check_dtype=False)
    sets = ["learned", "engineered", "random_init", "pca_engineered"]
    assert list(dict.fromkeys(tidy.feature_set)) == sets
    assert not tidy.duplicated(["feature_set", "analysis", "metric"]).any()
    per_set = tidy.groupby("feature_set").size()
    assert (per_set == per_set.iloc[0]).all()  # every analysis on every set
    v = tidy.set_index(["feature_set", "analysis", "metric"])["value"]

    # NSC against an independent sklearn computation, for a file set and the derived PCA set
    for name in ("learned", "engineered"):
        assert v[(name, "nsc", "NSC")] == pytest.approx(_nsc_sklearn(frames[name]))
    eng = frames["engineered"]
    fcols = [c for c in eng.columns if not c.startswith("Metadata_")]
    pca = pd.DataFrame(
        PCA(4, random_state=0).fit_transform(eng[fcols].to_numpy()),
        columns=[f"p{i}" for i in range(4)],
    )
    pca_frame = pd.concat([eng.drop(columns=fcols), pca], axis=1)
    assert v[("pca_engineered", "nsc", "NSC")] == pytest.approx(_nsc_sklearn(pca_frame))

    # replicate mAP of the engineered set against copairs on the same table
    m = eng.drop(columns=fcols).copy()
    ctrl = (m.Metadata_pert_type == "control").to_numpy()
    m["ref"] = np.where(ctrl, np.arange(len(m)), -1)
    ap = copairs_ap(
        m,
        eng[fcols].to_numpy(),
        ["Metadata_Compound", "ref"],
        [],
        [],
        ["Metadata_Compound"],
        progress_bar=False,
    )
    ref = copairs_map(
        ap, ["Metadata_Compound"], 300, 0.05, 0, progress_bar=False, cache_dir=tmp / "cache"
    )
    assert v[("engineered", "map_replicate", "mAP")] == pytest.approx(
        ref.mean_average_precision.mean()
    )
    assert v[("engineered", "map_replicate", "fraction_retrieved")] == pytest.approx(
        ref.below_corrected_p.mean()
    )

    # the planted signal orders the sets: learned (strong) > random_init (none)
    assert v[("learned", "map_replicate", "mAP")] > v[("random_init", "map_replicate", "mAP")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["feature_sets"]["pca_engineered"]["n_features"] == 4
    assert summary["metrics"]["nsc"]["NSC"]["learned"] == pytest.approx(
        v[("learned", "nsc", "NSC")]
    )
    assert (out / "tables" / "map_replicate__learned__map.parquet").exists()


def test_evaluate_resumes_and_recomputes_on_change(inputs, monkeypatch):
    tmp, _ = inputs
    cfg = runner.EvaluateConfig(out_dir=str(tmp / "out"), null_size=200)
    spec = {"analyses": ["nsc"]}
    runner.evaluate(tmp / "learned.parquet", spec=spec, cfg=cfg)
    first = pd.read_parquet(tmp / "out" / "metrics.parquet")

    def broken(*a, **k):
        raise AssertionError("finished part was recomputed")

    monkeypatch.setitem(runner.ANALYSES, "nsc", broken)
    runner.evaluate(tmp / "learned.parquet", spec=spec, cfg=cfg)  # kept, not recomputed
    pd.testing.assert_frame_equal(first, pd.read_parquet(tmp / "out" / "metrics.parquet"))
    with pytest.raises(AssertionError, match="recomputed"):  # other parameters → recompute
        runner.evaluate(
            tmp / "learned.parquet", spec={"analyses": {"nsc": {"batch": False}}}, cfg=cfg
        )


def test_registered_function_returning_a_dict(inputs, monkeypatch):
    tmp, frames = inputs
    monkeypatch.setitem(
        runner.ANALYSES, "n_rows", lambda meta, feats, ctx, **p: {"rows": len(meta) * p.get("k", 1)}
    )
    runner.evaluate(
        tmp / "learned.parquet",
        spec={"analyses": {"n_rows": {"k": 2}}},
        cfg=runner.EvaluateConfig(out_dir=str(tmp / "o2")),
    )
    tidy = pd.read_csv(tmp / "o2" / "metrics.csv")
    assert tidy.value.tolist() == [2 * len(frames["learned"])]


def test_bad_spec_is_a_clear_error(inputs, caplog):
    tmp, _ = inputs
    (tmp / "bad.yaml").write_text("analyses: [nsc, knn_typo]\n")
    rc = cli.main(
        [
            "evaluate",
            str(tmp / "learned.parquet"),
            "--spec",
            str(tmp / "bad.yaml"),
            f"evaluate.out_dir={tmp / 'o3'}",
        ]
    )
    assert rc == 2
    with pytest.raises(runner.SpecError, match="knn_typo.*available"):
        runner.evaluate(
            tmp / "learned.parquet",
            spec=tmp / "bad.yaml",
            cfg=runner.EvaluateConfig(out_dir=str(tmp / "o3")),
        )
    with pytest.raises(runner.SpecError, match="moa"):
        runner.evaluate(
            tmp / "learned.parquet",
            spec={"analyses": ["nsc"], "columns": {"moa": "Metadata_Nope"}},
            cfg=runner.EvaluateConfig(out_dir=str(tmp / "o4")),
        )


def test_runner_works_under_pandas_copy_on_write(inputs):
    """pycytominer switches pandas' copy-on-write on for the whole process, which makes arrays
    from `to_numpy()` read-only: the analyses must not write into them."""
    from celldino.eval.runner import evaluate

    tmp, _ = inputs
    with pd.option_context("mode.copy_on_write", True):
        out = evaluate(
            tmp / "learned.parquet",
            spec=tmp / "eval.yaml",
            cfg=runner.EvaluateConfig(out_dir=str(tmp / "cow"), null_size=100),
        )
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert {"nsc", "map_replicate", "enrichment"} <= set(metrics.analysis)
