"""What a lab does with real screens just works (issue 22 §6): a one-plate screen without
compound, MoA or control columns goes through `celldino run` to a report that lists every
analysis it could not compute and why; one plate cannot be held out, so the held-out-plate
analyses are skipped, not failed."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from celldino.config import EvaluateConfig
from celldino.eval.runner import evaluate
from celldino.eval.spec import NotEvaluable
from celldino.eval.splits import group_folds, group_split

# the tiny pipeline of tests/test_pipeline.py, without the engineered features and attention
TINY = [
    "prepare.crop_size=32",
    "prepare.nuclei_min_area=30",
    "prepare.cell_expand=8",
    "prepare.features=false",
    "model.depth=2",
    "model.patch_size=8",
    "model.img_size=32",
    "model.out_dim=256",
    "model.drop_path_rate=0.0",
    "augment.global_crop_size=32",
    "augment.local_crop_size=16",
    "augment.n_local_crops=2",
    "train.epochs=1",
    "train.batch_size=32",
    "extract.batch_size=64",
    "extract.attention_sample=0",
    "evaluate.null_size=50",
    "run.baselines=random_init",
]
LABELS = ["Metadata_Compound", "Metadata_Dose", "Metadata_MoA", "Metadata_pert_type"]


@pytest.mark.slow
def test_an_unlabelled_one_plate_screen_runs_to_a_report_listing_what_was_skipped(
    tiny_screen, tmp_path, run_cli
):
    """Was: refused before starting (no Metadata_Compound / Metadata_MoA / Metadata_pert_type),
    and with those columns, one plate failed in evaluate ('group split by Metadata_Plate needs at
    least 2 groups') with no report."""
    table = pd.read_csv(tiny_screen / "load_data.csv", dtype=str)
    table = table[table.Metadata_Plate == "P01"].drop(columns=LABELS)
    path = tmp_path / "load_data.csv"
    table.to_csv(path, index=False)
    run = tmp_path / "run"
    rc, text = run_cli("run", *TINY, f"prepare.load_data={path}", f"run.out_dir={run}")
    assert rc == 0, text
    assert (run / "report.html").exists()
    # no controls: each plate normalised against all its wells, and the log says so
    assert "normalised against all its wells" in text
    prof = pd.read_parquet(run / "profiles" / "learned.parquet")
    X = prof[[c for c in prof.columns if not c.startswith("Metadata_")]].to_numpy()
    cells = pd.read_parquet(run / "prep" / "cells.parquet")
    assert prof.Metadata_Plate.nunique() == 1
    assert set(prof.Metadata_Well) == set(cells.Metadata_Well)  # one profile per well with cells
    # the embeddings recipe standardises on every well: each feature's plate mean is 0
    np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=1e-5)
    steps = json.loads(ad.read_h5ad(run / "profiles" / "learned.h5ad").uns["celldino"]["steps"])
    norm = next(s["params"] for s in steps if s["step"] == "normalize")
    assert norm["reference"] == "all" and norm["n_reference"] == len(prof)
    # nothing could be evaluated: every (analysis, set) is listed with its reason
    summary = json.loads((run / "eval" / "summary.json").read_text())
    skipped = summary["skipped"]
    assert summary["metrics"] == {}
    for name in ("nsc", "map_moa", "classify", "cell_probe"):
        assert "'Metadata_MoA'" in skipped[f"{name} on learned"]
    assert "'Metadata_Compound'" in skipped["map_replicate on random_init"]
    assert "attention" in skipped["attention_iou on learned"]
    html = (run / "report.html").read_text()
    for key in skipped:
        assert f"Skipped: {key}" in html
    assert 'id="umap"' in html and 'id="data"' in html  # what needs no labels is there
    assert "Example single-cell crops per Plate" in html


