"""Training curves and collapse diagnostics from a run's metrics (a frame, or metrics.jsonl read
by `celldino.io.trainrun.read_metrics`)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from celldino.io.trainrun import read_metrics
from celldino.pl.figure import finish, new_figure

PANELS = (
    ("loss", "DINO loss"),
    ("lr", "learning rate"),
    ("momentum", "teacher momentum"),
    ("teacher_entropy", "teacher entropy (nats)"),
    ("kl_student_teacher", "KL(student ‖ teacher)"),
    ("embedding_std", "embedding std (collapse → 0)"),
)


def training_curves(
    metrics: pd.DataFrame | str | Path,
    *,
    out_dim: int | None = None,
    save: str | Path | None = None,
) -> Figure:
    """One panel per diagnostic that was logged; the entropy panel marks log(out_dim)."""
    df = read_metrics(metrics) if not isinstance(metrics, pd.DataFrame) else metrics
    panels = [(k, t) for k, t in PANELS if k in df.columns]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(11, 2.8 * rows)
    x = df["epoch"] if "epoch" in df.columns else df["step"]
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(x, df[key], lw=1.4)
        if key == "teacher_entropy" and out_dim:
            ax.axhline(math.log(out_dim), ls="--", c="grey", lw=1, label="log(out_dim): uniform")
            ax.axhline(0, ls=":", c="grey", lw=1, label="0: one output")
            ax.legend(fontsize=7, frameon=False)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch" if "epoch" in df.columns else "step", fontsize=8)
        ax.tick_params(labelsize=7)
    return finish(fig, save)
