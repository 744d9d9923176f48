"""`torchrun --nproc_per_node=2 celldino train` (gloo, CPU) matches one process, same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from celldino.io.configfile import save_config
from celldino.train import train
from train_helpers import DETERMINISTIC_AUG, one_thread, random_prep, tiny_config, weights  # noqa: F401


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_ranks_match_single_process(tmp_path):
    prep = random_prep(tmp_path / "prep", n=8)
    extra = (*DETERMINISTIC_AUG, "train.epochs=2", "train.freeze_last_layer=0", "train.lr=0.1")
    single = tiny_config(tmp_path / "single", *extra, data=prep)  # global batch 4
    train(single)

    ddp = tiny_config(tmp_path / "ddp", *extra, data=prep)  # 2 ranks x 2 images
    cfg_path = save_config(ddp, tmp_path / "ddp.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "celldino",
        "train",
        str(cfg_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed: gloo, rank 0 of 2" in proc.stderr

    a, b = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - c).abs().max().item() for k, c in weights_init(single).items())
    print(f"max |single - ddp| = {worst:.2e}; max change by training = {moved:.2e}")
    assert moved > 1e-3  # training really moved the weights ...
    assert worst < 1e-5  # ... and both runs moved them the same way
    sa = torch.load(tmp_path / "single/checkpoints/last.state.pt", weights_only=True)
    sb = torch.load(tmp_path / "ddp/checkpoints/last.state.pt", weights_only=True)
    # the DINO centre is averaged over ranks with all_reduce: same as one process
    torch.testing.assert_close(sa["dino_center"], sb["dino_center"], rtol=0, atol=1e-6)


def weights_init(cfg) -> dict[str, torch.Tensor]:
    """The weights before training (student = teacher = the seeded initialisation)."""
    from celldino.models.build import build_head, build_model
    from celldino.train.meta_arch import DINOMetaArch

    torch.manual_seed(cfg.train.seed)
    backbone = build_model(cfg.model)
    head = build_head(cfg.model, backbone.embed_dim)
    meta = DINOMetaArch(backbone, head, out_dim=cfg.model.out_dim)
    out = {f"student.{k}": v for k, v in meta.student.state_dict().items()}
    return out | {f"teacher.{k}": v for k, v in meta.teacher.state_dict().items()}


def _diverged_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from celldino.train.loop import TrainingDiverged, _raise_if_diverged

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bad = torch.tensor(7 if rank == 1 else -1)  # only rank 1 saw a NaN loss, at step 7
        loss = torch.tensor(float("nan") if rank == 1 else 0.0)
        try:
            _raise_if_diverged(bad, loss)
            msg = "no error"
        except TrainingDiverged as e:
            msg = str(e)
        with open(f"{out}.{rank}", "w") as fh:
            fh.write(msg)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_a_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    """DDP averages one rank's NaN gradients into every rank's weights: rank 0, which saves,
    must refuse too (each rank checking only its own loss let rank 0 save NaN weights)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "msg")
    mp.spawn(_diverged_rank, args=(port, out), nprocs=2, join=True)
    msgs = [open(f"{out}.{r}").read() for r in (0, 1)]
    assert "at step 7" in msgs[0] and "another rank" in msgs[0]
    assert "loss is nan at step 7" in msgs[1]
