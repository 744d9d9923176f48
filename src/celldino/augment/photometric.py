"""Batched per-channel photometric (intensity) augmentations on (B, C, H, W) float tensors.

Each function takes its already-drawn parameters (one value per sample or per sample and
channel) so it is a plain formula that can be tested against hand-worked numbers; the random
draws live in `cell_augment.py`. Samples where an operation is not applied keep their exact
values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def adjust_brightness(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """x_bc <- x_bc * gain_bc: a multiplicative gain per sample and channel, gain (B, C)."""
    return x * gain.to(device=x.device, dtype=x.dtype, non_blocking=True)[:, :, None, None]


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x_bc <- m_bc + factor_bc * (x_bc - m_bc), m_bc the spatial mean of that channel; (B, C)."""
    m = x.mean(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1)
    f = factor.to(device=x.device, dtype=x.dtype, non_blocking=True)[:, :, None, None]
    return m + f * (x - m)


def sample_channel_keep(
    n: int, channels: int, p: float, generator: torch.Generator
) -> torch.Tensor:
    """Keep mask (n, C): each channel dropped with probability p; never all channels.

    When every channel of a sample was drawn for dropping, one channel chosen uniformly at random
    is kept, so the expected drop rate per channel is p - p**C / C.
    """
    u = torch.rand((n, channels), generator=generator, device=generator.device)
    keep = u >= p  # (n, C)
    rescue = torch.randint(0, channels, (n,), generator=generator, device=generator.device)
    none_kept = ~keep.any(dim=1)
    keep[none_kept, rescue[none_kept]] = True
    return keep


def drop_channels(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the channels where keep (B, C) is False."""
    k = keep.to(x.device, non_blocking=True)[:, :, None, None]
    return torch.where(k, x, torch.zeros((), dtype=x.dtype, device=x.device))


def rescale_channel(x: torch.Tensor, channel: int, gain: torch.Tensor) -> torch.Tensor:
    """Multiply one channel (e.g. the protein) of each sample by gain (B,)."""
    if not -x.shape[1] <= channel < x.shape[1]:
        raise ValueError(
            f"augment.protein_channel={channel} but the images have {x.shape[1]} channels"
        )
    out = x.clone()
    g = gain.to(device=x.device, dtype=x.dtype, non_blocking=True)[:, None, None]
    out[:, channel] = x[:, channel] * g
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, truncate: float = 3.0) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (pixels) per sample, sigma (B,); mirror padding.

    The kernel radius is ceil(truncate * max(sigma)); every sample uses that radius, with its own
    normalised weights (as scipy.ndimage.gaussian_filter(mode="mirror") with that radius).
    """
    b, c, h, w = x.shape
    radius = max(1, math.ceil(truncate * float(sigma.max())))  # sigma on the CPU: no GPU sync
    sig = sigma.to(device=x.device, dtype=torch.float64, non_blocking=True).clamp(min=1e-6)
    radius = min(radius, h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    k = torch.exp(-0.5 * (t[None, :] / sig[:, None]) ** 2)  # (B, K)
    k = (k / k.sum(dim=1, keepdim=True)).to(x.dtype)
    kern = k.repeat_interleave(c, dim=0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, kern[:, None, None, :], groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, kern[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Values >= threshold become 1 - value (torchvision's rule for images in [0, 1])."""
    return torch.where(x >= threshold, 1.0 - x, x)


def greyscale(x: torch.Tensor) -> torch.Tensor:
    """Every channel replaced by the mean over channels (the C-channel analogue of grey)."""
    return x.mean(dim=1, keepdim=True).expand_as(x).contiguous()
