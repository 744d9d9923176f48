"""Plots: each returns a figure, saves by suffix, and draws what the data say."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.decomposition import PCA

from celldino import pl
from celldino.io.trainrun import read_metrics
from celldino.pl.attention import patch_pca_rgb
from celldino.pl.heatmap import hierarchical_order
from celldino.report import best_per_row, html_table


def test_composite_uses_documented_colours():
    img = np.zeros((2, 8, 8), np.float32)
    img[0, :4] = 1.0  # DNA on the top half
    img[1, 4:] = 1.0  # AGP on the bottom half
    rgb = pl.composite(img, ["DNA", "AGP"])
    assert rgb.shape == (8, 8, 3)
    np.testing.assert_allclose(rgb[0, 0], pl.CHANNEL_COLOURS["DNA"], atol=1e-6)
    np.testing.assert_allclose(rgb[7, 7], pl.CHANNEL_COLOURS["AGP"], atol=1e-6)
    with pytest.raises(ValueError, match="C = 3 channels"):
        pl.composite(img, ["DNA", "AGP", "ER"])


def test_hierarchical_order_makes_planted_blocks_contiguous():
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1, 2], 5)
    centres = rng.normal(size=(3, 16))
    X = centres[groups] + 0.05 * rng.normal(size=(15, 16))
    perm = rng.permutation(15)
    X, groups = X[perm], groups[perm]
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    order = hierarchical_order(unit @ unit.T)
    assert sorted(order) == list(range(15))
    runs = np.flatnonzero(np.diff(groups[order])) + 1
    assert len(runs) == 2  # three contiguous blocks
    # Same grouping as scipy's own average-linkage clustering on cosine distance.
    ref = fcluster(linkage(X, "average", metric="cosine"), 3, "maxclust")
    assert len(set(zip(ref, groups))) == 3


def test_similarity_heatmap_and_confusion_save(tmp_path):
    s = np.eye(4)
    fig = pl.similarity_heatmap(
        s, list("abcd"), groups=["x", "x", "y", "y"], save=tmp_path / "h.png"
    )
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert len(fig.axes) >= 2
    fig = pl.confusion_matrix(["a", "a", "b"], ["a", "b", "b"], save=tmp_path / "c.svg")
    assert "<svg" in (tmp_path / "c.svg").read_text()[:500]
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["0.00", "0.50", "0.50", "1.00"]  # row-normalised by hand
    with pytest.raises(ValueError, match="use .png, .svg or .pdf"):
        pl.confusion_matrix(["a", "b"], ["a", "b"], save=tmp_path / "c.gif")


def test_training_curves_from_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": s, "epoch": s / 10, "loss": 5 - s / 10, "lr": 1e-3, "teacher_entropy": 2.0}
        for s in range(1, 11)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fig = pl.training_curves(path, out_dim=64)
    assert [a.get_title() for a in fig.axes] == [
        "DINO loss",
        "learning rate",
        "per-sample teacher entropy (sharpening)",
    ]
    loss_line = fig.axes[0].lines[0]
    np.testing.assert_allclose(loss_line.get_ydata(), [r["loss"] for r in rows])
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match="line 11"):
        read_metrics(path)


def test_training_curves_and_probe_curve_take_their_own_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    probe = lambda s, k, lin: {  # noqa: E731
        "step": s,
        "epoch": s / 10,
        "monitor_knn20_f1": k,
        "monitor_linear_f1": lin,
    }
    rows = [probe(0, 0.3, 0.35)]
    for s in range(1, 21):
        rows.append({"step": s, "epoch": s / 10, "loss": 5 - s / 10, "prototypes_used": s})
        if s % 10 == 0:
            rows.append(probe(s, 0.3 + s / 100, 0.4 + s / 100))
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fig = pl.training_curves(path, out_dim=64)
    assert [a.get_title() for a in fig.axes] == ["DINO loss", "prototypes used (teacher argmax)"]
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [5 - s / 10 for s in range(1, 21)])
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), range(1, 21))
    fig = pl.probe_curve(path, label="Metadata_MoA")
    knn, init = fig.axes[0].lines[0], fig.axes[0].lines[1]
    assert list(knn.get_xdata()) == [0, 10, 20]
    np.testing.assert_allclose(knn.get_ydata(), [0.3, 0.4, 0.5])
    np.testing.assert_allclose(init.get_ydata(), [0.3, 0.3])  # the random-init line
    path.write_text("\n".join(json.dumps(r) for r in rows if "loss" in r) + "\n")
    with pytest.raises(ValueError, match="monitor_label"):
        pl.probe_curve(path)


def test_montage_layout():
    crops = np.random.default_rng(0).integers(0, 4000, (10, 3, 16, 16)).astype(np.uint16)
    groups = ["a"] * 4 + ["b"] * 6
    fig = pl.montage(crops, groups, ["DNA", "ER", "Mito"], per_group=3)
    assert len(fig.axes) == 6
    assert [fig.axes[0].get_ylabel(), fig.axes[3].get_ylabel()] == ["a", "b"]
    fig = pl.montage(crops, groups, ["DNA", "ER", "Mito"], per_group=2, mode="channels")
    assert len(fig.axes) == 2 * 2 * 3


def test_patch_pca_matches_sklearn():
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(3, 16, 8)) @ np.diag([5, 3, 2, 1, 0.5, 0.2, 0.1, 0.1])
    rgb = patch_pca_rgb(tokens)
    assert rgb.shape == (3, 4, 4, 3)
    ref = PCA(3).fit_transform(tokens.reshape(-1, 8))
    for k in range(3):
        r = np.corrcoef(rgb[..., k].ravel(), ref[:, k])[0, 1]
        assert abs(r) > 0.97  # same components up to sign and the percentile stretch


def test_attention_and_patch_match_figures():
    rng = np.random.default_rng(2)
    img = rng.random((2, 32, 32))
    att = rng.random((3, 16))
    fig = pl.attention_maps(img, att / att.sum(1, keepdims=True), ["DNA", "ER"])
    assert len(fig.axes) == 4
    full = rng.random((3, 17, 17))  # (heads, T, T) with a class token
    assert len(pl.attention_maps(img, full, ["DNA", "ER"]).axes) == 4
    fig = pl.patch_match(
        rng.random((2, 2, 32, 32)), rng.normal(size=(2, 16, 8)), ["DNA", "ER"], query=(0, 5)
    )
    sim_img = fig.axes[2].images[0].get_array()  # similarity map of the query's own cell
    assert sim_img.reshape(-1)[5] == pytest.approx(1.0)


def test_umap_fit_on_group_means_separates_treatments():
    rng = np.random.default_rng(0)
    n_fields, per = 12, 8
    field_group = np.repeat(np.arange(n_fields), per)
    treatment = field_group % 3
    X = rng.normal(size=(3, 10))[treatment] * 4 + rng.normal(size=(n_fields * per, 10))
    obs = pd.DataFrame({"Metadata_Site": field_group, "Metadata_MoA": [f"m{t}" for t in treatment]})
    xy = pl.embedding.umap_coords(X, obs, fit_on=["Metadata_Site"], seed=0)
    assert xy.shape == (len(X), 2)
    centroids = np.stack([xy[treatment == t].mean(0) for t in range(3)])
    nearest = np.argmin(((xy[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == treatment).mean() > 0.9
    fig = pl.umap(X, obs, color="Metadata_MoA", coords=xy)
    assert sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts()) == ["m0", "m1", "m2"]
    with pytest.raises(ValueError, match="colour column 'nope'"):
        pl.umap(X, obs, color="nope", coords=xy)


def test_report_table_marks_best_and_escapes():
    wide = pd.DataFrame(
        {"learned": [0.8, 0.01], "engineered": [0.6, 0.2]},
        index=pd.Index(["NSC", "p_value"], name="metric"),
    )
    wide.loc["nsc: NSC_n"] = [24, 20]
    wide.loc["tied"] = [0.5, 0.5]
    best = best_per_row(wide)
    assert best == {
        "NSC": "learned",
        "p_value": "learned",
    }  # p-values: lower is better; no counts, no ties
    wide.loc["<b>x</b>"] = [0.1, 0.2]
    out = html_table(wide, best=best)
    assert '<td class="best">0.800 ★</td>' in out
    # a shared best value marks every column that holds it
    three = pd.DataFrame({"a": [1.0], "b": [1.0], "c": [0.5]}, index=["nsc: NSC"])
    assert best_per_row(three) == {"nsc: NSC": ["a", "b"]}
    assert html_table(three, best=best_per_row(three)).count('class="best"') == 2
    assert "&lt;b&gt;x&lt;/b&gt;" in out and "<b>x</b>" not in out


def test_umap_takes_an_anndata_as_well_as_x_and_obs():
    import anndata as ad

    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 6)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "Metadata_Site": np.repeat(np.arange(8), 5),
            "Metadata_MoA": [f"m{i % 2}" for i in range(40)],
        }
    )
    adata = ad.AnnData(X=X, obs=obs.set_axis(obs.index.astype(str)))
    fit_on = ["Metadata_Site"]
    np.testing.assert_array_equal(
        pl.embedding.umap_coords(adata, fit_on=fit_on, seed=0),
        pl.embedding.umap_coords(X, obs, fit_on=fit_on, seed=0),
    )
    a = pl.umap(adata, color="Metadata_MoA", seed=0)
    b = pl.umap(X, obs, color="Metadata_MoA", seed=0)
    for ca, cb in zip(a.axes[0].collections, b.axes[0].collections, strict=True):
        np.testing.assert_array_equal(ca.get_offsets(), cb.get_offsets())
    assert [t.get_text() for t in a.axes[0].get_legend().get_texts()] == ["m0", "m1"]
    with pytest.raises(TypeError, match="AnnData"):
        pl.umap(X, color="Metadata_MoA")


def test_head_channel_heatmap_draws_the_matrix_in_its_order():
    from celldino.pl import head_channel_heatmap

    iou = pd.DataFrame(
        [[0.1, 0.7], [0.5, np.nan], [0.0, 0.3]],
        index=["head_0", "head_1", "head_2"],
        columns=["DNA", "AGP"],
    )
    fig = head_channel_heatmap(iou)
    ax = fig.axes[0]
    shown = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    np.testing.assert_array_equal(shown, iou.to_numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["DNA", "AGP"]
    assert [t.get_text() for t in ax.texts] == ["0.10", "0.70", "0.50", "0.00", "0.30"]
