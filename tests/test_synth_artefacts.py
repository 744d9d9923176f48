"""Planted imaging artefacts (issue 24): each planter changes what it says, the synthetic screen's
truth lists exactly the planted fields, the default screen is unchanged, and the learned-QC bench's
scoring runs end to end on a handful of fields."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage as ndi

from celldino.config import CHOICES, SynthConfig
from celldino.data.qc import flag_images, image_metrics
from celldino.synth import artefacts as A
from celldino.synth import make_screen

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
ALL = tuple(CHOICES["synth.artefacts"])


def _read(row: pd.Series) -> np.ndarray:
    return np.stack(
        [tifffile.imread(Path(row[f"PathName_{c}"]) / row[f"FileName_{c}"]) for c in CHANNELS]
    )


def _digest(out: Path) -> str:
    """Every image, mask and table of a screen (paths under `out` written as <OUT>; screen.json,
    which records the settings and so every new setting's default, left out)."""
    h = hashlib.sha256()
    root = str(out.resolve())
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.name == "screen.json":
            continue
        h.update(p.relative_to(out).as_posix().encode())
        if p.suffix == ".parquet":
            h.update(pd.read_parquet(p).to_csv(index=False).replace(root, "<OUT>").encode())
        elif p.suffix in (".csv", ".json"):
            h.update(p.read_text().replace(root, "<OUT>").encode())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


# computed with the code before synth.artefacts existed (commit 679121a)
TINY_DIGEST = "f153f4ac64119a868e3abed33b52c082dcfa31051a92c41d61dc0a614dccdbc3"


def test_default_tiny_screen_is_byte_identical_to_before_artefacts(tiny_screen):
    assert _digest(tiny_screen) == TINY_DIGEST


@pytest.fixture(scope="module")
def clean_field(tiny_screen) -> np.ndarray:
    ld = pd.read_csv(tiny_screen / "load_data.csv")
    return _read(ld[ld.Metadata_QC_Truth == "ok"].iloc[0])


def _lap_var(plane: np.ndarray) -> float:
    return float(ndi.laplace(ndi.gaussian_filter(plane.astype(np.float64), 1.0)).var())


def test_planters_keep_dtype_and_shape_and_are_seeded(clean_field):
    for kind in ALL:
        a, info = A.plant(kind, clean_field, np.random.default_rng(5))
        b, _ = A.plant(kind, clean_field, np.random.default_rng(5))
        assert a.dtype == clean_field.dtype and a.shape == clean_field.shape, kind
        assert np.array_equal(a, b), kind
        assert not np.array_equal(a, clean_field), kind
        json.dumps(info)  # recorded in truth_images.parquet
    assert set(A.PLANTERS) == set(ALL)


def test_blur_lowers_sharpness_and_keeps_the_noise(clean_field):
    out, info = A.blur(clean_field, np.random.default_rng(0), sigma=3.0)
    for c in range(len(out)):
        assert _lap_var(out[c]) < 0.5 * _lap_var(clean_field[c])
        n0, n1 = A.noise_sigma(clean_field[c]), A.noise_sigma(out[c])
        assert 0.75 < n1 / n0 < 1.3  # the camera noise is put back: blur is not "less noise"
    assert info == {"sigma": 3.0}


def test_saturated_clips_the_asked_fraction_of_the_chosen_channels(clean_field):
    out, info = A.saturated(clean_field, np.random.default_rng(0), fraction=0.08, channels=[2])
    at_max = (out == 65535).mean(axis=(1, 2))
    assert 0.07 <= at_max[2] <= 0.09
    assert np.array_equal(out[[0, 1, 3, 4]], clean_field[[0, 1, 3, 4]])
    assert info["channels"] == [2]


def test_debris_saturates_a_large_region_and_classical_qc_calls_it_debris(clean_field):
    out, info = A.debris(clean_field, np.random.default_rng(1), radius=12.0)
    lab, n = ndi.label(out[0] == 65535)
    assert np.bincount(lab.ravel())[1:].max() >= 0.005 * out[0].size
    assert image_metrics(out)["QC_LargestObject"] > 0.005
    assert image_metrics(clean_field)["QC_LargestObject"] == 0.0


def test_dim_debris_never_reaches_the_ceiling_and_classical_qc_misses_it(clean_field):
    for seed in range(6):
        rng = np.random.default_rng(seed)
        out, info = A.debris_dim(clean_field, rng)
        assert out.max() < 65535
        changed = [c for c in range(len(out)) if not np.array_equal(out[c], clean_field[c])]
        assert changed == info["channels"] and 1 <= len(changed) <= 3
        for c in changed:  # a connected object of added signal, as bright as the cells
            added = out[c].astype(float) - clean_field[c]
            assert added.max() > 0.5 * np.ptp(np.percentile(clean_field[c], (5, 99.5)))
        assert image_metrics(out)["QC_LargestObject"] == 0.0  # no clipped core: not debris


def test_autofluorescence_is_broad_bright_and_in_several_channels(clean_field):
    out, info = A.autofluorescence(clean_field, np.random.default_rng(2), brightness=1.0)
    assert len(info["channels"]) >= 3
    for c in range(len(out)):
        added = ndi.gaussian_filter(out[c].astype(float) - clean_field[c], 2.0)
        if c in info["channels"]:
            assert added.max() > 0.5 * np.ptp(np.percentile(clean_field[c], (5, 99.5)))
            assert (added > 0.5 * added.max()).mean() > 0.05  # broad, not a cell-sized spot
        else:
            assert np.array_equal(out[c], clean_field[c])
    assert out.max() < 65535


@pytest.mark.parametrize("factor", [2.0, 3.5])
def test_noise_burst_multiplies_the_noise_by_the_factor(clean_field, factor):
    out, info = A.noise(clean_field, np.random.default_rng(3), factor=factor)
    for c in range(len(out)):
        ratio = A.noise_sigma(out[c]) / A.noise_sigma(clean_field[c])
        assert ratio == pytest.approx(factor, rel=0.12)


def test_empty_field_has_no_foreground_left(clean_field):
    out, _ = A.empty(clean_field, np.random.default_rng(4))
    m0, m1 = image_metrics(clean_field), image_metrics(out)
    assert m0["QC_Foreground"] > 0.05 and m1["QC_Foreground"] < 0.002
    for c in range(len(out)):  # background level kept (within 3 noise sigmas)
        bg0 = np.percentile(clean_field[c], 10)
        assert abs(np.median(out[c]) - bg0) < 3 * A.noise_sigma(clean_field[c]) + 5


def test_screen_truth_lists_exactly_the_planted_sites(tmp_path, tiny_screen):
    cfg = SynthConfig(artefacts=ALL, artefact_rate=0.03, seed=0)
    out = make_screen(tmp_path / "art", cfg)
    ld = pd.read_csv(out / "load_data.csv")
    truth = pd.read_parquet(out / "truth_images.parquet")
    base = pd.read_csv(tiny_screen / "load_data.csv")
    assert (ld.Metadata_QC_Truth.to_numpy() == truth.qc.to_numpy()).all()
    legacy = base.Metadata_QC_Truth != "ok"  # the preset's 2 camera failures (blur, debris)
    assert (ld.Metadata_QC_Truth[legacy] == base.Metadata_QC_Truth[legacy]).all()
    counts = ld.Metadata_QC_Truth[~legacy].value_counts()
    # 32 sites: round(0.03 x 32) = 1, at least one of each type, none on a camera failure
    assert all(counts[k] == 1 for k in ALL)
    assert counts["ok"] == 32 - 2 - len(ALL)
    assert json.loads((out / "screen.json").read_text())["n_artefacts"] == dict.fromkeys(ALL, 1)
    cells = pd.read_parquet(out / "truth_cells.parquet")
    key = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    for i, row in ld.iterrows():
        img, ref = _read(row), _read(base.iloc[i])
        planted = row.Metadata_QC_Truth in ALL and not legacy[i]
        # every site not planted keeps its bytes; every planted one differs
        assert np.array_equal(img, ref) != planted, (i, row.Metadata_QC_Truth)
        params = json.loads(truth.artefact_params[i])
        assert bool(params) == (planted and row.Metadata_QC_Truth != "empty")
    empty = ld[ld.Metadata_QC_Truth == "empty"].iloc[0]
    assert not (cells[key] == empty[key]).all(axis=1).any()  # its cells are gone from the truth
    mask = tifffile.imread(truth.loc[ld.Metadata_QC_Truth == "empty", "mask_nuclei"].iloc[0])
    assert mask.max() == 0
    flagged = flag_images(pd.DataFrame([image_metrics(_read(r)) for _, r in ld.iterrows()]))
    assert flagged.loc[ld.Metadata_QC_Truth.eq("empty").to_numpy(), "QC_Flag_empty"].all()


def test_real_fields_planted_originals_untouched(cellpainting_fovs):
    sites = A.real_sites(cellpainting_fovs)
    assert len(sites) == 7 and all(s["image"].shape[0] == 3 for s in sites)
    assert all(s["channels"][0] in ("DNA", "DAPI") for s in sites)
    small = [{**s, "image": s["image"][:, :256, :256].copy()} for s in sites[:2]]
    before = [s["image"].copy() for s in small]
    planted = A.plant_real(small, copies=2, seed=0)
    assert len(planted) == 2 * (1 + 2 * len(A.REAL_ARTEFACTS))
    for p in planted:
        i = [s["site"] for s in small].index(p["site"])
        if p["kind"] == "ok":
            assert np.array_equal(p["image"], before[i])
        else:
            assert not np.array_equal(p["image"], before[i])
        if p["kind"] == "debris_dim":  # no pixel newly at the ceiling (some real ones were)
            assert not ((p["image"] == 65535) & (before[i] < 65535)).any()
    assert all(np.array_equal(s["image"], b) for s, b in zip(small, before))
    again = A.plant_real(small, copies=2, seed=0)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(planted, again))


