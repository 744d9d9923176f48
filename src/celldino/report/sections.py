"""The sections of the HTML report, each drawn from the files one stage wrote in the run dir.

Every file is found through `RunLayout` and read with the `celldino.io` reader of its format:
the crop store and cells table (`io.cropstore`), the QC tables (`io.prepared`), the training
log (`io.trainrun`), a sample of the embeddings (`io.embeddings.sample_embeddings`), the
evaluation results (`io.results`) and the attention store (`io.attention_store`).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from celldino.io import cropstore, prepared, results, trainrun
from celldino.io.attention_store import read_attention_store
from celldino.io.embeddings import sample_embeddings
from celldino.io.files import read_yaml
from celldino.io.runlayout import RunLayout
from celldino.pl.attention import attention_maps, patch_match
from celldino.pl.embedding import umap, umap_coords
from celldino.pl.montage import montage
from celldino.pl.training import training_curves
from celldino.report.html import Section, best_per_row

MAX_UMAP_CELLS = 3000  # cells drawn in a UMAP (a random subset of larger screens)
FIELD_KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]


def _label_column(columns) -> str | None:
    """The metadata column to group and colour cells by (MoA, else compound), or None."""
    for col in ("Metadata_MoA", "Metadata_moa", "Metadata_Compound", "Metadata_Treatment"):
        if col in columns:
            return col
    return None


def section_data(run: Path) -> Section:
    sec = Section("data", "Data and quality control")
    lay = RunLayout(run)
    if not lay.cells.exists():
        sec.missing("cells table", "celldino prepare")
        return sec
    cols = cropstore.cells_columns(lay.prep)

    def n_distinct(keys: list[str]) -> int:
        keys = [k for k in keys if k in cols]
        return cropstore.count_cells(lay.prep, distinct=keys) if keys else 0

    summary = {
        "cells": cropstore.count_cells(lay.prep),
        "plates": n_distinct(["Metadata_Plate"]),
        "wells": n_distinct(["Metadata_Plate", "Metadata_Well"]),
        "fields of view": n_distinct(FIELD_KEYS),
    }
    sec.table(pd.DataFrame({"count": summary}).rename_axis("what"), caption="Prepared data")
    if "Metadata_Plate" in cols:
        sec.table(cropstore.cells_per(lay.prep, "Metadata_Plate"), caption="Cells per plate")
    if lay.qc.exists():
        qc = prepared.read_qc(lay.prep)  # one row per image: small
        flag_cols = [c for c in qc.columns if c.startswith("QC_Flag_") and qc[c].dtype == bool]
        if flag_cols:
            counts = qc[flag_cols].sum().rename("images flagged").to_frame()
            counts.index = [c.removeprefix("QC_Flag_") for c in flag_cols]
            counts.loc["total images"] = len(qc)
            sec.table(
                counts.rename_axis("QC flag"),
                caption="Image quality control (flagged images are excluded)",
            )
    if lay.skipped.exists():
        sk = prepared.read_skipped(lay.prep)
        if len(sk):
            sec.table(sk.head(20).set_index(sk.columns[0]), caption=f"Skipped images ({len(sk)})")
    label = _label_column(cols)
    if lay.crops.exists() and label:
        channels = cropstore.crop_channels(lay.prep)
        # 6 random cells per group, chosen inside DuckDB (the table is never loaded whole)
        pick = cropstore.sample_rows_per_group(lay.prep, label, 6)
        crops = cropstore.read_crops(lay.prep, pick.row.to_numpy())
        sec.figure(
            montage(crops, pick.label.to_numpy(), channels, per_group=6),
            f"Example single-cell crops per {label.removeprefix('Metadata_')} (false colour: "
            + ", ".join(f"{c}" for c in channels)
            + "; colour map in docs/pipeline.md)",
        )
    return sec


def section_training(run: Path) -> Section:
    sec = Section("training", "Training curves and collapse diagnostics")
    lay = RunLayout(run)
    if not lay.train_metrics.exists():
        sec.missing("training metrics", "celldino train")
        return sec
    df = trainrun.read_metrics(lay.train_metrics)
    out_dim = None
    if lay.train_config.exists():
        out_dim = (read_yaml(lay.train_config) or {}).get("model", {}).get("out_dim")
    sec.figure(training_curves(df, out_dim=out_dim), "Loss, schedules and diagnostics per epoch")
    last = df.iloc[-1]
    rows = {
        k: last[k]
        for k in ("step", "loss", "teacher_entropy", "kl_student_teacher", "embedding_std")
        if k in last
    }
    if out_dim:
        rows["log(out_dim)"] = math.log(out_dim)
    sec.table(
        pd.DataFrame({"final value": rows}).rename_axis("diagnostic"), caption="End of training"
    )
    from celldino.diagnostics import collapse_message

    if out_dim and "teacher_entropy" in last and "embedding_std" in last:
        msg = collapse_message(
            float(last["teacher_entropy"]), int(out_dim), float(last["embedding_std"])
        )
        if msg:
            sec.parts.append(f'<p class="warn">{html.escape(msg)}</p>')
        else:
            sec.text(
                "No sign of collapse: the teacher's output entropy and the embedding spread are healthy."
            )
    return sec


def section_umap(run: Path) -> Section:
    sec = Section("umap", "UMAP of single-cell embeddings")
    lay = RunLayout(run)
    names = [n for n in ("learned", "engineered", "random_init") if lay.embeddings(n).exists()]
    if not names:
        sec.missing("embeddings", "celldino extract")
        return sec
    sec.text(
        "UMAP fitted on field-of-view means and then used to project single cells (Cell-DINO's mode), "
        f"on up to {MAX_UMAP_CELLS} randomly chosen cells."
    )
    for name in names:
        X, obs = sample_embeddings(lay.embeddings(name), MAX_UMAP_CELLS)
        keys = [c for c in FIELD_KEYS if c in obs.columns]
        coords = umap_coords(X, obs, fit_on=keys or None)
        label = _label_column(obs.columns)
        for col in [label, "Metadata_Plate"]:
            if col and col in obs.columns:
                sec.figure(
                    umap(X, obs, color=col, coords=coords, title=f"{name}: {col}"),
                    f"{name} embeddings coloured by {col}",
                )
    return sec


def section_evaluation(run: Path) -> Section:
    sec = Section("evaluation", "Evaluation: learned embeddings vs baselines")
    lay = RunLayout(run)
    try:
        res = results.read_results(lay.eval)
    except FileNotFoundError:
        sec.missing("evaluation results", "celldino evaluate")
        return sec
    res = res.assign(row=res["analysis"].astype(str) + ": " + res["metric"].astype(str))
    wide = res.pivot_table(index="row", columns="feature_set", values="value", aggfunc="first")
    wide.index.name = "analysis: metric"
    order = [
        c for c in ("learned", "engineered", "pca_engineered", "random_init") if c in wide.columns
    ]
    wide = wide[order + [c for c in wide.columns if c not in order]]
    wide.columns = [str(c) for c in wide.columns]
    sec.table(wide, best=best_per_row(wide), caption="Metric per feature set (★ = best of the row)")
    sec.text(
        "NSC / NSCB: 1-nearest-neighbour MoA accuracy over treatment profiles excluding the same compound "
        "(and the same batch); mAP: mean average precision of replicate / MoA retrieval (copairs definition); "
        "kNN F1: macro-F1 of a cosine kNN MoA classifier on well profiles, tested on a held-out plate."
    )
    info = results.read_summary(lay.eval)
    if isinstance(info, dict) and info.get("notes"):
        for note in info["notes"]:
            sec.text(str(note))
    return sec


def section_attention(run: Path) -> Section:
    sec = Section("attention", "Attention maps and patch maps")
    lay = RunLayout(run)
    if not lay.attention("learned").exists():
        sec.missing("attention maps", "celldino extract with extract.attention_sample=N")
        return sec
    arrays, attrs = read_attention_store(lay.attention("learned"), ("attn_maps", "patch"))
    ids = [str(c) for c in attrs["cell_ids"]]
    channels = [str(c) for c in attrs["channels"]]
    maps = arrays["attn_maps"]  # (B, heads, h, w)
    patches = arrays["patch"]  # (B, N, D)
    if maps.ndim != 4:
        sec.text(
            "Attention maps of channel-adaptive models are per channel and are not drawn here."
        )
        return sec
    label = _label_column(cropstore.cells_columns(lay.prep))
    found = cropstore.rows_of_cells(lay.prep, ids, label=label)
    images = cropstore.read_crops(lay.prep, found.loc[ids, "row"].to_numpy()).astype(np.float32)
    names = list(found.loc[ids, "label"]) if label else ids
    for i in range(min(3, len(ids))):
        sec.figure(
            attention_maps(images[i], maps[i].reshape(maps.shape[1], -1), channels, title=names[i]),
            f"Class-token attention of each head in the last block: cell {ids[i]} ({names[i]})",
        )
    k = min(6, len(ids))
    side = math.isqrt(patches.shape[1])
    centre = (side // 2) * side + side // 2
    sec.figure(
        patch_match(images[:k], patches[:k], channels, query=(0, centre)),
        "Patch matching: the centre patch of the first cell against every patch of other cells",
    )
    return sec


DEFAULT_SECTIONS = [
    section_data,
    section_training,
    section_umap,
    section_evaluation,
    section_attention,
]
