"""False-colour composites of multi-channel images, with one documented channel → colour map.

The map follows the Cell Painting habit: DNA blue, ER green, RNA cyan, AGP (actin, Golgi, plasma
membrane) red, Mito magenta, a protein channel (HPA) yellow. Unknown channels take the colours of
`FALLBACK` in turn. Each channel is scaled to its 1st–99.8th percentile, tinted and summed, then
clipped to [0, 1].
"""

from __future__ import annotations

import numpy as np

CHANNEL_COLOURS: dict[str, tuple[float, float, float]] = {
    "DNA": (0.0, 0.35, 1.0),
    "ER": (0.0, 1.0, 0.0),
    "RNA": (0.0, 0.8, 0.8),
    "AGP": (1.0, 0.0, 0.0),
    "Mito": (0.9, 0.0, 0.9),
    "Protein": (1.0, 0.85, 0.0),
}
FALLBACK = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.35, 1.0), (0.9, 0.0, 0.9), (0.0, 0.8, 0.8)]


def colour_of(name: str, index: int) -> tuple[float, float, float]:
    return CHANNEL_COLOURS.get(name, FALLBACK[index % len(FALLBACK)])


def scale01(img: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.8) -> np.ndarray:
    """Percentile-stretch one channel to [0, 1]."""
    img = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(img, [lo_pct, hi_pct])
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def composite(image: np.ndarray, channels: list[str]) -> np.ndarray:
    """(C, H, W) image → (H, W, 3) false-colour RGB in [0, 1] using CHANNEL_COLOURS."""
    if image.ndim != 3 or image.shape[0] != len(channels):
        raise ValueError(
            f"composite needs a (C, H, W) image with C = {len(channels)} channels, got {image.shape}"
        )
    rgb = np.zeros((*image.shape[1:], 3), np.float32)
    for i, name in enumerate(channels):
        rgb += scale01(image[i])[..., None] * np.asarray(colour_of(name, i), np.float32)
    return np.clip(rgb, 0, 1)
