"""Load-data tables: reading, validation, and building one from a folder of images.

The CellProfiler convention: one row per image set (site), `FileName_<CH>` and `PathName_<CH>`
per channel, optional `Frame_<CH>` (plane of a multi-page file), and `Metadata_*` columns.
`read_load_data(path, channels)` checks the table and resolves relative paths against the table's
folder. `load_data_from_folder(folder, pattern, channel_map)` builds the same table from file
names with a regular expression whose named groups are `plate`, `well` (or `row` + `col`),
`site` and `channel`; `PATTERNS` holds documented examples.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from celldino.io.files import atomic_write_bytes

# Named example patterns (use the name in `prepare.pattern`, or write your own regex).
PATTERNS: dict[str, str] = {
    # Opera Phenix / Harmony export: r03c03f03p01-ch1sk1fk1fl1.tiff (row 3, column 3, field 3,
    # plane 1, channel 1) → well C03, site 3, channel "1".
    "opera_phenix": (
        r"r(?P<row>\d{2})c(?P<col>\d{2})f(?P<site>\d{2})p(?P<plane>\d{2})"
        r"-ch(?P<channel>\d+)sk\d+fk\d+fl\d+\.tiff?$"
    ),
    # NF1 Cell Painting (cellpainting_fovs/NF1_...): B7_01_1_3_DAPI_001.tif → well B7,
    # channel index 1, site 3, channel DAPI.
    "nf1": (
        r"(?P<well>[A-P]\d{1,2})_01_(?P<chidx>\d)_(?P<site>\d+)_(?P<channel>[A-Za-z0-9]+)"
        r"_001\.tif$"
    ),
}


class LoadDataError(ValueError):
    """A load-data table or image folder that does not describe a usable image set."""


def read_table(path: str | Path) -> pd.DataFrame:
    """CSV (optionally compressed) or Parquet, by suffix."""
    path = Path(path)
    if not path.exists():
        raise LoadDataError(f"table {path} does not exist")
    name = path.name.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return pd.read_parquet(path)
    if ".csv" in name or ".tsv" in name or name.endswith(".txt"):
        sep = "\t" if ".tsv" in name else ","
        return pd.read_csv(path, sep=sep)
    raise LoadDataError(f"table {path}: unknown format (use .csv, .csv.gz, .tsv or .parquet)")


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Atomic Parquet write (readers never see half a file)."""
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return atomic_write_bytes(Path(path), buf.getvalue())


def available_channels(df: pd.DataFrame) -> list[str]:
    """Channel names with a FileName_<CH> column, in table order."""
    return [c[len("FileName_") :] for c in df.columns if c.startswith("FileName_")]


def validate_load_data(
    df: pd.DataFrame, channels: list[str] | tuple[str, ...] | None, *, source: str = "load-data"
) -> list[str]:
    """Check the columns; return the explicit channel order. Errors list what is available."""
    avail = available_channels(df)
    if not avail:
        raise LoadDataError(
            f"{source}: no FileName_<CH> columns (columns present: {list(df.columns)[:20]}); "
            "a load-data table needs FileName_<CH> and PathName_<CH> per channel"
        )
    chans = list(channels) if channels else avail
    missing = [c for c in chans if c not in avail]
    if missing:
        raise LoadDataError(
            f"{source}: no column FileName_{missing[0]} for channel '{missing[0]}' "
            f"(available channels: {', '.join(avail)}); set prepare.channels to a subset of these"
        )
    for c in chans:
        if f"PathName_{c}" not in df.columns:
            raise LoadDataError(f"{source}: FileName_{c} has no PathName_{c} column beside it")
    for c in chans:
        bad = df.index[df[f"FileName_{c}"].isna()].tolist()
        if bad:
            raise LoadDataError(f"{source}: row {bad[0]}: FileName_{c} is empty")
    return chans


