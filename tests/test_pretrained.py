"""Pretrained weights in the official layouts load and compute what their source computes.

Independent references are HF transformers' `ViTModel` (official DINO ViT layout, DINO4Cells)
and `Dinov2WithRegistersModel` (DINOv2 layout with LayerScale, registers and mask token), given
random weights that are then written out under the official key names.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from celldino.config import ModelConfig, to_dict
from celldino.io.checkpoints import CheckpointError, read_state_dict, write_safetensors
from celldino.layers import DINOHead
from celldino.models import build_head, build_model, load_backbone

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3)  # = vit_tiny


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere (norms around 1), so no parameter can be silently ignored."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "token" in name or "position" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.05 * noise)
    return model.eval()


_BUILT: dict = {}


def hf_vit(in_chans: int, image_size: int, seed: int):
    """A randomised HF ViT-tiny (built once per shape: HF construction is slow, copies are not)."""
    key = ("vit", in_chans, image_size)
    if key not in _BUILT:
        _BUILT[key] = _hf_vit(in_chans, image_size)
    return randomize(copy.deepcopy(_BUILT[key]), seed)


def _hf_vit(in_chans: int, image_size: int):
    cfg = transformers.ViTConfig(
        **TINY,
        intermediate_size=768,
        image_size=image_size,
        patch_size=16,
        num_channels=in_chans,
        layer_norm_eps=1e-6,
        attn_implementation="eager",  # plain softmax attention: independent of our SDPA path
    )
    return transformers.ViTModel(cfg, add_pooling_layer=False)


def hf_dinov2(image_size: int, registers: int, seed: int):
    cfg = transformers.Dinov2WithRegistersConfig(
        **TINY,
        mlp_ratio=4,
        image_size=image_size,
        patch_size=14,
        num_channels=3,
        num_register_tokens=registers,
        layer_norm_eps=1e-6,
        attn_implementation="eager",
    )
    return randomize(transformers.Dinov2WithRegistersModel(cfg), seed)


def to_official(hf_sd: dict, *, dinov2: bool) -> dict:
    """HF key names → official DINO / DINOv2 release names (qkv fused)."""
    layer = "encoder.layer" if dinov2 else "layers"
    n1, n2 = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
    out = {
        "cls_token": hf_sd["embeddings.cls_token"],
        "pos_embed": hf_sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf_sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_sd["layernorm.weight"],
        "norm.bias": hf_sd["layernorm.bias"],
    }
    if dinov2:
        out["mask_token"] = hf_sd["embeddings.mask_token"]
        if hf_sd.get("embeddings.register_tokens", torch.zeros(0)).numel():
            out["register_tokens"] = hf_sd["embeddings.register_tokens"]
    for i in range(12):
        s, b = f"{layer}.{i}.", f"blocks.{i}."
        a = s + "attention."
        for t in ("weight", "bias"):
            out[b + "attn.qkv." + t] = torch.cat([hf_sd[a + f"{x}_proj.{t}"] for x in "qkv"])
            out[b + "attn.proj." + t] = hf_sd[a + "o_proj." + t]
            out[b + "norm1." + t] = hf_sd[s + n1 + "." + t]
            out[b + "norm2." + t] = hf_sd[s + n2 + "." + t]
            out[b + "mlp.fc1." + t] = hf_sd[s + "mlp.fc1." + t]
            out[b + "mlp.fc2." + t] = hf_sd[s + "mlp.fc2." + t]
        if dinov2:
            out[b + "ls1.gamma"] = hf_sd[s + "layer_scale1.lambda1"]
            out[b + "ls2.gamma"] = hf_sd[s + "layer_scale2.lambda1"]
    return {k: v.clone() for k, v in out.items()}


def test_dino_layout_matches_hf_vit(tmp_path):
    hf = hf_vit(3, 32, seed=1)
    path = tmp_path / "dino_vittiny16_pretrain.pth"
    torch.save(to_official(hf.state_dict(), dinov2=False), path)  # flat backbone, as released
    model, cfg = load_backbone(path)
    assert (cfg.arch, cfg.patch_size, cfg.in_chans, cfg.img_size) == ("vit_tiny", 16, 3, 32)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state  # after HF's final layernorm
        out = model(x)
    torch.testing.assert_close(out["cls"], ref[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["patch"], ref[:, 1:], atol=1e-4, rtol=0)
    # other image sizes: our bicubic position resampling equals HF's interpolate_pos_encoding
    y = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref = hf(pixel_values=y, interpolate_pos_encoding=True).last_hidden_state
        out = model(y)
        resized, _ = load_backbone(path, img_size=64)  # grid resampled once, at load time
        sq = torch.randn(1, 3, 64, 64)
        want = hf(pixel_values=sq, interpolate_pos_encoding=True).last_hidden_state[:, 0]
        got = resized(sq)["cls"]
    torch.testing.assert_close(out["cls"], ref[:, 0], atol=1e-4, rtol=0)
    assert resized.pos_embed.shape == (1, 1 + 16, 192)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_rgb_weights_adapted_to_five_channels_preserve_grey_images(tmp_path):
    hf = hf_vit(3, 32, seed=2)
    path = tmp_path / "dino.safetensors"
    save_file(to_official(hf.state_dict(), dinov2=False), str(path))
    model, cfg = load_backbone(path, in_chans=5)
    w = model.patch_embed.proj.weight
    rgb = hf.embeddings.patch_embeddings.projection.weight
    assert cfg.in_chans == 5 and w.shape[1] == 5
    # documented rule: mean of the RGB kernels, times 3/5, in every channel
    torch.testing.assert_close(w[:, 2], rgb.mean(1) * 3 / 5)
    grey = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=grey.expand(-1, 3, -1, -1)).last_hidden_state[:, 0]
        got = model(grey.expand(-1, 5, -1, -1))["cls"]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # the same RGB model used channelwise: each channel replicated to RGB, features concatenated
    cw, cfg = load_backbone(path, in_chans=4, channel_mode="channelwise")
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        got = cw(x)["cls"]
        want = torch.cat(
            [
                hf(pixel_values=x[:, c : c + 1].expand(-1, 3, -1, -1)).last_hidden_state[:, 0]
                for c in range(4)
            ],
            dim=1,
        )
    assert cw.embed_dim == 4 * 192 and cfg.channel_mode == "channelwise"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # channel_adaptive from RGB weights: one shared kernel = sum of the RGB kernels (C = 1)
    ca, _ = load_backbone(path, in_chans=5, channel_mode="channel_adaptive")
    torch.testing.assert_close(ca.patch_embed.proj.weight[:, 0], rgb.sum(1))


@pytest.mark.parametrize("chunked", [False, True])
def test_dinov2_layout_with_registers_matches_hf(tmp_path, chunked):
    hf = hf_dinov2(28, registers=4, seed=3)
    sd = to_official(hf.state_dict(), dinov2=True)
    if chunked:  # DINOv2 block_chunks naming: blocks.<chunk>.<index>.
        sd = {
            k.replace("blocks.", f"blocks.{int(k.split('.')[1]) // 4}.", 1)
            if k.startswith("blocks.")
            else k: v
            for k, v in sd.items()
        }
        # ... inside a DINOv2 training checkpoint: {'model': {'teacher.backbone.*': ...}}
        sd = {"model": {f"teacher.backbone.{k}": v for k, v in sd.items()}, "iteration": 5}
    path = tmp_path / "dinov2_vits14_reg4.pth"
    torch.save(sd, path)
    model, cfg = load_backbone(path)
    assert (cfg.patch_size, cfg.num_registers, cfg.layerscale > 0) == (14, 4, True)
    x = torch.randn(2, 3, 28, 28)
    masks = torch.tensor([[True, False, False, True], [False, False, True, False]])
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state  # [cls, 4 registers, 4 patches]
        out = model(x)
        ref_m = hf(pixel_values=x, bool_masked_pos=masks).last_hidden_state
        out_m = model(x, masks=masks)
    torch.testing.assert_close(out["cls"], ref[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["registers"], ref[:, 1:5], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["patch"], ref[:, 5:], atol=1e-4, rtol=0)
    torch.testing.assert_close(out_m["cls"], ref_m[:, 0], atol=1e-4, rtol=0)  # iBOT masking


@pytest.mark.slow
def test_dinov2_release_grid_518(tmp_path):
    hf = hf_dinov2(518, registers=0, seed=4)
    path = tmp_path / "dinov2_vits14.pth"
    torch.save(to_official(hf.state_dict(), dinov2=True), path)
    model, cfg = load_backbone(path)
    assert cfg.img_size == 518 and model.pos_embed.shape == (1, 1 + 37 * 37, 192)
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x)["cls"], hf(pixel_values=x).last_hidden_state[:, 0], atol=1e-4, rtol=0
        )
    small, cfg = load_backbone(path, img_size=224)
    assert cfg.img_size == 224 and small.pos_embed.shape == (1, 1 + 16 * 16, 192)


def test_dino4cells_nested_checkpoint_teacher_and_student(tmp_path):
    teacher, student = hf_vit(4, 32, seed=5), hf_vit(4, 32, seed=6)
    t = to_official(teacher.state_dict(), dinov2=False)
    s = to_official(student.state_dict(), dinov2=False)
    head = DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16).state_dict()
    ckpt = {
        "teacher": {
            **{"backbone." + k: v for k, v in t.items()},
            **{"head." + k: v for k, v in head.items()},
        },
        "student": {
            **{"module.backbone." + k: v for k, v in s.items()},
            **{"module.head." + k: v for k, v in head.items()},
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, num_channels=4),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }
    path = tmp_path / "DINO_cell_checkpoint.pth"
    torch.save(ckpt, path)
    x = torch.randn(2, 4, 32, 32)
    for which, ref_model in (("teacher", teacher), ("student", student)):
        model, cfg = load_backbone(path, which=which)
        assert cfg.in_chans == 4 and cfg.pretrained_which == which
        with torch.no_grad():
            ref = ref_model(pixel_values=x).last_hidden_state[:, 0]
            torch.testing.assert_close(model(x)["cls"], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["channel_adaptive", "channelwise"])
def test_celldino_checkpoint_round_trip(tmp_path, mode):
    cfg = ModelConfig(
        arch="vit_tiny",
        channel_mode=mode,
        in_chans=3,
        backbone_chans=1,
        img_size=32,
        num_registers=2,
        layerscale=0.1,
    )
    torch.manual_seed(0)
    teacher, student = build_model(cfg).eval(), build_model(cfg).eval()
    head = build_head(
        ModelConfig(out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8), teacher.embed_dim
    )
    tensors = {}
    for name, net in (("teacher", teacher), ("student", student)):
        tensors.update({f"{name}.backbone.{k}": v for k, v in net.state_dict().items()})
        tensors.update({f"{name}.head.{k}": v for k, v in head.state_dict().items()})
    run = tmp_path / "run"
    write_safetensors(
        run / "checkpoints" / "last.safetensors",
        tensors,
        {"model_config": json.dumps(to_dict(cfg))},
    )
    model, got_cfg = load_backbone(run)
    assert got_cfg.channel_mode == mode and got_cfg.num_registers == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["cls"], teacher(x)["cls"])
        student_model, _ = load_backbone(run / "checkpoints" / "last.safetensors", which="student")
        torch.testing.assert_close(student_model(x)["cls"], student(x)["cls"])
        # fine-tuning start: build_model with `pretrained` pointing at the run
        warm = build_model(ModelConfig(**{**to_dict(cfg), "pretrained": str(run)})).eval()
        torch.testing.assert_close(warm(x)["cls"], teacher(x)["cls"])


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil_checkpoint.pth"
    torch.save({"teacher": {"cls_token": torch.zeros(1, 1, 192)}, "payload": Evil()}, path)
    for load in (read_state_dict, load_backbone):
        with pytest.raises(CheckpointError) as e:
            load(path)
        assert str(path) in str(e.value) and "refusing to load" in str(e.value)
        assert "system" in str(e.value)  # says what was refused
    assert not marker.exists()


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="last.safetensors"):
        load_backbone(tmp_path)
    junk = tmp_path / "notvit.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, junk)
    with pytest.raises(CheckpointError, match="no ViT backbone found"):
        load_backbone(junk)
    hf = hf_vit(3, 32, seed=7)
    rgb = tmp_path / "rgb.pth"
    torch.save(to_official(hf.state_dict(), dinov2=False), rgb)
    cfg = ModelConfig(arch="vit_small", in_chans=3, img_size=32, pretrained=str(rgb))
    with pytest.raises(CheckpointError, match=r"rgb.pth.*does not fit"):
        build_model(cfg)
    cfg = ModelConfig(
        arch="vit_tiny", in_chans=3, img_size=32, layerscale=1e-5, pretrained=str(rgb)
    )
    with pytest.raises(CheckpointError, match="layerscale"):
        build_model(cfg)


def test_foreign_channel_adaptive_checkpoint_keeps_its_channel_table(tmp_path):
    """Without celldino metadata the architecture comes from the shapes; a channel-adaptive
    kernel sees one channel, so the channel count must come from the channel table."""
    cfg = ModelConfig(
        arch="vit_tiny",
        patch_size=8,
        img_size=32,
        in_chans=5,
        channel_mode="channel_adaptive",
        drop_path_rate=0.0,
    )
    torch.manual_seed(0)
    src = build_model(cfg).eval()
    path = tmp_path / "adaptive.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}}, path)
    model, got = load_backbone(path)
    assert got.channel_mode == "channel_adaptive" and got.in_chans == 5
    x = torch.rand(2, 3, 32, 32)
    ids = torch.tensor([4, 0, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, channel_ids=ids)["cls"], src(x, channel_ids=ids)["cls"])
