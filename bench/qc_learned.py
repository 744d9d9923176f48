"""Learned artefact QC (issue 24) against planted truth: classical QC, the kNN outlier detector and
the few-shot detector, each with a random-init and a learned encoder.

    OMP_NUM_THREADS=1 .venv/bin/python bench/qc_learned.py [--quick] [--cache /tmp/exp/H4]
        [--real-only | --no-real] [--no-train]

**Synthetic**: a screen of 1280 fields of 128 px (4 plates x 16 wells x 20 sites, 5 channels)
with `synth.artefacts` = every type at `synth.artefact_rate` = 0.03 (38 fields of each of the 7
types, 1014 clean; the preset's camera failures off). Per artefact type, the positives are that type's
fields and the negatives the clean fields (other types left out), so the chance level of
precision is the prevalence n_type / (n_type + n_clean) and of AUC 0.5.

- classical: `celldino.data.qc` (metrics, then `flag_images` over the screen). Flag: any
  classical flag (what prepare excludes). Score for the AUC: the type's own metric where one
  exists (blur: -QC_BlurZ, saturated: QC_Saturation, debris: QC_LargestObject, empty:
  -QC_Foreground), else the any-flag boolean.
- outlier: `data.artefacts.outlier_scores` (per plate, k=10); flag at z > OUTLIER_Z.
- few-shot n: `FewShotDetector` as `celldino qc` runs it: n labelled fields of each artefact type
  plus n labelled clean fields, and (`typical=True`) the typical half of the screen's unlabelled
  fields as clean; cross-fitted (the screen in two halves, each scored by a detector whose
  reference and typical half are the other half); flag at P(artefact) > 0.5; scored on the fields
  not used as labels. Repeated over DRAWS label draws: mean and minimum over draws.
- few-shot 10 labels only: the same without the typical half (`typical=False`).

Variants (proposals for the detector, measured beside it):
- `<encoder>+qc`: the embeddings with `data.artefacts.classical_features` appended (the
  classical metrics and each channel's log pixel noise less its plate median).
- `fewshot-n+unlabelled`: the n labelled fields of each artefact type (typical=False) against
  every unlabelled field taken as clean (artefacts are rare), cross-fitted (the unlabelled fields in two halves,
  each scored by the detector that took the other half as clean); no clean labels.
- precision / recall at K/(K+1): the flag at a score of K/(K+1) for K artefact types instead of
  0.5 (`prior_threshold`: the balanced class weights give clean a prior of 1/(K+1)).

Intervals: 95 % from BOOT stratified bootstrap resamples of the scored fields (for the few-shot
detector, the resamples of every draw pooled: label-draw and sampling variation together).

**Encoders**: `learned` = a celldino checkpoint trained here on the cells of the synthetic `demo`
screen (configs/demo.yaml, channel-adaptive, cached under --cache; never trained on fields or
artefacts: a transfer); `random` = the same architecture with random weights (seed 0). Fields are
cut into tiles of the checkpoint's crop side (cells at the trained scale), pooled [mean, max].

**Real**: the 7 Cell Painting sites of ../shared/data/cellpainting_fovs (3 channels each: DNA and
two cytoplasmic), each cut into 3 x 3 subfields; each subfield planted once with each of blur,
debris, debris_dim and saturated (`synth.artefacts.plant_real`). Few-shot cross-fitted over 5
folds of the 63 original subfields: a subfield and its planted copies are scored by a detector
whose labels (n per type plus n clean) came from the other folds only (other subfields of the
same screen, as a lab labels its own fields). Two ways: labels only (typical=False: 80 % of these
fields are planted, so "the typical half is clean" does not hold), and `+ typical half of a 3 %
screen`: the detector as `celldino qc` runs it on a screen made of the clean subfields outside the
fold and 2 of each planted type there (3 %). Reported: recall at precision
>= 0.9 per type, precision/recall at the default threshold, and how many of the 7 clean sites had
any clean subfield flagged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from celldino.config import SynthConfig
from celldino.data import artefacts as det
from celldino.data.qc import flag_images, image_metrics
from celldino.extract import fields as F
from celldino.io.images import read_image
from celldino.synth import artefacts as A
from celldino.synth import make_screen

ROOT = Path(__file__).resolve().parents[1]
FOVS = ROOT.parent / "shared" / "data" / "cellpainting_fovs"
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
OUTLIER_Z = 3.5  # outlier flag: robust z of the kNN distance within the plate
FEWSHOT_THRESHOLD = 0.5  # few-shot flag: P(any artefact)
DRAWS, BOOT = 5, 200
FOLDS = 5  # real check: cross-fitting folds of original subfields
SHOTS = (5, 10, 25)
# NF1's channels under the names the learned (channel-adaptive) checkpoint knows
NF1_NAMES = {"DAPI": "DNA", "GFP": "ER", "RFP": "AGP"}
# classical QC: each type's own continuous metric (higher = more artefact-like)
CLASSICAL_SCORE = {
    "blur": ("QC_BlurZ", -1.0),
    "saturated": ("QC_Saturation", 1.0),
    "debris": ("QC_LargestObject", 1.0),
    "empty": ("QC_Foreground", -1.0),
}


def synth_config(quick: bool) -> SynthConfig:
    return SynthConfig(
        preset="custom",
        seed=24,
        n_plates=4 if not quick else 2,
        n_batches=2 if not quick else 1,
        sites_per_well=20 if not quick else 8,
        image_size=128,
        n_bad_images=0,
        artefacts=tuple(A.ARTEFACTS),
        artefact_rate=0.03 if not quick else 0.04,
    )


@dataclass
class Fields:
    images: list[np.ndarray]
    truth: np.ndarray  # 'ok' or the artefact type
    plates: np.ndarray
    qc: pd.DataFrame  # classical metrics and flags, one row per field


def classical(images: list[np.ndarray]) -> pd.DataFrame:
    return flag_images(pd.DataFrame([image_metrics(img) for img in images]))


def _synth_code() -> str:
    import hashlib

    synth = ROOT / "src" / "celldino" / "synth"
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(synth.glob("*.py")))).hexdigest()


def synthetic_fields(out: Path, cfg: SynthConfig) -> Fields:
    """The screen drawn into `out` (reused when a complete one of the same settings is there)."""
    marker = out / ".celldino-synth.json"
    want = json.loads(json.dumps(dataclasses.asdict(cfg)))
    old = json.loads(marker.read_text()) if marker.is_file() else {}
    # the synth code drawn with, beside the folder: a changed planter redraws the screen
    stamp, code = out.parent / f"{out.name}.code", _synth_code()
    fresh = stamp.is_file() and stamp.read_text() == code
    if old.get("config") != want or not old.get("complete") or not fresh:
        make_screen(out, cfg)
        stamp.write_text(code)
    ld = pd.read_csv(out / "load_data.csv")
    images = [
        np.stack([read_image(Path(r[f"PathName_{c}"]) / r[f"FileName_{c}"]) for c in CHANNELS])
        for _, r in ld.iterrows()
    ]
    return Fields(
        images,
        ld["Metadata_QC_Truth"].astype(str).to_numpy(),
        ld["Metadata_Plate"].astype(str).to_numpy(),
        classical(images),
    )


# ---- encoders ------------------------------------------------------------------------------


@dataclass
class Encoder:
    model: torch.nn.Module
    channels: list[str] | None  # the model's channel names (a checkpoint's), or None


def encoder(kind: str, n_chans: int, *, side: int = 40, checkpoint: Path | None = None):
    """`learned`: the checkpoint (tiles of its crop side); `random`: its architecture (or a
    4-block ViT-tiny/8 without one) with seeded random weights, tiles of `side` px."""
    from celldino.config import ModelConfig
    from celldino.models import build_model, load_backbone

    if kind == "learned":
        model, known, _ = F.load_qc_model(checkpoint, n_chans)
        return Encoder(model, known)
    if checkpoint is not None:
        mcfg = load_backbone(_checkpoint_file(checkpoint))[1]  # its architecture only
    else:
        mcfg = ModelConfig(
            arch="vit_tiny",
            depth=4,
            patch_size=8,
            img_size=side,
            in_chans=n_chans,
            drop_path_rate=0.0,
        )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = build_model(mcfg, load_pretrained=False).eval()
    finally:
        torch.random.set_rng_state(state)
    model.celldino_input_side = side  # type: ignore[assignment]
    return Encoder(model, None)


def _checkpoint_file(checkpoint: Path) -> Path:
    from celldino.models import resolve_checkpoint

    return resolve_checkpoint(checkpoint)


def embed(
    images: list[np.ndarray],
    plates: np.ndarray,
    enc: Encoder | torch.nn.Module,
    channels_in: list[str],
    *,
    tile: int | None = None,
    scale_rows: np.ndarray | None = None,
) -> np.ndarray:
    """Field embeddings, one intensity scale per plate (from its `scale_rows` fields when given:
    the clean ones, as in a real screen where artefacts are rare)."""
    if isinstance(enc, torch.nn.Module):
        enc = Encoder(enc, None)
    out = None
    for plate in dict.fromkeys(plates.tolist()):
        rows = np.flatnonzero(plates == plate)
        ref = rows if scale_rows is None else np.intersect1d(rows, scale_rows)
        scale = F.field_scale([images[i] for i in ref])
        e = F.field_embeddings(
            [images[i] for i in rows],
            enc.model,
            channels_in=channels_in,
            tile=tile,
            scale=scale,
            model_channels=enc.channels,
            batch_size=64,
        )
        if out is None:
            out = np.zeros((len(images), e.shape[1]), np.float32)
        out[rows] = e
    return out


def qc_features(images: list[np.ndarray], qc: pd.DataFrame, groups: np.ndarray) -> np.ndarray:
    """The `+qc` variant's extra columns: `data.artefacts.classical_features` (the classical
    metrics and each channel's log pixel noise less its plate median)."""
    noise = np.stack([det.channel_noise(img) for img in images])
    metrics = {c: qc[c].to_numpy(float) for c in det.CLASSICAL_FEATURES}
    return det.classical_features(metrics, noise, groups).astype(np.float32)


