"""`celldino prepare`: images → QC, illumination, cells, crop store and engineered features.

Pass 1 (every site): read, QC metrics, running plate means for illumination, pixel samples for
plate percentiles, pixel types. Results (qc.parquet, illum/, prepare.json) are cached by a
fingerprint of the settings and of the inputs: the load-data table's content and each image file's
size and modification time (`input_fingerprint`). A rerun in the same `out_dir` after the inputs
changed starts afresh, logging what changed; after the settings changed it is refused before
anything is written.
Pass 2 (QC-passing sites, resumable): illumination-correct, segment (or read masks / locations),
crop, compute features, append to the crop store; a rerun skips sites already in the store.
Unreadable images raise (naming file and load-data row) or, with `on_error=skip`, are recorded
in skipped.parquet (file, reason) and left out.

Outputs in `out_dir`: cells.parquet, crops.zarr, engineered.parquet, qc.parquet, images.parquet,
skipped.parquet, inputs.parquet, illum/<plate>.npy, prepare.json. The folder is locked while
prepare writes it; every failure the user can fix is a `celldino.errors.UserError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from celldino import log
from celldino.config import ConfigError, PrepareConfig
from celldino.data import qc as qcmod
from celldino.data.crops import BORDERS, crop_cells
from celldino.data.engineered import FeatureScaleError, cell_features
from celldino.data.illumination import (
    IlluminationAccumulator,
    apply_illumination,
    function_for,
)
from celldino.data.imagesets import ImageSet, ImageSetError
from celldino.data.intensity_normalization import check_method, finite_image, image_percentiles
from celldino.data.segmentation import (
    expand_nuclei,
    segment_cells,
    segment_nuclei,
)
from celldino.data.user_masks import cells_from_mask, labels_from_mask, outline_overlay
from celldino.errors import DataError, MissingInputError, OutputError, UserError
from celldino.io import provenance
from celldino.io.cropstore import CELLS, CROPS, LEDGER, PARTS, CropStore, CropStoreError
from celldino.io.files import (
    WRITE_ERRNOS,
    fingerprint,
    read_json,
    require_writable,
    write_json,
)
from celldino.io.images import ImageReadError, image_shape, stored_dtype
from celldino.io.lock import output_lock
from celldino.io.masks import MASKS, OUTLINES, read_user_mask, write_masks, write_outline
from celldino.io.prepared import (
    ENGINEERED,
    ILLUM,
    IMAGES,
    INPUTS,
    QC,
    SKIPPED,
    STATE,
    read_illumination,
    read_images,
    read_inputs,
    read_qc,
    write_illumination,
)
from celldino.io.provenance import refuse_overwriting_inputs
from celldino.io.tables import read_table, row_label, write_parquet

logger = log.get_logger(__name__)

SEGMENTATIONS = ("watershed", "masks", "locations")
SITE_ERRORS = (ImageReadError, ImageSetError, FileNotFoundError, ValueError)
_N_SAMPLE = 4096


class PrepareError(ConfigError):
    """Settings that cannot work together (named in the message)."""


# everything prepare writes in out_dir (removed when the inputs changed; cells.parquet first)
_OUTPUT_FILES = (
    CELLS,
    ENGINEERED,
    LEDGER,
    STATE,
    QC,
    IMAGES,
    SKIPPED,
    INPUTS,
)
_OUTPUT_DIRS = (CROPS, PARTS, "features_parts", ILLUM, MASKS, OUTLINES)


def _check(cfg, channels: list[str]) -> None:
    check_method(cfg.normalization)
    if cfg.border not in BORDERS:
        raise PrepareError(f"prepare.border='{cfg.border}' is not one of {BORDERS}")
    if cfg.segmentation not in SEGMENTATIONS:
        raise PrepareError(
            f"prepare.segmentation='{cfg.segmentation}' is not one of {SEGMENTATIONS}"
        )
    if cfg.on_error not in ("raise", "skip"):
        raise PrepareError(f"prepare.on_error='{cfg.on_error}' is not raise or skip")
    if cfg.segmentation == "watershed" and cfg.nuclei_channel not in channels:
        raise PrepareError(
            f"prepare.nuclei_channel='{cfg.nuclei_channel}' is not among the channels {channels}"
        )
    if cfg.cell_channel and cfg.cell_channel not in channels:
        raise PrepareError(f"prepare.cell_channel='{cfg.cell_channel}' is not among {channels}")
    if cfg.segmentation == "masks" and not (cfg.mask_dir and cfg.nuclei_masks):
        raise PrepareError("segmentation=masks needs prepare.mask_dir and prepare.nuclei_masks")
    if cfg.segmentation == "locations" and not cfg.locations:
        raise PrepareError("segmentation=locations needs prepare.locations (a table)")
    if cfg.crop_size < 4:
        raise PrepareError(f"prepare.crop_size={cfg.crop_size} is too small")


def _crop_too_large(cfg, shape: tuple[int, ...], file: str) -> PrepareError:
    return PrepareError(
        f"prepare.crop_size={cfg.crop_size} is larger than the {shape[0]}x{shape[1]} images "
        f"(e.g. {file}); choose a crop_size of at most {min(shape)} (about twice a cell's "
        "diameter)"
    )


def _check_crop_fits(cfg, iset: ImageSet) -> None:
    """Refuse a crop larger than the first site's image (read from its header) before anything
    is computed; pass 1 checks every site."""
    if not len(iset):
        return
    file = str(iset.paths(0)[0])
    try:
        shape = tuple(image_shape(file))
    except (ImageReadError, OSError):
        return  # named later (missing or unreadable file)
    if len(shape) == 2 and cfg.crop_size > min(shape):
        raise _crop_too_large(cfg, shape, file)


def _settings(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    # how the work is spread (processes, parts, where they go) never changes a result
    for k in ("workers", "on_error", "out_dir", "parts", "part", "parts_dir", "scheduler"):
        d.pop(k, None)
    return d


# ---- pass 1 -------------------------------------------------------------------------------


def _pass1(iset: ImageSet, cfg, dna_index: int) -> tuple[pd.DataFrame, dict, dict, list, dict]:
    """QC metrics per site, illumination functions, plate pixel samples and pixel types."""
    acc = IlluminationAccumulator(
        block=cfg.illum_size,
        nucleus_diameter=float(cfg.nucleus_diameter),
        dna_index=dna_index,
        channels=iset.channels,
    )
    samples: dict[str, list] = {}
    metrics, skipped = [], []
    dtypes: dict[str, dict[str, str]] = {}  # plate → {dtype: first site of that type}
    channel_types: dict[tuple[str, str], dict[str, list]] = {}  # → {dtype: [n, first file]}
    nonfinite: dict[str, dict] = {}  # site key → {file: pixels} of NaN/inf pixels
    for i in log.progress(range(len(iset)), total=len(iset), desc="QC + illumination"):
        plane_dtypes: list = []
        try:
            raw = iset.read(i, plane_dtypes=plane_dtypes)
        except SITE_ERRORS as e:
            if cfg.on_error != "skip":
                raise
            skipped.append(_skip_record(iset, i, e, "read"))
            continue
        if cfg.crop_size > min(raw.shape[-2:]):
            raise _crop_too_large(cfg, raw.shape[-2:], str(iset.paths(i)[0]))
        plate = str(iset.table.at[i, "Metadata_Plate"])
        # the example file of the site's type: the channel whose plane has it (not always the first)
        example = next(
            (str(p) for p, d in zip(iset.paths(i), plane_dtypes) if d == raw.dtype),
            str(iset.paths(i)[0]),
        )
        dtypes.setdefault(plate, {}).setdefault(str(raw.dtype), example)
        for c, path, d in zip(iset.channels, iset.paths(i), plane_dtypes):
            # each plane's own type: one uint8 channel in a uint16 site is stacked as uint16
            dtypes[plate].setdefault(str(d), str(path))
            n_ex = channel_types.setdefault((plate, c), {}).setdefault(str(d), [0, str(path)])
            n_ex[0] += 1
        img = finite_image(raw)
        if img is not raw:
            bad = (~np.isfinite(raw)).reshape(len(raw), -1).sum(axis=1)
            files = {str(p): int(n) for p, n in zip(iset.paths(i), bad) if n}
            nonfinite[iset.key(i)] = files
            if len(nonfinite) <= 5:
                logger.warning(
                    "%s: %s non-finite pixel(s) (NaN/inf) set to 0 in its crops and left out "
                    "of the plate's illumination function",
                    ", ".join(files),
                    "+".join(str(n) for n in files.values()),
                )
        metrics.append({"Metadata_ImageKey": iset.key(i), **qcmod.image_metrics(img, dna_index)})
        if cfg.illumination:
            acc.add(plate, raw, name=str(iset.paths(i)[0]), key=iset.key(i))
        if cfg.normalization == "percentile_plate":
            idx = np.random.default_rng(cfg.seed).integers(0, img[0].size, _N_SAMPLE)
            samples.setdefault(plate, []).append(
                (img.shape, idx, img.reshape(len(img), -1)[:, idx])
            )
    if len(nonfinite) > 5:
        logger.warning(
            "%d sites hold non-finite pixels (set to 0); all listed in prepare.json 'nonfinite'",
            len(nonfinite),
        )
    for plate, sizes in acc.sizes().items():
        logger.warning(
            "plate %s has sites of %d sizes (%s): one illumination function per size",
            plate,
            len(sizes),
            ", ".join(f"{h}x{w} e.g. {name}" for (h, w), name in sizes),
        )
    qc = pd.DataFrame(
        metrics,
        columns=[
            "Metadata_ImageKey",
            "QC_Blur",
            "QC_Saturation",
            "QC_Foreground",
            "QC_LargestObject",
        ],
    )
    qc = qcmod.flag_images(
        qc,
        blur_z=cfg.qc_blur_z,
        max_saturation=cfg.qc_max_saturation,
        min_foreground=cfg.qc_min_foreground,
        debris_area=cfg.qc_debris_area,
    )
    # the illumination functions from the QC-passing images only (blur, debris, saturation
    # would bend them); the report (images used, ranges, warnings) goes into prepare.json
    passing = set(qc.loc[qc["QC_Pass"], "Metadata_ImageKey"])
    if cfg.illumination:  # the plates illumination fits (as IlluminationAccumulator counts)
        plate_of = dict(zip(iset.table["Metadata_ImageKey"], iset.table["Metadata_Plate"]))
        n_passing = pd.Series([str(plate_of[k]) for k in passing if k in plate_of]).value_counts()
        fitted = {p for p, n in n_passing.items() if n >= max(cfg.illum_min_images, 3)}
        _refuse_mixed_types_in_plate_functions(channel_types, fitted)
    functions, illum_report = (
        acc.functions(
            method=cfg.illum_filter,
            passing=passing,
            min_images=cfg.illum_min_images,
            stability=cfg.illum_stability_test,
        )
        if cfg.illumination
        else ({}, {})
    )
    plate_stats = {}
    for plate, items in samples.items():
        vals = []
        for shape, idx, v in items:
            v = v.astype(np.float32)
            fn = function_for(functions, plate, shape)
            if fn is not None and fn.shape == shape:
                v = v / fn.reshape(shape[0], -1)[:, idx]
            vals.append(v)
        pooled = np.concatenate(vals, axis=1)  # (C, n_images * n)
        lo, hi = np.percentile(pooled, cfg.norm_percentiles, axis=1)
        plate_stats[plate] = {"lo": [float(x) for x in lo], "hi": [float(x) for x in hi]}
    extra = {"dtypes": dtypes, "nonfinite": nonfinite, "illumination_report": illum_report}
    return qc, functions, plate_stats, skipped, extra


def _refuse_mixed_types_in_plate_functions(
    channel_types: dict[tuple[str, str], dict[str, list]], fitted_plates: set[str]
) -> None:
    """A plate whose channel holds images of two pixel types (one site saved as uint8 or float16
    in a uint16 screen) cannot get one illumination function: the fit averages raw values, so
    the odd image changes the function (it turned a flat one into an applied one), and so the
    correction and segmentation of every site of the plate. The range the odd image was scaled
    from is unknown (a 12-bit camera in uint16 is not 0..65535), so it is not rescaled: refused
    naming both files, before anything is written. `fitted_plates`: the plates whose function
    is fitted (illumination on, enough QC-passing images), whatever the fit decides."""
    for (plate, channel), seen in channel_types.items():
        if len(seen) < 2 or plate not in fitted_plates:
            continue
        ranked = sorted(seen.items(), key=lambda kv: -kv[1][0])
        (major, (n_major, ex_major)), (minor, (n_minor, ex_minor)) = ranked[0], ranked[1]
        stored = stored_dtype(ex_minor)  # float16 is read as float32: say what the file holds
        minor = f"{minor} (stored as {stored})" if stored and stored != minor else minor
        raise DataError(
            f"plate {plate}, channel {channel}: images of different pixel types: {ex_minor} is "
            f"{minor} ({n_minor} image(s)) while {ex_major} is {major} ({n_major}); the plate's "
            "illumination function would average their raw values and change the correction "
            "and segmentation of every site. Convert the images to one type (the range the "
            "odd one was scaled from is not known here), or set prepare.illumination=false"
        )


def _store_dtype(dtypes: dict[str, dict[str, str]], cfg) -> np.dtype:
    """The crop store's dtype: the sites' own, or one that holds every site without loss.

    Sites of different pixel types (uint16 and float [0, 1], 8- and 16-bit) keep their own values
    (never cast into a type that zeroes them); a normalisation that would scale them alike
    (one divisor, raw values, one set of plate percentiles over a mixed plate) is refused.
    """
    seen = {d: ex for per in dtypes.values() for d, ex in per.items()}
    if not seen:
        return np.dtype(np.uint16)
    if len(seen) == 1:
        return np.dtype(next(iter(seen)))
    detail = ", ".join(f"{d} (e.g. {ex})" for d, ex in seen.items())
    mixed_plates = [p for p, per in dtypes.items() if len(per) > 1]
    norm = cfg.normalization
    if norm in ("divisor", "none") or (norm == "percentile_plate" and mixed_plates):
        where = f" within plate {mixed_plates[0]}" if norm == "percentile_plate" else ""
        raise DataError(
            f"the images are of different pixel types{where}: {detail}; "
            f"prepare.normalization={norm} would scale them alike and make one of them garbage. "
            "Use prepare.normalization=percentile_image (each image by its own percentiles) or "
            "convert the images to one type"
        )
    dtype = np.result_type(*[np.dtype(d) for d in seen])
    logger.warning(
        "the images are of different pixel types (%s): crops stored as %s, each site with its "
        "own values; normalization=%s scales each %s by its own percentiles",
        detail,
        dtype,
        norm,
        "image" if norm == "percentile_image" else "plate",
    )
    return dtype


_SKIP_COLUMNS = ["Metadata_ImageKey", "row", "file", "reason", "stage"]


def _skip_record(iset: ImageSet, i: int, e: Exception, stage: str) -> dict:
    path = getattr(e, "path", None) or str(iset.paths(i)[0])
    logger.warning("skipping site %s (%s): %s", iset.key(i), iset.where(i), e)
    return {
        "Metadata_ImageKey": iset.key(i),
        "row": i,
        "file": str(path),
        "reason": f"{type(e).__name__}: {e}",
        "stage": stage,
    }


def _nothing_prepared(out: Path, n_sites: int, skipped: list[dict], n_qc: int) -> DataError:
    """The error of a prep with no site in it: what was left out and why (on_error=skip, QC).
    (Sites read and segmented that hold no cell are a result: a warning names each.)"""
    why = []
    if skipped:
        first = skipped[0]
        why.append(
            f"{len(skipped)} skipped as unreadable or failing (first: {first['file']}: "
            f"{first['reason']}; all in {out / SKIPPED})"
        )
    if n_qc:
        why.append(f"{n_qc} left out by QC (prepare.qc_exclude=true; see {out / QC})")
    return DataError(
        f"no site of {n_sites} prepared: {'; '.join(why)}; fix the inputs or settings and rerun"
    )


# ---- pass 2: one site ----------------------------------------------------------------------

_CTX: dict = {}


def _init_worker(ctx: dict) -> None:
    _CTX.clear()
    _CTX.update(ctx)


def _template_fields(iset: ImageSet, i: int) -> dict:
    row = iset.table.iloc[i]
    fields = {k: v for k, v in row.items() if isinstance(k, str)}
    for c in iset.channels:
        name = str(row[f"FileName_{c}"])
        fields[f"stem_{c}"] = name.split(".")[0]
    return fields


def _segment(i: int, img: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """(nuclei labels, cell labels, centres (n, 2) as (y, x)); labels None for locations."""
    cfg, iset = _CTX["cfg"], _CTX["iset"]
    chans = iset.channels
    if cfg.segmentation == "locations":
        table = _CTX["locations"]
        key = iset.key(i)
        sel = table[table["_key"] == key]
        centres = sel[[cfg.location_y, cfg.location_x]].to_numpy(np.float64)
        return None, None, centres
    if cfg.segmentation == "masks":
        fields = _template_fields(iset, i)
        try:
            nuc_path = Path(cfg.mask_dir) / cfg.nuclei_masks.format(**fields)
        except KeyError as e:
            raise PrepareError(
                f"prepare.nuclei_masks: unknown field {e} (have {list(fields)})"
            ) from e
        nuclei = labels_from_mask(read_user_mask(nuc_path))
        if nuclei.shape != img.shape[1:]:
            raise ImageSetError(f"mask {nuc_path} is {nuclei.shape}, the images {img.shape[1:]}")
        if cfg.cell_masks:
            # binary cell masks are split between the nuclei; label masks matched to them
            cell_path = Path(cfg.mask_dir) / cfg.cell_masks.format(**fields)
            raw_cells = read_user_mask(cell_path)
            if raw_cells.shape != img.shape[1:]:
                raise ImageSetError(
                    f"mask {cell_path} is {raw_cells.shape}, the images {img.shape[1:]}"
                )
            cells = cells_from_mask(raw_cells, nuclei)
        else:
            cells = expand_nuclei(nuclei, cfg.cell_expand)
    else:
        dna = img[chans.index(cfg.nuclei_channel)]
        nuclei = segment_nuclei(
            dna,
            diameter=cfg.nucleus_diameter,
            method=cfg.nuclei_method,
            declump=cfg.nuclei_declump,
            smooth_sigma=cfg.smooth_sigma,
            min_area=cfg.nuclei_min_area,
            max_area=cfg.nuclei_max_area,
            min_distance=cfg.nuclei_min_distance,
            exclude_border=cfg.exclude_border,
        )
        if cfg.cell_channel:
            cells = segment_cells(
                img[chans.index(cfg.cell_channel)],
                nuclei,
                method=cfg.cell_method,
                regularization=cfg.cell_regularization,
                smooth_sigma=cfg.smooth_sigma,
            )
        else:
            cells = expand_nuclei(nuclei, cfg.cell_expand)
    ids = np.unique(nuclei[nuclei > 0])
    if len(ids):
        from scipy import ndimage as ndi

        centres = np.asarray(ndi.center_of_mass(np.ones_like(nuclei), nuclei, ids)).reshape(-1, 2)
    else:
        centres = np.zeros((0, 2))
    return nuclei, cells, centres


def _save_masks(cfg, key: str, img: np.ndarray, nuclei: np.ndarray, cells, iset) -> None:
    """prepare.save_masks / save_outlines: the site's labels (TIFF) and outline overlay (PNG)."""
    cells = cells if cells is not None else nuclei
    if cfg.save_masks:
        write_masks(cfg.out_dir, key, nuclei, cells)
    if cfg.save_outlines:
        chans = iset.channels
        dna = img[chans.index(cfg.nuclei_channel) if cfg.nuclei_channel in chans else 0]
        write_outline(cfg.out_dir, key, outline_overlay(dna, nuclei, cells))


