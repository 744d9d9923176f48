"""Engineered per-cell features (the classical baseline): CellProfiler's own measurements, computed
by `cp_measure` (the CellProfiler team's library of CellProfiler's measurement modules).

Objects, as a CellProfiler Cell Painting pipeline makes them: `Nuclei` (IdentifyPrimaryObjects),
`Cells` (IdentifySecondaryObjects) and `Cytoplasm` (IdentifyTertiaryObjects: the cell minus its
nucleus). A cell and its nucleus share one label; a cell whose nucleus fills it has no cytoplasm
(its Cytoplasm columns are NaN, as CellProfiler leaves them empty).

Columns are named exactly as CellProfiler names them, `<Object>_<Family>_<Feature>[_<Channel>...]`,
so pycytominer's `features="infer"` and CellProfiler blocklists apply unchanged. The families
(`FAMILIES`, chosen with `families=`; `FEATURE_SETS` names common choices):
- `AreaShape` (MeasureObjectSizeShape, with Zernike shape moments and Feret diameters):
  `Cells_AreaShape_Area`, `Nuclei_AreaShape_Zernike_3_1`, ...
- `Intensity` (MeasureObjectIntensity, CellProfiler's quartile convention):
  `Nuclei_Intensity_MeanIntensity_DNA`, `Cytoplasm_Intensity_MADIntensity_RNA`, ...
- `RadialDistribution` (MeasureObjectIntensityDistribution, 4 scaled rings and radial Zernikes of
  degree 9): `Cells_RadialDistribution_FracAtD_DNA_1of4`, `..._ZernikeMagnitude_DNA_2_0`, ...
- `Texture` (MeasureTexture, Haralick at scale 3, 256 grey levels, 4 directions):
  `Cytoplasm_Texture_AngularSecondMoment_DNA_3_00_256`, ...
- `Granularity` (MeasureGranularity, 16 spectrum steps, subsampling 0.25): `Cells_Granularity_1_DNA`
- `Correlation` (MeasureColocalization without Costes: Pearson, slope, Manders, rank-weighted
  colocalisation): `Cells_Correlation_Correlation_DNA_RNA`, `Cells_Correlation_Manders_RNA_DNA`, ...
Positional measurements (object centres, bounding-box corners, `Location_*`) are left out: they
describe where a cell lies in the field, not its morphology.

Intensities are divided by `scale` before measuring, as CellProfiler reads images: by the largest
value of the integer type (65535 for 16-bit), so intensity features are on CellProfiler's 0..1
scale and Texture quantises as CellProfiler does. Float images are measured as they are and must
lie in 0..1 for Texture (`FeatureScaleError` otherwise).
"""

from __future__ import annotations

import functools
import itertools
import warnings

import numpy as np
import pandas as pd

from celldino.errors import DataError

COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")
FAMILIES = ("AreaShape", "Intensity", "RadialDistribution", "Texture", "Granularity", "Correlation")
FEATURE_SETS = {
    "all": FAMILIES,
    # everything but Texture and Granularity, the two slowest (see docs/benchmarks.md)
    "fast": ("AreaShape", "Intensity", "RadialDistribution", "Correlation"),
    "shape_intensity": ("AreaShape", "Intensity"),
}
# position in the field, not morphology: left out
_POSITIONAL_SHAPE = {
    "Center_X",
    "Center_Y",
    "Center_Z",
    "BoundingBoxMinimum_X",
    "BoundingBoxMaximum_X",
    "BoundingBoxMinimum_Y",
    "BoundingBoxMaximum_Y",
    "BoundingBoxMinimum_Z",
    "BoundingBoxMaximum_Z",
}


class FeatureScaleError(DataError):
    """A float image outside 0..1 where a family (Texture) needs CellProfiler's 0..1 scale."""


def resolve_families(spec: str | list | tuple) -> tuple[str, ...]:
    """Feature-set names (`FEATURE_SETS`) and `FAMILIES`, a list or a comma-separated string:
    their union, in `FAMILIES` order."""
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    fams = tuple(f for s in spec for f in FEATURE_SETS.get(s, (s,)))
    bad = [f for f in fams if f not in FAMILIES]
    if bad or not fams:
        raise ValueError(
            f"unknown feature families {bad or fams}: choose a set {sorted(FEATURE_SETS)} "
            f"or families from {list(FAMILIES)}"
        )
    return tuple(f for f in FAMILIES if f in fams)  # canonical order