# ---- metrics -------------------------------------------------------------------------------


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([pos, neg]))
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def prec_rec(fpos: np.ndarray, fneg: np.ndarray) -> tuple[float, float]:
    tp, fp = int(fpos.sum()), int(fneg.sum())
    return (tp / (tp + fp) if tp + fp else float("nan"), tp / len(fpos) if len(fpos) else np.nan)


def recall_at_precision(pos: np.ndarray, neg: np.ndarray, target: float = 0.9) -> float:
    """The largest recall of any threshold whose precision is >= target."""
    s = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(1 - y)
    last = np.r_[s[1:] != s[:-1], True]  # thresholds between distinct scores only
    prec, rec = tp / (tp + fp), tp / max(len(pos), 1)
    ok = last & (prec >= target)
    return float(rec[ok].max()) if ok.any() else 0.0


def _stats(pos, neg, fpos, fneg, rng, boot):
    """(auc, precision, recall) and their bootstrap resamples (boot, 3)."""
    point = (auc(pos, neg), *prec_rec(fpos, fneg))
    res = np.empty((boot, 3))
    for b in range(boot):
        i = rng.integers(0, len(pos), len(pos))
        j = rng.integers(0, len(neg), len(neg))
        res[b] = (auc(pos[i], neg[j]), *prec_rec(fpos[i], fneg[j]))
    return np.array(point), res