def _site_job(i: int) -> dict:
    """Everything for one site; returns crops, index rows, features and stats, or an error."""
    cfg, iset = _CTX["cfg"], _CTX["iset"]
    key = iset.key(i)
    try:
        img = finite_image(iset.read(i))
        plate = str(iset.table.at[i, "Metadata_Plate"])
        img = apply_illumination(img, function_for(_CTX["illum"], plate, img.shape))
        nuclei, cells, centres = _segment(i, img)
        if nuclei is not None and (cfg.save_masks or cfg.save_outlines):
            _save_masks(cfg, key, img, nuclei, cells, iset)
    except SITE_ERRORS as e:
        if isinstance(e, PrepareError):
            raise
        return {"i": i, "key": key, "error": e}
    info = {}
    if cfg.normalization == "percentile_image":
        lo, hi = image_percentiles(img, tuple(cfg.norm_percentiles))
        info = {"lo": lo, "hi": hi}
    ids = np.unique(nuclei[nuclei > 0]) if nuclei is not None else np.arange(1, len(centres) + 1)
    crops, kept = crop_cells(
        img,
        centres,
        cfg.crop_size,
        border=cfg.border,
        labels=cells,
        cell_ids=ids,
        mask_neighbours=cfg.mask_neighbours and cells is not None,
    )
    meta = iset.metadata(i)
    qc_row = _CTX["qc"].get(key, {})
    rows = []
    if cells is not None and len(kept):
        from scipy import ndimage as ndi

        boxes = ndi.find_objects(cells)
        n_area = np.bincount(nuclei.ravel(), minlength=int(ids.max()) + 1)
        c_area = np.bincount(cells.ravel(), minlength=int(ids.max()) + 1)
    for k in kept:
        cy, cx = centres[k]
        cid = int(ids[k])
        row = {
            **meta,
            "Metadata_CellID": f"{key}/{cid}",
            "Metadata_ObjectNumber": cid,
            "Metadata_Cell_Center_X": float(cx),
            "Metadata_Cell_Center_Y": float(cy),
        }
        if cells is not None:
            b = boxes[cid - 1] if cid - 1 < len(boxes) and boxes[cid - 1] is not None else None
            row.update(
                {
                    "Metadata_BBox_Y0": b[0].start if b else -1,
                    "Metadata_BBox_X0": b[1].start if b else -1,
                    "Metadata_BBox_Y1": b[0].stop if b else -1,
                    "Metadata_BBox_X1": b[1].stop if b else -1,
                    "Metadata_Nuclei_Area": int(n_area[cid]),
                    "Metadata_Cells_Area": int(c_area[cid]),
                }
            )
        row.update({f"Metadata_{k2}": v for k2, v in qc_row.items()})
        rows.append(row)
    feats = None
    if cfg.features and cells is not None and rows:  # no kept cell: no feature rows
        try:
            f = cell_features(
                img,
                nuclei,
                cells,
                iset.channels,
                cell_ids=ids[kept],
                families=cfg.feature_families,
                scale=cfg.feature_scale or None,
            )
        except FeatureScaleError as e:
            raise FeatureScaleError(f"site {key}: {e}") from None
        feats = pd.concat([pd.DataFrame(rows)[list(meta) + ["Metadata_CellID"]], f], axis=1)
    h, w = img.shape[1:]
    outside = int(
        (
            (centres[:, 0] < 0) | (centres[:, 0] >= h) | (centres[:, 1] < 0) | (centres[:, 1] >= w)
        ).sum()
    )
    return {
        "i": i,
        "key": key,
        "crops": crops,
        "rows": rows,
        "features": feats,
        "info": info,
        "n_found": len(centres),
        "n_outside": outside,
        "shape": (h, w),
    }


