"""The sections of the HTML report, each drawn from the files one stage wrote in the run dir."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from celldino.io.files import read_json
from celldino.io.runlayout import RunLayout
from celldino.pl.attention import attention_maps, patch_match
from celldino.pl.embedding import umap, umap_coords
from celldino.pl.montage import montage
from celldino.pl.report import Section, best_per_row
from celldino.pl.training import read_metrics, training_curves

MAX_UMAP_CELLS = 3000  # cells drawn in a UMAP (a random subset of larger screens)
FIELD_KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]


def _label_column(columns) -> str | None:
    """The metadata column to group and colour cells by (MoA, else compound), or None."""
    for col in ("Metadata_MoA", "Metadata_moa", "Metadata_Compound", "Metadata_Treatment"):
        if col in columns:
            return col
    return None


def _query(sql: str, *params) -> pd.DataFrame:
    """Run SQL over Parquet files with DuckDB: counts and samples without loading whole tables."""
    import duckdb

    con = duckdb.connect()
    try:
        return con.execute(sql, list(params)).df()
    finally:
        con.close()


def _columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def section_data(run: Path) -> Section:
    sec = Section("data", "Data and quality control")
    lay = RunLayout(run)
    cells_path = lay.prep / "cells.parquet"
    if not cells_path.exists():
        sec.missing("cells table", "celldino prepare")
        return sec
    cols = _columns(cells_path)
    src = f"read_parquet('{cells_path}', file_row_number = true)"

    def n_distinct(keys: list[str]) -> int:
        keys = [k for k in keys if k in cols]
        if not keys:
            return 0
        return int(
            _query(f"SELECT count(*) AS n FROM (SELECT DISTINCT {_sql_cols(keys)} FROM {src})").n[0]
        )

    summary = {
        "cells": int(_query(f"SELECT count(*) AS n FROM {src}").n[0]),
        "plates": n_distinct(["Metadata_Plate"]),
        "wells": n_distinct(["Metadata_Plate", "Metadata_Well"]),
        "fields of view": n_distinct(FIELD_KEYS),
    }
    sec.table(pd.DataFrame({"count": summary}).rename_axis("what"), caption="Prepared data")
    if "Metadata_Plate" in cols:
        per_plate = _query(
            f'SELECT CAST("Metadata_Plate" AS VARCHAR) AS "Metadata_Plate", count(*) AS cells '
            f"FROM {src} GROUP BY 1 ORDER BY 1"
        ).set_index("Metadata_Plate")
        sec.table(per_plate, caption="Cells per plate")
    qc_path = lay.prep / "qc.parquet"
    if qc_path.exists():
        qc = pd.read_parquet(qc_path)  # one row per image: small
        flag_cols = [c for c in qc.columns if c.startswith("QC_Flag_") and qc[c].dtype == bool]
        if flag_cols:
            counts = qc[flag_cols].sum().rename("images flagged").to_frame()
            counts.index = [c.removeprefix("QC_Flag_") for c in flag_cols]
            counts.loc["total images"] = len(qc)
            sec.table(
                counts.rename_axis("QC flag"),
                caption="Image quality control (flagged images are excluded)",
            )
    skipped = lay.prep / "skipped.parquet"
    if skipped.exists():
        sk = pd.read_parquet(skipped)
        if len(sk):
            sec.table(sk.head(20).set_index(sk.columns[0]), caption=f"Skipped images ({len(sk)})")
    crops_path = lay.prep / "crops.zarr"
    label = _label_column(cols)
    if crops_path.exists() and label:
        import zarr

        arr = zarr.open_array(str(crops_path), mode="r")
        channels = list(arr.attrs.get("channels", [f"ch{i}" for i in range(arr.shape[1])]))
        # 6 random cells per group, chosen inside DuckDB (the table is never loaded whole)
        pick = _query(
            f'SELECT file_row_number AS row, CAST("{label}" AS VARCHAR) AS label FROM ('
            f'SELECT *, row_number() OVER (PARTITION BY "{label}" ORDER BY hash(file_row_number)) AS k '
            f"FROM {src}) WHERE k <= 6 ORDER BY row"
        )
        crops = np.asarray(arr.oindex[pick.row.to_numpy()])
        sec.figure(
            montage(crops, pick.label.to_numpy(), channels, per_group=6),
            f"Example single-cell crops per {label.removeprefix('Metadata_')} (false colour: "
            + ", ".join(f"{c}" for c in channels)
            + "; colour map in docs/pipeline.md)",
        )
    return sec


def _sql_cols(cols: list[str]) -> str:
    return ", ".join(f'"{c}"' for c in cols)


def section_training(run: Path) -> Section:
    sec = Section("training", "Training curves and collapse diagnostics")
    lay = RunLayout(run)
    metrics_path = lay.train / "metrics.jsonl"
    if not metrics_path.exists():
        sec.missing("training metrics", "celldino train")
        return sec
    df = read_metrics(metrics_path)
    out_dim = None
    cfg_path = lay.train / "config.yaml"
    if cfg_path.exists():
        import yaml

        out_dim = (yaml.safe_load(cfg_path.read_text()) or {}).get("model", {}).get("out_dim")
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


def read_embeddings(
    folder: Path, max_rows: int | None = None, seed: int = 0
) -> tuple[np.ndarray, pd.DataFrame]:
    """Feature matrix and metadata of an embeddings folder (Parquet shards).

    With `max_rows`, a reservoir sample drawn by DuckDB while scanning the shards: memory stays at
    the sample's size however many cells the screen has.
    """
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {folder}")
    src = "read_parquet([" + ", ".join(f"'{f}'" for f in files) + "])"
    sample = (
        f" USING SAMPLE reservoir({int(max_rows)} ROWS) REPEATABLE ({int(seed)})"
        if max_rows
        else ""
    )
    df = _query(f"SELECT * FROM {src}{sample}")
    meta = [c for c in df.columns if c.startswith("Metadata_")]
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    return df[feats].to_numpy(np.float32), df[meta]


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
        X, obs = read_embeddings(lay.embeddings(name), MAX_UMAP_CELLS)
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


def read_results(eval_dir: Path) -> pd.DataFrame:
    """The evaluation's tidy results table (feature_set × metric → value)."""
    for name in ("metrics.parquet", "metrics.csv"):
        p = eval_dir / name
        if p.exists():
            return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    raise FileNotFoundError(f"no results table in {eval_dir}")


