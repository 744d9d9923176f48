"""The headline numbers of an evaluation, in one place: feature sets × the metrics that tell
models apart (single-cell probes, NSC / NSCB, MoA mAP), each with its 95% interval, and one
sentence per probe saying which feature set wins and whether the win is resolved.

`celldino run` / `demo` print `format_headline` before the report path; the report's
`section_cell_probe` shows the same table and sentences. `spread_sentence` says how far those
metrics moved between the run's last checkpoints (the checkpoint spread, `eval/checkpoints/`):
the size of a difference between feature sets that is checkpoint noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

# (analysis, metric, column title) of the headline table, in order
HEADLINE_METRICS = (
    ("cell_probe", "linear_f1", "cell linear F1"),
    ("cell_probe", "knn20_f1", "cell 20-NN F1"),
    ("nsc", "NSC", "NSC"),
    ("nsc", "NSCB", "NSCB"),
    ("map_moa", "mAP", "MoA mAP"),
)
SET_ORDER = ("learned", "engineered", "pca_engineered", "random_init")


def probe_words(metric: str) -> str:
    """'Linear probe' for linear_f1, 'Weighted <k>-NN' for knn<k>_f1."""
    if metric == "linear_f1":
        return "Linear probe"
    k = metric.removeprefix("knn").removesuffix("_f1")
    return f"Weighted {k}-NN" if metric.startswith("knn") and k.isdigit() else metric


def probe_metrics(metrics: pd.DataFrame, analysis: str = "cell_probe") -> list[str]:
    """The probe scores of `analysis` in `metrics` (linear_f1, knn<k>_f1), in order."""
    names = metrics.loc[metrics["analysis"] == analysis, "metric"].astype(str)
    return list(dict.fromkeys(m for m in names if m.endswith("_f1")))


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def with_interval(value, lo, hi) -> str:
    """'0.520 [0.490, 0.550]'; the value alone without an interval; '–' without a value."""
    v, a, b = _num(value), _num(lo), _num(hi)
    if math.isnan(v):
        return "–"
    text = f"{v:.3f}"
    if not (math.isnan(a) or math.isnan(b)):
        text += f" [{a:.3f}, {b:.3f}]"
    return text


def _scored(metrics: pd.DataFrame, analysis: str, metric: str) -> pd.DataFrame:
    rows = metrics[(metrics["analysis"] == analysis) & (metrics["metric"] == metric)]
    return rows[pd.to_numeric(rows["value"], errors="coerce").notna()]


def headline_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Feature sets (rows: learned, engineered, pca_engineered, random_init, then others) ×
    headline metrics (columns present in `metrics`), each cell 'value [ci_low, ci_high]', '–'
    where the set has no value. Empty when no headline metric was measured."""
    cols = {}
    for analysis, metric, title in HEADLINE_METRICS:
        rows = _scored(metrics, analysis, metric)
        if len(rows):
            cols[title] = {
                str(r.feature_set): with_interval(
                    r.value, getattr(r, "ci_low", None), getattr(r, "ci_high", None)
                )
                for r in rows.itertuples(index=False)
            }
    table = pd.DataFrame(cols)
    if table.empty:
        return table
    order = [s for s in SET_ORDER if s in table.index]
    table = table.loc[order + sorted(s for s in table.index if s not in order)]
    table.index.name = "feature set"
    return table.fillna("–")


def _paired_row(paired: pd.DataFrame | None, metric: str, a: str, b: str):
    """(difference a − b, ci_low, ci_high) from cell_probe's paired table (same bootstrap draws
    for both sets), or None when it has no row for the pair or no interval."""
    if paired is None or paired.empty:
        return None
    rows = paired[paired["metric"].astype(str) == metric]
    for r in rows.itertuples(index=False):
        d, lo, hi = _num(r.difference), _num(r.ci_low), _num(r.ci_high)
        if math.isnan(lo) or math.isnan(hi):
            continue
        if (str(r.feature_set), str(r.reference)) == (a, b):
            return d, lo, hi
        if (str(r.feature_set), str(r.reference)) == (b, a):
            return -d, -hi, -lo
    return None


def probe_sentence(
    metrics: pd.DataFrame,
    metric: str,
    analysis: str = "cell_probe",
    paired: pd.DataFrame | None = None,
) -> str | None:
    """One sentence: which feature set scores best on `metric`, the runner-up, and whether the
    win is resolved. With a row for that pair in `paired` (cell_probe's paired_difference
    tables: the difference on the same bootstrap draws), resolved means its interval is above
    0; otherwise the marginal 95% intervals must be apart (conservative: overlapping marginal
    intervals can hide a resolved paired difference). None when fewer than two sets were
    scored."""
    rows = _scored(metrics, analysis, metric).copy()
    if len(rows) < 2:
        return None
    rows["value"] = pd.to_numeric(rows["value"])
    rows = rows.sort_values("value", ascending=False, kind="stable")
    win, second = rows.iloc[0], rows.iloc[1]
    what = probe_words(metric)

    def num(r) -> str:
        return with_interval(r["value"], r.get("ci_low"), r.get("ci_high"))

    if win["value"] == second["value"]:
        return (
            f"{what}: {win.feature_set} and {second.feature_set} tie ({num(win)}), so neither wins."
        )
    pair = _paired_row(paired, metric, str(win.feature_set), str(second.feature_set))
    lo, hi = _num(win.get("ci_low")), _num(second.get("ci_high"))
    if pair is not None:
        d, plo, phi = pair
        said = f"the paired difference {d:+.3f} [{plo:+.3f}, {phi:+.3f}] (same bootstrap draws)"
        if plo > 0:
            verdict = f"{said} is above 0, so {win.feature_set} is better on these cells"
        else:
            verdict = f"{said} is not above 0, so the difference is not resolved"
    elif math.isnan(lo) or math.isnan(hi):
        verdict = "there are no intervals (evaluate.n_boot=0), so the difference is not resolved"
    elif lo > hi:
        verdict = f"the intervals are apart, so {win.feature_set} is better on these cells"
    else:
        verdict = (
            "the intervals overlap, so the difference is not shown resolved (a conservative "
            "check: there is no paired difference for this pair)"
        )
    return (
        f"{what}: {win.feature_set} wins ({num(win)}) over {second.feature_set} "
        f"({num(second)}); {verdict}."
    )