def _run_sites(todo: list[int], ctx: dict, workers: int):
    if workers <= 1 or len(todo) < 2:
        _init_worker(ctx)
        for i in todo:
            yield _site_job(i)
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(ctx,)) as ex:
        yield from ex.map(_site_job, todo, chunksize=1)


# ---- the pipeline --------------------------------------------------------------------------


def _locations_table(cfg, iset: ImageSet) -> pd.DataFrame:
    table = read_table(cfg.locations)
    for col in (cfg.location_x, cfg.location_y):
        if col not in table:
            raise DataError(
                f"{cfg.locations}: no column '{col}' (columns with 'Location': "
                f"{[c for c in table.columns if 'Location' in c][:12]}); set prepare.location_x/y"
            )
    # match on Plate/Well/Site, accepting CellProfiler's Image_Metadata_* spellings
    keys = pd.Series([""] * len(table), index=table.index)
    used = []
    for name in ("Plate", "Well", "Site"):
        if f"Metadata_{name}" not in iset.table:
            continue
        for cand in (f"Metadata_{name}", f"Image_Metadata_{name}", f"Image_Metadata_{name}_x"):
            if cand in table:
                used.append((name, cand))
                break
    if not used:
        raise DataError(f"{cfg.locations}: no Metadata_Plate/Well/Site columns to match sites on")
    img_keys = {}
    for i in range(len(iset)):
        k = tuple(str(iset.table.at[i, f"Metadata_{n}"]).lstrip("0") for n, _ in used)
        img_keys[k] = iset.key(i)
    keys = [
        img_keys.get(tuple(str(r[c]).lstrip("0") for _, c in used), "") for _, r in table.iterrows()
    ]
    table = table.assign(_key=keys)
    if not (table["_key"] != "").any():
        raise DataError(f"{cfg.locations}: no row matches a site on {[c for _, c in used]}")
    matched = table[table["_key"] != ""]
    for col in (cfg.location_x, cfg.location_y):
        bad = matched.index[~np.isfinite(pd.to_numeric(matched[col], errors="coerce"))].tolist()
        if bad:
            raise DataError(
                f"{row_label(cfg.locations, int(bad[0]))}: column {col} is empty or not a number"
                + (f" ({len(bad)} rows)" if len(bad) > 1 else "")
                + "; every location needs its x and y in pixels"
            )
    lost = int((table["_key"] == "").sum())
    if lost:
        logger.warning(
            "%s: %d of %d locations match no site of the image set (on %s) and are left out",
            cfg.locations,
            lost,
            len(table),
            [c for _, c in used],
        )
    return table