def _row(encoder_name, detector, kind, n_pos, n_neg, points, boots, **extra) -> dict:
    """One table row: mean (and min) over draws of each statistic, pooled bootstrap 95 % CI."""
    points, boots = np.atleast_2d(points), np.concatenate(boots)
    row = {
        "encoder": encoder_name,
        "detector": detector,
        "artefact": kind,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "prevalence": n_pos / (n_pos + n_neg),
    }
    for k, name in enumerate(("auc", "precision", "recall")):
        if np.isnan(points[:, k]).all():  # precision with no field flagged: undefined
            row[name] = row[f"{name}_min"] = row[f"{name}_lo"] = row[f"{name}_hi"] = np.nan
            continue
        row[name] = float(np.nanmean(points[:, k]))
        row[f"{name}_min"] = float(np.nanmin(points[:, k]))
        with warnings.catch_warnings():  # resamples without a flagged field: left out
            warnings.simplefilter("ignore", RuntimeWarning)
            row[f"{name}_lo"], row[f"{name}_hi"] = np.nanpercentile(boots[:, k], (2.5, 97.5))
    row.update(extra)
    return row


def _classical_score(qc: pd.DataFrame, kind: str) -> np.ndarray:
    if kind in CLASSICAL_SCORE:
        col, sign = CLASSICAL_SCORE[kind]
        return sign * np.nan_to_num(qc[col].to_numpy(float), nan=0.0)
    return (~qc["QC_Pass"].to_numpy(bool)).astype(float)


