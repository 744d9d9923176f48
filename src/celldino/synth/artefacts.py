"""Imaging artefacts planted into a rendered or real field of view, with their ground truth.

One function per artefact type. Each takes a field (C, H, W) of camera counts (any numeric dtype,
as read from disk), a numpy Generator and optional strengths, and returns (the planted field in
the same dtype and shape, a dict of what was planted). Nothing else is read or written: the same
functions plant into the synthetic screen (`synth.artefacts`, `screen.py`) and into real fields
(`real_fields` + `plant_real`).

Sizes are given relative to the cells: `nucleus_px` is the typical nucleus diameter in pixels
(13 in the synthetic screen; 30 to 60 in the real 1080 px fields), so a blur of 0.25 nuclei is as
strong in either.

- `blur`: out-of-focus, a Gaussian of sigma 0.15 to 0.35 nucleus diameters in every channel; the
  camera noise the smoothing removed is put back (defocus does not make a camera quieter, so
  a detector cannot find blur from the noise level alone).
- `saturated`: over-exposure of 1 or 2 channels: a gain that puts 2 to 12 % of their pixels at
  the camera's ceiling (clipped).
- `debris`: bright junk that saturates: an irregular blob of 5 to 12 % of the field's side in
  radius, over the ceiling in every channel at its core.
- `debris_dim`: junk that does not saturate: a textured clump (1.5 to 3 nucleus diameters in
  radius, at most a quarter of the side: larger than a cell) or a long fibre in 1 to 3 channels,
  as bright as the cells' upper range (0.6 to 1.5 x the channel's 99.5th percentile above
  background) and kept below the ceiling (no pixel at the dtype's maximum).
- `autofluorescence`: 1 or 2 broad smooth blobs (sigma 12 to 25 % of the side), bright
  (0.5 to 1.2 x the channel's 99.5th percentile above background) in at least 3 channels (all if
  fewer), not cell-shaped, kept below the ceiling.
- `noise`: a noise burst: Gaussian noise that multiplies each channel's neighbour-difference
  noise by `factor` (2 to 4).
- `empty`: no cells: each channel's smooth background (block low percentiles) plus its noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit

from celldino.config import CHOICES

ARTEFACTS: tuple[str, ...] = CHOICES["synth.artefacts"]
# the types planted into real fields (issue 24's real check)
REAL_ARTEFACTS = ("blur", "debris", "debris_dim", "saturated")
SYNTH_NUCLEUS_PX = 13.0  # the synthetic screen's typical nucleus diameter (2 x NUCLEUS_RADIUS)


def noise_sigma(plane: np.ndarray) -> float:
    """Robust pixel noise sigma from horizontal neighbour differences (as `data.qc`)."""
    d = np.diff(plane.astype(np.float64), axis=1).ravel()
    return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2)


def _with_noise(base: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """base + s x (a standard normal field), s found (bisection) so that `noise_sigma` of the sum
    is `target`: the estimator counts the content's own neighbour differences too, so the noise
    to add is not simply sqrt(target^2 - noise_sigma(base)^2)."""
    z = rng.standard_normal(base.shape).astype(np.float32)
    lo, hi = 0.0, max(target, 1e-6)
    while noise_sigma(base + hi * z) < target and hi < 1e6:
        hi *= 2
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if noise_sigma(base + mid * z) < target else (lo, mid)
    return base + 0.5 * (lo + hi) * z


def ceiling_of(image: np.ndarray) -> float:
    """The camera's ceiling: the dtype's maximum for integer images, else the image's maximum."""
    if image.dtype.kind in "ui":
        return float(np.iinfo(image.dtype).max)
    return float(np.nanmax(image))


def _out(img: np.ndarray, like: np.ndarray, ceiling: float) -> np.ndarray:
    img = np.clip(img, 0, ceiling)
    if like.dtype.kind in "ui":
        img = np.rint(img)
    return img.astype(like.dtype)


def _span(plane: np.ndarray) -> tuple[float, float]:
    """(background, bright signal above it): the 5th and 99.5th percentiles' difference."""
    lo, hi = np.percentile(plane, (5.0, 99.5))
    return float(lo), max(float(hi - lo), 1.0)