# ---- inputs: what the results are computed from (`celldino.io.provenance`) -----------------


def _input_files(iset: ImageSet, cfg) -> list[str]:
    """Every image (and mask) file the image set reads, in order, each once."""
    files = []
    for c in iset.channels:
        files += [
            str(Path(p) / f)
            for p, f in zip(
                iset.table[f"PathName_{c}"].astype(str), iset.table[f"FileName_{c}"].astype(str)
            )
        ]
    if cfg.segmentation == "masks" and cfg.mask_dir:
        for i in range(len(iset)):
            fields = _template_fields(iset, i)
            for template in (cfg.nuclei_masks, cfg.cell_masks):
                try:
                    files.append(str(Path(cfg.mask_dir) / template.format(**fields)))
                except (KeyError, IndexError, ValueError):
                    pass  # a bad template is reported when the site is segmented
    return list(dict.fromkeys(files))


def _row_of(iset: ImageSet, path: str) -> tuple[int, str]:
    """(row, channel) of an image file of the set (or (-1, '') for a mask file). Only the rows
    whose file name ends as `path` does are compared whole (a screen has a million rows)."""
    name = Path(path).name
    for c in iset.channels:
        files = iset.table[f"FileName_{c}"].astype(str)
        for i in np.flatnonzero(files.str.endswith(name).to_numpy()):
            p = f"{iset.table[f'PathName_{c}'].iat[i]}/{files.iat[i]}"
            if str(Path(p)) == path:
                return int(i), c
    return -1, "mask"


