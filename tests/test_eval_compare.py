"""The analyses that compare feature sets (mantel, cca, block_search) and the plate-vs-treatment
check, run through `celldino evaluate`, each against a computation by hand or planted truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist, pdist
from scipy.stats import spearmanr

from celldino.config import EvaluateConfig
from celldino.eval import runner


def _screen(seed: int = 0, d: int = 12, plate_shift: float = 0.0, signal: float = 3.0):
    """4 MoAs × 3 compounds × 4 replicate wells on 2 plates + 8 control wells; returns the
    metadata, the latent treatment centres per row and the features."""
    rng = np.random.default_rng(seed)
    moa_c = rng.normal(size=(4, d))
    plate_c = rng.normal(size=(2, d))
    rows, centre = [], []
    for m in range(4):
        for c in range(3):
            cpd = moa_c[m] + 0.4 * rng.normal(size=d)
            for r in range(4):
                rows.append((f"m{m}c{c}", f"M{m}", f"P{r % 2}", f"W{m}{c}{r}", "trt"))
                centre.append(signal * cpd)
    for i in range(8):
        rows.append(("DMSO", "control", f"P{i % 2}", f"C{i}", "control"))
        centre.append(np.zeros(d))
    meta = pd.DataFrame(
        rows,
        columns=[
            "Metadata_Compound",
            "Metadata_MoA",
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_pert_type",
        ],
    )
    centre = np.array(centre)
    plates = meta.Metadata_Plate.str[1].astype(int).to_numpy()
    X = centre + plate_shift * plate_c[plates] + rng.normal(size=centre.shape)
    return meta, centre, X


def _frame(meta: pd.DataFrame, X: np.ndarray) -> pd.DataFrame:
    return pd.concat([meta, pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])], axis=1)


def _evaluate(tmp_path, sets: dict[str, pd.DataFrame], analyses: dict) -> tuple[pd.DataFrame, dict]:
    inputs = {}
    for name, df in sets.items():
        path = tmp_path / f"{name}.parquet"
        df.to_parquet(path, index=False)
        inputs[name] = str(path)
    out = runner.evaluate(
        None,
        spec={"inputs": inputs, "analyses": analyses},
        cfg=EvaluateConfig(out_dir=str(tmp_path / "eval"), null_size=100),
    )
    return pd.read_parquet(out / "metrics.parquet"), json.loads((out / "summary.json").read_text())


def _value(tidy, fs, analysis, metric) -> float:
    row = tidy[(tidy.feature_set == fs) & (tidy.analysis == analysis) & (tidy.metric == metric)]
    assert len(row) == 1, (fs, analysis, metric)
    return float(row.value.iloc[0])


def test_mantel_matches_scipy_and_beats_its_null(tmp_path):
    meta, centre, X = _screen(0)
    rng = np.random.default_rng(5)
    learned = X
    engineered = centre @ rng.normal(size=(12, 12)) * 0.3 + centre + rng.normal(size=X.shape)
    noise = rng.normal(size=X.shape)
    # the reference set's rows in another order: mantel must match them by plate + well
    eng = _frame(meta, engineered).sample(frac=1.0, random_state=1).reset_index(drop=True)
    tidy, summary = _evaluate(
        tmp_path,
        {"learned": _frame(meta, learned), "engineered": eng, "random_init": _frame(meta, noise)},
        {"mantel": {"n_permutations": 199}},
    )
    # by hand: treatment means (controls out), cosine distances, Spearman of the upper triangles
    trt = meta.Metadata_pert_type != "control"

    def dist(M):
        g = pd.DataFrame(M[trt.to_numpy()]).groupby(meta.Metadata_Compound[trt].to_numpy()).mean()
        return pdist(g.to_numpy(), "cosine")

    r = spearmanr(dist(learned), dist(engineered)).statistic
    assert _value(tidy, "learned", "mantel", "r") == pytest.approx(r, abs=1e-9)
    assert _value(tidy, "learned", "mantel", "p_value") == pytest.approx(1 / 200)
    assert _value(tidy, "learned", "mantel", "n_objects") == 12
    assert _value(tidy, "learned", "mantel", "null_q95") < 0.5 < r
    # the permutation null is the r row's baseline in the statistics columns
    row = tidy[(tidy.feature_set == "learned") & (tidy.metric == "r")].iloc[0]
    assert row.chance == pytest.approx(_value(tidy, "learned", "mantel", "null_mean"))
    assert row.p_perm == pytest.approx(1 / 200) and row.n_queries == 12
    r0 = spearmanr(dist(noise), dist(engineered)).statistic
    assert _value(tidy, "random_init", "mantel", "r") == pytest.approx(r0, abs=1e-9)
    assert "mantel on engineered" in summary["skipped"]  # the reference itself
    assert "reference set" in summary["skipped"]["mantel on engineered"]


def test_cca_matches_partners_and_the_broken_pairs_do_not(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 120, 6
    Z = rng.normal(size=(n, 3))  # latent shared by both modalities
    A = Z @ rng.normal(size=(3, d)) + 0.05 * rng.normal(size=(n, d))
    B = Z @ rng.normal(size=(3, 8)) + 0.05 * rng.normal(size=(n, 8))
    meta = pd.DataFrame(
        {
            "Metadata_Compound": [f"c{i % 30}" for i in range(n)],
            "Metadata_Plate": [f"P{i // 60}" for i in range(n)],
            "Metadata_Well": [f"W{i % 60}" for i in range(n)],
        }
    )
    tidy, _ = _evaluate(
        tmp_path,
        {"learned": _frame(meta, A), "engineered": _frame(meta, B)},
        {"cca": {"n_components": 3, "n_pcs": 0}},
    )
    n_test = _value(tidy, "learned", "cca", "n_test")  # whole compounds held out (4 rows each)
    assert n_test % 4 == 0 and _value(tidy, "learned", "cca", "chance") == pytest.approx(1 / n_test)
    assert _value(tidy, "learned", "cca", "accuracy_a_to_b") > 0.9
    assert _value(tidy, "learned", "cca", "permuted_accuracy_a_to_b") < 0.2
    assert _value(tidy, "learned", "cca", "canonical_correlation_1") > 0.99


def test_block_search_finds_the_informative_block(tmp_path):
    meta, centre, X = _screen(1)
    rng = np.random.default_rng(2)
    sets = {
        "learned": _frame(meta, X),
        "learned_block0": _frame(meta, rng.normal(size=X.shape)),  # no signal
        "learned_block1": _frame(meta, centre * 3 + 0.1 * rng.normal(size=X.shape)),
    }
    tidy, summary = _evaluate(
        tmp_path, sets, {"block_search": {"split_by": "Metadata_Plate", "k": 1}}
    )
    # blocks in order: block0, block1, final; block1 is nearly noise-free
    assert _value(tidy, "learned", "block_search", "best_block_index") == 1
    assert _value(tidy, "learned", "block_search", "best_block_macro_f1") == 1.0
    assert _value(tidy, "learned", "block_search", "permuted_label_macro_f1") < 0.6
    assert _value(tidy, "learned", "block_search", "n_blocks") == 3
    assert "no per-block feature sets" in summary["skipped"]["block_search on learned_block0"]
    # the F1 of block1 by hand: cosine 1-NN from plate P0 to plate P1
    trt = (meta.Metadata_pert_type != "control").to_numpy()
    Xb = sets["learned_block1"].filter(like="f").to_numpy()[trt]
    y, plate = meta.Metadata_MoA.to_numpy()[trt], meta.Metadata_Plate.to_numpy()[trt]
    tr, te = plate == "P0", plate == "P1"
    nn = cdist(Xb[te], Xb[tr], "cosine").argmin(axis=1)
    assert (y[tr][nn] == y[te]).all()


def _agreement(X: np.ndarray, labels: np.ndarray) -> float:
    """Chance-corrected 1-NN label agreement, by hand with scipy's cosine distances."""
    D = cdist(X, X, "cosine")
    np.fill_diagonal(D, np.inf)
    hit = np.mean(labels[D.argmin(axis=1)] == labels)
    same = np.array([(labels == v).sum() - 1 for v in labels]) / (len(labels) - 1)
    return (hit - same.mean()) / (1 - same.mean())


