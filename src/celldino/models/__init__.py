"""Vision transformer backbones, channel modes and pretrained-weight loading."""

from celldino.models.build import build_head, build_model, load_backbone, resolve_checkpoint
from celldino.models.channel_modes import ChannelwiseModel
from celldino.models.vision_transformer import (
    ARCHS,
    VisionTransformer,
    vit_base,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHS",
    "ChannelwiseModel",
    "VisionTransformer",
    "build_head",
    "build_model",
    "load_backbone",
    "resolve_checkpoint",
    "vit_base",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
