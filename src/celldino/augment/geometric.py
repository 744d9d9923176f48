"""Batched geometric augmentations on (B, C, H, W) tensors.

Random resized crop, affine and elastic warps are folded into one sampling grid per crop and
applied with a single `F.grid_sample` call (bilinear, `align_corners=False`). Flips and 90°
rotations are exact index operations (`torch.flip`, `torch.rot90`) chosen per sample.

Coordinates follow `F.affine_grid`: a (B, 2, 3) matrix `theta` maps output coordinates
(x, y) in [-1, 1] to input coordinates in [-1, 1]; x runs along the width, y along the height.
All random parameters are drawn from the `torch.Generator` handed in (on its own device) and
then moved to the images' device, so the same generator state gives the same crops anywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PADDING_MODES = ("reflection", "border", "zeros")


def uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator
) -> torch.Tensor:
    """Uniform samples in [low, high) drawn on the generator's device (float64 for exactness)."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return low + (high - low) * u


def bernoulli(shape: tuple[int, ...], p: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask, True with probability p (always draws, so the stream does not depend on p)."""
    return uniform(shape, 0.0, 1.0, generator) < p


# ---------------------------------------------------------------------------------------------
# Random resized crop
# ---------------------------------------------------------------------------------------------


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = 10,
) -> torch.Tensor:
    """Crop boxes (n, 4) as integer [top, left, h, w], per sample, torchvision's rule batched.

    For each sample, `attempts` candidate boxes with area fraction ~ U(scale) and aspect ratio
    w/h log-uniform in `ratio` are drawn; the first that fits in the image is kept; when none
    fits, the central crop with the nearest admissible aspect ratio is used.
    """
    area = float(height * width)
    target = area * uniform((n, attempts), scale[0], scale[1], generator)  # (n, A)
    log_r = uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))  # (n, A)
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, A)
    first = torch.argmax(fits.to(torch.int8), dim=1)  # index of the first fitting attempt
    any_fit = fits.any(dim=1)
    w_pick = w.gather(1, first[:, None])[:, 0]
    h_pick = h.gather(1, first[:, None])[:, 0]
    # fallback: central crop with the aspect ratio clamped into `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w_pick = torch.where(any_fit, w_pick, torch.full_like(w_pick, fw))
    h_pick = torch.where(any_fit, h_pick, torch.full_like(h_pick, fh))
    u_top = uniform((n,), 0.0, 1.0, generator)
    u_left = uniform((n,), 0.0, 1.0, generator)
    top = torch.floor(u_top * (height - h_pick + 1)).clamp(max=height - h_pick)
    left = torch.floor(u_left * (width - w_pick + 1)).clamp(max=width - w_pick)
    top = torch.where(any_fit, top, torch.full_like(top, 0.0) + (height - fh) // 2)
    left = torch.where(any_fit, left, torch.full_like(left, 0.0) + (width - fw) // 2)
    return torch.stack([top, left, h_pick, w_pick], dim=1).to(torch.int64)  # (n, 4)


def boxes_to_theta(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Affine matrices (n, 2, 3) that sample the boxes [top, left, h, w] of an H x W image.

    Output pixel centre j of a size-S crop lands on input pixel `left + (j + 0.5) * w / S - 0.5`,
    exactly what `F.interpolate(crop, S, mode="bilinear", align_corners=False)` samples.
    """
    b = boxes.to(torch.float64)
    top, left, h, w = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    theta = torch.zeros(len(b), 2, 3, dtype=torch.float64, device=b.device)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    return theta


# ---------------------------------------------------------------------------------------------
# Affine and elastic warps
# ---------------------------------------------------------------------------------------------


def affine_matrices(
    degrees: torch.Tensor,
    scale: torch.Tensor,
    shear: torch.Tensor,
    translate: torch.Tensor,
) -> torch.Tensor:
    """Sampling matrices (n, 3, 3) of the affine warps that move the content of a square crop.

    degrees (n,): rotation, positive = counter-clockwise as displayed (rows top to bottom);
    scale (n,): zoom (> 1 enlarges the content); shear (n,): x-shear in degrees;
    translate (n, 2): shift of the content in (x, y) as a fraction of the crop side.
    The content transform is M = T R Sh Z about the crop centre; sampling uses M^-1.
    """
    n = degrees.shape[0]
    dev, dt = degrees.device, torch.float64
    a = torch.deg2rad(degrees.to(dt))
    eye = torch.eye(3, dtype=dt, device=dev).expand(n, 3, 3)
    rot = eye.clone()
    # y points down, so a counter-clockwise turn on screen is a clockwise one in (x, y)
    rot[:, 0, 0], rot[:, 0, 1] = torch.cos(a), torch.sin(a)
    rot[:, 1, 0], rot[:, 1, 1] = -torch.sin(a), torch.cos(a)
    zoom = eye.clone()
    zoom[:, 0, 0] = scale.to(dt)
    zoom[:, 1, 1] = scale.to(dt)
    sh = eye.clone()
    sh[:, 0, 1] = torch.tan(torch.deg2rad(shear.to(dt)))
    shift = eye.clone()
    shift[:, :2, 2] = 2 * translate.to(dt)  # fraction of the side -> normalised units
    forward = shift @ rot @ sh @ zoom  # (n, 3, 3)
    return torch.linalg.inv(forward)


def elastic_displacement(
    n: int, size: int, *, alpha: float, grid: int, generator: torch.Generator
) -> torch.Tensor:
    """Smooth random displacements (n, size, size, 2) in normalised output units.

    Gaussian noise on a `grid` x `grid` lattice of control points, upsampled bicubically: a
    smooth field whose standard deviation is about `alpha` of the crop side.
    """
    noise = torch.randn(
        (n, 2, grid, grid), generator=generator, device=generator.device, dtype=torch.float32
    )
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=True)
    return (2.0 * alpha * field).permute(0, 2, 3, 1)  # (n, size, size, 2)


