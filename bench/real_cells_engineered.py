"""Engineered features of the real BBBC021 single-cell crops, for `bench/real_cells.py`.

Two feature sets of the cells in `../shared/data/bbbc021_crops` (68x68x3 uint16, one MCF-7 cell
at the centre of each crop):

- `intensity_stats`: 30 per-channel intensity and gradient statistics (the baseline quoted in the
  data README), no segmentation.
- `cellprofiler_features`: CellProfiler's own measurements (cp_measure, through
  `celldino.data.engineered.cell_features`) of the cell at the centre of each crop, segmented with
  celldino's own segmentation: nuclei on the DNA channel, the cell by propagation from its
  nucleus on channel 2.

Channels are taken as DNA, Tubulin, Actin (BBBC021's order). The data README says channel 0 is
DNA but does not confirm the order of channels 1 and 2; channel 2 is used as the cell-body
channel on that assumption (both are cytoskeletal stains that fill the cell, so the cell mask
depends little on it, but the channel names in the feature names may be swapped).

Build the CellProfiler cache once (`bench/real_cells.py score` then scores both sets on the
same cells and splits as every learned set):

    nice -n 10 .venv/bin/python bench/real_cells_engineered.py --families all --workers 2

Measured 2026-11-26 on the shared 2-core machine: all families 8.1 cells/s on 200 crops (one
worker, load ~4); all 7,774 crops 25.5 min with 2 workers at load 5-8 (bench/results cache,
85 MB); 0 crops without a centre nucleus; 24 cells with NaN values (no cytoplasm), imputed;
1,590 features after 12 constant ones. Scores: docs/validation.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bbbc021_crops"
RESULTS = ROOT / "bench" / "results"
CHANNELS = ["DNA", "Tubulin", "Actin"]  # README: 1/2 order unconfirmed (see module docstring)
CELL_CHANNEL = 2
PERCENTILES = (5, 25, 50, 75, 95)
# median nucleus diameter (px) estimated by celldino's `estimate_nucleus_diameter` on the DNA
# channel of 300 random crops of crops_all.npz (quartiles 31.2 / 33.4 / 36.6 px); fixed so that
# every crop is segmented at the same scale (a crop holds only 1-6 nuclei, too few to estimate on)
NUCLEUS_DIAMETER = 33.4


def intensity_stats(images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """30 per-channel intensity and gradient statistics of crops (N, H, W, C) float in [0, 1]
    (the caller cuts the centre and scales): per channel the mean, std, 5/25/50/75/95th
    percentiles, mean absolute gradient (mean of |d/dy| and |d/dx|, `np.gradient`), fraction of
    pixels above the crop's mean and mean of those pixels. Returns float32 (N, 10 C), names
    `<stat>_ch<c>` (stat-major: all channels of a statistic side by side).

    The data README's 0.504 dose macro-F1 was measured outside the project with an unrecorded
    definition; this one (the statistics the README lists) gives 0.511 in the check below, and
    reasonable variants (gradient by differences, min/max for two percentiles) give 0.50-0.52.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {x.shape}")
    n, _, _, c = x.shape
    flat = x.reshape(n, -1, c)
    mean = flat.mean(1)
    std = flat.std(1)
    pct = np.percentile(flat, PERCENTILES, axis=1)  # (5, N, C)
    gy, gx = np.gradient(x, axis=(1, 2))
    grad = (np.abs(gy).mean((1, 2)) + np.abs(gx).mean((1, 2))) / 2
    above = flat > mean[:, None, :]
    n_above = above.sum(1)
    frac_above = n_above / flat.shape[1]
    mean_above = np.where(above, flat, 0).sum(1) / np.maximum(n_above, 1)
    stats = {"mean": mean, "std": std}
    stats.update({f"p{q}": pct[i] for i, q in enumerate(PERCENTILES)})
    stats.update({"mean_abs_gradient": grad, "frac_above_mean": frac_above})
    stats["mean_above_mean"] = mean_above
    feats = np.concatenate(list(stats.values()), axis=1).astype(np.float32)
    names = [f"{s}_ch{k}" for s in stats for k in range(c)]
    return feats, names


def _centre_object(labels: np.ndarray, max_dist: float) -> int:
    """Label of the object at the crop centre, else of the nearest object within `max_dist` px
    of it, else 0."""
    h, w = labels.shape
    cy, cx = h // 2, w // 2
    if labels[cy, cx]:
        return int(labels[cy, cx])
    ys, xs = np.nonzero(labels)
    if not len(ys):
        return 0
    d = np.hypot(ys - cy, xs - cx)
    j = int(np.argmin(d))
    return int(labels[ys[j], xs[j]]) if d[j] <= max_dist else 0


