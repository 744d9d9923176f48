"""Learned artefact detection (issue 24): field embeddings, the two detectors, `celldino qc`.

Each piece is checked against an independent computation: the pooled field embedding against
tiles cut and embedded by hand, the outlier score against scikit-learn's NearestNeighbors, the
few-shot detector against scikit-learn's LogisticRegression, and the command's qc.parquet
columns against the detectors run on the stored field embeddings. Exclusion is checked on the
cells prepare writes afterwards.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from celldino.config import ModelConfig, PrepareConfig
from celldino.data.artefacts import FewShotDetector, knn_mean_distance, outlier_scores, robust_z
from celldino.data.prepare import prepare
from celldino.extract.fields import field_embeddings, field_scale, pool_tiles
from celldino.io.checkpoints import write_safetensors
from celldino.models import VisionTransformer, build_model

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


# ---- field embeddings ----------------------------------------------------------------------


def _tiny_vit(in_chans: int = 2, side: int = 16) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=side, patch_size=8, in_chans=in_chans, embed_dim=8, depth=1, num_heads=2
    ).eval()


def _by_hand(model, field: np.ndarray, scale: np.ndarray, tile: int, side: int) -> np.ndarray:
    """Tiles of a centred grid, embedded one at a time, [mean, max] of their class tokens."""
    x = field.astype(np.float32) / scale[:, None, None]
    _, H, W = x.shape
    ny, nx = H // tile, W // tile
    y0, x0 = (H - ny * tile) // 2, (W - nx * tile) // 2
    feats = []
    for i in range(ny):
        for j in range(nx):
            t = torch.from_numpy(
                np.ascontiguousarray(
                    x[:, y0 + i * tile : y0 + (i + 1) * tile, x0 + j * tile : x0 + (j + 1) * tile]
                )
            )[None]
            if tile != side:
                t = torch.nn.functional.interpolate(
                    t, size=(side, side), mode="bilinear", align_corners=False, antialias=True
                )
            with torch.no_grad():
                feats.append(model(t)["cls"][0].numpy())
    f = np.stack(feats)
    return np.concatenate([f.mean(0), f.max(0)])


def test_field_embeddings_pool_tiles_as_computed_by_hand():
    model = _tiny_vit()
    rng = np.random.default_rng(0)
    # 37 x 50 px: a 2 x 3 grid of 16 px tiles with a border of 5 / 2 px left over
    fields = [rng.integers(0, 4000, (2, 37, 50)).astype(np.uint16) for _ in range(3)]
    fields[1][1, 3:20, 4:30] = 4095  # a bright blob in one field
    scale = np.array([1000.0, 2000.0], np.float32)
    got = field_embeddings(fields, model, channels_in=["a", "b"], batch_size=4, scale=scale)
    want = np.stack([_by_hand(model, f, scale, 16, 16) for f in fields])
    assert got.shape == (3, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # tiles of another side are resized to the model's input
    got32 = field_embeddings(fields, model, channels_in=["a", "b"], tile=24, scale=scale)
    want32 = np.stack([_by_hand(model, f, scale, 24, 16) for f in fields])
    np.testing.assert_allclose(got32, want32, rtol=1e-4, atol=1e-5)
    # pool_tiles is [mean, max]
    f = rng.normal(size=(5, 3))
    np.testing.assert_allclose(pool_tiles(f), np.r_[f.mean(0), f.max(0)], rtol=1e-6)


def test_field_channels_matched_by_name_and_scale_is_per_plate_not_per_image():
    model = _tiny_vit()
    rng = np.random.default_rng(1)
    fields = [rng.integers(0, 4000, (2, 32, 32)).astype(np.uint16) for _ in range(5)]
    scale = field_scale(fields)
    # the plate scale: the median over fields of each field's 99.8th percentile
    want = np.median([np.percentile(f.reshape(2, -1), 99.8, axis=1) for f in fields], axis=0)
    np.testing.assert_allclose(scale, want, rtol=1e-5)
    base = field_embeddings(fields, model, channels_in=["a", "b"])
    swapped = [f[::-1] for f in fields]
    by_name = field_embeddings(swapped, model, channels_in=["b", "a"], model_channels=["a", "b"])
    np.testing.assert_allclose(by_name, base, rtol=1e-5, atol=1e-6)
    # a field twice as bright embeds differently (per-image scaling would make it identical)
    bright = field_embeddings(
        [fields[0] * 2, fields[0]], model, channels_in=["a", "b"], scale=scale
    )
    assert np.abs(bright[0] - bright[1]).max() > 1e-3


# ---- detectors -----------------------------------------------------------------------------


def test_outlier_scores_match_sklearn_nearest_neighbours():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6))
    groups = np.repeat(["P1", "P2"], 30)
    x[30:] = x[30:] * 3 + 5  # the second plate has another centre and spread
    planted = [3, 17, 44]
    x[planted] += 8.0
    k = 5
    got = outlier_scores(x, groups, k=k)
    want = np.zeros(60)
    for g in ("P1", "P2"):
        idx = np.flatnonzero(groups == g)
        xg = x[idx]
        med = np.median(xg, axis=0)
        mad = 1.4826 * np.median(np.abs(xg - med), axis=0)
        z = (xg - med) / mad
        dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
        d = dist[:, 1:].mean(axis=1)  # the first neighbour is the field itself
        np.testing.assert_allclose(knn_mean_distance(z, k, block=7), d, rtol=1e-9)  # in blocks
        dmed = np.median(d)
        want[idx] = (d - dmed) / (1.4826 * np.median(np.abs(d - dmed)))
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)
    # the planted outliers are the three highest, per plate scaled alike
    assert set(np.argsort(got)[-3:]) == set(planted)
    np.testing.assert_allclose(robust_z(np.array([1.0, 1.0, 1.0])), 0.0)


def test_fewshot_detector_is_balanced_logistic_regression_on_standardised_embeddings():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 10))
    ref[:, 0] *= 5
    shift = {"clean": 0.0, "blur": 3.0, "debris": -3.0}
    labels = np.array(["clean"] * 5 + ["blur"] * 5 + ["debris"] * 5)
    x = rng.normal(size=(15, 10))
    for i, lab in enumerate(labels):
        x[i, 1] += shift[lab]
    det = FewShotDetector().fit(x, labels, reference=ref, typical=False)
    mean, sd = ref.mean(0), ref.std(0)
    lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000).fit(
        (x - mean) / sd, labels
    )
    test = rng.normal(size=(30, 10))
    test[:10, 1] += 3
    p = lr.predict_proba((test - mean) / sd)
    clean = list(lr.classes_).index("clean")
    np.testing.assert_allclose(det.score(test), 1 - p[:, clean], rtol=1e-6, atol=1e-8)
    assert list(det.predict_type(test)) == list(lr.classes_[p.argmax(1)])
    # held-out blurred fields score above clean ones (5 labels per class suffice)
    assert det.score(test[:10]).mean() > det.score(test[10:]).mean()
    # by default the reference fields more typical than their plate's median join the clean
    # class: the same regression on the labels plus those rows
    groups = np.repeat(["P1", "P2"], 100)
    semi = FewShotDetector().fit(x, labels, reference=ref, groups=groups)
    typical = ref[outlier_scores(ref, groups) < 0]
    assert semi.n_typical_ == len(typical) == 100  # half of each plate
    lr2 = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000).fit(
        (np.vstack([x, typical]) - mean) / sd, np.r_[labels, ["clean"] * len(typical)]
    )
    p2 = lr2.predict_proba((test - mean) / sd)[:, list(lr2.classes_).index("clean")]
    np.testing.assert_allclose(semi.score(test), 1 - p2, rtol=1e-6, atol=1e-8)


def test_fewshot_components_are_whitened_principal_components_beside_passthrough_columns():
    """components=k, passthrough=p: the standardised embedding part reduced to its k leading
    principal components over the reference (unit variance each, as sklearn's PCA whitens
    them, up to its n-1), the last p columns standardised only, then the same regression."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    n, f, p, k = 300, 30, 3, 4
    ref = rng.normal(size=(n, f + p)) @ np.diag(np.r_[np.linspace(5, 1, f), np.ones(p)])
    labels = np.array(["clean"] * 6 + ["dim"] * 6)
    x = ref[:12].copy()
    x[6:, -1] += 4.0  # the artefact is in a passthrough (classical) column only
    det = FewShotDetector(components=k, passthrough=p).fit(x, labels, reference=ref, typical=False)
    mean, sd = ref.mean(0), ref.std(0)
    zr, zx = (ref - mean) / sd, (x - mean) / sd
    pca = PCA(n_components=k).fit(zr[:, :f])
    whiten = np.sqrt(pca.explained_variance_ * (n - 1) / n)

    def feats(z):
        return np.hstack([pca.transform(z[:, :f]) / whiten, z[:, f:]])

    lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000).fit(feats(zx), labels)
    test = rng.normal(size=(40, f + p)) * sd + mean
    test[:20, -1] += 4.0
    want = 1 - lr.predict_proba(feats((test - mean) / sd))[:, list(lr.classes_).index("clean")]
    np.testing.assert_allclose(det.score(test), want, rtol=1e-6, atol=1e-8)
    assert det.score(test[:20]).mean() > det.score(test[20:]).mean()
    # no components: the full standardised matrix, as before
    assert FewShotDetector().fit(x, labels, reference=ref, typical=False)._z(x).shape == x.shape


