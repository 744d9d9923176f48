"""Illumination correction per plate and channel, in the CellProfiler style.

CorrectIlluminationCalculate ("Regular", "Each", "All: across cycles"): average the plate's
images, smooth the average with a large median (or Gaussian) filter, rescale robustly so the
2nd percentile is 1 (values clipped at 1), and divide each image by it. The functions are
computed once, saved as `illum/<plate>.npy` (C, H, W) float32 (`celldino.io.prepared`), and
applied on read.
Non-finite pixels (NaN, inf) are left out of the average, so one bad image never poisons the
plate's function; a plate with sites of several sizes gets one function per size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from celldino.errors import DataError


class IlluminationAccumulator:
    """Running per-plate mean of (C, H, W) stacks, ignoring non-finite pixels (NaN, inf).

    Sites of different sizes in one plate get one function per size (named `<plate>@<H>x<W>`
    when a plate has more than one size; `sizes()` lists them so the caller can say so).
    """

    def __init__(self) -> None:
        self.sums: dict[tuple, np.ndarray] = {}
        self.counts: dict[tuple, np.ndarray] = {}
        self.examples: dict[tuple, str] = {}  # (plate, shape) → first file name seen

    def add(self, plate: str, image: np.ndarray, name: str = "") -> None:
        img = image.astype(np.float64)
        key = (plate, img.shape)
        finite = np.isfinite(img)
        n = finite.astype(np.int32)
        if not finite.all():
            img = np.where(finite, img, 0.0)
        if key in self.sums:
            self.sums[key] += img
            self.counts[key] += n
        else:
            self.sums[key] = img.copy()
            self.counts[key] = n
            self.examples[key] = name

    def sizes(self) -> dict[str, list[tuple[tuple[int, int], str]]]:
        """Plates with sites of more than one size: {plate: [((H, W), example file), ...]}."""
        out: dict[str, list] = {}
        for (plate, shape), name in self.examples.items():
            out.setdefault(plate, []).append((tuple(shape[1:]), name))
        return {p: v for p, v in out.items() if len(v) > 1}

    def functions(self, *, method: str = "median", size: int = 0) -> dict[str, np.ndarray]:
        multi = self.sizes()
        out = {}
        for (plate, shape), s in self.sums.items():
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = s / self.counts[(plate, shape)]  # NaN where no image had a finite pixel
            name = f"{plate}@{shape[1]}x{shape[2]}" if plate in multi else plate
            out[name] = illumination_function(mean, method=method, size=size)
        return out


def function_for(functions: dict[str, np.ndarray], plate: str, shape: tuple) -> np.ndarray | None:
    """The illumination function of a site of `plate` whose stack has `shape` (C, H, W)."""
    fn = functions.get(f"{plate}@{shape[-2]}x{shape[-1]}")
    return fn if fn is not None else functions.get(plate)


def illumination_function(
    mean_image: np.ndarray, *, method: str = "median", size: int = 0
) -> np.ndarray:
    """Smooth a plate's mean stack (C, H, W) and rescale robustly → (C, H, W) float32, >= 1."""
    mean_image = np.asarray(mean_image, dtype=np.float64)
    if mean_image.ndim == 2:
        mean_image = mean_image[None]
    _, h, w = mean_image.shape
    size = size or max(3, min(h, w) // 20)
    out = np.empty(mean_image.shape, np.float32)
    for c, plane in enumerate(mean_image):
        finite = np.isfinite(plane)
        if not finite.all():  # pixels no image had a finite value at: the plane's mean
            plane = np.where(finite, plane, plane[finite].mean() if finite.any() else 1.0)
        if method == "median":
            # median on a 4x block-averaged plane (same window in original pixels), then back up
            f = 4 if min(h, w) >= 64 else 1
            hh, ww = h // f * f, w // f * f
            small = plane[:hh, :ww].reshape(hh // f, f, ww // f, f).mean(axis=(1, 3))
            small = ndi.median_filter(small, size=max(3, size // f), mode="reflect")
            smooth = ndi.zoom(small, (h / small.shape[0], w / small.shape[1]), order=1)
            smooth = smooth[:h, :w]
        elif method == "gaussian":
            smooth = ndi.gaussian_filter(plane, sigma=size / 2.0, mode="reflect")
        else:
            raise ValueError(f"illumination filter '{method}' is not one of: median, gaussian")
        robust_min = float(np.percentile(smooth, 2))
        if robust_min <= 0:
            robust_min = max(float(smooth[smooth > 0].min(initial=1.0)), 1e-6)
        out[c] = np.maximum(smooth / robust_min, 1.0)
    return out


def apply_illumination(image: np.ndarray, function: np.ndarray | None) -> np.ndarray:
    """Divide (C, H, W) by the function; integer images stay in their dtype (rounded)."""
    if function is None:
        return image
    if function.shape != image.shape:
        raise DataError(
            f"illumination function {function.shape} does not match image {image.shape}; "
            "sites of different sizes cannot share one plate function"
        )
    corrected = image.astype(np.float32) / function
    if image.dtype.kind in "ui":
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(corrected), info.min, info.max).astype(image.dtype)
    return corrected.astype(image.dtype)
