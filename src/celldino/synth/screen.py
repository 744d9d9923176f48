"""The synthetic screen: plate map, fields of view as TIFFs, load-data table and ground truth.

`make_screen(out_dir, SynthConfig)` writes:

    out_dir/
      load_data.csv          one row per site (CellProfiler convention: FileName_<CH>, PathName_<CH>, Metadata_*)
      platemap.csv           plate × well → compound, dose, MoA, batch, control flag
      images/<plate>/<plate>_<well>_s<site>_<channel>.tif   uint16, one file per channel
      masks/<plate>/<plate>_<well>_s<site>_{nuclei,cells}.tif  true label masks (uint16)
      truth_cells.parquet    one row per cell: centroid, phenotype factors, cell cycle, localisation
      truth_images.parquet   one row per site: QC truth and the technical variation applied
      screen.json            the resolved settings and a summary
      .celldino-synth.json   the marker: this folder is synth's (config, complete true/false)

The folder must be empty or one an earlier synth made (its marker): a folder holding anything
else (a user's own load_data.csv) is refused before anything is written. An earlier screen there
is cleared before the new one is drawn, and the folder is locked meanwhile (`celldino.io.lock`),
so two synth runs never mix their images.

Everything is drawn from `np.random.default_rng([seed, ...])` streams keyed by plate, well and
site, so a seed always gives the same bytes, independently of the order sites are drawn in.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from celldino import log
from celldino.config import RANGES, ConfigError, SynthConfig
from celldino.errors import OutputError
from celldino.io.files import read_json, require_writable, write_json
from celldino.io.images import write_tiff
from celldino.io.lock import output_lock
from celldino.io.tables import write_csv, write_parquet
from celldino.names import safe_component
from celldino.synth import artefacts
from celldino.synth.biology import (
    CONTROL_COMPOUND,
    FACTORS,
    make_treatments,
    sample_cell_factors,
    treatment_factors,
)
from celldino.synth.render import LOCALISATIONS, CellSpec, camera, channel_kind, render_site

logger = log.get_logger(__name__)


@dataclass(frozen=True)
class Layout:
    """Sizes of a screen after the preset is applied."""

    n_plates: int
    n_batches: int
    n_moas: int
    compounds_per_moa: int
    doses: tuple[float, ...]
    wells_per_compound: int
    control_wells: int
    sites_per_well: int
    image_size: int
    cells_per_site: int
    n_bad_images: int


PRESETS: dict[str, Layout] = {
    # 32 sites, ~300 cells: seconds; enough for every stage's tests.
    "tiny": Layout(2, 2, 3, 2, (1.0, 10.0), 1, 4, 1, 128, 10, 2),
    # 128 sites, ~3,800 cells: the demo (seconds to draw).
    "demo": Layout(4, 2, 4, 2, (0.3, 3.0, 30.0), 1, 8, 1, 256, 30, 4),
}


def resolve_layout(cfg: SynthConfig) -> Layout:
    """The preset's layout with every non-zero (non-negative for bad images) field overriding it."""
    base_name = cfg.preset if cfg.preset != "custom" else "tiny"
    if base_name not in PRESETS:
        raise ValueError(
            f"unknown synth.preset '{cfg.preset}' (choose from {', '.join(PRESETS)}, custom)"
        )
    base = PRESETS[base_name]
    changes = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(Layout)
        if hasattr(cfg, f.name)
        # "take the preset": -1 for n_bad_images (0 is a real choice there), 0 for the sizes
        and getattr(cfg, f.name) != (-1 if f.name == "n_bad_images" else 0)
    }
    if cfg.n_doses:
        changes["doses"] = (
            tuple(float(x) for x in np.geomspace(0.3, 30.0, cfg.n_doses))
            if cfg.n_doses > 1
            else (10.0,)
        )
    layout = dataclasses.replace(base, **changes)
    if layout.n_batches > layout.n_plates:
        raise ValueError(
            f"synth.n_batches ({layout.n_batches}) cannot exceed the plates ({layout.n_plates})"
        )
    return layout


def well_names(n: int) -> list[str]:
    """Row-major well names of a 384-well plate (A01 … P24), or 1536 if more are needed."""
    cols = 24 if n <= 384 else 48
    rows = string.ascii_uppercase + "".join(f"A{c}" for c in string.ascii_uppercase)
    return [f"{rows[i // cols]}{i % cols + 1:02d}" for i in range(n)]