@pytest.mark.parametrize("plate_shift, dominates", [(0.0, 0.0), (12.0, 1.0)])
def test_plate_effect_flags_profiles_that_separate_by_plate(tmp_path, plate_shift, dominates):
    meta, _, X = _screen(3, plate_shift=plate_shift, signal=1.5)
    tidy, _ = _evaluate(tmp_path, {"learned": _frame(meta, X)}, {"plate_effect": {}})
    ap = _agreement(X, meta.Metadata_Plate.to_numpy())
    at = _agreement(X, meta.Metadata_Compound.to_numpy())
    assert _value(tidy, "learned", "plate_effect", "plate_agreement") == pytest.approx(ap)
    assert _value(tidy, "learned", "plate_effect", "treatment_agreement") == pytest.approx(at)
    assert _value(tidy, "learned", "plate_effect", "plate_dominates") == dominates
    assert (ap - at > 0.1) == bool(dominates)
    p = _value(tidy, "learned", "plate_effect", "plate_p_value")
    if dominates:  # the planted plate shift is beyond the permutation null
        assert p < 0.05
    row = tidy[tidy.metric == "plate_agreement"].iloc[0]  # chance 0, p from the permutations
    assert row.chance == 0 and row.p_perm == p


def test_plate_effect_is_near_zero_for_both_labels_on_noise():
    """The reason for chance correction: on pure noise, with many small treatments and two big
    plates, neither label agrees beyond chance (a silhouette gives treatments < 0 here)."""
    from celldino.eval.batch_effect import plate_effect

    vals = []
    for seed in range(20):
        meta, _, _ = _screen(seed)
        X = np.random.default_rng(seed).normal(size=(len(meta), 12))
        m, _ = plate_effect(meta, X)
        vals.append((m["plate_agreement"], m["treatment_agreement"], m["plate_dominates"]))
    v = np.array(vals)
    assert abs(v[:, 0].mean()) < 0.05 and abs(v[:, 1].mean()) < 0.05
    assert v[:, 2].sum() <= 1  # the margin with the permutation test (p < 0.05) ~never fires


