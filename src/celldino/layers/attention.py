"""Multi-head self-attention with a fused qkv projection (DINO / DINOv2 parameter names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Self-attention over tokens; `qkv` and `proj` as in the DINO and DINOv2 releases.

    The fast path is `F.scaled_dot_product_attention`. When the attention maps are requested the
    softmax(q k^T / sqrt(d)) matrix is computed explicitly (only where asked: the ViT asks for
    the last block alone).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dimension {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape  # (B, N, D)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        drop = self.attn_drop if self.training else 0.0
        attn = None
        if return_attention:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
            probs = F.dropout(attn, drop) if drop > 0 else attn
            out = probs @ v  # (B, H, N, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, D)
        return self.proj_drop(self.proj(out)), attn