def _one_plate_profiles(seed: int = 0) -> pd.DataFrame:
    """12 wells of 4 compounds (3 MoAs, 3 replicates each) on one plate; the MoA shifts the
    profile, so NSC can be computed and is above chance."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    centres = rng.normal(size=(3, 8)) * 3
    for i, (cpd, moa) in enumerate([("a", 0), ("b", 0), ("c", 1), ("d", 2)]):
        for r in range(3):
            rows.append(
                {
                    "Metadata_Plate": "P1",
                    "Metadata_Well": f"A{3 * i + r + 1:02d}",
                    "Metadata_Compound": cpd,
                    "Metadata_Dose": "1",
                    "Metadata_MoA": f"m{moa}",
                    "Metadata_pert_type": "trt",
                }
            )
            feats.append(centres[moa] + rng.normal(size=8))
    meta = pd.DataFrame(rows)
    return pd.concat([meta, pd.DataFrame(feats, columns=[f"f{j}" for j in range(8)])], axis=1)


def test_one_plate_skips_the_held_out_plate_analyses_and_runs_the_others(tmp_path):
    path = tmp_path / "profiles.parquet"
    _one_plate_profiles().to_parquet(path)
    # classify as `celldino run` sets it: plates held out
    classify = {"classifiers": ["knn"], "ks": [1], "split_by": "Metadata_Plate"}
    spec = {"analyses": {"nsc": {}, "classify": classify, "map_replicate": {}}}
    out = evaluate(path, spec=spec, cfg=EvaluateConfig(out_dir=str(tmp_path / "eval")))
    summary = json.loads((out / "summary.json").read_text())
    reason = summary["skipped"]["classify on learned"]
    assert "needs at least 2 groups, found only 'P1'" in reason and "split_by" in reason
    assert summary["metrics"]["nsc"]["NSC"]["learned"] > 0.5  # 3 MoAs 3 sigma apart: above chance
    assert summary["metrics"]["map_replicate"]["mAP"]["learned"] > 0


def test_nothing_evaluable_is_refused_by_evaluate_and_listed_by_run(tmp_path, caplog):
    """`celldino evaluate` with no analysis that can run is an error naming each reason; the
    pipeline (allow_nothing) writes the skip list for its report instead, and warns once per
    reason (not once per analysis and set)."""
    table = _one_plate_profiles().drop(columns=["Metadata_MoA"])
    path = tmp_path / "profiles.parquet"
    table.to_parquet(path)
    spec = {"analyses": {"nsc": {}, "map_moa": {}}}
    with pytest.raises(ValueError, match="no analysis could run.*Metadata_MoA"):
        evaluate(path, spec=spec, cfg=EvaluateConfig(out_dir=str(tmp_path / "a")))
    caplog.set_level("WARNING", logger="celldino.eval.runner")
    out = evaluate(
        path, spec=spec, cfg=EvaluateConfig(out_dir=str(tmp_path / "b")), allow_nothing=True
    )
    [warned] = [r.getMessage() for r in caplog.records if "evaluate skipped" in r.getMessage()]
    assert "nsc, map_moa on learned: needs the moa column 'Metadata_MoA'" in warned
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["skipped"]) == {"nsc on learned", "map_moa on learned"}
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert set(metrics.metric) == {"skipped"}


def test_a_split_over_one_group_is_not_evaluable_naming_the_group():
    meta = pd.DataFrame({"Metadata_Plate": ["P7"] * 4})
    for split in (group_split, group_folds):
        with pytest.raises(NotEvaluable, match="found only 'P7'"):
            split(meta, by="Metadata_Plate")


def test_equal_scores_are_flagged_only_for_equal_profiles(tmp_path, caplog):
    """The warning said learned and random_init 'score identically on every metric' when two
    coarse scores tied (an NSC over 12 queries takes 13 values). A copy is flagged; a set whose
    profiles differ (twice the features: every cosine the same, so every score ties) is not."""
    table = _one_plate_profiles()
    feats = [c for c in table.columns if c.startswith("f")]
    twice = table.copy()
    twice[feats] = 2 * twice[feats] + 0.5
    for name, t in (("a", table), ("copy", table), ("twice", twice)):
        t.to_parquet(tmp_path / f"{name}.parquet")
    spec = {
        "inputs": {n: str(tmp_path / f"{n}.parquet") for n in ("a", "copy", "twice")},
        "analyses": {"nsc": {}, "map_replicate": {}},
    }
    caplog.set_level("INFO", logger="celldino")
    out = evaluate(None, spec=spec, cfg=EvaluateConfig(out_dir=str(tmp_path / "eval")))
    summary = json.loads((out / "summary.json").read_text())
    nsc = summary["metrics"]["nsc"]["NSC"]
    assert nsc["a"] == nsc["copy"]
    assert set(summary["flags"]) >= {"nsc on a", "nsc on copy"}
    assert "identical to feature set 'copy'" in summary["flags"]["nsc on a"]["NSC"]
    twice_flags = [f for k, v in summary["flags"].items() if "twice" in k for f in v.values()]
    assert not any("identical" in f for f in twice_flags)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("'a' and 'copy' score identically" in m for m in warned)
    assert not any("score identically" in m and "twice" in m for m in warned)


def test_an_embeddings_folder_reads_as_one_table_and_an_old_store_is_still_found(tmp_path):
    """`pd.read_parquet(<embeddings folder>)` failed on the Zarr chunks of `attention.zarr`
    inside it; the store is `_attention.zarr` now (pyarrow skips '_' names), and a folder of
    celldino 0.3.0 with `attention.zarr` still gives its store to the run layout and reader."""
    from celldino.io.attention_store import (
        ATTENTION,
        LEGACY_ATTENTION,
        read_attention_store,
        write_attention,
    )
    from celldino.io.runlayout import RunLayout

    lay = RunLayout(tmp_path / "run")
    folder = lay.embeddings("learned")
    folder.mkdir(parents=True)
    shard = pd.DataFrame({"Metadata_CellID": ["c0", "c1"], "emb_0000": [0.5, -1.0]})
    shard.to_parquet(folder / "part-00000.parquet")
    maps = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    store = dict(cell_ids=["c0", "c1"], channels=["DNA"], grid=(2, 2), num_registers=0)
    write_attention(lay.attention("learned"), {"attn_maps": maps}, **store)
    assert lay.attention("learned") == folder / ATTENTION
    pd.testing.assert_frame_equal(pd.read_parquet(folder), shard)
    # an older run's folder: attention.zarr, found by the layout and the reader
    (folder / ATTENTION).rename(folder / LEGACY_ATTENTION)
    assert lay.attention("learned") == folder / LEGACY_ATTENTION
    arrays, attrs = read_attention_store(folder, ("attn_maps",))
    np.testing.assert_array_equal(arrays["attn_maps"], maps)
    assert attrs["cell_ids"] == ["c0", "c1"]


# ---- plate maps (prepare.platemap) -----------------------------------------------------------

NF1 = dict(pattern="nf1", channel_map={"DAPI": "DNA", "GFP": "GFP", "RFP": "RFP"})


def test_a_plate_map_joins_the_real_nf1_plate_by_well_whatever_the_padding(
    cellpainting_fovs, tmp_path
):
    """The NF1 plate read by file-name pattern (no metadata beyond plate, well, site) gets its
    treatments from a plate map written with zero-padded wells (B07) while the files say B7,
    as pycytominer's annotate joins a platemap; compared with a table built by hand."""
    from celldino.config import PrepareConfig
    from celldino.data.imagesets import ImageSet

    root = cellpainting_fovs / "NF1_cellpainting_data_shrunken" / "Plate_2_images"
    pm = tmp_path / "platemap.csv"
    pm.write_text(
        "Metadata_Plate,Metadata_Well,Metadata_Genotype,Metadata_Dose\n"
        "Plate_2_images,B07,WT,0\n"
        "Plate_2_images,D06,Null,0.10\n"
        "Plate_2_images,D07,Null,0.10\n"
        "Plate_2_images,F07,WT,1e-3\n"
        "Plate_2_images,H12,HET,000\n"
        "Plate_2_images,H11,HET,1\n"  # a mapped well with no image: fine
    )
    table = ImageSet.from_config(PrepareConfig(image_dir=str(root), platemap=str(pm), **NF1)).table
    got = table[["Metadata_Well", "Metadata_Genotype", "Metadata_Dose"]].sort_values(
        "Metadata_Well"
    )
    expected = pd.DataFrame(
        {
            "Metadata_Well": ["B7", "D6", "D7", "F7", "H12"],  # the files' names kept
            "Metadata_Genotype": ["WT", "Null", "Null", "WT", "HET"],
            "Metadata_Dose": ["0", "0.10", "0.10", "1e-3", "000"],  # text as written
        }
    )
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected)
    # without a plate column the map is every plate's
    pm.write_text("Metadata_Well,Metadata_Genotype\nb7,WT\nD6,Null\nD7,Null\nF7,WT\nH12,HET\n")
    table = ImageSet.from_config(PrepareConfig(image_dir=str(root), platemap=str(pm), **NF1)).table
    assert dict(zip(table.Metadata_Well, table.Metadata_Genotype, strict=True)) == {
        "B7": "WT",
        "D6": "Null",
        "D7": "Null",
        "F7": "WT",
        "H12": "HET",
    }


