"""`celldino run` end to end on the tiny screen, stage skipping, failures, and the report in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from celldino import cli
from celldino.config import ConfigError, load_config
from celldino.pipeline import StageError, run_pipeline

pytestmark = pytest.mark.slow

# A plate name that would run script in the report if any metadata were not escaped.
EVIL_PLATE = '<img src=x onerror="document.title=1">'

SETTINGS = [
    "prepare.crop_size=32",
    "prepare.nuclei_min_area=30",
    "prepare.cell_expand=8",
    "model.depth=2",
    "model.patch_size=8",
    "model.img_size=32",
    "model.out_dim=256",
    "model.drop_path_rate=0.0",
    "augment.global_crop_size=32",
    "augment.local_crop_size=16",
    "augment.n_local_crops=2",
    "train.epochs=1",
    "train.batch_size=32",
    "train.log_every=2",
    "extract.batch_size=64",
    "extract.attention_sample=4",
    "evaluate.null_size=200",
]


@pytest.fixture(scope="module")
def pipeline_run(tiny_screen, tmp_path_factory):
    """The whole pipeline on a copy of the tiny screen whose first plate has a hostile name."""
    root = tmp_path_factory.mktemp("pipeline")
    ld = pd.read_csv(tiny_screen / "load_data.csv")
    ld["Metadata_Plate"] = ld["Metadata_Plate"].replace({"P01": EVIL_PLATE})
    ld.to_csv(root / "load_data.csv", index=False)
    cfg = load_config(
        None,
        [*SETTINGS, f"prepare.load_data={root / 'load_data.csv'}", f"run.out_dir={root / 'run'}"],
    )
    report = run_pipeline(cfg)
    return cfg, root / "run", report


def test_pipeline_writes_every_stage(pipeline_run):
    cfg, run, report = pipeline_run
    assert report == run / "report.html" and report.exists()
    record = json.loads((run / "pipeline.json").read_text())
    assert set(record["stages"]) == {"prepare", "train", "extract", "profile", "evaluate", "report"}
    metrics = pd.read_parquet(run / "eval" / "metrics.parquet")
    metrics = metrics[metrics.metric != "skipped"]  # rows that name a skipped analysis
    # learned embeddings, and every baseline beside them, on the same analyses
    assert {"learned", "engineered", "pca_engineered", "random_init"} <= set(metrics.feature_set)
    per_set = metrics.groupby("feature_set").metric.apply(set)
    assert per_set["learned"] == per_set["random_init"]
    # attention maps exist for the two models only; the engineered set is mantel's reference
    ran = metrics.groupby("analysis").feature_set.apply(set)
    assert ran["attention_iou"] == {"learned", "random_init"}
    assert ran["mantel"] == {"learned", "random_init", "pca_engineered"}
    models_only = metrics.analysis.isin(["mantel", "attention_iou"])
    per_set = metrics[~models_only].groupby("feature_set").metric.apply(set)
    assert per_set["learned"] == per_set["random_init"] == per_set["engineered"]
    assert metrics.value.notna().any()
    cells = pd.read_parquet(run / "prep" / "cells.parquet")
    emb = pd.concat(
        pd.read_parquet(p) for p in sorted((run / "embeddings" / "learned").glob("*.parquet"))
    )
    # the folder reads as one table (docs/extraction.md), the attention store beside the shards
    assert (run / "embeddings" / "learned" / "_attention.zarr").is_dir()
    whole = pd.read_parquet(run / "embeddings" / "learned")
    assert sorted(whole.Metadata_CellID) == sorted(emb.Metadata_CellID)
    assert len(emb) == len(cells)  # one embedding per prepared cell
    assert EVIL_PLATE in set(emb.Metadata_Plate)  # metadata carried through unchanged


def test_rerun_skips_finished_stages_and_redoes_changed_ones(pipeline_run, caplog):
    cfg, run, _ = pipeline_run
    before = json.loads((run / "pipeline.json").read_text())["stages"]
    mtime = (run / "train" / "checkpoints" / "last.safetensors").stat().st_mtime_ns
    caplog.set_level("INFO", logger="celldino")
    run_pipeline(cfg)
    skipped = [
        r.getMessage().split(":")[0] for r in caplog.records if "up to date" in r.getMessage()
    ]
    assert skipped == [
        "stage prepare",
        "stage train",
        "stage extract",
        "stage profile",
        "stage evaluate",
        "stage report",
    ]
    assert (run / "train" / "checkpoints" / "last.safetensors").stat().st_mtime_ns == mtime
    # A changed evaluation setting reruns evaluate and report only.
    caplog.clear()
    from celldino.config import replace

    run_pipeline(replace(cfg, **{"evaluate.null_size": 100}))
    ran = [
        r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().endswith(": running")
    ]
    assert ran == ["stage evaluate", "stage report"]
    after = json.loads((run / "pipeline.json").read_text())["stages"]
    assert after["train"] == before["train"] and after["evaluate"] != before["evaluate"]
    # A worker count changes speed, not results: nothing reruns.
    caplog.clear()
    run_pipeline(replace(cfg, **{"evaluate.null_size": 100, "prepare.workers": 2}))
    assert not [r for r in caplog.records if r.getMessage().endswith(": running")]
    # Forcing train trains again from scratch (not a no-op resume) and reruns what follows.
    caplog.clear()
    run_pipeline(replace(cfg, **{"evaluate.null_size": 100}), force=("train",))
    ran = [
        r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().endswith(": running")
    ]
    assert ran == [
        "stage train",
        "stage extract",
        "stage profile",
        "stage evaluate",
        "stage report",
    ]
    assert (run / "train" / "checkpoints" / "last.safetensors").stat().st_mtime_ns != mtime


def test_failure_names_the_stage_and_keeps_earlier_outputs(pipeline_run, tmp_path):
    cfg, run, _ = pipeline_run
    from celldino.config import replace

    work = tmp_path / "copy"
    shutil.copytree(run, work)
    ckpt = work / "train" / "checkpoints" / "last.safetensors"
    digest = ckpt.read_bytes()
    record = (work / "pipeline.json").read_bytes()
    # a column the table lacks is found before any stage starts: nothing is touched
    missing = replace(cfg, **{"run.out_dir": str(work), "profile.by": ("Metadata_Nope",)})
    with pytest.raises(ConfigError, match="Metadata_Nope"):
        run_pipeline(missing)
    assert (work / "pipeline.json").read_bytes() == record
    # a failure inside a stage names the stage
    bad = replace(cfg, **{"run.out_dir": str(work), "profile.normalize": "bogus"})
    with pytest.raises(StageError, match="stage 'profile' failed"):
        run_pipeline(bad)
    assert ckpt.read_bytes() == digest
    assert (work / "prep" / "cells.parquet").exists()
    assert len(list((work / "embeddings" / "learned").glob("*.parquet"))) > 0


def _chromium() -> str:
    """The headless browser of the report test. `.ci/run` installs Debian's `chromium` before
    the tests (the test itself installs nothing); without one it fails under CI, else skips."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium not installed (apt-get install chromium to run the report test)")


