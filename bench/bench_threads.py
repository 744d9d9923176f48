"""Torch threads on a shared CPU: DINO training steps/s for torch's default thread count, the
`train.threads=0` (auto) count and one thread, on an idle machine and with a background process
burning one core (another user's job).

The step is bench_train's (batched multi-crop + student/teacher DINO step, AdamW, clipping,
EMA) on a small ViT. The thread settings run round-robin in one process (the count is switched
with `torch.set_num_threads` before each round), so load changes from other jobs hit them
alike; the table gives the median steps/s over rounds and the ratio to torch's default in the
same condition.

    .venv/bin/python bench/bench_threads.py                 # 1 to 3 min on 2 cores
    .venv/bin/python bench/bench_threads.py --rounds 3 --steps 2 --arch vit_tiny --depth 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import make, step
from celldino import config as C
from celldino import distributed
from celldino.augment import MultiCrop


def _burn() -> None:
    """Another user's job: one core busy until terminated."""
    x = 0
    while True:
        x += 1


def _rates(variants: dict[str, int], fn, rounds: int, steps: int) -> dict[str, float]:
    """Median steps/s per variant, rounds interleaved (A B C A B C ...)."""
    for threads in variants.values():  # warm-up at every thread count
        torch.set_num_threads(threads)
        fn()
    per: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, threads in variants.items():
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            per[name].append(steps / (time.perf_counter() - t0))
    return {name: float(np.median(r)) for name, r in per.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="DINO steps/s by torch thread count, idle and loaded")
    ap.add_argument("--arch", default="vit_tiny")
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    args = ap.parse_args(argv)

    default = torch.get_num_threads()  # torch's own choice in a fresh process
    auto = distributed.auto_threads(
        distributed.available_cores(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        local_ranks=1,
        workers=0,
    )
    variants = {"torch default": default, "auto (train.threads=0)": auto, "threads=1": 1}
    cfg = C.load_config(
        None,
        [
            f"model.arch={args.arch}",
            f"model.depth={args.depth}",
            "model.patch_size=16",
            "model.in_chans=5",
            "model.img_size=96",
            "model.out_dim=4096",
            "augment.global_crop_size=96",
            "augment.local_crop_size=48",
            "augment.n_local_crops=4",
        ],
    )
    torch.set_flush_denormal(True)  # as `celldino train` runs
    meta, opt = make(cfg, torch.device("cpu"))
    multicrop = MultiCrop(cfg.augment)
    x = torch.from_numpy(np.random.default_rng(0).random((args.batch, 5, 128, 128), np.float32))
    g = torch.Generator().manual_seed(0)

    def one_step() -> None:
        step(meta, opt, multicrop(x, generator=g), False)

    results: dict[str, dict[str, float]] = {}
    load: dict[str, float] = {}
    results["idle"] = _rates(variants, one_step, args.rounds, args.steps)
    load["idle"] = os.getloadavg()[0]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    burner = ctx.Process(target=_burn, daemon=True)
    burner.start()
    try:
        time.sleep(1.0)
        results["1 core busy"] = _rates(variants, one_step, args.rounds, args.steps)
        load["1 core busy"] = os.getloadavg()[0]
    finally:
        burner.terminate()
        burner.join()

    print(
        f"\n{args.arch} depth {args.depth}, patch 16, 5 channels, 2x96 + 4x48 crops, out_dim 4096,"
        f" batch {args.batch}; {distributed.available_cores()} cores available, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; median of {args.rounds} "
        f"rounds of {args.steps} steps"
    )
    print("| machine | setting | threads | steps/s | vs torch default |")
    print("|---|---|---:|---:|---:|")
    for cond, rates in results.items():
        base = rates["torch default"]
        for name, rate in rates.items():
            print(
                f"| {cond} (load avg {load[cond]:.1f}) | {name} | {variants[name]} | {rate:.2f} "
                f"| {rate / base:.2f}x |"
            )


if __name__ == "__main__":
    main()
