"""`build_model(ModelConfig)` and `load_backbone(path)`: the two ways to get a backbone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from celldino.config import ModelConfig
from celldino.io.checkpoints import (
    CheckpointError,
    check_finite,
    metadata_json,
    read_metadata,
    read_state_dict,
)
from celldino.io.trainrun import LAST_WEIGHTS, last_weights
from celldino.layers import DINOHead
from celldino.log import get_logger
from celldino.models.channel_modes import ChannelwiseModel
from celldino.models.pretrained import canonical_backbone_state, infer_spec, load_into
from celldino.models.vision_transformer import ARCHS, VisionTransformer

logger = get_logger(__name__)
CHANNEL_MODES = ("multichannel", "channelwise", "channel_adaptive")


def _vit_from_config(cfg: ModelConfig, in_chans: int, adaptive: bool) -> VisionTransformer:
    if cfg.arch not in ARCHS:
        raise ValueError(f"model.arch={cfg.arch!r} is not one of {', '.join(ARCHS)}")
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"model.img_size={cfg.img_size} is not a multiple of {cfg.patch_size}")
    dim, depth, heads = ARCHS[cfg.arch]
    depth = cfg.depth or depth
    return VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=in_chans,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        qkv_bias=cfg.qkv_bias,
        drop_path_rate=cfg.drop_path_rate,
        init_values=cfg.layerscale or None,
        num_registers=cfg.num_registers,
        channel_adaptive=adaptive,
    )


def build_model(cfg: ModelConfig, *, load_pretrained: bool = True) -> nn.Module:
    """The backbone described by `cfg` (with `cfg.pretrained` weights loaded when set).

    Returns a module whose forward(x, *, channel_ids, return_blocks, return_attention, masks)
    gives the dict described in `VisionTransformer.forward`; `.embed_dim` is the feature width.
    """
    if cfg.channel_mode not in CHANNEL_MODES:
        raise ValueError(f"model.channel_mode={cfg.channel_mode!r} is not one of {CHANNEL_MODES}")
    if cfg.channel_mode == "channelwise":
        if cfg.backbone_chans not in (1, 3):
            raise ValueError(f"model.backbone_chans must be 1 or 3, not {cfg.backbone_chans}")
        model: nn.Module = ChannelwiseModel(
            _vit_from_config(cfg, cfg.backbone_chans, False), cfg.in_chans
        )
    else:
        model = _vit_from_config(cfg, cfg.in_chans, cfg.channel_mode == "channel_adaptive")
    if cfg.pretrained and load_pretrained:
        path = resolve_checkpoint(cfg.pretrained)
        obj = read_state_dict(path)
        try:
            sd = canonical_backbone_state(obj, cfg.pretrained_which)
            load_into(model, sd)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: {e.args[0] if e.args else e}") from None
        check_finite(sd, path)
        logger.info("loaded pretrained %s weights from %s", cfg.pretrained_which, path)
    return model


def build_head(cfg: ModelConfig, in_dim: int) -> DINOHead:
    """The DINO projection head for a backbone of width `in_dim`."""
    return DINOHead(
        in_dim,
        cfg.out_dim,
        hidden_dim=cfg.head_hidden_dim,
        bottleneck_dim=cfg.head_bottleneck_dim,
        nlayers=cfg.head_nlayers,
        norm_last_layer=cfg.norm_last_layer,
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file or a celldino run dir (→ checkpoints/last.safetensors)."""
    p = Path(path)
    if p.is_dir():
        for cand in (last_weights(p), p / LAST_WEIGHTS):
            if cand.is_file():
                return cand
        raise CheckpointError(
            f"{p} is a folder without checkpoints/last.safetensors (is it a celldino run dir? "
            "train one with `celldino train`)"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def load_backbone(
    path: str | Path,
    which: str = "teacher",
    *,
    in_chans: int | None = None,
    channel_mode: str | None = None,
    img_size: int | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """(backbone in eval mode, its ModelConfig) from a celldino run/checkpoint or foreign weights.

    celldino checkpoints carry their ModelConfig and load exactly. Foreign checkpoints (DINO,
    DINOv2, DINO4Cells) give their architecture by their shapes; `in_chans` adapts the patch
    embedding to that many channels (see `pretrained.adapt_patch_kernel`), `channel_mode` wraps it
    (e.g. 'channelwise' for an RGB model on C channels) and `img_size` resamples the position grid.
    """
    file = resolve_checkpoint(path)
    meta = read_metadata(file)
    if "model_config" in meta:
        fields = metadata_json(file, "model_config")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        cfg = ModelConfig(
            **{
                k: v if not isinstance(v, list) else tuple(v)
                for k, v in fields.items()
                if k in known
            }
        )
        cfg = dataclasses.replace(cfg, pretrained="", drop_path_rate=0.0)
        model = build_model(cfg)
        obj = read_state_dict(file)
        prefix = f"{which}.backbone."
        sd = {k[len(prefix) :]: v for k, v in obj.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"{file} has no '{prefix}*' weights (keys: {list(obj)[:4]})")
        check_finite(sd, file)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{file} does not match its model_config: {e}") from None
        return model.eval(), cfg
    obj = read_state_dict(file)
    try:
        sd = canonical_backbone_state(obj, which)
        spec = infer_spec(sd)
    except (KeyError, ValueError) as e:
        msg = e.args[0] if e.args else str(e)
        if "model_config" in msg:
            how = (
                "celldino reads the architecture of its own checkpoints from that metadata, "
                "which `celldino train` writes; for other weights, save them again with it: "
                "celldino.io.checkpoints.write_safetensors(path, tensors, {'model_config': "
                "{'arch': ..., 'depth': ..., 'patch_size': ..., 'in_chans': ...}}), or train "
                "from them with model.arch=... model.depth=... model.pretrained="
                f"{file}"
            )
            msg = f"{msg}: {how}"
        raise CheckpointError(f"{file}: {msg}") from None
    check_finite(sd, file)
    if spec["depth"] != ARCHS[spec["arch"]][1]:
        logger.info(
            "%s has no celldino model_config metadata: read as %s cut to depth %d (from its "
            "shapes; %d heads as in %s)",
            file,
            spec["arch"],
            spec["depth"],
            ARCHS[spec["arch"]][2],
            spec["arch"],
        )
    mode = channel_mode or ("channel_adaptive" if spec["channel_adaptive"] else "multichannel")
    cfg = ModelConfig(
        arch=spec["arch"],
        depth=spec["depth"] if spec["depth"] != ARCHS[spec["arch"]][1] else 0,
        patch_size=spec["patch_size"],
        channel_mode=mode,
        in_chans=in_chans or spec["in_chans"],
        backbone_chans=spec["in_chans"] if mode == "channelwise" else 3,
        img_size=img_size or spec["img_size"],
        num_registers=spec["num_registers"],
        layerscale=1e-5 if spec["layerscale"] else 0.0,
        qkv_bias=spec["qkv_bias"],
        drop_path_rate=0.0,
        pretrained=str(file),
        pretrained_which=which,
    )
    model = build_model(cfg, load_pretrained=False)  # the file is read once, here
    try:
        load_into(model, sd)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{file}: {e.args[0] if e.args else e}") from None
    return model.eval(), cfg