CHECK_JS = """
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const out = {
    sections: [...document.querySelectorAll('section')].map(s => s.id),
    images: imgs.length,
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    best: document.querySelectorAll('td.best').length,
    title: document.title,
    evil_nodes: document.querySelectorAll('img[onerror]').length,
    text: document.body.innerText.includes('onerror="document.title=1"'),
    details: document.querySelectorAll('#tables details').length,
    iou_maps: document.querySelectorAll('#attention img[alt*="IoU"]').length,
    warnings: document.querySelectorAll('#evaluation p.warn').length,
    evaluation: document.querySelector('#evaluation').innerText,
    appendix: document.querySelector('#appendix').innerText,
    sorted: (() => {  // click a numeric column's header of the first sortable table
      const t = document.querySelector('table.sortable');
      if (!t) return null;
      const rows = () => [...t.tBodies[0].rows];
      const heads = [...t.tHead.rows[0].cells];
      const col = heads.findIndex((h, i) => i > 0 &&
        rows().every(r => !isNaN(parseFloat(r.cells[i].textContent))));
      if (col < 0) return null;
      heads[col].click();
      const v = rows().map(r => parseFloat(r.cells[col].textContent));
      return v.every((x, i) => i === 0 || v[i - 1] <= x);
    })(),
  };
  const pre = document.createElement('pre'); pre.id = 'celldino-check';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>
"""