def prior_threshold(n_types: int) -> float:
    """The score threshold at which the few-shot detector's flag means P(artefact) > 1/2 under a
    prior of one half clean: its balanced class weights give clean a prior of 1/(K+1) beside K
    artefact types, so 1 - P(clean) > 0.5 flags a field that is as likely clean as not.
    Shifting clean's prior odds from 1/K to 1 moves the threshold to K/(K+1)."""
    return n_types / (n_types + 1.0)


def _labels(truth, kinds, n, rng, allowed=None) -> np.ndarray:
    """Indices of n labelled fields of each type in kinds plus n clean ones."""
    idx = []
    for k in ("ok", *kinds):
        pool = np.flatnonzero(truth == k)
        if allowed is not None:
            pool = np.intersect1d(pool, allowed)
        idx.append(rng.choice(pool, size=min(n, len(pool)), replace=False))
    return np.concatenate(idx)


def _fit(emb, truth, lab, reference, *, groups=None, typical=False) -> det.FewShotDetector:
    y = ["clean" if t == "ok" else t for t in truth[lab]]
    return det.FewShotDetector().fit(
        emb[lab], y, reference=reference, groups=groups, typical=typical
    )


def _typical_scores(emb, truth, lab, plates, rng) -> np.ndarray:
    """The detector as `celldino qc` runs it (labels plus the typical half of the screen's
    unlabelled fields as clean, `typical=True`), cross-fitted: the screen in two random halves,
    each scored by a detector whose reference (and so its typical half) is the other half, so no
    field is scored by a regression that took it as clean."""
    halves = np.array_split(rng.permutation(len(truth)), 2)
    score = np.full(len(truth), np.nan)
    for h in range(2):
        other = halves[1 - h]
        fitted = _fit(emb, truth, lab, emb[other], groups=plates[other], typical=True)
        score[halves[h]] = fitted.score(emb[halves[h]])
    return score


def _pu_scores(emb, truth, art_lab, rng) -> np.ndarray:
    """The `+unlabelled` variant: the labelled artefacts against every unlabelled field taken as
    clean (artefacts are rare), cross-fitted: the unlabelled fields in two random halves, each
    scored by a detector that took the other half as its clean class (never scored in-sample).
    NaN at the labelled artefacts."""
    rest = np.setdiff1d(np.arange(len(truth)), art_lab)
    halves = np.array_split(rng.permutation(rest), 2)
    score = np.full(len(truth), np.nan)
    for h in range(2):
        idx = np.concatenate([art_lab, halves[1 - h]])
        y = [str(truth[i]) for i in art_lab] + ["clean"] * len(halves[1 - h])
        fitted = det.FewShotDetector().fit(emb[idx], y, reference=emb, typical=False)
        score[halves[h]] = fitted.score(emb[halves[h]])
    return score


