"""Subcellular read-outs of a vision transformer: attention heads vs channels, telling patches.

- `cls_attention_maps`: the class token's attention over patch tokens, per head, as images.
- `head_channel_iou`: Cell-DINO's head–channel matrix. Each head's attention map (upsampled to
  the image) and each fluorescence channel are binarised with Otsu's threshold; the cell of the
  matrix is the intersection-over-union of the two masks, averaged over images.
- `discriminative_patches`: patch tokens of group A whose k nearest patch tokens (cosine, from
  other images) nearly all come from group A as well, i.e. the places where A looks different
  from B; with a nucleus mask they are split into nucleus and cytoplasm and the
  nucleus/cytoplasm enrichment ratio says where the difference lies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from skimage.filters import threshold_otsu

from celldino.log import get_logger

logger = get_logger(__name__)


def cls_attention_maps(attn, *, grid: tuple[int, int], num_prefix_tokens: int = 1) -> np.ndarray:
    """(B, heads, T, T) attention → (B, heads, h, w) class-token attention over the patches.

    `num_prefix_tokens` is 1 (class token) plus the number of register tokens.
    """
    a = attn.detach().cpu().numpy() if isinstance(attn, torch.Tensor) else np.asarray(attn)
    h, w = grid
    if a.ndim != 4 or a.shape[-1] != num_prefix_tokens + h * w:
        raise ValueError(
            f"attention of shape {a.shape} does not fit {num_prefix_tokens} prefix tokens + "
            f"{h}x{w} patches (expected (B, heads, T, T) with T = {num_prefix_tokens + h * w})"
        )
    return a[:, :, 0, num_prefix_tokens:].reshape(a.shape[0], a.shape[1], h, w)


def otsu_mask(img: np.ndarray) -> np.ndarray:
    """Pixels above Otsu's threshold (an all-false mask for a constant image)."""
    img = np.asarray(img, dtype=np.float64)
    if img.max() == img.min():
        return np.zeros(img.shape, dtype=bool)
    return img > threshold_otsu(img)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∧ b| / |a ∨ b| of two boolean masks (NaN when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(heads, h, w) → (heads, H, W), nearest neighbour (each patch covers its pixels)."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(t, size=size, mode="nearest")[0].numpy()


def head_channel_iou(
    attention_maps,
    images,
    *,
    channel_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Mean IoU (heads × channels) of Otsu masks of attention maps and of channel images.

    attention_maps: (N, heads, h, w) (e.g. from `cls_attention_maps`); images: (N, C, H, W).
    Returns a DataFrame indexed by head ('head_0'…) with one column per channel; images where
    both masks are empty do not count.
    """
    A = np.asarray(attention_maps)
    I = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if A.ndim != 4 or I.ndim != 4 or len(A) != len(I):
        raise ValueError(
            f"need attention maps (N, heads, h, w) and images (N, C, H, W) with one N; got "
            f"{A.shape} and {I.shape}"
        )
    names = list(channel_names) if channel_names else [f"ch{c}" for c in range(I.shape[1])]
    if len(names) != I.shape[1]:
        raise ValueError(f"{len(names)} channel names for {I.shape[1]} channels")
    total = np.zeros((A.shape[1], I.shape[1]))
    count = np.zeros_like(total)
    for n in range(len(A)):
        up = _upsample(A[n], I.shape[2:])  # (heads, H, W)
        head_masks = [otsu_mask(m) for m in up]
        chan_masks = [otsu_mask(c) for c in I[n]]
        for h, hm in enumerate(head_masks):
            for c, cm in enumerate(chan_masks):
                v = iou(hm, cm)
                if not np.isnan(v):
                    total[h, c] += v
                    count[h, c] += 1
    with np.errstate(invalid="ignore"):
        mean = total / count
    out = pd.DataFrame(mean, index=[f"head_{h}" for h in range(A.shape[1])], columns=names)
    out.index.name = "head"
    return out


def patch_fraction(masks, *, patch_size: int) -> np.ndarray:
    """(M, H, W) pixel masks → (M, N) fraction of each patch covered, N = (H/p)·(W/p)."""
    m = np.asarray(masks, dtype=np.float32)
    M, H, W = m.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"mask size {H}x{W} is not a multiple of the patch size {patch_size}")
    m = m.reshape(M, H // patch_size, patch_size, W // patch_size, patch_size)
    return m.mean(axis=(2, 4)).reshape(M, -1)


def discriminative_patches(
    patches,
    groups,
    *,
    group_a: str,
    group_b: str,
    nucleus: np.ndarray | None = None,
    foreground: np.ndarray | None = None,
    k: int = 10,
    purity: float = 0.9,
    exclude_same_image: bool = True,
    max_tokens: int = 20000,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Patch tokens of `group_a` whose k nearest tokens among groups a ∪ b are ≥ `purity` from a.

    patches: (M, N, D) patch tokens of M images; groups: (M,) group of each image.
    nucleus: (M, N) fraction of each patch inside a nucleus (`patch_fraction`); a patch with
    fraction ≥ 0.5 counts as nucleus, else cytoplasm. foreground: (M, N) bool, patches to use
    (e.g. inside the cell), default all. Returns a token table (image, patch, score,
    discriminative, location) and a summary with the counts and the nucleus/cytoplasm ratio
    (share of nucleus tokens that are discriminative ÷ that share in the cytoplasm).
    """
    P = patches.detach().cpu().numpy() if isinstance(patches, torch.Tensor) else np.asarray(patches)
    g = np.asarray(groups).astype(str)
    if P.ndim != 3 or len(P) != len(g):
        raise ValueError(f"patches must be (M, N, D) with M = len(groups); got {P.shape}, {len(g)}")
    M, N, _ = P.shape
    use = np.isin(g, [str(group_a), str(group_b)])[:, None] & np.ones((M, N), dtype=bool)
    if foreground is not None:
        use &= np.asarray(foreground, dtype=bool)
    img, pat = np.nonzero(use)
    if len(img) > max_tokens:
        pick = np.sort(np.random.default_rng(seed).choice(len(img), max_tokens, replace=False))
        img, pat = img[pick], pat[pick]
        logger.info("discriminative_patches: subsampled %d tokens (seed %d)", max_tokens, seed)
    is_a = g[img] == str(group_a)
    if not is_a.any() or is_a.all():
        raise ValueError(f"need tokens from both groups {group_a!r} and {group_b!r}")
    T = P[img, pat].astype(np.float32)
    T /= np.linalg.norm(T, axis=1, keepdims=True) + 1e-12
    qa = np.flatnonzero(is_a)
    k = min(k, len(T) - 1)
    score = np.empty(len(qa))
    for s in range(0, len(qa), 1024):
        q = qa[s : s + 1024]
        sim = T[q] @ T.T  # (b, n_tokens)
        sim[np.arange(len(q)), q] = -np.inf
        if exclude_same_image:
            sim[img[q][:, None] == img[None, :]] = -np.inf
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        score[s : s + 1024] = is_a[nn].mean(axis=1)
    disc = score >= purity
    table = pd.DataFrame(
        {"image": img[qa], "patch": pat[qa], "score": score, "discriminative": disc}
    )
    summary: dict = {
        "group_a": str(group_a),
        "group_b": str(group_b),
        "k": int(k),
        "purity": purity,
        "n_tokens_a": int(len(qa)),
        "n_discriminative": int(disc.sum()),
        "seed": seed,
    }
    if nucleus is not None:
        nuc = np.asarray(nucleus, dtype=np.float64)[img[qa], pat[qa]] >= 0.5
        table["location"] = np.where(nuc, "nucleus", "cytoplasm")
        n_nuc, n_cyt = int(nuc.sum()), int((~nuc).sum())
        d_nuc, d_cyt = int((disc & nuc).sum()), int((disc & ~nuc).sum())
        share_nuc = d_nuc / n_nuc if n_nuc else float("nan")
        share_cyt = d_cyt / n_cyt if n_cyt else float("nan")
        summary.update(
            n_nucleus=n_nuc,
            n_cytoplasm=n_cyt,
            discriminative_nucleus=d_nuc,
            discriminative_cytoplasm=d_cyt,
            nucleus_cytoplasm_count_ratio=d_nuc / d_cyt if d_cyt else float("inf"),
            nucleus_cytoplasm_ratio=share_nuc / share_cyt if share_cyt else float("inf"),
        )
    return table, summary