def test_report_renders_in_chromium(pipeline_run, tmp_path):
    _, run, report = pipeline_run
    html = report.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: no network
    assert EVIL_PLATE not in html  # escaped everywhere
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", CHECK_JS + "</body>"))
    browser = _chromium()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180
    )
    marker = dom.stdout.split('<pre id="celldino-check">', 1)
    assert len(marker) == 2, f"chromium did not render the report: {dom.stderr[-2000:]}"
    check = json.loads(marker[1].split("</pre>", 1)[0].replace("&quot;", '"').replace("&amp;", "&"))
    assert check["sections"] == [
        "data",
        "training",
        "umap",
        "evaluation",
        "cell_probe",
        "tables",
        "attention",
        "appendix",
    ]
    # the evaluation's detail tables (one per file under eval/tables), sortable in the browser
    assert check["details"] == len(list((run / "eval" / "tables").glob("*.parquet"))) > 0
    assert check["sorted"] is True
    # statistics, the plate check and the new analyses with their baselines
    tidy = pd.read_parquet(run / "eval" / "metrics.parquet")
    tidy = tidy[tidy.metric != "skipped"]
    # head × channel IoU heatmaps of learned and random_init, each with its shuffled-cell null
    assert check["iou_maps"] == 2 * len(set(tidy[tidy.analysis == "attention_iou"].feature_set))
    assert {"plate_effect", "attention_iou", "mantel"} <= set(tidy.analysis)
    ev = check["evaluation"]
    assert "Chance level" in ev and "attention_iou: null_best_channel_iou" in ev
    assert ("separate by plate more than by treatment" in ev) == bool(
        (tidy[tidy.metric == "plate_dominates"].value == 1).any()
    )
    assert "numpy" in check["appendix"] and "evaluate:" in check["appendix"]  # versions, config
    assert check["images"] >= 6 and check["loaded"] == check["images"]
    assert check["best"] >= 1
    assert check["title"] == "celldino report" and check["evil_nodes"] == 0 and check["text"]
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, "--window-size=1200,2400", f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        timeout=180,
    )
    assert shot.exists() and shot.read_bytes()[:4] == b"\x89PNG"


