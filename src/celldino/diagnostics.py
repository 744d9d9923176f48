"""Training-health diagnostics shared by the training loop and the report (no dependencies).

The numbers (docs/training.md, "Diagnostics and collapse"):
- `teacher_entropy`: mean per-sample entropy of the centred, sharpened teacher distribution.
  DINO drives it low on purpose (sharpening); a low value alone is not a collapse.
- `mean_teacher_entropy`: entropy of the MEAN teacher distribution over a sample of cells; near
  log K when the prototypes are used evenly, near 0 when one prototype takes every cell.
- `prototypes_used` / `prototype_top_share`: how many prototypes are some cell's argmax, and the
  share of the most used one, over the same sample (`teacher_samples` distributions).
- `loss_over_logk`: the DINO loss over log K; 1 means the student matches a uniform teacher.
- `effective_rank`: exp of the entropy of the normalised singular values of the teacher class
  tokens (RankMe); 1 when every cell maps to one direction.
- `embedding_std`: std over the batch of the L2-normalised class tokens times sqrt(D); ~1 spread.

- `rank_rows`: how many class tokens (rows) `effective_rank` and `embedding_std` come from
  (2 × the per-rank batch); the rank cannot exceed it.

`training_verdict` turns them into one of: collapsed (uniform teacher, one prototype, or rank-1
features), not learning yet, coarse partition, or healthy, with a sentence saying what to try
(advice that fits the run's `train.centering`); `verdict_inputs` picks its arguments
(`VERDICT_KEYS`) out of a metrics.jsonl record, `judged_record` the record to judge a run by.

Small samples are not judged: the prototype shares (`prototypes_used`, `prototype_top_share`)
need at least `MIN_SHARE_SAMPLES` (512) teacher distributions, a number of cells rather than a
multiple of K (the noise of a share depends on the cells counted: at 512 a share of 0.3 has a
standard error of about 0.02, while a 16-cell log interval puts 5 cells on one prototype by
chance); the rank rule needs `MIN_RANK_ROWS` (8) class tokens (2 rows have rank at most 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# thresholds of the verdicts (docs/training.md)
RANK_COLLAPSED = 2.0  # effective rank below this: every cell on (nearly) one direction
STD_COLLAPSED = 0.05  # embedding std below this: identical embeddings
ONE_PROTOTYPE_SHARE = 0.95  # the most used prototype takes more than this share of the cells
UNIFORM_FRACTION = 0.99  # entropies above this fraction of log K: a uniform teacher
NEAR_UNIFORM_FRACTION = 0.9  # per-sample entropy above this fraction of log K: near uniform
LOSS_AT_LOGK = 0.01  # |loss / log K - 1| within this: the loss has not left log K
COARSE_USED_FRACTION = 0.05  # fewer prototypes used than this fraction of min(K, cells sampled)
COARSE_TOP_SHARE = 0.3  # or the most used prototype takes more than this share
MIN_SHARE_SAMPLES = 512  # teacher distributions needed to judge the prototype shares
MIN_RANK_ROWS = 8  # class tokens needed to judge the effective rank (it is at most the rows)

KINDS = (
    "collapsed_features",
    "collapsed_one_prototype",
    "collapsed_uniform",
    "not_learning",
    "coarse_partition",
    "healthy",
)

# training_verdict's inputs, under the names metrics.jsonl logs them (train's loop, the report)
VERDICT_KEYS = (
    "teacher_entropy",
    "mean_teacher_entropy",
    "loss_over_logk",
    "prototypes_used",
    "prototype_top_share",
    "teacher_samples",
    "effective_rank",
    "embedding_std",
    "rank_rows",
)


def verdict_inputs(record: Mapping[str, Any]) -> dict[str, float]:
    """`training_verdict`'s keyword arguments from a diagnostics record: those it holds."""
    out = {}
    for k in VERDICT_KEYS:
        v = record.get(k)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[k] = float(v)
    return out


def judged_record(records: list[Mapping[str, Any]]) -> int | None:
    """Index of the record to judge a run by: the last one whose prototype shares come from
    enough teacher distributions (`MIN_SHARE_SAMPLES`; a record that does not say how many
    counts as enough), else the last one (its verdict says the sample is too small). None when
    there are no records."""
    if not records:
        return None
    for i in range(len(records) - 1, -1, -1):
        n = records[i].get("teacher_samples")
        if n is None or (isinstance(n, float) and math.isnan(n)) or n >= MIN_SHARE_SAMPLES:
            return i
    return len(records) - 1


@dataclass(frozen=True)
class Verdict:
    """`kind` (one of KINDS) and the sentence to show; `warn` for anything but healthy."""

    kind: str
    message: str

    @property
    def warn(self) -> bool:
        return self.kind != "healthy"

    @property
    def collapsed(self) -> bool:
        return self.kind.startswith("collapsed")