def test_run_folder_analyses_are_skipped_with_a_reason_outside_a_run(tmp_path):
    meta, _, X = _screen(4)
    sets = {"learned": _frame(meta, X), "no_plate": _frame(meta.drop(columns="Metadata_Plate"), X)}
    tidy, summary = _evaluate(
        tmp_path, sets, {"attention_iou": {}, "discriminative_patches": {}, "plate_effect": {}}
    )
    for name in ("attention_iou", "discriminative_patches"):
        assert "run_dir" in summary["skipped"][f"{name} on learned"]
    assert "columns.plate" in summary["skipped"]["plate_effect on no_plate"]
    ran = tidy[tidy.metric != "skipped"]  # the runner may list skipped analyses as rows
    assert set(ran.analysis) == {"plate_effect"} and set(ran.feature_set) == {"learned"}


@pytest.fixture
def run_folder(tmp_path):
    """A minimal `celldino run` folder: 8 cells of 2 MoAs in a crop store (16-px crops, DNA and
    AGP), their attention store (2 heads on a 2×2 patch grid) and a profile table. Each cell has
    one bright DNA patch and one bright AGP patch at random places; head 0 attends to the DNA
    patch, head 1 to the AGP patch. Patch tokens of MoA A point one way, those of B the other."""
    from celldino.io.attention_store import write_attention
    from celldino.io.cropstore import CropStore

    rng = np.random.default_rng(0)
    n, size, grid = 8, 16, 2
    crops = np.zeros((n, 2, size, size), np.float32)
    maps = np.full((n, 2, grid, grid), 0.01, np.float32)
    for i in range(n):
        for c in range(2):
            r, q = divmod(int(rng.integers(4)), 2)
            crops[i, c, r * 8 : r * 8 + 8, q * 8 : q * 8 + 8] = 1.0
            maps[i, c, r, q] = 0.97  # head c looks where channel c is bright
    moa = np.array(["A", "B"] * 4)
    cells = pd.DataFrame(
        {
            "Metadata_CellID": [f"cell{i}" for i in range(n)],
            "Metadata_MoA": moa,
            "Metadata_Plate": "P1",
            "Metadata_Well": [f"W{i}" for i in range(n)],
        }
    )
    store = CropStore(tmp_path / "prep", channels=["DNA", "AGP"], crop_size=size, dtype="float32")
    store.append("site0", crops, cells)
    store.finalize()
    direction = np.where(moa == "A", 1.0, -1.0)[:, None, None] * np.ones((n, 4, 6))
    patch = (direction + 0.1 * rng.normal(size=(n, 4, 6))).astype(np.float32)
    order = rng.permutation(n)  # the store holds the cells in another order than the crops
    write_attention(
        tmp_path / "embeddings" / "learned" / "attention.zarr",
        {"attn_maps": maps[order], "patch": patch[order]},
        cell_ids=[f"cell{i}" for i in order],
        channels=["DNA", "AGP"],
        grid=(grid, grid),
        num_registers=0,
    )
    (tmp_path / "profiles").mkdir()
    prof = cells.assign(Metadata_Compound=moa).drop(columns="Metadata_CellID")
    _frame(prof, rng.normal(size=(n, 4))).to_parquet(tmp_path / "profiles" / "learned.parquet")
    return tmp_path, maps[order]