def test_cli_report_and_demo_help(pipeline_run, tmp_path, capsys):
    _, run, _ = pipeline_run
    out = tmp_path / "r.html"
    assert cli.main(["-q", "report", str(run), "--out", str(out)]) == 0
    assert Path(capsys.readouterr().out.strip()) == out and out.stat().st_size > 10_000
    assert cli.main(["-q", "report", str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "run.out_dir=" in text and "synth.preset=" in text


def test_attention_iou_matches_a_computation_by_hand(pipeline_run):
    """The run's attention_iou table against numpy: patch maps repeated to pixels, Otsu's
    threshold (scikit-image) per map and channel, IoU averaged over the stored cells."""
    import zarr
    from skimage.filters import threshold_otsu

    from celldino.io.cropstore import read_crops

    _, run, _ = pipeline_run
    g = zarr.open_group(str(run / "embeddings" / "learned" / "_attention.zarr"), mode="r")
    maps, ids = np.asarray(g["attn_maps"]), [str(i) for i in g.attrs["cell_ids"]]
    cells = pd.read_parquet(run / "prep" / "cells.parquet")
    pos = {c: i for i, c in enumerate(cells.Metadata_CellID.astype(str))}
    images = read_crops(run / "prep", np.array([pos[i] for i in ids])).astype(np.float32)
    f = images.shape[-1] // maps.shape[-1]

    def mask(a):
        return a > threshold_otsu(a) if a.max() > a.min() else np.zeros(a.shape, bool)

    n_heads, n_ch = maps.shape[1], images.shape[1]
    total, count = np.zeros((n_heads, n_ch)), np.zeros((n_heads, n_ch))
    for m, img in zip(maps, images):
        for h in range(n_heads):
            hm = mask(np.repeat(np.repeat(m[h], f, axis=0), f, axis=1))
            for c in range(n_ch):
                cm = mask(img[c])
                union = (hm | cm).sum()
                if union:
                    total[h, c] += (hm & cm).sum() / union
                    count[h, c] += 1
    table = pd.read_parquet(
        run / "eval" / "tables" / "attention_iou__learned__head_channel_iou.parquet"
    )
    got = table.pivot(index="head", columns="channel", values="iou")
    got = got.loc[[f"head_{h}" for h in range(n_heads)], list(g.attrs["channels"])]
    np.testing.assert_allclose(got.to_numpy(), total / count, rtol=1e-6)
    tidy = pd.read_parquet(run / "eval" / "metrics.parquet")
    best = tidy[(tidy.feature_set == "learned") & (tidy.metric == "best_channel_iou")].value
    assert best.iloc[0] == pytest.approx(np.mean((total / count).max(axis=1)))


def test_an_upgrade_redoes_the_cheap_stages_whose_defaults_live_in_code(monkeypatch):
    """Profile recipes and evaluation statistics are defaults in the code: a run made by another
    celldino version must not reuse their outputs silently, while prepare, train and extract
    (hours) are redone only when their settings or inputs change."""
    import celldino
    from celldino.config import Config
    from celldino.pipeline import VERSIONED, stage_fingerprints

    before = stage_fingerprints(Config())
    monkeypatch.setattr(celldino, "__version__", celldino.__version__ + ".post1")
    after = stage_fingerprints(Config())
    changed = {s for s in before if before[s] != after[s]}
    assert changed == set(VERSIONED) == {"profile", "evaluate", "report"}


def test_what_training_reports_leaves_the_train_fingerprint_alone():
    """The monitor's probes and the diagnostics do not change the weights (and --resume may
    change them): no stage is redone; a setting that does change the weights still counts."""
    import dataclasses

    from celldino.config import Config
    from celldino.pipeline import stage_fingerprints

    cfg = Config()
    before = stage_fingerprints(cfg)
    for change in (
        {"monitor_label": "Metadata_MoA"},
        {"monitor_cells": 77},
        {"diagnostics": not cfg.train.diagnostics},
    ):
        train = dataclasses.replace(cfg.train, **change)
        assert stage_fingerprints(dataclasses.replace(cfg, train=train)) == before, change
    train = dataclasses.replace(cfg.train, lr=cfg.train.lr * 2)
    assert stage_fingerprints(dataclasses.replace(cfg, train=train))["train"] != before["train"]


def test_checkpoint_spread_evaluates_the_last_epoch_checkpoints(tiny_screen, tmp_path, caplog):
    """The evaluate stage also evaluates the epoch checkpoints before the final one (extracted
    and profiled as `learned`) into eval/checkpoints/, and the spread table holds each metric at
    every checkpoint, the final one equal to the main table's learned value, and max − min."""
    from celldino.io.results import read_checkpoint_spread
    from celldino.io.runlayout import RunLayout
    from celldino.report.headline import headline_of_run

    settings = [s for s in SETTINGS if not s.startswith("train.epochs")]
    cfg = load_config(
        None,
        [
            *settings,
            "train.epochs=3",
            "train.save_every=1",
            "run.spread_checkpoints=2",
            "run.baselines=random_init",
            "run.stages=prepare,train,extract,profile,evaluate",
            f"prepare.load_data={tiny_screen / 'load_data.csv'}",
            f"run.out_dir={tmp_path / 'run'}",
        ],
    )
    run_pipeline(cfg)
    lay = RunLayout(tmp_path / "run")
    spread, record = read_checkpoint_spread(lay.eval_checkpoints)
    assert record["checkpoints"] == [1, 2, 3] and record["final_epoch"] == 3
    assert set(spread.checkpoint) == {"epoch_0001", "epoch_0002", "final"}
    # the well-level analyses and the cell probes, which found embeddings/learned_epochNNNN
    assert {("nsc", "NSC"), ("map_moa", "mAP"), ("cell_probe", "linear_f1")} <= set(
        zip(spread.analysis, spread.metric, strict=True)
    )
    assert {"linear_f1", "knn20_f1"} <= set(spread.metric)
    main = pd.read_parquet(lay.eval_metrics).query("feature_set == 'learned'")
    for (analysis, metric), g in spread.groupby(["analysis", "metric"]):
        assert sorted(g.epoch) == [1, 2, 3], (analysis, metric)
        final = g[g.checkpoint == "final"].value.iloc[0]
        learned = main[(main.analysis == analysis) & (main.metric == metric)].value.iloc[0]
        assert final == pytest.approx(learned)
        assert g.spread.iloc[0] == pytest.approx(g.value.max() - g.value.min())
        assert (g.low == g.value.min()).all() and (g.high == g.value.max()).all()
    assert "(epochs 1, 2, 3)" in headline_of_run(lay.root)
    # the main metrics table has only the run's own sets
    assert (
        not main.empty
        and not pd.read_parquet(lay.eval_metrics).feature_set.str.contains("epoch").any()
    )
    # a rerun that redoes evaluate keeps the epoch sets' embeddings, profiles and parts
    shards = {p: p.stat().st_mtime_ns for p in lay.embeddings("learned_epoch0001").glob("*")}
    profile = lay.profiles("learned_epoch0002").stat().st_mtime_ns
    caplog.set_level("INFO", logger="celldino")
    run_pipeline(cfg, force=("evaluate",))
    said = [r.getMessage() for r in caplog.records]
    assert sum("extracted and profiled before, kept" in m for m in said) == 2
    assert not [m for m in said if "checkpoint spread: extracting" in m]
    assert {p: p.stat().st_mtime_ns for p in shards} == shards
    assert lay.profiles("learned_epoch0002").stat().st_mtime_ns == profile
    again, _ = read_checkpoint_spread(lay.eval_checkpoints)
    pd.testing.assert_frame_equal(again, spread)
    # switched off: no table, and the reason recorded for the report
    run_pipeline(replace_run(cfg, spread_checkpoints=0))
    spread, record = read_checkpoint_spread(lay.eval_checkpoints)
    assert spread is None and record["skipped"] == "run.spread_checkpoints=0"


def replace_run(cfg, **run):
    from celldino.config import replace

    return replace(cfg, **{f"run.{k}": v for k, v in run.items()})
