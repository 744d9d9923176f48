"""Figure plumbing shared by the plots: a headless backend and saving by suffix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are files, never windows
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    return plt.figure(figsize=(width, height), layout="constrained")


def finish(fig: Figure, save: str | Path | None) -> Figure:
    """Save (PNG/SVG by suffix) when asked, and return the figure."""
    if save is not None:
        path = Path(save)
        if path.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise ValueError(
                f"cannot save a figure as '{path.suffix}' ({path}): use .png, .svg or .pdf"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
