"""The synthetic screen: a small, realistic, fully known image-based screen (the default dataset)."""

from celldino.synth.screen import PRESETS, make_screen, resolve_layout

__all__ = ["PRESETS", "make_screen", "resolve_layout"]