def plate_map(cfg: SynthConfig, layout: Layout) -> pd.DataFrame:
    """Plates × wells with treatment, batch and control flag; a shuffled layout per plate."""
    rng = np.random.default_rng([cfg.seed, 7])
    treatments = make_treatments(layout.n_moas, layout.compounds_per_moa, layout.doses, rng)
    rows = []
    for p in range(layout.n_plates):
        plate = f"P{p + 1:02d}"
        batch = f"B{p * layout.n_batches // layout.n_plates + 1}"
        slots = [treatments[0]] * layout.control_wells
        for t in treatments[1:]:
            slots += [t] * layout.wells_per_compound
        order = np.random.default_rng([cfg.seed, 11, p]).permutation(len(slots))
        for well, k in zip(well_names(len(slots)), order):
            t = slots[k]
            rows.append(
                {
                    "Metadata_Plate": plate,
                    "Metadata_Well": well,
                    "Metadata_Batch": batch,
                    "Metadata_Compound": t.compound,
                    "Metadata_Dose": t.dose,
                    "Metadata_MoA": t.moa,
                    "Metadata_pert_type": "control" if t.compound == CONTROL_COMPOUND else "trt",
                    "_treatment": t,
                }
            )
    return pd.DataFrame(rows)


def _place_cells(n: int, size: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Cell centres with a soft minimum distance: neighbours touch and sometimes overlap."""
    pts: list[tuple[float, float]] = []
    min_d = 1.45 * 15.0
    margin = 4
    for _ in range(n * 30):
        if len(pts) == n:
            break
        x, y = rng.uniform(margin, size - margin, 2)
        d_min = min_d * rng.uniform(0.8, 1.05)
        if all((x - a) ** 2 + (y - b) ** 2 >= d_min**2 for a, b in pts):
            pts.append((float(x), float(y)))
    return pts


def _site_rngs(seed: int, p: int, w: int, s: int) -> np.random.Generator:
    return np.random.default_rng([seed, 101, p, w, s])


def make_screen(
    out_dir: str | Path, cfg: SynthConfig | None = None, *, setting: str = "OUT_DIR"
) -> Path:
    """Write the synthetic screen into out_dir and return out_dir. `setting`: what chose the
    folder, named when it cannot be written (the `celldino synth OUT_DIR` argument; run.out_dir
    for the demo's screen)."""
    cfg = cfg or SynthConfig()
    problem = RANGES["synth.image_size"].problem(cfg.image_size)  # before anything is allocated
    if problem:
        raise ConfigError(f"synth.image_size: {problem}")
    unknown = [k for k in cfg.artefacts if k not in artefacts.ARTEFACTS]
    if unknown:  # a config file is checked on loading; a SynthConfig built in Python is not
        raise ConfigError(
            f"synth.artefacts: {unknown[0]!r} is not an artefact type; choose from "
            + ", ".join(artefacts.ARTEFACTS)
        )
    problem = RANGES["synth.artefact_rate"].problem(cfg.artefact_rate)
    if problem:
        raise ConfigError(f"synth.artefact_rate: {problem}")
    layout = resolve_layout(cfg)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"{out} is a file, not a folder: give `celldino synth` a folder to write the screen "
            "into (it is created if missing)"
        )
    channels = list(cfg.channels) + (["Protein"] if cfg.protein_channel else [])
    for ch in channels:  # each becomes part of a file name: checked before anything is written
        safe_component(ch, "synth.channels")
    if len(set(channels)) != len(channels):
        raise ConfigError(f"synth.channels has duplicates: {channels}")
    if len({c.casefold() for c in channels}) != len(channels):  # ER.tif, er.tif: one file on
        raise ConfigError(  # macOS and Windows disks
            f"synth.channels {channels} has names that differ only in case; their image files "
            "would be one file on a case-insensitive disk (macOS, Windows): rename one"
        )
    if cfg.artefacts:  # too many artefacts for the sites: refused before anything is written
        _planted_sites(cfg, layout, len(plate_map(cfg, layout)) * layout.sites_per_well)
    check_output_folder(out)
    require_writable(out, setting)
    with output_lock(out, "synth"):  # one writer: two seeds never mix in one screen
        check_output_folder(out)  # again, now that no other synth can write meanwhile
        _clear_own_outputs(out)
        write_json(out / MARKER, {"config": dataclasses.asdict(cfg), "complete": False})
        _draw(out, cfg, layout, channels)
        write_json(out / MARKER, {"config": dataclasses.asdict(cfg), "complete": True})
    return out


# A folder synth writes into is empty or one an earlier synth made: recognised by this file (or,
# for screens drawn before it existed, by a screen.json holding synth's config and layout).
MARKER = ".celldino-synth.json"
# What synth writes (cleared before a new screen is drawn into a folder of its own: a screen of
# other settings would leave images of the old one beside the new)
_OWN_FILES = (
    "load_data.csv",
    "platemap.csv",
    "truth_cells.parquet",
    "truth_images.parquet",
    "screen.json",
)
_OWN_DIRS = ("images", "masks")


def _is_ours(out: Path) -> bool:
    if (out / MARKER).is_file():
        return True
    try:
        drawn = read_json(out / "screen.json")
    except (OSError, ValueError):
        return False
    return isinstance(drawn, dict) and {"config", "layout", "n_sites"} <= set(drawn)


def check_output_folder(out: Path) -> None:
    """Refuse (OutputError) a folder that holds files synth did not make: synth would overwrite
    or mix with them (a user's own load_data.csv, images of another screen)."""
    if not out.is_dir() or _is_ours(out):
        return
    # hidden files (.DS_Store, the lock) are not at risk: synth writes none but its marker
    found = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if found:
        raise OutputError(
            f"synth: {out} is not empty (it holds {found[0]}"
            + (f" and {len(found) - 1} more" if len(found) > 1 else "")
            + ") and was not made by `celldino synth`; its files would be overwritten or mixed "
            "with the new screen's. Give an empty or new folder (nothing was written)"
        )


def _clear_own_outputs(out: Path) -> None:
    for name in _OWN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in _OWN_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _planted_sites(
    cfg: SynthConfig, layout: Layout, n_sites: int
) -> tuple[dict[int, str], dict[int, str]]:
    """({site index: 'blur' | 'debris'} drawn by the camera (n_bad_images), {site index:
    artefact type} planted after it (synth.artefacts, in sites free of the first))."""
    bad_rng = np.random.default_rng([cfg.seed, 31])
    bad_idx = bad_rng.choice(n_sites, size=min(layout.n_bad_images, n_sites), replace=False)
    bad_kind = {int(i): ("blur" if j % 2 == 0 else "debris") for j, i in enumerate(sorted(bad_idx))}
    # own streams: every site without an artefact keeps its bytes
    try:
        art_kind = artefacts.pick_sites(
            n_sites, tuple(cfg.artefacts), cfg.artefact_rate, cfg.seed, set(bad_kind)
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return bad_kind, art_kind


def _draw(out: Path, cfg: SynthConfig, layout: Layout, channels: list[str]) -> None:
    kinds = [channel_kind(c, i) for i, c in enumerate(channels)]
    pm = plate_map(cfg, layout)
    plates = list(dict.fromkeys(pm["Metadata_Plate"]))
    for name in [*plates, *pm["Metadata_Well"]]:  # folder and file names below
        safe_component(name, "synth plate and well names")

    # Technical variation drawn per plate (scale, vignetting), batch and well (offsets).
    tech_rng = np.random.default_rng([cfg.seed, 23])
    batch_scale = {
        b: np.exp(tech_rng.normal(0, 0.12, len(channels)))
        for b in sorted(set(pm["Metadata_Batch"]))
    }
    plate_tech = {}
    for p in plates:
        batch = pm.loc[pm["Metadata_Plate"] == p, "Metadata_Batch"].iloc[0]
        plate_tech[p] = {
            "scale": batch_scale[batch] * np.exp(tech_rng.normal(0, 0.1, len(channels))),
            "vignette": float(tech_rng.uniform(0.15, 0.35)),
            "centre": tuple(
                float(v) for v in layout.image_size * (0.5 + tech_rng.normal(0, 0.05, 2))
            ),
        }
    bad_kind, art_kind = _planted_sites(cfg, layout, len(pm) * layout.sites_per_well)

    load_rows, cell_rows, image_rows = [], [], []
    sites = [(wi, s) for wi in range(len(pm)) for s in range(layout.sites_per_well)]
    for site_idx, (wi, s) in enumerate(log.progress(sites, desc="synth: drawing sites")):
        row = pm.iloc[wi]
        plate, well = row["Metadata_Plate"], row["Metadata_Well"]
        p_idx = plates.index(plate)
        rng = _site_rngs(cfg.seed, p_idx, wi, s)
        t = row["_treatment"]
        mean_f = treatment_factors(t)
        centres = _place_cells(
            max(1, int(rng.poisson(layout.cells_per_site))), layout.image_size, rng
        )
        cells = []
        for cx, cy in centres:
            f = sample_cell_factors(mean_f, rng)
            mitotic = bool(rng.random() < mean_f["mitotic_fraction"])
            loc = (
                LOCALISATIONS[int(rng.integers(len(LOCALISATIONS)))] if cfg.protein_channel else ""
            )
            cells.append(CellSpec(cx, cy, f, mitotic, loc))
        signal, nuc_lab, cell_lab, info = render_site(layout.image_size, cells, kinds, rng)

        legacy = bad_kind.get(site_idx, "ok")  # drawn by the camera
        qc = art_kind.get(site_idx, legacy)
        tech = plate_tech[plate]
        offset = rng.uniform(0, 30, len(channels)).astype(np.float32)  # per-well background offset
        debris = None
        if legacy == "debris":
            debris = (*rng.uniform(0.3, 0.7, 2) * layout.image_size, layout.image_size * 0.12)
        img = camera(
            signal,
            channel_scale=tech["scale"].astype(np.float32),
            offset=offset,
            vignette=tech["vignette"],
            vignette_centre=tech["centre"],
            defocus=4.0 if legacy == "blur" else 0.0,
            debris=debris,
            rng=rng,
        )
        planted: dict = {}
        if site_idx in art_kind:
            art_rng = np.random.default_rng([cfg.seed, 41, p_idx, wi, s])
            img, planted = artefacts.plant(qc, img, art_rng, nucleus_px=artefacts.SYNTH_NUCLEUS_PX)
            if qc == "empty":  # no cells left: none in the truth, none in the masks
                cells, info = [], []
                nuc_lab, cell_lab = np.zeros_like(nuc_lab), np.zeros_like(cell_lab)
        stem = f"{plate}_{well}_s{s + 1}"
        img_dir, mask_dir = out / "images" / plate, out / "masks" / plate
        load = {}
        for c, ch in enumerate(channels):
            write_tiff(img_dir / f"{stem}_{ch}.tif", img[c])
            load[f"FileName_{ch}"] = f"{stem}_{ch}.tif"
            load[f"PathName_{ch}"] = str((img_dir).resolve())
        write_tiff(mask_dir / f"{stem}_nuclei.tif", nuc_lab.astype(np.uint16))
        write_tiff(mask_dir / f"{stem}_cells.tif", cell_lab.astype(np.uint16))
        meta = {k: row[k] for k in pm.columns if k.startswith("Metadata_")}
        meta["Metadata_Site"] = s + 1
        load_rows.append({**load, **meta, "Metadata_QC_Truth": qc})
        image_rows.append(
            {
                **meta,
                "qc": qc,
                "n_cells": len(cells),
                "vignette": tech["vignette"],
                "vignette_x": tech["centre"][0],  # the vignetting's centre (pixels)
                "vignette_y": tech["centre"][1],
                **{f"scale_{ch}": float(tech["scale"][c]) for c, ch in enumerate(channels)},
                **{f"offset_{ch}": float(offset[c]) for c, ch in enumerate(channels)},
                "mask_nuclei": str((mask_dir / f"{stem}_nuclei.tif").resolve()),
                "mask_cells": str((mask_dir / f"{stem}_cells.tif").resolve()),
                # what was planted (only in screens asked for artefacts: default tables unchanged)
                **({"artefact_params": json.dumps(planted, sort_keys=True)} if art_kind else {}),
            }
        )
        for i, (cell, m) in enumerate(zip(cells, info)):
            cell_rows.append(
                {
                    **meta,
                    "cell_index": i + 1,
                    "center_x": m["nucleus_x"],
                    "center_y": m["nucleus_y"],
                    "cell_center_x": cell.cx,
                    "cell_center_y": cell.cy,
                    "nucleus_area": m["nucleus_area"],
                    "cell_area": m["cell_area"],
                    "cell_cycle": "mitotic" if cell.mitotic else "interphase",
                    "localisation": cell.localisation,
                    "qc": qc,
                    **{f"factor_{k}": cell.factors[k] for k in FACTORS if k != "mitotic_fraction"},
                }
            )

    load_df = pd.DataFrame(load_rows)
    write_csv(load_df, out / "load_data.csv")
    write_csv(pm.drop(columns="_treatment"), out / "platemap.csv")
    write_parquet(pd.DataFrame(cell_rows), out / "truth_cells.parquet")
    write_parquet(pd.DataFrame(image_rows), out / "truth_images.parquet")
    write_json(
        out / "screen.json",
        {
            "config": dataclasses.asdict(cfg),
            "layout": dataclasses.asdict(layout),
            "channels": channels,
            "n_sites": len(load_df),
            "n_cells": len(cell_rows),
            "n_bad_images": len(bad_kind),
            **(
                {"n_artefacts": {k: list(art_kind.values()).count(k) for k in cfg.artefacts}}
                if art_kind
                else {}
            ),
        },
    )
    logger.info(
        "synthetic screen: %d plates, %d sites, %d cells, %d channels → %s",
        len(plates),
        len(load_df),
        len(cell_rows),
        len(channels),
        out,
    )
