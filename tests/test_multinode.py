"""Two torchrun "nodes" on localhost (gloo, CPU): `torchrun --nnodes=2 --nproc-per-node=1
--rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:<port> --node-rank=<0|1>` started twice, as SLURM's
`srun torchrun ...` starts it once per node (docs/cluster.md).

- `celldino train` on two nodes moves the weights as one process with the same global batch does,
  each rank reading its own half of every global batch (the rows each rank's loader yielded,
  against the single process's batches: the weights alone cannot tell, since every rank taking
  the whole global batch averages to the same gradient), and its checkpoint loads as a backbone.
- `celldino extract` on two nodes writes the single-process embeddings, row for row, each shard
  computed by one rank (both ranks computing every shard, or rank 0 all of them, would write
  the same files).
- A node lost in the middle of an extraction (its agent and worker SIGKILLed after its first
  shard): rerun on one process or on two nodes, only the shards not on disk are computed (the
  finished ones keep their files) and the result is the single-process one.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from celldino.config import ExtractConfig, ModelConfig
from celldino.extract import extract, read_embeddings
from celldino.extract.shard_plan import assign_shards
from celldino.io.checkpoints import write_safetensors
from celldino.io.configfile import save_config
from celldino.io.embeddings import read_manifest, shard_name
from celldino.models import build_model, load_backbone, resolve_checkpoint
from celldino.train import train
from train_helpers import DETERMINISTIC_AUG, one_thread, random_prep, tiny_config, weights  # noqa: F401

WORKER = str(Path(__file__).with_name("multinode_worker.py"))
N_CELLS, SHARD = 24, 2  # 12 shards of 2 cells


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path: Path, entry: list[str], name: str) -> list[tuple[int, str]]:
    """Run `entry` as two torchrun nodes with one c10d rendezvous; [(exit code, stderr)] by
    node. Node 0 starts first (it hosts the rendezvous store, as the SLURM recipe's first node
    does). The timeout only keeps a hung job from hanging the suite."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs, logs = [], []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={name}",
            f"--node-rank={node}",
            *entry,
        ]
        log = tmp_path / f"{name}.node{node}.log"
        logs.append(log)
        with log.open("w") as fh:
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    out = []
    for p, log in zip(procs, logs):
        try:
            rc = p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            pytest.fail(f"two-node torchrun did not finish: {log.read_text()[-3000:]}")
        out.append((rc, log.read_text()))
    return out


def _ranks(text: str) -> set[int]:
    return {int(r) for r in re.findall(r"distributed: gloo, rank (\d) of 2", text)}


# ---- training ----------------------------------------------------------------------------------


def _reported(texts: list[str], tag: str) -> dict[int, list]:
    """What the worker printed (`<tag> <rank> <value>` lines), by rank, in order."""
    out: dict[int, list] = {}
    for line in "\n".join(texts).splitlines():
        if line.startswith(f"{tag} "):
            _, rank, value = line.split(" ", 2)
            out.setdefault(int(rank), []).append(ast.literal_eval(value))
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_train_like_one_process(tmp_path, monkeypatch):
    from celldino.train import loop

    prep = random_prep(tmp_path / "prep", n=8)
    extra = (*DETERMINISTIC_AUG, "train.epochs=1", "train.freeze_last_layer=0", "train.lr=0.1")
    single = tiny_config(tmp_path / "single", *extra, data=prep)  # global batch 4: 2 steps
    batches: list[list[int]] = []  # the rows of each batch the single process trained on
    collate = loop._collate

    def reporting(items):
        batch = collate(items)
        batches.append(batch[-2].flatten().tolist())
        return batch

    monkeypatch.setattr(loop, "_collate", reporting)
    train(single)
    monkeypatch.undo()

    nodes = tiny_config(tmp_path / "nodes", *extra, data=prep)  # 2 nodes x 2 images
    cfg_path = save_config(nodes, tmp_path / "nodes.yaml")
    runs = _two_nodes(tmp_path, [WORKER, "train", str(cfg_path)], "train")  # the CLI's train
    for rc, text in runs:
        assert rc == 0, text[-3000:]
    assert [_ranks(t) for _, t in runs] in ([{0}, {1}], [{1}, {0}])  # one global rank per node
    # each step, the two ranks read disjoint halves of the single process's global batch
    rows = _reported([t for _, t in runs], "ROWS")
    assert len(batches) == 2 and sorted(rows) == [0, 1]
    assert len(rows[0]) == len(rows[1]) == len(batches)
    for a, b, whole in zip(rows[0], rows[1], batches):
        assert len(a) == len(b) == 2 and not set(a) & set(b)
        assert sorted(a + b) == sorted(whole)

    a, b = weights(tmp_path / "single"), weights(tmp_path / "nodes")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - b_ini).abs().max().item() for k, b_ini in _initial(single).items())
    assert moved > 1e-3  # training moved the weights ...
    assert worst < 1e-5  # ... and two nodes moved them as one process does

    model, mcfg = load_backbone(resolve_checkpoint(tmp_path / "nodes"), "teacher")  # it loads
    assert mcfg.arch == "vit_tiny"
    for k, v in model.state_dict().items():  # as the nodes trained it
        torch.testing.assert_close(v, b[f"teacher.backbone.{k}"], rtol=0, atol=0)


