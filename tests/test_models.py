"""Backbone, channel modes, attention maps, registers, masks and the DINO head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from celldino.config import ModelConfig
from celldino.layers import DINOHead
from celldino.models import ChannelwiseModel, VisionTransformer, build_model


def small_vit(**kw) -> VisionTransformer:
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(img_size=32, patch_size=8, in_chans=2, embed_dim=48, depth=2, num_heads=3)
    args.update(kw)
    return VisionTransformer(**args).eval()


def test_attention_maps_are_softmax_qk_of_last_block():
    model = small_vit(num_registers=1)
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        out = model(x, return_attention=True)
        plain = model(x)
        # manual: tokens up to the last block, then softmax(q k^T / sqrt(d)) by hand
        t = model.prepare_tokens(x)
        t, _ = model.blocks[0](t)
        blk = model.blocks[1]
        h = F.layer_norm(t, (48,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
        qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias  # (B, T, 3D)
        q, k = qkv[..., :48], qkv[..., 48:96]
        T = t.shape[1]
        q = q.reshape(2, T, 3, 16).transpose(1, 2)
        k = k.reshape(2, T, 3, 16).transpose(1, 2)
        logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(16)
        manual = logits.exp() / logits.exp().sum(-1, keepdim=True)
    attn = out["attn"]
    assert attn.shape == (2, 3, 1 + 1 + 16, 1 + 1 + 16)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 18))
    torch.testing.assert_close(attn, manual, atol=1e-6, rtol=1e-5)
    # the explicit path computes the same tokens as the scaled_dot_product_attention path
    torch.testing.assert_close(out["cls"], plain["cls"], atol=1e-5, rtol=1e-5)


def test_blocks_hold_normed_class_token_of_every_block():
    model = small_vit(depth=3)
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        out = model(x, return_blocks=True)
        t = model.prepare_tokens(x)
        expected = []
        for blk in model.blocks:
            t, _ = blk(t)
            expected.append(model.norm(t[:, 0]))
    assert len(out["blocks"]) == 3
    for got, want in zip(out["blocks"], expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out["blocks"][-1], out["cls"])


def test_position_embeddings_follow_image_size():
    model = small_vit()
    with torch.no_grad():
        out = model(torch.randn(1, 2, 48, 40))
        pos = model.pos_embed_for(6, 5)
    assert out["patch"].shape == (1, 30, 48)
    # bicubic resampling of the 4x4 grid, computed independently
    grid = model.pos_embed[:, 1:].detach().reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 30, 48))
    torch.testing.assert_close(pos[:, :1], model.pos_embed[:, :1])
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        model(torch.randn(1, 2, 30, 32))


def test_wrong_channel_count_is_a_clear_error():
    model = small_vit()
    with pytest.raises(ValueError, match="takes 2 channels but the images have 5"):
        model(torch.randn(1, 5, 32, 32))


def test_channel_adaptive_takes_any_subset_and_order():
    model = small_vit(in_chans=5, channel_adaptive=True)
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        a = model(x[:, [3, 1]], channel_ids=torch.tensor([3, 1]))
        b = model(x[:, [1, 3]], channel_ids=torch.tensor([1, 3]))
        wrong = model(x[:, [1, 3]], channel_ids=torch.tensor([0, 2]))
        one = model(x[:, [4]], channel_ids=torch.tensor([4]))
        per_sample = model(x[:, [1, 3]], channel_ids=torch.tensor([[1, 3], [1, 3]]))
        full = model(x)
    # the order of channels does not matter: same class token, patch tokens permuted by channel
    torch.testing.assert_close(a["cls"], b["cls"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["patch"][:, :16], b["patch"][:, 16:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_sample["cls"], b["cls"])
    # the channel embedding matters: telling the model other channels changes the result
    assert (wrong["cls"] - b["cls"]).abs().max() > 1e-3
    assert one["patch"].shape == (2, 16, 48) and full["patch"].shape == (2, 80, 48)
    with pytest.raises(ValueError, match="0..4"):
        model(x[:, :2], channel_ids=torch.tensor([0, 7]))


def test_channelwise_concatenates_each_channel_through_rgb_backbone():
    backbone = small_vit(in_chans=3)
    model = ChannelwiseModel(backbone, num_chans=4).eval()
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        out = model(x, return_blocks=True, return_attention=True)
        alone = [backbone(x[:, c : c + 1].expand(-1, 3, -1, -1)) for c in range(4)]
    assert model.embed_dim == 4 * 48 and out["cls"].shape == (2, 192)
    want_cls = torch.cat([o["cls"] for o in alone], dim=1)
    want_patch = torch.cat([o["patch"] for o in alone], dim=2)
    torch.testing.assert_close(out["cls"], want_cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["patch"], want_patch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["blocks"][-1], out["cls"])
    assert out["attn"].shape == (2, 4 * 3, 17, 17)


def test_registers_sit_between_class_and_patch_tokens():
    model = small_vit(num_registers=4)
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        out = model(x)
        before = out["cls"].clone()
        model.register_tokens.normal_()
        after = model(x)["cls"]
    assert out["patch"].shape == (1, 16, 48) and out["registers"].shape == (1, 4, 48)
    assert (before - after).abs().max() > 1e-3  # registers take part in attention


def test_masked_patches_are_replaced_by_the_mask_token():
    model = small_vit()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(1, 2, 32, 32)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 0] = True  # the top-left patch
    y = x.clone()
    y[..., :8, :8] += 5.0  # change inside the masked patch
    z = x.clone()
    z[..., :8, 8:16] += 5.0  # change inside an unmasked patch
    with torch.no_grad():
        ref = model(x, masks=masks)["cls"]
        torch.testing.assert_close(model(y, masks=masks)["cls"], ref)
        assert (model(z, masks=masks)["cls"] - ref).abs().max() > 1e-3
        torch.testing.assert_close(model(x, masks=torch.zeros_like(masks))["cls"], model(x)["cls"])
    with pytest.raises(ValueError, match="masks"):
        model(x, masks=torch.zeros(1, 5, dtype=torch.bool))


def test_drop_path_only_in_training():
    model = small_vit(drop_path_rate=0.5)
    x = torch.randn(4, 2, 32, 32)
    with torch.no_grad():
        e1, e2 = model(x)["cls"], model(x)["cls"]
        model.train()
        torch.manual_seed(0)
        t1 = model(x)["cls"]
    torch.testing.assert_close(e1, e2)
    assert (t1 - e1).abs().max() > 1e-4


def test_dino_head_matches_torch_weight_norm():
    torch.manual_seed(0)
    head = DINOHead(48, 100, hidden_dim=64, bottleneck_dim=16, nlayers=3)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 100, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
        ref.parametrizations.weight.original0.fill_(1.0)
    x = torch.randn(5, 48)
    h = head.mlp(x)
    want = ref(h / h.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(head(x), want, atol=1e-6, rtol=1e-5)
    # the norm is fixed at 1: not a trainable parameter
    names = [n for n, _ in head.named_parameters()]
    assert "last_layer.weight_v" in names and "last_layer.weight_g" not in names
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(100))
    # official layout (weight_g/weight_v) and torch's parametrization layout both load
    other = DINOHead(48, 100, hidden_dim=64, bottleneck_dim=16)
    other.load_state_dict(head.state_dict())
    torch.testing.assert_close(other(x), head(x))
    sd = {k: v for k, v in head.state_dict().items() if not k.startswith("last_layer")}
    sd["last_layer.parametrizations.weight.original0"] = torch.ones(100, 1)
    sd["last_layer.parametrizations.weight.original1"] = head.last_layer.weight_v.detach()
    third = DINOHead(48, 100, hidden_dim=64, bottleneck_dim=16)
    third.load_state_dict(sd)
    torch.testing.assert_close(third(x), head(x))
    trainable = DINOHead(48, 100, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
    assert "last_layer.weight_g" in [n for n, _ in trainable.named_parameters()]


@pytest.mark.parametrize("mode", ["multichannel", "channelwise", "channel_adaptive"])
def test_build_model_contract(mode):
    cfg = ModelConfig(arch="vit_tiny", channel_mode=mode, in_chans=3, img_size=32, patch_size=16)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), return_blocks=True, return_attention=True)
    d = 192 * (3 if mode == "channelwise" else 1)
    n = 4 * (3 if mode == "channel_adaptive" else 1)
    assert model.embed_dim == d and out["cls"].shape == (2, d)
    assert out["patch"].shape == (2, n, d) and len(out["blocks"]) == 12
    assert out["attn"].shape[-1] == 1 + n


def test_build_model_rejects_unknown_settings():
    with pytest.raises(ValueError, match="vit_tiny, vit_small"):
        build_model(ModelConfig(arch="vit_huge"))
    with pytest.raises(ValueError, match="channel_mode"):
        build_model(ModelConfig(channel_mode="rgb"))
