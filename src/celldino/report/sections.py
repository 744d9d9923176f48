"""The sections of the HTML report, each drawn from the files one stage wrote in the run dir.

Every file is found through `RunLayout` and read with the `celldino.io` reader of its format:
the crop store and cells table (`io.cropstore`), the QC tables (`io.prepared`), the training
log (`io.trainrun`), a sample of the embeddings (`io.embeddings.sample_embeddings`), the
evaluation results (`io.results`) and the attention store (`io.attention_store`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from celldino.io import cropstore, prepared, results, trainrun
from celldino.io.attention_store import read_attention_store
from celldino.io.embeddings import sample_embeddings
from celldino.io.files import read_yaml
from celldino.io.runlayout import RunLayout
from celldino.pl.attention import attention_maps, head_channel_heatmap, patch_match
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
            learned_kept = any(c.startswith("QC_Flag_learned_") for c in flag_cols) and not (
                "QC_Learned_Excluded" in qc and qc["QC_Learned_Excluded"].any()
            )
            sec.table(
                counts.rename_axis("QC flag"),
                caption="Image quality control (flagged images are excluded"
                + ("; learned flags are not: qc.exclude=false)" if learned_kept else ")"),
            )
        learned_qc_part(sec, lay, qc)
    if lay.skipped.exists():
        sk = prepared.read_skipped(lay.prep)
        if len(sk):
            sec.table(sk.head(20).set_index(sk.columns[0]), caption=f"Skipped images ({len(sk)})")
    # crops per MoA or compound; an unlabelled screen's per plate (it has crops all the same)
    label = _label_column(cols) or ("Metadata_Plate" if "Metadata_Plate" in cols else None)
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


MAX_QC_THUMBNAILS = 12  # learned-QC-flagged fields drawn (the highest scores)
LEARNED_QC_SCORES = {  # flag column → (score column, its name in the report)
    "QC_Flag_learned_outlier": ("QC_Learned_Outlier", "outlier z"),
    "QC_Flag_learned_fewshot": ("QC_Learned_FewShot", "few-shot p"),
}


def _read_field(images: pd.DataFrame, key: str, channels: list[str]) -> np.ndarray:
    """The (C, H, W) field of one image key, read plane by plane with `io.images`."""
    from celldino.io.images import read_image

    row = images.loc[images["Metadata_ImageKey"].astype(str) == key].iloc[0]
    planes = []
    for c in channels:
        frame = row.get(f"Frame_{c}")
        frame = None if frame is None or pd.isna(frame) else int(frame)
        planes.append(
            read_image(Path(str(row[f"PathName_{c}"])) / str(row[f"FileName_{c}"]), frame=frame)
        )
    return np.stack(planes).astype(np.float32)


def learned_qc_part(sec: Section, lay: RunLayout, qc: pd.DataFrame) -> None:
    """The fields learned QC (`celldino qc`) flagged: a table of their scores and detectors and
    thumbnails of the highest-scoring ones (false colour, each field stretched on its own)."""
    from celldino.io.files import read_json
    from celldino.pl.fields import field_thumbnails

    flags = [c for c in LEARNED_QC_SCORES if c in qc]
    if not flags:
        return
    hit = qc[qc[flags].astype(bool).any(axis=1)].copy()
    if not len(hit):
        sec.text(f"Learned QC (celldino qc) flagged none of the {len(qc)} images.")
        return
    hit["detector"] = [
        ", ".join(c.removeprefix("QC_Flag_") for c in flags if row[c]) for _, row in hit.iterrows()
    ]
    score_cols = [LEARNED_QC_SCORES[c][0] for c in flags]
    hit = hit.sort_values(score_cols, ascending=False)
    shown = ["Metadata_ImageKey", "detector", *score_cols]
    shown += [c for c in ("QC_Learned_Type", "QC_Flags", "QC_Learned_Excluded") if c in hit]
    sec.table(
        hit[shown].head(50).set_index("Metadata_ImageKey"),
        caption=f"Fields flagged by learned QC ({len(hit)} of {len(qc)} images; highest score first)",
    )
    try:
        images = prepared.read_images(lay.prep)
        channels = list(read_json(lay.prep / prepared.STATE)["channels"])
        top = hit.head(MAX_QC_THUMBNAILS)
        fields, titles = [], []
        for _, row in top.iterrows():
            key = str(row["Metadata_ImageKey"])
            fields.append(_read_field(images, key, channels))
            scores = ", ".join(
                f"{LEARNED_QC_SCORES[c][1]} {row[LEARNED_QC_SCORES[c][0]]:.2f}" for c in flags
            )
            titles.append(f"{key}\n{row['detector']}\n{scores}")
    except (OSError, ValueError, KeyError) as e:  # images moved since prepare: the table stays
        sec.warn(f"the flagged fields' images could not be read for thumbnails ({e})")
        return
    sec.figure(
        field_thumbnails(fields, titles, channels),
        f"The {len(fields)} highest-scoring fields flagged by learned QC, with the detector that "
        "flagged them and its score (false colour: " + ", ".join(channels) + "; each field "
        "stretched to its own 1st-99.8th percentiles)",
    )


# the training diagnostics shown at the end of training: (key, what it says)
TRAINING_DIAGNOSTICS = (
    ("step", "optimisation steps"),
    ("loss_dino", "DINO loss (cross-entropy teacher → student)"),
    ("loss_over_logk", "DINO loss / log K: 1 = the student matches a uniform teacher"),
    ("prototypes_used", "prototypes that are some cell's teacher argmax (of K)"),
    ("prototype_top_share", "share of the cells taken by the most used prototype"),
    ("teacher_samples", "teacher distributions these two were counted over"),
    ("mean_teacher_entropy", "entropy of the mean teacher distribution (log K = all used evenly)"),
    ("teacher_entropy", "per-sample teacher entropy (low by design: sharpening)"),
    ("kl_student_teacher", "KL(student ‖ teacher) on the same views"),
    ("effective_rank", "effective rank of the teacher class tokens (collapse → 1)"),
    ("embedding_std", "spread of the L2-normalised class tokens (~1 spread, → 0 collapsed)"),
    ("rank_rows", "class tokens the rank and spread come from (the rank is at most this)"),
)


def section_training(run: Path) -> Section:
    sec = Section("training", "Training curves and collapse diagnostics")
    lay = RunLayout(run)
    if not lay.train_metrics.exists():
        sec.missing("training metrics", "celldino train")
        return sec
    from celldino.diagnostics import judged_record, training_verdict, verdict_inputs
    from celldino.pl.training import probe_curve, probe_records, training_steps

    metrics = trainrun.read_metrics(lay.train_metrics)
    df = training_steps(metrics)
    train_cfg: dict = {}
    out_dim = None
    if lay.train_config.exists():
        saved = read_yaml(lay.train_config) or {}
        out_dim = saved.get("model", {}).get("out_dim")
        train_cfg = saved.get("train", {}) or {}
    if not df.empty:
        sec.figure(
            training_curves(df, out_dim=out_dim), "Loss, schedules and diagnostics per epoch"
        )
        last = df.iloc[-1].dropna()
        if out_dim and "loss_over_logk" not in last and "loss_dino" in last:
            last["loss_over_logk"] = float(last["loss_dino"]) / math.log(out_dim)
        counts = ("step", "prototypes_used", "teacher_samples", "rank_rows")
        rows = {
            k: (f"{int(last[k])}" if k in counts else f"{float(last[k]):.3f}", what)
            for k, what in TRAINING_DIAGNOSTICS
            if k in last
        }
        if out_dim:
            rows["log K"] = (
                f"{math.log(out_dim):.3f}",
                f"log of the number of prototypes K = {out_dim}",
            )
        table = pd.DataFrame(
            {
                "final value": {k: v for k, (v, _) in rows.items()},
                "meaning": {k: m for k, (_, m) in rows.items()},
            }
        ).rename_axis("diagnostic")
        sec.table(table, caption="End of training")
        sec.text(
            "The per-sample teacher entropy is low on purpose: DINO sharpens the teacher so "
            "that each cell points at few prototypes; a collapse shows as one prototype for "
            "every cell, a uniform teacher with the loss at log K, or features of rank ~1."
        )
        if out_dim:
            # the last record with enough teacher samples (a log interval can be one step)
            i = judged_record(df.to_dict("records"))
            judged = df.iloc[i].dropna()
            if "loss_over_logk" not in judged and "loss_dino" in judged:
                judged["loss_over_logk"] = float(judged["loss_dino"]) / math.log(out_dim)
            verdict = training_verdict(
                out_dim=int(out_dim),
                centering=str(train_cfg.get("centering") or "center"),
                **verdict_inputs(judged),
            )
            message = verdict.message
            if i != len(df) - 1:
                message += (
                    f" (judged at step {int(judged['step'])}, the last record with enough "
                    "teacher samples)"
                )
            (sec.warn if verdict.warn else sec.text)(message)
    probes = probe_records(metrics)
    if not probes.empty:
        label = str(train_cfg.get("monitor_label") or "")
        sec.figure(
            probe_curve(probes, label=label),
            f"Probe macro-F1 of the teacher's class tokens ({label or 'labels'}) against "
            "training steps; step 0 is the random initialisation",
        )
        cols = [
            c
            for c in ("step", "epoch", "monitor_knn20_f1", "monitor_linear_f1", "monitor_cells")
            if c in probes.columns
        ]
        split = probes["monitor_split"].iloc[0] if "monitor_split" in probes.columns else ""
        sec.table(
            probes[cols]
            .rename(
                columns={
                    "monitor_knn20_f1": "20-NN macro-F1",
                    "monitor_linear_f1": "linear macro-F1",
                    "monitor_cells": "n_cells",
                }
            )
            .set_index("step"),
            caption=f"Learning curve (train.monitor_label; split: {split})",
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


# What each analysis measures and what its baseline is (shown under the metrics table).
ANALYSIS_NOTES = {
    "nsc": "NSC / NSCB: 1-nearest-neighbour MoA accuracy over treatment profiles excluding the "
    "same compound (and the same batch).",
    "map_replicate": "mAP: mean average precision of replicate retrieval (copairs definition).",
    "map_moa": "MoA mAP: retrieval of same-MoA treatments of other compounds.",
    "activity": "Phenotypic activity: mAP of each compound's replicates against the controls "
    "that no profile step was fitted on (n_negatives of them; n_negatives_fitted counts fitted "
    "ones among them, flagged in-sample; empty when unknown, for a table from elsewhere).",
    "classify": "kNN / linear / MLP F1: macro-F1 of a MoA classifier on a held-out group split.",
    "mantel": "Mantel: Spearman r between the treatments' cosine distances in this set and in "
    "the reference set (summary.json names it); baseline: null_mean / null_q95 of the "
    "permutation null, p_value from it.",
    "cca": "CCA: held-out profiles matched to their partner in the reference set in the shared "
    "canonical space; baselines: chance = 1 / n_test and the same fit with the pairs broken "
    "(permuted_accuracy).",
    "block_search": "Block search: kNN MoA macro-F1 of each transformer block's features "
    "(feature sets <set>_block<i>); baseline: the best block with shuffled labels "
    "(permuted_label_macro_f1).",
    "attention_iou": "Attention-channel IoU: Otsu masks of each head's attention vs each "
    "channel, best channel per head averaged over heads; baseline: each cell's attention against "
    "another cell's channels (null_*). random_init is the untrained model's.",
    "discriminative_patches": "Discriminative patch tokens: share of group A's patch tokens "
    "whose 10 nearest tokens of other images are ≥ 90 % from A; baseline: the images' groups "
    "shuffled (null_fraction_discriminative).",
    "cell_probe": "Cell probes: MoA of single cells (controls out, the same cells for every set), "
    "each plate held out in turn: logistic regression on standardised features and DINO's "
    "weighted 20-NN (cosine, votes exp(sim / 0.07)); macro-F1 averaged over the held-out plates; "
    "chance: the better label-only baseline; interval: wells redrawn.",
    "plate_effect": "Plate effect: how often a profile's nearest neighbour (cosine) shares its "
    "plate, and how often its treatment, each corrected for chance ((observed − expected) / "
    "(1 − expected): 0 = chance, 1 = always); plate_dominates = 1 when the plate agreement "
    "exceeds the treatment agreement by more than margin (default 0.1) and the plate agreement "
    "is beyond chance (plate_p_value < 0.05).",
}
MAX_TABLE_ROWS = 20  # rows of a detail table shown in the report (the file holds them all)
# Column a detail table is sorted by (the first present, best first).
SORT_COLUMNS = (
    ("mean_average_precision", False),
    ("average_precision", False),
    ("macro_f1", False),
    ("pr_auc", False),
    ("odds_ratio", False),
    ("correct", False),
    ("iou", False),
    ("nn_same_treatment", False),
    ("score", False),
    ("p_value", True),
    ("similarity", False),
)


def _with_interval(wide: pd.DataFrame, lo: pd.DataFrame, hi: pd.DataFrame) -> pd.DataFrame:
    """The metrics table as text: 'value [ci_low, ci_high]' where the interval exists."""
    from celldino.report.html import _fmt, _is_count

    out = pd.DataFrame(index=wide.index, columns=wide.columns, dtype=object)
    for idx in wide.index:
        count = _is_count(str(idx))
        for col in wide.columns:
            v = wide.at[idx, col]
            text = _fmt(float(v), count) if pd.notna(v) else "–"
            a, b = lo.at[idx, col], hi.at[idx, col]
            if pd.notna(v) and pd.notna(a) and pd.notna(b):
                text += f" [{_fmt(float(a))}, {_fmt(float(b))}]"
            out.at[idx, col] = text
    return out


def _eval_results(sec: Section, lay: RunLayout) -> pd.DataFrame | None:
    """The run's metrics table, or None with the section saying which stage makes it."""
    try:
        return results.read_results(lay.eval)
    except FileNotFoundError:
        sec.missing("evaluation results", "celldino evaluate")
        return None


