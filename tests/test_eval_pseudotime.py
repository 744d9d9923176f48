"""Diffusion pseudotime (scanpy extra) recovers a planted trajectory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

pytest.importorskip("scanpy", reason="diffusion pseudotime needs the scanpy extra")

from celldino.eval.pseudotime import diffusion_pseudotime


def test_dpt_orders_cells_along_a_planted_curve():
    rng = np.random.default_rng(0)
    n = 150
    t = np.sort(rng.random(n))
    curve = np.stack([np.cos(3 * t), np.sin(3 * t), t, t**2], axis=1)  # a bent 1-D path
    X = np.hstack([curve * 5, 0.05 * rng.normal(size=(n, 4))]).astype(np.float32)
    X[:, :4] += 0.05 * rng.normal(size=(n, 4))
    stage = np.where(t < 0.1, "early", "late")
    meta = pd.DataFrame({"Metadata_Stage": stage})
    out, summary = diffusion_pseudotime(
        meta, X, root_by="Metadata_Stage", root_value="early", n_neighbors=10, n_dcs=5
    )
    assert stage[summary["root"]] == "early"
    rho = spearmanr(out.dpt_pseudotime, t)[0]
    assert rho > 0.95
    assert out.dpt_pseudotime.iloc[summary["root"]] == 0.0
    with pytest.raises(ValueError, match="root"):
        diffusion_pseudotime(meta, X)
