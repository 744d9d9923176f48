"""An interrupted and resumed run ends bit-identical to an uninterrupted one (CPU, same seed)."""

from __future__ import annotations

import torch

from celldino import cli
from celldino.io.configfile import save_config
from celldino.train import train
from train_helpers import one_thread, random_prep, tiny_config, weights  # noqa: F401

# every source of randomness on: augmentations (defaults), stochastic depth, iBOT masks, KoLeo
EXTRA = ("train.ibot_weight=0.5", "train.koleo_weight=0.1", "model.drop_path_rate=0.2")


def test_resume_mid_epoch_is_exact(tmp_path):
    prep = random_prep(tmp_path / "prep", n=8)
    straight = tiny_config(tmp_path / "straight", *EXTRA, data=prep)  # 2 epochs x 2 steps
    train(straight)

    cut = tiny_config(tmp_path / "cut", *EXTRA, data=prep)
    train(cut, stop_at_step=3)  # mid-epoch 2, after the frozen-last-layer epoch
    partial = weights(tmp_path / "cut")
    cfg_path = save_config(cut, tmp_path / "cut.yaml")
    assert cli.main(["train", str(cfg_path), "--resume"]) == 0

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and any(k.startswith("teacher.backbone.") for k in a)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"resumed run differs in {differing[:5]}"
    # and the resumed part really trained (the step-3 weights are not the final ones)
    assert not torch.equal(partial["student.backbone.pos_embed"], b["student.backbone.pos_embed"])
    sa = torch.load(tmp_path / "straight/checkpoints/last.state.pt", weights_only=True)
    sb = torch.load(tmp_path / "cut/checkpoints/last.state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 4
    assert torch.equal(sa["dino_center"], sb["dino_center"])
    assert torch.equal(sa["ibot_center"], sb["ibot_center"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"])
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    # metrics of the two runs agree line by line
    ma = (tmp_path / "straight/metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [ln.split('"images_per_s"')[0] for ln in lines]  # noqa: E731
    assert strip(ma) == strip(mb)


def test_resume_refuses_a_torn_checkpoint(tmp_path):
    prep = random_prep(tmp_path / "prep", n=8)
    cfg = tiny_config(tmp_path / "run", "train.epochs=1", data=prep)
    train(cfg, stop_at_step=1)
    state_path = tmp_path / "run/checkpoints/last.state.pt"
    state = torch.load(state_path, weights_only=True)
    state["step"] = 2  # as if killed between writing the weights and the state
    torch.save(state, state_path)
    cfg_path = save_config(cfg, tmp_path / "c.yaml")
    assert cli.main(["train", str(cfg_path), "--resume"]) == 2
