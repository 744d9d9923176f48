"""`CellAugment`: one randomly augmented view of every image in a batch, driven by AugmentConfig.

Order: crop box + affine + elastic + flips + 90° turns (one grid_sample) → protein-channel
rescale → brightness → contrast → blur → solarise → greyscale → channel dropping (last, so dropped
channels stay zero). An operation whose probability is 0 (or switch is off) draws no random
numbers and does not touch the tensor; with everything off the view is the input resized to the
crop size (the input itself when it already has that size).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from celldino.augment import geometric as G
from celldino.augment import photometric as P
from celldino.config import AugmentConfig


def _check_range(cfg: AugmentConfig, name: str, low: float, high: float) -> None:
    value = getattr(cfg, name)
    if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
        raise ValueError(
            f"augment.{name}={list(value)}: expected [min, max] with {low} <= min <= max <= {high}"
        )


def check_config(cfg: AugmentConfig) -> None:
    """Raise ValueError naming the `augment.*` key that is out of range."""
    for f in dataclasses.fields(cfg):
        if f.name.endswith("_p") and not 0.0 <= getattr(cfg, f.name) <= 1.0:
            raise ValueError(f"augment.{f.name}={getattr(cfg, f.name)}: a probability in [0, 1]")
    for name in ("global_crop_size", "local_crop_size", "elastic_grid"):
        if getattr(cfg, name) < (2 if name == "elastic_grid" else 1):
            raise ValueError(f"augment.{name}={getattr(cfg, name)} is too small")
    if cfg.n_local_crops < 0:
        raise ValueError(f"augment.n_local_crops={cfg.n_local_crops}: must be >= 0")
    _check_range(cfg, "global_crop_scale", 1e-6, 1.0)
    _check_range(cfg, "local_crop_scale", 1e-6, 1.0)
    _check_range(cfg, "crop_ratio", 1e-3, 1e3)
    _check_range(cfg, "affine_scale", 1e-3, 1e3)
    _check_range(cfg, "protein_rescale", 0.0, 1e6)
    _check_range(cfg, "blur_sigma", 0.0, 1e3)
    if cfg.padding_mode not in G.PADDING_MODES:
        raise ValueError(f"augment.padding_mode={cfg.padding_mode!r}: one of {G.PADDING_MODES}")
    for name in ("brightness", "contrast"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"augment.{name}={getattr(cfg, name)}: expected a value in [0, 1]")


class CellAugment:
    """Batched multi-channel augmentation: `aug(x, size=96, scale=(0.05, 0.4), generator=g)`."""

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg or AugmentConfig()
        check_config(self.cfg)

    # -- geometry ---------------------------------------------------------------------------
    def _geometry(
        self, x: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator
    ) -> torch.Tensor:
        """Crop box, affine, elastic, flips and quarter turns: one grid_sample when warping."""
        cfg = self.cfg
        b, _, h, w = x.shape
        warped = False
        if cfg.random_resized_crop:
            boxes = G.sample_crop_boxes(
                b, h, w, scale=scale, ratio=tuple(cfg.crop_ratio), generator=g
            )
            theta = G.boxes_to_theta(boxes, h, w)  # (B, 2, 3)
            warped = True
        else:
            theta = torch.zeros(b, 2, 3, dtype=torch.float64, device=g.device)
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if cfg.affine_p > 0:
            apply = G.bernoulli((b,), cfg.affine_p, g)
            deg = G.uniform((b,), -cfg.affine_degrees, cfg.affine_degrees, g)
            zoom = G.uniform((b,), cfg.affine_scale[0], cfg.affine_scale[1], g)
            shear = G.uniform((b,), -cfg.affine_shear, cfg.affine_shear, g)
            shift = G.uniform((b, 2), -cfg.affine_translate, cfg.affine_translate, g)
            inv = G.affine_matrices(deg, zoom, shear, shift)  # (B, 3, 3)
            eye = torch.eye(3, dtype=inv.dtype, device=inv.device).expand_as(inv)
            inv = torch.where(apply[:, None, None], inv, eye)
            theta = theta @ inv  # (B, 2, 3): output -> warped crop -> input
            warped = True
        disp = None
        if cfg.elastic_p > 0:
            apply = G.bernoulli((b,), cfg.elastic_p, g)
            disp = G.elastic_displacement(
                b, size, alpha=cfg.elastic_alpha, grid=cfg.elastic_grid, generator=g
            )
            disp = disp * apply.to(disp.dtype)[:, None, None, None]
            warped = True
        no = torch.zeros(b, dtype=torch.bool, device=g.device)
        hflip = G.bernoulli((b,), cfg.hflip_p, g) if cfg.hflip_p > 0 else no
        vflip = G.bernoulli((b,), cfg.vflip_p, g) if cfg.vflip_p > 0 else no
        turns = torch.randint(0, 4, (b,), generator=g, device=g.device) if cfg.rot90 else None
        if warped:  # fold flips and turns into the sampling grid: no extra pass over the pixels
            k = turns if turns is not None else torch.zeros(b, dtype=torch.int64, device=g.device)
            theta = theta @ G.dihedral_matrices(hflip, vflip, k)
            return G.warp(x, theta, size, displacement=disp, padding_mode=cfg.padding_mode)
        out = x
        if (h, w) != (size, size):
            out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if cfg.hflip_p > 0 or cfg.vflip_p > 0:
            out = G.flip(out, hflip, vflip)
        if turns is not None:
            out = G.rot90(out, turns)
        return out

    # -- intensity ----------------------------------------------------------------------------
    def _channel_affine(
        self, out: torch.Tensor, g: torch.Generator, fold_drop: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Protein rescale, brightness, contrast (and channel drop) as one fused pass.

        All are per-channel linear maps and commute: gain * (m + f (x - m)) = x * (f gain) +
        m (1 - f) gain, with m the channel's spatial mean. Returns the views and the keep mask
        when dropping has to wait until after non-linear operations.
        """
        cfg = self.cfg
        b, c = out.shape[:2]
        n_val = c if cfg.per_channel else 1
        gain = torch.ones(b, c, dtype=torch.float64, device=g.device)
        factor = None
        if cfg.protein_channel >= 0 and cfg.protein_rescale_p > 0:
            if cfg.protein_channel >= c:
                raise ValueError(
                    f"augment.protein_channel={cfg.protein_channel} but the images have {c} "
                    "channels"
                )
            apply = G.bernoulli((b,), cfg.protein_rescale_p, g)
            pg = G.uniform((b,), cfg.protein_rescale[0], cfg.protein_rescale[1], g)
            gain[:, cfg.protein_channel] = torch.where(apply, pg, 1.0)
        if cfg.brightness_p > 0 and cfg.brightness > 0:
            apply = G.bernoulli((b,), cfg.brightness_p, g)
            bg = G.uniform((b, n_val), 1 - cfg.brightness, 1 + cfg.brightness, g)
            gain = gain * torch.where(apply[:, None], bg, 1.0)
        if cfg.contrast_p > 0 and cfg.contrast > 0:
            apply = G.bernoulli((b,), cfg.contrast_p, g)
            f = G.uniform((b, n_val), 1 - cfg.contrast, 1 + cfg.contrast, g)
            factor = torch.where(apply[:, None], f, 1.0).expand(b, c)
        keep = None
        if cfg.channel_drop_p > 0:
            keep = P.sample_channel_keep(b, c, cfg.channel_drop_p, g)
            if fold_drop:
                gain = gain * keep.to(gain.device)
                keep = None
        if factor is None:
            if bool((gain == 1.0).all()):
                return out, keep
            return P.adjust_brightness(out, gain), keep  # gain 1 leaves a channel unchanged
        m = out.mean(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1)
        dt, dev = out.dtype, out.device
        scale = (factor * gain).to(device=dev, dtype=dt, non_blocking=True)[:, :, None, None]
        offset = ((1 - factor) * gain).to(device=dev, dtype=dt, non_blocking=True)[:, :, None, None]
        return torch.addcmul(m * offset, out, scale), keep  # (B, C, S, S)

    # -- everything ---------------------------------------------------------------------------
    def __call__(
        self,
        x: torch.Tensor,
        *,
        size: int,
        scale: tuple[float, float] = (1.0, 1.0),
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W) float → (B, C, size, size); random draws from `generator` only."""
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"augmentations take a float tensor (B, C, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        g = generator if generator is not None else torch.default_generator
        cfg = self.cfg
        b = x.shape[0]
        out = self._geometry(x, size, scale, g)  # (B, C, size, size)
        # zeroing commutes with the per-channel linear maps and blur, not with solarise/greyscale
        fold_drop = cfg.solarize_p == 0 and cfg.greyscale_p == 0
        out, keep = self._channel_affine(out, g, fold_drop)

        if cfg.blur_p > 0:
            # draws stay on the generator's device (CPU): picking the blurred samples needs
            # no GPU sync
            apply = G.bernoulli((b,), cfg.blur_p, g)
            sigma = G.uniform((b,), cfg.blur_sigma[0], cfg.blur_sigma[1], g)
            idx = torch.nonzero(apply).flatten()
            if idx.numel():
                out = out.clone()
                at = idx.to(out.device, non_blocking=True)
                out[at] = P.gaussian_blur(out[at], sigma[idx])
        if cfg.solarize_p > 0:
            m = G.bernoulli((b,), cfg.solarize_p, g).to(out.device, non_blocking=True)
            m = m[:, None, None, None]
            out = torch.where(m, P.solarize(out, cfg.solarize_threshold), out)
        if cfg.greyscale_p > 0:
            m = G.bernoulli((b,), cfg.greyscale_p, g).to(out.device, non_blocking=True)
            m = m[:, None, None, None]
            out = torch.where(m, P.greyscale(out), out)
        if keep is not None:
            out = P.drop_channels(out, keep)
        return out