def warp(
    x: torch.Tensor,
    theta: torch.Tensor,
    size: int | tuple[int, int],
    *,
    displacement: torch.Tensor | None = None,
    padding_mode: str = "reflection",
) -> torch.Tensor:
    """Resample x (B, C, H, W) on the grid of theta (B, 2, 3) -> (B, C, h, w), bilinear.

    `displacement` (B, h, w, 2), in normalised output units, is added to the output coordinates
    before theta is applied (an elastic warp inside the crop).
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    h, w = (size, size) if isinstance(size, int) else size
    b, c = x.shape[:2]
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    theta = theta.to(device=x.device, dtype=work, non_blocking=True)  # no host sync on a GPU
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)  # (B, h, w, 2)
    if displacement is not None:
        d = displacement.to(device=x.device, dtype=work, non_blocking=True)
        grid = grid + torch.einsum("bij,bhwj->bhwi", theta[:, :, :2], d)
    out = F.grid_sample(
        x.to(work), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )
    return out.to(x.dtype)


def dihedral_matrices(
    horizontal: torch.Tensor, vertical: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """Sampling matrices (n, 3, 3) equal to `rot90(flip(crop, horizontal, vertical), k)`.

    Folded into a crop's affine grid, flips and quarter turns cost nothing: the flipped grid
    points are the original ones permuted, so the sampled values are the same (to rounding).
    """
    n = k.shape[0]
    dev = k.device
    hm = torch.ones(n, dtype=torch.float64, device=dev)
    hm[horizontal.to(dev)] = -1.0
    vm = torch.ones(n, dtype=torch.float64, device=dev)
    vm[vertical.to(dev)] = -1.0
    quarter = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64, device=dev)
    turns = torch.stack([torch.linalg.matrix_power(quarter, int(t)) for t in range(4)])
    m = torch.eye(3, dtype=torch.float64, device=dev).repeat(n, 1, 1)
    m[:, :2, :2] = torch.diag_embed(torch.stack([hm, vm], dim=1)) @ turns[k.to(dev) % 4]
    return m


# ---------------------------------------------------------------------------------------------
# Flips and 90-degree rotations (exact)
# ---------------------------------------------------------------------------------------------


def flip(x: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor) -> torch.Tensor:
    """Flip the samples of x (B, C, H, W) whose masks (B,) are True: left-right / up-down."""
    h = horizontal.to(x.device, non_blocking=True)[:, None, None, None]
    v = vertical.to(x.device, non_blocking=True)[:, None, None, None]
    x = torch.where(h, x.flip(-1), x)
    return torch.where(v, x.flip(-2), x)


def rot90(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate sample i of x (B, C, S, S) by k[i] * 90° counter-clockwise (torch.rot90 each)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"90° rotations need square crops, got {tuple(x.shape[-2:])}")
    k = k % 4  # on the generator's device: the nonzero below needs no GPU sync
    out = x.clone()
    for turn in (1, 2, 3):
        idx = torch.nonzero(k == turn).flatten().to(x.device, non_blocking=True)
        if idx.numel():
            out[idx] = torch.rot90(x[idx], turn, dims=(-2, -1))
    return out


def whole_cell_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, C, size, size): the whole image resized as a random resized crop of
    scale 1 samples it (bilinear, align_corners=False), so evaluation (extraction, the training
    monitor) feeds the model the patch grid it trained on. `size` <= 0 or equal: unchanged."""
    if size <= 0 or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