def evaluate_synthetic(
    fields: Fields,
    embs: dict[str, np.ndarray],
    *,
    shots=SHOTS,
    draws: int = DRAWS,
    boot: int = BOOT,
    seed: int = 0,
    pu_shots=(),
) -> list[dict]:
    truth, qc = fields.truth, fields.qc
    kinds = [k for k in A.ARTEFACTS if (truth == k).any()]
    clean = truth == "ok"
    rng = np.random.default_rng([seed, 1])
    rows = []
    any_flag = ~qc["QC_Pass"].to_numpy(bool)
    for kind in kinds:
        pos = truth == kind
        s = _classical_score(qc, kind)
        p, b = _stats(s[pos], s[clean], any_flag[pos], any_flag[clean], rng, boot)
        rows.append(_row("-", "classical", kind, int(pos.sum()), int(clean.sum()), p, [b]))
    for name, emb in embs.items():
        out = det.outlier_scores(emb, fields.plates, k=10)
        flag = out > OUTLIER_Z
        for kind in kinds:
            pos = truth == kind
            p, b = _stats(out[pos], out[clean], flag[pos], flag[clean], rng, boot)
            rows.append(_row(name, "outlier", kind, int(pos.sum()), int(clean.sum()), p, [b]))
        variants = [(n, "typical") for n in shots]
        variants += [(n, "labels") for n in pu_shots] + [(n, "pu") for n in pu_shots]
        for n, how in variants:
            per: dict[str, tuple[list, list, list]] = {k: ([], [], []) for k in kinds}
            sizes: dict[str, tuple[int, int]] = {}
            for d in range(draws):
                lab = _labels(truth, kinds, n, np.random.default_rng([seed, 2, n, d]))
                sub_rng = np.random.default_rng([seed, 4, n, d])
                if how == "pu":
                    lab = lab[truth[lab] != "ok"]
                    score = _pu_scores(emb, truth, lab, sub_rng)
                elif how == "typical":
                    score = _typical_scores(emb, truth, lab, fields.plates, sub_rng)
                else:
                    score = _fit(emb, truth, lab, emb).score(emb)
                held = np.ones(len(truth), bool)
                held[lab] = False
                flag = score > FEWSHOT_THRESHOLD
                flag2 = score > prior_threshold(len(kinds))
                for kind in kinds:
                    pos, neg = held & (truth == kind), held & clean
                    p, b = _stats(score[pos], score[neg], flag[pos], flag[neg], rng, boot)
                    per[kind][0].append(p)
                    per[kind][1].append(b)
                    per[kind][2].append(prec_rec(flag2[pos], flag2[neg]))
                    sizes[kind] = (int(pos.sum()), int(neg.sum()))
            for kind in kinds:
                pr2 = np.array(per[kind][2], float)
                rows.append(
                    _row(
                        name,
                        f"fewshot-{n}"
                        + {"typical": "", "labels": " labels only", "pu": "+unlabelled"}[how],
                        kind,
                        *sizes[kind],
                        per[kind][0],
                        per[kind][1],
                        precision_prior=float(np.nanmean(pr2[:, 0]))
                        if (~np.isnan(pr2[:, 0])).any()
                        else np.nan,
                        recall_prior=float(np.mean(pr2[:, 1])),
                    )
                )
    return rows


# ---- real fields ---------------------------------------------------------------------------


def real_subfields(fovs: Path, grid: int = 3) -> list[dict]:
    """Each real site cut into grid x grid subfields (square, the shorter side / grid)."""
    out = []
    for s in A.real_sites(fovs):
        img = s["image"]
        side = min(img.shape[1:]) // grid
        y0, x0 = (img.shape[1] - grid * side) // 2, (img.shape[2] - grid * side) // 2
        for i in range(grid):
            for j in range(grid):
                sub = img[
                    :, y0 + i * side : y0 + (i + 1) * side, x0 + j * side : x0 + (j + 1) * side
                ]
                out.append(
                    {**s, "image": np.ascontiguousarray(sub), "site": s["site"], "sub": (i, j)}
                )
    return out