def section_evaluation(run: Path) -> Section:
    sec = Section("evaluation", "Evaluation: learned embeddings vs baselines")
    lay = RunLayout(run)
    res = _eval_results(sec, lay)
    if res is None:
        return sec
    res = res.assign(row=res["analysis"].astype(str) + ": " + res["metric"].astype(str))

    def pivot(col: str) -> pd.DataFrame:
        if col not in res.columns:
            return pd.DataFrame(np.nan, index=wide.index, columns=wide.columns)
        t = res.pivot_table(
            index="row", columns="feature_set", values=col, aggfunc="first", dropna=False
        )
        t.columns = [str(c) for c in t.columns]
        return t.reindex(index=wide.index, columns=wide.columns)

    wide = res.pivot_table(index="row", columns="feature_set", values="value", aggfunc="first")
    wide.index.name = "analysis: metric"
    order = [
        c for c in ("learned", "engineered", "pca_engineered", "random_init") if c in wide.columns
    ]
    wide = wide[order + [c for c in wide.columns if c not in order]]
    wide.columns = [str(c) for c in wide.columns]
    best = best_per_row(wide)
    shown = _with_interval(wide, pivot("ci_low"), pivot("ci_high"))
    shown.index.name = wide.index.name
    sec.table(
        shown,
        best=best,
        caption="Metric per feature set, with its bootstrap 95% interval where computed "
        "(★ = best of the row)",
    )
    # chance level and permutation p beside each feature set, for the rows that have them
    chance, p = pivot("chance"), pivot("p_perm")
    has = chance.notna().any(axis=1) | p.notna().any(axis=1)
    if has.any():
        both = pd.concat({"chance": chance[has], "p_perm": p[has]}, axis=1).swaplevel(axis=1)
        both = both[[(fs, what) for fs in wide.columns for what in ("chance", "p_perm")]]
        both.columns = [f"{fs}: {what}" for fs, what in both.columns]
        both.index.name = wide.index.name
        sec.table(
            both,
            caption="Chance level (the value with no information in the features) and "
            "permutation p-value ((1 + #null ≥ value) / (1 + N))",
        )
    present = [a for a in ANALYSIS_NOTES if a in set(res["analysis"])]
    for a in present:
        sec.text(ANALYSIS_NOTES[a])
    # degenerate values: each flag as a warning
    if "flags" in res.columns:  # (skipped analyses are listed below, with their reason)
        flagged = res[(res["flags"].fillna("").astype(str) != "") & (res["metric"] != "skipped")]
        for r in flagged.itertuples(index=False):
            sec.warn(f"{r.analysis}: {r.metric} on {r.feature_set} is degenerate: {r.flags}")
    plate_warnings(sec, res, lay)
    spread_part(sec, lay)
    info = results.read_summary(lay.eval)
    if isinstance(info, dict):
        for note in info.get("notes") or []:
            sec.text(str(note))
        for what, why in (info.get("skipped") or {}).items():
            sec.text(f"Skipped: {what}: {why}")
    return sec


