"""The GPU-minded parts of the training loop, checked on the CPU: no host sync per step, the
divergence refusal that replaced the per-step `loss.item()`, `train.compile`, and AdamW's update
kernel chosen by device whatever the resumed checkpoint used."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from celldino.train import train
from celldino.train.loop import TrainingDiverged, _collate, _set_update_kernel
from train_helpers import random_prep, tiny_config, write_prep

SRC = Path(__file__).resolve().parents[1] / "src" / "celldino"
WATCHED = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def _count_host_reads(monkeypatch) -> list[str]:
    """Record every tensor → Python conversion made by the training loop, the meta-architecture
    or the losses (on a GPU each one waits for the device)."""
    where = (SRC / "train" / "loop.py", SRC / "train" / "meta_arch.py", SRC / "losses")
    seen: list[str] = []
    for name in WATCHED:
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            f = sys._getframe(1).f_code.co_filename
            if any(f == str(w) or f.startswith(str(w) + "/") for w in where):
                seen.append(f"{Path(f).name}:{sys._getframe(1).f_lineno} {_name}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return seen


def test_no_host_sync_per_step(tmp_path, monkeypatch):
    """With one log at the end, a 2-step and a 4-step epoch read the same number of tensor
    values on the host: nothing per step (the divergence check waits for the log steps).
    Logging every step does read values per step: the recorder can fail."""
    counts = {}
    for n, log_every in ((8, 1000), (16, 1000), (16, 1)):  # batch 4: 2 or 4 steps in the epoch
        prep = tmp_path / f"prep{n}"
        if not prep.exists():
            random_prep(prep, n=n)
        run = tmp_path / f"run{n}_{log_every}"
        cfg = tiny_config(run, "train.epochs=1", f"train.log_every={log_every}", data=prep)
        with monkeypatch.context() as m:
            seen = _count_host_reads(m)
            train(cfg)
        counts[n, log_every] = list(seen)
    assert counts[8, 1000], "the recorder saw nothing: it would pass whatever the loop did"
    assert len(counts[8, 1000]) == len(counts[16, 1000]), (counts[8, 1000], counts[16, 1000])
    assert len(counts[16, 1]) > len(counts[16, 1000])


def test_divergence_is_refused_before_any_checkpoint(tmp_path):
    """Finite crops of 3e38 overflow the patch embedding: the loss is NaN at step 0. Checked at
    the first save (not every step), the run stops naming step 0 and writes no weights."""
    rng = np.random.default_rng(0)
    crops = (rng.random((8, 2, 16, 16), dtype=np.float32) * np.float32(3e38)).astype(np.float32)
    assert np.isfinite(crops).all()
    meta = pd.DataFrame({"Metadata_CellID": [f"c{i}" for i in range(8)], "Metadata_Plate": "P1"})
    prep = write_prep(tmp_path / "prep", crops, meta)
    run = tmp_path / "run"
    cfg = tiny_config(run, "train.log_every=100", data=prep)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 0: lower train\.lr"):
        train(cfg)
    assert not (run / "checkpoints" / "last.safetensors").exists()


def test_collate_marks_nonfinite_images():
    good, bad = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)
    bad[1, 2, 3] = float("inf")
    batch = _collate([(good, good, torch.tensor([0, 1])), (good, bad, torch.tensor([2, 3]))])
    *tensors, rows, finite = batch
    assert [t.shape for t in tensors] == [(2, 2, 4, 4)] * 2
    np.testing.assert_array_equal(finite, [[True, True], [True, False]])
    assert rows.numpy()[~finite].tolist() == [3]


def test_compile_compiles_both_backbones_in_place(tmp_path, monkeypatch):
    """train.compile=true calls Module.compile on the student's and the teacher's backbone; in
    place, so the checkpoint's tensor names are the module's. The compiling itself is left to
    bench/gpu_check.py: inductor took ~45 s per crop size for a 2-block ViT on this 2-core CPU."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    prep = random_prep(tmp_path / "prep", n=4)
    train(tiny_config(tmp_path / "run", "train.epochs=1", "train.compile=true", data=prep))
    assert len(compiled) == 2 and compiled[0] is not compiled[1]
    assert all(type(m).__name__ == "VisionTransformer" for m in compiled)


def test_update_kernel_switch_keeps_the_update():
    """A foreach AdamW state switched to the fused kernel (CPU has one since torch 2.4) takes the
    same next step as foreach itself."""

    def make():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5, 3))
        opt = torch.optim.AdamW([w], lr=0.1, foreach=True)
        for _ in range(3):
            opt.zero_grad()
            (w**2).sum().backward()
            opt.step()
        return w, opt

    (w1, o1), (w2, o2) = make(), make()
    _set_update_kernel(o2, fused=True)
    assert o2.param_groups[0]["fused"] and not o2.param_groups[0]["foreach"]
    for w, o in ((w1, o1), (w2, o2)):
        o.zero_grad()
        (w**2).sum().backward()
        o.step()
    torch.testing.assert_close(w1, w2, rtol=0, atol=1e-6)
    assert not torch.equal(w1.detach(), make()[0].detach())  # the step moved the weights


def test_ibot_tokens_picked_by_cpu_index_equal_boolean_indexing():
    """The masked patch tokens picked with the CPU-computed index (no host sync on a GPU) are
    those of boolean indexing, in the same order, and the iBOT loss is the same either way."""
    from celldino.models.build import build_head, build_model
    from celldino.train.loop import sample_masks
    from celldino.train.meta_arch import DINOMetaArch

    cfg = tiny_config(Path("unused"), "train.ibot_weight=0.5")
    torch.manual_seed(0)
    backbone = build_model(cfg.model)
    head = build_head(cfg.model, backbone.embed_dim)
    meta = DINOMetaArch(backbone, head, out_dim=cfg.model.out_dim, ibot_weight=0.5).eval()
    g = torch.Generator().manual_seed(1)
    crops = [torch.rand(3, 2, 16, 16, generator=g) for _ in range(2)]
    local = [torch.rand(3, 2, 8, 8, generator=g)]
    masks = sample_masks(6, 4, ratio=(0.2, 0.6), prob=0.7, generator=g)
    assert masks.any() and not masks.all()
    index = masks.flatten().nonzero().squeeze(1)
    with torch.no_grad():
        out = meta.student(crops, masks=masks, mask_index=index)
        tokens = backbone(torch.cat(crops), masks=masks)["patch"]
        torch.testing.assert_close(out["patch_head"], head(tokens[masks]), rtol=0, atol=1e-6)
        a, _ = meta.forward_losses(crops, local, teacher_temp=0.04, masks=masks)
        meta.dino_loss.center.zero_()
        meta.ibot_loss.center.zero_()
        b, _ = meta.forward_losses(crops, local, teacher_temp=0.04, masks=masks, mask_index=index)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
