"""`celldino qc`: learned artefact detection on a prepared folder (issue 24).

`run_learned_qc(QCConfig)` embeds every readable field of the prep (`celldino.extract.fields`,
stored as field_embeddings.parquet), scores it with the chosen detectors
(`celldino.data.artefacts`) and writes the results into qc.parquet beside the classical QC:

- `QC_Learned_Outlier`: the unsupervised outlier score (robust z within the plate), with
  `QC_Flag_learned_outlier` when above `qc.outlier_z`;
- `QC_Learned_FewShot`: the few-shot probability of any artefact, with `QC_Flag_learned_fewshot`
  when above `qc.fewshot_threshold`, and `QC_Learned_Type` its likeliest label ("" without the
  few-shot detector);
- `QC_Flags` lists the learned flags after the classical ones (`learned_outlier`,
  `learned_fewshot`), `QC_Learned_Excluded` says which images learned QC excludes
  (flagged and `qc.exclude=true`), and `QC_Pass` is the classical pass and not excluded.

Exclusion acts through prepare, as classical QC does: prepare crops only `QC_Pass` images. When
the crop store already holds cells of an image learned QC now excludes, the store is cut back
to the sites before the first such image (`celldino.io.cropstore.drop_sites`: cells.parquet
removed) and `celldino prepare` (same settings) redoes the rest without it; when images an
earlier `qc.exclude=true` left out pass again, the store is marked unfinished so that the next
prepare adds them. Either way the later stages refuse the prep until prepare has run.

The prep folder is written under its lock; qc.parquet and images.parquet are replaced
atomically; a rerun with the same settings gives the same files (the embeddings are reused).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from celldino import log
from celldino.config import QCConfig
from celldino.data import qc as classical
from celldino.data.artefacts import (
    CLASSICAL_FEATURES,
    CLEAN,
    EMBED_COMPONENTS,
    ArtefactLabelError,
    FewShotDetector,
    check_labels,
    classical_features,
    outlier_scores,
)
from celldino.errors import DataError, MissingInputError
from celldino.extract.fields import bright_columns, embed_prep_fields
from celldino.io.cropstore import drop_sites, mark_unfinished, store_sites
from celldino.io.files import read_json, require_writable
from celldino.io.lock import output_lock
from celldino.io.prepared import (
    ENGINEERED,
    FEMB_PREFIX,
    IMAGES,
    NOISE_PREFIX,
    QC,
    SKIPPED,
    STATE,
    read_images,
    read_qc,
    read_skipped,
    write_images,
    write_qc,
)
from celldino.io.tables import read_table

logger = log.get_logger(__name__)

DETECTORS = ("outlier", "fewshot", "both")
LABEL = "Metadata_QC_Label"
KEY = "Metadata_ImageKey"
LEARNED_FLAGS = ("learned_outlier", "learned_fewshot")
LEARNED_COLUMNS = (
    "QC_Learned_Outlier",
    "QC_Learned_FewShot",
    "QC_Learned_Type",
    "QC_Learned_Excluded",
    *(f"QC_Flag_{f}" for f in LEARNED_FLAGS),
)


class LearnedQCError(DataError):
    """Settings, labels or a prep that learned QC cannot use (the message says what to do)."""


def _check_options(cfg: QCConfig) -> None:
    if not cfg.prep:
        raise LearnedQCError(
            "qc.prep is empty: give the folder written by `celldino prepare` (prepare.out_dir)"
        )
    if cfg.detector not in DETECTORS:
        raise LearnedQCError(f"qc.detector={cfg.detector!r} is not one of {', '.join(DETECTORS)}")
    if not 0.0 < cfg.fewshot_threshold < 1.0:
        raise LearnedQCError(
            f"qc.fewshot_threshold={cfg.fewshot_threshold} must lie between 0 and 1 (a "
            "probability; 0.5 flags fields likelier artefact than clean)"
        )
    if cfg.neighbours < 1 or cfg.batch_size < 1 or cfg.tile < 0:
        raise LearnedQCError(
            f"qc.neighbours={cfg.neighbours}, qc.batch_size={cfg.batch_size} must be at least 1 "
            f"and qc.tile={cfg.tile} at least 0"
        )


# ---- labels --------------------------------------------------------------------------------


def _label_keys(df: pd.DataFrame, source: str) -> pd.Series:
    if KEY in df:
        return df[KEY].astype(str)
    parts = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    if all(c in df for c in parts):
        key = df[parts[0]].astype(str)
        for c in parts[1:]:
            key = key + "/" + df[c].astype(str)
        return key
    raise LearnedQCError(
        f"{source}: no {KEY} column (nor Metadata_Plate, Metadata_Well, Metadata_Site); columns "
        f"present: {list(df.columns)[:12]}; add the image keys of qc.parquet"
    )


def read_labels(cfg: QCConfig, images: pd.DataFrame) -> pd.Series:
    """{image key: label} of the labelled fields, from qc.labels or the load-data table's
    Metadata_QC_Label column (empty cells = unlabelled). Refuses unknown image keys (naming
    them), empty or case-variant 'clean' labels, and a key labelled twice differently."""
    if cfg.labels:
        source = f"qc.labels {cfg.labels}"
        df = read_table(cfg.labels, text=True)
        if LABEL not in df:
            raise LearnedQCError(
                f"{source}: no {LABEL} column (columns: {list(df.columns)[:12]}); give one label "
                f"per image: {CLEAN!r} or an artefact type"
            )
        keys = _label_keys(df, source)
        rows = [f"line {i + 2}" for i in range(len(df))]
    else:
        source = f"the {LABEL} column of the load-data table (in {Path(cfg.prep) / IMAGES})"
        if LABEL not in images:
            raise LearnedQCError(
                f"qc.detector={cfg.detector} needs labelled fields: set qc.labels to a table of "
                f"{KEY} and {LABEL} ({CLEAN!r} or an artefact type), or add a {LABEL} column to "
                "the load-data table and prepare again"
            )
        df = images
        keys = images[KEY].astype(str)
        rows = [f"image {k}" for k in keys]
    raw = df[LABEL]
    text = raw.astype("string").fillna("").str.strip()
    labelled = (text != "").to_numpy()
    if cfg.labels and not labelled.all():
        i = int(np.flatnonzero(~labelled)[0])
        raise LearnedQCError(
            f"{source}, {rows[i]}: {LABEL} is empty; give {CLEAN!r} or an artefact type"
        )
    for i in np.flatnonzero(labelled):
        t = str(text.iloc[i])
        if t.lower() == CLEAN and t != CLEAN:
            raise LearnedQCError(
                f"{source}, {rows[i]}: label {t!r}: write clean fields as {CLEAN!r} (lower case; "
                "any other text is taken as an artefact type)"
            )
    keys, text = keys[labelled].reset_index(drop=True), text[labelled].reset_index(drop=True)
    known = set(images[KEY].astype(str))
    unknown = [k for k in dict.fromkeys(keys) if k not in known]
    if unknown:
        raise LearnedQCError(
            f"{source}: {len(unknown)} image key(s) not in the prep {cfg.prep}: "
            f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}; use "
            f"the {KEY} values of {Path(cfg.prep) / QC}"
        )
    table = pd.DataFrame({"key": keys, "label": text})
    clash = table.groupby("key")["label"].nunique()
    if (clash > 1).any():
        k = clash.index[clash > 1][0]
        shown = sorted(table.loc[table["key"] == k, "label"].unique())
        raise LearnedQCError(
            f"{source}: image {k!r} is labelled {shown}: give each image one label"
        )
    return table.drop_duplicates("key").set_index("key")["label"]


# ---- the command ---------------------------------------------------------------------------


def run_learned_qc(cfg: QCConfig) -> Path:
    """Score the prep's fields with learned QC and write the results into its qc.parquet;
    returns that path. See the module docstring."""
    _check_options(cfg)
    prep = Path(cfg.prep)
    for name in (QC, IMAGES, STATE):
        if not (prep / name).exists():
            raise MissingInputError(
                f"{prep / name} not found: qc.prep={prep} is not a finished prepare pass; run "
                f"`celldino prepare prepare.out_dir={prep}` first"
            )
    require_writable(prep, "qc.prep")
    with output_lock(prep, "qc"):
        return _run(cfg, prep)


def _run(cfg: QCConfig, prep: Path) -> Path:
    state = read_json(prep / STATE)
    if cfg.exclude and not state.get("settings", {}).get("qc_exclude", True):
        raise LearnedQCError(
            f"qc.exclude=true but {prep} was prepared with prepare.qc_exclude=false (flagged "
            "images are kept there): prepare with prepare.qc_exclude=true, or set "
            "qc.exclude=false to record learned flags without excluding"
        )
    images = read_images(prep)
    fewshot = cfg.detector in ("fewshot", "both")
    labels = read_labels(cfg, images) if fewshot else None
    if labels is not None:
        skipped = set()
        if "Skipped" in images:
            skipped = set(images.loc[images["Skipped"].astype(bool), KEY].astype(str))
        gone = [k for k in labels.index if k in skipped]
        if gone:
            raise LearnedQCError(
                f"labelled image(s) {', '.join(map(repr, gone[:5]))} were skipped by prepare "
                f"(unreadable; see {prep / 'skipped.parquet'}): remove their labels"
            )
        _check_label_counts(labels, cfg)
    emb_table = embed_prep_fields(
        prep,
        cfg.checkpoint,
        which=cfg.which,
        batch_size=cfg.batch_size,
        tile=cfg.tile or None,
        device=cfg.device,
    )
    feats = [c for c in emb_table.columns if c.startswith(FEMB_PREFIX)]
    emb = emb_table[feats].to_numpy(np.float64)
    keys = emb_table[KEY].astype(str).to_numpy()
    plates = emb_table["Metadata_Plate"].astype(str).to_numpy()

    qc = read_qc(prep)
    n_classical = 0
    if cfg.classical_features:
        by_key = qc.set_index(qc[KEY].astype(str)).loc[keys]
        noise = emb_table[[c for c in emb_table.columns if c.startswith(NOISE_PREFIX)]]
        n_ch = noise.shape[1]
        bright = emb_table[bright_columns([c[len(NOISE_PREFIX) :] for c in noise.columns])]
        bright = bright.to_numpy(float)
        extra = classical_features(
            {c: by_key[c].to_numpy(float) for c in CLASSICAL_FEATURES},
            noise.to_numpy(float),
            plates,
            bright=[bright[:, j : j + n_ch] for j in range(0, bright.shape[1] - n_ch, n_ch)],
            extent=bright[:, -n_ch:],
        )
        n_classical = extra.shape[1]
        emb = np.hstack([emb, extra])
    qc = qc.drop(columns=[c for c in LEARNED_COLUMNS if c in qc])
    row = {k: i for i, k in enumerate(keys)}
    at = np.array([row.get(str(k), -1) for k in qc[KEY]])  # qc row → embedding row
    have = at >= 0
    n = len(qc)
    flags: dict[str, np.ndarray] = {}
    if cfg.detector in ("outlier", "both"):
        score = np.full(n, np.nan)
        score[have] = outlier_scores(emb, plates, k=cfg.neighbours)[at[have]]
        qc["QC_Learned_Outlier"] = score
        flags["learned_outlier"] = np.nan_to_num(score, nan=-np.inf) > cfg.outlier_z
    if fewshot:
        assert labels is not None
        lab_rows = np.array([row[k] for k in labels.index])
        try:
            # with the classical columns: the embedding reduced to its leading components
            # beside them (10 labels cannot weigh hundreds of dimensions; docs/qc.md)
            det = FewShotDetector(
                components=EMBED_COMPONENTS if n_classical else None, passthrough=n_classical
            ).fit(emb[lab_rows], labels.to_numpy(), reference=emb, groups=plates)
        except ArtefactLabelError as e:  # checked before embedding; kept for library callers
            raise LearnedQCError(f"{_label_source(cfg)}: {e}") from None
        prob = np.full(n, np.nan)
        kind = np.full(n, "", dtype=object)
        prob[have] = det.score(emb)[at[have]]
        kind[have] = det.predict_type(emb)[at[have]]
        qc["QC_Learned_FewShot"] = prob
        qc["QC_Learned_Type"] = kind.astype(str)
        flags["learned_fewshot"] = np.nan_to_num(prob, nan=-1.0) > cfg.fewshot_threshold
    else:
        qc["QC_Learned_Type"] = ""
    for f in LEARNED_FLAGS:
        if f in flags:
            qc[f"QC_Flag_{f}"] = flags[f]
    any_learned = np.zeros(n, bool)
    for v in flags.values():
        any_learned |= v
    classical_flags = qc[[f"QC_Flag_{f}" for f in classical.FLAGS]].to_numpy(bool)
    names = list(classical.FLAGS) + [f for f in LEARNED_FLAGS if f in flags]
    all_flags = np.column_stack([classical_flags, *[flags[f] for f in LEARNED_FLAGS if f in flags]])
    qc["QC_Flags"] = [";".join(f for f, b in zip(names, r) if b) for r in all_flags]
    excluded = any_learned & bool(cfg.exclude)
    qc["QC_Learned_Excluded"] = excluded
    qc["QC_Pass"] = ~classical_flags.any(axis=1) & ~excluded
    # the store first: killed at any point, qc.parquet never says an image is excluded while
    # a finished store still holds its cells (prepare would finish on the old store)
    _sync_store(prep, qc, excluded)
    write_qc(qc, prep)
    ours = [c for c in images.columns if str(c).startswith("QC_")]
    merged = images.drop(columns=ours).merge(qc, on=KEY, how="left")
    merged["QC_Pass"] = merged["QC_Pass"].astype("boolean").fillna(False).astype(bool)
    write_images(merged, prep)
    _log_summary(cfg, qc, flags, excluded)
    return prep / QC


def _label_source(cfg: QCConfig) -> str:
    return f"qc.labels {cfg.labels}" if cfg.labels else f"the {LABEL} column of the load-data table"


def _check_label_counts(labels: pd.Series, cfg: QCConfig) -> None:
    """The few-shot detector's refusals, made before any field is embedded."""
    counts = labels.value_counts()
    try:
        check_labels(labels.to_numpy())
    except ArtefactLabelError as e:
        shown = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise LearnedQCError(f"{_label_source(cfg)} ({shown}): {e}") from None