def _inputs(iset: ImageSet, cfg) -> tuple[dict, pd.DataFrame]:
    """(summary, per-file stats as kept in inputs.parquet): the table's content hash, and each
    input file's size and modification time (never its bytes: screens are terabytes)."""
    # one entry per file the table names (a Zarr image's folder too); missing: size -1
    files = provenance.record(_input_files(iset, cfg), hash_up_to=-1, expand=False)
    stats = pd.DataFrame(
        [(p, n, t) for p, (n, t, _) in files.items()], columns=["path", "size", "mtime_ns"]
    )
    summary = {
        "table": provenance.table_digest(iset.table),
        "images": provenance.stat_digest(files),
        "n_images": len(files),
    }
    if cfg.segmentation == "locations" and cfg.locations and Path(cfg.locations).is_file():
        summary["locations"] = provenance.digest(cfg.locations)
    return summary, stats


def input_fingerprint(cfg: PrepareConfig) -> dict:
    """What a PrepareConfig's results are computed from, beyond its settings:
    {"table": content hash of the load-data table as read (or of the table built from
    image_dir + pattern), "images": hash of every image file's path, size and modification time
    (mask files too with segmentation=masks), "n_images": number of files, and "locations":
    content hash of the locations table with segmentation=locations}.

    Cheap (one stat per file, never the pixels); raises the same UserErrors as prepare for a
    table that cannot be read. Equal dicts mean prepare would compute the same thing.
    """
    summary, _ = _inputs(ImageSet.from_config(cfg), cfg)
    return summary