def test_bright_objects_measure_the_largest_connected_bright_region():
    from celldino.data.artefacts import bright_extent, bright_objects, classical_features

    img = np.full((3, 64, 64), 100.0)
    img[0, 10:30, 20:40] += 50.0  # a 20 x 20 clump: 400 of 4096 pixels
    for y in range(4, 60, 8):  # channel 1: 3 x 3 specks, 8 px apart (no two touch)
        for x in range(4, 60, 8):
            img[1, y : y + 3, x : x + 3] += 50.0
    got = bright_objects(img)
    # the sigma-1 blur keeps an edge pixel above half-way (~Phi(0.5) = 0.69 of the step) but
    # not a corner one (~0.69^2 = 0.48): the square less its 4 corners
    assert got[0] == 396 / 4096
    assert 0 < got[1] < 30 / 4096  # one speck, not their union
    assert got[2] == 0.0  # a flat channel has no bright object
    ext = bright_extent(img)  # the longest bounding-box side over the shorter field side
    assert ext[0] == 20 / 64 and 0 < ext[1] <= 5 / 64 and ext[2] == 0.0
    # as detector columns: log (+1e-4) less the group's median, and their max over channels
    b = np.array([[0.01, 0.02], [0.04, 0.02], [0.01, 0.08]])
    m = {c: np.zeros(3) for c in ("QC_Blur", "QC_Saturation", "QC_LargestObject")}
    m["QC_Foreground"] = np.full(3, 0.1)
    x = classical_features(m, np.ones((3, 2)), np.array(["a", "a", "a"]), bright=b, extent=b)
    lb = np.log(b + 1e-4)
    lb -= np.median(lb, axis=0)
    le = np.log(b + 1e-3)
    le -= np.median(le, axis=0)
    np.testing.assert_allclose(x[:, -6:-4], lb)
    np.testing.assert_allclose(x[:, -4], lb.max(axis=1))
    np.testing.assert_allclose(x[:, -3:-1], le)
    np.testing.assert_allclose(x[:, -1], le.max(axis=1))
    assert x.shape == (3, 4 + 2 + 3 + 3)


