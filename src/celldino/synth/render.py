"""Rendering one field of view: cells with nuclei, organelle textures per channel, optics, noise.

Each site is drawn in photon units as float32 signal per channel, then the technical variation is
applied (plate scale, vignetting, well background offset, optional defocus or debris) and
Poisson + read noise turn it into uint16 camera counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

# Channel kinds the renderer knows; other channel names reuse these patterns in turn.
KINDS = ("DNA", "ER", "RNA", "AGP", "Mito", "Protein")
BRIGHTNESS = {
    "DNA": 1400.0,
    "ER": 450.0,
    "RNA": 550.0,
    "AGP": 650.0,
    "Mito": 600.0,
    "Protein": 500.0,
}
LOCALISATIONS = ("nucleus", "nucleoli", "cytoplasm", "membrane", "puncta")

CELL_RADIUS = 15.0  # reference cell body radius in pixels
NUCLEUS_RADIUS = 6.5  # reference nucleus radius in pixels
BACKGROUND = 60.0  # photons per pixel of background before vignetting
READ_NOISE = 4.0  # camera read noise (counts, Gaussian)
CAMERA_OFFSET = 100  # camera bias added to every pixel (counts)


def channel_kind(name: str, index: int) -> str:
    """The texture pattern a channel is drawn with: its own if known, else a cycled one."""
    if name in KINDS:
        return name
    return KINDS[1 + index % 4]  # ER, RNA, AGP, Mito in turn


@dataclass
class CellSpec:
    cx: float  # cell centre x (pixels)
    cy: float  # cell centre y
    factors: dict  # phenotype factors of this cell
    mitotic: bool  # in mitosis (rounded, condensed chromatin)
    localisation: str  # protein localisation class ('' when there is no protein channel)


def _norm(field: np.ndarray) -> np.ndarray:
    return (field - field.mean()) / (field.std() + 1e-8)


class SiteTextures:
    """Whole-field texture fields shared by the cells of one site (drawn once, cheap per cell)."""

    def __init__(self, size: int, rng: np.random.Generator):
        shape = (size, size)
        white = rng.standard_normal(shape).astype(np.float32)
        self.fine = _norm(ndi.gaussian_filter(white, 1.0))
        band = _norm(ndi.gaussian_filter(white, 1.3) - ndi.gaussian_filter(white, 3.0))
        self.reticular = np.exp(-((band / 0.35) ** 2))  # thin network lines where band ≈ 0
        coarse = _norm(ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3.5))
        self.clumps = np.clip(coarse, 0, None) ** 1.5
        self.puncta = self._dots(shape, 0.06, 0.9, rng)
        self.puncta_protein = self._dots(shape, 0.02, 1.0, rng)
        stripes_noise = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4.0)
        self.stripe_phase = _norm(stripes_noise) * 0.6

    @staticmethod
    def _dots(shape, density: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
        dots = (rng.random(shape) < density).astype(np.float32)
        out = ndi.gaussian_filter(dots, sigma)
        return out / (out.max() + 1e-8)


def render_site(
    size: int,
    cells: list[CellSpec],
    kinds: list[str],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Draw the cells of one site.

    Returns (signal (C, H, W) float32 photons, nuclei labels (H, W), cell labels (H, W),
    per-cell measurements [{nucleus_area, cell_area, nucleus_x, nucleus_y}]). Label i+1 is
    cells[i]; a later cell occludes an earlier one where they overlap.
    """
    tex = SiteTextures(size, rng)
    signal = np.zeros((len(kinds), size, size), np.float32)
    nuc_lab = np.zeros((size, size), np.int32)
    cell_lab = np.zeros((size, size), np.int32)
    yy_full, xx_full = np.mgrid[0:size, 0:size].astype(np.float32)
    for i, cell in enumerate(cells):
        f = cell.factors
        rc = CELL_RADIUS * f["cell_scale"] * (0.72 if cell.mitotic else 1.0)
        half = int(rc * 1.5) + 3
        x0, x1 = max(0, int(cell.cx) - half), min(size, int(cell.cx) + half + 1)
        y0, y1 = max(0, int(cell.cy) - half), min(size, int(cell.cy) + half + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        win = (slice(y0, y1), slice(x0, x1))
        dx, dy = xx_full[win] - cell.cx, yy_full[win] - cell.cy
        dist, theta = np.hypot(dx, dy), np.arctan2(dy, dx)

        # Cell body: a star-shaped outline (low harmonics), round in mitosis.
        wobble = 0.0
        if not cell.mitotic:
            for k in (2, 3, 4):
                wobble = wobble + rng.normal(0, 0.09 / k * 2) * np.cos(
                    k * theta + rng.uniform(0, 2 * np.pi)
                )
        radius = rc * (1 + wobble)
        cell_mask = dist <= radius
        edge_dist = radius - dist  # > 0 inside, distance to the membrane

        # Nucleus: a rotated ellipse, off-centre in interphase, condensed in mitosis.
        rn = NUCLEUS_RADIUS * f["nucleus_scale"] * (0.7 if cell.mitotic else 1.0)
        elong = 2.2 if cell.mitotic else f["nucleus_elongation"]
        ang = rng.uniform(0, np.pi)
        off = rng.normal(0, 0.12 * rc, 2) if not cell.mitotic else np.zeros(2)
        ux = (dx - off[0]) * np.cos(ang) + (dy - off[1]) * np.sin(ang)
        uy = -(dx - off[0]) * np.sin(ang) + (dy - off[1]) * np.cos(ang)
        a, b = rn * np.sqrt(elong), rn / np.sqrt(elong)
        ell = np.sqrt((ux / a) ** 2 + (uy / b) ** 2)  # 1 on the nuclear envelope
        nuc_soft = 1 / (1 + np.exp((ell - 1) * 12))
        nuc_mask = (ell <= 1) & cell_mask
        nuc_dist = np.clip(ell - 1, 0, None) * rn  # ≈ distance from the nucleus (pixels)
        cyto_soft = cell_mask * (1 - nuc_soft)

        # Nucleoli: bright spots inside the nucleus (RNA channel).
        nucleoli = np.zeros_like(dist)
        if not cell.mitotic:
            for _ in range(int(f["nucleoli_count"])):
                r_ = rng.uniform(0, 0.55)
                t_ = rng.uniform(0, 2 * np.pi)
                px = off[0] + r_ * a * np.cos(t_) * np.cos(ang) - r_ * b * np.sin(t_) * np.sin(ang)
                py = off[1] + r_ * a * np.cos(t_) * np.sin(ang) + r_ * b * np.sin(t_) * np.cos(ang)
                nucleoli += np.exp(-((dx - px) ** 2 + (dy - py) ** 2) / (2 * 1.1**2))

        fine, retic, clumps = tex.fine[win], tex.reticular[win], tex.clumps[win]
        for c, kind in enumerate(kinds):
            if kind == "DNA":
                chrom = 1.0 + 0.25 * fine + (1.4 if cell.mitotic else 0.0)
                layer = nuc_soft * cell_mask * chrom
            elif kind == "ER":
                c_ = f["er_coarseness"]
                pattern = (1 - c_) * retic * 1.3 + c_ * clumps * 1.6 + 0.15
                layer = cyto_soft * pattern * (0.35 + np.exp(-nuc_dist / (0.45 * rc)))
            elif kind == "RNA":
                layer = nuc_soft * cell_mask * (0.35 + 2.2 * nucleoli) + cyto_soft * 0.22 * (
                    1 + 0.3 * fine
                )
            elif kind == "AGP":
                ring = np.exp(-(np.clip(edge_dist, 0, None) ** 2) / (2 * 1.6**2)) * cell_mask
                fib_ang = rng.uniform(0, np.pi) if c == kinds.index("AGP") else ang
                phase = (dx * np.cos(fib_ang) + dy * np.sin(fib_ang)) / 3.0 + tex.stripe_phase[win]
                fibres = np.clip(np.cos(2 * np.pi * phase), 0, None) ** 3
                cort = np.clip(f["actin_cortical"], 0, 2)
                layer = cort * 1.6 * ring + (1.25 - 0.5 * cort) * 0.6 * fibres * cell_mask
                if cell.mitotic:
                    layer = layer + 0.8 * cell_mask
            elif kind == "Mito":
                p = f["mito_perinuclear"]
                radial = (1 - p) * 0.8 + p * 3.2 * np.exp(-nuc_dist / 3.0)
                layer = cyto_soft * tex.puncta[win] * 2.0 * radial
            else:  # Protein: HPA-like localisation classes
                loc = cell.localisation
                if loc == "nucleus":
                    layer = nuc_soft * cell_mask * (1 + 0.3 * fine)
                elif loc == "nucleoli":
                    layer = nuc_soft * cell_mask * (0.1 + 2.5 * nucleoli)
                elif loc == "cytoplasm":
                    layer = cyto_soft * (0.7 + 0.2 * fine)
                elif loc == "membrane":
                    layer = (
                        np.exp(-(np.clip(edge_dist, 0, None) ** 2) / (2 * 1.2**2)) * cell_mask * 1.5
                    )
                else:  # puncta
                    layer = cyto_soft * tex.puncta_protein[win] * 3.0
            intensity = f.get(f"int_{kind}", 1.0)
            signal[c][win] += BRIGHTNESS[kind] * intensity * np.clip(layer, 0, None)

        cell_lab[win][cell_mask] = i + 1
        nuc_lab[win][nuc_mask] = i + 1

    info = []
    nuc_areas = np.bincount(nuc_lab.ravel(), minlength=len(cells) + 1)
    cell_areas = np.bincount(cell_lab.ravel(), minlength=len(cells) + 1)
    cms = ndi.center_of_mass(nuc_lab > 0, nuc_lab, np.arange(1, len(cells) + 1)) if cells else []
    for i in range(len(cells)):
        cy_, cx_ = cms[i] if nuc_areas[i + 1] > 0 else (np.nan, np.nan)
        info.append(
            {
                "nucleus_area": int(nuc_areas[i + 1]),
                "cell_area": int(cell_areas[i + 1]),
                "nucleus_x": float(cx_),
                "nucleus_y": float(cy_),
            }
        )
    return signal, nuc_lab, cell_lab, info


def camera(
    signal: np.ndarray,
    *,
    channel_scale: np.ndarray,
    offset: np.ndarray,
    vignette: float,
    vignette_centre: tuple[float, float],
    defocus: float,
    debris: tuple[float, float, float] | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Optics and detector: scale, vignetting, background, defocus, debris, noise → uint16."""
    c, h, w = signal.shape
    img = signal * channel_scale[:, None, None]
    if defocus > 0:
        img = np.stack([ndi.gaussian_filter(ch, defocus) for ch in img])
    if debris is not None:
        dx, dy, dr = debris
        yy, xx = np.mgrid[0:h, 0:w]
        blob = np.exp(-((((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * dr**2)) ** 2))
        img = img + blob[None] * 90000.0  # bright enough to saturate the camera
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((xx - vignette_centre[0]) ** 2 + (yy - vignette_centre[1]) ** 2) / (0.5 * (h**2 + w**2))
    vig = (1 - vignette * r2).astype(np.float32)
    photons = (img + BACKGROUND + offset[:, None, None]) * vig[None]
    counts = rng.poisson(np.clip(photons, 0, None)).astype(np.float32)
    counts += rng.normal(0, READ_NOISE, counts.shape).astype(np.float32) + CAMERA_OFFSET
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
