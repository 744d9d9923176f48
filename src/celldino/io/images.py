"""Image readers: one 2-D plane at a time, lazily, from the formats microscopes and tools write.

`read_image(path)` returns a 2-D array (H, W) in the file's own dtype. Multi-page TIFFs (and
OME-TIFF series) give one plane per `frame`; NPZ files take a `key`; Zarr arrays and NPY stacks of
shape (P, H, W) take a `frame` too. Nothing is read before it is asked for, and a file that
cannot be read raises `ImageReadError` naming the file and the reason.

Supported: .tif/.tiff (8/16/32-bit integer or float, multi-page, OME-TIFF, compressed), .png,
.npy, .npz, .zarr (a Zarr v2/v3 array folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from celldino.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff")
SUFFIXES = (*TIFF_SUFFIXES, ".png", ".npy", ".npz", ".zarr")


class ImageReadError(DataError, OSError):
    """An image file that is missing, truncated, of an unknown format or of the wrong shape.

    A user error (`celldino.errors.DataError`) and still an `OSError` for callers that catch that.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):  # picklable across prepare's worker processes
        return (type(self), (self.path, self.reason))

    def __str__(self) -> str:
        return f"cannot read image {self.path}: {self.reason}"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _refuse_channels_last(shape: tuple[int, ...], path: Path) -> None:
    """An array of (H, W, channels), as numpy and scikit-image write colour and multi-channel
    images: read as a stack of planes it would be H planes of W x channels pixels, so refuse it.
    Taken for channels last: a last axis of at most 16 that is at least 4 times smaller than
    each of the two before it (a stack of 1080 planes of 1080 x 5 pixels is not an image)."""
    if len(shape) == 3 and 1 < shape[2] <= 16 and min(shape[0], shape[1]) >= 4 * shape[2]:
        raise ImageReadError(
            path,
            f"has shape {tuple(shape)}: {shape[0]}x{shape[1]} pixels with {shape[2]} channels as "
            "the last axis; celldino reads a stack as (planes, height, width): save it as "
            "np.moveaxis(image, -1, 0) (then Frame_<CH> picks the channel) or one file per "
            "channel",
        )


def _select_plane(arr, frame: int | None, path: Path):
    """Reduce an array-like of ndim 2 or 3 to one (H, W) plane."""
    _refuse_channels_last(tuple(arr.shape), path)
    if arr.ndim == 2:
        if frame not in (None, 0):
            raise ImageReadError(path, f"frame {frame} asked for, but the image has one plane")
        return arr
    squeezed_shape = [s for s in arr.shape if s != 1]
    if len(squeezed_shape) == 2:
        return np.asarray(arr).reshape(squeezed_shape)
    if arr.ndim == 3:
        if frame is None:
            raise ImageReadError(
                path,
                f"holds {arr.shape[0]} planes of {tuple(arr.shape[1:])}; say which one "
                "(a Frame_<CH> column in the load-data table)",
            )
        if not 0 <= frame < arr.shape[0]:
            raise ImageReadError(path, f"frame {frame} out of range (0..{arr.shape[0] - 1})")
        return arr[frame]
    raise ImageReadError(path, f"expected a 2-D image or a stack of planes, got shape {arr.shape}")


def _refuse_rgb(path: Path, series) -> None:
    """An RGB(A) TIFF (samples as the last axis): one file per channel is expected."""
    shape = tuple(series.shape)
    if len(shape) > 2 and shape[-1] in (3, 4) and series.axes.endswith("S"):
        raise ImageReadError(
            path,
            f"is an RGB image of {shape[-3]}x{shape[-2]} pixels with {shape[-1]} colour samples "
            f"(shape {shape}); save one grey plane per channel (one file per channel)",
        )


