"""Channel handling around a backbone: `channelwise` runs each channel alone and concatenates.

(`multichannel` is a plain ViT over all channels; `channel_adaptive` is a ViT built with
`channel_adaptive=True`; both live in vision_transformer.py.)
"""

from __future__ import annotations

import torch
from torch import nn

from celldino.models.vision_transformer import VisionTransformer


class ChannelwiseModel(nn.Module):
    """Each channel through a shared backbone on its own; features concatenated channel by channel.

    When the backbone takes 3 channels (an RGB model such as ImageNet DINO) each channel is
    replicated to R=G=B, as Cell-DINO and WS-DINO did. Outputs, for C input channels and a
    backbone of width D: `cls` (B, C·D) = [cls of channel 0, cls of channel 1, ...], `patch`
    (B, N, C·D), `blocks` [(B, C·D)], `attn` (B, C·heads, T, T) (heads of channel 0 first).
    """

    def __init__(self, backbone: VisionTransformer, num_chans: int) -> None:
        super().__init__()
        if backbone.channel_adaptive or backbone.in_chans not in (1, 3):
            raise ValueError(
                f"channelwise needs a backbone taking 1 or 3 channels, not {backbone.in_chans}"
            )
        self.backbone = backbone
        self.num_chans = num_chans
        self.embed_dim = backbone.embed_dim * num_chans
        self.patch_size = backbone.patch_size

    def forward(
        self,
        x: torch.Tensor,
        *,
        channel_ids: torch.Tensor | None = None,
        return_blocks: bool = False,
        return_attention: bool = False,
        masks: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        B, C, H, W = x.shape
        xc = x.reshape(B * C, 1, H, W)  # (B·C, 1, H, W), channel index fastest
        if self.backbone.in_chans == 3:
            xc = xc.expand(-1, 3, -1, -1)  # grey → RGB
        if masks is not None:
            masks = masks.repeat_interleave(C, dim=0)  # (B·C, N)
        out = self.backbone(
            xc, return_blocks=return_blocks, return_attention=return_attention, masks=masks
        )

        def join(t: torch.Tensor) -> torch.Tensor:  # (B·C, ..., D) → (B, ..., C·D)
            t = t.reshape(B, C, *t.shape[1:]).movedim(1, -2)  # (B, ..., C, D)
            return t.flatten(-2)

        res: dict[str, torch.Tensor | list[torch.Tensor]] = {
            "cls": join(out["cls"]),  # type: ignore[arg-type]
            "patch": join(out["patch"]),  # type: ignore[arg-type]
        }
        if return_blocks:
            res["blocks"] = [join(b) for b in out["blocks"]]
        if return_attention:
            a = out["attn"]  # (B·C, heads, T, T)
            res["attn"] = a.reshape(B, C * a.shape[1], *a.shape[2:])  # type: ignore[union-attr]
        return res
