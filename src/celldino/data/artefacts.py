"""Learned artefact detection over field embeddings (issue 24): numpy and scikit-learn only.

Two detectors over a (n_fields, F) matrix of field embeddings (`celldino.extract.fields`):

- `outlier_scores(emb, groups, k)`: unsupervised, against the screen's own fields, per plate
  (`groups`). Each feature is centred and scaled by the plate's median and MAD (robust: the
  artefacts do not set the scale), each field's mean Euclidean distance to its k nearest other
  fields of the plate is taken, and those distances are turned into a robust z-score within the
  plate ((d − median) / (1.4826 · MAD)). Higher = more artefact-like; a plate of fewer than 3
  fields gets 0 (nothing to compare with).
- `FewShotDetector().fit(emb, labels, reference=..., groups=...)`: a few labelled fields
  ("clean" or an artefact type name) → an L2-regularised multinomial logistic regression
  (`C=1`, `class_weight="balanced"`: no setting to tune) on standardised embeddings. The
  standardisation is fitted on `reference` (all the screen's fields, unlabelled) when given,
  else on the labelled fields; the reference fields more typical than their plate's median
  (outlier score < 0) join the clean class (semi-supervised: 5 labelled clean fields do not
  show a screen's clean variety: on bench/qc_learned.py's synthetic screen (learned encoder
  and classical features, 10 labels per type) the detector fitted on the labels alone flagged
  54 % of the clean fields at P > 0.5, with the typical half 4.3 %, and each type's AUC rose or
  held (docs/qc.md). The scores are transductive, as the detector is used: every field of the
  screen is scored, the typical half included. `.score(emb)` is the probability of any
  artefact (1 − P(clean)), `.predict_type(emb)` the likeliest class. Each class needs at least
  `MIN_PER_CLASS` (2) examples; 5 per class is the intended use. `FewShotDetector(components=k,
  passthrough=p)` first reduces the standardised columns before the last p (the embedding) to
  their k leading principal components over `reference`, each scaled to unit variance, and keeps
  the last p (classical columns) beside them: `celldino qc` does so with k = `EMBED_COMPONENTS`
  when the classical columns are on (10 labels cannot weigh hundreds of dimensions; docs/qc.md).

`classical_features` turns the classical QC metrics (and each channel's pixel noise,
`channel_noise`, and largest bright object, `bright_objects`) into extra columns a caller may
append to the embeddings.
"""

from __future__ import annotations

import numpy as np

from celldino.errors import DataError

CLEAN = "clean"
MIN_PER_CLASS = 2
EMBED_COMPONENTS = 4  # `celldino qc`'s few-shot detector: embedding components (docs/qc.md)
MAX_TYPICAL = 5000  # typical unlabelled fields added to the clean class, at most (speed)
_MAD = 1.4826


class ArtefactLabelError(DataError):
    """Labels a few-shot detector cannot learn from (the message names the class and count)."""


def _robust_center_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column median and MAD·1.4826; a column whose MAD is 0 is scaled by its standard
    deviation, and one with neither by 1."""
    med = np.median(x, axis=0)
    mad = _MAD * np.median(np.abs(x - med), axis=0)
    sd = x.std(axis=0)
    scale = np.where(mad > 1e-12, mad, np.where(sd > 1e-12, sd, 1.0))
    return med, scale


def robust_z(values: np.ndarray) -> np.ndarray:
    """(values − median) / (1.4826 · MAD); the standard deviation stands in for a zero MAD,
    and a constant vector gives zeros."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v
    med = np.median(v)
    mad = _MAD * np.median(np.abs(v - med))
    if mad <= 1e-12:
        mad = v.std()
    if mad <= 1e-12:
        return np.zeros_like(v)
    return (v - med) / mad