def test_attention_analyses_read_the_run_folder_and_beat_their_nulls(run_folder, tmp_path):
    run, maps = run_folder  # maps in the store's order
    out = runner.evaluate(
        None,
        spec={
            "inputs": {"learned": str(run / "profiles" / "learned.parquet")},
            "analyses": {"attention_iou": {}, "discriminative_patches": {"k": 5}},
        },
        cfg=EvaluateConfig(out_dir=str(tmp_path / "eval"), null_size=50),
    )
    tidy = pd.read_parquet(out / "metrics.parquet")
    # head c's mask is exactly channel c's bright patch: IoU 1 on the diagonal, by construction
    table = pd.read_parquet(out / "tables" / "attention_iou__learned__head_channel_iou.parquet")
    iou = table.pivot(index="head", columns="channel", values="iou")
    assert iou.loc["head_0", "DNA"] == 1.0 and iou.loc["head_1", "AGP"] == 1.0
    assert _value(tidy, "learned", "attention_iou", "best_channel_iou") == 1.0
    # the null pairs each cell's attention with the previous stored cell's channels; every mask
    # is one patch, so IoU is 1 where the patches coincide, else 0 (channel c is bright where
    # head c of the same cell looks)
    where = maps.reshape(8, 2, 4).argmax(axis=2)  # (cells, heads) patch index
    M = (where[:, :, None] == np.roll(where, 1, axis=0)[:, None, :]).mean(axis=0)  # (h, c)
    null = _value(tidy, "learned", "attention_iou", "null_best_channel_iou")
    assert null == pytest.approx(M.max(axis=1).mean()) and null < 1.0
    # every patch token of A has only A tokens as neighbours; shuffled groups do not
    assert _value(tidy, "learned", "discriminative_patches", "fraction_discriminative") == 1.0
    assert _value(tidy, "learned", "discriminative_patches", "null_fraction_discriminative") < 0.5
    assert _value(tidy, "learned", "discriminative_patches", "n_tokens_a") == 16
