"""Pretrained weights: key mapping of foreign layouts, channel adaptation, position resampling.

Layouts understood (all end up in the parameter names of `VisionTransformer`):
- official DINO ViT release: `cls_token`, `pos_embed`, `patch_embed.proj.weight`,
  `blocks.N.attn.qkv.weight`, ... (flat backbone state dict);
- DINO training checkpoints and DINO4Cells: {'teacher': {...}, 'student': {...}, ...} with
  `module.` and `backbone.` prefixes (the head's keys are dropped);
- DINOv2: as DINO plus `blocks.N.ls1.gamma`/`ls2.gamma` (LayerScale), `register_tokens`,
  `mask_token`, position embeddings for 518 px (37 × 37 grid at patch 14), and `blocks.K.N.`
  chunked block names;
- celldino checkpoints: keys `teacher.backbone.*` / `student.backbone.*`.

Channel rule (3 → C channels): every new channel's kernel is the mean of the source channels'
kernels scaled by C_src / C, so an image whose channels are all equal (a grey image) gives the
same patch embedding as before. (C = 1 covers channel-adaptive and 1-channel models.)
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from celldino.models.vision_transformer import ARCHS, VisionTransformer, resample_pos_embed

_HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.", "fc.")
# keys a foreign backbone may lack: the model keeps its own initialisation for them
_OPTIONAL = ("mask_token", "patch_embed.channel_embed")


def pick_network(obj: dict[str, Any], which: str = "teacher") -> dict[str, Any]:
    """The state dict of one network of a checkpoint (`which`: teacher or student)."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', not {which!r}")
    if isinstance(obj.get(which), dict):
        return obj[which]
    other = "student" if which == "teacher" else "teacher"
    if isinstance(obj.get(other), dict):
        raise KeyError(f"the checkpoint has a '{other}' network but no '{which}'")
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            return pick_network(obj[key], which)
    prefix = f"{which}.backbone."  # celldino and DINOv2 training checkpoints
    if any(k.startswith(prefix) for k in obj):
        return {k[len(prefix) :]: v for k, v in obj.items() if k.startswith(prefix)}
    if any(k.startswith(f"{other}.backbone.") for k in obj):
        raise KeyError(f"the checkpoint has '{other}.backbone.*' weights but no '{which}'")
    return obj


def canonical_backbone_state(
    obj: dict[str, Any], which: str = "teacher"
) -> dict[str, torch.Tensor]:
    """Foreign checkpoint (any supported layout) → tensors named as `VisionTransformer`'s."""
    sd = pick_network(obj, which)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        k = key
        for prefix in ("module.", "_orig_mod.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if k.startswith("backbone."):  # channelwise celldino model: backbone.backbone.*
            k = k[len("backbone.") :]
        if k.startswith(_HEAD_PREFIXES):
            continue
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # DINOv2 chunked blocks
        out[k] = value
    if "register_tokens" in out and out["register_tokens"].numel() == 0:
        del out["register_tokens"]
    if "cls_token" not in out or "pos_embed" not in out:
        raise KeyError(
            "no ViT backbone found (expected keys such as 'cls_token', 'pos_embed', "
            f"'blocks.0.attn.qkv.weight'; first keys seen: {list(sd)[:6]})"
        )
    if any(".w12." in k for k in out):
        raise KeyError("SwiGLU feed-forward blocks (DINOv2 ViT-g) are not supported")
    return out


def infer_spec(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture of a canonical state dict: arch, patch size, channels, registers, ..."""
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    # the width names the architecture (and its heads); the depth may be cut (model.depth)
    arch = next((a for a, (d, _, _) in ARCHS.items() if d == dim), None)
    if arch is None:
        widths = ", ".join(f"{a} {d}" for a, (d, _, _) in ARCHS.items())
        raise KeyError(
            f"its width {dim} (depth {depth}) matches no known architecture ({widths}), and it "
            "has no celldino 'model_config' metadata to say which it is"
        )
    w = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    n_pos = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n_pos)
    return {
        "arch": arch,
        "depth": depth,
        "patch_size": int(w.shape[-1]),
        # channel-adaptive kernels see one channel at a time; the channel table knows them all
        "in_chans": int(
            sd["patch_embed.channel_embed"].shape[0]
            if "patch_embed.channel_embed" in sd
            else w.shape[1]
        ),
        "num_registers": int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0,
        "layerscale": "blocks.0.ls1.gamma" in sd,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "img_size": grid * int(w.shape[-1]),
        "channel_adaptive": "patch_embed.channel_embed" in sd,
    }


def adapt_patch_kernel(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(D, C_src, p, p) → (D, in_chans, p, p): mean kernel · C_src / in_chans in every channel."""
    c_src = weight.shape[1]
    if c_src == in_chans:
        return weight
    mean = weight.float().mean(dim=1, keepdim=True)  # (D, 1, p, p)
    return (mean * (c_src / in_chans)).expand(-1, in_chans, -1, -1).to(weight.dtype).clone()


def fit_state_to_model(
    sd: dict[str, torch.Tensor], model: VisionTransformer
) -> dict[str, torch.Tensor]:
    """Adapt a canonical state dict to `model`: patch-kernel channels and position grid."""
    sd = dict(sd)
    target_c = model.patch_embed.proj.weight.shape[1]
    sd["patch_embed.proj.weight"] = adapt_patch_kernel(sd["patch_embed.proj.weight"], target_c)
    own_pos = model.pos_embed
    pos = sd["pos_embed"]
    if pos.shape[1] != own_pos.shape[1]:
        g = model.grid_size
        pos = resample_pos_embed(pos, (g, g))
    sd["pos_embed"] = pos
    ce = sd.get("patch_embed.channel_embed")
    own_ce = getattr(model.patch_embed, "channel_embed", None)
    if ce is not None and own_ce is not None and ce.shape != own_ce.shape:
        raise ValueError(
            f"the checkpoint knows {ce.shape[0]} channels but the model {own_ce.shape[0]}"
        )
    if ce is not None and own_ce is None:
        del sd["patch_embed.channel_embed"]
    return sd


def load_into(
    model: nn.Module, sd: dict[str, torch.Tensor], *, source: str = "the checkpoint"
) -> None:
    """Load a canonical backbone state dict into a ViT (or the ViT inside a channelwise model)."""
    vit = model.backbone if hasattr(model, "backbone") else model
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"cannot load backbone weights into {type(model).__name__}")
    sd = fit_state_to_model(sd, vit)
    own = vit.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    if bad:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(bad[:5]))
    result = vit.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_OPTIONAL)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{source} does not fit the model: missing {missing[:6]}, "
            f"unexpected {result.unexpected_keys[:6]} (check arch, layerscale, num_registers, "
            "qkv_bias in the model config)"
        )
