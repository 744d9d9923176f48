"""Retrieval metrics against the synthetic screen's ground truth.

Well profiles built from the planted phenotype factors (the truth an ideal embedding would
recover) must match MoAs across compounds nearly perfectly, and the same profiles with the MoA
labels shuffled must fall to chance: the metrics see the planted biology and nothing else.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from celldino.config import SynthConfig
from celldino.eval import moa_map, nsc_nscb
from celldino.synth import make_screen

KEYS = [
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Batch",
    "Metadata_Compound",
    "Metadata_Dose",
    "Metadata_MoA",
    "Metadata_pert_type",
]


@pytest.fixture(scope="module")
def truth_profiles(tmp_path_factory):
    cfg = SynthConfig(
        preset="custom",
        n_plates=4,
        n_batches=2,
        n_moas=4,
        compounds_per_moa=2,
        n_doses=2,
        image_size=96,
        cells_per_site=6,
        n_bad_images=0,
        seed=1,
    )
    out = make_screen(tmp_path_factory.mktemp("screen"), cfg)
    cells = pd.read_parquet(out / "truth_cells.parquet")
    cells["factor_mitotic"] = (cells.cell_cycle == "mitotic").astype(float)
    factors = [c for c in cells.columns if c.startswith("factor_")]
    wells = cells.groupby(KEYS, as_index=False)[factors].mean()
    X = wells[factors].to_numpy()
    ctrl = (wells.Metadata_pert_type == "control").to_numpy()
    X = (X - X[ctrl].mean(0)) / X[ctrl].std(0).clip(1e-6)  # z-score to the DMSO wells
    return wells[KEYS], X


def test_nsc_on_planted_factors_is_near_perfect(truth_profiles):
    meta, X = truth_profiles
    top_dose = (
        meta.Metadata_Dose == meta.loc[meta.Metadata_pert_type == "trt", "Metadata_Dose"].max()
    )
    keep = (top_dose | (meta.Metadata_pert_type == "control")).to_numpy()
    scores, table = nsc_nscb(
        meta[keep],
        X[keep],
        moa="Metadata_MoA",
        compound="Metadata_Compound",
        treatment=["Metadata_Compound", "Metadata_Dose"],
        batch="Metadata_Batch",
    )
    assert scores["NSC"] == 1.0  # each MoA's other compound is its nearest treatment
    assert scores["NSCB"] >= 0.9


def test_moa_map_sees_planted_moas_and_not_shuffled_labels(truth_profiles):
    meta, X = truth_profiles
    top = (meta.Metadata_Dose == meta.Metadata_Dose.max()).to_numpy()  # controls are dropped anyway
    meta, X = meta[top].reset_index(drop=True), X[top]
    _, maps = moa_map(
        meta,
        X,
        moa="Metadata_MoA",
        compound="Metadata_Compound",
        null_size=500,
        show_progress=False,
    )
    true_map = maps["mean_average_precision"].mean()
    rng = np.random.default_rng(0)
    shuffled = meta.copy()
    trt = shuffled.Metadata_pert_type == "trt"
    # shuffle whole compounds between MoAs, keeping 2 compounds per MoA
    compounds = shuffled.loc[trt, "Metadata_Compound"].unique()
    fake = dict(
        zip(
            compounds,
            rng.permutation(shuffled.loc[trt].drop_duplicates("Metadata_Compound").Metadata_MoA),
        )
    )
    shuffled.loc[trt, "Metadata_MoA"] = shuffled.loc[trt, "Metadata_Compound"].map(fake)
    _, maps_shuffled = moa_map(
        shuffled,
        X,
        moa="Metadata_MoA",
        compound="Metadata_Compound",
        null_size=500,
        show_progress=False,
    )
    chance = 4 / 28  # per query: the other compound's 4 wells among 7 other compounds' 28 wells
    print(
        f"MoA mAP on planted factors {true_map:.3f}, shuffled MoAs {maps_shuffled['mean_average_precision'].mean():.3f}"
    )
    assert true_map > 0.8
    assert maps_shuffled["mean_average_precision"].mean() < true_map - 0.3
    assert maps_shuffled["mean_average_precision"].mean() < chance + 0.25
