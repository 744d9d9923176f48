"""Image sets: the sites of a screen with an explicit channel order, read one at a time.

`ImageSet.from_config(cfg)` takes a load-data table or a folder + pattern. `read(i)` returns the
site's stack (C, H, W) in `channels` order and source dtype; a channel of another shape than the
first raises `ImageSetError` naming the files.

The table is checked when the set is made: an empty Metadata_Plate/Well/Site cell, two rows with
the same plate/well/site, two rows (or two channels of one row) pointing at the same image file
each raise `ImageSetError` naming the rows (line numbers of a CSV table, header = line 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from celldino.errors import DataError
from celldino.io.images import ImageReadError, read_image
from celldino.io.tables import (
    LoadDataError,
    is_text_table,
    load_data_from_folder,
    read_load_data,
    read_table,
    row_label,
)

KEY_COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
# Columns `celldino prepare` writes itself (the site key here; each cell's id, object number,
# centre, box, areas and its site's QC in cells.parquet; the QC table merged into images.parquet):
# a user's column of the same name would be silently replaced, so a load-data table holding
# one is refused (`check_reserved`).
RESERVED_COLUMNS = (
    "Metadata_ImageKey",
    "Metadata_CellID",
    "Metadata_ObjectNumber",
    "Metadata_Cell_Center_X",
    "Metadata_Cell_Center_Y",
    "Metadata_BBox_Y0",
    "Metadata_BBox_X0",
    "Metadata_BBox_Y1",
    "Metadata_BBox_X1",
    "Metadata_Nuclei_Area",
    "Metadata_Cells_Area",
    "Metadata_QC_Flags",
    "Metadata_QC_Pass",
    "Skipped",
)
RESERVED_PREFIXES = ("QC_",)  # the QC metrics and flags (QC_Blur, QC_Flag_blur, QC_Pass, ...)


def check_reserved(columns, source: str) -> None:
    """Refuse a user table holding a column celldino writes itself, naming it (renaming it
    quietly would break the user's own references to it; replacing it would lose it)."""
    clash = [c for c in columns if c in RESERVED_COLUMNS or str(c).startswith(RESERVED_PREFIXES)]
    if clash:
        raise ImageSetError(
            f"{source}: column {clash[0]} is one celldino prepare writes itself"
            + (f" (also {', '.join(map(str, clash[1:4]))})" if len(clash) > 1 else "")
            + "; it would be replaced silently. Rename it in the table (e.g. Metadata_User_"
            + str(clash[0]).removeprefix("Metadata_")
            + ")"
        )


def _file_identity(path: str, frame: str) -> tuple | str:
    """The file itself (device, inode: a symlink or hard link is the file it points at) and the
    plane, or the path text when the file cannot be reached (reading it reports that)."""
    try:
        st = os.stat(path)
    except OSError:
        return path + "#" + frame
    return (st.st_dev, st.st_ino, frame)


class ImageSetError(DataError):
    """A site whose channels cannot be stacked, or a table whose rows do not name distinct sites."""


class PlateMapError(LoadDataError):
    """A plate map (`prepare.platemap`) that cannot be joined to the images: no well column,
    a well named twice, a column the images already have, or an imaged well it does not name."""


def well_key(well) -> str:
    """A well name for matching: the row letters upper-cased and the column number without its
    leading zeros ('a1', 'A1', 'A01', 'A001' → 'A1'); a name of another form is kept as it is."""
    import re

    text = str(well).strip()
    m = re.fullmatch(r"([A-Za-z]{1,2})0*(\d{1,3})", text)
    return f"{m.group(1).upper()}{int(m.group(2))}" if m else text


def _few(values, n: int = 5) -> str:
    values = list(dict.fromkeys(map(str, values)))
    return ", ".join(values[:n]) + (f" (and {len(values) - n} more)" if len(values) > n else "")


def join_platemap(table: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """The image table with a plate map's columns joined on well (and plate when the map has
    a `Metadata_Plate` column; without one, the map is every plate's), as pycytominer's
    `annotate` and CellProfiler's Metadata module join a platemap.

    As in pycytominer, a column without the `Metadata_` prefix gets it (`broad_sample` →
    `Metadata_broad_sample`) and the well is `Metadata_Well` or pycytominer's `well_position`.
    Wells match whatever their zero padding or case ('A1' = 'A01' = 'a01'); the image table
    keeps its own well names. Refused (`PlateMapError`, naming lines and wells): a map without
    a well column, two columns that are one once prefixed, an empty key cell, a (plate, well)
    named twice, a column the image table already has, and an imaged (plate, well) the map
    does not name (its treatment would be missing). Wells of the map with no image are logged.
    """
    from celldino import log

    path = Path(path)
    pm = read_table(path, text=True)  # every column is metadata: text as written
    where = f"prepare.platemap {path}"
    named = [c if str(c).startswith("Metadata_") else f"Metadata_{c}" for c in pm.columns]
    twice = [n for n in dict.fromkeys(named) if named.count(n) > 1]
    if twice:
        raise PlateMapError(
            f"{where}: columns {_few(c for c, n in zip(pm.columns, named) if n in twice)} are "
            f"one column ({twice[0]}) once given the Metadata_ prefix; keep one of them"
        )
    pm = pm.set_axis(named, axis=1)
    if "Metadata_Well" not in pm.columns and "Metadata_well_position" in pm.columns:
        pm = pm.rename(columns={"Metadata_well_position": "Metadata_Well"})  # pycytominer's
    if "Metadata_Well" not in pm.columns:
        raise PlateMapError(
            f"{where} has no well column (its columns: {_few(pm.columns, 10)}): name it "
            "Metadata_Well (or well_position, as pycytominer's platemaps do), and the plate "
            "column, if any, Metadata_Plate"
        )
    keys = (
        ["Metadata_Plate", "Metadata_Well"] if "Metadata_Plate" in pm.columns else ["Metadata_Well"]
    )
    clash = [c for c in pm.columns if c not in keys and c in table.columns]
    if clash:
        raise PlateMapError(
            f"{where}: column(s) {_few(clash)} are in the image table too; keep each in one "
            "place (remove it from the plate map or from the load-data table)"
        )
    for k in keys:
        empty = pm[k].isna() | (pm[k].astype(str).str.strip() == "")
        if empty.any():
            i = int(np.flatnonzero(empty.to_numpy())[0])
            raise PlateMapError(f"{where}: {k} is empty on {row_label(path, i)}; fill it")
    pm_key = _platemap_keys(pm, keys)
    dup = pm_key.duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())
        first = pm_key.iloc[rows[0]]
        same = [row_label(path, int(i)).split(" of ")[0] for i in rows if pm_key.iloc[i] == first]
        raise PlateMapError(
            f"{where}: {' / '.join(k.removeprefix('Metadata_') for k in keys)} {first!r} is "
            f"named on {len(same)} lines ({', '.join(same)}); keep one row per well"
            + (f" ({int(dup.sum())} rows in all share a well)" if dup.sum() > len(same) else "")
        )
    if "Metadata_Plate" in keys and "Metadata_Plate" not in table.columns:
        raise PlateMapError(
            f"{where} has a Metadata_Plate column but the images have none: leave it out of "
            "the map, or give the images a plate (a load-data column or prepare.plate)"
        )
    img_key = _platemap_keys(table, keys)
    missing = ~img_key.isin(set(pm_key))
    if missing.any():
        raise PlateMapError(
            f"{where} does not name {int(missing.sum())} of the {len(table)} imaged sites' "
            f"wells: {_few(img_key[missing])}; add a row for each (an untreated well too, e.g. "
            "Metadata_pert_type=empty), or remove those images"
        )
    unused = ~pm_key.isin(set(img_key))
    if unused.any():
        log.get_logger(__name__).info(
            "%s: %d of its %d wells have no image (%s)",
            where,
            int(unused.sum()),
            len(pm),
            _few(pm_key[unused]),
        )
    meta = pm.drop(columns=keys).set_axis(pm_key.to_numpy(), axis=0)
    joined = meta.loc[img_key.to_numpy()].reset_index(drop=True)
    out = table.reset_index(drop=True)
    return pd.concat([out, joined.set_axis(out.index, axis=0)], axis=1)


def _platemap_keys(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    """One matching key per row: 'plate / well' (well through `well_key`) or the well alone."""
    well = df["Metadata_Well"].map(well_key)
    if keys == ["Metadata_Well"]:
        return well.reset_index(drop=True)
    return (df["Metadata_Plate"].astype(str) + " / " + well).reset_index(drop=True)


def site_key(row: pd.Series) -> str:
    """Stable key of a site: plate/well/site if present, else the first channel's file name."""
    parts = [str(row[c]) for c in KEY_COLUMNS if c in row.index and pd.notna(row[c])]
    return "/".join(parts) if parts else str(row.get("_first_file", row.name))


@dataclass
class ImageSet:
    table: pd.DataFrame  # one row per site: Metadata_*, FileName_<CH>, PathName_<CH>
    channels: list[str]  # explicit channel order
    source: str = ""  # the load-data table (or image folder) the rows come from, for messages

    def __post_init__(self) -> None:
        self.table = self.table.reset_index(drop=True)
        if "Metadata_Plate" not in self.table:
            self.table["Metadata_Plate"] = "plate"
        self._check_rows()
        first = self.channels[0]
        self.table["_first_file"] = self.table[f"FileName_{first}"].astype(str)
        present = [c for c in KEY_COLUMNS if c in self.table]
        if present and not self.table[present].isna().any().any():  # site_key, vectorised
            col = self.table[present[0]].astype(str)
            for c in present[1:]:
                col = col + "/" + self.table[c].astype(str)
            keys = col.tolist()
        else:
            keys = [site_key(r) for _, r in self.table.iterrows()]
        if len(set(keys)) != len(keys):
            keys = [f"{k}#{i}" for i, k in enumerate(keys)]
        self.table["Metadata_ImageKey"] = keys
        self.table = self.table.drop(columns="_first_file")

    def where(self, i: int) -> str:
        """Where row i is: 'line 5 of ld.csv' (text table), 'data row 4 of ld.parquet', or
        'load-data row i' (0-based) for a table built in memory."""
        if self.source and Path(self.source).is_file():
            return row_label(self.source, i)
        return f"load-data row {i}"

    def _rows(self, idx: list[int]) -> str:
        """'lines 3, 9 of ld.csv' for several rows (at most four shown)."""
        shown = idx[:4]
        if self.source and Path(self.source).is_file():
            text_table = is_text_table(self.source)
            nums = ", ".join(str(i + 2 if text_table else i + 1) for i in shown)
            text = f"{'lines' if text_table else 'data rows'} {nums} of {self.source}"
        else:
            text = f"load-data rows {', '.join(map(str, shown))}"
        return text + (f" (and {len(idx) - 4} more)" if len(idx) > 4 else "")

    def _check_rows(self) -> None:
        """Refuse tables whose rows would silently duplicate or merge sites."""
        t = self.table
        present = [c for c in KEY_COLUMNS if c in t]
        for c in present:
            empty = t.index[t[c].isna() | (t[c].astype(str).str.strip() == "")].tolist()
            if empty:
                raise ImageSetError(
                    f"{self.where(empty[0])}: column {c} is empty"
                    + (f" ({len(empty)} rows)" if len(empty) > 1 else "")
                    + "; every site needs its plate, well and site"
                )
        if len(present) == len(KEY_COLUMNS) and len(t):
            key = t[KEY_COLUMNS[0]].astype(str)
            for c in KEY_COLUMNS[1:]:
                key = key + "/" + t[c].astype(str)
            dup = key[key.duplicated(keep=False)]
            if len(dup):
                first = dup.iloc[0]
                rows = dup.index[dup == first].tolist()
                raise ImageSetError(
                    f"{self._rows(rows)} describe the same site {first} "
                    f"({'/'.join(KEY_COLUMNS)}); {dup.nunique()} site(s) are listed more than "
                    "once. Remove the duplicate rows (or give each field of view its own "
                    "Metadata_Site)"
                )
        cols, shown = [], []
        for c in self.channels:
            path = t[f"PathName_{c}"].astype(str) + "/" + t[f"FileName_{c}"].astype(str)
            frame = t[f"Frame_{c}"].astype(str) if f"Frame_{c}" in t else pd.Series("", t.index)
            shown.append(path + frame.map(lambda f: f"#{f}" if f else ""))
            # the same file reached two ways (a symlink, a hard link, ../) is one file
            cols.append(
                pd.Series([str(_file_identity(p, f)) for p, f in zip(path, frame)], index=t.index)
            )
        if not cols or not len(t):
            return
        files = cols[0]
        for col in cols[1:]:
            files = files + "|" + col
        dup = files[files.duplicated(keep=False)]
        if len(dup):
            rows = dup.index[dup == dup.iloc[0]].tolist()
            raise ImageSetError(
                f"{self._rows(rows)} name the same image files "
                f"({', '.join(str(t.at[r, f'FileName_{self.channels[0]}']) for r in rows[:2])}, "
                "...): their cells would be counted twice. Remove the duplicate row or fix its "
                "file names"
            )
        for a in range(len(self.channels)):
            for b in range(a + 1, len(self.channels)):
                same = t.index[cols[a] == cols[b]].tolist()
                if same:
                    ca, cb = self.channels[a], self.channels[b]
                    pa, pb = shown[a][same[0]], shown[b][same[0]]
                    raise ImageSetError(
                        f"{self.where(same[0])}: channels {ca} and {cb} name the same image "
                        + (pa if pa == pb else f"file ({pa} and {pb} are one file: a link)")
                        + (f" ({len(same)} rows)" if len(same) > 1 else "")
                        + f"; fix FileName_{cb}/PathName_{cb} (or Frame_{cb} for a multi-plane file)"
                    )

    @classmethod
    def from_config(cls, cfg) -> ImageSet:
        """From `cfg.load_data`, or from `cfg.image_dir` + `cfg.pattern` (+ channel_map), then
        the plate map (`cfg.platemap`) joined to either."""
        chans = list(cfg.channels) or None
        if cfg.load_data:
            df, chans = read_load_data(cfg.load_data, chans)
            check_reserved(df.columns, str(cfg.load_data))
            source = str(cfg.load_data)
        elif cfg.image_dir:
            if not cfg.pattern:
                raise LoadDataError(
                    "prepare.image_dir needs prepare.pattern (e.g. opera_phenix, nf1)"
                )
            df, chans = load_data_from_folder(
                cfg.image_dir, cfg.pattern, dict(cfg.channel_map), chans, plate=cfg.plate
            )
            check_reserved(df.columns, f"prepare.pattern's groups ({cfg.image_dir})")
            source = str(cfg.image_dir)
        else:
            raise LoadDataError(
                "set prepare.load_data (a table) or prepare.image_dir + prepare.pattern"
            )
        if cfg.platemap:
            df = join_platemap(df, cfg.platemap)
            check_reserved(df.columns, f"prepare.platemap {cfg.platemap}")
        return cls(df, chans, source=source)

    def __len__(self) -> int:
        return len(self.table)

    def paths(self, i: int) -> list[Path]:
        row = self.table.iloc[i]
        return [Path(str(row[f"PathName_{c}"])) / str(row[f"FileName_{c}"]) for c in self.channels]

    def key(self, i: int) -> str:
        return str(self.table.at[i, "Metadata_ImageKey"])

    def metadata(self, i: int) -> dict:
        row = self.table.iloc[i]
        return {c: row[c] for c in self.table.columns if c.startswith("Metadata_")}

    def plates(self) -> list[str]:
        return list(dict.fromkeys(self.table["Metadata_Plate"].astype(str)))

    def read(self, i: int, *, plane_dtypes: list | None = None) -> np.ndarray:
        """The site's stack (C, H, W) in source dtype; errors name the row and file.

        `plane_dtypes` (a list, optional) receives each channel's own dtype (the stack has their
        common type)."""
        row = self.table.iloc[i]
        planes = []
        for c, path in zip(self.channels, self.paths(i)):
            frame = row.get(f"Frame_{c}")
            frame = None if frame is None or pd.isna(frame) else int(frame)
            try:
                planes.append(read_image(path, frame=frame))
            except ImageReadError as e:
                raise ImageReadError(e.path, f"{e.reason} [{self.where(i)}, channel {c}]") from e
        shapes = {p.shape for p in planes}
        if len(shapes) > 1:
            detail = ", ".join(f"{c}: {p.shape}" for c, p in zip(self.channels, planes))
            raise ImageSetError(
                f"{self.where(i)} ({self.key(i)}): channels have different shapes ({detail}); "
                "all channels of a site must be the same size"
            )
        if plane_dtypes is not None:
            plane_dtypes[:] = [p.dtype for p in planes]
        dtypes = {p.dtype for p in planes}
        dtype = np.result_type(*dtypes) if len(dtypes) > 1 else planes[0].dtype
        return np.stack([p.astype(dtype, copy=False) for p in planes])  # (C, H, W)