# ---- celldino qc on a prepared screen ------------------------------------------------------


@pytest.fixture(scope="module")
def made(tiny_screen, tmp_path_factory):
    """(load-data table, prep folder, a tiny 5-channel checkpoint with its channel names)."""
    root = tmp_path_factory.mktemp("learned_qc")
    ld = tiny_screen / "load_data.csv"
    prep = prepare(
        PrepareConfig(load_data=str(ld), out_dir=str(root / "prep"), features=False, crop_size=32)
    )
    mcfg = ModelConfig(
        arch="vit_tiny", patch_size=8, in_chans=5, img_size=32, depth=1, drop_path_rate=0.0
    )
    torch.manual_seed(0)
    net = build_model(mcfg).eval()
    sd = {f"teacher.backbone.{k}": v for k, v in net.state_dict().items()}
    ckpt = root / "model.safetensors"
    write_safetensors(ckpt, sd, {"model_config": dataclasses.asdict(mcfg)}, channels=CHANNELS)
    return ld, prep, ckpt


def _copy(prep: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(prep, dest, ignore=shutil.ignore_patterns(".celldino.lock")))


def _labels(prep: Path, path: Path) -> Path:
    """2 'artefact' labels (the planted blur and debris images) and 6 'clean' ones."""
    images = pd.read_parquet(prep / "images.parquet")
    bad = images.loc[images["Metadata_QC_Truth"] != "ok", "Metadata_ImageKey"].tolist()
    ok = images.loc[images["Metadata_QC_Truth"] == "ok", "Metadata_ImageKey"].tolist()[:6]
    pd.DataFrame(
        {
            "Metadata_ImageKey": bad + ok,
            "Metadata_QC_Label": ["artefact"] * len(bad) + ["clean"] * len(ok),
        }
    ).to_csv(path, index=False)
    return path