def real_check(
    fovs: Path,
    encs: dict[str, Encoder],
    *,
    shots=(10,),
    draws=DRAWS,
    grid=3,
    seed=0,
    hybrid_of: str | None = None,
) -> tuple[list[dict], list[dict]]:
    subs = real_subfields(fovs, grid)
    planted = A.plant_real(subs, A.REAL_ARTEFACTS, copies=1, seed=seed)
    images = [p["image"] for p in planted]
    truth = np.array([p["kind"] for p in planted])
    site = np.array([p["site"] for p in planted])
    group = np.array([f"{p['site']}/{p['sub']}" for p in planted])  # an original and its copies
    uniq = list(dict.fromkeys(group.tolist()))
    source = np.array([p["source"] for p in planted])
    qc_parts = []
    for src in dict.fromkeys(source.tolist()):  # classical flags per source (its own z-scores)
        rows = np.flatnonzero(source == src)
        q = classical([images[i] for i in rows])
        q.index = rows
        qc_parts.append(q)
    qc = pd.concat(qc_parts).sort_index()
    clean = truth == "ok"
    rows_out, sites_out = [], []
    any_flag = ~qc["QC_Pass"].to_numpy(bool)
    for kind in A.REAL_ARTEFACTS:
        pos = truth == kind
        s = _classical_score(qc, kind)
        rows_out.append(
            {
                "encoder": "-",
                "detector": "classical",
                "artefact": kind,
                "auc": auc(s[pos], s[clean]),
                "recall_at_p90": recall_at_precision(s[pos], s[clean]),
                "precision": prec_rec(any_flag[pos], any_flag[clean])[0],
                "recall": prec_rec(any_flag[pos], any_flag[clean])[1],
            }
        )
    n_sites = len(set(site.tolist()))
    flagged_sites = len({str(x) for x in site[clean & any_flag]})
    which = qc.loc[clean & any_flag, "QC_Flags"].value_counts().to_dict()
    print(f"classical flags on clean real subfields: {which}")
    sites_out.append(
        {
            "encoder": "-",
            "detector": "classical",
            "clean_sites_flagged": flagged_sites,
            "clean_sites_flagged_max": flagged_sites,
            "clean_subfields_flagged": int((clean & any_flag).sum()),
            "n_sites": n_sites,
        }
    )
    embs = {}
    for name, enc in encs.items():
        emb = np.zeros((len(images), 0), np.float32)
        for src in dict.fromkeys(source.tolist()):
            rows = np.flatnonzero(source == src)
            chans = [NF1_NAMES.get(c, c) for c in planted[rows[0]]["channels"]]
            # tiles holding as many nuclei as the model's crops held synthetic ones
            nuc = planted[rows[0]]["nucleus_px"]
            tile = int(round(F.model_side(enc.model) * nuc / A.SYNTH_NUCLEUS_PX))
            e = embed(
                [images[i] for i in rows],
                np.array(["x"] * len(rows)),
                enc,
                chans,
                tile=tile,
                scale_rows=np.flatnonzero(truth[rows] == "ok"),
            )
            if emb.shape[1] == 0:
                emb = np.zeros((len(images), e.shape[1]), np.float32)
            emb[rows] = e
        embs[name] = emb
    if hybrid_of in embs:
        embs[f"{hybrid_of}+qc"] = np.hstack([embs[hybrid_of], qc_features(images, qc, source)])
    k_types = len(A.REAL_ARTEFACTS)
    variants = [(n, how) for n in shots for how in ("labels", "typical")]
    names = {"labels": "labels only", "typical": "+ typical half of a 3 % screen"}
    for name, emb in embs.items():
        for n, how in variants:
            scores = np.zeros((draws, len(images)))
            for d in range(draws):
                rng = np.random.default_rng([seed, 3, n, d])
                # folds of originals: a subfield and its planted copies are scored by a
                # detector whose labels came from other subfields only
                fold_of = dict(zip(uniq, rng.permutation(len(uniq)) % FOLDS))
                fold = np.array([fold_of[g] for g in group])
                for f in range(FOLDS):
                    train = np.flatnonzero(fold != f)
                    lab = _labels(truth, A.REAL_ARTEFACTS, n, rng, allowed=train)
                    test = fold == f
                    if how == "labels":
                        fitted = _fit(emb, truth, lab, emb)
                    else:  # the screen celldino qc would see: the clean fields outside the
                        # fold and 3 % (2 of 63) of each planted type, the labelled ones apart
                        screen = [np.intersect1d(train, np.flatnonzero(clean))]
                        for kind in A.REAL_ARTEFACTS:
                            pool = np.setdiff1d(
                                np.intersect1d(train, np.flatnonzero(truth == kind)), lab
                            )
                            screen.append(rng.choice(pool, size=2, replace=False))
                        ref = np.concatenate(screen)
                        fitted = _fit(emb, truth, lab, emb[ref], groups=source[ref], typical=True)
                    scores[d, test] = fitted.score(emb[test])
            for kind in A.REAL_ARTEFACTS:
                pos = truth == kind
                a = [auc(sc[pos], sc[clean]) for sc in scores]
                r90 = [recall_at_precision(sc[pos], sc[clean]) for sc in scores]
                pr = [
                    prec_rec(sc[pos] > FEWSHOT_THRESHOLD, sc[clean] > FEWSHOT_THRESHOLD)
                    for sc in scores
                ]
                t2 = prior_threshold(k_types)
                pr2 = [prec_rec(sc[pos] > t2, sc[clean] > t2) for sc in scores]
                rows_out.append(
                    {
                        "encoder": name,
                        "detector": f"fewshot-{n} {names[how]}",
                        "artefact": kind,
                        "auc": float(np.mean(a)),
                        "auc_min": float(np.min(a)),
                        "recall_at_p90": float(np.mean(r90)),
                        "recall_at_p90_min": float(np.min(r90)),
                        "precision": float(np.nanmean([p[0] for p in pr])),
                        "recall": float(np.mean([p[1] for p in pr])),
                        "precision_prior": float(np.nanmean([p[0] for p in pr2])),
                        "recall_prior": float(np.mean([p[1] for p in pr2])),
                    }
                )
            for label, thr in (("0.5", FEWSHOT_THRESHOLD), ("prior", prior_threshold(k_types))):
                flags = scores > thr
                per_draw = [len({str(x) for x in site[clean & f]}) for f in flags]
                sites_out.append(
                    {
                        "encoder": name,
                        "detector": f"fewshot-{n} {names[how]} (threshold {label}: {thr:.3g})",
                        "clean_sites_flagged": float(np.mean(per_draw)),
                        "clean_sites_flagged_max": int(np.max(per_draw)),
                        "clean_subfields_flagged": float(
                            np.mean([(clean & f).sum() for f in flags])
                        ),
                        "n_sites": n_sites,
                    }
                )
    return rows_out, sites_out


