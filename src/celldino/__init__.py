"""celldino: self-supervised vision transformers for fluorescence microscopy of cells."""

__version__ = "0.1.0"
