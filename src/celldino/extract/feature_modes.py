"""Which numbers become the embedding: feature modes over the backbone's output dict, and the
pooling of several views of one whole field of view (WS-DINO centre crops, tilings).

Feature modes (`extract.feature`), for a backbone of width D with L blocks:
- `cls`: class token after the last block and the final norm (B, D) (DINO's default).
- `last_blocks`: class tokens of the last `n_blocks` blocks, each through the final norm,
  concatenated oldest first (B, n_blocks·D) (DINO's linear evaluation, `n_last_blocks`).
- `block`: the class token of block `block` (0-based; negative counts from the end) (B, D).
- `patch_mean`: mean of the patch tokens after the final norm (B, D).
- `cls_patch_mean`: `cls` and `patch_mean` concatenated (B, 2·D) (DINOv2's linear evaluation).

With a channelwise model (an RGB model run on each channel alone) D is C·D_backbone and every
mode keeps the channel-major layout [channel 0 features, channel 1 features, ...].
"""

from __future__ import annotations

import torch

from celldino.config import ConfigError

FEATURES = ("cls", "last_blocks", "block", "patch_mean", "cls_patch_mean")
FIELD_MODES = ("center4", "tile")
POOLS = ("mean", "median")


def check_feature(mode: str, n_blocks: int, block: int, depth: int) -> None:
    """Raise ConfigError (a ValueError naming the option) when a feature choice does not fit a
    `depth`-block model."""
    if mode not in FEATURES:
        raise ConfigError(
            f"extract.feature={mode!r} is not one of {', '.join(FEATURES)}", key="extract.feature"
        )
    if mode == "last_blocks" and not 1 <= n_blocks <= depth:
        raise ConfigError(
            f"extract.n_blocks={n_blocks} must be between 1 and the model's depth {depth} "
            f"(extract.feature=last_blocks): set extract.n_blocks={min(4, depth)}",
            key="extract.n_blocks",
        )
    if mode == "block" and not -depth <= block < depth:
        raise ConfigError(
            f"extract.block={block} is outside the model's {depth} blocks "
            f"(0..{depth - 1}, or -1..-{depth} from the end; extract.feature=block)",
            key="extract.block",
        )


def needs_blocks(mode: str) -> bool:
    """Whether the mode needs the per-block class tokens (`return_blocks=True`)."""
    return mode in ("last_blocks", "block")


def feature_dim(mode: str, embed_dim: int, n_blocks: int) -> int:
    """Width of the embedding a mode gives for a backbone of width `embed_dim`."""
    if mode == "last_blocks":
        return n_blocks * embed_dim
    if mode == "cls_patch_mean":
        return 2 * embed_dim
    return embed_dim


def select_features(out: dict, mode: str, *, n_blocks: int = 4, block: int = -1) -> torch.Tensor:
    """The (B, F) embedding of a backbone output dict (see the module docstring)."""
    if mode == "cls":
        return out["cls"]  # (B, D)
    if mode == "patch_mean":
        return out["patch"].mean(dim=1)  # (B, N, D) → (B, D)
    if mode == "cls_patch_mean":
        return torch.cat([out["cls"], out["patch"].mean(dim=1)], dim=-1)  # (B, 2D)
    if mode == "last_blocks":
        return torch.cat(list(out["blocks"][-n_blocks:]), dim=-1)  # (B, n·D)
    if mode == "block":
        return out["blocks"][block]  # (B, D)
    raise ValueError(f"extract.feature={mode!r} is not one of {', '.join(FEATURES)}")


# ---- whole fields of view ------------------------------------------------------------------


def center_crops(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, 4, C, size, size): the four crops meeting at the image centre (WS-DINO).

    Order: top-left, top-right, bottom-left, bottom-right of the centre point (H//2, W//2).
    """
    B, C, H, W = x.shape
    if H < 2 * size or W < 2 * size:
        raise ValueError(
            f"fields of {H}x{W} px are too small for four centre crops of {size} px "
            f"(need at least {2 * size}x{2 * size}); lower extract.field_crop or use field_mode=tile"
        )
    cy, cx = H // 2, W // 2
    crops = [
        x[:, :, cy - size : cy, cx - size : cx],
        x[:, :, cy - size : cy, cx : cx + size],
        x[:, :, cy : cy + size, cx - size : cx],
        x[:, :, cy : cy + size, cx : cx + size],
    ]
    return torch.stack(crops, dim=1)  # (B, 4, C, s, s)


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets of tiles of `size` every `stride` px along `length`; the last tile is moved
    back to end at the border so that the whole length is covered."""
    if length < size:
        raise ValueError(f"fields of {length} px are smaller than the tile size {size} px")
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def tiles(x: torch.Tensor, size: int, stride: int = 0) -> torch.Tensor:
    """(B, C, H, W) → (B, K, C, size, size): a tiling covering the field, row by row."""
    stride = stride or size
    _, _, H, W = x.shape
    ys, xs = tile_starts(H, size, stride), tile_starts(W, size, stride)
    out = [x[:, :, y : y + size, x0 : x0 + size] for y in ys for x0 in xs]
    return torch.stack(out, dim=1)  # (B, K, C, s, s)


def field_views(x: torch.Tensor, mode: str, size: int, stride: int = 0) -> torch.Tensor:
    """(B, C, H, W) → (B, K, C, size, size) views of whole fields for `extract.field_mode`."""
    if mode == "center4":
        return center_crops(x, size)
    if mode == "tile":
        return tiles(x, size, stride)
    raise ValueError(f"extract.field_mode={mode!r} is not one of {', '.join(FIELD_MODES)}")


def pool_views(feats: torch.Tensor, how: str) -> torch.Tensor:
    """(B, K, F) → (B, F): mean, or median (the mean of the two middle values for even K, as
    numpy's median)."""
    if how == "mean":
        return feats.mean(dim=1)
    if how == "median":
        return torch.quantile(feats.float(), 0.5, dim=1)
    raise ValueError(f"extract.field_pool={how!r} is not one of {', '.join(POOLS)}")
