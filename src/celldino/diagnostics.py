"""Training-health diagnostics shared by the training loop and the report (no dependencies)."""

from __future__ import annotations

import math


def collapse_message(teacher_entropy: float, out_dim: int, embedding_std: float) -> str | None:
    """A clear warning when the diagnostics say training collapsed, or None."""
    log_k = math.log(out_dim)
    if embedding_std < 0.05:
        kind = (
            "uniform teacher (entropy ~ log(out_dim))"
            if teacher_entropy > 0.95 * log_k
            else "one dominant output (entropy ~ 0)"
            if teacher_entropy < 0.05 * log_k
            else "identical embeddings"
        )
        return (
            f"training looks COLLAPSED: {kind}; embedding std {embedding_std:.3f} (healthy ~1), "
            f"teacher entropy {teacher_entropy:.3f} of max {log_k:.2f}. Try: lower train.lr, "
            "lower train.teacher_temp (sharper teacher), raise train.center_momentum, more "
            "augmentation, model.out_dim smaller than the number of images, or the KoLeo "
            "regulariser (train.koleo_weight=0.1, as the tiny and demo configs use)."
        )
    if teacher_entropy < 0.01 * log_k:
        return (
            f"training looks COLLAPSED to one output dimension: teacher entropy "
            f"{teacher_entropy:.4f} (max {log_k:.2f}). Try raising train.center_momentum "
            "closer to 1 or lowering train.lr."
        )
    return None
