"""Helpers shared by the training tests: tiny configs and a real prep folder from arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from celldino import config as C

TINY_MODEL = [
    "model.arch=vit_tiny",
    "model.patch_size=8",
    "model.img_size=16",
    "model.out_dim=32",
    "model.head_hidden_dim=32",
    "model.head_bottleneck_dim=16",
]
TINY_AUG = [
    "augment.global_crop_size=16",
    "augment.local_crop_size=8",
    "augment.n_local_crops=2",
    "augment.global_crop_scale=[0.5,1.0]",
    "augment.local_crop_scale=[0.2,0.5]",
]


def tiny_config(run_dir: Path, *extra: str, data: Path | None = None) -> C.Config:
    overrides = [
        f"train.run_dir={run_dir}",
        "train.device=cpu",
        "train.batch_size=4",
        "train.epochs=2",
        "train.log_every=1",
        "train.warmup_epochs=0.5",
        "model.in_chans=2",
        *TINY_MODEL,
        *TINY_AUG,
    ]
    if data is not None:
        overrides.append(f"train.data={data}")
    return C.load_config(None, overrides + list(extra))


def write_prep(prep_dir: Path, crops: np.ndarray, meta: pd.DataFrame) -> Path:
    """A real prep folder (crops.zarr + cells.parquet) through the crop store writer."""
    from celldino.io.cropstore import CropStore

    store = CropStore(
        prep_dir,
        channels=[f"ch{i}" for i in range(crops.shape[1])],
        crop_size=crops.shape[-1],
        dtype=crops.dtype,
        attrs={"normalization": {"method": "none"}},
    )
    store.append("all", crops, meta)
    store.finalize()
    return prep_dir


def random_prep(prep_dir: Path, n: int = 8, channels: int = 2, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    crops = rng.random((n, channels, size, size), dtype=np.float32)
    meta = pd.DataFrame(
        {
            "Metadata_CellID": [f"c{i}" for i in range(n)],
            "Metadata_Plate": "P1",
            "Metadata_Compound": [f"cpd{i % 3}" for i in range(n)],
        }
    )
    return write_prep(prep_dir, crops, meta)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from celldino.io.checkpoints import read_state_dict

    return read_state_dict(Path(run_dir) / "checkpoints" / "last.safetensors")


# augmentations whose outcome does not depend on random draws: with them, the split of a global
# batch across ranks cannot change what any image's crops look like
DETERMINISTIC_AUG = (
    "augment.random_resized_crop=false",
    "augment.hflip_p=0",
    "augment.vflip_p=0",
    "augment.rot90=false",
    "augment.brightness_p=0",
    "augment.contrast_p=0",
    "model.drop_path_rate=0",
)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models gain nothing from threads, and the CI cores are shared by other tests (the
    environment variable keeps `train.threads=0`, auto, at one thread too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)
