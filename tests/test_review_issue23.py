"""Review of issue 23 (multi-node extraction): the end-of-run verdict blames an unshared
`extract.out_dir` only for shards another rank wrote.

Rank 0 always sees its own folder, so a shard it wrote and then lacks was removed after it was
written (a cleaner, another job on a filesystem without locks): the verdict is the plain "missing,
rerun to finish", not "a folder every node shares", which on one process names no other node.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from celldino.config import ModelConfig, load_config
from celldino.extract import extract
from celldino.extract.extractor import ExtractError
from celldino.io.checkpoints import write_safetensors
from celldino.io.embeddings import read_manifest, shard_name
from celldino.models import build_model
from train_helpers import one_thread, random_prep  # noqa: F401


def test_a_shard_rank_0_wrote_and_lost_is_missing_not_an_unshared_folder(tmp_path):
    prep = random_prep(tmp_path / "prep", n=8)
    mcfg = ModelConfig(arch="vit_tiny", patch_size=8, in_chans=2, img_size=16, drop_path_rate=0)
    torch.manual_seed(0)
    sd = {f"teacher.backbone.{k}": v for k, v in build_model(mcfg).state_dict().items()}
    write_safetensors(
        tmp_path / "run" / "checkpoints" / "last.safetensors",
        sd,
        {"model_config": dataclasses.asdict(mcfg)},
    )
    out = tmp_path / "emb"
    cfg = load_config(
        None,
        [
            f"extract.checkpoint={tmp_path / 'run'}",
            f"extract.data={prep}",
            f"extract.out_dir={out}",
            "extract.shard_size=2",
            "extract.device=cpu",
            "extract.threads=1",
        ],
    ).extract

    def lose_shard_1(k: int) -> None:  # removed right after it was written
        if k == 1:
            (out / shard_name(1)).unlink()

    with pytest.raises(ExtractError) as err:
        extract(cfg, after_shard=lose_shard_1)
    msg = str(err.value)
    assert "shards [1] are missing after extraction; rerun to finish" in msg, msg
    assert "every node shares" not in msg and "rank 0 wrote" not in msg
    assert not read_manifest(out)["complete"]

    redone: list[int] = []  # the rerun computes shard 1 alone and completes the folder
    extract(cfg, after_shard=redone.append)
    assert redone == [1] and read_manifest(out)["complete"]
