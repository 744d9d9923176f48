"""Profiles from per-cell features: aggregate → normalise → batch-correct → select → consensus.

Scanpy-style stages: each takes the AnnData first, everything else keyword-only, modifies it in
place and returns None (`copy=True` returns a new AnnData and leaves the input untouched), and
records its parameters in `adata.uns['celldino']['steps']` (JSON text; `pp.history(adata)`).
`aggregate` and `consensus` build a new AnnData (from the shards, one row per treatment) and
return it.

    adata = pp.aggregate("runs/embeddings", by=["Metadata_Plate", "Metadata_Well"], features="emb_")
    pp.handle_nonfinite(adata, policy="drop_feature")
    pp.annotate(adata, controls="Metadata_pert_type == 'control'")
    pp.normalize(adata, method="mad_robustize", by="Metadata_Plate")
    pp.feature_select(adata, operations=["frequency", "drop_outliers", "blocklist"])
    pp.clip(adata, limit=50)
    pp.sphere(adata, method="ZCA", shrinkage="oas")   # TVN, shrunk toward the mean eigenvalue
    pp.pca(adata, n_components=50)   # obsm['X_pca'], varm['PCs'], uns['pca']; X unchanged
    treatments = pp.consensus(adata, by=["Metadata_Compound", "Metadata_Dose"])

`pp.run_profile(cfg)` (pp/recipe.py) runs the configured chain of `celldino profile`.
"""

from celldino.pp.aggregate import aggregate
from celldino.pp.clip import clip
from celldino.pp.consensus import consensus
from celldino.pp.controls import annotate
from celldino.pp.feature_select import feature_select
from celldino.pp.harmony import harmony
from celldino.pp.inverse_normal import inverse_normal
from celldino.pp.nonfinite import handle_nonfinite
from celldino.pp.normalize import normalize
from celldino.pp.pca import pca
from celldino.pp.recipe import run_profile
from celldino.pp.sphere import sphere
from celldino.pp.steps import history, steps

__all__ = [
    "aggregate",
    "annotate",
    "clip",
    "consensus",
    "feature_select",
    "handle_nonfinite",
    "harmony",
    "history",
    "inverse_normal",
    "normalize",
    "pca",
    "run_profile",
    "sphere",
    "steps",
]