def _table_change(out: Path, iset: ImageSet) -> str:
    """One phrase saying how the table differs from the one the prep in `out` was made from
    (images.parquet, less the QC columns prepare added)."""
    try:
        old = read_images(out)
    except Exception:
        return "content changed"
    ours = [
        c
        for c in old.columns
        if c not in iset.table.columns and (str(c).startswith("QC_") or c == "Skipped")
    ]
    return provenance.describe_table_changes(old.drop(columns=ours), iset.table, iset.where)


def _files_change(out: Path, stats: pd.DataFrame, iset: ImageSet) -> str:
    try:
        old = read_inputs(out)
    except Exception:
        return "image files changed"

    def rows(df: pd.DataFrame) -> dict[str, list[int]]:
        return {
            p: [int(n), int(t)] for p, n, t in df[["path", "size", "mtime_ns"]].itertuples(False)
        }

    def name(path: str) -> str:  # the file and its load-data row
        i, c = _row_of(iset, path)
        return f"{path} [{iset.where(i)}, channel {c}]" if i >= 0 else path

    parts = provenance.describe_changes(rows(old), rows(stats), "image file", name=name)
    return "; ".join(parts) or "image files changed"


def _what_changed(out: Path, state: dict, inputs: dict, stats: pd.DataFrame, iset, cfg) -> str:
    old = state.get("inputs")
    if not old:
        return "it holds no record of its inputs (made by an older celldino or interrupted)"
    parts = []
    if old.get("table") != inputs["table"]:
        parts.append(f"load-data table {iset.source}: {_table_change(out, iset)}")
    if old.get("images") != inputs["images"]:
        parts.append(_files_change(out, stats, iset))
    if old.get("locations") != inputs.get("locations"):
        parts.append(f"locations table {cfg.locations} content changed")
    if state.get("channels") not in (None, list(iset.channels)):
        parts.append(f"channels {state.get('channels')} → {list(iset.channels)}")
    return "; ".join(parts) or "inputs changed"


def _start_afresh(out: Path) -> None:
    """Remove what an earlier prepare wrote in `out` (cells.parquet first: never a stale 'done')."""
    for name in _OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in _OUTPUT_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _json_like(obj):
    return json.loads(json.dumps(obj, default=str))


# ---- the pipeline --------------------------------------------------------------------------


def prepare(cfg, *, after_site: Callable[[int, str], None] | None = None) -> Path:
    """Run the prepare pipeline described by a PrepareConfig; returns the prep folder.

    `after_site(n_done, key)` is called after each site is committed (progress hooks, tests).
    The table and settings are checked, and the output folder proven writable and locked,
    before anything is computed. A disk that fills up (or a folder that turns read-only) raises
    `OutputError`; what was committed stays intact and the rerun resumes.
    """
    iset, out = open_inputs(cfg)
    with output_lock(out, "prepare"), write_errors(out):
        return _prepare(cfg, iset, out, after_site)


def open_inputs(cfg) -> tuple[ImageSet, Path]:
    """(image set, prep folder) of a PrepareConfig: the table and settings checked, no input
    written over, the folder proven writable; nothing computed, nothing locked."""
    out = Path(cfg.out_dir)
    iset = ImageSet.from_config(cfg)
    _check(cfg, iset.channels)
    _check_crop_fits(cfg, iset)
    refuse_overwriting_inputs(
        {"prepare.out_dir": [out / name for name in _OUTPUT_FILES]},
        {
            "prepare.load_data": cfg.load_data,
            "prepare.image_dir": cfg.image_dir,
            "prepare.mask_dir": cfg.mask_dir if cfg.segmentation == "masks" else "",
            "prepare.locations": cfg.locations if cfg.segmentation == "locations" else "",
        },
        "prepare",
        owned=[out / name for name in _OUTPUT_DIRS],
    )
    refuse_overwriting_inputs(  # images the table names may sit beside the prep, not in its folders
        {},
        {"the image folder": {p for c in iset.channels for p in iset.table[f"PathName_{c}"]}},
        "prepare",
        owned=[out / name for name in _OUTPUT_DIRS],
    )
    require_writable(out, "prepare.out_dir")
    return iset, out


@contextlib.contextmanager
def write_errors(out: Path):
    """A full disk or read-only folder met while writing `out`: `OutputError` saying a rerun
    resumes (what was committed stays intact)."""
    try:
        yield
    except OSError as e:
        if isinstance(e, UserError) or e.errno not in WRITE_ERRNOS:
            raise
        raise OutputError(
            f"prepare: writing {e.filename or out} failed ({e.strerror or e}); free space "
            f"or fix permissions in {out} and rerun: the sites already committed are kept "
            "and the rerun resumes after them"
        ) from e


def _prepare(cfg, iset: ImageSet, out: Path, after_site) -> Path:
    p1 = _pass1_cached(cfg, iset, out)
    store, skipped2 = _pass2(cfg, iset, out, p1, p1.todo, after_site)
    return _finish(cfg, iset, out, store, p1, skipped2)


