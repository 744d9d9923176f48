"""QC: the synthetic screen's planted bad images are caught; hand-built fields check each flag."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from celldino.data import qc
from celldino.data.imagesets import ImageSet
from celldino.io.images import read_image
from celldino.io.tables import read_load_data


def _screen_qc(screen):
    df, chans = read_load_data(screen / "load_data.csv")
    iset = ImageSet(df, chans)
    rows = [
        {"Metadata_ImageKey": iset.key(i), **qc.image_metrics(iset.read(i), chans.index("DNA"))}
        for i in range(len(iset))
    ]
    return qc.flag_images(pd.DataFrame(rows)), iset.table["Metadata_QC_Truth"].to_numpy()


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_planted_bad_images_are_caught_exactly(preset, request):
    """Precision and recall 1.0 per planted kind; the dense 10 uM wells are not 'empty'."""
    flagged, truth = _screen_qc(request.getfixturevalue(f"{preset}_screen"))
    assert (truth == "blur").sum() >= 1 and (truth == "debris").sum() >= 1
    for kind in ("blur", "debris"):
        pred = flagged[f"QC_Flag_{kind}"].to_numpy()
        assert (pred == (truth == kind)).all(), (kind, flagged.loc[pred != (truth == kind)])
    # nothing planted is saturated (the debris saturates, and is called debris) or empty
    assert not flagged["QC_Flag_saturated"].any() and not flagged["QC_Flag_empty"].any()
    assert (flagged["QC_Pass"] == (truth == "ok")).all()
    assert "images flagged by QC" in qc.summary(flagged)


def _real_sites(root):
    nf1 = root / "NF1_cellpainting_data_shrunken" / "Plate_2_images"
    sets = {"NF1": []}
    for dapi in sorted(nf1.glob("*_DAPI_001.tif")):
        well, _, _, site = dapi.name.split("_")[:4]
        files = sorted(nf1.glob(f"{well}_01_*_{site}_*_001.tif"))
        assert len(files) == 3
        sets["NF1"].append(np.stack([read_image(f) for f in files]))  # DAPI, GFP, RFP
    for name in ("JUMP_plate_BR00117006", "pediatric_cancer_atlas_profiling"):
        files = sorted((root / name / "images" / "orig").glob("*.tiff"))
        dna = [i for i, f in enumerate(files) if "-ch5" in f.name][0]
        sets[name] = [(np.stack([read_image(f) for f in files]), dna)]
    return sets


def test_no_false_flags_on_real_sites(cellpainting_fovs):
    """Every real site in ../shared/data/cellpainting_fovs passes (each data set is a screen)."""
    sets = _real_sites(cellpainting_fovs)
    n = 0
    for name, sites in sets.items():
        items = [s if isinstance(s, tuple) else (s, 0) for s in sites]
        m = pd.DataFrame([qc.image_metrics(img, dna) for img, dna in items])
        f = qc.flag_images(m)
        n += len(f)
        assert f["QC_Pass"].all(), (name, f)
        assert (f["QC_Foreground"] > 0.1).all()  # nuclei found against a local background
    assert n == 7


def test_each_flag_on_hand_built_fields():
    rng = np.random.default_rng(0)
    base = rng.poisson(100, (1, 128, 128)).astype(np.uint16)
    yy, xx = np.mgrid[:128, :128]
    sharp = base.copy()
    for cy, cx in [(20, 20), (30, 90), (80, 40), (100, 100), (60, 64)]:
        sharp[0][(yy - cy) ** 2 + (xx - cx) ** 2 < 36] += 2000
    fields = {"ok": sharp}
    for k in range(6):
        fields[f"ok{k}"] = np.roll(sharp, 7 * k, axis=2)
    fields["blur"] = ndi.gaussian_filter(sharp.astype(np.float32), (0, 4, 4)).astype(np.uint16)
    fields = {k: np.concatenate([v, v]) for k, v in fields.items()}  # a second channel
    sat = fields["ok"].copy()
    sat[1, :40] = 65535  # an over-exposed channel
    fields["saturated"] = sat
    fields["empty"] = np.concatenate([base, base])
    deb = fields["ok"].copy()
    deb[:, (yy - 64) ** 2 + (xx - 20) ** 2 < 200] = 65535  # junk overflowing the camera
    fields["debris"] = deb
    m = pd.DataFrame([{"name": k, **qc.image_metrics(v)} for k, v in fields.items()])
    f = qc.flag_images(m).set_index("name")
    for kind in ("blur", "saturated", "empty", "debris"):
        assert f.at[kind, f"QC_Flag_{kind}"], kind
    assert f.loc[[k for k in fields if k.startswith("ok")], "QC_Pass"].all()
    assert f.at["debris", "QC_Flags"] == "debris"  # its saturated pixels are the debris's
    assert f.at["saturated", "QC_Saturation"] == 40 / 128


def test_debris_and_saturation_in_12_bit_data_stored_as_uint16():
    """A 12-bit camera clips at 4095, not at uint16's 65535: the clipped junk is still debris
    and the over-exposed channel still saturated (the ceiling is the image's own maximum)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:128, :128]
    ok = rng.poisson(100, (2, 128, 128)).astype(np.uint16)
    for cy, cx in [(20, 20), (30, 90), (80, 40), (100, 100), (60, 64)]:
        ok[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 36] += 2000
    deb = ok.copy()
    deb[:, (yy - 64) ** 2 + (xx - 20) ** 2 < 200] = 4095
    sat = ok.copy()
    sat[1, :40] = 4095
    fields = {f"ok{k}": np.roll(ok, 7 * k, axis=2) for k in range(6)}
    fields |= {"debris": deb, "saturated": sat}
    m = pd.DataFrame([{"name": k, **qc.image_metrics(v)} for k, v in fields.items()])
    f = qc.flag_images(m).set_index("name")
    assert f.at["debris", "QC_Flag_debris"] and f.at["saturated", "QC_Flag_saturated"]
    assert f.at["saturated", "QC_Saturation"] == 40 / 128
    assert f.loc[[k for k in fields if k.startswith("ok")], "QC_Pass"].all()
