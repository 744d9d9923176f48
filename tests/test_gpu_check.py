"""bench/gpu_check.sh --smoke: the GPU check runs end to end on the CPU at tiny sizes, with the
packages the GPU machine lacks made unimportable, so it cannot rot before a GPU session uses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING_ON_GPU = "kornia,zarr,anndata,duckdb,copairs,pycytominer,harmonypy,cp_measure,umap"


@pytest.mark.slow
def test_smoke_runs_every_section(tmp_path):
    env = {**os.environ, "GPU_CHECK_BLOCK": MISSING_ON_GPU, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=None,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    s = data["sections"]
    assert not [k for k in s if k.endswith("_error")], s

    ts = s["train_step"]
    row = ts["rows"][0]
    assert row["precision"] == "fp32" and row["images_per_s"] > 0 and row["loss_finite"]
    # FlopCounterMode's count of the backbone forward against the analytic ViT formula
    counted, analytic = ts["backbone_fwd_flops_counted"], ts["backbone_fwd_flops_analytic"]
    assert abs(counted - analytic) / analytic < 0.05
    assert ts["flops_per_step"] > 3 * 2 * counted  # student fwd + bwd and teacher fwd, 2 images

    ex = s["extract"]  # HF ViTModel given celldino's weights computes the same class token
    assert ex["cls_max_abs_diff_fp32"] < 1e-4
    assert (
        ex["rows"]["celldino"]["images_per_s"] > 0 and ex["rows"]["HF ViTModel"]["images_per_s"] > 0
    )

    bb = s["bbbc021"]  # trained, then scored by bench/real_cells.py score through its CLI
    assert bb["train"]["epochs"] >= 1 and bb["score"]["returncode"] == 0, bb["score"]
    head = bb["score"]["headline"]["bbbc021_vits"]
    assert 0.0 <= head["dose kNN k=5"] <= 1.0 and 0.0 <= head["compound linear"] <= 1.0
    assert (tmp_path / "bbbc021_metrics.jsonl").read_text().count("\n") >= 1
    assert "celldino / HF ViTModel" in proc.stdout and "BBBC021" in proc.stdout


def test_steady_rate_drops_the_warm_up(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import _rate

    # batch 10: 100 images in the first 10 s (slow start), then 10 steps (100 images) in 1 s
    recs = [{"step": 10, "images_per_s": 10.0}, {"step": 20, "images_per_s": 200 / 11}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert _rate(tmp_path, batch=10) == pytest.approx(100.0)
