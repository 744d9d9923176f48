"""Where each stage of `celldino run` puts its outputs inside one run directory.

<root>/
  screen/               the synthetic screen (demo only)
  prep/                 cells.parquet, crops.zarr, qc.parquet, engineered.parquet
  train/                config.yaml, checkpoints/, metrics.jsonl
  embeddings/<name>/    Parquet shards + _manifest.json (+ attention file) per feature set
  profiles/<name>.h5ad  well profiles per feature set (+ .parquet, .csv)
  eval/                 results tables and summary.json
  report.html
  pipeline.json         fingerprints of the finished stages
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from celldino.config import PIPELINE_STAGES as STAGES

__all__ = ["STAGES", "RunLayout"]


@dataclass(frozen=True)
class RunLayout:
    root: Path  # the run directory

    @property
    def screen(self) -> Path:
        return self.root / "screen"

    @property
    def prep(self) -> Path:
        return self.root / "prep"

    @property
    def train(self) -> Path:
        return self.root / "train"

    def embeddings(self, name: str) -> Path:
        return self.root / "embeddings" / name

    def profiles(self, name: str) -> Path:
        return self.root / "profiles" / f"{name}.h5ad"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def manifest(self) -> Path:
        return self.root / "pipeline.json"