def _sync_store(prep: Path, qc: pd.DataFrame, excluded: np.ndarray) -> None:
    """Keep the crop store in step with QC (see the module docstring). Decided from the store
    itself, not from what an earlier run wrote, so a run killed half-way is put right by the
    next one."""
    in_store = set(store_sites(prep))
    if not in_store:
        return
    now = set(qc.loc[excluded, KEY].astype(str))
    hit = now & in_store
    if hit:
        removed = drop_sites(prep, hit)
        (prep / ENGINEERED).unlink(missing_ok=True)  # prepare writes it again
        logger.warning(
            "learned QC excludes %d image(s) whose cells were in %s: the crop store is cut back "
            "before the first of them (%d sites removed, %d to redo); run `celldino prepare` "
            "again with prepare.out_dir=%s (same settings) to finish it without them",
            len(hit),
            prep,
            len(removed),
            len(set(removed) - now),
            prep,
        )
        return
    # images that pass QC now but have no cells (an earlier qc.exclude=true left them out)
    skipped = set()
    if (prep / SKIPPED).exists():
        skipped = set(read_skipped(prep)["Metadata_ImageKey"].astype(str))
    passing = set(qc.loc[qc["QC_Pass"].astype(bool), KEY].astype(str)) - skipped
    back = passing - in_store
    if back and mark_unfinished(prep):
        logger.warning(
            "%d image(s) that pass QC have no cells in %s (an earlier `celldino qc` excluded "
            "them): it is marked unfinished; run `celldino prepare` again with "
            "prepare.out_dir=%s to add their cells",
            len(back),
            prep,
            prep,
        )


def _log_summary(cfg: QCConfig, qc: pd.DataFrame, flags: dict, excluded: np.ndarray) -> None:
    parts = [f"{name} {int(v.sum())}" for name, v in flags.items()]
    logger.info(
        "learned QC (%s, encoder %s): %d of %d images flagged (%s)%s",
        cfg.detector,
        cfg.checkpoint,
        int(np.any(np.column_stack(list(flags.values())), axis=1).sum()) if flags else 0,
        len(qc),
        ", ".join(parts) or "none",
        f"; {int(excluded.sum())} excluded from the cells" if cfg.exclude else " (not excluded)",
    )


__all__ = ["DETECTORS", "LEARNED_COLUMNS", "LearnedQCError", "read_labels", "run_learned_qc"]
