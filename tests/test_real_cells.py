"""bench/real_cells.py, the learned-vs-engineered harness: its scores against sklearn by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rc():
    spec = importlib.util.spec_from_file_location("real_cells", ROOT / "bench" / "real_cells.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["real_cells"] = mod
    spec.loader.exec_module(mod)
    return mod


def _screen(rc, seed=0, shift=3.0):
    """3 scored plates + 1 extra plate, 4 doses, 3 fields per well, 8 cells per field."""
    rng = np.random.default_rng(seed)
    rows = []
    for plate in (*rc.PLATES, "Week4_27481"):
        for dose in (0.0, 5.0, 15.0, 50.0):
            for fov in range(3):
                for _ in range(8):
                    rows.append(
                        {
                            "plate": plate,
                            "well": f"w{dose}",
                            "source_image_stem": f"{plate}_{dose}_{fov}",
                            "concentration_uM": dose,
                            "compound": "DMSO" if dose == 0 else "cycloheximide",
                        }
                    )
    meta = pd.DataFrame(rows)
    y = pd.factorize(meta["concentration_uM"], sort=True)[0]
    f = rng.normal(size=(len(meta), 6)) + 2.5 * np.eye(4, 6)[y]
    f += shift * rng.normal(size=(1, 6)) * (meta["plate"] == rc.PLATES[0]).to_numpy()[:, None]
    return f, meta


def test_scores_match_sklearn_leave_one_plate_out(rc):
    f, meta = _screen(rc)
    sc = rc.Scorer(meta, n_boot=200)
    df = sc.score("x", f)
    keep = meta["plate"].isin(rc.PLATES).to_numpy()
    f, m = f[keep], meta[keep].reset_index(drop=True)
    y = m["concentration_uM"].astype(str).to_numpy()
    want = {"kNN k=5": [], "linear": []}
    for plate in rc.PLATES:
        te = (m["plate"] == plate).to_numpy()
        mu, sd = f[~te].mean(0), f[~te].std(0)
        a, b = (f[~te] - mu) / sd, (f[te] - mu) / sd
        knn = KNeighborsClassifier(5, metric="cosine", algorithm="brute").fit(a, y[~te])
        want["kNN k=5"].append(f1_score(y[te], knn.predict(b), average="macro"))
        lin = LogisticRegression(C=1.0, max_iter=2000).fit(a, y[~te])
        want["linear"].append(f1_score(y[te], lin.predict(b), average="macro"))
    for clf, vals in want.items():
        row = df[(df.task == "dose") & (df.level == "cell") & (df.classifier == clf)].iloc[0]
        assert row.f1 == pytest.approx(np.mean(vals), abs=1e-12)
        assert row.ci_low <= row.f1 <= row.ci_high
        assert row.f1 > row.chance + 0.2  # planted signal well above guessing
    # 4 doses, balanced: stratified guessing scores 0.25, majority 0.4/4 = 0.1
    assert df.chance.iloc[0] == pytest.approx(0.25)
    fov = df[(df.level == "fov")]
    assert fov["flags"].str.contains("few test samples").all()  # 12 fields per held-out plate


def test_paired_delta_is_zero_for_the_same_set_and_fields_are_resampled_whole(rc):
    f, meta = _screen(rc, seed=1)
    sc = rc.Scorer(meta, n_boot=300)
    sc.score("a", f, tasks=("dose",), levels=("cell",))
    sc.score("b", f.copy(), tasks=("dose",), levels=("cell",))
    d = sc.delta("a", "b")
    assert d == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    w = sc.weights["cell"][rc.PLATES[0]]
    sub = sc.meta[sc.meta.plate == rc.PLATES[0]]
    for b in range(5):  # every cell of a field has its field's multiplicity
        assert (pd.Series(w[b]).groupby(sub["source_image_stem"].to_numpy()).nunique() == 1).all()
        # fields are redrawn within their well: each dose keeps its 3 fields x 8 cells
        assert (pd.Series(w[b]).groupby(sub["well"].to_numpy()).sum() == 24).all()
    assert w.std() > 0


def test_per_fold_features_use_each_folds_model(rc):
    f, meta = _screen(rc, seed=2, shift=0.0)
    sc = rc.Scorer(meta, n_boot=50)
    noise = np.random.default_rng(3).normal(size=f.shape)
    # the fold of plate 0 sees the signal, the others pure noise
    folds = {rc.PLATES[0]: f, rc.PLATES[1]: noise, rc.PLATES[2]: noise}
    df = sc.score("per fold", folds, tasks=("dose",), levels=("cell",))
    row = df[df.classifier == "linear"].iloc[0]
    p0 = row[rc.PLATES[0][-5:]]
    assert p0 > 0.5 and max(row[rc.PLATES[1][-5:]], row[rc.PLATES[2][-5:]]) < p0 - 0.2


def test_scaling_keeps_or_removes_intensity_as_documented(rc):
    rng = np.random.default_rng(0)
    imgs = rng.integers(100, 1000, size=(6, 8, 8, 3)).astype(np.uint16)
    imgs[3:] *= 3  # plate B three times brighter
    plates = np.array(["A"] * 3 + ["B"] * 3)
    g = rc._scale(imgs, plates, "global")
    p = rc._scale(imgs, plates, "plate")
    c = rc._scale(imgs, plates, "crop")
    assert g[3:].mean() > 2 * g[:3].mean()  # global keeps the brightness difference
    assert abs(p[3:].mean() - p[:3].mean()) < 0.05  # per plate takes it out
    for k in range(6):  # per crop: each crop spans its own window
        assert c[k].max() == pytest.approx(1.0) and c[k].min() == pytest.approx(0.0)


def test_block_weights_apply_after_the_zscore_and_fields_are_pandas_means(rc):
    f, meta = _screen(rc, seed=4, shift=0.0)
    f = np.concatenate([f, np.random.default_rng(5).normal(size=(len(f), 30))], axis=1)
    w = rc.block_weights(6, 30)
    assert w[:6] == pytest.approx(1 / np.sqrt(6)) and (w**2)[6:].sum() == pytest.approx(1.0)
    keep = meta["plate"].isin(rc.PLATES).to_numpy()
    g, m = f[keep], meta[keep].reset_index(drop=True)
    y = m["concentration_uM"].astype(str).to_numpy()
    plate = rc.PLATES[0]
    te = (m["plate"] == plate).to_numpy()
    mu, sd = g[~te].mean(0), g[~te].std(0)
    a, b = (g[~te] - mu) / sd * w, (g[te] - mu) / sd * w
    want = KNeighborsClassifier(5, metric="cosine", algorithm="brute").fit(a, y[~te]).predict(b)
    preds, codes = rc.predict(g, m, "dose", weights=w)
    classes = np.unique(y)
    assert (classes[preds["kNN k=5"][te]] == want).all()
    # field of view level: pandas' group means, one metadata row per field in the same order
    means, fm = rc._fov_means(g, m)
    ref = pd.DataFrame(g).groupby(m["source_image_stem"].to_numpy(), sort=False).mean()
    assert list(fm["source_image_stem"]) == list(ref.index)
    assert np.allclose(means, ref.to_numpy())