def default_scale(dtype) -> float:
    """CellProfiler's reading scale: the integer type's maximum, 1 for floats."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


@functools.lru_cache(maxsize=1)
def _measure_fns():
    """cp_measure's functions; Texture, Intensity and Feret from its numba versions when numba is
    installed (it comes with umap-learn): the same numbers (to 1e-11), Texture 5-7x faster."""
    import cp_measure
    from cp_measure.bulk import get_core_measurements, get_correlation_measurements

    before = cp_measure._ACCELERATOR
    try:
        import numba  # noqa: F401

        cp_measure.set_accelerator("numba")
    except ImportError:
        pass
    try:
        core = get_core_measurements(legacy=True, sanitize=False)  # CellProfiler's quartiles
    finally:
        cp_measure.set_accelerator(before)
    return core, get_correlation_measurements(sanitize=False)


def _object_columns(res: dict, fmt) -> dict:
    return {fmt(k): np.asarray(v, dtype=np.float64) for k, v in res.items() if fmt(k)}


def _shape_name(k: str) -> str | None:
    return None if k in _POSITIONAL_SHAPE else f"AreaShape_{k}"


def _channel_name(k: str, ch: str) -> str | None:
    """cp_measure's per-channel key → CellProfiler's name (channel before the parameters)."""
    if k.startswith("Location_"):
        return None
    if k.startswith("Intensity_"):
        return f"{k}_{ch}"
    if k.startswith("Granularity_"):
        return f"{k}_{ch}"
    if k.startswith("RadialDistribution_"):
        fam, feat, *param = k.split("_")
        return f"{fam}_{feat}_{ch}_{'_'.join(param)}"
    # Texture: AngularSecondMoment_3_00_256 → Texture_AngularSecondMoment_<ch>_3_00_256
    feat, *param = k.split("_")
    return f"Texture_{feat}_{ch}_{'_'.join(param)}"


def measure_objects(
    image: np.ndarray,
    labels: np.ndarray,
    channels: list[str],
    families: tuple[str, ...] = FAMILIES,
) -> pd.DataFrame:
    """CellProfiler's measurements of every object of `labels` (0 background, labels 1..n
    contiguous) in `image` (C, H, W) already on the measuring scale; row i = label i + 1, columns
    `<Family>_...` (no object prefix)."""
    with warnings.catch_warnings():  # cp_measure warns per undefined value; NaN says it
        warnings.simplefilter("ignore", RuntimeWarning)
        return _measure_objects(image, labels, channels, families)


def _measure_objects(image, labels, channels, families) -> pd.DataFrame:
    core, corr = _measure_fns()
    n = int(labels.max()) if labels.size else 0
    cols: dict[str, np.ndarray] = {}
    if n == 0:
        return pd.DataFrame(index=range(0))
    if "AreaShape" in families:
        for name in ("sizeshape", "zernike", "feret"):
            kw = {"calculate_advanced": False} if name == "sizeshape" else {}
            cols.update(_object_columns(core[name](labels, None, **kw), _shape_name))
    per_channel = {
        "Intensity": ("intensity",),
        "Texture": ("texture",),
        "Granularity": ("granularity",),
        "RadialDistribution": ("radial_distribution", "radial_zernikes"),
    }
    for c, ch in enumerate(channels):
        plane = image[c]
        for fam, names in per_channel.items():
            if fam not in families:
                continue
            for name in names:
                res = core[name](labels, plane)
                cols.update(_object_columns(res, lambda k, ch=ch: _channel_name(k, ch)))
    if "Correlation" in families:
        for a, b in itertools.combinations(range(len(channels)), 2):
            ca, cb = channels[a], channels[b]
            res = corr["pearson"](image[a], image[b], labels)
            cols[f"Correlation_Correlation_{ca}_{cb}"] = np.asarray(res["Correlation_Pearson"])
            cols[f"Correlation_Slope_{ca}_{cb}"] = np.asarray(res["Correlation_Slope"])
            for name, feat in (("manders_fold", "Manders"), ("rwc", "RWC")):
                res = corr[name](image[a], image[b], labels)
                cols[f"Correlation_{feat}_{ca}_{cb}"] = np.asarray(res[f"Correlation_{feat}_1"])
                cols[f"Correlation_{feat}_{cb}_{ca}"] = np.asarray(res[f"Correlation_{feat}_2"])
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in cols.items()}
    wrong = {k: len(v) for k, v in arrays.items() if len(v) != n}
    if wrong:  # a value per object or the rows would not be the cells they are written beside
        raise RuntimeError(f"cp_measure returned {wrong} values for {n} objects")
    return pd.DataFrame(arrays, index=range(n))


def _relabel(labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels `ids` (those present) → 1..k in the order of `ids`, others → 0; returns
    (relabelled image, the ids present in order)."""
    present = np.zeros(int(max(labels.max(), ids.max() if len(ids) else 0)) + 1, bool)
    present[np.unique(labels[labels > 0])] = True
    keep = np.asarray([i for i in ids if i < len(present) and present[i]], dtype=np.int64)
    lut = np.zeros(len(present), np.int32)
    lut[keep] = np.arange(1, len(keep) + 1)
    return lut[labels], keep


