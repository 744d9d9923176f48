"""Image data: image sets, illumination, segmentation, crops, QC, engineered features, datasets.

`CropDataset` and `FieldDataset` are imported lazily (they need torch; the rest does not).
"""

__all__ = ["CropDataset", "FieldDataset"]


def __getattr__(name: str):
    if name in __all__:
        from celldino.data import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'celldino.data' has no attribute {name!r}")
