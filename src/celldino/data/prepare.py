"""`celldino prepare`: images → QC, illumination, cells, crop store and engineered features.

Pass 1 (every site): read, QC metrics, running plate means for illumination, pixel samples for
plate percentiles. Results (qc.parquet, illum/, prepare.json) are cached by a settings fingerprint.
Pass 2 (QC-passing sites, resumable): illumination-correct, segment (or read masks / locations),
crop, compute features, append to the crop store; a rerun skips sites already in the store.
Unreadable images raise (naming file and load-data row) or, with `on_error=skip`, are recorded
in skipped.parquet (file, reason) and left out.

Outputs in `out_dir`: cells.parquet, crops.zarr, engineered.parquet, qc.parquet, images.parquet,
skipped.parquet, illum/<plate>.npy, prepare.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from celldino import log
from celldino.data import qc as qcmod
from celldino.data.crops import BORDERS, crop_cells
from celldino.data.features import cell_features
from celldino.data.illumination import (
    IlluminationAccumulator,
    apply_illumination,
    load_functions,
    save_functions,
)
from celldino.data.imagesets import ImageSet, ImageSetError
from celldino.data.intensity import check_method, image_percentiles
from celldino.data.segmentation import (
    expand_nuclei,
    labels_from_mask,
    match_cells,
    segment_cells,
    segment_nuclei,
)
from celldino.io.cropstore import CropStore, CropStoreError
from celldino.io.files import fingerprint, read_json, write_json
from celldino.io.images import ImageReadError, read_image
from celldino.io.tables import LoadDataError, read_table, write_parquet

logger = log.get_logger(__name__)

SEGMENTATIONS = ("watershed", "masks", "locations")
SITE_ERRORS = (ImageReadError, ImageSetError, FileNotFoundError, ValueError)
_N_SAMPLE = 4096


class PrepareError(ValueError):
    """Settings that cannot work together (named in the message)."""


# errors the CLI reports as one line (bad input or settings), not as a traceback
INPUT_ERRORS = (PrepareError, LoadDataError, ImageReadError, ImageSetError, CropStoreError)


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


def _settings(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    for k in ("workers", "on_error", "out_dir"):
        d.pop(k, None)
    return d


# ---- pass 1 -------------------------------------------------------------------------------


def _pass1(iset: ImageSet, cfg, dna_index: int) -> tuple[pd.DataFrame, dict, dict, list[dict]]:
    """QC metrics per site, illumination functions and plate pixel samples."""
    acc = IlluminationAccumulator()
    samples: dict[str, list] = {}
    metrics, skipped = [], []
    for i in log.progress(range(len(iset)), total=len(iset), desc="QC + illumination"):
        try:
            img = iset.read(i)
        except SITE_ERRORS as e:
            if cfg.on_error != "skip":
                raise
            skipped.append(_skip_record(iset, i, e, "read"))
            continue
        plate = str(iset.table.at[i, "Metadata_Plate"])
        metrics.append({"Metadata_ImageKey": iset.key(i), **qcmod.image_metrics(img, dna_index)})
        if cfg.illumination:
            acc.add(plate, img)
        if cfg.normalization == "percentile_plate":
            idx = np.random.default_rng(cfg.seed).integers(0, img[0].size, _N_SAMPLE)
            samples.setdefault(plate, []).append(
                (img.shape, idx, img.reshape(len(img), -1)[:, idx])
            )
    qc = pd.DataFrame(metrics, columns=["Metadata_ImageKey", "QC_Blur", "QC_Saturation",
                                        "QC_Foreground", "QC_LargestObject"])  # fmt: skip
    qc = qcmod.flag_images(
        qc,
        blur_z=cfg.qc_blur_z,
        max_saturation=cfg.qc_max_saturation,
        min_foreground=cfg.qc_min_foreground,
        debris_area=cfg.qc_debris_area,
    )
    functions = (
        acc.functions(method=cfg.illum_filter, size=cfg.illum_size) if cfg.illumination else {}
    )
    plate_stats = {}
    for plate, items in samples.items():
        fn = functions.get(plate)
        vals = []
        for shape, idx, v in items:
            v = v.astype(np.float32)
            if fn is not None and fn.shape == shape:
                v = v / fn.reshape(shape[0], -1)[:, idx]
            vals.append(v)
        pooled = np.concatenate(vals, axis=1)  # (C, n_images * n)
        lo, hi = np.percentile(pooled, cfg.norm_percentiles, axis=1)
        plate_stats[plate] = {"lo": [float(x) for x in lo], "hi": [float(x) for x in hi]}
    return qc, functions, plate_stats, skipped


def _skip_record(iset: ImageSet, i: int, e: Exception, stage: str) -> dict:
    path = getattr(e, "path", None) or str(iset.paths(i)[0])
    logger.warning("skipping site %s (row %d): %s", iset.key(i), i, e)
    return {"Metadata_ImageKey": iset.key(i), "row": i, "file": str(path),
            "reason": f"{type(e).__name__}: {e}", "stage": stage}  # fmt: skip


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
        nuclei = labels_from_mask(read_image(nuc_path))
        if nuclei.shape != img.shape[1:]:
            raise ImageSetError(f"mask {nuc_path} is {nuclei.shape}, the images {img.shape[1:]}")
        if cfg.cell_masks:
            cells = labels_from_mask(
                read_image(Path(cfg.mask_dir) / cfg.cell_masks.format(**fields))
            )
            cells = match_cells(nuclei, cells)
        else:
            cells = expand_nuclei(nuclei, cfg.cell_expand)
    else:
        dna = img[chans.index(cfg.nuclei_channel)]
        nuclei = segment_nuclei(
            dna,
            smooth_sigma=cfg.smooth_sigma,
            min_area=cfg.nuclei_min_area,
            max_area=cfg.nuclei_max_area,
            min_distance=cfg.nuclei_min_distance,
            exclude_border=cfg.exclude_border,
        )
        if cfg.cell_channel:
            cells = segment_cells(
                img[chans.index(cfg.cell_channel)], nuclei, smooth_sigma=cfg.smooth_sigma
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


def _site_job(i: int) -> dict:
    """Everything for one site; returns crops, index rows, features and stats, or an error."""
    cfg, iset = _CTX["cfg"], _CTX["iset"]
    key = iset.key(i)
    try:
        img = iset.read(i)
        plate = str(iset.table.at[i, "Metadata_Plate"])
        img = apply_illumination(img, _CTX["illum"].get(plate))
        nuclei, cells, centres = _segment(i, img)
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
        row = {**meta, "Metadata_CellID": f"{key}/{cid}", "Metadata_ObjectNumber": cid,
               "Metadata_Cell_Center_X": float(cx), "Metadata_Cell_Center_Y": float(cy)}  # fmt: skip
        if cells is not None:
            b = boxes[cid - 1] if cid - 1 < len(boxes) and boxes[cid - 1] is not None else None
            row.update({
                "Metadata_BBox_Y0": b[0].start if b else -1, "Metadata_BBox_X0": b[1].start if b else -1,
                "Metadata_BBox_Y1": b[0].stop if b else -1, "Metadata_BBox_X1": b[1].stop if b else -1,
                "Metadata_Nuclei_Area": int(n_area[cid]), "Metadata_Cells_Area": int(c_area[cid]),
            })  # fmt: skip
        row.update({f"Metadata_{k2}": v for k2, v in qc_row.items()})
        rows.append(row)
    feats = None
    if cfg.features and cells is not None and rows:  # no kept cell: no feature rows
        f = cell_features(img, nuclei, cells, iset.channels, cell_ids=ids[kept])
        feats = pd.concat([pd.DataFrame(rows)[list(meta) + ["Metadata_CellID"]], f], axis=1)
    return {"i": i, "key": key, "crops": crops, "rows": rows, "features": feats, "info": info,
            "n_found": len(centres)}  # fmt: skip


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
            raise PrepareError(
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
        raise PrepareError(
            f"{cfg.locations}: no Metadata_Plate/Well/Site columns to match sites on"
        )
    img_keys = {}
    for i in range(len(iset)):
        k = tuple(str(iset.table.at[i, f"Metadata_{n}"]).lstrip("0") for n, _ in used)
        img_keys[k] = iset.key(i)
    keys = [
        img_keys.get(tuple(str(r[c]).lstrip("0") for _, c in used), "") for _, r in table.iterrows()
    ]
    table = table.assign(_key=keys)
    if not (table["_key"] != "").any():
        raise PrepareError(f"{cfg.locations}: no row matches a site on {[c for _, c in used]}")
    return table


def prepare(cfg, *, after_site: Callable[[int, str], None] | None = None) -> Path:
    """Run the prepare pipeline described by a PrepareConfig; returns the prep folder.

    `after_site(n_done, key)` is called after each site is committed (progress hooks, tests).
    """
    out = Path(cfg.out_dir)
    iset = ImageSet.from_config(cfg)
    chans = iset.channels
    _check(cfg, chans)
    out.mkdir(parents=True, exist_ok=True)
    dna_name = cfg.nuclei_channel if cfg.nuclei_channel in chans else chans[0]
    dna_index = chans.index(dna_name)
    settings = _settings(cfg)
    fp = fingerprint({"settings": settings, "sites": list(iset.table["Metadata_ImageKey"]),
                      "channels": chans})  # fmt: skip
    logger.info("prepare: %d sites, channels %s → %s", len(iset), chans, out)

    state_path = out / "prepare.json"
    state = read_json(state_path) if state_path.exists() else {}
    if state.get("fingerprint") == fp and (out / "qc.parquet").exists():
        logger.info("pass 1 (QC, illumination) already done: reusing %s", out / "qc.parquet")
        qc = pd.read_parquet(out / "qc.parquet")
        functions = (
            load_functions(out / "illum", state["illumination"]) if state["illumination"] else {}
        )
        plate_stats = state["normalization"].get("plate", {})
        skipped1 = state.get("skipped_read", [])
    else:
        qc, functions, plate_stats, skipped1 = _pass1(iset, cfg, dna_index)
        write_parquet(qc, out / "qc.parquet")
        names = save_functions(functions, out / "illum") if functions else {}
        state = {
            "fingerprint": fp,
            "channels": chans,
            "illumination": names,
            "normalization": {
                "method": cfg.normalization,
                "percentiles": list(cfg.norm_percentiles),
                "divisor": cfg.norm_divisor,
                "plate": plate_stats,
            },  # fmt: skip
            "skipped_read": skipped1,
            "settings": settings,
        }
        write_json(state_path, state)
    logger.info(qcmod.summary(qc))

    # images.parquet: the image set with QC, for the field dataset and reports
    images = iset.table.merge(qc, on="Metadata_ImageKey", how="left")
    skipped_keys = {s["Metadata_ImageKey"] for s in skipped1}
    images["Skipped"] = images["Metadata_ImageKey"].isin(skipped_keys)
    images["QC_Pass"] = images["QC_Pass"].astype("boolean").fillna(False).astype(bool)
    write_parquet(images, out / "images.parquet")

    qc_cols = ["QC_Flags", "QC_Pass"]
    qc_lookup = {r["Metadata_ImageKey"]: {c: r[c] for c in qc_cols} for _, r in qc.iterrows()}
    todo_all = [i for i in range(len(iset)) if iset.key(i) not in skipped_keys]
    if cfg.qc_exclude:
        todo_all = [i for i in todo_all if qc_lookup.get(iset.key(i), {}).get("QC_Pass", False)]

    dtype = np.result_type(*[iset.read(todo_all[0]).dtype]) if todo_all else np.uint16
    store = CropStore(
        out,
        channels=chans,
        crop_size=cfg.crop_size,
        dtype=dtype,
        attrs={"source": str(cfg.load_data or cfg.image_dir)},
        settings_fingerprint=fp,
    )
    todo = [i for i in todo_all if not store.has(iset.key(i))]
    if len(todo) < len(todo_all):
        logger.info(
            "resuming: %d of %d sites already in the store",
            len(todo_all) - len(todo),
            len(todo_all),
        )
    ctx = {"cfg": cfg, "iset": iset, "illum": functions, "qc": qc_lookup}
    if cfg.segmentation == "locations":
        ctx["locations"] = _locations_table(cfg, iset)
    if cfg.features and cfg.segmentation == "locations":
        logger.warning("engineered features need masks: none computed with segmentation=locations")
    feat_dir = out / "features_parts"
    feat_dir.mkdir(exist_ok=True)
    skipped2 = []
    done = len(todo_all) - len(todo)
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
        if res["features"] is not None:
            write_parquet(res["features"], feat_dir / f"{len(store.ledger['sites']):08d}.parquet")
        index = pd.DataFrame(res["rows"])
        store.append(key, res["crops"], index, info=res["info"])
        done += 1
        if after_site is not None:
            after_site(done, key)

    norm = dict(state["normalization"])
    if cfg.normalization == "percentile_image":
        norm["image"] = {s["key"]: s["info"] for s in store.ledger["sites"]}
    cells = store.finalize({"normalization": norm, "settings_fingerprint": fp})
    skipped = pd.DataFrame(
        skipped1 + skipped2, columns=["Metadata_ImageKey", "row", "file", "reason", "stage"]
    )
    write_parquet(skipped, out / "skipped.parquet")
    if len(skipped):
        logger.warning("%d sites skipped (see %s)", len(skipped), out / "skipped.parquet")
    if cfg.features and cfg.segmentation != "locations":
        parts = [
            pd.read_parquet(feat_dir / s["part"])
            for s in store.ledger["sites"]
            if s["count"] and (feat_dir / s["part"]).exists()
        ]
        eng = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if len(eng) != len(cells):
            raise RuntimeError(f"engineered features: {len(eng)} rows for {len(cells)} cells")
        write_parquet(eng, out / "engineered.parquet")
    logger.info("prepared %d cells from %d sites → %s", len(cells), len(store.ledger["sites"]), out)
    return out
