"""Evaluation of profiles and embeddings: retrieval, matching, classification, biology.

Functions take a metadata table and a feature matrix (profiles × features) — `fn(meta, X, ...)` —
or an AnnData alone — `fn(adata, ...)` — with explicit column names as keywords (`moa=`,
`compound=`, `label=`, ...; docs/evaluation.md), and return numbers and tidy tables.
`celldino evaluate PROFILES --spec eval.yaml` (`celldino.eval.runner.evaluate`) runs any set of
them, registered in `celldino.eval.analyses.ANALYSES`, on several feature sets side by side.
"""

from celldino.eval.activity import phenotypic_activity
from celldino.eval.classify import (
    MLPClassifier,
    MLPOptions,
    block_search,
    classify,
    knn_f1,
    linear_probe,
    mlp_f1,
)
from celldino.eval.enrichment import enrichment
from celldino.eval.factors import factor_mutual_information
from celldino.eval.heterogeneity import field_std, heterogeneity, treatment_heterogeneity
from celldino.eval.lowshot import lowshot_curve
from celldino.eval.map import (
    average_precision,
    fraction_retrieved,
    mean_average_precision,
    moa_map,
    retrieval_map,
)
from celldino.eval.moa import moa_prediction
from celldino.eval.multitask import masked_bce, multitask_activity
from celldino.eval.nsc import nearest_moa, nsc_nscb
from celldino.eval.pseudotime import diffusion_pseudotime
from celldino.eval.similarity import cca_matching, group_similarity, mantel_test
from celldino.eval.splits import group_folds, group_split, split_table
from celldino.eval.subcellular import (
    cls_attention_maps,
    discriminative_patches,
    head_channel_iou,
    patch_fraction,
)

__all__ = [
    "MLPClassifier",
    "MLPOptions",
    "block_search",
    "cca_matching",
    "classify",
    "cls_attention_maps",
    "diffusion_pseudotime",
    "discriminative_patches",
    "factor_mutual_information",
    "field_std",
    "group_folds",
    "group_similarity",
    "group_split",
    "head_channel_iou",
    "heterogeneity",
    "knn_f1",
    "linear_probe",
    "lowshot_curve",
    "mantel_test",
    "masked_bce",
    "mlp_f1",
    "moa_prediction",
    "multitask_activity",
    "patch_fraction",
    "split_table",
    "treatment_heterogeneity",
    "average_precision",
    "enrichment",
    "fraction_retrieved",
    "mean_average_precision",
    "moa_map",
    "nearest_moa",
    "nsc_nscb",
    "phenotypic_activity",
    "retrieval_map",
]