# ---- the learned encoder -------------------------------------------------------------------


def learned_checkpoint(cache: Path, *, train: bool) -> Path | None:
    """The cached checkpoint (cache/learned/train), trained here first when asked: the demo
    screen's cells, configs/demo.yaml, channel-adaptive, 2 epochs."""
    run = cache / "learned" / "train"
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("*.pt")):
        return run
    if not train:
        return None
    from celldino import cli

    work = cache / "learned"
    work.mkdir(parents=True, exist_ok=True)
    demo = ROOT / "src" / "celldino" / "configs" / "demo.yaml"
    steps = [
        ["synth", str(work / "screen"), str(demo)],
        [
            "prepare",
            str(demo),
            f"prepare.load_data={work / 'screen' / 'load_data.csv'}",
            f"prepare.out_dir={work / 'prep'}",
            "prepare.workers=1",
        ],
        [
            "train",
            str(demo),
            f"train.data={work / 'prep'}",
            f"train.run_dir={run}",
            "train.device=cpu",
            "model.channel_mode=channel_adaptive",
            "train.epochs=2",  # ~25 min on a shared 2-core CPU
            "train.warmup_epochs=0.5",
            "train.monitor_label=",
        ],
    ]
    for argv in steps:
        if cli.main(argv) != 0:
            raise SystemExit(f"training the learned encoder failed at `celldino {argv[0]}`")
    return run


# ---- printing ------------------------------------------------------------------------------


def _fmt(r: dict, k: str) -> str:
    v = r.get(k)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "  -  "
    lo, hi = r.get(f"{k}_lo"), r.get(f"{k}_hi")
    s = f"{v:.3f}"
    if f"{k}_min" in r and r["detector"].startswith("fewshot"):
        s += f" (min {r[f'{k}_min']:.3f})"
    if lo is not None:
        s += f" [{lo:.2f}, {hi:.2f}]"
    return s


def print_synthetic(rows: list[dict]) -> str:
    lines = [
        "| artefact | n (type / clean) | chance (prevalence) | detector | encoder | AUC [95% CI] "
        "| precision | recall | precision / recall at K/(K+1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows, key=lambda r: (A.ARTEFACTS.index(r["artefact"]), r["detector"], r["encoder"])
    ):
        lines.append(
            f"| {r['artefact']} | {r['n_pos']} / {r['n_neg']} | {r['prevalence']:.3f} | "
            f"{r['detector']} | {r['encoder']} | {_fmt(r, 'auc')} | {_fmt(r, 'precision')} | "
            f"{_fmt(r, 'recall')} | {_pr2(r)} |"
        )
    return "\n".join(lines)


def _pr2(r: dict) -> str:
    if "recall_prior" not in r or pd.isna(r.get("recall_prior")):
        return ""
    p = r["precision_prior"]
    return f"{'-' if pd.isna(p) else format(p, '.3f')} / {r['recall_prior']:.3f}"


