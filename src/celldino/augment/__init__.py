"""Batched multi-channel augmentations and multi-crop, as tensor ops on (B, C, H, W) (CPU or GPU).

from celldino.augment import MultiCrop
crops = MultiCrop(cfg.augment)(images, generator=torch.Generator().manual_seed(0))
"""

from celldino.augment.cell_augment import CellAugment, check_config
from celldino.augment.geometric import (
    affine_matrices,
    boxes_to_theta,
    elastic_displacement,
    flip,
    rot90,
    sample_crop_boxes,
    warp,
)
from celldino.augment.multicrop import N_GLOBAL_CROPS, MultiCrop
from celldino.augment.photometric import (
    adjust_brightness,
    adjust_contrast,
    drop_channels,
    gaussian_blur,
    greyscale,
    rescale_channel,
    sample_channel_keep,
    solarize,
)

__all__ = [
    "N_GLOBAL_CROPS",
    "CellAugment",
    "MultiCrop",
    "adjust_brightness",
    "adjust_contrast",
    "affine_matrices",
    "boxes_to_theta",
    "check_config",
    "drop_channels",
    "elastic_displacement",
    "flip",
    "gaussian_blur",
    "greyscale",
    "rescale_channel",
    "rot90",
    "sample_channel_keep",
    "sample_crop_boxes",
    "solarize",
    "warp",
]
