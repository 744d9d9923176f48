"""Load-data tables: reading, validation, and building one from a folder of images.

The CellProfiler convention: one row per image set (site), `FileName_<CH>` and `PathName_<CH>`
per channel, optional `Frame_<CH>` (plane of a multi-page file), and `Metadata_*` columns.
`read_load_data(path, channels)` checks the table and resolves relative paths against the table's
folder. `load_data_from_folder(folder, pattern, channel_map)` builds the same table from file
names with a regular expression whose named groups are `plate`, `well` (or `row` + `col`),
`site` and `channel`; `PATTERNS` holds documented examples.

Tables that cannot be used (empty, header only, unparseable, a column missing) raise
`LoadDataError` (a `celldino.errors.DataError`) naming the file and the line or column. A CSV that
is not UTF-8 is read as Windows-1252 / latin-1 with a warning, never refused for its encoding.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from celldino.errors import DataError, MissingInputError
from celldino.io.files import atomic_write_bytes

logger = logging.getLogger("celldino.io.tables")

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


class LoadDataError(DataError):
    """A load-data table or image folder that does not describe a usable image set."""


class TableMissingError(LoadDataError, MissingInputError):
    """A table file that does not exist."""


_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")  # latin-1 decodes any byte: the last resort


def check_unique_names(names: list[str], where: str) -> None:
    """Refuse a header that names a column twice (pandas would rename the second 'X' to 'X.1',
    DuckDB to 'X_1': both kept, the feature counted twice)."""
    seen: set[str] = set()
    for c in names:
        if c in seen:
            raise LoadDataError(
                f"table {where}: column {c} appears more than once in the header; keep one of "
                "them (or rename one)"
            )
        seen.add(c)


def csv_header(path: str | Path, sep: str | None = None, encoding: str = "utf-8-sig") -> list[str]:
    """The header of a delimited text table as written (spaces around names stripped, no
    renaming of repeated names), the separator by suffix unless given."""
    path = Path(path)
    sep = sep or ("\t" if ".tsv" in path.name.lower() else ",")
    head = pd.read_csv(
        path, sep=sep, encoding=encoding, header=None, nrows=1, dtype=str, keep_default_na=False
    )
    return [str(c).strip() for c in head.iloc[0].tolist()] if len(head) else []


def csv_separator(path: str | Path, encoding: str = "utf-8-sig") -> str:
    """The separator of a delimited text table: a tab for `.tsv`, else a comma, unless the
    header read so is one column holding `;`, a tab or a comma (Excel writes `;` where the
    decimal mark is a comma): then that one. Every reader of user tables (pandas here, DuckDB in
    `pp.aggregate`) splits a file by this, so none reads a table another refuses."""
    sep = "\t" if ".tsv" in Path(path).name.lower() else ","
    names = csv_header(path, sep, encoding)
    if len(names) == 1:
        other = next((c for c in (";", "\t", ",") if c != sep and c in names[0]), None)
        if other:
            return other
    return sep


# Columns that hold text whatever their cells look like: metadata (barcodes, well names, doses
# as written), file names and locations; cytotable spells the image metadata Image_Metadata_*.
TEXT_COLUMN = re.compile(
    r"(?:Image_)?(?:Metadata|FileName|PathName|URL|ObjectsFileName|ObjectsPathName|MD5Digest)_"
)


def _not_a_number(values: pd.Series) -> pd.Series:
    """True where a non-empty text cell is not a number (float() accepts 1e3, nan, inf)."""
    out = pd.Series(False, index=values.index)
    filled = values.notna()
    num = pd.to_numeric(values.where(filled), errors="coerce")
    for i in values.index[filled & num.isna()]:
        try:
            float(str(values[i]))
        except ValueError:
            out[i] = True
    return out


def one_spelling_per_number(values: pd.Series) -> tuple[pd.Series, list[list[str]]]:
    """A column of a numeric role read as text, as `Metadata_*` are (doses `1`, `1.0`, `1e0`):
    the spellings of one number made one (the first in the column), so they group as one value;
    also the merged spellings, for a warning. Unchanged, with none merged, when the column is not
    text or a filled cell is not a number (`10 uM` stays as written)."""
    original = values
    if isinstance(values.dtype, pd.CategoricalDtype):  # an .h5ad's obs
        values = values.astype(object)
    if not (pd.api.types.is_object_dtype(values) or pd.api.types.is_string_dtype(values)):
        return original, []
    filled = values.dropna().astype(str)
    if filled.empty or _not_a_number(filled).any():
        return original, []
    spellings: dict[float, list[str]] = {}
    for text in dict.fromkeys(filled):  # each spelling once, in the column's order
        number = float(text)
        if number == number:  # NaN spelt out stays as written
            spellings.setdefault(number, []).append(text)
    merged = [sp for sp in spellings.values() if len(sp) > 1]
    # numbers among the text (a join of a float and a text column): grouped by their text too
    mixed = values.dropna().map(lambda v: not isinstance(v, str)).any()
    if not merged and not mixed:
        return original, []
    one = {t: sp[0] for sp in merged for t in sp}
    text = values.where(values.isna(), values.astype(str))
    return text.map(lambda v: one.get(v, v) if isinstance(v, str) else v), merged


def type_columns(df: pd.DataFrame, path: str | Path, *, features: bool) -> pd.DataFrame:
    """Give a table read as text its types, the same way for every user table.

    `Metadata_*` (and file-name) columns stay text as written: `000123` stays `000123`, `None`,
    `NA`, `null`, `N/A` are values, an empty cell is missing. Any other column whose filled
    cells are all numbers becomes numeric; one whose cells are all text stays text (a label, not
    a feature). A column mixing numbers and text (`n/a` among the values) is refused when
    `features` (a per-cell or per-well table: its numeric columns are the features), and always
    for `Frame_*`, naming the column, the line and the cell; never dropped or made NaN silently.
    """
    for c in df.columns:
        if TEXT_COLUMN.match(str(c)) or not pd.api.types.is_object_dtype(df[c]):
            continue
        col = df[c]
        bad = _not_a_number(col)
        if not bad.any():
            df[c] = pd.to_numeric(col.where(col.notna()), errors="coerce")
            continue
        if bad.sum() == col.notna().sum():  # text throughout: not a number column
            continue
        if features or str(c).startswith("Frame_"):
            i = int(bad.to_numpy().nonzero()[0][0])
            n = int(bad.sum())
            raise LoadDataError(
                f"{row_label(path, i)}: column {c} holds {col.iloc[i]!r}, not a number"
                + (f" ({n} such cells in the column)" if n > 1 else "")
                + (
                    "; a Frame_ column holds plane numbers: fix the cell (empty = the first plane)"
                    if str(c).startswith("Frame_")
                    else "; a feature column must hold numbers: write a missing value as an "
                    "empty cell (or NaN), fix the cell, or remove the column"
                )
            )
    return df


def _check_features(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """A Parquet table's text feature columns get the same check as a CSV's (types are the file's
    own otherwise)."""
    text = [c for c in df.columns if df[c].dtype == object and not TEXT_COLUMN.match(str(c))]
    if text:
        typed = type_columns(df[text].copy(), path, features=True)
        for c in text:
            df[c] = typed[c]
    return df


def is_text_table(path: str | Path) -> bool:
    """Whether `path` is read as delimited text (its line numbers mean something)."""
    name = Path(path).name.lower()
    return not (name.endswith(".parquet") or name.endswith(".pq"))


def row_label(path: str | Path, i: int) -> str:
    """Where data row `i` (0-based, as read) is in the file: a line number for text tables
    (the header is line 1), a 1-based data row for Parquet."""
    if is_text_table(path):
        return f"line {i + 2} of {path}"
    return f"data row {i + 1} of {path}"


def read_table(path: str | Path, *, features: bool = False, text: bool = False) -> pd.DataFrame:
    """A user's table, CSV/TSV (optionally compressed) or Parquet by suffix: the one reader of
    load-data, locations, per-cell and per-well tables, so their checks hold for all.

    A column named twice is refused (naming the file and column). CSV cells are read as text and
    typed by `type_columns`: `Metadata_*` stay text as written (no number or missing-value
    guessing), the other all-number columns become numbers, and with `features` (per-cell or
    per-well tables) a column mixing numbers and text is refused naming the cell. Parquet keeps
    its own types (nothing is guessed); its text feature columns get the same check. With
    `text` every CSV column is read as `Metadata_*` are (a plate map's, all metadata)."""
    path = Path(path)
    if not path.exists():
        raise TableMissingError(f"table {path} does not exist")
    if path.is_dir():
        raise LoadDataError(f"table {path} is a folder; give the table file")
    name = path.name.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        try:
            import pyarrow.parquet as pq

            check_unique_names(list(pq.read_schema(path).names), str(path))
            df = pd.read_parquet(path)
        except LoadDataError:
            raise
        except Exception as e:  # not Parquet, truncated, unreadable
            raise LoadDataError(
                f"table {path} cannot be read as Parquet ({type(e).__name__}: {e})"
            ) from e
        return _check_features(df, path) if features else df
    if ".csv" in name or ".tsv" in name or name.endswith(".txt"):
        if path.stat().st_size == 0:
            raise LoadDataError(
                f"table {path} is empty (0 bytes); it needs a header line and one row per site"
            )
        encodings = _ENCODINGS
        if not name.endswith((".gz", ".bz2", ".zip", ".xz", ".zst")):
            with open(path, "rb") as f:
                if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):  # Excel's "Unicode text"
                    encodings = ("utf-16",)
        for enc in encodings:
            try:
                sep = csv_separator(path, enc)  # Excel's ';' or tabs in a .csv too
                names = csv_header(path, sep, enc)
                check_unique_names(names, str(path))
                # text columns (metadata, file names) as text; only an empty cell is missing
                # (None, NA, null are values); the other columns parsed as numbers where they are
                df = pd.read_csv(
                    path,
                    sep=sep,
                    encoding=enc,
                    header=0,
                    names=names,
                    dtype={c: str for c in names if text or TEXT_COLUMN.match(c)},
                    keep_default_na=False,
                    na_values=[""],
                )
            except LoadDataError:
                raise
            except UnicodeDecodeError:
                continue
            except pd.errors.EmptyDataError:
                raise LoadDataError(
                    f"table {path} has no columns (blank, or only whitespace); it needs a header "
                    "line and one row per site"
                ) from None
            except pd.errors.ParserError as e:
                raise LoadDataError(f"table {path} cannot be parsed: {e}") from None
            except (OSError, EOFError, ValueError) as e:  # bad gzip, permission, ...
                raise LoadDataError(f"table {path} cannot be read ({type(e).__name__}: {e})") from e
            if not text:
                df = type_columns(df, path, features=features)
            if enc not in (_ENCODINGS[0], "utf-16"):
                logger.warning(
                    "%s is not UTF-8: read it as %s (check accented names; save the table as "
                    "UTF-8 to silence this)",
                    path,
                    "Windows-1252" if enc == "cp1252" else "latin-1",
                )
            return df
    raise LoadDataError(f"table {path}: unknown format (use .csv, .csv.gz, .tsv or .parquet)")


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Atomic Parquet write (readers never see half a file)."""
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return atomic_write_bytes(Path(path), buf.getvalue())


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Atomic CSV write without the index (readers never see half a file)."""
    return atomic_write_bytes(Path(path), df.to_csv(index=False).encode())