def read_paired(eval_dir: str | Path) -> pd.DataFrame | None:
    """cell_probe's paired_difference tables of an eval folder, concatenated (None if none)."""
    from celldino.io import results

    files = results.list_tables(Path(eval_dir))
    files = files[(files.analysis == "cell_probe") & (files.table == "paired_difference")]
    if not len(files):
        return None
    return pd.concat([results.read_table(p) for p in files.path], ignore_index=True)


def learned_vs_random_sentence(paired: pd.DataFrame | None, metric: str) -> str | None:
    """Does self-supervision beat its own random initialisation on `metric`? One sentence from
    cell_probe's paired difference learned − random_init (None without that row)."""
    pair = _paired_row(paired, metric, "learned", "random_init")
    if pair is None:
        return None
    d, lo, hi = pair
    verdict = (
        "above 0: training helped"
        if lo > 0
        else "below 0: training hurt"
        if hi < 0
        else "includes 0: not resolved"
    )
    return (
        f"{probe_words(metric)}, learned − random init on the same cells: {d:+.3f} "
        f"[{lo:+.3f}, {hi:+.3f}], {verdict}."
    )


def format_headline(metrics: pd.DataFrame, paired: pd.DataFrame | None = None) -> str:
    """The headline table as plain text (aligned columns) followed by the probe sentences
    (`paired`: cell_probe's paired differences, see `probe_sentence`); '' when no headline
    metric was measured."""
    table = headline_table(metrics)
    if table.empty:
        return ""
    lines = ["Headline (95% intervals in brackets; eval/metrics.parquet has them all):"]
    lines += table.to_string().splitlines()
    for metric in probe_metrics(metrics):
        for s in (
            probe_sentence(metrics, metric, paired=paired),
            learned_vs_random_sentence(paired, metric),
        ):
            if s:
                lines.append(s)
    return "\n".join(lines)


def spread_sentence(spread: pd.DataFrame) -> str | None:
    """One sentence on the checkpoint spread table (`io.results.SPREAD_COLUMNS`): how far each
    headline metric moved between the checkpoints evaluated, e.g. 'Between the last 3
    checkpoints of this run (epochs 2, 3, 4) NSC moved by 0.097 (0.462–0.559), ...: differences
    between feature sets smaller than this are within checkpoint noise.' None when no metric was
    measured at two checkpoints or more."""
    if spread is None or spread.empty:
        return None
    titles = {(a, m): t for a, m, t in HEADLINE_METRICS}
    parts = []
    for (analysis, metric), g in spread.groupby(["analysis", "metric"], sort=False):
        if g["value"].notna().sum() < 2 or math.isnan(_num(g["spread"].iloc[0])):
            continue
        title = titles.get((analysis, metric), f"{analysis} {metric}")
        moved = f"{g['spread'].iloc[0]:.3f} ({g['low'].iloc[0]:.3f}–{g['high'].iloc[0]:.3f})"
        parts.append((title, moved))
    if not parts:
        return None
    epochs = sorted({int(e) for e in spread["epoch"]})
    said = [f"{parts[0][0]} moved by {parts[0][1]}"] + [f"{t} by {m}" for t, m in parts[1:]]
    return (
        f"Between the last {len(epochs)} checkpoints of this run (epochs "
        f"{', '.join(map(str, epochs))}) {', '.join(said)}: differences between feature sets "
        "smaller than this are within checkpoint noise. The last checkpoints of a cosine "
        "schedule move little, so this is a lower bound on the noise between training runs; "
        "the 95% intervals (and a rerun with another train.seed) are the wider measure."
    )


def headline_of_run(run_dir: str | Path) -> str:
    """`format_headline` of a run folder's eval/metrics.parquet ('' when there is none),
    followed by the checkpoint-spread sentence when the run has one."""
    from celldino.io import results
    from celldino.io.runlayout import RunLayout

    lay = RunLayout(Path(run_dir))
    try:
        metrics = results.read_results(lay.eval)
    except FileNotFoundError:
        return ""
    text = format_headline(metrics, read_paired(lay.eval))
    spread, _ = results.read_checkpoint_spread(lay.eval_checkpoints)
    sentence = spread_sentence(spread) if spread is not None else None
    return f"{text}\n{sentence}" if text and sentence else text