def spread_part(sec: Section, lay: RunLayout) -> None:
    """The checkpoint spread (`eval/checkpoints/`): how far NSC, mAP and the cell probes moved
    between the run's last checkpoints, as a sentence and a small table; the reason when the run
    has none."""
    from celldino.report.headline import spread_sentence

    spread, record = results.read_checkpoint_spread(lay.eval_checkpoints)
    if spread is None or spread.empty:
        why = record.get("skipped") or (
            "the evaluation ran without it (celldino run evaluates the epoch checkpoints before "
            "the final one when train.save_every keeps them and run.spread_checkpoints > 0)"
        )
        sec.text(f"Checkpoint spread: not measured ({why}).")
        return
    sentence = spread_sentence(spread)
    if sentence:
        sec.text(sentence)
    spread = spread.assign(
        row=spread["analysis"].astype(str) + ": " + spread["metric"].astype(str),
        column=[
            "final" if c == "final" else f"epoch {int(e)}"
            for c, e in zip(spread["checkpoint"], spread["epoch"], strict=True)
        ],
    )
    order = list(dict.fromkeys(spread.sort_values("epoch", kind="stable")["column"]))
    table = spread.pivot_table(index="row", columns="column", values="value", aggfunc="first")
    table = table.reindex(index=list(dict.fromkeys(spread["row"])), columns=order)
    table["spread (max − min)"] = spread.groupby("row", sort=False)["spread"].first()
    table.index.name = "analysis: metric"
    table.columns.name = None
    sec.table(
        table,
        caption="The same metrics of the learned model at each evaluated checkpoint (final = "
        "the table above) and their spread: a difference between feature sets smaller than "
        "the spread is within checkpoint noise",
    )


