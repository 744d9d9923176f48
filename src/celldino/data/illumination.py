"""Illumination correction per plate and channel, in the CellProfiler style.

CorrectIlluminationCalculate ("Regular", "Each", "All: across cycles"): average the plate's
images, smooth the average with a large median (or Gaussian) filter, rescale robustly so the
2nd percentile is 1 (values clipped at 1), and divide each image by it. The functions are
computed once, saved as `illum/<plate>.npy` (C, H, W) float32, and applied on read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from celldino.io.files import atomic_write_bytes


class IlluminationAccumulator:
    """Running per-plate mean of (C, H, W) stacks."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, plate: str, image: np.ndarray) -> None:
        img = image.astype(np.float64)
        if plate in self.sums:
            if self.sums[plate].shape != img.shape:
                return  # a site of another shape: leave it out of the average
            self.sums[plate] += img
        else:
            self.sums[plate] = img.copy()
        self.counts[plate] = self.counts.get(plate, 0) + 1

    def functions(self, *, method: str = "median", size: int = 0) -> dict[str, np.ndarray]:
        return {
            p: illumination_function(s / self.counts[p], method=method, size=size)
            for p, s in self.sums.items()
        }


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
        robust_min = np.percentile(smooth, 2)
        if robust_min <= 0:
            robust_min = max(float(smooth[smooth > 0].min(initial=1.0)), 1e-6)
        out[c] = np.maximum(smooth / robust_min, 1.0)
    return out


def apply_illumination(image: np.ndarray, function: np.ndarray | None) -> np.ndarray:
    """Divide (C, H, W) by the function; integer images stay in their dtype (rounded)."""
    if function is None:
        return image
    if function.shape != image.shape:
        raise ValueError(
            f"illumination function {function.shape} does not match image {image.shape}; "
            "sites of different sizes cannot share one plate function"
        )
    corrected = image.astype(np.float32) / function
    if image.dtype.kind in "ui":
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(corrected), info.min, info.max).astype(image.dtype)
    return corrected.astype(image.dtype)


def save_functions(functions: dict[str, np.ndarray], folder: Path) -> dict[str, str]:
    """Write illum/<plate>.npy per plate; returns {plate: file name}."""
    import io

    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, (plate, fn) in enumerate(functions.items()):
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in plate) or f"plate{i}"
        buf = io.BytesIO()
        np.save(buf, fn.astype(np.float32))
        atomic_write_bytes(folder / f"{safe}.npy", buf.getvalue())
        names[plate] = f"{safe}.npy"
    return names


def load_functions(folder: Path, names: dict[str, str]) -> dict[str, np.ndarray]:
    return {plate: np.load(folder / name) for plate, name in names.items()}
