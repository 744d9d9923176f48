"""Degenerate inputs never score as perfect, and errors point at their cause (issue 22, §4-5).

Each case runs the command line (`run_cli`) or the reader it exercises, and checks the exit code,
that the one-line message names the file, key or setting, and that nothing written before changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from copairs.map import average_precision as copairs_ap
from copairs.map.normalization import expected_ap as copairs_expected_ap


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- §4 a collapsed embedding ------------------------------------------------------------------


def _collapsed(tmp_path: Path) -> Path:
    """5 compounds × 4 replicates and 8 DMSO wells, every profile the same vector."""
    meta = pd.DataFrame(
        {
            "Metadata_Compound": [f"c{i}" for i in range(5) for _ in range(4)] + ["DMSO"] * 8,
            "Metadata_pert_type": ["trt"] * 20 + ["control"] * 8,
        }
    )
    feats = pd.DataFrame(np.tile([0.3, -1.2, 2.0, 0.7], (len(meta), 1)), columns=list("abcd"))
    path = tmp_path / "collapsed.parquet"
    pd.concat([meta, feats], axis=1).to_parquet(path)
    return path


def test_collapsed_embedding_scores_chance_and_is_flagged(tmp_path, run_cli):
    path = _collapsed(tmp_path)
    (tmp_path / "spec.yaml").write_text("analyses: [map_replicate, activity]\n")
    out = tmp_path / "ev"
    rc, text = run_cli(
        "evaluate",
        path,
        "--spec",
        tmp_path / "spec.yaml",
        f"evaluate.out_dir={out}",
        "evaluate.null_size=50",
    )
    assert rc == 0, text
    assert "no variance" in text  # logged as a warning
    tidy = pd.read_csv(out / "metrics.csv")
    maps = tidy[tidy.metric.str.startswith("mAP") & ~tidy.metric.str.contains("normalized")]
    assert len(maps) >= 2, tidy
    # copairs ranks tied positives first (AP 1.0); the tie average is copairs' expected AP
    df = pd.read_parquet(path)
    cp = copairs_ap(
        df[["Metadata_Compound"]].assign(ctrl=df.Metadata_pert_type == "control"),
        df[list("abcd")].to_numpy(),
        pos_sameby=["Metadata_Compound"],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=["ctrl"],
        progress_bar=False,
    )
    assert (cp.average_precision.dropna() == 1.0).all()
    for r in maps.itertuples():
        assert r.value < 0.9, r
        assert r.value == pytest.approx(r.chance, abs=1e-9), r
        assert "no variance" in r.flags, r
    # replicate retrieval: 3 positives among 3 + 8 controls (activity) - the chance level itself
    act = tidy[(tidy.analysis == "activity") & (tidy.metric == "mAP")]
    if len(act):
        assert act.value.iloc[0] == pytest.approx(copairs_expected_ap(3, 8), abs=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert any("no variance" in str(v) for v in summary["flags"].values())