def section_cell_probe(run: Path) -> Section:
    """The single-cell probes (analysis cell_probe): score, interval and chance per feature set,
    one sentence per probe on the winner, and the paired difference to random_init."""
    from celldino.report.headline import (
        learned_vs_random_sentence,
        probe_metrics,
        probe_sentence,
        probe_words,
        read_paired,
        with_interval,
    )

    sec = Section("cell_probe", "Single-cell probes: linear and weighted 20-NN, by plate")
    lay = RunLayout(run)
    res = _eval_results(sec, lay)
    if res is None:
        return sec
    cp = res[(res["analysis"] == "cell_probe") & (res["metric"] != "skipped")]
    probes = probe_metrics(cp)
    if not probes:
        sec.text(
            "Single-cell probes: not measured (add the cell_probe analysis to the evaluation "
            "spec; it reads the per-cell embeddings of a `celldino run` folder)."
        )
        return sec
    sec.text(ANALYSIS_NOTES["cell_probe"])
    diff = read_paired(lay.eval)
    for metric in probes:
        for sentence in (
            probe_sentence(cp, metric, paired=diff),
            learned_vs_random_sentence(diff, metric),
        ):
            if sentence:
                sec.text(sentence)
    rows = {}
    for r in cp[cp["metric"].isin(probes)].itertuples(index=False):
        rows.setdefault(str(r.feature_set), {})[probe_words(r.metric)] = with_interval(
            r.value, r.ci_low, r.ci_high
        )
        rows[str(r.feature_set)][f"{probe_words(r.metric)}: chance"] = with_interval(
            r.chance, None, None
        )
    table = pd.DataFrame(rows).T
    order = [s for s in ("learned", "engineered", "random_init") if s in table.index]
    table = table.loc[order + [s for s in table.index if s not in order]].fillna("–")
    table.index.name = "feature set"
    sec.table(table, caption="Macro-F1 over held-out plates [95% interval, wells redrawn]")
    if diff is not None:
        diff["difference"] = [
            with_interval(r.difference, r.ci_low, r.ci_high) for r in diff.itertuples()
        ]
        sec.table(
            diff.set_index("feature_set")[["metric", "reference", "difference"]],
            caption="Paired difference to the reference set on the same cells and the same "
            "bootstrap draws (an interval above 0: better than the untrained model)",
        )
    return sec


