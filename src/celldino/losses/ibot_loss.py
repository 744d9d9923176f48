"""iBOT masked patch-token loss (Zhou et al. 2022; DINOv2's second term), torch only.

The student sees global crops with some patches masked; the teacher sees them unmasked. For every
masked patch the student's patch-token distribution is pulled towards the teacher's centred,
sharpened patch-token distribution. The loss is averaged over the masked patches of each image,
then over images. A separate running centre is kept for patch tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from celldino.losses.dino_loss import CENTERINGS, _all_reduce_sum, sinkhorn_knopp


class iBOTPatchLoss(nn.Module):
    """forward(student_patch (M, K), teacher_patch (M, K), mask_weight (M,), teacher_temp).

    `student_patch` / `teacher_patch` hold the head outputs of the M masked patches of all
    images; `mask_weight[m]` is 1 / (number of masked patches of the image patch m belongs to),
    so summing weight × cross-entropy and dividing by the number of images gives the
    per-image mean.
    """

    def __init__(
        self,
        out_dim: int,
        *,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
    ) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering={centering!r}: one of {', '.join(CENTERINGS)}")
        self.centering = centering
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # (1, K)

    def forward(
        self,
        student_patch: torch.Tensor,  # (M, K)
        teacher_patch: torch.Tensor,  # (M, K)
        mask_weight: torch.Tensor,  # (M,)
        teacher_temp: float,
        *,
        n_images: int,
        update_center: bool = True,
    ) -> torch.Tensor:
        if self.centering == "sinkhorn_knopp":  # DINOv2: the masked patches normalised together
            q = sinkhorn_knopp(teacher_patch, teacher_temp)
        else:
            q = F.softmax((teacher_patch.detach().float() - self.center) / teacher_temp, dim=-1)
        logp = F.log_softmax(student_patch.float() / self.student_temp, dim=-1)
        ce = torch.sum(-q * logp, dim=-1)  # (M,)
        loss = (ce * mask_weight).sum() / max(n_images, 1)
        if update_center and self.centering == "center":
            self.update_center(teacher_patch)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_patch: torch.Tensor) -> None:
        stats = torch.cat(
            [
                teacher_patch.detach().float().sum(dim=0),
                teacher_patch.new_tensor([teacher_patch.shape[0]], dtype=torch.float32),
            ]
        )  # (K+1,): sum and count, reduced together
        stats, _ = _all_reduce_sum(stats)
        count = stats[-1].clamp_min(1.0)
        batch_center = (stats[:-1] / count).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
