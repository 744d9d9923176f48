"""The planted biology of the synthetic screen: mechanisms of action and the factors they move.

Each MoA moves a known set of phenotype factors; each of its compounds has its own potency (and a
small compound-specific side effect), and dose scales the effect. Cells vary around the
treatment's mean, so single cells overlap while well averages separate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Phenotype factors every cell carries (the ground truth). Defaults are the DMSO phenotype.
FACTORS: dict[str, float] = {
    "nucleus_scale": 1.0,  # nucleus radius relative to the reference nucleus
    "nucleus_elongation": 1.15,  # ratio of nucleus long to short axis
    "cell_scale": 1.0,  # cell body radius relative to the reference cell
    "int_DNA": 1.0,  # multiplicative intensity per channel
    "int_ER": 1.0,
    "int_RNA": 1.0,
    "int_AGP": 1.0,
    "int_Mito": 1.0,
    "er_coarseness": 0.0,  # 0 = fine reticular ER, 1 = coarse, clumped ER
    "mito_perinuclear": 0.0,  # 0 = mitochondria spread through the cytoplasm, 1 = packed round the nucleus
    "actin_cortical": 1.0,  # strength of the cortical actin ring relative to fibres
    "nucleoli_count": 3.0,  # mean number of nucleoli
    "mitotic_fraction": 0.05,  # probability that a cell is in mitosis
}


@dataclass(frozen=True)
class MoA:
    name: str  # mechanism-of-action label
    effects: dict[str, float]  # factor → change at full effect (added to the DMSO value)


# Each MoA moves a distinct set of factors; the first ones are used by small presets.
MOAS: tuple[MoA, ...] = (
    MoA("DNA damage", {"nucleus_scale": 0.45, "int_DNA": 0.6, "nucleus_elongation": 0.25}),
    MoA("Microtubule destabiliser", {"mitotic_fraction": 0.45, "cell_scale": -0.2, "int_AGP": 0.5}),
    MoA("ER stress", {"int_ER": 1.0, "er_coarseness": 0.9}),
    MoA("Mitochondrial uncoupler", {"int_Mito": -0.55, "mito_perinuclear": 0.9}),
    MoA("Actin disruptor", {"actin_cortical": -0.8, "cell_scale": -0.25, "int_AGP": -0.4}),
    MoA("Protein synthesis", {"int_RNA": -0.55, "nucleoli_count": -1.8, "nucleus_scale": -0.15}),
)

CONTROL_COMPOUND = "DMSO"
CONTROL_MOA = "control"


@dataclass(frozen=True)
class Treatment:
    compound: str  # compound name ('DMSO' for the negative control)
    moa: str  # mechanism of action ('control' for DMSO)
    dose: float  # concentration in uM (0 for DMSO)
    strength: float  # 0..~1.2: fraction of the MoA's full effect this treatment reaches
    side_factor: str  # factor of a small compound-specific side effect ('' for none)
    side_effect: float  # size of that side effect


def make_treatments(
    n_moas: int, compounds_per_moa: int, doses: tuple[float, ...], rng: np.random.Generator
) -> list[Treatment]:
    """MoA × compound × dose treatments plus the DMSO control, with potencies drawn from rng."""
    if not 1 <= n_moas <= len(MOAS):
        raise ValueError(f"n_moas must be between 1 and {len(MOAS)}, got {n_moas}")
    out = [Treatment(CONTROL_COMPOUND, CONTROL_MOA, 0.0, 0.0, "", 0.0)]
    dmax = max(doses)
    factor_names = list(FACTORS)
    for m, moa in enumerate(MOAS[:n_moas]):
        for c in range(compounds_per_moa):
            potency = float(rng.uniform(0.75, 1.2))
            side = factor_names[int(rng.integers(len(factor_names) - 1))]
            side_size = float(rng.uniform(-0.1, 0.1))
            name = f"{moa.name.split()[0][:4].upper()}-{m + 1}{chr(ord('a') + c)}"
            for d in doses:
                # Hill-like response: the highest dose reaches `potency`, lower doses less.
                frac = (d / dmax) ** 0.7
                out.append(
                    Treatment(name, moa.name, float(d), potency * frac, side, side_size * frac)
                )
    return out


def treatment_factors(t: Treatment) -> dict[str, float]:
    """Mean factors of a treatment's cells."""
    f = dict(FACTORS)
    moa = next((m for m in MOAS if m.name == t.moa), None)
    if moa is not None:
        for k, v in moa.effects.items():
            f[k] += v * t.strength
    if t.side_factor:
        f[t.side_factor] += t.side_effect
    f["mitotic_fraction"] = float(np.clip(f["mitotic_fraction"], 0.0, 0.9))
    f["er_coarseness"] = float(np.clip(f["er_coarseness"], 0.0, 1.0))
    f["mito_perinuclear"] = float(np.clip(f["mito_perinuclear"], 0.0, 1.0))
    return f


def sample_cell_factors(mean: dict[str, float], rng: np.random.Generator) -> dict[str, float]:
    """One cell's factors: the treatment mean plus biological cell-to-cell variability."""
    f = {}
    for k, v in mean.items():
        if k.startswith("int_") or k.endswith("_scale"):
            f[k] = float(v * np.exp(rng.normal(0, 0.12 if k.startswith("int_") else 0.08)))
        elif k == "nucleoli_count":
            f[k] = float(max(0, rng.poisson(max(v, 0.2))))
        elif k == "mitotic_fraction":
            f[k] = v
        else:
            f[k] = float(
                np.clip(v + rng.normal(0, 0.08), 0.0 if k != "nucleus_elongation" else 1.0, 3.0)
            )
    return f
