"""DINO multi-crop: 2 global crops + N local crops of every image in a batch.

WS-DINO takes its local crops from another image with the same weak label: pass those images
as `local_images` (the sampler pairs them; see celldino.data). Crops come back as a list
`[global_0, global_1, local_0, ..., local_{N-1}]`, each (B, C, h, w), the layout DINO losses
expect (teacher sees the first 2, student sees all).
"""

from __future__ import annotations

import torch

from celldino.augment.cell_augment import CellAugment
from celldino.config import AugmentConfig

N_GLOBAL_CROPS = 2


class MultiCrop:
    """`MultiCrop(cfg)(images, generator=g, local_images=None) -> list of (B, C, h, w) crops`."""

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg or AugmentConfig()
        self.augment = CellAugment(self.cfg)

    @property
    def n_crops(self) -> int:
        return N_GLOBAL_CROPS + self.cfg.n_local_crops

    def __call__(
        self,
        images: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        local_images: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """images (B, C, H, W) → 2 global crops (B, C, G, G) + n local crops (B, C, L, L).

        local_images (B, C, H', W'): WS-DINO's source of the local crops (row i shares image
        i's weak label); defaults to `images` (plain DINO).
        """
        cfg = self.cfg
        if local_images is not None and (
            local_images.ndim != 4 or local_images.shape[:2] != images.shape[:2]
        ):
            raise ValueError(
                "local_images must be (B, C, H, W) with the batch size and channels of images: "
                f"got {tuple(local_images.shape)} for images {tuple(images.shape)}"
            )
        gscale = (cfg.global_crop_scale[0], cfg.global_crop_scale[1])
        lscale = (cfg.local_crop_scale[0], cfg.local_crop_scale[1])
        crops = [
            self.augment(images, size=cfg.global_crop_size, scale=gscale, generator=generator)
            for _ in range(N_GLOBAL_CROPS)
        ]
        source = images if local_images is None else local_images
        crops += [
            self.augment(source, size=cfg.local_crop_size, scale=lscale, generator=generator)
            for _ in range(cfg.n_local_crops)
        ]
        return crops