def test_qc_command_writes_the_detectors_scores_into_qc_parquet(made, tmp_path, run_cli):
    _, prep0, ckpt = made
    prep = _copy(prep0, tmp_path / "prep")
    labels = _labels(prep, tmp_path / "labels.csv")
    before = pd.read_parquet(prep / "qc.parquet")
    rc, text = run_cli(
        "qc",
        f"qc.prep={prep}",
        f"qc.checkpoint={ckpt}",
        "qc.detector=both",
        f"qc.labels={labels}",
        "qc.outlier_z=3",
        "qc.classical_features=false",  # the embeddings alone (the other test has both)
        "-q",
    )
    assert rc == 0, text
    qc = pd.read_parquet(prep / "qc.parquet")
    emb = pd.read_parquet(prep / "field_embeddings.parquet")
    assert len(emb) == len(qc) == 32
    feats = [c for c in emb.columns if c.startswith("femb_")]
    assert len(feats) == 2 * 192  # [mean, max] of vit_tiny's class tokens
    # the scores are the detectors' on the stored embeddings, row for row by image key
    e = emb.set_index("Metadata_ImageKey").loc[qc["Metadata_ImageKey"]]
    X = e[feats].to_numpy(float)
    want = outlier_scores(X, e["Metadata_Plate"].to_numpy(), k=10)
    np.testing.assert_allclose(qc["QC_Learned_Outlier"], want, rtol=1e-6)
    lab = pd.read_csv(labels).set_index("Metadata_ImageKey")["Metadata_QC_Label"]
    det = FewShotDetector().fit(
        e.loc[lab.index, feats].to_numpy(float),
        lab.to_numpy(),
        reference=X,
        groups=e["Metadata_Plate"].to_numpy(),
    )
    np.testing.assert_allclose(qc["QC_Learned_FewShot"], det.score(X), rtol=1e-6)
    assert list(qc["QC_Learned_Type"]) == list(det.predict_type(X))
    # flags by detector, beside the classical ones, which are unchanged
    assert (qc["QC_Flag_learned_outlier"] == (qc["QC_Learned_Outlier"] > 3)).all()
    assert (qc["QC_Flag_learned_fewshot"] == (qc["QC_Learned_FewShot"] > 0.5)).all()
    for c in ("QC_Blur", "QC_Flag_blur", "QC_Flag_debris"):
        assert (qc[c] == before[c]).all()
    for flags, o, f in zip(
        qc["QC_Flags"], qc["QC_Flag_learned_outlier"], qc["QC_Flag_learned_fewshot"]
    ):
        assert ("learned_outlier" in flags.split(";")) == o
        assert ("learned_fewshot" in flags.split(";")) == f
    # not excluding (the default): QC_Pass is classical QC's alone
    assert (qc["QC_Pass"] == before["QC_Pass"]).all() and not qc["QC_Learned_Excluded"].any()
    # a rerun gives the same table (the embeddings are reused)
    rc, _ = run_cli(
        "qc", f"qc.prep={prep}", f"qc.checkpoint={ckpt}", "qc.detector=both",
        f"qc.labels={labels}", "qc.outlier_z=3", "qc.classical_features=false", "-q",
    )  # fmt: skip
    assert rc == 0
    pd.testing.assert_frame_equal(pd.read_parquet(prep / "qc.parquet"), qc)