def _disc(shape: tuple[int, int], diameter: float) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= (diameter / 2) ** 2


def segment_centre_cell(
    crop: np.ndarray, diameter: float = NUCLEUS_DIAMETER
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(nucleus, cell, fell_back) masks (H, W) bool of the cell at the centre of a crop (H, W, 3).

    Nuclei: `segment_nuclei` on channel 0 at the fixed `diameter`, border objects kept (neighbours
    cut by the crop edge still compete for pixels). The centre object is the one under the centre
    pixel or the nearest within diameter/2; without one the nucleus is a centred disc of
    `diameter` (`fell_back` True). Cells: `segment_cells` (CellProfiler's propagation,
    `centrosome.propagate`) from all nuclei on channel `CELL_CHANNEL`, the centre one kept.
    """
    from celldino.data.segmentation import segment_cells, segment_nuclei

    nuclei = segment_nuclei(crop[..., 0], diameter=diameter, exclude_border=False)
    k = _centre_object(nuclei, diameter / 2)
    fell_back = k == 0
    if fell_back:
        disc = _disc(nuclei.shape, diameter)
        k = int(nuclei.max()) + 1
        nuclei = np.where(disc, k, nuclei).astype(np.int32)
    cells = segment_cells(crop[..., CELL_CHANNEL], nuclei)
    nuc = nuclei == k
    cell = (cells == k) | nuc
    return nuc, cell, fell_back


def _features_chunk(args: tuple[np.ndarray, str, float]) -> tuple[np.ndarray, np.ndarray]:
    crops, families, diameter = args
    from celldino.data.engineered import cell_features

    rows, fallback = [], []
    for crop in crops:
        nuc, cell, fell_back = segment_centre_cell(crop, diameter)
        fallback.append(fell_back)
        image = np.ascontiguousarray(crop.transpose(2, 0, 1))  # (3, H, W) uint16, read /65535
        df = cell_features(
            image, nuc.astype(np.int32), cell.astype(np.int32), CHANNELS, families=families
        )
        rows.append(df.to_numpy(np.float64)[0])
    return np.stack(rows), np.asarray(fallback, bool)


def _raw_features(images: np.ndarray, families: str, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) float32 features with NaN/inf left in, and (N,) whether the nucleus fell back."""
    chunks = [images[i : i + 64] for i in range(0, len(images), 64)]
    jobs = [(c, families, NUCLEUS_DIAMETER) for c in chunks]
    if workers <= 1:
        results = list(map(_features_chunk, jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_features_chunk, jobs))
    raw = np.concatenate([r[0] for r in results]).astype(np.float32)
    return raw, np.concatenate([r[1] for r in results])


def _crop_keys(images: np.ndarray) -> np.ndarray:
    return np.asarray([hashlib.blake2b(c.tobytes(), digest_size=12).hexdigest() for c in images])


def _cached_raw(
    images: np.ndarray, cache: Path | None, families: str, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """Raw features and fallback flags of `images`, rows from `cache` where it holds the crop
    (keyed by a hash of each crop's pixels and the settings), the rest computed and added."""
    from celldino.data.engineered import resolve_families

    settings = f"{resolve_families(families)}|{NUCLEUS_DIAMETER}|{CELL_CHANNEL}|{CHANNELS}"
    keys = _crop_keys(images)
    c_keys, c_raw, c_fb = np.zeros(0, keys.dtype), None, np.zeros(0, bool)
    z = None
    if cache is not None and cache.exists():
        z = np.load(cache, allow_pickle=False)
        if str(z["settings"]) == settings:
            c_keys, c_raw, c_fb = z["keys"], z["raw"], z["fallback"]
    pos = {k: i for i, k in enumerate(c_keys)}
    _, first = np.unique(keys, return_index=True)
    todo = np.sort([i for i in first if keys[i] not in pos])
    if len(todo):
        t0 = time.perf_counter()
        raw, fb = _raw_features(images[todo], families, workers)
        seconds = time.perf_counter() - t0
        print(
            f"cellprofiler_features[{families}]: computed {len(todo)} crops in {seconds:.1f} s "
            f"({len(todo) / max(seconds, 1e-9):.1f} cells/s, {workers} workers)"
        )
        c_raw = raw if c_raw is None else np.concatenate([c_raw, raw])
        c_keys = np.concatenate([c_keys, keys[todo]])
        c_fb = np.concatenate([c_fb, fb])
        pos = {k: i for i, k in enumerate(c_keys)}
        if cache is not None:
            _save(cache, c_raw, c_keys, c_fb, settings, families)
    else:
        print(f"cellprofiler_features[{families}]: all {len(images)} crops from {cache}")
        if "features" not in z.files:  # a cache written before `features` was stored
            _save(cache, c_raw, c_keys, c_fb, settings, families)
    rows = np.asarray([pos[k] for k in keys], np.int64)
    return c_raw[rows].astype(np.float64), c_fb[rows]


def _impute(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features with NaN/inf → the column's median, columns to keep (not constant), NaN/inf)."""
    raw = np.array(raw, dtype=np.float64)
    bad = ~np.isfinite(raw)
    raw[bad] = np.nan
    all_bad = bad.all(0)  # no finite value in the column: 0 (then constant, dropped)
    with np.errstate(all="ignore"):
        med = np.nanmedian(np.where(all_bad[None, :], 0.0, raw), axis=0)
    feats = np.where(bad, med[None, :], raw)
    return feats, np.ptp(feats, axis=0) > 0, bad


def _save(cache: Path, raw, keys, fallback, settings: str, families: str) -> None:
    """The cache: raw rows (NaN kept), crop keys, fallback flags, settings; and `features` /
    `names` (imputed, constant columns dropped, rows in cache order: crops_all's order when
    main built it) for readers without the crops."""
    from celldino.data.engineered import feature_names

    feats, keep, _ = _impute(raw)
    names = [n for n, k in zip(feature_names(CHANNELS, families), keep) if k]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + f".tmp{os.getpid()}.npz")
    np.savez_compressed(
        tmp,
        raw=raw,
        keys=keys,
        fallback=fallback,
        settings=np.asarray(settings),
        features=feats[:, keep].astype(np.float32),
        names=np.asarray(names),
    )
    tmp.replace(cache)


def cellprofiler_features(
    images: np.ndarray, cache: Path | None = None, families: str = "all", workers: int = 1
) -> tuple[np.ndarray, list[str]]:
    """CellProfiler's own measurements of the cell at the centre of each crop.

    `images` (N, 68, 68, 3) uint16 raw (channels DNA, Tubulin, Actin; the README does not confirm
    the order of channels 1 and 2, channel 2 is used as the cell channel). Each crop is segmented
    by `segment_centre_cell` and measured by `celldino.data.engineered.cell_features` (cp_measure;
    intensities on CellProfiler's 0..1 scale, /65535) for `families` (`FEATURE_SETS` name or
    families). Returns float32 (N, F) and CellProfiler's names (`Nuclei_`, `Cells_`,
    `Cytoplasm_`...). Values that are NaN/inf (a cell without cytoplasm, an undefined measure)
    take their column's median over these crops (no labels used); then constant columns are
    dropped. Counts of fallback nuclei and imputed values are printed.
    `cache`: an npz (or a folder: `bbbc021_cp_<families>.npz` in it) of raw per-crop features keyed by a hash of each crop's pixels and the
    settings, so any subset of cached crops (e.g. three plates of crops_all) is read from it and
    new crops are added; `workers` processes.
    """
    from celldino.data.engineered import feature_names

    images = np.ascontiguousarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.is_dir():
        cache = cache / f"bbbc021_cp_{families.replace(',', '+')}.npz"
    raw, fallback = _cached_raw(images, cache, families, workers)
    feats, keep, bad = _impute(raw)
    print(
        f"cellprofiler_features[{families}]: {len(images)} crops, {int(fallback.sum())} without "
        f"a centre nucleus (centred disc); {int(bad.sum())} NaN/inf values in "
        f"{int(bad.any(0).sum())} columns and {int(bad.any(1).sum())} cells imputed by the column "
        f"median; {int((~keep).sum())} constant columns dropped of {raw.shape[1]}"
    )
    names = feature_names(CHANNELS, families)
    return feats[:, keep].astype(np.float32), [n for n, k in zip(names, keep) if k]


# --- building the cache ------------------------------------------------------------------------


def main() -> None:
    """Build (or time) the CellProfiler cache; `bench/real_cells.py score` scores it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--families", default="all", help="FEATURE_SETS name or families")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--speed", type=int, default=0, help="only time this many crops and exit")
    ap.add_argument("--cache", type=Path, default=None, help="default bench/results/...npz")
    args = ap.parse_args()
    images = np.load(args.data / "crops_all.npz")["images"]
    if args.speed:
        sub = np.random.default_rng(0).choice(len(images), args.speed, replace=False)
        t0 = time.perf_counter()
        cellprofiler_features(images[np.sort(sub)], None, args.families, args.workers)
        print(f"{args.speed / (time.perf_counter() - t0):.1f} cells/s")
        return
    cache = args.cache or RESULTS / f"bbbc021_cp_{args.families.replace(',', '+')}.npz"
    cellprofiler_features(images, cache, args.families, args.workers)
    print(f"cached in {cache}; score with: .venv/bin/python bench/real_cells.py score")


if __name__ == "__main__":
    main()
