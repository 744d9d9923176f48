"""Checkpoint + prepared data → per-cell (or per-field) embeddings joined with metadata.

`extract(ExtractConfig)` writes Parquet shards (`Metadata_*` + `emb_0000`...), a manifest and
optionally AnnData and attention maps; `read_embeddings(out_dir)` reads them back in order and
`read_attention(out_dir, cell_id)` gives one cell's patch tokens and attention.
"""

from celldino.extract.extractor import Embedder, ExtractError, extract
from celldino.extract.feature_modes import FEATURES, select_features
from celldino.io.attention_store import read_attention
from celldino.io.embeddings import read_embeddings, read_manifest

__all__ = [
    "FEATURES",
    "Embedder",
    "ExtractError",
    "extract",
    "read_attention",
    "read_embeddings",
    "read_manifest",
    "select_features",
]