def test_excluded_images_lose_their_cells_after_prepare(made, tmp_path, run_cli):
    ld, prep0, ckpt = made
    prep = _copy(prep0, tmp_path / "prep")
    cells0 = pd.read_parquet(prep / "cells.parquet")
    run = ["qc", f"qc.prep={prep}", f"qc.checkpoint={ckpt}", "-q"]
    rc, _ = run_cli(*run)  # scores only: find a threshold that flags two cropped images
    assert rc == 0
    qc = pd.read_parquet(prep / "qc.parquet")
    cropped = qc[qc["Metadata_ImageKey"].isin(set(cells0["Metadata_ImageKey"]))]
    top = cropped.sort_values("QC_Learned_Outlier")["QC_Learned_Outlier"].to_numpy()
    z = float((top[-2] + top[-3]) / 2)
    flagged = set(cropped.loc[cropped["QC_Learned_Outlier"] > z, "Metadata_ImageKey"])
    assert len(flagged) == 2
    rc, text = run_cli(*run, f"qc.outlier_z={z}", "qc.exclude=true")
    assert rc == 0, text
    # the store is cut back: nothing reads a stale cells table until prepare has run
    assert not (prep / "cells.parquet").exists()
    rc, text = run_cli(
        "prepare",
        f"prepare.load_data={ld}",
        f"prepare.out_dir={prep}",
        "prepare.features=false",
        "prepare.crop_size=32",
        "-q",
    )
    assert rc == 0, text
    cells = pd.read_parquet(prep / "cells.parquet")
    kept = set(cells0["Metadata_ImageKey"]) - flagged
    assert set(cells["Metadata_ImageKey"]) == kept
    # every other image's cells are the same cells as before
    key = ["Metadata_ImageKey", "Metadata_ObjectNumber"]
    a = cells0[cells0["Metadata_ImageKey"].isin(kept)].sort_values(key)[key]
    b = cells.sort_values(key)[key]
    assert a.reset_index(drop=True).equals(b.reset_index(drop=True))
    qc = pd.read_parquet(prep / "qc.parquet")
    learned = set(qc.loc[qc["QC_Learned_Outlier"] > z, "Metadata_ImageKey"])  # cropped or not
    assert set(qc.loc[qc["QC_Learned_Excluded"], "Metadata_ImageKey"]) == learned >= flagged
    assert not qc.loc[qc["Metadata_ImageKey"].isin(flagged), "QC_Pass"].any()
    # a rerun changes nothing; turning exclusion off brings the images back through prepare
    rc, _ = run_cli(*run, f"qc.outlier_z={z}", "qc.exclude=true")
    assert rc == 0 and (prep / "cells.parquet").exists()
    # as a run killed after writing the tables without the exclusion would leave them: the
    # next run still sees, from the store itself, that excluded images must come back
    images = pd.read_parquet(prep / "images.parquet")
    images["QC_Learned_Excluded"] = False
    images.to_parquet(prep / "images.parquet", index=False)
    rc, _ = run_cli(*run, f"qc.outlier_z={z}")
    assert rc == 0 and not (prep / "cells.parquet").exists()
    rc, _ = run_cli(
        "prepare", f"prepare.load_data={ld}", f"prepare.out_dir={prep}",
        "prepare.features=false", "prepare.crop_size=32", "-q",
    )  # fmt: skip
    assert rc == 0
    back = pd.read_parquet(prep / "cells.parquet")
    assert set(back["Metadata_ImageKey"]) == set(cells0["Metadata_ImageKey"])
    assert json.loads((prep / "ledger.json").read_text())["done"]


