"""Plots (matplotlib); the HTML report is `celldino.report`.

Every plotting function returns a `matplotlib.figure.Figure` and saves it when given `save=`
(PNG or SVG by the file suffix).
"""

from celldino.pl.attention import attention_maps, head_channel_heatmap, patch_match, patch_pca_rgb
from celldino.pl.colours import CHANNEL_COLOURS, composite
from celldino.pl.embedding import umap
from celldino.pl.heatmap import confusion_matrix, similarity_heatmap
from celldino.pl.montage import montage
from celldino.pl.training import probe_curve, training_curves

__all__ = [
    "CHANNEL_COLOURS",
    "attention_maps",
    "composite",
    "confusion_matrix",
    "head_channel_heatmap",
    "montage",
    "patch_match",
    "patch_pca_rgb",
    "probe_curve",
    "similarity_heatmap",
    "training_curves",
    "umap",
]
