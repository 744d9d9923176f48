"""torch CPU threads: the auto rule (`train.threads` / `extract.threads` = 0), OMP_NUM_THREADS,
one thread per DataLoader worker, and `train` applying (and giving back) the setting."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from celldino import config as C
from celldino import distributed
from celldino.config import ConfigError
from celldino.train import train
from celldino.train.loop import RESUMABLE
from train_helpers import one_thread, tiny_config  # noqa: F401


@pytest.mark.parametrize(
    ("cores", "omp", "ranks", "workers", "want"),
    [
        (2, None, 1, 0, 2),  # alone on 2 cores: both
        (16, None, 1, 0, 16),
        (16, None, 4, 0, 4),  # torchrun, 4 local ranks: 16 // 4 each
        (16, None, 4, 2, 2),  # ... and 2 loader workers per rank take 2 of its 4 cores
        (2, None, 1, 1, 1),  # 2 cores, 1 worker: 1 for the step
        (2, None, 1, 4, 1),  # more workers than cores: never below 1
        (3, None, 2, 0, 1),  # 3 cores over 2 ranks: 1 each (rounded down)
        (1, None, 4, 0, 1),  # more ranks than cores
        (16, "3", 4, 2, 3),  # the user's OMP_NUM_THREADS stands as it is
        (16, "1", 1, 0, 1),
        (16, "4,2", 1, 0, 4),  # nested levels: the first
        (8, "", 1, 0, 8),  # empty, zero or not a number: ignored
        (8, "0", 2, 0, 4),
        (8, "many", 1, 1, 7),
    ],
)
def test_auto_threads_rule(cores, omp, ranks, workers, want):
    got = distributed.auto_threads(cores, omp_num_threads=omp, local_ranks=ranks, workers=workers)
    assert got == want


def test_set_threads_uses_omp_num_threads_and_explicit_numbers(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    distributed.set_threads(0)
    assert torch.get_num_threads() == 1  # auto respects the user's OMP_NUM_THREADS
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    previous = distributed.set_threads(0, workers=0)
    assert previous == 1
    assert torch.get_num_threads() == distributed.available_cores()
    distributed.set_threads(2, workers=5)  # a positive number is used as given
    assert torch.get_num_threads() == 2
    with pytest.raises(ConfigError, match="extract.threads=-1"):
        distributed.set_threads(-1, key="extract.threads")


class _ThreadsSeen(Dataset):
    """Images whose reading records torch's thread count in the process that reads them."""

    def __init__(self, n: int = 8) -> None:
        self.n, self.seen = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return torch.full((2, 16, 16), float(i) / self.n) + torch.rand(2, 16, 16) * 0.1


class _WorkerThreads(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return torch.get_num_threads()


def test_loader_workers_compute_with_one_thread():
    """torch's worker loop sets one thread per DataLoader worker: train and extract rely on it
    (a pool per worker would put workers x cores threads on the cores)."""
    torch.set_num_threads(2)  # the main process may have more; each worker keeps 1
    loader = DataLoader(_WorkerThreads(), batch_size=None, num_workers=1)
    assert [int(t) for t in loader] == [1, 1]
    assert torch.get_num_threads() == 2


def test_train_sets_train_threads_and_restores_the_callers(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    data = _ThreadsSeen()
    cfg = tiny_config(tmp_path / "run", "train.threads=1", "train.epochs=1")
    train(cfg, dataset=data)
    assert data.seen and set(data.seen) == {1}  # the steps ran with train.threads
    assert torch.get_num_threads() == 2  # the caller's count is back


def test_threads_settings_documented_checked_and_resumable():
    assert C.load_config(None, ["train.threads=3"]).train.threads == 3
    with pytest.raises(ConfigError, match="train.threads"):
        C.load_config(None, ["train.threads=-1"])
    with pytest.raises(ConfigError, match="extract.threads"):
        C.load_config(None, ["extract.threads=-2"])
    assert "train.threads=0" in C.describe(C.TrainConfig, "train")
    assert "auto" in C.field_docs(C.ExtractConfig)["threads"]
    assert "train.threads" in RESUMABLE


def test_threads_do_not_change_pipeline_fingerprints():
    from celldino.pipeline import stage_fingerprints

    base = stage_fingerprints(C.load_config(None, []))
    other = C.load_config(None, ["train.threads=1", "extract.threads=3"])
    assert stage_fingerprints(other) == base  # `celldino run` redoes no stage for a speed setting
