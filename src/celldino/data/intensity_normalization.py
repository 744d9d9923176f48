"""Intensity normalisation: raw crops are stored; the option and its statistics go with them.

Options (prepare.normalization):
- `percentile_image`: per image and channel, x → (x - p_lo) / (p_hi - p_lo), clipped to [0, 1].
- `percentile_plate`: the same with percentiles of a pixel sample pooled over the plate.
- `divisor`: x → x / divisor (e.g. 65535 for 16-bit, 255 for 8-bit).
- `none`: raw values as float32.
`stats` are plain JSON ({"method", "percentiles", "divisor", "image": {key: {lo, hi}},
"plate": {plate: {lo, hi}}}), stored in the crop array's attributes and read back by the datasets.
"""

from __future__ import annotations

import numpy as np

from celldino.config import ConfigError

METHODS = ("percentile_image", "percentile_plate", "divisor", "none")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"prepare.normalization='{method}' is not one of: {', '.join(METHODS)}")


def finite_image(image: np.ndarray) -> np.ndarray:
    """The stack with non-finite pixels (NaN, inf: masked or failed pixels of float images) set
    to 0; integer images and clean float images are returned as they are."""
    if image.dtype.kind != "f":
        return image
    finite = np.isfinite(image)
    return image if finite.all() else np.where(finite, image, 0).astype(image.dtype)


def image_percentiles(image: np.ndarray, percentiles: tuple[float, float]) -> tuple[list, list]:
    """Per-channel (lo, hi) of a (C, H, W) stack."""
    flat = image.reshape(image.shape[0], -1)
    lo, hi = np.percentile(flat, percentiles, axis=1)
    return [float(v) for v in lo], [float(v) for v in hi]


def normalise(x: np.ndarray, stats: dict, lo=None, hi=None) -> np.ndarray:
    """Apply the recorded option to (..., C, H, W); lo/hi are (..., C) for the percentile options
    (one (C,) pair for a crop, or (N, C) for a batch of N crops)."""
    x = x.astype(np.float32, copy=False)
    method = stats.get("method", "none")
    if method == "none":
        return x
    if method == "divisor":
        return x / float(stats["divisor"])
    if lo is None or hi is None:
        raise ValueError(f"normalization {method} needs per-channel lo and hi")
    lo = np.asarray(lo, np.float32)[..., None, None]
    hi = np.asarray(hi, np.float32)[..., None, None]
    return np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)


def lo_hi_for(stats: dict, image_key: str, plate: str) -> tuple[list | None, list | None]:
    """The (lo, hi) a crop of `image_key` on `plate` is normalised with."""
    method = stats.get("method", "none")
    if method == "percentile_image":
        s = stats["image"][image_key]
        return s["lo"], s["hi"]
    if method == "percentile_plate":
        s = stats["plate"][plate]
        return s["lo"], s["hi"]
    return None, None
