"""Augmentation throughput: celldino's batched multi-crop vs a per-sample numpy/scipy pipeline.

The peer is what the reference implementations (DINO4Cells and friends) do in their Dataset's
__getitem__: for every image and every crop, draw a random resized crop box (torchvision's rule),
slice it and resize with scipy.ndimage.zoom, rotate with scipy.ndimage.rotate, flip and turn
with numpy, then loop over channels for brightness and contrast. Both pipelines do the same
operations with the same probabilities on the same images, measured in the same run.

    .venv/bin/python bench/bench_augment.py              # CPU (and the GPU when there is one)
    .venv/bin/python bench/bench_augment.py --quick      # smaller batch, fewer repeats
"""

from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np
import scipy.ndimage as ndi
import torch

from celldino.augment import MultiCrop
from celldino.config import AugmentConfig

SETTINGS = {
    # name: (channels, image side, global size, n local, local size)
    "paper 2x224+8x96, 5ch 256px": (5, 256, 224, 8, 96),
    "tiny 2x96+6x48, 5ch 128px": (5, 128, 96, 6, 48),
}

# the operations both pipelines run (Cell-DINO style: no blur, solarisation or greyscale)
OPS = dict(
    hflip_p=0.5,
    vflip_p=0.5,
    rot90=True,
    affine_p=0.5,
    affine_degrees=15.0,
    affine_scale=(1.0, 1.0),
    brightness_p=0.8,
    brightness=0.2,
    contrast_p=0.8,
    contrast=0.2,
    channel_drop_p=0.1,
)


# --------------------------------------------------------------------------------------------
# the per-sample reference pipeline (numpy / scipy), one image and one crop at a time
# --------------------------------------------------------------------------------------------


def _crop_box(h: int, w: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    return 0, 0, h, w


def reference_view(img: np.ndarray, size: int, scale, cfg: AugmentConfig, rng: random.Random):
    """One augmented (C, size, size) view of img (C, H, W), the per-sample way."""
    c, h, w = img.shape
    top, left, ch, cw = _crop_box(h, w, scale, cfg.crop_ratio, rng)
    crop = img[:, top : top + ch, left : left + cw]
    zoom = (size / ch, size / cw)  # channel by channel: 2-D zoom is ~2x faster than 3-D
    out = np.stack([ndi.zoom(p, zoom, order=1, grid_mode=True, mode="grid-mirror") for p in crop])
    if rng.random() < cfg.affine_p:
        angle = rng.uniform(-cfg.affine_degrees, cfg.affine_degrees)
        out = ndi.rotate(out, angle, axes=(2, 1), reshape=False, order=1, mode="reflect")
    if rng.random() < cfg.hflip_p:
        out = np.flip(out, axis=2)
    if rng.random() < cfg.vflip_p:
        out = np.flip(out, axis=1)
    if cfg.rot90:
        out = np.rot90(out, rng.randrange(4), axes=(1, 2))
    out = np.ascontiguousarray(out)
    if rng.random() < cfg.brightness_p:
        for k in range(c):
            out[k] = out[k] * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    if rng.random() < cfg.contrast_p:
        for k in range(c):
            m = out[k].mean()
            out[k] = m + rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) * (out[k] - m)
    drop = [k for k in range(c) if rng.random() < cfg.channel_drop_p]
    if len(drop) < c:
        for k in drop:
            out[k] = 0
    return out


def reference_multicrop(batch: np.ndarray, cfg: AugmentConfig, rng: random.Random):
    views = []
    for img in batch:  # a Dataset's __getitem__, image by image
        v = [reference_view(img, cfg.global_crop_size, cfg.global_crop_scale, cfg, rng)]
        v.append(reference_view(img, cfg.global_crop_size, cfg.global_crop_scale, cfg, rng))
        v += [
            reference_view(img, cfg.local_crop_size, cfg.local_crop_scale, cfg, rng)
            for _ in range(cfg.n_local_crops)
        ]
        views.append(v)
    # collate into per-crop batches as a DataLoader would
    return [torch.from_numpy(np.stack([v[i] for v in views])) for i in range(len(views[0]))]


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def _time(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="images per batch")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="batch 8, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 8, 1
    torch.set_num_threads(args.threads)
    rows = []
    for name, (c, side, gsize, n_local, lsize) in SETTINGS.items():
        cfg = AugmentConfig(
            global_crop_size=gsize, local_crop_size=lsize, n_local_crops=n_local, **OPS
        )
        n_crops = args.batch * (2 + n_local)
        x = torch.rand(args.batch, c, side, side, generator=torch.Generator().manual_seed(0))
        xn = x.numpy()
        rng = random.Random(0)
        t_ref = _time(
            lambda xn=xn, cfg=cfg, rng=rng: reference_multicrop(xn, cfg, rng), args.repeats
        )
        rows.append((name, "numpy/scipy per sample (1 core)", n_crops / t_ref, 1.0))
        mc = MultiCrop(cfg)
        g = torch.Generator().manual_seed(0)
        for threads in sorted({1, args.threads}):
            torch.set_num_threads(threads)
            t = _time(lambda x=x, mc=mc, g=g: mc(x, generator=g), args.repeats)
            rows.append(
                (name, f"celldino batched, CPU {threads} thread(s)", n_crops / t, t_ref / t)
            )
        torch.set_num_threads(args.threads)
        if torch.cuda.is_available():
            xg = x.to("cuda")
            sync = torch.cuda.synchronize
            t = _time(lambda xg=xg, mc=mc, g=g: mc(xg, generator=g), args.repeats, sync)
            rows.append(
                (name, f"celldino batched, {torch.cuda.get_device_name()}", n_crops / t, t_ref / t)
            )
            xb = xg.to(torch.bfloat16)
            t = _time(lambda xb=xb, mc=mc, g=g: mc(xb, generator=g), args.repeats, sync)
            rows.append((name, "celldino batched, GPU bf16 input", n_crops / t, t_ref / t))
    print(f"\nAugmentation throughput, batch {args.batch} images, best of {args.repeats}")
    print("| setting | pipeline | crops/s | vs numpy/scipy |\n|---|---|---:|---:|")
    for name, pipe, rate, ratio in rows:
        print(f"| {name} | {pipe} | {rate:,.0f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
