"""Diffusion pseudotime on embeddings (scanpy's DPT; install the `scanpy` extra).

Cells are placed on a kNN graph of their embeddings (or a PCA of them), the diffusion map is
computed and each cell's pseudotime is its diffusion distance from a root cell — e.g. an
untreated or earliest-timepoint cell — as in Haghverdi et al. 2016.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from celldino.eval.classify import as_matrix
from celldino.eval.spec import profiles_of

if TYPE_CHECKING:
    from anndata import AnnData


def diffusion_pseudotime(
    meta: pd.DataFrame | AnnData,
    X=None,
    *,
    root: int | None = None,
    root_by: str | None = None,
    root_value: str | None = None,
    n_neighbors: int = 15,
    n_pcs: int = 0,
    n_dcs: int = 10,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Pseudotime per cell: the metadata plus `dpt_pseudotime`, and a summary with the root.

    The root is the row index `root`, or, with `root_by`/`root_value`, the cell of that group
    that is most extreme on the first diffusion component (scanpy's convention). `n_pcs=0`
    builds the graph on the features themselves.
    """
    meta, X = profiles_of(meta, X)
    try:
        import anndata as ad
        import scanpy as sc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "diffusion pseudotime needs scanpy: pip install 'celldino[scanpy]' "
            f"(import failed: {e})"
        ) from None
    X = as_matrix(X, len(meta))
    obs = meta.reset_index(drop=True).astype(str)
    obs.index = [str(i) for i in range(len(meta))]
    adata = ad.AnnData(X=X, obs=obs)
    if n_pcs:
        sc.pp.pca(adata, n_comps=n_pcs, random_state=seed)
        sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep="X_pca", random_state=seed)
    else:
        sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep="X", random_state=seed)
    sc.tl.diffmap(adata, n_comps=max(n_dcs, 2), random_state=seed)
    if root is None:
        if root_by is None or root_value is None:
            raise ValueError("give the root cell: root=<row index> or root_by= and root_value=")
        if root_by not in meta.columns:
            raise KeyError(f"root column '{root_by}' not in the metadata")
        members = np.flatnonzero(meta[root_by].astype(str).to_numpy() == str(root_value))
        if not len(members):
            raise ValueError(f"no cell has {root_by} == {root_value!r}")
        dc1 = adata.obsm["X_diffmap"][:, 1]
        # the extreme of the group on the first non-trivial diffusion component
        side = np.sign(np.median(dc1[members]) - np.median(dc1)) or 1.0
        root = int(members[np.argmax(side * dc1[members])])
    if not 0 <= root < len(meta):
        raise ValueError(f"root row {root} outside 0..{len(meta) - 1}")
    adata.uns["iroot"] = int(root)
    sc.tl.dpt(adata, n_dcs=n_dcs)
    out = meta.reset_index(drop=True).copy()
    out["dpt_pseudotime"] = adata.obs["dpt_pseudotime"].to_numpy(dtype=np.float64)
    summary = {
        "root": int(root),
        "n_neighbors": n_neighbors,
        "n_pcs": n_pcs,
        "n_dcs": n_dcs,
        "n_unreachable": int(np.isinf(out.dpt_pseudotime).sum()),
        "seed": seed,
    }
    return out, summary