def knn_mean_distance(x: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """(n,) each row's mean Euclidean distance to its k nearest other rows (k capped at n − 1);
    computed `block` rows at a time (memory block × n, not n × n)."""
    n = len(x)
    if n < 2:
        return np.zeros(n)
    k = min(int(k), n - 1)
    sq = np.einsum("ij,ij->i", x, x)
    out = np.empty(n)
    for start in range(0, n, block):
        stop = min(start + block, n)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (x[start:stop] @ x.T)  # (b, n)
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not itself
        d2 = np.maximum(d2, 0.0)
        part = np.partition(d2, k - 1, axis=1)[:, :k]
        out[start:stop] = np.sqrt(part).mean(axis=1)
    return out


def outlier_scores(emb: np.ndarray, groups: np.ndarray | None = None, k: int = 10) -> np.ndarray:
    """(n,) unsupervised artefact scores: per group (plate), robust-standardised embeddings,
    mean distance to the k nearest other fields, as a robust z-score within the group (see the
    module docstring). Groups of fewer than 3 fields score 0."""
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"emb must be (n_fields, n_features), not shape {x.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    n = len(x)
    g = np.zeros(n, dtype=object) if groups is None else np.asarray(groups, dtype=object)
    if len(g) != n:
        raise ValueError(f"groups has {len(g)} values for {n} fields")
    if not np.isfinite(x).all():
        raise ValueError("emb holds non-finite values")
    out = np.zeros(n)
    for grp in dict.fromkeys(g.tolist()):
        idx = np.flatnonzero(g == grp)
        if len(idx) < 3:
            continue
        xg = x[idx]
        med, scale = _robust_center_scale(xg)
        d = knn_mean_distance((xg - med) / scale, k)
        out[idx] = robust_z(d)
    return out


def check_labels(labels, *, clean: str = CLEAN) -> None:
    """Refuse labels a few-shot detector cannot learn from (ArtefactLabelError naming the class
    and its count): a class with fewer than `MIN_PER_CLASS` examples, no `clean` class, or
    clean fields only."""
    y = np.asarray([str(v) for v in labels], dtype=object)
    classes, counts = np.unique(y, return_counts=True)
    few = [(c, int(n)) for c, n in zip(classes, counts) if n < MIN_PER_CLASS]
    if few:
        shown = ", ".join(f"{c!r} ({n})" for c, n in few)
        raise ArtefactLabelError(
            f"label class(es) {shown} have fewer than {MIN_PER_CLASS} examples: label at "
            f"least {MIN_PER_CLASS} fields of each class (5 or more is better), or drop the class"
        )
    if clean not in classes:
        raise ArtefactLabelError(
            f"no field is labelled {clean!r} (labels: {sorted(classes)}): the detector learns "
            f"artefacts against clean fields; label some {clean!r}"
        )
    if len(classes) < 2:
        raise ArtefactLabelError(
            f"every labelled field is {clean!r}: label at least {MIN_PER_CLASS} fields of an "
            "artefact type (e.g. blur, debris) too"
        )


def channel_noise(image: np.ndarray) -> np.ndarray:
    """(C,) robust pixel noise sigma of each channel of a (C, H, W) field: 1.4826 MAD of the
    horizontal neighbour differences over sqrt(2) (as `celldino.data.qc` measures noise)."""
    x = np.asarray(image, dtype=np.float64)
    out = np.empty(len(x))
    for c, plane in enumerate(x):
        d = np.diff(np.nan_to_num(plane), axis=1).ravel()
        out[c] = _MAD * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2) if d.size else 0.0
    return out


BRIGHT_LEVELS = (0.5, 0.8)  # `bright_objects` levels `celldino qc` stores and uses


def _bright_regions(plane: np.ndarray, levels: tuple[float, ...]) -> list[tuple]:
    """For each level: the 8-connected regions of the sigma-1 smoothed plane more than `level`
    of the way from its median to its 99.5th percentile, as (labels, count); (None, 0) for a
    flat plane. The plane is smoothed and its percentiles taken once for every level."""
    from scipy import ndimage as ndi

    s = ndi.gaussian_filter(np.nan_to_num(np.asarray(plane, dtype=np.float64)), 1.0)
    med, hi = np.median(s), np.percentile(s, 99.5)
    if hi - med <= 1e-12:
        return [(None, 0)] * len(levels)
    return [ndi.label(s > med + lv * (hi - med), structure=np.ones((3, 3))) for lv in levels]


def _largest(lab, n: int) -> float:
    return float(np.bincount(lab.ravel())[1:].max() / lab.size) if n else 0.0


def _longest(lab, n: int) -> float:
    from scipy import ndimage as ndi

    if not n:
        return 0.0
    ext = max(max(a.stop - a.start, b.stop - b.start) for a, b in ndi.find_objects(lab))
    return ext / min(lab.shape)


