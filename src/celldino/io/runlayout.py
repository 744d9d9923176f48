"""Where each stage of `celldino run` puts its outputs inside one run directory.

<root>/
  config.yaml           the resolved config of the run
  screen/               the synthetic screen (demo only)
  prep/                 cells.parquet, crops.zarr, qc.parquet, engineered.parquet
  train/                config.yaml, checkpoints/, metrics.jsonl
  baselines/            random_init.safetensors (the untrained backbone)
  embeddings/<name>/    Parquet shards + _manifest.json (+ _attention.zarr) per feature set
  profiles/<name>.h5ad  well profiles per feature set (+ .parquet, .csv)
  eval/                 results tables and summary.json
  eval/checkpoints/     the epoch checkpoints' evaluation and checkpoint_spread.parquet
  report.html
  pipeline.json         fingerprints of the finished stages

Every output file a stage or the report looks for is a property or method here (`cells`,
`checkpoint`, `embeddings_manifest(name)`, `profiles(name)`, `eval_metrics`, ...), built from the
file names the io module that writes the file defines, so each name is written in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from celldino.config import PIPELINE_STAGES as STAGES
from celldino.io import attention_store, cropstore, prepared, results, trainrun
from celldino.io.embeddings import manifest_path
from celldino.names import safe_component

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
    def cells(self) -> Path:
        return self.prep / cropstore.CELLS

    @property
    def crops(self) -> Path:
        return self.prep / cropstore.CROPS

    @property
    def qc(self) -> Path:
        return self.prep / prepared.QC

    @property
    def skipped(self) -> Path:
        return self.prep / prepared.SKIPPED

    @property
    def engineered(self) -> Path:
        return self.prep / prepared.ENGINEERED

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def train_config(self) -> Path:
        return self.train / trainrun.CONFIG

    @property
    def train_metrics(self) -> Path:
        return self.train / trainrun.METRICS

    @property
    def checkpoint(self) -> Path:
        return trainrun.last_weights(self.train)

    @property
    def random_init_checkpoint(self) -> Path:
        return self.root / "baselines" / "random_init.safetensors"

    def embeddings(self, name: str) -> Path:
        return self.root / "embeddings" / safe_component(name, "feature set name")

    def embeddings_manifest(self, name: str) -> Path:
        return manifest_path(self.embeddings(name))

    def attention(self, name: str) -> Path:
        return attention_store.store_in(self.embeddings(name))

    def profiles(self, name: str) -> Path:
        return self.root / "profiles" / f"{safe_component(name, 'feature set name')}.h5ad"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_metrics(self) -> Path:
        return self.eval / results.METRICS

    @property
    def eval_summary(self) -> Path:
        return self.eval / results.SUMMARY

    @property
    def eval_tables(self) -> Path:
        return self.eval / results.TABLES

    @property
    def eval_checkpoints(self) -> Path:
        """The evaluation of the epoch checkpoints (the checkpoint spread)."""
        return self.eval / results.CHECKPOINTS

    @property
    def checkpoint_spread(self) -> Path:
        return self.eval_checkpoints / results.CHECKPOINT_SPREAD

    @property
    def checkpoint_spread_record(self) -> Path:
        return self.eval_checkpoints / results.CHECKPOINT_RECORD

    def epoch_checkpoints(self) -> dict[int, Path]:
        """The training's epoch copies, by epoch ({} when none were kept)."""
        return trainrun.epoch_weights(self.train)

    def epoch_set(self, epoch: int) -> str:
        """The feature-set name of an epoch checkpoint's embeddings and profiles."""
        return f"learned_epoch{epoch:04d}"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def manifest(self) -> Path:
        return self.root / "pipeline.json"
