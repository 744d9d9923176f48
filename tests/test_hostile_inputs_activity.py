"""Hostile inputs around the held-out control split and already-normalised input (issue 21).

Each refusal: exit code 2, one line naming the setting, column or row, earlier outputs kept.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from celldino.config import ProfileConfig
from celldino.pp.fit_split import FIT_COLUMN
from celldino.pp.recipe import process

CTRL = "Metadata_pert_type == 'control'"


def _table(tmp_path, fit_controls: str = "half"):
    """A small profiled screen written as CSV (3 plates, 6 controls and 4 compounds × 3 each)."""
    import anndata as ad

    rng = np.random.default_rng(0)
    rows, X = [], []
    for p in range(3):
        for w in range(6):
            rows.append((f"P{p}", f"C{w}", "control", "DMSO"))
            X.append(5 + 0.3 * rng.normal(size=5))
        for c in range(4):
            for r in range(3):
                rows.append((f"P{p}", f"T{c}{r}", "trt", f"cpd{c}"))
                X.append(5 + 0.3 * rng.normal(size=5) + (c == 0))
    obs = pd.DataFrame(
        rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_pert_type", "Metadata_Compound"]
    )
    a = ad.AnnData(np.array(X), obs=obs)
    a.obs_names = (obs["Metadata_Plate"] + "_" + obs["Metadata_Well"]).tolist()
    a.var_names = [f"Cells_F{j}" for j in range(5)]
    out = process(a, ProfileConfig(controls=CTRL, fit_controls=fit_controls))
    table = pd.concat(
        [out.obs.reset_index(drop=True), pd.DataFrame(out.X, columns=list(out.var_names))], axis=1
    )
    path = tmp_path / f"profiles_{fit_controls}.csv"
    table.to_csv(path, index=False)
    return path, table


@pytest.fixture
def earlier(tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "metrics.csv").write_text("earlier,metrics\n")
    return out


EVAL = ["evaluate.null_size=50", "evaluate.n_boot=0"]


def test_a_bad_fit_mark_is_refused_naming_column_and_row(tmp_path, earlier, run_cli):
    path, table = _table(tmp_path)
    table[FIT_COLUMN] = table[FIT_COLUMN].astype(object)
    table.loc[7, FIT_COLUMN] = "maybe"
    table.to_csv(path, index=False)
    rc, text = run_cli("evaluate", str(path), f"evaluate.out_dir={earlier}", *EVAL)
    assert rc == 2, text
    assert FIT_COLUMN in text and "'maybe'" in text and "row 7" in text
    assert (earlier / "metrics.csv").read_text() == "earlier,metrics\n"


@pytest.mark.parametrize(
    "setting",
    [
        "evaluate.activity_negatives=sometimes",
        "profile.fit_controls=third",
        "profile.input_state=clean",
    ],
)
def test_unknown_setting_values_are_refused_naming_them(tmp_path, earlier, run_cli, setting):
    path, _ = _table(tmp_path)
    cmd = "evaluate" if setting.startswith("evaluate") else "profile"
    args = [str(path), f"evaluate.out_dir={earlier}"] if cmd == "evaluate" else []
    rc, text = run_cli(cmd, *args, setting)
    assert rc == 2, text
    assert setting.split("=")[0] in text and setting.split("=")[1] in text
    assert (earlier / "metrics.csv").read_text() == "earlier,metrics\n"


def test_a_bad_spec_negatives_is_refused_naming_the_key(tmp_path, earlier, run_cli):
    path, _ = _table(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text("analyses: {activity: {negatives: sometimes}}\n")
    rc, text = run_cli(
        "evaluate", str(path), "--spec", str(spec), f"evaluate.out_dir={earlier}", *EVAL
    )
    assert rc == 2, text
    assert "analyses.activity.negatives" in text and "held_out" in text
    assert (earlier / "metrics.csv").read_text() == "earlier,metrics\n"


def test_every_control_fitted_skips_activity_naming_both_ways_out(tmp_path, run_cli):
    """profile.fit_controls=all leaves no held-out control: activity is skipped (said in the
    metrics table and the log), the other analyses run; evaluate.activity_negatives=all scores
    it in-sample with the flag."""
    path, table = _table(tmp_path, fit_controls="all")
    assert table.loc[table["Metadata_pert_type"] == "control", FIT_COLUMN].all()
    out = tmp_path / "ev_all"
    rc, text = run_cli("evaluate", str(path), f"evaluate.out_dir={out}", *EVAL)
    assert rc == 0, text
    m = pd.read_csv(out / "metrics.csv").set_index(["analysis", "metric"])
    why = m.loc[("activity", "skipped"), "flags"]
    assert "profile.fit_controls=half" in why and "evaluate.activity_negatives=all" in why
    assert ("map_replicate", "mAP") in m.index
    out2 = tmp_path / "ev_in_sample"
    rc, text = run_cli(
        "evaluate", str(path), f"evaluate.out_dir={out2}", "evaluate.activity_negatives=all", *EVAL
    )
    assert rc == 0, text
    m2 = pd.read_csv(out2 / "metrics.csv").set_index(["analysis", "metric"])
    assert m2.loc[("activity", "n_negatives_fitted"), "value"] == 18
    assert m2.loc[("activity", "mAP"), "flags"].startswith("in-sample: 18 of the 18")