def bright_objects(image: np.ndarray, level: float = 0.5) -> np.ndarray:
    """(C,) the largest connected bright object of each channel of a (C, H, W) field, as a
    fraction of the field: pixels of the sigma-1 smoothed plane more than `level` of the way
    from its median to its 99.5th percentile, 8-connected. A cell is a small object; a clump or
    fibre of junk, saturating or not, is a large one (no classical flag sees dim junk)."""
    return np.array([_largest(*_bright_regions(plane, (level,))[0]) for plane in image])


def bright_extent(image: np.ndarray, level: float = 0.5) -> np.ndarray:
    """(C,) the longest bounding-box side of any bright object (as `bright_objects` finds them)
    of each channel, over the field's shorter side: a thin fibre of junk is long, not large."""
    return np.array([_longest(*_bright_regions(plane, (level,))[0]) for plane in image])


def bright_measures(image: np.ndarray) -> np.ndarray:
    """((len(BRIGHT_LEVELS) + 1) * C,) what `celldino qc` stores of a field, in
    `extract.fields.bright_columns` order: `bright_objects` at each of `BRIGHT_LEVELS`, then
    `bright_extent` at the first level; each plane smoothed and labelled once per level."""
    regions = [_bright_regions(plane, BRIGHT_LEVELS) for plane in image]  # [channel][level]
    areas = [[_largest(*r[k]) for r in regions] for k in range(len(BRIGHT_LEVELS))]
    return np.concatenate([np.ravel(areas), [_longest(*r[0]) for r in regions]])


CLASSICAL_FEATURES = ("QC_Blur", "QC_Saturation", "QC_Foreground", "QC_LargestObject")


def classical_features(
    metrics: dict[str, np.ndarray],
    noise: np.ndarray,
    groups: np.ndarray | None = None,
    bright: np.ndarray | list[np.ndarray] | None = None,
    extent: np.ndarray | None = None,
) -> np.ndarray:
    """(n, 4 + C [+ L (C + 1)] [+ C + 1]) the classical QC metrics as extra detector features: QC_Blur,
    QC_Saturation, log(QC_Foreground + 0.001), QC_LargestObject (NaN → 0), and each channel's
    log pixel noise (`channel_noise`) less its median in the group (plate), which no classical
    flag uses. With `bright` ((n, C) `bright_objects`, or a list of L of them at `BRIGHT_LEVELS`):
    each channel's log largest bright object (+ 1e-4) less its group median, and the largest of
    those over the channels (dim junk lands in any 1-3 channels; a linear detector cannot take
    that maximum itself). With `extent` ((n, C), `bright_extent`): the same of its log (+ 1e-3)."""
    n = len(noise)
    g = np.zeros(n, dtype=object) if groups is None else np.asarray(groups, dtype=object)

    def centred(v: np.ndarray) -> np.ndarray:
        for grp in dict.fromkeys(g.tolist()):
            rows = g == grp
            v[rows] -= np.median(v[rows], axis=0)
        return v

    lognoise = centred(np.log(np.asarray(noise, dtype=np.float64) + 1e-6))
    base = np.column_stack(
        [
            np.nan_to_num(np.asarray(metrics["QC_Blur"], dtype=np.float64)),
            np.nan_to_num(np.asarray(metrics["QC_Saturation"], dtype=np.float64)),
            np.log(np.nan_to_num(np.asarray(metrics["QC_Foreground"], dtype=np.float64)) + 1e-3),
            np.nan_to_num(np.asarray(metrics["QC_LargestObject"], dtype=np.float64)),
        ]
    )
    parts = [base, lognoise]
    if bright is not None:
        for b in [bright] if isinstance(bright, np.ndarray) else bright:
            logb = centred(np.log(np.asarray(b, dtype=np.float64) + 1e-4))
            parts += [logb, logb.max(axis=1, keepdims=True)]
    if extent is not None:
        loge = centred(np.log(np.asarray(extent, dtype=np.float64) + 1e-3))
        parts += [loge, loge.max(axis=1, keepdims=True)]
    return np.hstack(parts)