def _read_tiff(path: Path, frame: int | None) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape = series.shape
        n_planes = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        _refuse_rgb(path, series)
        _refuse_channels_last(tuple(shape), path)  # tifffile writes (H, W, C) as H pages
        if n_planes == 1:
            if frame not in (None, 0):
                raise ImageReadError(path, f"frame {frame} asked for, but the image has one plane")
            return series.asarray().reshape(shape[-2:])
        if frame is None:
            raise ImageReadError(
                path,
                f"holds {n_planes} planes (axes {series.axes}); say which one "
                "(a Frame_<CH> column in the load-data table)",
            )
        if not 0 <= frame < n_planes:
            raise ImageReadError(path, f"frame {frame} out of range (0..{n_planes - 1})")
        if len(series.pages) == n_planes:  # one page per plane: read only that page
            return series.asarray(key=frame).reshape(shape[-2:])
        return series.asarray().reshape(n_planes, *shape[-2:])[frame]  # planar (e.g. separated)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGB", "RGBA", "P"):
            raise ImageReadError(
                path, f"a colour PNG (mode {im.mode}); save one grey plane per channel"
            )
        arr = np.asarray(im)
    if arr.dtype == np.int32 and im.mode.startswith("I"):
        arr = arr.astype(np.uint16) if arr.max(initial=0) < 65536 else arr
    return arr


def read_image(path: str | Path, *, frame: int | None = None, key: str | None = None) -> np.ndarray:
    """One 2-D plane (H, W) in the file's dtype; raises ImageReadError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found (check PathName_/FileName_ or the image folder)")
    suffix = _suffix(path)
    if path.is_dir() and suffix != ".zarr":
        raise ImageReadError(
            path, "is a folder, not an image file (check PathName_/FileName_ or the image folder)"
        )
    try:
        if suffix in TIFF_SUFFIXES:
            arr = _read_tiff(path, frame)
        elif suffix == ".png":
            arr = _read_png(path)
        elif suffix == ".npy":
            arr = _select_plane(np.load(path, mmap_mode="r"), frame, path)
        elif suffix == ".npz":
            with np.load(path) as z:
                names = list(z.keys())
                if key is None:
                    if len(names) != 1:
                        raise ImageReadError(path, f"holds arrays {names}; say which key")
                    key = names[0]
                if key not in names:
                    raise ImageReadError(path, f"no array '{key}' (available: {names})")
                arr = _select_plane(z[key], frame, path)
        elif suffix == ".zarr":
            import zarr

            arr = _select_plane(zarr.open_array(str(path), mode="r"), frame, path)
        else:
            raise ImageReadError(path, f"unknown image format '{suffix}' (supported: {SUFFIXES})")
        arr = np.asarray(arr)
    except ImageReadError:
        raise
    except Exception as e:  # truncated files, bad compression, wrong magic bytes...
        raise ImageReadError(path, f"{type(e).__name__}: {e} (truncated or corrupt?)") from e
    if arr.ndim != 2:
        raise ImageReadError(path, f"expected a 2-D plane, got shape {arr.shape}")
    if arr.dtype.kind == "c":  # casting would silently drop the imaginary part
        raise ImageReadError(
            path,
            f"complex-valued pixels ({arr.dtype}); save a real image (e.g. the magnitude) "
            "per channel",
        )
    if arr.dtype.kind not in "uif" or arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    return arr


def image_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) of the first plane without reading pixels (TIFF, NPY, Zarr); reads others."""
    path = Path(path)
    suffix = _suffix(path)
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                _refuse_rgb(path, tif.series[0])  # its last two axes are not (H, W)
                _refuse_channels_last(tuple(tif.series[0].shape), path)
                return tuple(tif.series[0].shape[-2:])  # type: ignore[return-value]
        if suffix == ".npy":
            shape = np.load(path, mmap_mode="r").shape
            _refuse_channels_last(shape, path)
            return tuple(shape[-2:])  # type: ignore[return-value]
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from e
    return read_image(path).shape  # type: ignore[return-value]


def stored_dtype(path: str | Path) -> str | None:
    """The pixel type as the file stores it (TIFF, NPY), which `read_image` may widen (float16 is
    read as float32); None when it cannot be told without reading the pixels. For messages."""
    path = Path(path)
    suffix = _suffix(path)
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return str(tif.series[0].dtype)
        if suffix == ".npy":
            return str(np.load(path, mmap_mode="r").dtype)
    except Exception:
        return None
    return None


def write_tiff(path: str | Path, image: np.ndarray, *, compression: str | None = None) -> Path:
    """Write one plane (or a stack) as TIFF, creating folders; used for masks and tests."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image, compression=compression)
    return path