def test_a_pycytominer_platemap_joins_as_it_is(cellpainting_fovs, tmp_path):
    """pycytominer's platemaps (plate_map_name, well_position, broad_sample, ...: no Metadata_
    prefix) join as pycytominer's annotate joins them: every column prefixed, the well from
    well_position."""
    from celldino.config import PrepareConfig
    from celldino.data.imagesets import ImageSet

    root = cellpainting_fovs / "NF1_cellpainting_data_shrunken" / "Plate_2_images"
    pm = tmp_path / "platemap.txt"
    rows = [("B07", "BRD-1", "0.1"), ("D06", "BRD-2", "1"), ("D07", "DMSO", "")]
    rows += [("F07", "BRD-1", "1"), ("H12", "BRD-3", "10")]
    pm.write_text(
        "plate_map_name,well_position,broad_sample,mmoles_per_liter\n"
        + "".join(f"C-7161-01-LM6-013,{w},{b},{d}\n" for w, b, d in rows)
    )
    pm = pm.rename(tmp_path / "platemap.csv")
    table = ImageSet.from_config(PrepareConfig(image_dir=str(root), platemap=str(pm), **NF1)).table
    got = table.set_index("Metadata_Well")
    assert got.loc["D6", "Metadata_broad_sample"] == "BRD-2"
    assert got.loc["H12", "Metadata_mmoles_per_liter"] == "10"
    assert got.loc["D7", "Metadata_mmoles_per_liter"] != got.loc["D7", "Metadata_mmoles_per_liter"]
    assert set(got.Metadata_plate_map_name) == {"C-7161-01-LM6-013"}
    assert "Metadata_well_position" not in got.columns  # the key, as the images' Metadata_Well


