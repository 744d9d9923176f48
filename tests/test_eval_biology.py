"""Biology-level analyses against sklearn/scipy/hand-worked values and planted ground truth."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from skimage.filters import threshold_otsu
from sklearn.cross_decomposition import CCA
from sklearn.metrics import average_precision_score, mutual_info_score, roc_auc_score
from sklearn.neighbors import NearestNeighbors

from celldino.eval.factors import discretize, factor_mutual_information, mutual_information
from celldino.eval.heterogeneity import field_std, heterogeneity, precision_at_k
from celldino.eval.moa import average_precision, moa_prediction
from celldino.eval.multitask import masked_bce, multitask_activity, roc_auc
from celldino.eval.similarity import cca_matching, group_similarity, mantel_test
from celldino.eval.subcellular import (
    cls_attention_maps,
    discriminative_patches,
    head_channel_iou,
    iou,
    otsu_mask,
    patch_fraction,
)

# ---- MoA -------------------------------------------------------------------------------------


def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.random(200) < 0.3
        s = np.round(rng.random(200), 1)  # many ties
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))
    Y = (rng.random((50, 4)) < 0.3).astype(int)
    S = rng.random((50, 4))
    assert average_precision(Y, S) == pytest.approx(average_precision_score(Y, S, average="micro"))
    # hand-worked: scores 0.9(+) 0.8(-) 0.7(+): AP = 0.5*1 + 0.5*(2/3)
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 + 1 / 3)


def moa_screen(signal=6.0, seed=0):
    """4 MoAs × 3 compounds × 4 doses × 3 replicates, plus DMSO controls; one compound has 2 MoAs."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    d = 20
    for m in range(4):
        for c in range(3):
            moa = f"moa{m}" + ("|moa3" if (m == 0 and c == 0) else "")
            for dose in range(4):
                for r in range(3):
                    x = rng.normal(size=d)
                    x[m] += signal * (dose + 1) / 4
                    if m == 0 and c == 0:
                        x[3] += signal * (dose + 1) / 4
                    feats.append(x)
                    rows.append(
                        {
                            "Metadata_Compound": f"cpd{m}_{c}",
                            "Metadata_MoA": moa,
                            "Metadata_pert_type": "trt",
                            "Metadata_Plate": f"P{r}",
                        }
                    )
    for r in range(12):
        feats.append(rng.normal(size=d))
        rows.append(
            {
                "Metadata_Compound": "DMSO",
                "Metadata_MoA": "control",
                "Metadata_pert_type": "control",
                "Metadata_Plate": f"P{r % 3}",
            }
        )
    return pd.DataFrame(rows), np.asarray(feats, dtype=np.float32)


def test_moa_prediction_leave_compound_out_on_planted_moas():
    meta, X = moa_screen()
    per_moa, preds, summary = moa_prediction(meta, X, n_folds=None, seed=0)
    assert summary["n_controls_excluded"] == 12 and "DMSO" not in set(preds.compound)
    assert summary["n_folds"] == 12 and summary["n_moas"] == 4
    # leave-compound-out: each compound's rows sit in exactly one fold
    assert preds.groupby("compound").fold.nunique().max() == 1
    # the micro PR-AUC is sklearn's on the out-of-fold scores
    wide_y = preds.pivot(index="row", columns="moa", values="label").to_numpy()
    wide_s = preds.pivot(index="row", columns="moa", values="score").to_numpy()
    ref = average_precision_score(wide_y, wide_s, average="micro")
    assert summary["micro_pr_auc"] == pytest.approx(ref)
    assert summary["micro_pr_auc"] > 0.8 > summary["prevalence"] + 0.3
    noise = np.random.default_rng(1).normal(size=X.shape).astype(np.float32)
    _, _, null = moa_prediction(meta, noise, n_folds=None, seed=0)
    assert null["micro_pr_auc"] < 0.6


# ---- multi-task ------------------------------------------------------------------------------


def test_roc_auc_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.2
    s = np.round(rng.normal(size=300), 1)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(roc_auc(np.ones(5), np.arange(5)))


def test_masked_bce_equals_bce_on_measured_entries():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 3), (torch.rand(6, 3) > 0.5).float()
    mask = torch.rand(6, 3) > 0.4
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], targets[mask])
    assert masked_bce(logits, targets, mask).item() == pytest.approx(ref.item(), rel=1e-6)
    # a masked entry's target does not matter
    flipped = targets.clone()
    flipped[~mask] = 1 - flipped[~mask]
    assert masked_bce(logits, flipped, mask).item() == pytest.approx(ref.item(), rel=1e-6)