def available_channels(df: pd.DataFrame) -> list[str]:
    """Channel names with a FileName_<CH> column, in table order."""
    return [c[len("FileName_") :] for c in df.columns if c.startswith("FileName_")]


def validate_load_data(
    df: pd.DataFrame, channels: list[str] | tuple[str, ...] | None, *, source: str = "load-data"
) -> list[str]:
    """Check the columns; return the explicit channel order. Errors list what is available."""
    avail = available_channels(df)
    if not avail and not len(df.columns):
        raise LoadDataError(f"{source}: no columns; a load-data table needs a header line")
    if not avail:
        raise LoadDataError(
            f"{source}: no FileName_<CH> columns (columns present: {list(df.columns)[:20]}); "
            "a load-data table needs FileName_<CH> and PathName_<CH> per channel"
        )
    chans = list(channels) if channels else avail
    twice = sorted({c for c in chans if chans.count(c) > 1})
    if twice:
        raise LoadDataError(f"prepare.channels names {twice} more than once: {chans}")
    missing = [c for c in chans if c not in avail]
    if missing:
        raise LoadDataError(
            f"{source}: no column FileName_{missing[0]} for channel '{missing[0]}' "
            f"(available channels: {', '.join(avail)}); set prepare.channels to a subset of these"
        )
    for c in chans:
        if f"PathName_{c}" not in df.columns:
            raise LoadDataError(
                f"{source}: column FileName_{c} has no PathName_{c} column beside it; add "
                f"PathName_{c} (the folder of each file, absolute or relative to the table)"
            )
    if not len(df):
        raise LoadDataError(
            f"{source}: no data rows (only a header); add one row per site (image set)"
        )
    for c in chans:  # (an empty PathName_ means: relative to the table's folder)
        col = f"FileName_{c}"
        bad = df.index[df[col].isna() | (df[col].astype(str).str.strip() == "")].tolist()
        if bad:
            more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
            raise LoadDataError(
                f"{_where(source, bad[0])}: column {col} is empty{more}; fill it in"
            )
    return chans


def _where(source: str, i: int) -> str:
    """Row i of a table read from the file `source` (line number), or of a built table."""
    return row_label(source, i) if Path(source).is_file() else f"{source}, row {i + 1}"


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


def _is_utf8(name: str) -> bool:
    """False for names the OS gave as undecodable bytes (surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show_name(path: Path) -> str:
    """A printable form of a file name that is not valid UTF-8 (its raw bytes escaped)."""
    import os

    return repr(os.fsencode(path.name))[2:-1]


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
    undecodable: list[Path] = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        if not _is_utf8(str(f)):
            undecodable.append(f)
            continue
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
    if undecodable:
        named = [f for f in undecodable if regex.search(f.name)]
        shown = ", ".join(_show_name(f) for f in (named or undecodable)[:3])
        if named:
            raise LoadDataError(
                f"{folder}: {len(named)} image file name(s) matching the pattern are not valid "
                f"UTF-8 ({shown}); rename them (e.g. `convmv -f latin1 -t utf8`) and rerun"
            )
        logger.warning(
            "%s: %d file name(s) that are not UTF-8 ignored (%s)", folder, len(undecodable), shown
        )
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
