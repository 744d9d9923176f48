"""Training schedules as pure functions of the optimisation step (no state, resumable).

Conventions follow the DINO reference code: a linear warm-up from `start` to `base` over
`warmup_steps`, then a half cosine from `base` to `final` over the remaining steps, so that the
last step (`total_steps - 1`) is as close to `final` as the reference's table gives.
"""

from __future__ import annotations

import math


def cosine(
    step: int,
    *,
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    start: float = 0.0,
) -> float:
    """Linear warm-up start→base over `warmup_steps`, then cosine base→final until total_steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return start + (base - start) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return final if warmup_steps > 0 else base
    t = min(step - warmup_steps, decay_steps) / decay_steps
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def learning_rate(
    step: int,
    *,
    base_lr: float,
    min_lr: float,
    total_steps: int,
    warmup_steps: int,
) -> float:
    """Linear warm-up 0 → base_lr, then cosine base_lr → min_lr."""
    return cosine(
        step, base=base_lr, final=min_lr, total_steps=total_steps, warmup_steps=warmup_steps
    )


def weight_decay(step: int, *, base: float, final: float, total_steps: int) -> float:
    """Cosine weight decay base → final (DINO: 0.04 → 0.4)."""
    return cosine(step, base=base, final=final, total_steps=total_steps)


def teacher_momentum(step: int, *, base: float, total_steps: int) -> float:
    """EMA momentum of the teacher: cosine base (0.996) → 1."""
    return cosine(step, base=base, final=1.0, total_steps=total_steps)


def teacher_temperature(step: int, *, warmup_temp: float, temp: float, warmup_steps: int) -> float:
    """Teacher temperature: linear warmup_temp → temp over warmup_steps, then constant."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return temp
    return warmup_temp + (temp - warmup_temp) * step / warmup_steps


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule of DINO: lr = base_lr × global_batch / 256."""
    return base_lr * global_batch / 256.0