def test_multitask_finds_predictable_tasks_in_sparse_labels():
    rng = np.random.default_rng(0)
    n_cpd, reps, d = 100, 3, 6
    latent = rng.normal(size=(n_cpd, d))
    X = np.repeat(latent, reps, axis=0) + 0.3 * rng.normal(size=(n_cpd * reps, d))
    meta = pd.DataFrame({"Metadata_Compound": np.repeat([f"c{i}" for i in range(n_cpd)], reps)})
    tasks = {}
    for t in range(4):  # tasks 0, 1 follow the profile; 2, 3 are coin flips
        active = latent[:, t] > 0 if t < 2 else rng.random(n_cpd) < 0.5
        lab = np.repeat(active.astype(float), reps)
        lab[np.repeat(rng.random(n_cpd) < 0.3, reps)] = np.nan  # 30 % not measured
        tasks[f"assay_{t}"] = lab
        meta[f"assay_{t}"] = lab
    table, summary = multitask_activity(
        meta,
        X.astype(np.float32),
        tasks=list(tasks),
        epochs=40,
        batch_size=32,
        threshold=0.8,
        hidden=(64, 32),
        test_size=0.4,
    )
    auc = dict(zip(table.task, table.auc))
    assert auc["assay_0"] > 0.85 and auc["assay_1"] > 0.85
    assert auc["assay_2"] < 0.8 and auc["assay_3"] < 0.8
    assert summary["n_tasks_above"] == 2
    with pytest.raises(ValueError, match="assay_0"):
        bad = meta.copy()
        bad.loc[0, "assay_0"] = 2.0
        multitask_activity(bad, X, tasks=["assay_0"], epochs=1)


# ---- factors ---------------------------------------------------------------------------------


def test_mutual_information_matches_sklearn():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 500), rng.integers(0, 3, 500)
    b[:200] = a[:200] % 3
    assert mutual_information(a, b) == pytest.approx(mutual_info_score(a, b))
    x = rng.normal(size=1000)
    codes = discretize(x, n_bins=10)
    assert np.bincount(codes).tolist() == [100] * 10


def test_factors_find_planted_blocks():
    rng = np.random.default_rng(0)
    n = 600
    meta = pd.DataFrame(
        {
            "Metadata_MoA": rng.integers(0, 4, n).astype(str),
            "Metadata_Plate": rng.integers(0, 2, n).astype(str),
            "Metadata_Cycle": rng.integers(0, 2, n).astype(str),
        }
    )
    X = rng.normal(size=(n, 30))
    X[:, :10] += 2.0 * meta.Metadata_MoA.astype(int).to_numpy()[:, None]
    X[:, 10:15] += 3.0 * meta.Metadata_Plate.astype(int).to_numpy()[:, None]
    factors = ["Metadata_MoA", "Metadata_Plate", "Metadata_Cycle"]
    table, summary = factor_mutual_information(meta, X.astype(np.float32), factors=factors)
    top = table[table.is_top].set_index("feature").factor
    assert (top.iloc[:10] == "Metadata_MoA").all()
    assert (top.iloc[10:15] == "Metadata_Plate").all()
    frac = summary.set_index("factor").fraction_top
    assert frac["Metadata_MoA"] >= 10 / 30 and frac["Metadata_Plate"] >= 5 / 30
    # each MI value is sklearn's on the same discretisation
    j, f = 3, "Metadata_MoA"
    ref = mutual_info_score(discretize(X[:, j].astype(np.float32)), meta[f])
    got = table[(table.feature == "f0003") & (table.factor == f)].mi.iloc[0]
    assert got == pytest.approx(ref)


# ---- similarity ------------------------------------------------------------------------------


def test_group_similarity_orders_planted_clusters_together():
    rng = np.random.default_rng(0)
    centers = {"a": rng.normal(size=8), "b": rng.normal(size=8)}
    groups = ["a1", "b1", "a2", "b2", "a3", "b3"]
    rows = [(g, centers[g[0]] + 0.2 * rng.normal(size=8)) for g in groups for _ in range(5)]
    meta = pd.DataFrame({"Metadata_Compound": [g for g, _ in rows]})
    X = np.stack([x for _, x in rows]).astype(np.float32)
    sim = group_similarity(meta, X, group="Metadata_Compound")
    order = [g[0] for g in sim.index]
    assert order in (["a"] * 3 + ["b"] * 3, ["b"] * 3 + ["a"] * 3)
    # cosine of group means, checked for one pair
    ma = X[meta.Metadata_Compound == "a1"].mean(0)
    mb = X[meta.Metadata_Compound == "b2"].mean(0)
    cos = ma @ mb / np.linalg.norm(ma) / np.linalg.norm(mb)
    assert sim.loc["a1", "b2"] == pytest.approx(cos, abs=1e-5)