def _bench():
    spec = importlib.util.spec_from_file_location("qc_learned", ROOT / "bench" / "qc_learned.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["qc_learned"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_scoring_end_to_end_on_a_handful_of_fields(tmp_path):
    """The bench's own functions on 48 small fields: truth read back, classical QC, embeddings of
    a random-init ViT, the two detectors and the metrics table (shape and ranges only: a few
    fields prove nothing about accuracy)."""
    bench = _bench()
    cfg = SynthConfig(
        preset="custom",
        n_plates=1,
        n_batches=1,
        image_size=64,
        cells_per_site=4,
        sites_per_well=3,
        n_bad_images=0,
        artefacts=("blur", "debris", "noise"),
        artefact_rate=0.1,
    )
    fields = bench.synthetic_fields(tmp_path / "s", cfg)
    assert (fields.truth != "ok").sum() == 3 * 5 and len(fields.images) == 48
    model = bench.encoder("random", 5, side=32)
    emb = bench.embed(fields.images, fields.plates, model, CHANNELS)
    assert emb.shape[0] == 48 and np.isfinite(emb).all()
    rows = bench.evaluate_synthetic(fields, {"random": emb}, shots=(2,), draws=2, boot=50)
    table = pd.DataFrame(rows)
    assert set(table.artefact) == {"blur", "debris", "noise"}
    assert {"classical", "outlier", "fewshot-2"} <= set(table.detector)
    assert table.auc.dropna().between(0, 1).all()
    ok = table[(table.detector == "classical") & (table.artefact == "debris")]
    assert ok.auc.iloc[0] == 1.0  # planted debris saturates: the clipped-area rule is exact