def plate_steps(lay: RunLayout | None, feature_set: str) -> tuple[str, bool]:
    """What the run did against plate effects in a feature set's profiles, from the steps
    recorded in profiles/<set>.h5ad (a derived set such as pca_engineered: its source's):
    ('mad_robustize per Metadata_Plate on the controls', harmony applied), or ('', False) when
    no normalisation within a group was recorded (or the file is not there to say)."""
    if lay is None:
        return "", False
    from celldino.io.profiles import read_h5ad
    from celldino.pp.steps import history

    name = feature_set
    path = lay.profiles(name)
    if not path.exists() and name.startswith("pca_"):
        path = lay.profiles(name.removeprefix("pca_"))
    if not path.exists():
        return "", False
    try:
        steps = history(read_h5ad(path))
    except Exception:  # an unreadable file says nothing about its steps
        return "", False
    done, harmony = "", False
    for st in steps:
        params = st.get("params") or {}
        by = params.get("by")
        if st.get("step") == "normalize" and by and params.get("method") not in (None, "none"):
            by = by if isinstance(by, str) else "+".join(map(str, by))
            ref = params.get("reference")
            done = f"{params.get('method')} per {by}" + (
                f" on {'the controls' if ref == 'controls' else 'all wells'}" if ref else ""
            )
        harmony = harmony or st.get("step") == "harmony"
    return done, harmony