def test_mantel_statistic_and_exact_permutation_p_value():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(6, 2))
    A = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    B = A + 0.3 * np.abs(rng.normal(size=A.shape))
    B = (B + B.T) / 2
    np.fill_diagonal(B, 0)
    iu = np.triu_indices(6, 1)
    res = mantel_test(A, B, n_permutations=2000, seed=0)
    assert res["r"] == pytest.approx(pearsonr(A[iu], B[iu])[0])
    sp = mantel_test(A, B, method="spearman", n_permutations=10)
    assert sp["r"] == pytest.approx(spearmanr(A[iu], B[iu])[0])
    # exact p-value by enumerating all 720 permutations
    r0 = pearsonr(A[iu], B[iu])[0]
    perm_r = [pearsonr(A[iu], B[np.ix_(p, p)][iu])[0] for p in itertools.permutations(range(6))]
    exact = np.mean(np.asarray(perm_r) >= r0 - 1e-12)
    assert res["p_value"] == pytest.approx(exact, abs=0.02)
    unrelated = rng.random((6, 6))
    unrelated = (unrelated + unrelated.T) / 2
    assert mantel_test(A, unrelated, n_permutations=200)["p_value"] > 0.05


def test_cca_matching_on_shared_latent_and_against_sklearn_nn():
    rng = np.random.default_rng(0)
    n = 200
    z = rng.normal(size=(n, 3))
    A = z @ rng.normal(size=(3, 10)) + 0.1 * rng.normal(size=(n, 10))
    B = z @ rng.normal(size=(3, 8)) + 0.1 * rng.normal(size=(n, 8))
    meta = pd.DataFrame({"Metadata_Sample": np.arange(n)})
    train, test = np.arange(150), np.arange(150, 200)
    res = cca_matching(meta, A, B, n_components=3, train_idx=train, test_idx=test)
    assert res["accuracy_a_to_b"] > 0.8 and res["chance"] == pytest.approx(1 / 50)
    # independent: sklearn CCA + NearestNeighbors on the standardised canonical scores
    cca = CCA(n_components=3, max_iter=1000).fit(A[train], B[train])
    ta, tb = cca.transform(A[train], B[train])
    ua, ub = cca.transform(A[test], B[test])
    ua, ub = (ua - ta.mean(0)) / ta.std(0), (ub - tb.mean(0)) / tb.std(0)
    nn = NearestNeighbors(n_neighbors=1).fit(ub).kneighbors(ua, return_distance=False)[:, 0]
    assert res["accuracy_a_to_b"] == pytest.approx(np.mean(nn == np.arange(50)))
    shuffled = cca_matching(
        meta, A, rng.permutation(B), n_components=3, train_idx=train, test_idx=test
    )
    assert shuffled["accuracy_a_to_b"] < 0.2


# ---- heterogeneity ---------------------------------------------------------------------------