def _irregular_blob(
    shape: tuple[int, int], radius: float, rng: np.random.Generator, *, roughness: float = 0.25
) -> np.ndarray:
    """(H, W) in [0, 1]: a star-shaped blob of this mean radius at a random place, soft edge."""
    h, w = shape
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist, theta = np.hypot(xx - cx, yy - cy), np.arctan2(yy - cy, xx - cx)
    r = np.ones_like(dist)
    for k in (2, 3, 5, 7):
        r += rng.normal(0, roughness / np.sqrt(k)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * np.clip(r, 0.4, None)
    edge = max(1.0, 0.08 * radius)
    return expit((r - dist) / edge).astype(np.float32)


def _texture(shape: tuple[int, int], grain: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) granular texture in [0, 1] of grain `grain` pixels."""
    t = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), max(grain, 0.5))
    t = (t - t.min()) / (np.ptp(t) + 1e-8)
    return t


def _channels(n_chan: int, k: int, rng: np.random.Generator) -> list[int]:
    return sorted(int(c) for c in rng.choice(n_chan, size=min(k, n_chan), replace=False))


def blur(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    sigma: float | None = None,
    nucleus_px: float = SYNTH_NUCLEUS_PX,
) -> tuple[np.ndarray, dict]:
    """Defocus: every channel smoothed by a Gaussian of `sigma` px; the removed noise put back."""
    sigma = float(sigma if sigma is not None else rng.uniform(0.15, 0.35) * nucleus_px)
    ceiling = ceiling_of(image)
    out = []
    for ch in image.astype(np.float32):
        out.append(_with_noise(ndi.gaussian_filter(ch, sigma), noise_sigma(ch), rng))
    return _out(np.stack(out), image, ceiling), {"sigma": sigma}


def saturated(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    fraction: float | None = None,
    channels: list[int] | None = None,
    nucleus_px: float = SYNTH_NUCLEUS_PX,
) -> tuple[np.ndarray, dict]:
    """Over-exposure: 1-2 channels' signal above their 1st percentile multiplied by the gain that
    puts `fraction` of their pixels at the ceiling."""
    fraction = float(fraction if fraction is not None else rng.uniform(0.02, 0.12))
    chans = (
        channels if channels is not None else _channels(len(image), int(rng.integers(1, 3)), rng)
    )
    ceiling = ceiling_of(image)
    img = image.astype(np.float32)
    gains = []
    for c in chans:
        base = float(np.percentile(img[c], 1.0))
        top = float(np.quantile(img[c], 1.0 - fraction))
        gain = max((ceiling - base) / max(top - base, 1.0), 1.0)
        img[c] = base + (img[c] - base) * gain
        gains.append(gain)
    return _out(img, image, ceiling), {"fraction": fraction, "channels": chans, "gains": gains}


def debris(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    radius: float | None = None,
    nucleus_px: float = SYNTH_NUCLEUS_PX,
) -> tuple[np.ndarray, dict]:
    """Bright junk: an irregular blob, over the ceiling at its core in every channel."""
    side = min(image.shape[1:])
    radius = float(radius if radius is not None else rng.uniform(0.05, 0.12) * side)
    ceiling = ceiling_of(image)
    blob = _irregular_blob(image.shape[1:], radius, rng)
    tex = 0.7 + 0.6 * _texture(image.shape[1:], 0.1 * radius, rng)
    gain = rng.uniform(1.5, 3.0, len(image)).astype(np.float32) * ceiling
    img = image.astype(np.float32) + (blob * tex)[None] * gain[:, None, None]
    return _out(img, image, ceiling), {"radius": radius}


def _fibre(
    shape: tuple[int, int], length: float, width: float, rng: np.random.Generator
) -> np.ndarray:
    """(H, W) in [0, 1]: a smoothly curving fibre (a random walk of turning steps), `width` px."""
    h, w = shape
    n = max(int(length), 2)
    angle = rng.uniform(0, 2 * np.pi)
    turns = np.cumsum(rng.normal(0, 0.08, n)) + angle
    y = rng.uniform(0.25, 0.75) * h + np.cumsum(np.sin(turns))
    x = rng.uniform(0.25, 0.75) * w + np.cumsum(np.cos(turns))
    line = np.zeros(shape, np.float32)
    ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    line[y[ok].astype(int), x[ok].astype(int)] = 1.0
    line = ndi.gaussian_filter(line, width / 2)
    return line / (line.max() + 1e-8)


def debris_dim(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    brightness: float | None = None,
    nucleus_px: float = SYNTH_NUCLEUS_PX,
) -> tuple[np.ndarray, dict]:
    """Junk that does not saturate: a textured clump or a fibre in 1-3 channels, as bright as
    the cells' upper range, kept below the ceiling."""
    side = min(image.shape[1:])
    brightness = float(brightness if brightness is not None else rng.uniform(0.6, 1.5))
    ceiling = ceiling_of(image)
    shape_kind = "fibre" if rng.random() < 0.4 else "clump"
    if shape_kind == "fibre":
        width = rng.uniform(0.15, 0.35) * nucleus_px
        mask = _fibre(image.shape[1:], rng.uniform(0.5, 0.9) * side, width, rng)
    else:  # larger than a cell: 1.5 to 3 nucleus diameters in radius (at most a quarter side)
        radius = min(rng.uniform(1.5, 3.0) * nucleus_px, 0.25 * side)
        mask = _irregular_blob(image.shape[1:], radius, rng, roughness=0.4)
    pattern = mask * (0.3 + 0.7 * _texture(image.shape[1:], 0.08 * nucleus_px + 0.5, rng))
    pattern /= pattern.max() + 1e-8
    chans = _channels(len(image), int(rng.integers(1, 4)), rng)
    img = image.astype(np.float32)
    for c in chans:
        _, span = _span(img[c])
        img[c] += brightness * span * pattern
    # never at the ceiling: what makes it different from `debris` for a clipped-pixel rule
    img = np.minimum(img, np.maximum(image.astype(np.float32), ceiling - 2))
    return _out(img, image, ceiling), {
        "brightness": brightness,
        "shape": shape_kind,
        "channels": chans,
    }


def autofluorescence(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    brightness: float | None = None,
    nucleus_px: float = SYNTH_NUCLEUS_PX,
) -> tuple[np.ndarray, dict]:
    """Broad smooth glow in several channels (at least 3, all if fewer): 1-2 elliptic blobs."""
    h, w = image.shape[1:]
    brightness = float(brightness if brightness is not None else rng.uniform(0.5, 1.2))
    ceiling = ceiling_of(image)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    glow = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        sy, sx = rng.uniform(0.12, 0.25, 2) * min(h, w)
        glow += np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    glow /= glow.max() + 1e-8
    n_chan = len(image)
    chans = _channels(n_chan, int(rng.integers(min(3, n_chan), n_chan + 1)), rng)
    img = image.astype(np.float32)
    for c in chans:
        _, span = _span(img[c])
        img[c] += brightness * rng.uniform(0.7, 1.3) * span * glow
    img = np.minimum(img, np.maximum(image.astype(np.float32), ceiling - 2))
    return _out(img, image, ceiling), {"brightness": brightness, "channels": chans}


def noise(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    factor: float | None = None,
    nucleus_px: float = SYNTH_NUCLEUS_PX,
) -> tuple[np.ndarray, dict]:
    """A noise burst: each channel's pixel noise multiplied by `factor`."""
    factor = float(factor if factor is not None else rng.uniform(2.0, 4.0))
    ceiling = ceiling_of(image)
    img = image.astype(np.float32)
    for c in range(len(img)):
        img[c] = _with_noise(img[c], factor * noise_sigma(img[c]), rng)
    return _out(img, image, ceiling), {"factor": factor}


def empty(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    nucleus_px: float = SYNTH_NUCLEUS_PX,
) -> tuple[np.ndarray, dict]:
    """No cells: each channel's smooth background (block 10th percentiles) plus its noise."""
    h, w = image.shape[1:]
    ceiling = ceiling_of(image)
    out = []
    n = 8
    for ch in image.astype(np.float32):
        sig = noise_sigma(ch)
        grid = np.array(
            [
                [np.percentile(b, 10.0) for b in np.array_split(row, n, axis=1)]
                for row in np.array_split(ch, n, axis=0)
            ],
            np.float32,
        )
        grid = ndi.median_filter(grid, 3, mode="nearest") + 1.2816 * sig  # 10th pct → mean
        bg = ndi.zoom(grid, (h / n, w / n), order=1, mode="nearest")[:h, :w]
        bg = np.pad(bg, ((0, h - bg.shape[0]), (0, w - bg.shape[1])), mode="edge")
        out.append(ndi.gaussian_filter(bg, max(h, w) / 16) + rng.normal(0, sig, (h, w)))
    return _out(np.stack(out), image, ceiling), {}


PLANTERS: dict[str, Callable[..., tuple[np.ndarray, dict]]] = {
    "blur": blur,
    "saturated": saturated,
    "debris": debris,
    "debris_dim": debris_dim,
    "autofluorescence": autofluorescence,
    "noise": noise,
    "empty": empty,
}


def plant(kind: str, image: np.ndarray, rng: np.random.Generator, **kw) -> tuple[np.ndarray, dict]:
    """Plant one artefact of type `kind` (one of ARTEFACTS) into a (C, H, W) field."""
    if kind not in PLANTERS:
        raise ValueError(f"unknown artefact type {kind!r}; choose from {', '.join(ARTEFACTS)}")
    if image.ndim != 3:
        raise ValueError(f"an artefact is planted into a (C, H, W) field, not shape {image.shape}")
    return PLANTERS[kind](image, rng, **kw)


def pick_sites(
    n_sites: int, kinds: tuple[str, ...], rate: float, seed: int, taken: set[int]
) -> dict[int, str]:
    """{site index: artefact type}: round(rate x n_sites) sites (at least 1) of each type in
    `kinds`, drawn without replacement from the sites not in `taken`."""
    if not kinds or rate <= 0:
        return {}
    per = max(1, int(round(rate * n_sites)))
    free = np.array(sorted(set(range(n_sites)) - taken), int)
    need = per * len(kinds)
    if need > len(free):
        raise ValueError(
            f"synth.artefact_rate={rate:g} asks for {per} sites of each of {len(kinds)} artefact "
            f"types ({need}) but the screen has {len(free)} sites free of other planted failures: "
            "lower synth.artefact_rate, name fewer synth.artefacts, or draw more sites"
        )
    chosen = np.random.default_rng([seed, 37]).choice(free, size=need, replace=False)
    return {int(i): kinds[j // per] for j, i in enumerate(chosen)}


# ---------------------------------------------------------------------------------------------
# Real fields: the 7 Cell Painting sites of ../shared/data/cellpainting_fovs (data README)
# ---------------------------------------------------------------------------------------------

# (site name, [(channel name, file path relative to the fovs folder)], nucleus diameter px)
_PED = "pediatric_cancer_atlas_profiling/images/orig/r03c03f03p01-ch{}sk1fk1fl1.tiff"
_JUMP = "JUMP_plate_BR00117006/images/orig/r01c01f01p01-ch{}sk1fk1fl1.tiff"
_NF1_WELLS = ("B7", "D6", "D7", "F7", "H12")


def real_sites(fovs_dir: str | Path) -> list[dict]:
    """The 7 real sites: [{site, source, channels, image (C, H, W) uint16, nucleus_px}], with the
    channels DNA first then two cytoplasmic ones (3 channels each, so one model embeds all)."""
    from celldino.io.images import read_image

    root = Path(fovs_dir)
    specs = [
        (
            "pediatric_r03c03f03",
            "pediatric",
            [("DNA", _PED.format(5)), ("RNA", _PED.format(6)), ("AGP", _PED.format(3))],
            40.0,
        ),
        (
            "jump_BR00117006_r01c01f01",
            "jump",
            [("DNA", _JUMP.format(5)), ("RNA", _JUMP.format(3)), ("AGP", _JUMP.format(2))],
            30.0,
        ),
    ]
    nf1 = root / "NF1_cellpainting_data_shrunken" / "Plate_2_images"
    for well in _NF1_WELLS:
        files = {ch: sorted(nf1.glob(f"*{well}*_{ch}_001.tif")) for ch in ("DAPI", "GFP", "RFP")}
        chans = [(ch, str(files[ch][0].relative_to(root))) for ch in ("DAPI", "GFP", "RFP")]
        specs.append((f"nf1_{well}", "nf1", chans, 40.0))
    out = []
    for site, source, chans, nuc in specs:
        image = np.stack([read_image(root / rel) for _, rel in chans])
        out.append(
            {
                "site": site,
                "source": source,
                "channels": [c for c, _ in chans],
                "image": image,
                "nucleus_px": nuc,
            }
        )
    return out


def plant_real(
    sites: list[dict],
    kinds: tuple[str, ...] = REAL_ARTEFACTS,
    *,
    copies: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Each site's clean original (kind 'ok') and `copies` planted copies of it per type:
    [{site, source, kind, copy, image, info}]. Copy c of type k of site i is drawn from
    default_rng([seed, 43, i, k index, c]): the same bytes for a seed."""
    out = []
    for i, s in enumerate(sites):
        out.append({**_meta(s), "kind": "ok", "copy": 0, "image": s["image"], "info": {}})
        for kind in kinds:
            for c in range(copies):
                rng = np.random.default_rng([seed, 43, i, ARTEFACTS.index(kind), c])
                img, info = plant(kind, s["image"], rng, nucleus_px=s["nucleus_px"])
                out.append({**_meta(s), "kind": kind, "copy": c, "image": img, "info": info})
    return out


def _meta(site: dict) -> dict:
    return {k: site[k] for k in ("site", "source", "channels", "nucleus_px", "sub") if k in site}