def _initial(cfg) -> dict[str, torch.Tensor]:
    from celldino.models.build import build_head
    from celldino.train.meta_arch import DINOMetaArch

    torch.manual_seed(cfg.train.seed)
    backbone = build_model(cfg.model)
    head = build_head(cfg.model, backbone.embed_dim)
    meta = DINOMetaArch(backbone, head, out_dim=cfg.model.out_dim)
    out = {f"student.{k}": v for k, v in meta.student.state_dict().items()}
    return out | {f"teacher.{k}": v for k, v in meta.teacher.state_dict().items()}


# ---- extraction --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    """(prep, checkpoint run dir, single-process embeddings) of 24 cells in 12 shards."""
    root = tmp_path_factory.mktemp("multinode")
    prep = random_prep(root / "prep", n=N_CELLS)
    mcfg = ModelConfig(arch="vit_tiny", patch_size=8, in_chans=2, img_size=16, drop_path_rate=0)
    torch.manual_seed(0)
    sd = {f"teacher.backbone.{k}": v for k, v in build_model(mcfg).state_dict().items()}
    run = root / "run"
    write_safetensors(
        run / "checkpoints" / "last.safetensors", sd, {"model_config": dataclasses.asdict(mcfg)}
    )
    before = torch.get_num_threads()
    single = read_embeddings(extract(_cfg(prep, run, root / "single")))
    torch.set_num_threads(before)
    return prep, run, single


def _overrides(prep: Path, run: Path, out: Path) -> list[str]:
    return [
        f"extract.checkpoint={run}",
        f"extract.data={prep}",
        f"extract.out_dir={out}",
        f"extract.shard_size={SHARD}",
        "extract.batch_size=2",
        "extract.device=cpu",
        "extract.threads=1",
    ]


def _cfg(prep: Path, run: Path, out: Path) -> ExtractConfig:
    from celldino.config import load_config

    return load_config(None, _overrides(prep, run, out)).extract


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_extract_equals_one_process(screen, tmp_path):
    prep, run, single = screen
    out = tmp_path / "two"
    runs = _two_nodes(tmp_path, [WORKER, "-1", *_overrides(prep, run, out)], "ex")  # none dies
    for rc, text in runs:
        assert rc == 0, text[-3000:]
    assert [_ranks(t) for _, t in runs] in ([{0}, {1}], [{1}, {0}])
    # every shard computed once, by the rank it was dealt (none done: shard k to rank k % 2)
    shards = _reported([t for _, t in runs], "SHARD")
    n = N_CELLS // SHARD
    assert {r: sorted(ks) for r, ks in shards.items()} == {
        r: [k for k in range(n) if k % 2 == r] for r in (0, 1)
    }
    m = read_manifest(out)
    assert m["complete"] and m["world_size"] == 2 and len(m["shards"]) == N_CELLS // SHARD
    df = read_embeddings(out)
    assert df["Metadata_CellID"].is_unique and len(df) == N_CELLS
    pd.testing.assert_frame_equal(df, single, check_exact=False, atol=1e-5, rtol=1e-5)


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """Shard name → (inode, mtime): a shard written again (atomic rename) gets a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("rerun_on", ["one process", "two nodes"])
def test_lost_node_extraction_resumes_its_unfinished_shards(screen, tmp_path, rerun_on):
    prep, run, single = screen
    out = tmp_path / "lost"
    args = _overrides(prep, run, out)
    runs = _two_nodes(tmp_path, [WORKER, "1", *args], "lost")  # rank 1's node dies
    assert any(rc != 0 for rc, _ in runs)  # the job failed ...
    assert not read_manifest(out)["complete"]  # ... and says the folder is unfinished
    before = _files(out)
    n_shards = N_CELLS // SHARD
    # rank 1 was dealt shards 1, 3, 5, ...: it wrote shard 1 and died before shard 3
    assert shard_name(1) in before and shard_name(3) not in before, sorted(before)
    todo = sorted(set(range(n_shards)) - {int(n[5:10]) for n in before})

    if rerun_on == "one process":
        redone: list[int] = []
        extract(_cfg(prep, run, out), after_shard=redone.append)
        assert sorted(redone) == todo  # only the unfinished shards were computed
        assert read_manifest(out)["world_size"] == 1
    else:
        again = _two_nodes(tmp_path, ["-m", "celldino", "extract", *args], "again")
        for rc, text in again:
            assert rc == 0, text[-3000:]
        text = "".join(t for _, t in again)
        assert f"{len(todo)} of {n_shards} shards to do on 2 processes" in text
        assert read_manifest(out)["world_size"] == 2
    after = _files(out)
    assert {k: after[k] for k in before} == before  # finished shards untouched
    assert len(after) == n_shards and read_manifest(out)["complete"]
    df = read_embeddings(out)
    assert df["Metadata_CellID"].is_unique
    pd.testing.assert_frame_equal(df, single, check_exact=False, atol=1e-5, rtol=1e-5)


# ---- the deal ----------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_unfinished_shards_are_dealt_to_every_rank_once(world):
    """After a lost node of two (every odd shard from 3 on unfinished), a rerun on W ranks gives
    each unfinished shard to exactly one rank, and every rank works (k % W gave them all to
    rank 1 when W = 2)."""
    n = 12
    done = {0, 1, 2, 4, 6, 8, 10}
    parts = [assign_shards(n, done, r, world) for r in range(world)]
    flat = [k for p in parts for k in p]
    assert sorted(flat) == [3, 5, 7, 9, 11]  # each unfinished shard once, none done
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert all(p == sorted(p) for p in parts)  # in row order within a rank
    with pytest.raises(ValueError, match="rank 2"):
        assign_shards(n, done, 2, 2)
