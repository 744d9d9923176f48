"""Evaluation of profiles and embeddings: retrieval, matching, classification, biology.

Functions take a metadata table and a feature matrix (profiles × features) with explicit column
names, and return numbers and tidy tables. `celldino evaluate PROFILES --spec eval.yaml`
(`celldino.eval.runner.evaluate`) runs any set of them, registered in `runner.ANALYSES`, on
several feature sets side by side.
"""

from celldino.eval.activity import phenotypic_activity
from celldino.eval.enrichment import enrichment
from celldino.eval.map import (
    average_precision,
    fraction_retrieved,
    mean_average_precision,
    moa_map,
    retrieval_map,
)
from celldino.eval.retrieval import aggregate_treatments, nearest_moa, nsc_nscb

__all__ = [
    "aggregate_treatments",
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
