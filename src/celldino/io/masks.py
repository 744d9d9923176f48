"""Segmentation masks: the user's own (CellProfiler, Cellpose, any label image) and those prepare saves.

Reading a user's mask (`read_user_mask`), by its name:
- `*_seg.npy`: Cellpose's GUI/API output, a Python dict saved by `numpy.save` (so a pickle);
  its `masks` entry is the label image. A pickle can run code when loaded (its `__reduce__`
  names any function), so it is never given to `pickle.load`/`np.load(allow_pickle=True)`: a
  restricted unpickler (`SafeUnpickler`) builds only numpy arrays, dtypes and scalars and plain
  dicts, lists, tuples, strings and numbers, and refuses any other global, naming the file and
  the global, before calling it. The result must be a dict holding a 2-D integer `masks` array.
  Any other `.npy` is read without pickles.
- `*_cp_masks.png` / `*_cp_masks.tif`: Cellpose's saved label images; any other TIFF/PNG/NPY
  label or binary mask (CellProfiler's `MaskNuclei`/`MaskCells`), read as an image.

What prepare saves (`prepare.save_masks`), per site, under the prep folder:
`masks/<site>_nuclei.tiff` and `masks/<site>_cells.tiff` (uint16 or uint32 labels, zlib-compressed
TIFF, readable by napari, Fiji and tifffile; label k is the cell whose `Metadata_ObjectNumber` is k
in cells.parquet) and, with `prepare.save_outlines`, `outlines/<site>.png` (the DNA channel in
grey with nuclei outlines in green and cell outlines in magenta). `<site>` is the image key with
`/` replaced by `_`, plus `~` and a hash of the key where a name holds `_` or another character
that would make two keys one file name (`site_stem`).
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import io
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from celldino.errors import DataError, MissingInputError
from celldino.io.files import atomic_write_bytes
from celldino.io.images import read_image

MASKS = "masks"
OUTLINES = "outlines"
CELLPOSE_SEG = "_seg.npy"

__all__ = [
    "CELLPOSE_SEG",
    "MASKS",
    "OUTLINES",
    "mask_paths",
    "outline_path",
    "read_masks",
    "read_user_mask",
    "site_stem",
    "write_masks",
    "write_outline",
]


def _numpy_core() -> tuple[Any, Any]:
    try:  # numpy >= 2 (numpy.core still imports, with a DeprecationWarning)
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a numpy.save pickle of arrays, dicts, lists and numbers refers to (numpy 1
    writes numpy.core.*, numpy 2 numpy._core.*): each only builds an array, dtype, scalar,
    number, set or bytes."""
    multiarray, numeric = _numpy_core()
    out: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "complex"): complex,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles (numpy < 1.17)
    }
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        out[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        out[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return out


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that refers to a global outside SafeUnpickler's list (its text: module.name)."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes and scalars and plain containers and values; refuses
    every other global (os.system, subprocess.Popen, builtins.eval, ...) before calling it."""

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed_globals().get((module, name))
        if found is None:
            raise UnsafePickleError(f"{module}.{name}")
        return found


def _read_npy_restricted(path: Path) -> np.ndarray:
    """An .npy file as numpy.load reads it, an object array through SafeUnpickler."""
    from numpy.lib import format as npy

    with open(path, "rb") as f:
        major, _ = npy.read_magic(f)
        size = struct.unpack("<H" if major == 1 else "<I", f.read(2 if major == 1 else 4))[0]
        header = ast.literal_eval(f.read(size).decode("latin1" if major < 3 else "utf8"))
        if not npy.descr_to_dtype(header["descr"]).hasobject:
            f.seek(0)
            return npy.read_array(f, allow_pickle=False)
        obj = SafeUnpickler(f).load()
    if not isinstance(obj, np.ndarray):
        raise ValueError(f"the pickle holds a {type(obj).__name__}, not an array")
    return obj


def read_user_mask(path: str | Path) -> np.ndarray:
    """A user's mask (H, W) as stored: Cellpose `_seg.npy` by its `masks` key, else an image."""
    path = Path(path)
    if path.name.endswith(CELLPOSE_SEG):
        if not path.is_file():
            raise DataError(
                f"mask {path}: file not found (check prepare.mask_dir and the template)"
            )
        try:
            obj = _read_npy_restricted(path)
            obj = obj.item() if obj.dtype == object and obj.shape == () else obj
        except UnsafePickleError as e:
            raise DataError(
                f"mask {path}: refusing to read it: its pickle calls {e}, which is not part of a "
                "Cellpose _seg.npy (only numpy arrays, dicts, lists and numbers are) and could run "
                "code; save the masks from Cellpose again, or point prepare.nuclei_masks/"
                "cell_masks at the *_cp_masks.png/.tif files"
            ) from None
        except Exception as e:  # a truncated or foreign file
            raise DataError(
                f"mask {path}: not a Cellpose _seg.npy ({type(e).__name__}: {e}); save the "
                "masks from Cellpose again, or point prepare.nuclei_masks/cell_masks at the "
                "*_cp_masks.png/.tif files"
            ) from None
        masks = obj.get("masks") if isinstance(obj, dict) else None
        if masks is None:
            raise DataError(
                f"mask {path}: a Cellpose _seg.npy must be a dict with a 'masks' entry; found "
                f"{type(obj).__name__}"
                + (f" with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else "")
            )
        masks = np.asarray(masks)
        if masks.ndim != 2 or masks.dtype.kind not in "uib":
            raise DataError(
                f"mask {path}: 'masks' is {masks.dtype} of shape {masks.shape}; need a 2-D "
                "integer label image (one plane: 3-D Cellpose masks are not supported)"
            )
        return _checked_labels(path, masks)
    return _checked_labels(path, read_image(path))


def _checked_labels(path: Path, mask: np.ndarray) -> np.ndarray:
    """A mask whose values can be labels: no negative and no fractional value (each would
    raise deep in relabelling, or be cast to another cell's label)."""
    mask = np.asarray(mask)
    if mask.dtype.kind in "if" and mask.size:
        low = mask.min()
        if low < 0:
            n = int((mask < 0).sum())
            raise DataError(
                f"mask {path}: {n} pixels hold negative values (lowest {low}); labels are 0 "
                "(background) and 1, 2, ... (one per object): save the mask as unsigned labels"
            )
        if mask.dtype.kind == "f" and not np.array_equal(mask, np.floor(mask)):
            raise DataError(
                f"mask {path}: holds fractional values ({mask.dtype}); labels are whole "
                "numbers 0, 1, 2, ...: save the mask as an integer label image"
            )
    return mask


# the longest stem: `.<stem>_nuclei.tiff.<8>.tmp` (atomic_write_bytes' temporary file) within the
# 255 bytes a file name may have; a longer one is cut and ends in its key's hash
STEM_BYTES = 229


def site_stem(key: str) -> str:
    """A file-name-safe stem for an image key, one per key ('P01/A01/1' → 'P01_A01_1').

    `/` becomes `_`. Where that loses information (a name holding `_` or a character other than
    letters, digits, `-` and `.`), two keys could meet in one stem (plate `P_1` well `A01` and
    plate `P` well `1_A01` both read `P_1_A01_1`), so such a stem ends in `~` and 12 hex digits
    of the key's SHA-1: `~` never occurs in a plain stem, so stems stay one per key. A stem
    over `STEM_BYTES` (a file name's limit) is cut before its `~` and hash.
    """
    parts = key.split("/")
    plain = all(p and all(ch.isalnum() or ch in "-." for ch in p) for p in parts)
    stem = "_".join("".join(ch if ch.isalnum() or ch in "-." else "_" for ch in p) for p in parts)
    if plain and len(stem.encode()) <= STEM_BYTES:
        return stem
    cut = stem.encode()[: STEM_BYTES - 13].decode("utf-8", errors="ignore")  # a file name's limit
    return f"{cut}~{hashlib.sha1(key.encode('utf-8')).hexdigest()[:12]}"


def mask_paths(prep_dir: str | Path, key: str) -> tuple[Path, Path]:
    """(nuclei, cells) TIFF paths of a site's saved masks."""
    folder = Path(prep_dir) / MASKS
    stem = site_stem(key)
    return folder / f"{stem}_nuclei.tiff", folder / f"{stem}_cells.tiff"


def outline_path(prep_dir: str | Path, key: str) -> Path:
    """The outline overlay PNG of a site."""
    return Path(prep_dir) / OUTLINES / f"{site_stem(key)}.png"


def _label_dtype(labels: np.ndarray) -> np.dtype:
    return np.dtype(np.uint16) if int(labels.max(initial=0)) < 65536 else np.dtype(np.uint32)


def _tiff_bytes(labels: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, labels.astype(_label_dtype(labels)), compression="zlib")
    return buf.getvalue()


def write_masks(prep_dir: str | Path, key: str, nuclei: np.ndarray, cells: np.ndarray) -> None:
    """Save a site's nuclei and cell labels as zlib-compressed TIFFs (atomic)."""
    n_path, c_path = mask_paths(prep_dir, key)
    n_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(n_path, _tiff_bytes(nuclei))
    atomic_write_bytes(c_path, _tiff_bytes(cells))


def read_masks(prep_dir: str | Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(nuclei, cells) labels of a site saved by prepare (also under the name an older celldino
    gave them, `_legacy_stem`, where no other site of the prep shares that name)."""
    import tifffile

    n_path, c_path = _saved_masks(Path(prep_dir), key)
    return tifffile.imread(n_path), tifffile.imread(c_path)


def _legacy_stem(key: str) -> str:
    """The stem celldino before 0.3's `site_stem` gave: `/` and other characters → `_` (two keys
    could share it)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)


def _saved_masks(prep: Path, key: str) -> tuple[Path, Path]:
    paths = mask_paths(prep, key)
    if all(p.exists() for p in paths):
        return paths
    old = _legacy_stem(key)
    legacy = (prep / MASKS / f"{old}_nuclei.tiff", prep / MASKS / f"{old}_cells.tiff")
    if old == site_stem(key) or not all(p.exists() for p in legacy):
        missing = next(p for p in paths if not p.exists())
        raise MissingInputError(
            f"{missing}: no saved masks of site {key!r} in {prep}; prepare saves them with "
            "prepare.save_masks=true"
        )
    import pandas as pd

    from celldino.io.prepared import IMAGES

    try:
        keys = pd.read_parquet(prep / IMAGES, columns=["Metadata_ImageKey"])["Metadata_ImageKey"]
        sharing = sorted({str(k) for k in keys if _legacy_stem(str(k)) == old})
    except Exception:
        sharing = None
    if sharing != [key]:
        who = (
            "cannot be told to be this site's (its site list is unreadable)"
            if sharing is None
            else f"sites {', '.join(sharing)} share"
            if len(sharing) > 1
            else f"is site {', '.join(sharing) or '(none listed)'}'s, not {key!r}'s"
        )
        raise DataError(
            f"{legacy[0]}: masks saved by an older celldino under a name that {who} (in "
            f"{prep / IMAGES}); run prepare again with prepare.save_masks=true into a new "
            "prepare.out_dir to save one file per site"
        )
    return legacy


def write_outline(prep_dir: str | Path, key: str, rgb: np.ndarray) -> Path:
    """Save an (H, W, 3) uint8 outline overlay as PNG (atomic)."""
    from PIL import Image

    path = outline_path(prep_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