@dataclasses.dataclass
class Pass1:
    """What pass 1 hands pass 2: computed, or read back from prepare.json, qc.parquet and illum/
    (`celldino.data.parts` hands the same to every part of a screen)."""

    fp: str  # the prep's fingerprint (settings, sites, channels, inputs)
    state: dict  # prepare.json
    qc: pd.DataFrame
    functions: dict  # illumination functions {plate: (C, H, W)}
    skipped: list[dict]  # sites left out at reading (on_error=skip)
    todo: list[int]  # the rows pass 2 prepares, in table order
    qc_lookup: dict
    dtype: np.dtype  # the crop store's
    locations: pd.DataFrame | None


def _pass1_cached(cfg, iset: ImageSet, out: Path, *, compute: bool = True) -> Pass1:
    """Pass 1 (QC, illumination) of `out`: reused when prepare.json's fingerprint matches,
    else computed (`compute=False`: refused instead, for `celldino prepare-merge`)."""
    chans = iset.channels
    dna_name = cfg.nuclei_channel if cfg.nuclei_channel in chans else chans[0]
    dna_index = chans.index(dna_name)
    settings = _settings(cfg)
    locations = _locations_table(cfg, iset) if cfg.segmentation == "locations" else None
    t0 = time.perf_counter()
    inputs, stats = _inputs(iset, cfg)
    logger.debug("inputs fingerprinted in %.1f s: %s", time.perf_counter() - t0, inputs)
    missing = stats["path"][stats["size"] < 0].tolist()
    if missing and cfg.on_error != "skip":  # before anything is computed (or the old prep removed)
        i, c = _row_of(iset, missing[0])
        more = f" ({len(missing)} files missing in all)" if len(missing) > 1 else ""
        where = f"{iset.where(i)}, channel {c}" if i >= 0 else "prepare.nuclei_masks/cell_masks"
        raise MissingInputError(
            f"image file {missing[0]} not found [{where}]{more}; check "
            "PathName_/FileName_ (or the image folder), or set prepare.on_error=skip to leave "
            "such sites out"
        )
    fp = fingerprint(
        {
            "settings": settings,
            "sites": list(iset.table["Metadata_ImageKey"]),
            "channels": chans,
            "inputs": inputs,
        }
    )
    logger.info("prepare: %d sites, channels %s → %s", len(iset), chans, out)

    state_path = out / STATE
    try:
        state = read_json(state_path) if state_path.exists() else {}
    except ValueError:
        state = {}
    if not compute and not (state.get("fingerprint") == fp and (out / QC).exists()):
        what = _what_changed(out, state, inputs, stats, iset, cfg) if state else "no prepare.json"
        if state.get("settings") not in (None, _json_like(settings)):
            what = "the settings changed"
        raise PrepareError(
            f"{out} was planned from other inputs or settings than these ({what}); run "
            "`celldino prepare-plan` again and then every part (docs/cluster.md)"
        )
    has_store = (out / LEDGER).exists()  # our own files only: never clear a stranger's folder
    if state.get("fingerprint") != fp and (state or has_store):
        old_settings, new_settings = state.get("settings"), _json_like(settings)
        if old_settings is not None and old_settings != new_settings:
            diff = "; ".join(
                f"{k}: {old_settings.get(k)!r} → {v!r}"
                for k, v in new_settings.items()
                if old_settings.get(k) != v
            )
            if has_store:
                raise CropStoreError(
                    f"{out} holds a prep made with other settings ({diff}); use a new "
                    "prepare.out_dir, or delete the old one to redo it with these settings"
                )
            why = f"the settings changed since {out} was prepared ({diff})"
        else:
            what = _what_changed(out, state, inputs, stats, iset, cfg) if state else None
            why = f"the inputs changed since {out} was prepared ({what or 'no prepare.json'})"
        logger.warning("prepare: %s: starting afresh", why)
        _start_afresh(out)
        state = {}

    if state.get("fingerprint") == fp and (out / QC).exists():
        logger.info("pass 1 (QC, illumination) already done: reusing %s", out / QC)
        return _read_pass1(cfg, iset, out, state, locations=locations, write_images=True)
    qc, functions, plate_stats, skipped1, extra = _pass1(iset, cfg, dna_index)
    dtypes = extra["dtypes"]
    _store_dtype(dtypes, cfg)  # refuses before anything is written
    write_parquet(stats, out / INPUTS)
    write_parquet(qc, out / QC)
    names = write_illumination(functions, out / ILLUM) if functions else {}
    state = {
        "fingerprint": fp,
        "channels": chans,
        "illumination": names,
        "illumination_report": extra["illumination_report"],
        "normalization": {
            "method": cfg.normalization,
            "percentiles": list(cfg.norm_percentiles),
            "divisor": cfg.norm_divisor,
            "plate": plate_stats,
        },
        "skipped_read": skipped1,
        "settings": settings,
        "inputs": inputs,
        "dtypes": dtypes,
        "nonfinite": extra["nonfinite"],
    }
    write_json(state_path, state)
    return _read_pass1(
        cfg, iset, out, state, locations=locations, write_images=True, computed=(qc, functions)
    )


