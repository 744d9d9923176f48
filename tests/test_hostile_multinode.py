"""Refusals of multi-node runs: a folder that only one node sees.

On a cluster, `extract.out_dir` and `train.run_dir` must be on a filesystem every node shares:
rank 0 writes the manifest and the checkpoints, every rank writes its embedding shards. A path
on a node's local disk exists on every node but holds different files. Two gloo ranks in one
machine stand for two nodes here by giving each rank its own folder under the same setting.
"""

from __future__ import annotations

import dataclasses
import datetime
import socket

import pytest
import torch
import torch.multiprocessing as mp

from celldino.config import ModelConfig
from celldino.errors import UserError
from celldino.io.checkpoints import write_safetensors
from celldino.models import build_model
from train_helpers import one_thread, random_prep, tiny_config  # noqa: F401


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, port: int, root: str, what: str) -> None:
    """Rank `rank` of 2 runs `what` with its own folder (its node's local disk)."""
    from pathlib import Path

    import torch.distributed as dist

    from celldino.config import load_config

    torch.set_num_threads(1)
    # a rank left waiting (a refusal gone, the ranks training different steps) fails in minutes,
    # not at gloo's default 30
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    root_p = Path(root)
    local = root_p / f"node{rank}"
    try:
        if what == "extract":
            from celldino.extract import extract

            cfg = load_config(
                None,
                [
                    f"extract.checkpoint={root_p / 'run'}",
                    f"extract.data={root_p / 'prep'}",
                    f"extract.out_dir={local / 'emb'}",
                    "extract.shard_size=2",
                    "extract.device=cpu",
                    "extract.threads=1",
                ],
            ).extract
            extract(cfg)
        else:
            from celldino.train import train

            cfg = tiny_config(local / "run", "train.epochs=1", data=root_p / "prep")
            train(cfg, resume=True)
        msg = "no error"
    except UserError as e:
        msg = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    (root_p / f"msg.{rank}").write_text(msg)


def _two_ranks(root, what: str) -> list[str]:
    mp.spawn(_as_rank, args=(_port(), str(root), what), nprocs=2, join=True)
    return [(root / f"msg.{r}").read_text() for r in (0, 1)]


@pytest.mark.distributed
def test_extract_out_dir_a_node_does_not_share_is_refused_on_every_rank(tmp_path):
    random_prep(tmp_path / "prep", n=8)
    mcfg = ModelConfig(arch="vit_tiny", patch_size=8, in_chans=2, img_size=16, drop_path_rate=0)
    sd = {f"teacher.backbone.{k}": v for k, v in build_model(mcfg).state_dict().items()}
    write_safetensors(
        tmp_path / "run" / "checkpoints" / "last.safetensors",
        sd,
        {"model_config": dataclasses.asdict(mcfg)},
    )
    (tmp_path / "node1" / "emb").mkdir(parents=True)  # the same path on node 1's own disk
    msgs = _two_ranks(tmp_path, "extract")
    for m in msgs:  # both ranks stop, with rank 0's verdict (none waits for the other)
        assert m.startswith("ExtractError"), m
        assert "rank 1 wrote shards ['part-00001.parquet'" in m and "every node shares" in m
    assert sorted(p.name for p in (tmp_path / "node1" / "emb").glob("part-*")) == [
        f"part-{k:05d}.parquet" for k in (1, 3)
    ]  # what rank 1 wrote, where rank 0 cannot see it
    assert not (tmp_path / "node0" / "emb" / "part-00001.parquet").exists()


@pytest.mark.distributed
def test_resume_from_a_run_dir_a_node_does_not_share_is_refused(tmp_path):
    from celldino.train import train

    prep = random_prep(tmp_path / "prep", n=8)
    train(
        tiny_config(tmp_path / "node0" / "run", "train.epochs=1", data=prep), stop_at_step=1
    )  # node 0's disk
    msgs = _two_ranks(tmp_path, "train")
    for m in msgs:
        assert m.startswith("DataError"), m
        assert "rank 0 resumes at step 1 but rank 1 finds no checkpoint" in m
        assert "every node shares" in m
