"""Transformer building blocks (torch only): attention, MLP, block, patch embeddings, DINO head."""

from celldino.layers.attention import Attention
from celldino.layers.block import Block, DropPath, LayerScale
from celldino.layers.dino_head import DINOHead, WeightNormLinear
from celldino.layers.mlp import Mlp
from celldino.layers.patch_embed import ChannelAdaptivePatchEmbed, PatchEmbed

__all__ = [
    "Attention",
    "Block",
    "ChannelAdaptivePatchEmbed",
    "DINOHead",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "WeightNormLinear",
]