def _read_pass1(
    cfg,
    iset: ImageSet,
    out: Path,
    state: dict,
    *,
    locations: pd.DataFrame | None = None,
    write_images: bool = False,
    computed: tuple | None = None,
) -> Pass1:
    """The Pass1 of a prep folder whose prepare.json is `state` (its fingerprint checked by the
    caller); `write_images`: write images.parquet (the image set with QC) into `out`."""
    if computed is not None:
        qc, functions = computed
    else:
        qc = read_qc(out)
        functions = (
            read_illumination(out / ILLUM, state["illumination"]) if state["illumination"] else {}
        )
    skipped1 = state.get("skipped_read", [])
    dtypes = state.get("dtypes", {})
    logger.info(qcmod.summary(qc))
    skipped_keys = {s["Metadata_ImageKey"] for s in skipped1}
    if write_images:  # images.parquet: the image set with QC, for the field dataset and reports
        images = iset.table.merge(qc, on="Metadata_ImageKey", how="left")
        images["Skipped"] = images["Metadata_ImageKey"].isin(skipped_keys)
        images["QC_Pass"] = images["QC_Pass"].astype("boolean").fillna(False).astype(bool)
        write_parquet(images, out / IMAGES)

    qc_cols = ["QC_Flags", "QC_Pass"]
    qc_lookup = {r["Metadata_ImageKey"]: {c: r[c] for c in qc_cols} for _, r in qc.iterrows()}
    todo_all = [i for i in range(len(iset)) if iset.key(i) not in skipped_keys]
    if cfg.qc_exclude:
        todo_all = [i for i in todo_all if qc_lookup.get(iset.key(i), {}).get("QC_Pass", False)]

    if not todo_all and not (out / LEDGER).exists():  # nothing to crop: refuse, write no store
        write_parquet(pd.DataFrame(skipped1, columns=_SKIP_COLUMNS), out / SKIPPED)
        n_qc = len(iset) - len(skipped_keys)
        raise _nothing_prepared(out, len(iset), skipped1, n_qc)
    return Pass1(
        fp=state["fingerprint"],
        state=state,
        qc=qc,
        functions=functions,
        skipped=skipped1,
        todo=todo_all,
        qc_lookup=qc_lookup,
        dtype=_store_dtype(dtypes, cfg),
        locations=locations,
    )


def open_store(cfg, iset: ImageSet, out: Path, p1: Pass1) -> CropStore:
    """The crop store in `out` with this prepare's array settings and attributes (a single run,
    a part and the merge of parts open it alike, so their stores are one format)."""
    return CropStore(
        out,
        channels=iset.channels,
        crop_size=cfg.crop_size,
        dtype=p1.dtype,
        attrs={"source": str(cfg.load_data or cfg.image_dir)},
        settings_fingerprint=p1.fp,
    )


def _pass2(cfg, iset: ImageSet, out: Path, p1: Pass1, rows: list[int], after_site):
    """Pass 2 of the sites `rows` (QC-passing, in table order) into the crop store in `out`,
    resuming after the sites it holds: (store, sites skipped with on_error=skip)."""
    store = open_store(cfg, iset, out, p1)
    todo = [i for i in rows if not store.has(iset.key(i))]
    if len(todo) < len(rows):
        logger.info(
            "resuming: %d of %d sites already in the store",
            len(rows) - len(todo),
            len(rows),
        )
    ctx = {"cfg": cfg, "iset": iset, "illum": p1.functions, "qc": p1.qc_lookup}
    if p1.locations is not None:
        ctx["locations"] = p1.locations
    if cfg.features and cfg.segmentation == "locations":
        logger.warning("engineered features need masks: none computed with segmentation=locations")
    feat_dir = out / "features_parts"
    feat_dir.mkdir(exist_ok=True)
    skipped2 = []
    n_outside = 0
    done = len(rows) - len(todo)
    for res in log.progress(
        _run_sites(todo, ctx, cfg.workers), total=len(todo), desc="cells → crops"
    ):
        if "error" in res:
            if cfg.on_error != "skip":
                raise res["error"]
            skipped2.append(_skip_record(iset, res["i"], res["error"], "segment"))
            continue
        key = res["key"]
        if res["n_found"] == 0:
            logger.warning("site %s: no cells found (empty field?)", key)
        if res["n_outside"]:
            n_outside += res["n_outside"]
            logger.warning(
                "site %s: %d of %d locations lie outside the %dx%d image and are left out "
                "(coordinates not in pixels? x and y swapped? see prepare.location_x/y)",
                key,
                res["n_outside"],
                res["n_found"],
                *res["shape"],
            )
        if res["features"] is not None:
            write_parquet(res["features"], feat_dir / f"{len(store.ledger['sites']):08d}.parquet")
        index = pd.DataFrame(res["rows"])
        store.append(key, res["crops"], index, info=res["info"])
        done += 1
        if after_site is not None:
            after_site(done, key)
    return store, skipped2


def _finish(cfg, iset: ImageSet, out: Path, store: CropStore, p1: Pass1, skipped2) -> Path:
    """cells.parquet, the store's attributes, skipped.parquet and engineered.parquet of a store
    holding every site of the prep (a single run's, or the parts' merged)."""
    norm = dict(p1.state["normalization"])
    if cfg.normalization == "percentile_image":
        norm["image"] = {s["key"]: s["info"] for s in store.ledger["sites"]}
    cells = store.finalize({"normalization": norm, "settings_fingerprint": p1.fp})
    skipped = pd.DataFrame(p1.skipped + skipped2, columns=_SKIP_COLUMNS)
    write_parquet(skipped, out / SKIPPED)
    if len(skipped):
        logger.warning("%d sites skipped (see %s)", len(skipped), out / SKIPPED)
    if not store.ledger["sites"]:  # every site left out: not a result (a rerun says it again)
        n_qc = len(iset) - len({s["Metadata_ImageKey"] for s in p1.skipped}) - len(p1.todo)
        raise _nothing_prepared(out, len(iset), p1.skipped + skipped2, n_qc)
    feat_dir = out / "features_parts"
    if cfg.features and cfg.segmentation != "locations":
        parts = [
            pd.read_parquet(feat_dir / s["part"])
            for s in store.ledger["sites"]
            if s["count"] and (feat_dir / s["part"]).exists()
        ]
        eng = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if len(eng) != len(cells):
            raise RuntimeError(f"engineered features: {len(eng)} rows for {len(cells)} cells")
        write_parquet(eng, out / ENGINEERED)
    logger.info("prepared %d cells from %d sites → %s", len(cells), len(store.ledger["sites"]), out)
    return out
