"""The files of a training run folder (`train.run_dir`), named here once:

  config.yaml                      the resolved config of the run
  metrics.jsonl                    one JSON object per logged step
  checkpoints/last.safetensors     the latest weights (+ last.state.pt: optimizer, RNG, position)
  checkpoints/epoch_NNNN.safetensors  a copy of the weights every `train.save_every` epochs

`train` appends a line to metrics.jsonl every `train.log_every` steps (`append_metrics`) and cuts
the lines logged after the checkpoint it resumes from (`truncate_metrics`); the report reads it
back (`read_metrics`); extraction reads the channels a run was trained on from its config.yaml
(`run_channels`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from celldino.io.files import append_jsonl, atomic_write_text

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LAST_WEIGHTS = "last.safetensors"
LAST_STATE = "last.state.pt"
EPOCH_WEIGHTS = "epoch_{epoch:04d}.safetensors"

__all__ = [
    "CHECKPOINTS",
    "CONFIG",
    "EPOCH_WEIGHTS",
    "LAST_STATE",
    "LAST_WEIGHTS",
    "METRICS",
    "append_metrics",
    "epoch_weights",
    "last_weights",
    "read_metrics",
    "run_channels",
    "run_epochs",
    "truncate_metrics",
]


def last_weights(run_dir: str | Path) -> Path:
    """`checkpoints/last.safetensors` of a training run folder."""
    return Path(run_dir) / CHECKPOINTS / LAST_WEIGHTS


def epoch_weights(run_dir: str | Path) -> dict[int, Path]:
    """The epoch copies of a training run folder (`checkpoints/epoch_NNNN.safetensors`), by
    epoch, in epoch order ({} when none were kept, as with `train.save_every=0`)."""
    found = {}
    for p in (Path(run_dir) / CHECKPOINTS).glob("epoch_*.safetensors"):
        digits = p.name.removeprefix("epoch_").removesuffix(".safetensors")
        if digits.isdigit() and p.name == EPOCH_WEIGHTS.format(epoch=int(digits)):
            found[int(digits)] = p
    return dict(sorted(found.items()))


def append_metrics(path: str | Path, record: dict[str, Any]) -> Path:
    """Append one step's record to metrics.jsonl."""
    return append_jsonl(Path(path), record)


def read_metrics(path: str | Path) -> pd.DataFrame:
    """metrics.jsonl → DataFrame (one row per logged step); a line that is not JSON is an error
    naming the line."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from None
    if not rows:
        raise ValueError(f"{path} holds no metrics yet: train for at least train.log_every steps")
    return pd.DataFrame(rows)


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be redone)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _run_train_setting(file: str | Path, key: str) -> object:
    """`train.<key>` of the config.yaml of the run a checkpoint file belongs to (None if unknown)."""
    file = Path(file)
    for cand in (file.parent.parent / CONFIG, file.parent / CONFIG):
        if cand.is_file():
            try:
                data = yaml.safe_load(cand.read_text()) or {}
            except yaml.YAMLError:
                return None
            train = data.get("train") if isinstance(data, dict) else None
            return train.get(key) if isinstance(train, dict) else None
    return None


def run_epochs(file: str | Path) -> int | None:
    """train.epochs of the config.yaml of the run a checkpoint file belongs to (None if unknown)."""
    epochs = _run_train_setting(file, "epochs")
    return epochs if isinstance(epochs, int) else None


def run_channels(file: str | Path) -> list[str]:
    """Channels a celldino run was trained on (train.channels of its config.yaml), or []."""
    chans = _run_train_setting(file, "channels")
    return [str(c) for c in chans] if isinstance(chans, list) else []
