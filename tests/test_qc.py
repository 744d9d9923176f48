"""QC: the synthetic screen's planted bad images are caught; hand-built fields check each flag."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from celldino.data import qc
from celldino.data.imagesets import ImageSet
from celldino.io.tables import read_load_data


def test_planted_bad_images_are_caught(tiny_screen):
    df, chans = read_load_data(tiny_screen / "load_data.csv")
    iset = ImageSet(df, chans)
    rows = [
        {"Metadata_ImageKey": iset.key(i), **qc.image_metrics(iset.read(i), chans.index("DNA"))}
        for i in range(len(iset))
    ]
    flagged = qc.flag_images(pd.DataFrame(rows))
    truth = iset.table["Metadata_QC_Truth"].to_numpy()
    assert (truth != "ok").sum() >= 2
    bad = truth != "ok"
    assert not flagged["QC_Pass"][bad].any()  # every planted image flagged
    assert flagged["QC_Flag_blur"][truth == "blur"].all()
    assert flagged["QC_Flag_debris"][truth == "debris"].all()
    assert flagged["QC_Pass"][~bad].mean() >= 0.9  # and few good ones lost
    assert "images flagged by QC" in qc.summary(flagged)


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
    sat = sharp.copy()
    sat[0, :40] = 65535
    fields["saturated"] = sat
    fields["empty"] = base
    deb = sharp.copy()
    deb[0][(yy - 64) ** 2 + (xx - 20) ** 2 < 200] = 30000
    fields["debris"] = deb
    m = pd.DataFrame([{"name": k, **qc.image_metrics(v)} for k, v in fields.items()])
    f = qc.flag_images(m).set_index("name")
    for kind in ("blur", "saturated", "empty", "debris"):
        assert f.at[kind, f"QC_Flag_{kind}"], kind
    assert f.loc[[k for k in fields if k.startswith("ok")], "QC_Pass"].all()
    assert f.at["saturated", "QC_Saturation"] == 40 / 128
