"""The headline table (report/headline.py), the report's single-cell probe section and the lines
`celldino run` prints at its end, on small metrics tables written by hand."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import pytest

from celldino.report import build_report
from celldino.report.headline import (
    format_headline,
    headline_table,
    learned_vs_random_sentence,
    probe_sentence,
)

NAN = np.nan


def _metrics() -> pd.DataFrame:
    """cell_probe: engineered ahead of learned on the linear probe with overlapping intervals;
    learned ahead on the 20-NN with intervals apart; NSC, map_moa, a skipped row, a count."""
    rows = [
        ("learned", "cell_probe", "linear_f1", 0.47, 0.25, 0.44, 0.50),
        ("engineered", "cell_probe", "linear_f1", 0.52, 0.25, 0.49, 0.55),
        ("random_init", "cell_probe", "linear_f1", 0.30, 0.25, 0.27, 0.33),
        ("learned", "cell_probe", "knn20_f1", 0.61, 0.25, 0.58, 0.64),
        ("engineered", "cell_probe", "knn20_f1", 0.40, 0.25, 0.37, 0.43),
        ("random_init", "cell_probe", "knn20_f1", 0.35, 0.25, 0.31, 0.39),
        ("learned", "cell_probe", "n_cells", 400, NAN, NAN, NAN),
        ("learned", "nsc", "NSC", 0.75, 0.2, 0.6, 0.9),
        ("random_init", "nsc", "NSC", 0.25, 0.2, 0.1, 0.4),
        ("learned", "map_moa", "mAP", 0.333, 0.1, NAN, NAN),
        ("pca_engineered", "cell_probe", "skipped", NAN, NAN, NAN, NAN),
    ]
    cols = ["feature_set", "analysis", "metric", "value", "chance", "ci_low", "ci_high"]
    df = pd.DataFrame(rows, columns=cols)
    df["flags"] = np.where(df.metric == "skipped", "skipped: no per-cell table", "")
    return df


def test_headline_table_is_sets_by_metrics_with_intervals():
    t = headline_table(_metrics())
    assert list(t.index) == ["learned", "engineered", "random_init"]  # no row for a skip only
    assert list(t.columns) == ["cell linear F1", "cell 20-NN F1", "NSC", "MoA mAP"]  # no NSCB
    assert t.loc["engineered", "cell linear F1"] == "0.520 [0.490, 0.550]"
    assert t.loc["learned", "MoA mAP"] == "0.333"  # no interval: the value alone
    assert t.loc["engineered", "NSC"] == "–"  # not measured for this set
    assert headline_table(_metrics().query("analysis == 'mantel'")).empty


def test_probe_sentences_name_the_winner_and_whether_it_is_resolved():
    lin = probe_sentence(_metrics(), "linear_f1")
    assert lin == (
        "Linear probe: engineered wins (0.520 [0.490, 0.550]) over learned (0.470 [0.440, "
        "0.500]); the intervals overlap, so the difference is not shown resolved (a "
        "conservative check: there is no paired difference for this pair)."
    )
    knn = probe_sentence(_metrics(), "knn20_f1")
    assert knn.startswith("Weighted 20-NN: learned wins (0.610 [0.580, 0.640]) over engineered")
    assert "the intervals are apart, so learned is better" in knn  # 0.58 > 0.43
    no_ci = _metrics().assign(ci_low=NAN, ci_high=NAN)
    assert "not resolved" in probe_sentence(no_ci, "knn20_f1")
    assert probe_sentence(_metrics().query("feature_set == 'learned'"), "linear_f1") is None
    text = format_headline(_metrics())
    table = headline_table(_metrics()).to_string().splitlines()
    assert text.splitlines()[1 : 1 + len(table)] == table
    assert lin in text and knn in text


def _close_pair() -> pd.DataFrame:
    """learned ahead of random_init with overlapping marginal intervals."""
    rows = [
        ("learned", "cell_probe", "linear_f1", 0.50, 0.25, 0.45, 0.55),
        ("random_init", "cell_probe", "linear_f1", 0.47, 0.25, 0.42, 0.52),
        ("engineered", "cell_probe", "linear_f1", 0.20, 0.25, 0.15, 0.25),
    ]
    cols = ["feature_set", "analysis", "metric", "value", "chance", "ci_low", "ci_high"]
    return pd.DataFrame(rows, columns=cols).assign(flags="")


def _paired(d, lo, hi, feature_set="learned", reference="random_init") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "feature_set": [feature_set],
            "reference": reference,
            "metric": "linear_f1",
            "difference": d,
            "ci_low": lo,
            "ci_high": hi,
            "n_wells": 48,
        }
    )


def test_learned_vs_random_init_sentence_reads_the_paired_interval():
    up = learned_vs_random_sentence(_paired(0.038, 0.006, 0.067), "linear_f1")
    assert up == (
        "Linear probe, learned − random init on the same cells: +0.038 [+0.006, +0.067], "
        "above 0: training helped."
    )
    assert "includes 0: not resolved" in learned_vs_random_sentence(
        _paired(0.001, -0.031, 0.030), "linear_f1"
    )
    assert "below 0: training hurt" in learned_vs_random_sentence(
        _paired(-0.04, -0.07, -0.01), "linear_f1"
    )
    # the pair stored the other way round is turned; another pair or metric gives nothing
    turned = _paired(-0.038, -0.067, -0.006, "random_init", "learned")
    assert "+0.038 [+0.006, +0.067]" in learned_vs_random_sentence(turned, "linear_f1")
    assert learned_vs_random_sentence(_paired(0.1, 0.0, 0.2, "engineered"), "linear_f1") is None
    assert learned_vs_random_sentence(_paired(0.1, 0.05, 0.2), "knn20_f1") is None


def test_probe_sentence_uses_the_paired_difference_of_the_pair_when_there_is_one():
    """The same bootstrap draws for both sets: a paired interval above 0 resolves the win even
    where the marginal intervals overlap (0.45 < 0.52)."""
    m = _close_pair()
    assert "intervals overlap" in probe_sentence(m, "linear_f1")  # no paired table
    got = probe_sentence(m, "linear_f1", paired=_paired(0.03, 0.01, 0.05))
    assert got == (
        "Linear probe: learned wins (0.500 [0.450, 0.550]) over random_init (0.470 [0.420, "
        "0.520]); the paired difference +0.030 [+0.010, +0.050] (same bootstrap draws) is above "
        "0, so learned is better on these cells."
    )
    got = probe_sentence(m, "linear_f1", paired=_paired(0.03, -0.01, 0.07))
    assert "+0.030 [-0.010, +0.070]" in got and "not resolved" in got
    # the winner is the reference: the difference read the other way round
    m2 = m.assign(feature_set=["random_init", "engineered", "learned"])
    got = probe_sentence(m2, "linear_f1", paired=_paired(-0.03, -0.05, -0.01, "engineered"))
    assert "random_init wins" in got and "+0.030 [+0.010, +0.050]" in got
    assert "random_init is better" in got
    # a paired row for another pair only: the marginal check
    other = _paired(0.3, 0.2, 0.4, "engineered")
    assert "intervals overlap" in probe_sentence(m, "linear_f1", paired=other)


def test_report_and_headline_read_the_paired_difference(tmp_path):
    from celldino.report.headline import headline_of_run

    (tmp_path / "eval" / "tables").mkdir(parents=True)
    _close_pair().to_parquet(tmp_path / "eval" / "metrics.parquet")
    _paired(0.03, 0.01, 0.05).to_parquet(
        tmp_path / "eval" / "tables" / "cell_probe__learned__paired_difference.parquet"
    )
    want = probe_sentence(_close_pair(), "linear_f1", paired=_paired(0.03, 0.01, 0.05))
    assert "is above 0" in want
    assert want in headline_of_run(tmp_path).splitlines()
    page = build_report(tmp_path).read_text()
    assert html.escape(want) in page


def _run_with_metrics(root, metrics: pd.DataFrame):
    (root / "eval" / "tables").mkdir(parents=True)
    metrics.to_parquet(root / "eval" / "metrics.parquet")
    paired = pd.DataFrame(
        {
            "feature_set": ["learned", "learned"],
            "reference": "random_init",
            "metric": ["linear_f1", "knn20_f1"],
            "difference": [0.17, 0.26],
            "ci_low": [0.12, 0.20],
            "ci_high": [0.22, 0.31],
            "n_wells": 48,
        }
    )
    paired.to_parquet(root / "eval" / "tables" / "cell_probe__learned__paired_difference.parquet")


def test_report_section_shows_scores_chance_sentences_and_paired_difference(tmp_path):
    m = _metrics()
    m.loc[m.feature_set == "engineered", "feature_set"] = "<b>eng</b>"  # names are escaped
    _run_with_metrics(tmp_path, m)
    page = build_report(tmp_path).read_text()
    sec = page[page.index('<section id="cell_probe">') :]
    sec = sec[: sec.index("</section>")]
    assert html.escape(probe_sentence(m, "linear_f1")) in sec
    assert "<b>eng</b>" not in sec and "&lt;b&gt;eng&lt;/b&gt;" in sec
    assert "0.610 [0.580, 0.640]" in sec and "0.250" in sec  # interval and chance
    assert "0.170 [0.120, 0.220]" in sec  # the paired difference with its interval


def test_report_section_says_when_cell_probe_was_not_run(tmp_path):
    _run_with_metrics(tmp_path, _metrics().query("analysis != 'cell_probe'"))
    page = build_report(tmp_path).read_text()
    sec = page[page.index('<section id="cell_probe">') :]
    assert "Single-cell probes: not measured" in sec[: sec.index("</section>")]


@pytest.mark.parametrize("command", ["run", "demo"])
def test_run_and_demo_print_the_headline_then_the_report_path(
    tmp_path, monkeypatch, capsys, command
):
    from celldino import cli

    def fake(cfg, force=()):
        _run_with_metrics(tmp_path / "out", _metrics())
        return tmp_path / "out" / "report.html"

    monkeypatch.setattr("celldino.pipeline.run_pipeline", fake)
    monkeypatch.setattr("celldino.pipeline.run_demo", fake)
    assert cli.main([command, f"run.out_dir={tmp_path / 'out'}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(tmp_path / "out" / "report.html")
    assert lines[0].startswith("Headline")
    table = headline_table(_metrics()).to_string().splitlines()
    assert lines[1 : 1 + len(table)] == table
    assert probe_sentence(_metrics(), "linear_f1") in lines


def test_run_without_evaluate_says_the_headline_is_from_an_earlier_evaluation(
    tmp_path, monkeypatch, capsys
):
    """eval/ left by an earlier run is not this invocation's: the headline says so."""
    from celldino import cli

    _run_with_metrics(tmp_path / "out", _metrics())  # an earlier evaluation

    def fake(cfg, force=()):
        return tmp_path / "out"

    monkeypatch.setattr("celldino.pipeline.run_pipeline", fake)
    argv = ["run", f"run.out_dir={tmp_path / 'out'}", "run.stages=prepare,train"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("From an earlier evaluation") and "run.stages" in lines[0]
    assert str(tmp_path / "out" / "eval") in lines[0]
    assert lines[1].startswith("Headline") and lines[-1] == str(tmp_path / "out")
