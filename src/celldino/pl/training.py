"""Training curves, collapse diagnostics and the probe learning curve from a run's metrics (a
frame, or metrics.jsonl read by `celldino.io.trainrun.read_metrics`).

metrics.jsonl holds two kinds of record: the training steps (with `loss`) and, with
`train.monitor_label`, the probe records (with `monitor_knn20_f1`); each plot takes its own.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from celldino.io.trainrun import read_metrics
from celldino.pl.figure import finish, new_figure

PANELS = (
    ("loss", "DINO loss"),
    ("loss_over_logk", "DINO loss / log K (1: not learning)"),
    ("lr", "learning rate"),
    ("momentum", "teacher momentum"),
    ("prototypes_used", "prototypes used (teacher argmax)"),
    ("prototype_top_share", "share of the most used prototype"),
    ("mean_teacher_entropy", "entropy of the mean teacher (nats)"),
    ("teacher_entropy", "per-sample teacher entropy (sharpening)"),
    ("kl_student_teacher", "KL(student ‖ teacher)"),
    ("effective_rank", "effective rank of class tokens (collapse → 1)"),
    ("embedding_std", "embedding std (collapse → 0)"),
)
PROBES = (("monitor_knn20_f1", "20-NN (weighted)"), ("monitor_linear_f1", "linear"))


def _frame(metrics: pd.DataFrame | str | Path) -> pd.DataFrame:
    return read_metrics(metrics) if not isinstance(metrics, pd.DataFrame) else metrics


def training_steps(metrics: pd.DataFrame | str | Path) -> pd.DataFrame:
    """The training-step records (those with a loss), without the probe records."""
    df = _frame(metrics)
    return df[df["loss"].notna()].reset_index(drop=True) if "loss" in df.columns else df


def probe_records(metrics: pd.DataFrame | str | Path) -> pd.DataFrame:
    """The probe records of `train.monitor_label` (empty when the monitor was off)."""
    df = _frame(metrics)
    if PROBES[0][0] not in df.columns:
        return df.iloc[0:0]
    return df[df[PROBES[0][0]].notna()].sort_values("step").reset_index(drop=True)


def training_curves(
    metrics: pd.DataFrame | str | Path,
    *,
    out_dim: int | None = None,
    save: str | Path | None = None,
) -> Figure:
    """One panel per diagnostic that was logged; the loss and the entropy panels mark log K
    (`out_dim`): a loss or a mean-teacher entropy there is a uniform teacher."""
    df = training_steps(metrics)
    panels = [(k, t) for k, t in PANELS if k in df.columns and df[k].notna().any()]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(11, 2.8 * rows)
    x = df["epoch"] if "epoch" in df.columns else df["step"]
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(x, df[key], lw=1.4)
        if key in ("teacher_entropy", "mean_teacher_entropy", "loss") and out_dim:
            ax.axhline(math.log(out_dim), ls="--", c="grey", lw=1, label="log K: uniform")
            if key != "loss":
                ax.axhline(0, ls=":", c="grey", lw=1, label="0: one prototype")
            ax.legend(fontsize=7, frameon=False)
        if key == "loss_over_logk":
            ax.axhline(1.0, ls="--", c="grey", lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch" if "epoch" in df.columns else "step", fontsize=8)
        ax.tick_params(labelsize=7)
    return finish(fig, save)


def probe_curve(
    metrics: pd.DataFrame | str | Path,
    *,
    label: str = "",
    save: str | Path | None = None,
) -> Figure:
    """The learning curve of `train.monitor_label`: probe macro-F1 against training steps
    (step 0 is the random initialisation, drawn as dotted lines)."""
    df = probe_records(metrics)
    if df.empty:
        raise ValueError("no probe records in the metrics: train with train.monitor_label=...")
    fig = new_figure(5.5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    for (key, name), colour in zip(PROBES, ("C0", "C1")):
        if key not in df.columns:
            continue
        ax.plot(df["step"], df[key], marker="o", lw=1.4, c=colour, label=name)
        init = df.loc[df["step"] == 0, key]
        if len(init):
            ax.axhline(float(init.iloc[0]), ls=":", c=colour, lw=1, label=f"{name}: random init")
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel("macro-F1" + (f" ({label})" if label else ""), fontsize=8)
    ax.set_title("probe of the teacher during training", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False)
    return finish(fig, save)
