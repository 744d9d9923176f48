"""Training parts: exact EMA, WS-DINO sampler, rank sharding, masks, frozen last layer, CLI."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from celldino import cli
from celldino.train import train
from celldino.train.loop import sample_masks, step_generator
from celldino.train.meta_arch import ema_update
from celldino.train.sampler import StepBatchSampler, WeakLabelPairSampler
from train_helpers import one_thread, random_prep, tiny_config, weights  # noqa: F401


def test_ema_update_is_exact():
    # dyadic values and momentum: every product and sum is exact in float32
    teacher = nn.Linear(3, 2)
    student = nn.Linear(3, 2)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [0.25, 4.0, -0.75]]))
        teacher.bias.copy_(torch.tensor([1.0, -2.0]))
        student.weight.copy_(torch.tensor([[1.5, 3.0, -2.0], [0.75, 0.0, 1.25]]))
        student.bias.copy_(torch.tensor([-1.0, 6.0]))
    ema_update(teacher, student, 0.75)
    want_w = [
        [0.75 * 0.5 + 0.25 * 1.5, 0.75 * -1 + 0.25 * 3, 0.75 * 2 + 0.25 * -2],
        [0.75 * 0.25 + 0.25 * 0.75, 0.75 * 4, 0.75 * -0.75 + 0.25 * 1.25],
    ]
    assert teacher.weight.tolist() == want_w
    assert teacher.bias.tolist() == [0.75 * 1 + 0.25 * -1, 0.75 * -2 + 0.25 * 6]
    assert student.bias.tolist() == [-1.0, 6.0]  # the student is untouched


def test_per_tensor_clipping_matches_original_dino():
    from celldino.train.meta_arch import clip_gradients

    def dino_clip_gradients(model, clip):  # facebookresearch/dino utils.clip_gradients
        for p in model.parameters():
            if p.grad is not None:
                param_norm = p.grad.data.norm(2)
                clip_coef = clip / (param_norm + 1e-6)
                if clip_coef < 1:
                    p.grad.data.mul_(clip_coef)

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    a[0].weight.grad = torch.randn(5, 6) * 10  # above the limit: scaled
    a[0].bias.grad = torch.randn(5) * 1e-3  # below: untouched
    a[1].weight.grad = torch.randn(3, 5)
    b = [p.grad.clone() for p in a.parameters() if p.grad is not None]
    ref = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    for p, q in zip(ref.parameters(), a.parameters(), strict=True):
        p.grad = None if q.grad is None else q.grad.clone()
    clip_gradients(a.parameters(), 0.5, "per_tensor")
    dino_clip_gradients(ref, 0.5)
    for p, q in zip(a.parameters(), ref.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
    assert torch.equal(a[0].bias.grad, b[1])
    assert float(a[0].weight.grad.norm()) == pytest.approx(0.5, rel=1e-4)
    # global: one factor for every gradient (torch's clip_grad_norm_): directions kept
    for p, t in zip((p for p in a.parameters() if p.grad is not None), b, strict=True):
        p.grad = t.clone()
    clip_gradients(a.parameters(), 0.5, "global")
    grads = [p.grad for p in a.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert float(total) == pytest.approx(0.5, rel=1e-4)
    ratio = float(grads[0].norm() / b[0].norm())
    assert float(grads[2].norm() / b[2].norm()) == pytest.approx(ratio, rel=1e-4)


def test_step_sampler_shards_by_rank_and_resumes():
    full = StepBatchSampler(20, 8, seed=3)
    full.set_epoch(1)
    batches = list(full)
    assert len(batches) == 2 and all(len(b) == 8 for b in batches)  # last partial batch dropped
    ranks = [StepBatchSampler(20, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    shards = [list(s) for s in ranks]
    for step in range(2):  # the two ranks' shares make up the single-process batch
        assert shards[0][step] + shards[1][step] == batches[step]
    full.set_epoch(1, start_step=1)
    assert list(full) == batches[1:]  # resuming skips exactly the done steps
    full.set_epoch(2)
    assert list(full) != batches  # a new order every epoch
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(20, 7, world_size=2)


def test_ws_dino_pairs_share_weak_label_and_balance_groups():
    # a very unbalanced labelling: 60 / 30 / 6 / 4 images
    labels = ["A"] * 60 + ["B"] * 30 + ["C"] * 6 + ["D"] * 4
    s = WeakLabelPairSampler(labels, 10, seed=0)
    counts: Counter = Counter()
    for epoch in range(20):
        s.set_epoch(epoch)
        for batch in s:
            for i, j in batch:
                assert labels[i] == labels[j]  # the pair shares the weak label
                assert i != j  # and is two different images
                counts[labels[i]] += 1
    total = sum(counts.values())
    assert total == 20 * 100
    for g in "ABCD":  # balanced: each group ~ 1/4 of the pairs despite sizes 60..4
        assert abs(counts[g] / total - 0.25) < 0.03, counts
    with pytest.raises(ValueError, match="missing"):
        WeakLabelPairSampler(["A", "", "B", "B"], 2)


def test_masks_and_step_generator_are_deterministic():
    g1, g2 = step_generator(0, 5, 0), step_generator(0, 5, 0)
    m1 = sample_masks(8, 16, ratio=(0.25, 0.5), prob=0.5, generator=g1)
    m2 = sample_masks(8, 16, ratio=(0.25, 0.5), prob=0.5, generator=g2)
    assert torch.equal(m1, m2)
    per_image = m1.sum(1)
    assert int((per_image > 0).sum()) == 4  # half of the images are masked
    assert all(4 <= int(k) <= 8 for k in per_image[per_image > 0])  # 25-50 % of 16 patches
    other = sample_masks(8, 16, ratio=(0.25, 0.5), prob=0.5, generator=step_generator(0, 6, 0))
    assert not torch.equal(m1, other)


def test_cli_train_writes_run_and_freezes_last_layer(tmp_path):
    prep = random_prep(tmp_path / "prep")
    run = tmp_path / "run"
    cfg = tiny_config(run, data=prep)
    # last layer frozen for the first of 2 epochs: after epoch 1 it equals its initial value
    cfg_path = tmp_path / "c.yaml"
    from celldino.io.configfile import save_config

    save_config(cfg, cfg_path)
    assert cli.main(["train", str(cfg_path), "train.epochs=1", "train.ibot_weight=0.5"]) == 0
    w1 = weights(run)
    torch.manual_seed(cfg.train.seed)  # the model's initial weights, rebuilt independently
    from celldino.models.build import build_head, build_model

    init_head = build_head(cfg.model, build_model(cfg.model).embed_dim)
    key = "last_layer.weight_v"
    assert torch.equal(w1[f"student.head.{key}"], init_head.state_dict()[key])
    assert not torch.equal(w1["student.head.mlp.0.weight"], init_head.state_dict()["mlp.0.weight"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for key in ("loss", "lr", "momentum", "teacher_entropy", "kl_student_teacher", "embedding_std"):
        assert all(np.isfinite(r[key]) for r in lines), key
    assert lines[0]["loss_ibot"] > 0
    saved = (run / "config.yaml").read_text()
    assert "ibot_weight: 0.5" in saved
    from celldino.io.checkpoints import checkpoint_crop_size  # extract resizes cells to it

    assert checkpoint_crop_size(run / "checkpoints" / "last.safetensors") == (
        cfg.augment.global_crop_size
    )
    # a second run into the same folder without --resume is refused
    assert cli.main(["train", str(cfg_path), "train.epochs=1"]) != 0


def test_fine_tune_starts_from_pretrained_teacher(tmp_path):
    prep = random_prep(tmp_path / "prep")
    first = tiny_config(tmp_path / "first", "train.epochs=1", data=prep)
    train(first)
    # lr 0: the fine-tuned run must keep exactly the weights it started from
    ft = tiny_config(
        tmp_path / "ft",
        "train.epochs=1",
        "train.lr=0",
        "train.min_lr=0",
        f"model.pretrained={tmp_path / 'first'}",
        data=prep,
    )
    train(ft)
    a, b = weights(tmp_path / "first"), weights(tmp_path / "ft")
    backbone = [k for k in a if k.startswith("teacher.backbone.")]
    assert backbone
    for k in backbone:
        assert torch.equal(a[k], b[k]), k  # teacher of run 1 → teacher of the fine-tuned run
        assert torch.equal(a[k], b[k.replace("teacher.", "student.", 1)]), k


def test_ws_dino_training_and_bad_weak_label(tmp_path):
    prep = random_prep(tmp_path / "prep")
    cfg = tiny_config(
        tmp_path / "ws", "train.epochs=1", "train.weak_label=Metadata_Compound", data=prep
    )
    train(cfg)
    lines = (tmp_path / "ws" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(np.isfinite(json.loads(x)["loss"]) for x in lines)
    bad = tiny_config(tmp_path / "bad", "train.weak_label=Metadata_Nope", data=prep)
    with pytest.raises(ValueError, match="Metadata_Nope.*Metadata_Compound"):
        train(bad)


def test_teacher_is_deterministic_while_student_trains():
    from celldino.models.build import build_head, build_model
    from celldino.train.meta_arch import DINOMetaArch

    cfg = tiny_config("unused", "model.drop_path_rate=0.5")
    backbone = build_model(cfg.model)
    meta = DINOMetaArch(backbone, build_head(cfg.model, backbone.embed_dim), out_dim=32).train()
    assert meta.student.training and not meta.teacher.training
    x = [torch.rand(3, 2, 16, 16)]
    assert torch.equal(meta.teacher(x)["head"], meta.teacher(x)["head"])  # no stochastic depth
    assert not torch.equal(meta.student(x)["head"], meta.student(x)["head"])
