"""Synthetic DNA fields with ground-truth nuclei, from sparse to confluent (segmentation benchmarks).

`nuclei_field(n, diameter, touching)` draws `n` nuclei of a typical equivalent diameter on a
`size`² field and returns (image, labels). Each nucleus is an ellipse (equivalent diameter
log-normal around `diameter`, CV 12 %; axis ratio 1 to 1.6) with its own brightness (log-normal,
CV about 35 %), a dome profile (brighter in the thick middle), chromatin texture and a few dim
nucleoli; a fraction `touching` of the nuclei are placed against an already placed one (their
outlines overlap by 5-25 % of the radii; each pixel of the overlap belongs to the nucleus whose
centre is relatively nearer, as squeezed neighbours look), the others at least a small gap from
every nucleus. Then optics and camera: a 1 px Gaussian blur, an uneven background (a smooth field
+-20 % and a linear ramp +-25 % on a level of 3-15 % of the median nucleus brightness), Poisson photon noise and Gaussian
read noise, and a few small specks of debris (not in the labels).

Fields at more than about 55 % area coverage cannot be drawn with the requested gaps; `n` is then
lowered to what fits (the returned labels say how many were drawn). Coverage of `n` discs of the
diameter on the field: `coverage(n, diameter, size)`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

PHOTONS = 800.0  # median nucleus brightness (photons per pixel)
READ_NOISE = 6.0
MAX_COVERAGE = 0.55


def coverage(n: int, diameter: float, size: int = 512) -> float:
    """Fraction of the field covered by n discs of the given diameter."""
    return n * np.pi * (diameter / 2) ** 2 / size**2


def _smooth_noise(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (f - f.mean()) / (f.std() + 1e-8)


def _place(n, radii, touching, size, rng):
    """Centres (y, x) of up to n nuclei; touching ones overlap an already placed neighbour."""
    centres: list[tuple[float, float]] = []
    rs: list[float] = []
    gap = lambda r: max(2.0, 0.15 * 2 * r)  # noqa: E731
    for i in range(n):
        r = radii[i]
        placed = False
        want_touch = bool(centres) and rng.random() < touching
        for attempt in range(300):
            touch = want_touch or attempt >= 150  # crowded: fall back to touching placement
            if touch and centres:
                j = int(rng.integers(len(centres)))
                phi = rng.uniform(0, 2 * np.pi)
                d = (rs[j] + r) * (1.0 - rng.uniform(0.0, 0.15))
                cy, cx = centres[j][0] + d * np.sin(phi), centres[j][1] + d * np.cos(phi)
            else:
                j = -1
                cy, cx = rng.uniform(r, size - r, 2)
            if not (r * 0.5 <= cy <= size - r * 0.5 and r * 0.5 <= cx <= size - r * 0.5):
                continue
            if centres:
                c = np.asarray(centres)
                dist = np.hypot(c[:, 0] - cy, c[:, 1] - cx)
                need = np.asarray(rs) + r
                if touch:
                    # only the chosen neighbour may overlap; others at most touch
                    ok = np.ones(len(centres), bool)
                    ok[j] = True
                    others = np.arange(len(centres)) != j
                    ok[others] = dist[others] >= 0.95 * need[others]
                    if not ok.all():
                        continue
                elif np.any(dist < need + gap(r)):
                    continue
            centres.append((float(cy), float(cx)))
            rs.append(float(r))
            placed = True
            break
        if not placed:
            break
    return centres


def nuclei_field(
    n: int,
    diameter: float,
    touching: float = 0.3,
    *,
    size: int = 512,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (size, size) camera counts, labels int32 (size, size)) of one DNA field."""
    rng = np.random.default_rng(seed)
    n = int(min(n, np.floor(MAX_COVERAGE * size**2 / (np.pi * (diameter / 2) ** 2))))
    radii = diameter / 2 * np.exp(rng.normal(0, 0.12, n))
    centres = _place(n, radii, touching, size, rng)
    shape = (size, size)
    labels = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf, np.float32)  # the relative distance of the owning nucleus
    signal = np.zeros(shape, np.float32)
    chrom = _smooth_noise(shape, max(0.8, diameter / 12), rng)
    nucleoli = np.zeros(shape, np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bright = np.exp(rng.normal(0, 0.35, len(centres)))
    for i, (cy, cx) in enumerate(centres):
        r = radii[i]
        elong = rng.uniform(1.0, 1.6)
        a, b = r * np.sqrt(elong), r / np.sqrt(elong)
        ang = rng.uniform(0, np.pi)
        h = int(np.ceil(a)) + 3
        y0, y1 = max(0, int(cy) - h), min(size, int(cy) + h + 1)
        x0, x1 = max(0, int(cx) - h), min(size, int(cx) + h + 1)
        win = (slice(y0, y1), slice(x0, x1))
        dy, dx = yy[win] - cy, xx[win] - cx
        u = dx * np.cos(ang) + dy * np.sin(ang)
        v = -dx * np.sin(ang) + dy * np.cos(ang)
        ell = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        own = (ell <= 1.0) & (ell < best[win])
        best[win][own] = ell[own]
        labels[win][own] = i + 1
        # dome: the middle of a nucleus is thicker, so brighter; soft edge over about 1 px
        profile = (1.0 - 0.3 * np.clip(ell, 0, 1) ** 2) / (1 + np.exp((ell - 1.0) * r * 2.0))
        signal[win][own] = (bright[i] * profile)[own]
        for _ in range(int(rng.integers(0, 4)) if r > 6 else 0):  # dim nucleoli
            t, s = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
            py, px = cy + s * r * np.sin(t), cx + s * r * np.cos(t)
            sig = max(0.8, r * rng.uniform(0.08, 0.16))
            nucleoli[win] += np.exp(-((yy[win] - py) ** 2 + (xx[win] - px) ** 2) / (2 * sig**2))
    inside = labels > 0
    signal = signal * (1.0 + 0.2 * chrom) * (1.0 - 0.45 * np.clip(nucleoli, 0, 1))
    signal = np.where(inside, signal, 0.0).astype(np.float32)
    signal = ndi.gaussian_filter(signal, 1.0)  # optics
    level = rng.uniform(0.03, 0.15)
    phi = rng.uniform(0, 2 * np.pi)  # a linear ramp of +-25 % across the field
    ramp = ((yy - size / 2) * np.sin(phi) + (xx - size / 2) * np.cos(phi)) / size
    bg = level * (1.0 + 0.2 * _smooth_noise(shape, size / 6, rng) + 0.5 * ramp)
    photons = PHOTONS * (signal + np.clip(bg, 0.01, None))
    for _ in range(int(rng.integers(2, 8))):  # debris specks, far smaller than a nucleus
        py, px = rng.uniform(0, size, 2)
        photons += PHOTONS * 1.5 * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * 0.8**2))
    img = rng.poisson(photons).astype(np.float32) + rng.normal(100, READ_NOISE, shape)
    return img.astype(np.float32), labels


def touching_fraction(labels: np.ndarray) -> float:
    """Fraction of the labelled objects that share a border (8-connected) with another one."""
    lab = np.asarray(labels)
    n = int(lab.max())
    if n == 0:
        return 0.0
    dil = ndi.grey_dilation(lab, size=(3, 3))
    ero = -ndi.grey_dilation(-np.where(lab > 0, lab, n + 1), size=(3, 3))
    touch = (lab > 0) & (((dil != lab) & (dil > 0)) | ((ero != lab) & (ero <= n)))
    return float(np.unique(lab[touch]).size) / float(np.unique(lab[lab > 0]).size)