class FewShotDetector:
    """Few-shot artefact classifier: standardised embeddings → regularised logistic regression.

    `fit(emb, labels, reference=None)`: labels are strings, `"clean"` or an artefact type;
    `score(emb)`: probability of any artefact; `predict_type(emb)`: the likeliest label.
    """

    def __init__(
        self,
        *,
        C: float = 1.0,
        clean: str = CLEAN,
        max_iter: int = 5000,
        components: int | None = None,
        passthrough: int = 0,
    ):
        self.C, self.clean, self.max_iter = float(C), clean, int(max_iter)
        self.components = None if components is None else int(components)
        self.passthrough = int(passthrough)

    def fit(
        self,
        emb: np.ndarray,
        labels,
        *,
        reference: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        typical: bool = True,
    ) -> FewShotDetector:
        """Fit on labelled fields `emb` (n, F) and their `labels`.

        `reference`: every field of the screen (unlabelled), whose mean and standard deviation
        standardise the features; with `typical`, its fields more typical than their plate's
        median field (`outlier_scores(reference, groups) < 0`: the half of each plate closest to
        its neighbours) join the clean class, less any identical to a labelled field. Artefacts
        are rare, so that half is clean but for a few; it tells the classifier what the screen's
        clean variety looks like, which 5 labelled clean fields cannot. `groups`: the plate of
        each reference field (one group without).
        """
        from sklearn.linear_model import LogisticRegression

        x = np.asarray(emb, dtype=np.float64)
        y = np.asarray([str(v) for v in labels], dtype=object)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"emb {x.shape} and {len(y)} labels do not match")
        check_labels(y, clean=self.clean)
        ref = x if reference is None else np.asarray(reference, dtype=np.float64)
        self.mean_ = ref.mean(axis=0)
        sd = ref.std(axis=0)
        self.scale_ = np.where(sd > 1e-12, sd, 1.0)
        self.basis_ = None
        n_emb = ref.shape[1] - self.passthrough
        if self.components is not None and 0 < self.components < n_emb:
            # the embedding part reduced to its leading principal components over the screen's
            # fields (unsupervised), each scaled to unit variance
            zr = ((ref - self.mean_) / self.scale_)[:, :n_emb]
            _, sv, vt = np.linalg.svd(zr, full_matrices=False)
            k = min(self.components, len(sv))
            sdk = sv[:k] / np.sqrt(max(len(zr), 1))
            self.basis_ = vt[:k].T / np.where(sdk > 1e-12, sdk, 1.0)
            self.n_emb_ = n_emb
        self.n_typical_ = 0
        if reference is not None and typical:
            z = outlier_scores(ref, groups)
            labelled = {r.tobytes() for r in x}
            add = [i for i in np.flatnonzero(z < 0) if ref[i].tobytes() not in labelled]
            if len(add) > MAX_TYPICAL:  # an even spread, the same every time
                add = [add[int(j)] for j in np.linspace(0, len(add) - 1, MAX_TYPICAL).round()]
            if add:
                x = np.vstack([x, ref[add]])
                y = np.concatenate([y, np.full(len(add), self.clean, dtype=object)])
                self.n_typical_ = len(add)
        self.model_ = LogisticRegression(
            C=self.C, class_weight="balanced", max_iter=self.max_iter
        ).fit(self._z(x), y)
        self.classes_ = np.asarray(self.model_.classes_, dtype=object)
        self._clean_col = int(np.flatnonzero(self.classes_ == self.clean)[0])
        return self

    def _z(self, emb: np.ndarray) -> np.ndarray:
        z = (np.asarray(emb, dtype=np.float64) - self.mean_) / self.scale_
        if self.basis_ is None:
            return z
        return np.hstack([z[:, : self.n_emb_] @ self.basis_, z[:, self.n_emb_ :]])

    def proba(self, emb: np.ndarray) -> np.ndarray:
        """(n, n_classes) class probabilities, columns in `classes_` order."""
        return self.model_.predict_proba(self._z(emb))

    def score(self, emb: np.ndarray) -> np.ndarray:
        """(n,) probability that a field holds any artefact (1 − P(clean))."""
        return 1.0 - self.proba(emb)[:, self._clean_col]

    def predict_type(self, emb: np.ndarray) -> np.ndarray:
        """(n,) the likeliest label of each field ("clean" or an artefact type)."""
        return self.classes_[np.argmax(self.proba(emb), axis=1)]