def section_evaluation(run: Path) -> Section:
    sec = Section("evaluation", "Evaluation: learned embeddings vs baselines")
    lay = RunLayout(run)
    try:
        res = read_results(lay.eval)
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
    summary = lay.eval / "summary.json"
    if summary.exists():
        info = read_json(summary)
        if isinstance(info, dict) and info.get("notes"):
            for note in info["notes"]:
                sec.text(str(note))
    return sec


def section_attention(run: Path) -> Section:
    sec = Section("attention", "Attention maps and patch maps")
    lay = RunLayout(run)
    path = lay.embeddings("learned") / "attention.zarr"
    if not path.exists():
        sec.missing("attention maps", "celldino extract with extract.attention_sample=N")
        return sec
    import zarr

    g = zarr.open_group(str(path), mode="r")
    ids = [str(c) for c in g.attrs["cell_ids"]]
    channels = [str(c) for c in g.attrs["channels"]]
    maps = np.asarray(g["attn_maps"])  # (B, heads, h, w)
    patches = np.asarray(g["patch"])  # (B, N, D)
    if maps.ndim != 4:
        sec.text(
            "Attention maps of channel-adaptive models are per channel and are not drawn here."
        )
        return sec
    cells_path = lay.prep / "cells.parquet"
    label = _label_column(_columns(cells_path))
    found = _query(
        'SELECT file_row_number AS row, CAST("Metadata_CellID" AS VARCHAR) AS id'
        + (f', CAST("{label}" AS VARCHAR) AS label' if label else "")
        + f" FROM read_parquet('{cells_path}', file_row_number = true)"
        + ' WHERE CAST("Metadata_CellID" AS VARCHAR) IN (SELECT unnest(?))',
        ids,
    ).set_index("id")
    crops = zarr.open_array(str(lay.prep / "crops.zarr"), mode="r")
    images = np.asarray(crops.oindex[found.loc[ids, "row"].to_numpy()], dtype=np.float32)
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
