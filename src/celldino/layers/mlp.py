"""The transformer feed-forward block (`fc1` → GELU → `fc2`, names of the DINO releases)."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) → (..., out)
        h = self.fc1(x)  # (..., hidden)
        if torch.is_grad_enabled():
            h = self.act(h)
        else:  # inference: GELU in place, saving the largest allocation of the block
            torch.ops.aten.gelu_(h)
        return self.drop(self.fc2(self.drop(h)))