def cell_features(
    image: np.ndarray,
    nuclei: np.ndarray,
    cells: np.ndarray,
    channels: list[str],
    *,
    cell_ids: list[int] | np.ndarray | None = None,
    families: str | tuple[str, ...] = FAMILIES,
    scale: float | None = None,
) -> pd.DataFrame:
    """One row per cell id (the label shared by `nuclei` and `cells`), in `cell_ids` order;
    columns `Nuclei_*`, `Cells_*`, `Cytoplasm_*` as CellProfiler names them.

    `image` (C, H, W) in the source's values; it is divided by `scale` (default
    `default_scale(image.dtype)`: CellProfiler's 0..1 reading). A compartment missing for a cell
    (no nucleus pixels, no cytoplasm) leaves that compartment's columns NaN.
    """
    families = resolve_families(families)
    scale = default_scale(image.dtype) if scale is None else float(scale)
    pix = image.astype(np.float64) / scale
    if "Texture" in families and pix.size and (pix.max() > 1.0 or pix.min() < 0.0):
        raise FeatureScaleError(
            f"intensities {pix.min():.3g}..{pix.max():.3g} after dividing by {scale:g} lie "
            "outside 0..1, which CellProfiler's Texture needs: set prepare.feature_scale to the "
            "images' full-scale value (65535 for 16-bit data stored as float)"
        )
    nuclei = np.asarray(nuclei)
    cells = np.asarray(cells)
    ids = np.unique(cells[cells > 0]) if cell_ids is None else np.asarray(cell_ids, np.int64)
    nuc = np.where(cells > 0, nuclei, 0)
    cyto = np.where(nuclei > 0, 0, cells)
    # Granularity's morphology runs over the whole image whatever the objects: when each nucleus
    # lies in its own cell, measure it once per channel for nuclei + cytoplasm together and
    # derive the cells from the two parts (exact: per-object means combine by pixel counts)
    shared = "Granularity" in families and np.array_equal(nuc, np.where(nuclei > 0, cells, 0))
    rest = tuple(f for f in families if f != "Granularity") if shared else families
    rels = {
        comp: _relabel(lab, ids)
        for comp, lab in (("Nuclei", nuc), ("Cells", cells), ("Cytoplasm", cyto))
    }
    gran = _granularity_by_parts(pix, rels, channels) if shared else {}
    blocks = []
    for comp, (rel, present) in rels.items():
        df = (
            measure_objects(pix, rel, channels, rest)
            if rest
            else pd.DataFrame(index=range(len(present)))
        )
        if comp in gran:
            df = pd.concat([df, gran[comp]], axis=1)
        df.index = present
        df = df.reindex(ids)
        df.columns = [f"{comp}_{c}" for c in df.columns]
        blocks.append(df.reset_index(drop=True))
    out = pd.concat(blocks, axis=1)
    names = feature_names(channels, families)
    if list(out.columns) != names:  # an empty compartment: its columns, NaN
        out = out.reindex(columns=names, fill_value=np.nan)
    return out


