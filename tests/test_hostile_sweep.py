"""Issue 22's final sweep (/tmp/exp/sweep/sweep.py, docs/reliability.md "A third sweep"): each
case it found wrong, refused with exit code 2 and one line naming the cause, nothing written."""

from __future__ import annotations

import numpy as np
import pandas as pd

FEATS = [f"emb_{j:04d}" for j in range(4)]


def _cells(tmp_path, edit=None):
    """2 plates × 4 wells × 3 cells, wells A00/A01 controls; `edit(df)` changes it in place."""
    rng = np.random.default_rng(0)
    rows = [
        (p, f"A{w:02d}", "control" if w < 2 else "trt", "DMSO" if w < 2 else f"cpd{w % 2}")
        for p in ("P1", "P2")
        for w in range(4)
        for _ in range(3)
    ]
    df = pd.DataFrame(
        rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_pert_type", "Metadata_Compound"]
    )
    for f in FEATS:
        df[f] = rng.normal(size=len(df))
    if edit is not None:
        edit(df)
    path = tmp_path / "cells.parquet"
    df.to_parquet(path, index=False)
    return path


def _profile(run_cli, tmp_path, inp, *extra):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    rc, text = run_cli(
        "profile",
        f"profile.input={inp}",
        f"profile.out={out}/wells",
        "profile.formats=parquet",
        *extra,
    )
    return rc, text, out


def test_a_profile_key_named_twice_is_refused(run_cli, tmp_path):
    rc, text, out = _profile(
        run_cli,
        tmp_path,
        _cells(tmp_path),
        "profile.by=[Metadata_Plate,Metadata_Well,Metadata_Well]",
    )
    assert rc == 2 and "profile.by" in text and "'Metadata_Well' named more than once" in text, text
    assert "list each column once" in text and "Traceback" not in text
    assert list(out.iterdir()) == []