def test_a_plate_map_joins_a_load_data_table_by_plate_and_well(tiny_screen, tmp_path):
    """The tiny screen's treatments moved out of its load-data table into a plate map give the
    table back, row for row (two plates: the join is on plate and well)."""
    from celldino.config import PrepareConfig
    from celldino.data.imagesets import ImageSet

    full = pd.read_csv(tiny_screen / "load_data.csv", dtype=str)
    moved = ["Metadata_Compound", "Metadata_Dose", "Metadata_MoA", "Metadata_pert_type"]
    keys = ["Metadata_Plate", "Metadata_Well"]
    platemap = full[keys + moved].drop_duplicates()
    assert platemap.Metadata_Plate.nunique() == 2 and not platemap.duplicated(keys).any()
    platemap.sample(frac=1, random_state=0).to_csv(tmp_path / "pm.csv", index=False)
    full.drop(columns=moved).to_csv(tmp_path / "ld.csv", index=False)
    cfg = PrepareConfig(load_data=str(tmp_path / "ld.csv"), platemap=str(tmp_path / "pm.csv"))
    table = ImageSet.from_config(cfg).table
    reference = ImageSet.from_config(PrepareConfig(load_data=str(tiny_screen / "load_data.csv")))
    cols = [*keys, "Metadata_Site", *moved]
    pd.testing.assert_frame_equal(table[cols], reference.table[cols].astype(table[cols].dtypes))


# ---- small ones: attention maps, heterogeneity, plate effect ---------------------------------


def test_attention_maps_draws_stored_maps_and_the_full_matrix_alike():
    """`pl.attention_maps` given an attention store's `attn_maps` (heads, h, w) read it as a
    (heads, T, T) matrix and drew row 0 as a wrong grid without a word."""
    from scipy.special import softmax

    from celldino.errors import DataError
    from celldino.pl import attention_maps

    rng = np.random.default_rng(0)
    image = rng.random((2, 32, 32)).astype(np.float32)
    logits = rng.normal(size=(3, 17, 17))
    full = softmax(logits, axis=-1)  # (heads, T, T), T = 1 + 16 patches
    maps = full[:, 0, 1:].reshape(3, 4, 4)  # what the store holds for that cell
    for given in (maps, full, maps.reshape(3, 16)):
        fig = attention_maps(image, given, ["DNA", "RNA"])
        drawn = [np.asarray(ax.images[0].get_array()) for ax in fig.axes[1:]]
        assert len(drawn) == 3
        for h in range(3):
            np.testing.assert_allclose(drawn[h], maps[h], rtol=1e-6)
    fig = attention_maps(image, rng.random((2, 3, 5)), ["DNA", "RNA"])  # a 3 x 5 patch grid
    assert np.asarray(fig.axes[1].images[0].get_array()).shape == (3, 5)
    with pytest.raises(DataError, match="15 patch tokens do not form a square"):
        attention_maps(image, rng.random((3, 15)), ["DNA", "RNA"])
    with pytest.raises(DataError, match=r"shape \(7,\)"):
        attention_maps(image, rng.random(7), ["DNA", "RNA"])