def test_report_shows_the_learned_flags_with_scores_and_thumbnails(made, tmp_path, run_cli):
    from celldino.report.sections import section_data

    _, prep0, ckpt = made
    prep = _copy(prep0, tmp_path / "run" / "prep")  # the run layout's prep folder
    rc, _ = run_cli("qc", f"qc.prep={prep}", f"qc.checkpoint={ckpt}", "qc.outlier_z=2", "-q")
    assert rc == 0
    qc = pd.read_parquet(prep / "qc.parquet")
    flagged = qc.loc[qc["QC_Flag_learned_outlier"]].sort_values("QC_Learned_Outlier")
    assert len(flagged) >= 1
    html = section_data(tmp_path / "run").html()
    assert f"Fields flagged by learned QC ({len(flagged)} of 32 images" in html
    top = flagged.iloc[-1]
    # the table shows the score to 3 decimals (a 3-significant-digit prefix matched only by luck)
    assert f"<tr><th>{top['Metadata_ImageKey']}</th>" in html
    assert f"{top['QC_Learned_Outlier']:.3f}" in html
    assert "learned_outlier" in html and "highest-scoring fields flagged by learned QC" in html
    assert "learned flags are not: qc.exclude=false" in html
    assert html.count("data:image/png;base64") >= 2  # the crop montage and the thumbnails


def test_classical_features_join_the_embeddings_by_image_key(made, tmp_path, run_cli):
    from celldino.data.artefacts import bright_extent, bright_objects, channel_noise

    _, prep0, ckpt = made
    prep = _copy(prep0, tmp_path / "prep")
    rc, text = run_cli(
        "qc", f"qc.prep={prep}", f"qc.checkpoint={ckpt}", "qc.classical_features=true", "-q"
    )
    assert rc == 0, text
    qc = pd.read_parquet(prep / "qc.parquet")
    emb = pd.read_parquet(prep / "field_embeddings.parquet").set_index("Metadata_ImageKey")
    e = emb.loc[qc["Metadata_ImageKey"]]
    # the stored noise is each channel's robust neighbour-difference sigma, by hand
    images = pd.read_parquet(prep / "images.parquet").set_index("Metadata_ImageKey")
    key = qc["Metadata_ImageKey"].iloc[3]
    from celldino.io.images import read_image

    img = np.stack(
        [read_image(Path(images.at[key, f"PathName_{c}"]) / images.at[key, f"FileName_{c}"])
         for c in CHANNELS]
    ).astype(float)  # fmt: skip
    d = np.diff(img, axis=2).reshape(len(CHANNELS), -1)
    mad = np.median(np.abs(d - np.median(d, axis=1, keepdims=True)), axis=1)
    want_noise = 1.4826 * mad / np.sqrt(2)
    got_noise = e.loc[key, [f"noise_{c}" for c in CHANNELS]].to_numpy(float)
    np.testing.assert_allclose(got_noise, want_noise, rtol=1e-9)
    np.testing.assert_allclose(channel_noise(img), want_noise, rtol=1e-9)
    # the stored bright objects are bright_objects' of the field
    for lv in (50, 80):
        got_bright = e.loc[key, [f"bright{lv}_{c}" for c in CHANNELS]].to_numpy(float)
        np.testing.assert_allclose(got_bright, bright_objects(img, lv / 100), rtol=1e-9)
    got_ext = e.loc[key, [f"extent50_{c}" for c in CHANNELS]].to_numpy(float)
    np.testing.assert_allclose(got_ext, bright_extent(img), rtol=1e-9)
    # the detector saw [embedding, blur, saturation, log foreground, largest object, log noise
    # less its plate median, log bright objects less their plate median, their max]
    noise = np.log(e[[f"noise_{c}" for c in CHANNELS]].to_numpy(float) + 1e-6)
    b50 = np.log(e[[f"bright50_{c}" for c in CHANNELS]].to_numpy(float) + 1e-4)
    b80 = np.log(e[[f"bright80_{c}" for c in CHANNELS]].to_numpy(float) + 1e-4)
    ext = np.log(e[[f"extent50_{c}" for c in CHANNELS]].to_numpy(float) + 1e-3)
    plates = e["Metadata_Plate"].to_numpy()
    for p in set(plates):
        for v in (noise, b50, b80, ext):
            v[plates == p] -= np.median(v[plates == p], axis=0)
    X = np.hstack(
        [
            e.filter(like="femb_").to_numpy(float),
            np.nan_to_num(qc[["QC_Blur", "QC_Saturation"]].to_numpy(float)),
            np.log(qc[["QC_Foreground"]].to_numpy(float) + 1e-3),
            qc[["QC_LargestObject"]].to_numpy(float),
            noise,
            b50,
            b50.max(axis=1, keepdims=True),
            b80,
            b80.max(axis=1, keepdims=True),
            ext,
            ext.max(axis=1, keepdims=True),
        ]
    )
    np.testing.assert_allclose(qc["QC_Learned_Outlier"], outlier_scores(X, plates), rtol=1e-6)