def plate_warnings(sec: Section, res: pd.DataFrame, lay: RunLayout | None = None) -> None:
    """A warning per feature set whose profiles separate by plate more than by treatment
    (the evaluator's plate_effect analysis), a line saying so when none do. The advice reads
    the profile's recorded steps: per-plate normalisation is advised only where it was not
    applied (it was on every set of a `celldino run`, CellProfiler's included)."""
    pe = res[(res["analysis"] == "plate_effect") & (res["metric"] != "skipped")]
    if pe.empty:
        sec.text("Plate vs treatment: not measured (add the plate_effect analysis to the spec).")
        return
    v = pe.pivot_table(index="feature_set", columns="metric", values="value", aggfunc="first")
    ok = []
    for fs, r in v.iterrows():
        if r.get("plate_dominates", 0) >= 1:
            done, harmony = plate_steps(lay, str(fs))
            if not done:
                advice = (
                    "correct for plate effects (per-plate normalisation to controls, Harmony on "
                    "PCs) before trusting retrieval numbers"
                )
            elif not harmony:
                advice = (
                    f"the profiles were already normalised ({done}) and the plate effect "
                    "remains: try Harmony on PCs (profile.harmony_key=Metadata_Plate), and check "
                    "whether treatments are confounded with plates (a treatment on one plate "
                    "only cannot be told from its plate) before trusting retrieval numbers"
                )
            else:
                advice = (
                    f"the profiles were already normalised ({done}) and Harmony-corrected, and "
                    "the plate effect remains: check whether treatments are confounded with "
                    "plates before trusting retrieval numbers"
                )
            sec.warn(
                f"{fs}: profiles separate by plate more than by treatment (nearest-neighbour "
                f"agreement beyond chance on plate {r['plate_agreement']:.3f} vs on treatment "
                f"{r['treatment_agreement']:.3f}, plate p = {r.get('plate_p_value', np.nan):.3g}; "
                f"flagged above a difference of {r.get('margin', 0.1):g}); {advice}"
            )
        else:
            ok.append(str(fs))
    if ok:
        sec.text(
            "Plate vs treatment: profiles of "
            + ", ".join(ok)
            + " do not separate by plate more than by treatment (nearest-neighbour agreement "
            "beyond chance)."
        )


