"""KoLeo regulariser (Sablayrolles et al. 2019; used by DINOv2), torch only.

Spreads the L2-normalised embeddings of a batch: −mean_i log(min_{j≠i} ||x_i − x_j|| + eps).
Uniformly spread features have large nearest-neighbour distances, a collapsed batch has none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, D) -> scalar
        if x.shape[0] < 2:
            return x.new_zeros(())
        x = F.normalize(x.float(), dim=-1, eps=self.eps)
        with torch.no_grad():
            dots = x @ x.t()  # (B, B)
            dots.fill_diagonal_(-2.0)  # never pick yourself
            nn_idx = dots.argmax(dim=1)  # nearest neighbour on the sphere
        dist = torch.linalg.vector_norm(x - x[nn_idx], dim=-1)  # (B,)
        return -torch.log(dist + self.eps).mean()