def read_load_data(
    path: str | Path, channels: list[str] | tuple[str, ...] | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Read and validate a load-data table; PathName_ made absolute relative to the table."""
    path = Path(path)
    df = read_table(path).reset_index(drop=True)
    chans = validate_load_data(df, channels, source=str(path))
    base = path.resolve().parent
    for c in chans:
        df[f"PathName_{c}"] = [
            str(p if Path(p).is_absolute() else (base / p).resolve())
            for p in df[f"PathName_{c}"].fillna("").astype(str)
        ]
    return df, chans


def _well_from_row_col(row: str, col: str) -> str:
    r = int(row)
    if not 1 <= r <= 32:
        raise LoadDataError(f"plate row {row} out of range 1..32")
    letters = chr(ord("A") + r - 1) if r <= 26 else "A" + chr(ord("A") + r - 27)
    return f"{letters}{int(col):02d}"


def load_data_from_folder(
    folder: str | Path,
    pattern: str,
    channel_map: dict[str, str] | None = None,
    channels: list[str] | tuple[str, ...] | None = None,
    *,
    plate: str = "",
) -> tuple[pd.DataFrame, list[str]]:
    """Build a load-data table from file names matched by `pattern` (a regex or a PATTERNS name).

    Named groups: `channel` (required), `well` or `row` + `col`, `site`, `plate`; other groups
    become Metadata_<Group> columns. `channel_map` renames channels (e.g. {"5": "DNA"}).
    Files whose channel is not in the map are dropped when a map is given.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LoadDataError(f"image folder {folder} does not exist")
    regex = re.compile(PATTERNS.get(pattern, pattern))
    if "channel" not in regex.groupindex:
        raise LoadDataError(f"pattern {regex.pattern!r} needs a named group (?P<channel>...)")
    cmap = {str(k): str(v) for k, v in (channel_map or {}).items()}
    records: dict[tuple, dict] = {}
    n_matched = 0
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        m = regex.search(f.name)
        if not m:
            continue
        n_matched += 1
        g = {k: v for k, v in m.groupdict().items() if v is not None}
        ch = g.pop("channel")
        if cmap:
            if ch not in cmap:
                continue
            ch = cmap[ch]
        if "row" in g and "col" in g and "well" not in g:
            g["well"] = _well_from_row_col(g.pop("row"), g.pop("col"))
        g.setdefault("plate", plate or folder.name)
        meta = {f"Metadata_{k.capitalize()}": v for k, v in g.items() if k != "chidx"}
        key = tuple(sorted(meta.items()))
        rec = records.setdefault(key, dict(meta))
        if f"FileName_{ch}" in rec:
            raise LoadDataError(
                f"{folder}: two files for channel '{ch}' of {dict(key)}: "
                f"{rec['FileName_' + ch]} and {f.name}; add the distinguishing part as a group"
            )
        rec[f"FileName_{ch}"] = f.name
        rec[f"PathName_{ch}"] = str(f.parent.resolve())
    if not records:
        raise LoadDataError(
            f"{folder}: no file names match {regex.pattern!r} ({n_matched} matched before the "
            f"channel map {cmap})"
        )
    df = pd.DataFrame(list(records.values()))
    if "Metadata_Site" in df and df["Metadata_Site"].astype(str).str.isdigit().all():
        df["Metadata_Site"] = df["Metadata_Site"].astype(int)
    sort_cols = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site") if c in df]
    df = df.sort_values(sort_cols).reset_index(drop=True) if sort_cols else df
    avail = available_channels(df)
    if cmap:
        ordered = [v for v in dict.fromkeys(cmap.values()) if v in avail]
        avail = ordered
    chans = list(channels) if channels else avail
    missing_sites = df.index[
        df[[f"FileName_{c}" for c in chans if f"FileName_{c}" in df]].isna().any(axis=1)
    ]
    chans = validate_load_data(df.drop(index=missing_sites), chans, source=str(folder))
    if len(missing_sites):
        raise LoadDataError(
            f"{folder}: site {df.loc[missing_sites[0], sort_cols].to_dict()} lacks a file for "
            f"some of the channels {chans}"
        )
    return df, chans