def _sorted_top(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    for col, ascending in SORT_COLUMNS:
        if col in df.columns and pd.api.types.is_numeric_dtype(df[col]):
            return df.sort_values(col, ascending=ascending, kind="stable"), col
    return df, ""


def section_tables(run: Path) -> Section:
    sec = Section("tables", "Per-MoA and per-compound tables")
    lay = RunLayout(run)
    files = results.list_tables(lay.eval)
    if files.empty:
        sec.missing("evaluation detail tables", "celldino evaluate")
        return sec
    sec.text(
        f"Each evaluation's detail table (eval/{results.TABLES}/), sorted best first by the "
        f"column named, at most {MAX_TABLE_ROWS} rows shown; click a header to re-sort. The "
        "files hold every row."
    )
    from celldino.report.html import html_table

    for f in files.itertuples(index=False):
        df = results.read_table(f.path)
        df = df[[c for c in df.columns if c not in ("indices",)]]
        df, by = _sorted_top(df)
        n = len(df)
        head = df.head(MAX_TABLE_ROWS).reset_index(drop=True)
        head.index = head.index + 1
        head.index.name = "#"
        note = (f"sorted by {by}, " if by else "") + (
            f"top {MAX_TABLE_ROWS} of {n} rows" if n > MAX_TABLE_ROWS else f"{n} rows"
        )
        sec.details(
            f"{f.analysis} · {f.table} · {f.feature_set} ({note})",
            html_table(head, sortable=True, caption=f"eval/{results.TABLES}/{f.path.name}"),
        )
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
            attention_maps(images[i], maps[i], channels, title=names[i]),
            f"Class-token attention of each head in the last block: cell {ids[i]} ({names[i]})",
        )
    _iou_heatmaps(sec, lay)
    k = min(6, len(ids))
    side = math.isqrt(patches.shape[1])
    centre = (side // 2) * side + side // 2
    sec.figure(
        patch_match(images[:k], patches[:k], channels, query=(0, centre)),
        "Patch matching: the centre patch of the first cell against every patch of other cells",
    )
    return sec


PACKAGES = (
    "celldino",
    "torch",
    "numpy",
    "pandas",
    "anndata",
    "scikit-learn",
    "scipy",
    "copairs",
    "pycytominer",
    "scanpy",
    "harmonypy",
    "zarr",
    "duckdb",
    "matplotlib",
)


def section_appendix(run: Path) -> Section:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    sec = Section("appendix", "Appendix: configuration and versions")
    lay = RunLayout(run)
    if lay.config.exists():
        sec.text(f"The resolved configuration of the run ({lay.config.name}):")
        sec.pre(lay.config.read_text())
    else:
        sec.missing("run configuration (config.yaml)", "celldino run")
    info = results.read_summary(lay.eval)
    if isinstance(info, dict):
        import json

        sec.text("The evaluation's settings and analyses (eval/summary.json):")
        sec.pre(
            json.dumps(
                {k: info.get(k) for k in ("settings", "analyses", "feature_sets")},
                indent=1,
                default=str,
            )
        )
    rows = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            rows[name] = version(name)
        except PackageNotFoundError:
            rows[name] = "not installed"
    sec.table(
        pd.DataFrame({"version": rows}).rename_axis("package"),
        caption="Versions installed where this report was built",
    )
    return sec


def _iou_heatmaps(sec: Section, lay: RunLayout) -> None:
    """The head × channel IoU of each model the evaluation's attention_iou scored, with its
    shuffled-cell null beside it (eval/tables/attention_iou__<set>__head_channel_iou)."""
    files = results.list_tables(lay.eval)
    if files.empty:
        return
    for f in files[files.analysis == "attention_iou"].itertuples(index=False):
        long = results.read_table(f.path)
        for col, what in (("iou", "attention"), ("null_iou", "null: another cell's channels")):
            wide = long.pivot(index="head", columns="channel", values=col)
            wide = wide.reindex(index=list(dict.fromkeys(long["head"])))
            wide = wide[list(dict.fromkeys(long["channel"]))]
            sec.figure(
                head_channel_heatmap(wide, title=f"{f.feature_set}: {what}"),
                f"{f.feature_set}: IoU of each head's Otsu mask with each channel's ({what})",
            )


DEFAULT_SECTIONS = [
    section_data,
    section_training,
    section_umap,
    section_evaluation,
    section_cell_probe,
    section_tables,
    section_attention,
    section_appendix,
]
