"""DINO projection head: MLP → L2-normalise → weight-normalised linear layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias, weight = g · v / ||v|| per output unit (`weight_g`, `weight_v`).

    The parameter names and shapes are those of `torch.nn.utils.weight_norm` as saved in the
    official DINO checkpoints (`last_layer.weight_g` (out, 1), `last_layer.weight_v` (out, in)).
    With `fix_norm` (DINO's `norm_last_layer=True`) g is a constant buffer of ones.
    """

    def __init__(self, in_features: int, out_features: int, fix_norm: bool = True) -> None:
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=5**0.5)  # nn.Linear's default initialisation
        self.weight_v = nn.Parameter(v)
        g = torch.ones(out_features, 1)
        if fix_norm:
            self.register_buffer("weight_g", g)
        else:
            self.weight_g = nn.Parameter(g)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torch.nn.utils.parametrizations.weight_norm layout → weight_g / weight_v
        for old, new in (("original0", "weight_g"), ("original1", "weight_v")):
            key = f"{prefix}parametrizations.weight.{old}"
            if key in state_dict:
                state_dict[prefix + new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * F.normalize(self.weight_v, dim=1)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """`nlayers`-layer MLP with GELU, bottleneck, L2 normalisation and a weight-normed last layer.

    (..., in_dim) → (..., out_dim). Parameter names follow the DINO release (`mlp.0`, `mlp.2`, ...,
    `last_layer.weight_g`, `last_layer.weight_v`) so official heads load without renaming.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (..., bottleneck)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)  # (..., out_dim)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)  # = DINO trunc_normal_ (cut at ±2 = 100 std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