def training_verdict(
    *,
    out_dim: int,
    teacher_entropy: float | None = None,
    mean_teacher_entropy: float | None = None,
    loss_over_logk: float | None = None,
    prototypes_used: float | None = None,
    prototype_top_share: float | None = None,
    teacher_samples: float | None = None,
    effective_rank: float | None = None,
    embedding_std: float | None = None,
    rank_rows: float | None = None,
    centering: str = "center",
) -> Verdict:
    """The state of training from the logged diagnostics (any may be None: not logged).

    Checked in this order: rank-1 features (`effective_rank` < 2 from at least 8 rows, or
    `embedding_std` < 0.05), one prototype (`prototypes_used` == 1 or top share > 0.95), uniform
    teacher (mean and per-sample entropy > 99 % of log K and the loss within 1 % of log K), not
    learning yet (the loss within 1 % of log K and the per-sample entropy > 90 % of log K),
    coarse partition (prototypes used < 5 % of min(K, cells sampled) or top share > 0.3,
    backbone not collapsed), else healthy. The share rules (one prototype, coarse partition)
    are skipped, and the sentence says so, when `teacher_samples` < `MIN_SHARE_SAMPLES`; the
    rank rule when `rank_rows` < `MIN_RANK_ROWS` (None: not logged, the rules apply).
    `centering` is the run's `train.centering`: a run already on sinkhorn_knopp is not told to
    switch to it. Meant for steps after the learning-rate warm-up.
    """
    log_k = math.log(out_dim) if out_dim > 1 else 1.0
    h = teacher_entropy
    hm = mean_teacher_entropy
    ratio = loss_over_logk
    used, top = prototypes_used, prototype_top_share
    rank, std = effective_rank, embedding_std
    spread = _spread(rank, std)
    usage = (
        f"{int(used)} of {out_dim} prototypes used (top one {top:.0%})"
        if used is not None and top is not None
        else ""
    )
    ents = _entropies(h, hm, log_k)
    loss_txt = f"loss {ratio:.3f} x log K" if ratio is not None else ""
    small = teacher_samples is not None and teacher_samples < MIN_SHARE_SAMPLES
    if small:  # too few teacher distributions to judge the shares
        used = top = None
    if rank_rows is not None and rank_rows < MIN_RANK_ROWS:
        rank = None  # bounded by the few rows, whatever the features
    sinkhorn = centering == "sinkhorn_knopp"
    one_try = (
        "lower train.lr, train.koleo_weight=0.1 (the run already uses "
        "train.centering=sinkhorn_knopp)"
        if sinkhorn
        else "train.centering=sinkhorn_knopp, a lower train.center_momentum (a faster centre), "
        "lower train.lr, train.koleo_weight=0.1"
    )
    coarse_try = (
        "a smaller model.out_dim, more local crops (augment.n_local_crops) (the run already "
        "uses train.centering=sinkhorn_knopp)"
        if sinkhorn
        else "train.centering=sinkhorn_knopp, a smaller model.out_dim, more local crops "
        "(augment.n_local_crops)"
    )

    if (rank is not None and rank < RANK_COLLAPSED) or (std is not None and std < STD_COLLAPSED):
        return Verdict(
            "collapsed_features",
            f"training COLLAPSED: the teacher's features lie on one direction ({spread}; "
            "healthy: rank well above 2, std ~1). Try: lower train.lr, raise "
            "train.warmup_epochs, train.koleo_weight=0.1, more augmentation.",
        )
    if (used is not None and used <= 1) or (top is not None and top > ONE_PROTOTYPE_SHARE):
        return Verdict(
            "collapsed_one_prototype",
            f"training COLLAPSED to one prototype: {usage}; {ents}. Try: {one_try}.",
        )
    near = lambda x, f: x is not None and x > f * log_k  # noqa: E731
    loss_flat = ratio is not None and abs(ratio - 1.0) <= LOSS_AT_LOGK
    if near(h, UNIFORM_FRACTION) and near(hm, UNIFORM_FRACTION) and loss_flat:
        return Verdict(
            "collapsed_uniform",
            f"training COLLAPSED to a uniform teacher: {ents}, {loss_txt}: every cell gets "
            "the same flat distribution. Try: lower train.teacher_temp (sharper teacher), "
            "lower train.lr, train.koleo_weight=0.1, more augmentation.",
        )
    if loss_flat and near(h, NEAR_UNIFORM_FRACTION):
        return Verdict(
            "not_learning",
            f"not learning yet: {loss_txt} and a near-uniform teacher ({ents}); the backbone "
            f"is not collapsed ({spread}). Train longer (more epochs or cells), or try a lower "
            "train.teacher_temp or a higher train.lr.",
        )
    coarse_used = used is not None and used < COARSE_USED_FRACTION * min(
        out_dim, teacher_samples or out_dim
    )
    if coarse_used or (top is not None and top > COARSE_TOP_SHARE):
        return Verdict(
            "coarse_partition",
            f"coarse partition (not a collapse): {usage}, while the backbone is spread "
            f"({spread}); the teacher sorts cells into a few large groups. Try: {coarse_try}.",
        )
    if small:
        usage = (
            f"prototype usage not judged: only {int(teacher_samples)} teacher distributions "
            f"sampled (fewer than {MIN_SHARE_SAMPLES}, too small a sample)"
        )
    parts = [x for x in (usage, ents, loss_txt, spread) if x]
    return Verdict("healthy", "No sign of collapse: " + "; ".join(parts) + ".")


def _spread(rank: float | None, std: float | None) -> str:
    out = []
    if rank is not None:
        out.append(f"effective rank {rank:.1f}")
    if std is not None:
        out.append(f"embedding std {std:.3f}")
    return ", ".join(out) or "spread not logged"


def _entropies(h: float | None, hm: float | None, log_k: float) -> str:
    out = []
    if hm is not None:
        out.append(f"mean-teacher entropy {hm:.2f}")
    if h is not None:
        out.append(f"per-sample entropy {h:.2f}")
    return (" and ".join(out) + f" of max log K = {log_k:.2f}") if out else ""
