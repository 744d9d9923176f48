"""Training curves and collapse diagnostics from a run's metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from celldino.pl.figure import finish, new_figure

PANELS = (
    ("loss", "DINO loss"),
    ("lr", "learning rate"),
    ("momentum", "teacher momentum"),
    ("teacher_entropy", "teacher entropy (nats)"),
    ("kl_student_teacher", "KL(student ‖ teacher)"),
    ("embedding_std", "embedding std (collapse → 0)"),
)


def read_metrics(path: str | Path) -> pd.DataFrame:
    """metrics.jsonl → DataFrame (one row per logged step); a line that is not JSON is an error
    naming the line."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from None
    if not rows:
        raise ValueError(f"{path} holds no metrics yet: train for at least train.log_every steps")
    return pd.DataFrame(rows)


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
