"""Vision transformer backbone for any number of channels (DINO / DINOv2 parameter names).

Parameter names follow the official releases (`cls_token`, `pos_embed`, `register_tokens`,
`mask_token`, `patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,
mlp.fc2,ls2.gamma}`, `norm`), so DINO and DINOv2 weights load with little or no renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from celldino.layers import Block, ChannelAdaptivePatchEmbed, PatchEmbed

# name → (embed_dim, depth, num_heads)
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


class VisionTransformer(nn.Module):
    """ViT returning a dict: `cls` (B, D), `patch` (B, N, D), optional `blocks`, `attn`.

    Tokens are [class, registers..., patches...]. Position embeddings are learned for an
    `img_size` grid and resampled bicubically for other image sizes. With `channel_adaptive`
    every channel is patchified on its own (N = C · h · w patch tokens, each channel's tokens
    share the spatial position embeddings and get their channel's embedding).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        num_registers: int = 0,
        channel_adaptive: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_heads = num_heads
        self.num_registers = num_registers
        self.channel_adaptive = channel_adaptive
        if channel_adaptive:
            self.patch_embed: nn.Module = ChannelAdaptivePatchEmbed(patch_size, in_chans, embed_dim)
        else:
            self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=rates[i],
                init_values=init_values,
                norm_eps=norm_eps,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.pos_embed, std=0.02)  # = DINO trunc_normal_ (cut at ±2 = 100 std)
        nn.init.normal_(self.cls_token, std=0.02)  # = DINO trunc_normal_ (cut at ±2 = 100 std)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)  # = DINO trunc_normal_ (cut at ±2 = 100 std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def grid_size(self) -> int:
        """Side of the patch grid the position embeddings were made for."""
        return math.isqrt(self.pos_embed.shape[1] - 1)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings (1, 1 + h·w, D) for an h × w patch grid (bicubic resampling)."""
        g = self.grid_size
        if h == g and w == g:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, (h, w))

    def prepare_tokens(
        self,
        x: torch.Tensor,
        channel_ids: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        h, w = H // p, W // p
        if self.channel_adaptive:
            t = self.patch_embed(x, channel_ids)  # (B, C·h·w, D)
        else:
            t = self.patch_embed(x)  # (B, h·w, D)
        if masks is not None:
            if masks.shape != t.shape[:2]:
                raise ValueError(
                    f"masks {tuple(masks.shape)} must be (B, N) = {tuple(t.shape[:2])}"
                )
            t = torch.where(masks.unsqueeze(-1), self.mask_token.to(t.dtype).unsqueeze(0), t)
        pos = self.pos_embed_for(h, w).to(t.dtype)  # (1, 1 + h·w, D)
        patch_pos = pos[:, 1:]
        if self.channel_adaptive:
            patch_pos = patch_pos.repeat(1, C, 1)  # (1, C·h·w, D)
        t = t + patch_pos
        parts = [(self.cls_token.to(t.dtype) + pos[:, :1]).expand(B, -1, -1)]  # (B, 1, D)
        if self.register_tokens is not None:
            parts.append(self.register_tokens.to(t.dtype).expand(B, -1, -1))  # (B, R, D)
        parts.append(t)
        return torch.cat(parts, dim=1)  # (B, 1 + R + N, D)

    def forward(
        self,
        x: torch.Tensor,
        *,
        channel_ids: torch.Tensor | None = None,
        return_blocks: bool = False,
        return_attention: bool = False,
        masks: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """x (B, C, H, W) → {'cls': (B, D), 'patch': (B, N, D), ['blocks'], ['attn'], ...}.

        `blocks`: the class token after every block, passed through the final norm (as DINO's
        `get_intermediate_layers`); `attn`: (B, heads, T, T) of the last block, T = 1 + R + N;
        `masks` (B, N) bool: masked patch tokens are replaced by the learned mask token (iBOT).
        `channel_ids` (C,) or (B, C): which known channels x holds (channel_adaptive only).
        """
        t = self.prepare_tokens(x, channel_ids, masks)  # (B, T, D)
        per_block: list[torch.Tensor] = []
        attn = None
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            t, a = blk(t, return_attention=return_attention and i == last)
            if a is not None:
                attn = a
            if return_blocks:
                per_block.append(self.norm(t[:, 0]))  # (B, D)
        t = self.norm(t)
        r = 1 + self.num_registers
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {"cls": t[:, 0], "patch": t[:, r:]}
        if self.num_registers:
            out["registers"] = t[:, 1:r]  # (B, R, D)
        if return_blocks:
            out["blocks"] = per_block
        if return_attention:
            out["attn"] = attn  # type: ignore[assignment]
        return out


def resample_pos_embed(pos_embed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + g·g, D) → (1, 1 + h·w, D): class position kept, patch grid resized bicubically."""
    n = pos_embed.shape[1] - 1
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"position embeddings of {n} patches do not form a square grid")
    D = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)  # (1, D, h, w)
    grid = grid.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], D).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def _vit(arch: str, **kwargs) -> VisionTransformer:
    dim, depth, heads = ARCHS[arch]
    return VisionTransformer(embed_dim=dim, depth=depth, num_heads=heads, **kwargs)


def vit_tiny(**kwargs) -> VisionTransformer:
    return _vit("vit_tiny", **kwargs)


def vit_small(**kwargs) -> VisionTransformer:
    return _vit("vit_small", **kwargs)


def vit_base(**kwargs) -> VisionTransformer:
    return _vit("vit_base", **kwargs)


def vit_large(**kwargs) -> VisionTransformer:
    return _vit("vit_large", **kwargs)
