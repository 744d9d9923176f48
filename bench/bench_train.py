"""Training throughput: images/s of a full celldino DINO step for ViT-S/16 multi-crop.

Setting: ViT-S/16, 5 channels, 2 global crops of 224 px + 8 local crops of 96 px per image (the
paper's multi-crop), DINO head with 65,536 outputs, AdamW, gradient clipping, teacher EMA. Three
variants measured in the same run on the same images:

- `celldino step`: the batched tensor multi-crop + student/teacher step (`DINOMetaArch`), as
  `celldino train` runs it;
- `per-sample aug + step` (the peer): the same step fed by a per-sample numpy/scipy multi-crop
  like the reference implementations' Dataset (`bench_augment.reference_multicrop`);
- `model only`: the step on crops made once beforehand (upper bound: no augmentation cost).

    .venv/bin/python bench/bench_train.py                # CPU, batch 4, 3 timed steps
    .venv/bin/python bench/bench_train.py --batch 8 --steps 5 --out-dim 65536
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_augment import reference_multicrop
from celldino import config as C
from celldino.augment import N_GLOBAL_CROPS, MultiCrop
from celldino.models.build import build_head, build_model
from celldino.train.meta_arch import DINOMetaArch


def make(cfg: C.Config, device: torch.device):
    torch.manual_seed(0)
    backbone = build_model(cfg.model)
    head = build_head(cfg.model, backbone.embed_dim)
    meta = DINOMetaArch(backbone, head, out_dim=cfg.model.out_dim).to(device)
    opt = torch.optim.AdamW(meta.student.parameters(), lr=1e-4)
    return meta, opt


def step(meta, opt, crops: list[torch.Tensor], amp: bool) -> torch.Tensor:
    """One DINO step on ready crops; the loss stays on the device (no host sync)."""
    dev = crops[0].device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        loss, _ = meta.forward_losses(
            crops[:N_GLOBAL_CROPS], crops[N_GLOBAL_CROPS:], teacher_temp=0.04
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(meta.student.parameters(), 3.0)
    opt.step()
    meta.update_teacher(0.996)
    return loss.detach()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="celldino training throughput (ViT-S/16 multi-crop)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--image", type=int, default=256, help="side of the source crops")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = C.load_config(
        None,
        [
            "model.arch=vit_small",
            "model.patch_size=16",
            "model.in_chans=5",
            "model.img_size=224",
            f"model.out_dim={args.out_dim}",
            "augment.global_crop_size=224",
            "augment.local_crop_size=96",
            "augment.n_local_crops=8",
        ],
    )
    amp = device.type == "cuda"
    meta, opt = make(cfg, device)
    multicrop = MultiCrop(cfg.augment)
    rng = np.random.default_rng(0)
    images = rng.random((args.batch, 5, args.image, args.image), dtype=np.float32)
    x = torch.from_numpy(images).to(device)
    g = torch.Generator().manual_seed(0)
    pyrng = random.Random(0)

    def ours() -> None:
        step(meta, opt, multicrop(x, generator=g), amp)

    def peer() -> None:
        views = reference_multicrop(images, cfg.augment, pyrng)
        crops = [v.to(device) for v in views]  # (B, C, h, w) per crop
        step(meta, opt, crops, amp)

    fixed = multicrop(x, generator=g)

    def bare() -> None:
        step(meta, opt, fixed, amp)

    variants = {"celldino step": ours, "per-sample aug + step": peer, "model only": bare}
    for fn in variants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps):  # round-robin, so load changes on a shared machine hit all alike
        for name, fn in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    results = {name: args.batch / float(np.median(t)) for name, t in times.items()}

    peer_rate = results["per-sample aug + step"]
    print(
        f"\nViT-S/16 DINO training, 5 channels, 2x224 + 8x96 crops, out_dim {args.out_dim}, "
        f"batch {args.batch}, median of {args.steps} steps, {device} ({torch.get_num_threads()} threads)"
    )
    print("| variant | images/s | vs per-sample aug |")
    print("|---|---:|---:|")
    for name, rate in results.items():
        print(f"| {name} | {rate:.2f} | {rate / peer_rate:.2f}x |")


if __name__ == "__main__":
    main()