def _granularity_by_parts(
    pix: np.ndarray, rels: dict, channels: list[str]
) -> dict[str, pd.DataFrame]:
    """Granularity of Nuclei, Cytoplasm and Cells from one cp_measure call per channel.

    cp_measure's Granularity_k of an object is (m[k-1] - m[k]) * 100 / max(m[0], eps), m[k] the
    object's mean of the k-th reconstruction (m[0]: of the image). A cell is its nucleus plus its
    cytoplasm, so its m[k] is the pixel-count-weighted mean of theirs.
    """
    from scipy import ndimage as ndi

    core, _ = _measure_fns()
    eps = np.finfo(float).eps
    nrel, npresent = rels["Nuclei"]
    crel, cpresent = rels["Cytoplasm"]
    _, cell_ids = rels["Cells"]
    kn, kc = len(npresent), len(cpresent)
    both = np.where(crel > 0, crel + kn, nrel)
    idx = np.arange(1, kn + kc + 1)
    area = np.bincount(both.ravel(), minlength=kn + kc + 1)[1:].astype(np.float64)
    pos_n = {int(c): i for i, c in enumerate(npresent)}
    pos_c = {int(c): kn + i for i, c in enumerate(cpresent)}
    out = {"Nuclei": {}, "Cytoplasm": {}, "Cells": {}}
    for c, ch in enumerate(channels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            g = core["granularity"](both, pix[c]) if kn + kc else {}
        if not g:
            continue
        gm = np.stack([np.asarray(v, np.float64) for v in g.values()], axis=1)  # (objects, steps)
        m0 = np.asarray(ndi.mean(pix[c], both, idx), np.float64) if len(idx) else np.zeros(0)
        m0 = np.where(np.isfinite(m0), m0, 0.0)
        # the means m[k] of each part, k = 0..steps
        m = m0[:, None] - np.maximum(m0, eps)[:, None] * np.cumsum(gm, axis=1) / 100
        m = np.concatenate([m0[:, None], m], axis=1)
        cm = np.full((len(cell_ids), m.shape[1]), np.nan)
        for j, cid in enumerate(cell_ids):
            parts = [p[int(cid)] for p in (pos_n, pos_c) if int(cid) in p]
            w = area[parts]
            cm[j] = (w[:, None] * m[parts]).sum(0) / w.sum()
        gc = (cm[:, :-1] - cm[:, 1:]) * 100 / np.maximum(cm[:, :1], eps)
        for k, name in enumerate(g):
            col = f"{name}_{ch}"
            out["Nuclei"][col] = gm[:kn, k]
            out["Cytoplasm"][col] = gm[kn:, k]
            out["Cells"][col] = gc[:, k]
    return {comp: pd.DataFrame(cols) for comp, cols in out.items() if cols}


def feature_names(channels: list[str], families: str | tuple[str, ...] = FAMILIES) -> list[str]:
    """The columns `cell_features` writes for these channels and families (measured on a tiny
    synthetic object, so they follow cp_measure's own keys)."""
    return list(_feature_names(tuple(channels), resolve_families(families)))


@functools.lru_cache(maxsize=16)
def _feature_names(channels: tuple[str, ...], fams: tuple[str, ...]) -> tuple[str, ...]:
    yy, xx = np.mgrid[0:40, 0:40]
    cell = (((yy - 20) ** 2 + (xx - 20) ** 2) < 15**2).astype(np.int32)
    nuc = (((yy - 20) ** 2 + (xx - 20) ** 2) < 6**2).astype(np.int32)
    img = np.random.default_rng(0).random((len(channels), 40, 40))
    cols = []
    for comp, lab in (("Nuclei", nuc), ("Cells", cell), ("Cytoplasm", cell * (nuc == 0))):
        df = measure_objects(img, lab, list(channels), tuple(f for f in fams if f != "Granularity"))
        cols += [f"{comp}_{c}" for c in df.columns]
        if "Granularity" in fams:
            cols += [f"{comp}_Granularity_{k}_{ch}" for ch in channels for k in range(1, 17)]
    return tuple(cols)