def test_heterogeneity_with_an_annotation_matching_no_treatment_is_not_a_precision_of_0(caplog):
    """An annotation list naming no ranked compound (a typo, other names) gave precision 0.0
    without a word; now it is not evaluable, naming the names, and a partly unmatched list is
    warned about while precision counts the matched ones (as the list without the stray)."""
    from celldino.eval.heterogeneity import heterogeneity

    rng = np.random.default_rng(0)
    rows, feats = [], []
    for t in ("DMSO", "a", "b", "mixed"):
        for s in range(2):
            for _ in range(20):
                x = rng.normal(size=4) + (4.0 * (rng.random() < 0.5) if t == "mixed" else 0)
                feats.append(x)
                rows.append(
                    {"Metadata_Plate": "P1", "Metadata_Well": t, "Metadata_Site": s}
                    | {"Metadata_Compound": t}
                )
    meta, X = pd.DataFrame(rows), np.asarray(feats)
    with pytest.raises(NotEvaluable, match="Mixed.*ranked values are e.g."):
        heterogeneity(meta, X, annotated=["Mixed"], exclude=["DMSO"], ks=(1,))
    _, alone = heterogeneity(meta, X, annotated=["mixed"], exclude=["DMSO"], ks=(1, 3))
    caplog.set_level("WARNING", logger="celldino")
    _, both = heterogeneity(meta, X, annotated=["mixed", "mixd"], exclude=["DMSO"], ks=(1, 3))
    assert "1 of the 2 annotated treatment(s) are not ranked (mixd)" in caplog.text
    assert both["precision_at_1"] == alone["precision_at_1"] == 1.0  # mixed ranks first
    assert both["precision_at_3"] == pytest.approx(1 / 3) and both["n_annotated_unranked"] == 1


def test_the_plate_warning_advises_per_plate_normalisation_only_where_it_was_not_applied(tmp_path):
    """It fired for every set of a `celldino run` (CellProfiler's included) advising per-plate
    normalisation the profiles had had; it now reads each profile's recorded steps."""
    import html

    import anndata as ad_

    from celldino.io.profiles import write_h5ad
    from celldino.io.runlayout import RunLayout
    from celldino.pp.steps import record
    from celldino.report.html import Section
    from celldino.report.sections import plate_warnings

    lay = RunLayout(tmp_path)
    for name, steps in (
        ("learned", [("normalize", {"method": "standardize", "by": "Metadata_Plate"})]),
        ("engineered", [("normalize", {"method": "mad_robustize", "by": "Metadata_Plate"})]),
        ("raw", []),
    ):
        a = ad_.AnnData(np.zeros((2, 2)))
        for step, params in steps:
            record(a, step, {**params, "reference": "controls"})
        write_h5ad(a, lay.profiles(name))
    flagged = {"plate_dominates": 1.0, "plate_agreement": 0.9, "treatment_agreement": 0.2}
    rows = [
        {"feature_set": fs, "analysis": "plate_effect", "metric": m, "value": v}
        for fs in ("learned", "pca_engineered", "raw")
        for m, v in flagged.items()
    ]
    sec = Section("evaluation", "Evaluation")
    plate_warnings(sec, pd.DataFrame(rows), lay)
    warns = {p.split(":")[0].split("⚠ ")[1]: html.unescape(p) for p in sec.parts if "warn" in p}
    assert set(warns) == {"learned", "pca_engineered", "raw"}
    assert "already normalised (standardize per Metadata_Plate on the controls)" in warns["learned"]
    assert "Harmony" in warns["learned"] and "per-plate normalisation" not in warns["learned"]
    # a derived set reads its source's steps (pca_engineered ← engineered)
    assert "(mad_robustize per Metadata_Plate" in warns["pca_engineered"]
    assert "per-plate normalisation to controls" in warns["raw"]


def test_moa_lists_without_moa_sep_are_warned_about(tmp_path, caplog):
    """The README's LINCS example without moa_sep=| scored NSC 0.000: 'a|b' was one MoA."""
    table = _one_plate_profiles()
    table["Metadata_MoA"] = table["Metadata_MoA"].replace({"m0": "m0|m9"})
    path = tmp_path / "p.parquet"
    table.to_parquet(path)
    spec = {"analyses": {"nsc": {}}}
    caplog.set_level("WARNING", logger="celldino")
    evaluate(path, spec=spec, cfg=EvaluateConfig(out_dir=str(tmp_path / "a")))
    assert "6 of the 12 Metadata_MoA values hold '|' (e.g. 'm0|m9')" in caplog.text
    assert "'evaluate.columns.moa_sep=|'" in caplog.text
    caplog.clear()
    cfg = EvaluateConfig(out_dir=str(tmp_path / "b"), columns={"moa_sep": "|"})
    evaluate(path, spec=spec, cfg=cfg)
    assert "moa_sep is unset" not in caplog.text