def test_prep_fields_are_embedded_with_one_scale_per_plate(made):
    from celldino.extract.fields import embed_prep_fields, load_qc_model
    from celldino.io.images import read_image

    _, prep, ckpt = made
    model, known, _ = load_qc_model(ckpt, 5)
    got = embed_prep_fields(prep, ckpt, write=False)
    images = pd.read_parquet(prep / "images.parquet")
    assert list(got["Metadata_ImageKey"]) == list(images["Metadata_ImageKey"])
    for plate in ("P01", "P02"):
        rows = images[images["Metadata_Plate"] == plate]
        fields = [
            np.stack([read_image(Path(r[f"PathName_{c}"]) / r[f"FileName_{c}"]) for c in CHANNELS])
            for _, r in rows.iterrows()
        ]
        want = field_embeddings(fields, model, channels_in=CHANNELS, model_channels=known)
        mine = got.loc[rows.index].filter(like="femb_").to_numpy()
        np.testing.assert_allclose(mine, want, rtol=1e-5, atol=1e-6)


def test_channel_adaptive_and_channelwise_models_get_the_fields_channels_by_name(tmp_path):
    from celldino.extract.fields import load_qc_model
    from celldino.models import ChannelwiseModel

    rng = np.random.default_rng(2)
    fields = [rng.integers(0, 4000, (2, 32, 32)).astype(np.uint16) for _ in range(3)]
    scale = np.array([1500.0, 900.0], np.float32)
    # a channel-adaptive model knowing A, B, C; the fields hold C then A
    torch.manual_seed(0)
    ada = VisionTransformer(
        img_size=16, patch_size=8, in_chans=3, embed_dim=8, depth=1, num_heads=2,
        channel_adaptive=True,
    ).eval()  # fmt: skip
    got = field_embeddings(
        fields, ada, channels_in=["C", "A"], scale=scale, model_channels=["A", "B", "C"]
    )
    ids = torch.tensor([0, 2])  # A, C in the model's table

    class Fed(torch.nn.Module):  # the model fed A then C with their ids, by hand
        def forward(self, x):
            return ada(x, channel_ids=ids)

    swapped = [f[::-1] for f in fields]  # A, C
    want = np.stack([_by_hand(Fed(), f, scale[::-1], 16, 16) for f in swapped])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # a foreign RGB model without channel names runs on each channel alone
    rcfg = ModelConfig(
        arch="vit_tiny", patch_size=8, in_chans=3, img_size=16, depth=1, drop_path_rate=0.0
    )
    torch.manual_seed(0)
    rgb = build_model(rcfg).eval()
    ck = tmp_path / "rgb.safetensors"
    sd = {f"teacher.backbone.{k}": v for k, v in rgb.state_dict().items()}
    write_safetensors(ck, sd, {"model_config": dataclasses.asdict(rcfg)})
    model, known, _ = load_qc_model(ck, 2)
    assert isinstance(model, ChannelwiseModel) and known is None
    got = field_embeddings(fields, model, channels_in=["a", "b"], scale=scale)
    want = np.stack(
        [_by_hand(ChannelwiseModel(model.backbone, 2), f, scale, 16, 16) for f in fields]
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert got.shape == (3, 2 * 2 * model.backbone.embed_dim)
