"""The report's evaluation, detail-table and appendix sections on an evaluated run folder,
checked against the metrics and tables the evaluation wrote (read back with pandas)."""

from __future__ import annotations

import html
import re
from importlib.metadata import version

import numpy as np
import pandas as pd
import pytest

from celldino.config import EvaluateConfig
from celldino.eval import runner
from celldino.report import build_report
from celldino.report.html import html_table
from celldino.report.sections import MAX_TABLE_ROWS
from test_eval_compare import _frame, _screen

EVIL = "<b>evil</b>"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A run folder with profiles of three feature sets and their evaluation; the learned set
    carries a strong plate offset, the engineered set none."""
    root = tmp_path_factory.mktemp("run")
    (root / "profiles").mkdir()
    meta, centre, X = _screen(0, plate_shift=12.0, signal=1.5)
    meta["Metadata_Compound"] = meta.Metadata_Compound.replace({"m0c0": EVIL})
    rng = np.random.default_rng(1)
    sets = {
        "learned": X,
        "engineered": centre + rng.normal(size=X.shape),
        "random_init": rng.normal(size=X.shape),
    }
    for name, M in sets.items():
        _frame(meta, M).to_parquet(root / "profiles" / f"{name}.parquet", index=False)
    (root / "config.yaml").write_text("run:\n  out_dir: somewhere  # the run's config\n")
    runner.evaluate(
        None,
        spec={
            "inputs": {n: str(root / "profiles" / f"{n}.parquet") for n in sets},
            "analyses": {
                "nsc": {},
                "map_replicate": {},
                "mantel": {"n_permutations": 99},
                "plate_effect": {},
            },
        },
        cfg=EvaluateConfig(out_dir=str(root / "eval"), null_size=100, n_boot=100),
    )
    report = build_report(root)
    return root, report.read_text(), sets, meta


def _cells(page: str, row: str) -> list[str]:
    """The cell texts of the table row whose header is `row`."""
    m = re.search(rf"<tr><th>{re.escape(html.escape(row))}</th>(.*?)</tr>", page)
    assert m, row
    return [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", m.group(1))]


def test_metrics_table_shows_intervals_chance_and_counts_as_integers(evaluated):
    root, page, _, _ = evaluated
    tidy = pd.read_parquet(root / "eval" / "metrics.parquet")
    r = tidy[(tidy.metric == "mAP") & (tidy.feature_set == "engineered")].iloc[0]
    cells = _cells(page, "map_replicate: mAP")  # learned, engineered, random_init
    assert cells[1].startswith(f"{r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
    # counts: integers, never 12.000
    assert _cells(page, "nsc: NSC_n") == [str(int(v)) for v in [12, 12, 12]]
    n = tidy[(tidy.metric == "n_objects") & (tidy.feature_set == "learned")].value.iloc[0]
    assert _cells(page, "mantel: n_objects")[0] == str(int(n)) == "12"
    # chance and permutation p beside each set
    chance = _cells(page, "nsc: NSC")
    assert "learned: chance" in page and "random_init: p_perm" in page and chance
    nsc = tidy[(tidy.metric == "NSC")].set_index("feature_set")
    row = re.search(r"<caption>Chance level.*?</table>", page, re.S).group(0)
    assert f"{nsc.loc['learned', 'chance']:.3f}" in row
    # a baseline row (the permutation null) is never marked best
    assert "★" not in "".join(_cells(page, "mantel: null_q95"))


def test_plate_warning_follows_the_silhouettes(evaluated):
    root, page, _, _ = evaluated
    tidy = pd.read_parquet(root / "eval" / "metrics.parquet")
    pe = tidy[tidy.analysis == "plate_effect"].pivot(
        index="feature_set", columns="metric", values="value"
    )
    for fs, r in pe.iterrows():
        warned = f"{fs}: profiles separate by plate more than by treatment" in html.unescape(page)
        assert warned == (r.plate_agreement - r.treatment_agreement > 0.1)
    assert (
        pe.loc["learned", "plate_dominates"] == 1 and pe.loc["engineered", "plate_dominates"] == 0
    )


def test_detail_tables_are_shown_sorted_and_escaped(evaluated):
    root, page, _, meta = evaluated
    files = sorted((root / "eval" / "tables").glob("*.parquet"))
    assert page.count("<details>") == len(files) > 0
    maps = pd.read_parquet(root / "eval" / "tables" / "map_replicate__engineered__map.parquet")
    top = maps.sort_values("mean_average_precision", ascending=False).iloc[0]
    block = page.split("map_replicate__engineered__map.parquet", 1)[1].split("</table>", 1)[0]
    first = re.search(r"<tbody><tr>(.*?)</tr>", block).group(1)
    assert f"{top.mean_average_precision:.3f}" in first
    assert EVIL not in page and html.escape(EVIL) in page
    nb = pd.read_parquet(root / "eval" / "tables" / "nsc__learned__neighbours.parquet")
    shown = f"{min(len(nb), MAX_TABLE_ROWS)} rows" if len(nb) <= MAX_TABLE_ROWS else "top"
    assert shown in page.split("nsc · neighbours · learned", 1)[1][:200]


def test_appendix_shows_the_config_and_versions(evaluated):
    _, page, _, _ = evaluated
    appendix = page.split('<section id="appendix">', 1)[1]
    assert "out_dir: somewhere  # the run&#x27;s config" in appendix
    for pkg in ("numpy", "pandas", "anndata", "copairs", "torch"):
        assert f"<th>{pkg}</th><td>{version(pkg)}</td>" in appendix
    assert '"null_size": 100' in html.unescape(appendix)  # the evaluation's settings


def test_degenerate_flags_are_warnings(tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    pd.DataFrame(
        {
            "feature_set": ["learned", "learned"],
            "analysis": ["nsc", "nsc"],
            "metric": ["NSC", "NSC_n"],
            "value": [1.0, 3.0],
            "chance": [0.5, np.nan],
            "ci_low": [1.0, np.nan],
            "ci_high": [1.0, np.nan],
            "p_perm": [0.25, np.nan],
            "n_queries": [3.0, np.nan],
            "flags": ["only 3 treatments (< 10)", ""],
        }
    ).to_parquet(eval_dir / "metrics.parquet")
    page = build_report(tmp_path).read_text()
    assert (
        '<p class="warn">⚠ nsc: NSC on learned is degenerate: only 3 treatments (&lt; 10)' in page
    )
    assert page.count("is degenerate") == 1
    assert _cells(page, "nsc: NSC") == ["1.000 [1.000, 1.000]"]
    assert _cells(page, "nsc: NSC_n") == ["3"]
    assert "plate_effect analysis" in page  # the plate check says it was not measured


def test_html_table_prints_count_columns_as_integers():
    df = pd.DataFrame({"n_test": [24.0, np.nan], "macro_f1": [1.0, 0.5]}, index=["a", "b"])
    text = html_table(df)
    assert "<td>24</td>" in text and "<td>1.000</td>" in text and "24.000" not in text


def test_checkpoint_spread_sentence_and_table(tmp_path):
    """The evaluation section states how far the metrics moved between the last checkpoints
    (a hand-made spread table: issue 20's NSC at epochs 1, 2 and 4), or why it was not measured."""
    from celldino.io.files import write_json
    from celldino.io.runlayout import RunLayout
    from celldino.io.tables import write_parquet
    from celldino.report.headline import spread_sentence
    from celldino.report.html import Section
    from celldino.report.sections import spread_part

    values = {
        ("nsc", "NSC"): [0.516, 0.462, 0.559],
        ("map_moa", "mAP"): [0.300, 0.320, 0.310],
        ("cell_probe", "linear_f1"): [0.610, 0.640, 0.600],
    }
    rows = []
    for (analysis, metric), v in values.items():
        for checkpoint, epoch, x in zip(("epoch_0001", "epoch_0002", "final"), (1, 2, 4), v):
            rows.append(
                {
                    "analysis": analysis,
                    "metric": metric,
                    "checkpoint": checkpoint,
                    "epoch": epoch,
                    "value": x,
                    "low": min(v),
                    "high": max(v),
                    "spread": max(v) - min(v),
                }
            )
    table = pd.DataFrame(rows)
    assert spread_sentence(table) == (
        "Between the last 3 checkpoints of this run (epochs 1, 2, 4) NSC moved by 0.097 "
        "(0.462–0.559), MoA mAP by 0.020 (0.300–0.320), cell linear F1 by 0.040 (0.600–0.640): "
        "differences between feature sets smaller than this are within checkpoint noise. The "
        "last checkpoints of a cosine schedule move little, so this is a lower bound on the noise "
        "between training runs; the 95% intervals (and a rerun with another train.seed) are the "
        "wider measure."
    )
    lay = RunLayout(tmp_path)
    lay.eval_checkpoints.mkdir(parents=True)
    write_parquet(table, lay.checkpoint_spread)
    sec = Section("evaluation", "Evaluation")
    spread_part(sec, lay)
    page = html.unescape("".join(sec.parts))
    assert "NSC moved by 0.097 (0.462–0.559)" in page
    assert "<th>epoch 1</th><th>epoch 2</th><th>final</th><th>spread (max − min)</th>" in page
    assert re.search(r"<th>nsc: NSC</th><td[^>]*>0\.516</td><td[^>]*>0\.462</td>", page)
    # no table: the recorded reason
    lay.checkpoint_spread.unlink()
    write_json(lay.checkpoint_spread_record, {"skipped": "run.spread_checkpoints=0"})
    sec = Section("evaluation", "Evaluation")
    spread_part(sec, lay)
    assert "Checkpoint spread: not measured (run.spread_checkpoints=0)" in "".join(sec.parts)