def print_real(rows: list[dict], sites: list[dict]) -> str:
    lines = [
        "| artefact | detector | encoder | AUC (min) | recall at precision >= 0.9 (min) | "
        "precision | recall | precision / recall at K/(K+1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["artefact"], r["detector"], r["encoder"])):
        amin = f" ({r['auc_min']:.3f})" if "auc_min" in r else ""
        rmin = f" ({r['recall_at_p90_min']:.3f})" if "recall_at_p90_min" in r else ""
        lines.append(
            f"| {r['artefact']} | {r['detector']} | {r['encoder']} | {r['auc']:.3f}{amin} | "
            f"{r['recall_at_p90']:.3f}{rmin} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{_pr2(r)} |"
        )
    lines += [
        "",
        "| detector | encoder | clean sites flagged (mean over draws; max) | clean "
        "subfields flagged (mean) |",
        "|---|---|---|---|",
    ]
    for s in sites:
        lines.append(
            f"| {s['detector']} | {s['encoder']} | {s['clean_sites_flagged']:g} of {s['n_sites']}; "
            f"{s['clean_sites_flagged_max']} | {s['clean_subfields_flagged']:g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small screen, 2 draws, 1 shot size")
    ap.add_argument("--cache", default="/tmp/exp/H4", help="screen and checkpoint cache folder")
    ap.add_argument("--no-train", action="store_true", help="no learned encoder unless cached")
    ap.add_argument("--no-real", action="store_true", help="skip the real-field check")
    ap.add_argument("--real-only", action="store_true", help="only the real-field check")
    args = ap.parse_args(argv)
    t0 = time.time()
    cache = Path(args.cache)
    torch.set_num_threads(1)
    ckpt = learned_checkpoint(cache, train=not (args.no_train or args.quick))
    print(f"learned encoder: {ckpt or 'none (random only)'}", flush=True)
    out = cache / ("results_quick" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    draws = 2 if args.quick else DRAWS
    hybrid = "learned" if ckpt is not None else "random"  # the +qc variant's encoder
    encs: dict[str, Encoder] = {}
    if ckpt is not None:
        encs["learned"] = encoder("learned", 5, checkpoint=ckpt)
    if not args.real_only:
        cfg = synth_config(args.quick)
        fields = synthetic_fields(cache / ("screen_quick" if args.quick else "screen"), cfg)
        counts = pd.Series(fields.truth).value_counts().to_dict()
        print(f"synthetic screen: {len(fields.images)} fields, {counts} ({time.time() - t0:.0f} s)")
        encs = {"random": encoder("random", 5, side=40, checkpoint=ckpt), **encs}
        embs = {}
        for name, enc in encs.items():
            embs[name] = embed(fields.images, fields.plates, enc, CHANNELS)
            print(
                f"embedded with {name}: {embs[name].shape} ({time.time() - t0:.0f} s)", flush=True
            )
        embs[f"{hybrid}+qc"] = np.hstack(
            [embs[hybrid], qc_features(fields.images, fields.qc, fields.plates)]
        )
        shots, draws, boot = ((5,), 2, 50) if args.quick else (SHOTS, DRAWS, BOOT)
        rows = evaluate_synthetic(
            fields,
            embs,
            shots=shots,
            draws=draws,
            boot=boot,
            pu_shots=(10,) if not args.quick else (5,),
        )
        print(f"\n## Synthetic screen ({time.time() - t0:.0f} s)\n")
        print(print_synthetic(rows))
        pd.DataFrame(rows).to_csv(out / "synthetic.csv", index=False)
    if not args.no_real and FOVS.is_dir():
        real_encs = {"random": encoder("random", 3, side=40, checkpoint=ckpt)}
        if ckpt is not None:
            real_encs["learned"] = encs["learned"]  # channel-adaptive: the 3 real channels
        rrows, rsites = real_check(
            FOVS, real_encs, draws=draws, grid=3 if not args.quick else 2, hybrid_of=hybrid
        )
        print(f"\n## Real fields, planted ({time.time() - t0:.0f} s)\n")
        print(print_real(rrows, rsites))
        pd.DataFrame(rrows).to_csv(out / "real.csv", index=False)
        pd.DataFrame(rsites).to_csv(out / "real_sites.csv", index=False)
    print(f"\ntotal {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