def hetero_screen(seed=0):
    """6 treatments × 2 wells × 2 sites × 30 cells; 'mixed' has bimodal cells, the rest unimodal."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    for t in ["mixed", "t1", "t2", "t3", "t4", "DMSO"]:
        shift = rng.normal(size=8)
        for w in range(2):
            for s in range(2):
                for _ in range(30):
                    x = shift + 0.5 * rng.normal(size=8)
                    if t == "mixed" and rng.random() < 0.5:
                        x = x + 4.0
                    feats.append(x)
                    rows.append(
                        {
                            "Metadata_Plate": "P1",
                            "Metadata_Well": f"{t}_{w}",
                            "Metadata_Site": s,
                            "Metadata_Compound": t,
                        }
                    )
    return pd.DataFrame(rows), np.asarray(feats, dtype=np.float32)


def test_field_std_equals_pandas_groupby_std():
    meta, X = hetero_screen()
    fields = field_std(meta, X, standardize=False, reduce="mean")
    ref = (
        pd.DataFrame(X)
        .groupby([meta.Metadata_Plate, meta.Metadata_Well, meta.Metadata_Site])
        .std(ddof=1)
        .mean(axis=1)
        .to_numpy()
    )
    assert np.allclose(np.sort(fields.score), np.sort(ref), atol=1e-5)


def test_heterogeneous_treatment_ranks_top():
    meta, X = hetero_screen()
    ranked, summary = heterogeneity(meta, X, annotated=["mixed"], exclude=["DMSO"], ks=(1, 3))
    assert ranked.treatment.iloc[0] == "mixed" and "DMSO" not in set(ranked.treatment)
    assert summary["precision_at_1"] == 1.0 and summary["precision_at_3"] == pytest.approx(1 / 3)
    assert precision_at_k(["a", "b", "c", "d"], {"b", "d"}, 4) == 0.5


# ---- subcellular -----------------------------------------------------------------------------


def test_iou_and_otsu_hand_worked():
    a = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b = np.zeros((4, 4), bool)
    b[1:3] = True  # 8 pixels, 4 shared
    assert iou(a, b) == pytest.approx(4 / 12)
    img = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)
    assert otsu_mask(img).tolist() == (img > threshold_otsu(img)).tolist()
    assert otsu_mask(img).sum() == 4 and not otsu_mask(np.ones((3, 3))).any()


def test_head_channel_iou_recovers_planted_head_channel_pairs():
    rng = np.random.default_rng(0)
    n, h = 4, 4  # 4x4 patches of 8 px → 32x32 images
    images = rng.random((n, 3, 32, 32)).astype(np.float32) * 0.1
    # two-level maps: with a handful of noisy values Otsu's 256-bin histogram may put the
    # threshold half a bin below the largest background value
    attn_maps = np.full((n, 2, h, h), 0.05, dtype=np.float32)
    for i in range(n):
        blob = rng.random((h, h)) < 0.4
        blob2 = ~blob
        images[i, 1] += np.kron(blob, np.ones((8, 8)))  # channel 1 bright where head 0 looks
        images[i, 2] += np.kron(blob2, np.ones((8, 8)))  # channel 2 bright where head 1 looks
        attn_maps[i, 0] += blob
        attn_maps[i, 1] += 2 * blob2
    M = head_channel_iou(attn_maps, images, channel_names=["DNA", "ER", "Mito"])
    assert M.loc["head_0", "ER"] == pytest.approx(1.0)
    assert M.loc["head_1", "Mito"] == pytest.approx(1.0)
    assert M.loc["head_0", "Mito"] < 0.2 and M.loc["head_1", "ER"] < 0.2
    # (B, heads, T, T) with a class token → maps
    attn = torch.zeros(1, 2, 1 + 16, 1 + 16)
    attn[0, 1, 0, 1 + 5] = 1.0
    maps = cls_attention_maps(attn, grid=(4, 4))
    assert maps.shape == (1, 2, 4, 4) and maps[0, 1, 1, 1] == 1.0


def test_discriminative_patches_are_nuclear_when_nuclei_differ():
    rng = np.random.default_rng(0)
    M, grid, D = 16, 4, 8
    N = grid * grid
    masks = np.zeros((M, 32, 32), bool)
    masks[:, 8:24, 8:24] = True  # the central 2x2 patches are nucleus
    nucleus = patch_fraction(masks, patch_size=8)
    assert nucleus.shape == (M, N) and nucleus.sum(1).tolist() == [4.0] * M
    groups = np.array(["treated"] * 8 + ["control"] * 8)
    P = rng.normal(size=(M, N, D)).astype(np.float32)
    nuc = nucleus >= 0.5
    P[:8][nuc[:8]] += 5.0 * np.eye(D)[0]  # treated nuclei look different
    table, summary = discriminative_patches(
        P, groups, group_a="treated", group_b="control", nucleus=nucleus, k=5, purity=0.8
    )
    assert summary["discriminative_nucleus"] == 32  # every treated nuclear patch
    assert summary["nucleus_cytoplasm_ratio"] > 5
    # purity of one token checked with sklearn (no same-image exclusion)
    t2, _ = discriminative_patches(
        P, groups, group_a="treated", group_b="control", k=5, exclude_same_image=False
    )
    flat = P.reshape(-1, D)
    is_a = np.repeat(groups == "treated", N)
    nn = NearestNeighbors(n_neighbors=6, metric="cosine").fit(flat)
    idx = nn.kneighbors(flat[: 8 * N], return_distance=False)[:, 1:]
    assert np.allclose(t2.score.to_numpy(), is_a[idx].mean(1))


def test_factor_mi_on_the_synthetic_screens_truth_table(tiny_screen):
    """The planted per-cell factors: those a MoA of the tiny screen moves carry MoA information,
    the untouched ones do not, and none of them follows the plate."""
    cells = pd.read_parquet(tiny_screen / "truth_cells.parquet")
    feats = cells.filter(like="factor_")
    moved = ["factor_int_ER", "factor_er_coarseness", "factor_int_DNA", "factor_nucleus_scale"]
    untouched = ["factor_int_Mito", "factor_mito_perinuclear", "factor_actin_cortical"]
    present = set(cells.Metadata_MoA)
    assert {"DNA damage", "ER stress"} <= present  # the MoAs moving `moved`
    assert not present & {"Mitochondrial uncoupler", "Actin disruptor"}  # nothing moves these
    table, _ = factor_mutual_information(
        cells, feats, factors=["Metadata_MoA", "Metadata_Plate"], n_bins=5
    )
    mi = table.pivot(index="feature", columns="factor", values="mi")
    assert (mi.loc[moved, "Metadata_MoA"] > mi.loc[moved, "Metadata_Plate"]).all()
    assert mi.loc[moved, "Metadata_MoA"].min() > 2 * mi.loc[untouched, "Metadata_MoA"].max()
