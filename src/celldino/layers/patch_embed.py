"""Patch embeddings: one convolution over all channels, or one per channel (channel-adaptive)."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) → (B, N, D) with N = (H/p)·(W/p); `proj` as in the DINO releases."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"the model takes {self.in_chans} channels but the images have {x.shape[1]} "
                "(build the model with in_chans matching the data, or use channel_adaptive)"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) → (B, N, D)


class ChannelAdaptivePatchEmbed(nn.Module):
    """Each channel patchified alone by one shared projection plus a learned channel embedding.

    (B, C, H, W) with `channel_ids` (C,) or (B, C) indices into the channel table → (B, C·N, D):
    the N tokens of channel 0, then those of channel 1, ... Any subset and order of the
    `num_chans` known channels works.
    """

    def __init__(self, patch_size: int = 16, num_chans: int = 5, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_chans = num_chans
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.channel_embed = nn.Parameter(torch.zeros(num_chans, embed_dim))
        nn.init.normal_(self.channel_embed, std=0.02)  # = DINO trunc_normal_ (cut at ±2 = 100 std)

    def channel_ids_for(self, x: torch.Tensor, channel_ids: torch.Tensor | None) -> torch.Tensor:
        """Validated (B, C) channel indices (default: 0..C-1)."""
        B, C = x.shape[:2]
        if channel_ids is None:
            if C > self.num_chans:
                raise ValueError(
                    f"images have {C} channels but the model knows {self.num_chans}; "
                    "pass channel_ids to say which known channels they are"
                )
            channel_ids = torch.arange(C, device=x.device)
        channel_ids = torch.as_tensor(channel_ids, device=x.device).long()
        if channel_ids.ndim == 1:
            channel_ids = channel_ids.expand(B, -1)
        if channel_ids.shape != (B, C):
            raise ValueError(f"channel_ids has shape {tuple(channel_ids.shape)}, expected ({C},)")
        if channel_ids.numel() and (channel_ids.min() < 0 or channel_ids.max() >= self.num_chans):
            raise ValueError(f"channel_ids must lie in 0..{self.num_chans - 1}")
        return channel_ids

    def forward(self, x: torch.Tensor, channel_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        ids = self.channel_ids_for(x, channel_ids)  # (B, C)
        t = self.proj(x.reshape(B * C, 1, H, W))  # (B·C, D, h, w)
        t = t.flatten(2).transpose(1, 2).reshape(B, C, -1, t.shape[1])  # (B, C, N, D)
        t = t + self.channel_embed[ids].unsqueeze(2)  # (B, C, 1, D) broadcast over N
        return t.reshape(B, -1, t.shape[-1])  # (B, C·N, D)
