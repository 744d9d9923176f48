"""The synthetic screen: its ground truth must be visible in its pixels, and it is deterministic."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from celldino import cli
from celldino.config import SynthConfig
from celldino.synth import make_screen
from celldino.synth.render import BACKGROUND, CAMERA_OFFSET


def _read(row: pd.Series, ch: str) -> np.ndarray:
    return tifffile.imread(Path(row[f"PathName_{ch}"]) / row[f"FileName_{ch}"])


def _otsu_nuclei(dna: np.ndarray) -> tuple[np.ndarray, int]:
    smooth = ndi.gaussian_filter(dna.astype(np.float32), 1.0)
    return ndi.label(smooth > threshold_otsu(smooth))


def test_load_data_follows_cellprofiler_convention(tiny_screen):
    ld = pd.read_csv(tiny_screen / "load_data.csv")
    for ch in ("DNA", "ER", "RNA", "AGP", "Mito"):
        assert {f"FileName_{ch}", f"PathName_{ch}"} <= set(ld.columns)
    for col in ("Plate", "Well", "Site", "Compound", "Dose", "MoA", "Batch", "pert_type"):
        assert f"Metadata_{col}" in ld.columns
    assert ld.groupby(["Metadata_Plate", "Metadata_Well", "Metadata_Site"]).size().max() == 1
    # Negative controls on every plate, and every MoA has at least two compounds.
    assert set(ld.loc[ld.Metadata_pert_type == "control", "Metadata_Plate"]) == set(
        ld.Metadata_Plate
    )
    trt = ld[ld.Metadata_pert_type == "trt"]
    assert trt.groupby("Metadata_MoA").Metadata_Compound.nunique().min() >= 2
    assert trt.groupby("Metadata_Compound").Metadata_Dose.nunique().min() >= 2
    assert ld.Metadata_Batch.nunique() == 2
    img = _read(ld.iloc[0], "DNA")
    assert img.dtype == np.uint16 and img.shape == (128, 128)


def test_otsu_nuclei_land_on_recorded_centroids(tiny_screen):
    ld = pd.read_csv(tiny_screen / "load_data.csv")
    truth = pd.read_parquet(tiny_screen / "truth_cells.parquet")
    hits = total = 0
    for _, row in ld[ld.Metadata_QC_Truth == "ok"].iterrows():
        labels, n = _otsu_nuclei(_read(row, "DNA"))
        sel = truth[
            (truth.Metadata_Plate == row.Metadata_Plate)
            & (truth.Metadata_Well == row.Metadata_Well)
            & (truth.Metadata_Site == row.Metadata_Site)
        ].dropna(subset=["center_x"])
        found = np.array(ndi.center_of_mass(labels > 0, labels, range(1, n + 1))).reshape(-1, 2)
        for _, cell in sel.iterrows():
            total += 1
            d = (
                np.hypot(found[:, 1] - cell.center_x, found[:, 0] - cell.center_y)
                if n
                else [np.inf]
            )
            hits += np.min(d) <= 3.0
    # Touching nuclei merge under plain Otsu, so not every one is hit; most must be.
    assert total > 100
    assert hits / total >= 0.75, f"only {hits}/{total} recorded nuclei found by Otsu"


def test_moa_moves_nucleus_area_in_pixels(tiny_screen):
    ld = pd.read_csv(tiny_screen / "load_data.csv")
    ld = ld[ld.Metadata_QC_Truth == "ok"]

    def mean_area(rows: pd.DataFrame) -> float:
        areas = []
        for _, row in rows.iterrows():
            labels, n = _otsu_nuclei(_read(row, "DNA"))
            sizes = np.bincount(labels.ravel())[1:]
            areas += list(sizes[(sizes > 20) & (sizes < 400)])  # single nuclei, not merged pairs
        return float(np.median(areas))

    dmso = mean_area(ld[ld.Metadata_MoA == "control"])
    damage = mean_area(
        ld[(ld.Metadata_MoA == "DNA damage") & (ld.Metadata_Dose == ld.Metadata_Dose.max())]
    )
    mitotic = mean_area(
        ld[
            (ld.Metadata_MoA == "Microtubule destabiliser")
            & (ld.Metadata_Dose == ld.Metadata_Dose.max())
        ]
    )
    # DNA damage enlarges nuclei; mitotic arrest condenses chromatin into smaller nuclei (biology.MOAS).
    assert damage > 1.3 * dmso, (damage, dmso)
    assert mitotic < dmso, (mitotic, dmso)


def test_truth_factors_follow_moa_and_dose(tiny_screen):
    truth = pd.read_parquet(tiny_screen / "truth_cells.parquet")
    by = truth.groupby(["Metadata_MoA", "Metadata_Dose"]).factor_nucleus_scale.mean()
    low, high = sorted(truth[truth.Metadata_MoA == "DNA damage"].Metadata_Dose.unique())
    assert by[("DNA damage", high)] > by[("DNA damage", low)] > by[("control", 0.0)]
    mito = truth.groupby("Metadata_MoA").cell_cycle.apply(lambda s: (s == "mitotic").mean())
    assert mito["Microtubule destabiliser"] > 2 * mito["control"]


def test_mitotic_cells_have_condensed_bright_chromatin(tiny_screen):
    ld = pd.read_csv(tiny_screen / "load_data.csv").set_index(["Metadata_Plate", "Metadata_Well"])
    truth = pd.read_parquet(tiny_screen / "truth_cells.parquet")
    images = pd.read_parquet(tiny_screen / "truth_images.parquet")
    peak = {"mitotic": [], "interphase": []}
    for _, im in images[images.qc == "ok"].iterrows():
        row = ld.loc[(im.Metadata_Plate, im.Metadata_Well)]
        row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
        dna = _read(row, "DNA").astype(float)
        nuclei = tifffile.imread(im.mask_nuclei)
        cells = truth[
            (truth.Metadata_Plate == im.Metadata_Plate) & (truth.Metadata_Well == im.Metadata_Well)
        ]
        for _, c in cells.iterrows():
            m = nuclei == c.cell_index
            if m.sum() > 5:
                peak[c.cell_cycle].append(dna[m].mean())
    assert len(peak["mitotic"]) >= 3
    assert np.median(peak["mitotic"]) > 1.5 * np.median(peak["interphase"])


def test_plate_scale_shows_in_image_means(tmp_path):
    cfg = SynthConfig(
        preset="custom",
        n_plates=4,
        n_batches=2,
        n_moas=1,
        control_wells=12,
        image_size=96,
        cells_per_site=6,
        n_bad_images=0,
        seed=3,
    )
    out = make_screen(tmp_path / "s", cfg)
    ld = pd.read_csv(out / "load_data.csv")
    images = pd.read_parquet(out / "truth_images.parquet")
    ctrl = ld[ld.Metadata_pert_type == "control"].merge(
        images, on=["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    )
    est, scale = [], []
    yy, xx = np.mgrid[0:96, 0:96]
    for _plate, rows in ctrl.groupby("Metadata_Plate"):
        per_site = []
        for _, row in rows.iterrows():
            r2 = ((xx - 48) ** 2 + (yy - 48) ** 2) / (0.5 * 2 * 96**2)
            vig = 1 - row.vignette * r2
            sig = (
                (_read(row, "ER").astype(float) - CAMERA_OFFSET) / vig - BACKGROUND - row.offset_ER
            )
            per_site.append(sig.mean() / row.n_cells)
        est.append(np.mean(per_site))
        scale.append(rows.scale_ER.iloc[0])
    r = np.corrcoef(est, scale)[0, 1]
    assert r > 0.9, f"per-plate ER signal does not follow the recorded plate scale (r={r:.2f})"


def test_bad_images_are_planted_and_look_bad(tiny_screen):
    from skimage.filters import laplace

    ld = pd.read_csv(tiny_screen / "load_data.csv")
    assert set(ld.Metadata_QC_Truth) == {"ok", "blur", "debris"}
    sharp = [
        laplace(_read(r, "DNA").astype(float)).var()
        for _, r in ld[ld.Metadata_QC_Truth == "ok"].iterrows()
    ]
    blur = [
        laplace(_read(r, "DNA").astype(float)).var()
        for _, r in ld[ld.Metadata_QC_Truth == "blur"].iterrows()
    ]
    assert max(blur) < min(sharp)
    debris = ld[ld.Metadata_QC_Truth == "debris"].iloc[0]
    assert (_read(debris, "DNA") == 65535).mean() > 0.005  # saturated blob


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.tif")) + [folder / "load_data.csv"]:
        h.update(p.name.encode())
        h.update(p.read_bytes().replace(str(folder.resolve()).encode(), b""))
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    a = make_screen(tmp_path / "a", SynthConfig(preset="tiny", seed=5))
    b = make_screen(tmp_path / "b", SynthConfig(preset="tiny", seed=5))
    c = make_screen(tmp_path / "c", SynthConfig(preset="tiny", seed=6))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    ta, tb = (pd.read_parquet(x / "truth_cells.parquet") for x in (a, b))
    pd.testing.assert_frame_equal(ta, tb)


def test_channels_and_protein_mode(tmp_path):
    cfg = SynthConfig(
        preset="tiny",
        channels=("Hoechst", "Tubulin", "Actin"),
        protein_channel=True,
        n_plates=1,
        n_batches=1,
        n_bad_images=0,
    )
    out = make_screen(tmp_path / "p", cfg)
    ld = pd.read_csv(out / "load_data.csv")
    assert [c[9:] for c in ld.columns if c.startswith("FileName_")] == [
        "Hoechst",
        "Tubulin",
        "Actin",
        "Protein",
    ]
    truth = pd.read_parquet(out / "truth_cells.parquet")
    images = pd.read_parquet(out / "truth_images.parquet")
    assert set(truth.localisation) <= {"nucleus", "nucleoli", "cytoplasm", "membrane", "puncta"}
    # Nuclear-class cells put their protein in the nucleus, cytoplasmic ones outside it.
    frac = {"nucleus": [], "cytoplasm": []}
    for (_, row), (_, im) in zip(ld.iterrows(), images.iterrows()):
        prot = _read(row, "Protein").astype(float) - CAMERA_OFFSET - BACKGROUND
        nuc, cel = tifffile.imread(im.mask_nuclei), tifffile.imread(im.mask_cells)
        cells = truth[(truth.Metadata_Well == row.Metadata_Well)]
        for _, c in cells.iterrows():
            if c.localisation in frac and (nuc == c.cell_index).sum() > 10:
                inside = prot[nuc == c.cell_index].mean()
                outside = prot[(cel == c.cell_index) & (nuc != c.cell_index)].mean()
                frac[c.localisation].append(inside / (inside + outside))
    assert np.median(frac["nucleus"]) > 0.7 > 0.4 > np.median(frac["cytoplasm"])


def test_cli_synth_writes_screen(tmp_path, capsys):
    assert (
        cli.main(["-q", "synth", str(tmp_path / "s"), "synth.n_plates=1", "synth.n_batches=1"]) == 0
    )
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "s" / "load_data.csv"
    assert pd.read_csv(tmp_path / "s" / "load_data.csv").Metadata_Plate.nunique() == 1


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="n_batches"):
        make_screen(tmp_path, SynthConfig(n_plates=1, n_batches=3))
    with pytest.raises(ValueError, match="unknown synth.preset 'huge'"):
        make_screen(tmp_path, SynthConfig(preset="huge"))
