"""GPU check of issue 15: training MFU, extraction vs HF ViTModel, a 5-minute ViT-S on BBBC021.

Run by `bench/gpu_check.sh` (see there for the device call). In one process, within `--budget`
seconds, it writes one results file (`$OUT/gpu_check.json`, else bench/results/) after every
section, so a run stopped at its limit keeps what it measured, and prints the tables last:

1. `train_step`: the training step of ViT-S/16 multi-crop (2 x 224 + 8 x 96, 5 channels, DINO
   head of the default config) on one GPU: GPU augmentation of a raw batch (celldino.augment),
   student + teacher + DINO loss, backward, gradient clipping, fused AdamW, EMA; fp32 and bf16,
   eager and `torch.compile`d backbones. Model FLOPs (student forward + backward, teacher
   forward) are counted once with `torch.utils.flop_counter.FlopCounterMode`; MFU = FLOPs per
   step / step time / the card's dense peak (H100/H200 SXM: bf16 989, TF32 494, fp32 67
   TFLOP/s; fp32 rows are divided by the fp32 peak, PyTorch's default keeps TF32 off for
   matmuls). Checked against the analytic ViT count (bench_inference.vit_flops).
2. `host_syncs`: host syncs per step of `celldino.train.train` itself, counted with
   `torch.cuda.set_sync_debug_mode("warn")` over a 2-step and a 6-step epoch (the difference /
   4; the end of an epoch syncs on purpose: divergence check, checkpoint).
3. `extract`: images/s of celldino's extraction forward (`Embedder.on_device`: bf16 autocast,
   pinned batches) against HF `transformers.ViTModel` given the same weights (class tokens
   compared in fp32 first), same batches, same autocast; rounds alternate, median.
4. `bbbc021`: `celldino.train.train` on every cell of the transport file (lead's recipe
   `configs/real-cells.yaml` with model.arch=vit_small, 12 blocks, batch 256, on the GPU) for
   `--train-seconds` (a 2-epoch run measures the rate, the epochs are set to fill the time),
   then scored by the harness: `bench/real_cells.py score --cells ... --checkpoint RUN`.

`--smoke` runs every section on the CPU at tiny sizes (vit_tiny with 2 blocks, 32/16 px crops,
a few steps, a synthetic transport file when none is given) in well under a minute;
tests/test_gpu_check.py runs it with the packages the GPU machine lacks made unimportable.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

# modules the GPU machine does not have (KINDS.md): the smoke test makes them unimportable
BLOCK_ENV = "GPU_CHECK_BLOCK"


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"{name} is not installed on the GPU machine ({BLOCK_ENV})")
        return None


if os.environ.get(BLOCK_ENV):
    sys.meta_path.insert(0, _Blocker(set(os.environ[BLOCK_ENV].split(","))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from celldino import config as C  # noqa: E402

# dense peak FLOP/s by card (NVIDIA datasheets; the H200 is the H100's chip with more memory)
PEAKS = {
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
}
PLATES = ("Week4_27801", "Week4_27821", "Week4_27861")  # the harness's scored plates


# ---- sizes ---------------------------------------------------------------------------------


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(
            model=[
                "model.arch=vit_tiny",
                "model.depth=2",
                "model.patch_size=8",
                "model.img_size=32",
            ]
            + ["model.out_dim=64", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32"],
            augment=["augment.global_crop_size=32", "augment.local_crop_size=16"]
            + ["augment.n_local_crops=2"],
            raw=32,
            batch=2,
            warmup=1,
            steps=1,
            extract_batch=4,
            extract_rounds=2,
        )
    return dict(
        model=["model.arch=vit_small", "model.patch_size=16", "model.img_size=224"],
        augment=["augment.global_crop_size=224", "augment.local_crop_size=96"]
        + ["augment.n_local_crops=8"],
        raw=256,
        batch=128,
        warmup=3,
        steps=10,
        extract_batch=256,
        extract_rounds=7,
    )


def step_config(sz: dict, device: str) -> C.Config:
    return C.load_config(
        None,
        ["model.in_chans=5", f"train.device={device}", f"train.batch_size={sz['batch']}"]
        + sz["model"]
        + sz["augment"],
    )


# ---- helpers -------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card_peaks(device: torch.device) -> tuple[str, dict | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAKS.items():  # "H100 PCIe" before "H100"
        if all(part in name for part in key.split()):
            return name, peaks
    return name, None


class Results:
    """One JSON file, rewritten after every section (a run stopped at its limit keeps it)."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.data: dict = {"meta": meta, "sections": {}}
        self.save()

    def put(self, section: str, value) -> None:
        self.data["sections"][section] = value
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


# ---- 1. the training step ------------------------------------------------------------------


def _build_step(cfg: C.Config, device: torch.device, compile_: bool):
    """The body of celldino.train.loop's step, with its own components, on a device batch."""
    from celldino.augment import N_GLOBAL_CROPS, MultiCrop
    from celldino.models.build import build_head, build_model
    from celldino.train.loop import _param_groups, step_generator
    from celldino.train.meta_arch import DINOMetaArch

    torch.manual_seed(0)
    backbone = build_model(cfg.model)
    head = build_head(cfg.model, backbone.embed_dim)
    meta = DINOMetaArch(backbone, head, out_dim=cfg.model.out_dim, n_global=N_GLOBAL_CROPS).to(
        device
    )
    if compile_:  # as train.compile does
        meta.student.backbone.compile(dynamic=False)
        meta.teacher.backbone.compile(dynamic=False)
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(_param_groups(meta.student), lr=1e-4, **kernel)
    multicrop = MultiCrop(cfg.augment)
    meta.train()
    return meta, opt, multicrop, step_generator


def _step(parts, images, step: int, amp: bool, device: torch.device) -> torch.Tensor:
    from bench_train import step as dino_step  # the same step bench_train times on a CPU

    meta, opt, multicrop, step_generator = parts
    return dino_step(meta, opt, multicrop(images, generator=step_generator(0, step, 0)), amp)


def count_flops(cfg: C.Config, sz: dict, device: torch.device) -> dict:
    """Model FLOPs of one step (FlopCounterMode: matmuls, convolutions, attention), and of one
    backbone forward at the global crop size beside the analytic ViT count."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench_inference import vit_flops

    parts = _build_step(cfg, device, compile_=False)
    images = torch.rand(sz["batch"], 5, sz["raw"], sz["raw"], device=device)
    with FlopCounterMode(display=False) as fc:
        _step(parts, images, 0, amp=device.type == "cuda", device=device)
    step_flops = fc.get_total_flops()
    vit = parts[0].student.backbone
    g = cfg.augment.global_crop_size
    x = torch.rand(2, 5, g, g, device=device)
    with FlopCounterMode(display=False) as fc2, torch.no_grad():
        vit(x)
    analytic = vit_flops(g, cfg.model.patch_size, 5, vit.embed_dim, len(vit.blocks))
    return {
        "flops_per_step": step_flops,
        "flops_per_image": step_flops / sz["batch"],
        "backbone_fwd_flops_counted": fc2.get_total_flops() / 2,
        "backbone_fwd_flops_analytic": analytic,
    }


def time_step(cfg, sz, device, *, precision: str, compile_: bool) -> dict:
    amp = precision == "bf16"
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    parts = _build_step(cfg, device, compile_)
    g = torch.Generator(device=device).manual_seed(0)
    batches = [  # rotate between a few raw batches (fresh data, not one cached input)
        torch.rand(sz["batch"], 5, sz["raw"], sz["raw"], device=device, generator=g)
        for _ in range(3)
    ]
    t0 = time.perf_counter()
    for s in range(sz["warmup"]):
        loss = _step(parts, batches[s % 3], s, amp, device)
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(sz["steps"]):
        loss = _step(parts, batches[s % 3], sz["warmup"] + s, amp, device)
    sync(device)
    dt = (time.perf_counter() - t0) / sz["steps"]
    out = {
        "precision": precision,
        "compile": compile_,
        "batch": sz["batch"],
        "step_s": dt,
        "images_per_s": sz["batch"] / dt,
        "warmup_s": warm_s,
        "loss_finite": bool(torch.isfinite(loss)),
    }
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def section_train_step(res: Results, sz, device, deadline: float, smoke: bool) -> None:
    cfg = step_config(sz, device.type)
    name, peaks = card_peaks(device)
    flops = count_flops(cfg, sz, device)
    rows = []
    variants = [("fp32", False)] if smoke else [("fp32", False), ("bf16", False), ("bf16", True)]
    for precision, comp in variants:
        if time.time() > deadline:
            rows.append({"precision": precision, "compile": comp, "skipped": "time budget"})
            continue
        try:
            r = time_step(cfg, sz, device, precision=precision, compile_=comp)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            r = {"precision": precision, "compile": comp, "skipped": "out of memory"}
        if "step_s" in r and peaks:
            peak = peaks["fp32" if precision == "fp32" else precision]
            r["tflops"] = flops["flops_per_step"] / r["step_s"] / 1e12
            r["mfu"] = r["tflops"] * 1e12 / peak
            r["peak_tflops"] = peak / 1e12
        rows.append(r)
        res.put("train_step", {"card": name, **flops, "rows": rows})
    if smoke:
        rows += [
            {"precision": p, "compile": c, "skipped": "CPU smoke"}
            for p, c in (("bf16", False), ("bf16", True), ("fp32", True))
        ]
    res.put("train_step", {"card": name, **flops, "rows": rows})


def late_variants(res: Results, sz, device, deadline: float) -> None:
    """fp32 + compile and TF32, with whatever time is left after the BBBC021 run."""
    sec = res.data["sections"].get("train_step")
    if not sec or device.type != "cuda":
        return
    cfg = step_config(sz, device.type)
    _, peaks = card_peaks(device)
    for precision, comp in (("tf32", False), ("fp32", True)):
        if time.time() > deadline - (15 if not comp else 120):
            sec["rows"].append({"precision": precision, "compile": comp, "skipped": "time budget"})
            continue
        try:
            r = time_step(cfg, sz, device, precision=precision, compile_=comp)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            r = {"precision": precision, "compile": comp, "skipped": "out of memory"}
        if "step_s" in r and peaks:
            r["tflops"] = sec["flops_per_step"] / r["step_s"] / 1e12
            r["mfu"] = r["tflops"] * 1e12 / peaks[precision]
            r["peak_tflops"] = peaks[precision] / 1e12
        sec["rows"].append(r)
        res.put("train_step", sec)


# ---- 2. host syncs in celldino.train ---------------------------------------------------------


class _Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def section_host_syncs(res: Results, sz, device: torch.device, work: Path) -> None:
    """Syncs per step of the real loop: (syncs of a 6-step epoch - of a 2-step epoch) / 4."""
    from celldino.train import train

    if device.type != "cuda":
        res.put("host_syncs", {"skipped": "needs CUDA (torch.cuda.set_sync_debug_mode)"})
        return
    batch = 16
    counts, where = {}, {}
    for steps in (2, 6):
        x = torch.rand(batch * steps, 5, 64, 64)
        cfg = C.load_config(
            None,
            sz["model"]
            + sz["augment"]
            + ["model.in_chans=5", "train.device=cuda", f"train.batch_size={batch}"]
            + ["train.epochs=1", "train.log_every=1000", "train.diagnostics=false"]
            + [f"train.run_dir={work / f'syncs{steps}'}"],
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(cfg, dataset=_Images(x))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        msgs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        counts[steps] = len(msgs)
        where[steps] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught})[:20]
    res.put(
        "host_syncs",
        {
            "syncs_2_steps": counts[2],
            "syncs_6_steps": counts[6],
            "per_step": (counts[6] - counts[2]) / 4,
            "where_6_steps": where[6],
        },
    )


# ---- 3. extraction vs HF ViTModel ------------------------------------------------------------


def hf_model(sd: dict, img: int, patch: int, in_chans: int, dim: int, depth: int, heads: int):
    """HF ViTModel with celldino's weights (transformers 5 or 4.x names: bench_inference)."""
    from bench_inference import hf_vit

    return hf_vit(sd, img, patch, in_chans, dim, depth, heads)


def section_extract(res: Results, sz, device: torch.device, smoke: bool) -> None:
    from celldino.extract.extractor import Embedder
    from celldino.models import VisionTransformer, vit_small

    img, patch = (32, 8) if smoke else (224, 16)
    torch.manual_seed(0)
    if smoke:  # vit_tiny's width and heads, 2 blocks
        ours = VisionTransformer(embed_dim=192, depth=2, num_heads=3, img_size=img,
                                 patch_size=patch, in_chans=5)  # fmt: skip
    else:
        ours = vit_small(img_size=img, patch_size=patch, in_chans=5)
    ours.eval()
    with torch.no_grad():  # non-trivial norms and biases: no weight can be silently ignored
        for p in ours.parameters():
            if p.ndim == 1:
                p.add_(0.02 * torch.randn_like(p))
    sd = dict(ours.state_dict())
    dim, depth, heads = ours.embed_dim, len(ours.blocks), ours.blocks[0].attn.num_heads
    hf = hf_model(sd, img, patch, 5, dim, depth, heads).eval()
    x = torch.randn(4, 5, img, img)
    with torch.no_grad():  # the same function first, in fp32 on the CPU
        diff = float((ours(x)["cls"] - hf(pixel_values=x).last_hidden_state[:, 0]).abs().max())
    ecfg = C.ExtractConfig(checkpoint="-", data="-", batch_size=sz["extract_batch"])
    embed = Embedder(ours, ecfg, device)
    hf = hf.to(device)
    pin = device.type == "cuda"
    batches = [torch.randn(sz["extract_batch"], 5, img, img) for _ in range(3)]
    if pin:
        batches = [b.pin_memory() for b in batches]

    @torch.inference_mode()
    def run_hf(b: torch.Tensor) -> torch.Tensor:
        with embed.autocast():  # the same bf16 autocast on CUDA
            out = hf(pixel_values=b.to(device, non_blocking=True)).last_hidden_state[:, 0]
        return out.float()

    runners = {"celldino": embed.on_device, "HF ViTModel": run_hf}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():  # warm-up (kernels, autotuning)
        for b in batches:
            fn(b)
    sync(device)
    per_round = 3
    for r in range(sz["extract_rounds"]):
        for name, fn in runners.items() if r % 2 == 0 else reversed(runners.items()):
            sync(device)
            t0 = time.perf_counter()
            outs = [fn(batches[i % 3]) for i in range(per_round)]
            torch.stack([o.sum() for o in outs]).cpu()  # the results reach the host
            times[name].append((time.perf_counter() - t0) / per_round)
    rows = {
        name: {
            "median_s_per_batch": statistics.median(t),
            "images_per_s": sz["extract_batch"] / statistics.median(t),
            "spread": (max(t) - min(t)) / statistics.median(t),
        }
        for name, t in times.items()
    }
    res.put(
        "extract",
        {
            "model": f"{'vit_tiny(depth=2)' if smoke else 'vit_small'}/{patch}, {img} px, 5 ch",
            "batch": sz["extract_batch"],
            "amp_bf16": embed.amp,
            "cls_max_abs_diff_fp32": diff,
            "rows": rows,
            "ratio_celldino_over_hf": rows["celldino"]["images_per_s"]
            / rows["HF ViTModel"]["images_per_s"],
        },
    )


# ---- 4. five minutes of ViT-S on BBBC021, scored by the harness -----------------------------


def synthetic_transport(path: Path, per_field: int = 4) -> Path:
    """A tiny file in the transport's format (3 plates x DMSO + 3 cycloheximide doses x 2 fields
    x `per_field` cells, 3 x 64 x 64 uint8) for the smoke run when no transport is there."""
    rng = np.random.default_rng(0)
    rows = []
    for plate in PLATES:
        for w, dose in enumerate((0.0, 5.0, 15.0, 50.0)):
            for f in range(2):
                for _ in range(per_field):
                    rows.append((plate, f"W{w}", f"{plate}_W{w}_s{f}", dose))
    n = len(rows)
    dose = np.array([r[3] for r in rows])
    base = rng.integers(0, 160, size=(n, 3, 64, 64))
    images = np.clip(base + (dose[:, None, None, None] * 1.5), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        images=images,
        plate=np.array([r[0] for r in rows]),
        well=np.array([r[1] for r in rows]),
        source_image_stem=np.array([r[2] for r in rows]),
        concentration_uM=dose,
        compound=np.where(dose > 0, "cycloheximide", "DMSO"),
    )
    return path


def _rate(run_dir: Path, batch: int) -> float:
    """Steady images/s of a run, between its first and last metrics records (each record's
    images_per_s is step x batch over the time since the loop began: the first steps' warm-up
    drops out of the difference)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    a, b = recs[0], recs[-1]
    ta = a["step"] * batch / a["images_per_s"]
    tb = b["step"] * batch / b["images_per_s"]
    if len(recs) < 2 or tb <= ta:
        return b["images_per_s"]
    return (b["step"] - a["step"]) * batch / (tb - ta)


def section_bbbc021(
    res: Results, args, device: torch.device, work: Path, out: Path, deadline: float
) -> None:
    import real_cells as rc
    from celldino.train import train

    if args.cells:
        cells = Path(args.cells)
    elif args.smoke:
        cells = synthetic_transport(work / "synthetic.npz", per_field=2)
    else:
        cells = ROOT / "transport" / "bbbc021.npz"
    if not cells.is_file() or cells.stat().st_size == 0:
        res.put("bbbc021", {"skipped": f"no transport file {cells}: real_cells.py transport"})
        return
    x, meta = rc.load_cells(cells)
    n = len(x)
    base = rc.BASE if rc.BASE.exists() else None
    if args.smoke:
        over = ["model.arch=vit_tiny", "model.depth=2", "train.batch_size=16", "train.log_every=2"]
    else:
        over = ["model.arch=vit_small", "model.depth=0", "train.batch_size=256"]
        over += ["train.log_every=5", "train.num_workers=4"]
    over += [f"train.device={device.type}", "train.data=", "model.in_chans=3", *args.train_override]

    def run(run_dir: Path, epochs: int) -> float:
        cfg = C.load_config(base, [*over, f"train.run_dir={run_dir}", f"train.epochs={epochs}"])
        t0 = time.perf_counter()
        train(cfg, dataset=rc.Crops(x, meta))
        return time.perf_counter() - t0

    batch = C.load_config(base, over).train.batch_size
    calib_epochs = 1 if args.smoke else 2
    t_calib = run(work / "bbbc021_calibration", calib_epochs)
    rate = _rate(work / "bbbc021_calibration", batch)
    reserve = 20 if args.smoke else 90  # scoring (embeddings on the CPU) and the results file
    seconds = min(args.train_seconds, max(deadline - time.time() - reserve, 1.0))
    epochs = max(1, int(seconds * rate / n))
    if args.smoke:
        epochs = 1
    run_dir = work / "bbbc021_vits"  # its checkpoints are far over what $OUT brings back
    t_train = run(run_dir, epochs)
    for name in ("metrics.jsonl", "config.yaml"):
        shutil.copyfile(run_dir / name, out / f"bbbc021_{name}")
    sec = {
        "cells": n,
        "transport": str(cells),
        "config": str(base) if base else "celldino defaults",
        "overrides": over,
        "feature": C.load_config(base, over).extract.feature,
        "calibration": {"epochs": calib_epochs, "seconds": t_calib, "images_per_s": rate},
        "train": {
            "epochs": epochs,
            "seconds": t_train,
            "images_per_s": _rate(run_dir, batch),
            "target_seconds": seconds,
        },
        "run_dir": str(run_dir),
    }
    res.put("bbbc021", sec)
    score_out = out / "bbbc021_score.json"
    cmd = [sys.executable, str(ROOT / "bench" / "real_cells.py"), "score", "--cells", str(cells)]
    cmd += ["--checkpoint", str(run_dir), "--out", str(score_out)]
    cmd += ["--threads", str(min(os.cpu_count() or 2, 16))]
    cmd += ["--feature", C.load_config(base, over).extract.feature]  # the recipe's feature
    if args.smoke:
        cmd += ["--no-engineered", "--n-boot", "20"]
    t0 = time.perf_counter()
    try:  # what is left of the call's budget, never unbounded
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=None if args.smoke else max(30.0, deadline - time.time()),
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"scoring ran past the budget: {' '.join(cmd)}") from e
    sec["score"] = {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - t0,
        "stdout_tail": proc.stdout[-6000:],
        "stderr_tail": proc.stderr[-3000:] if proc.returncode else "",
    }
    if score_out.exists():
        sec["score"]["headline"] = json.loads(score_out.read_text()).get("headline")
    res.put("bbbc021", sec)
    if proc.returncode:  # the section fails (and the check's exit code with it)
        raise RuntimeError(f"scoring failed ({proc.returncode}): {proc.stderr[-500:]}")


# ---- tables ----------------------------------------------------------------------------------


def print_tables(data: dict) -> None:
    s, m = data["sections"], data["meta"]
    print(f"\n== gpu_check ({'smoke, CPU' if m['smoke'] else m['device']}), {m['elapsed_s']:.0f} s")
    ts = s.get("train_step")
    if ts:
        print(f"\ntraining step, {ts['card']}: {ts['flops_per_image'] / 1e9:.1f} GFLOP per image")
        print(f"  (backbone forward counted {ts['backbone_fwd_flops_counted'] / 1e9:.3f} vs analytic "
              f"{ts['backbone_fwd_flops_analytic'] / 1e9:.3f} GFLOP per image)")  # fmt: skip
        print(f"  {'precision':<9} {'compile':<7} {'img/s':>9} {'step ms':>8} {'TFLOP/s':>8} "
              f"{'MFU':>6} {'peak':>5}  note")  # fmt: skip
        for r in ts["rows"]:
            if "skipped" in r:
                print(f"  {r['precision']:<9} {r['compile']!s:<7} {'':>9} {'':>8} {'':>8} {'':>6} "
                      f"{'':>5}  skipped: {r['skipped']}")  # fmt: skip
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
            tf = f"{r['tflops']:.1f}" if "tflops" in r else "-"
            pk = f"{r['peak_tflops']:.0f}" if "peak_tflops" in r else "-"
            note = f"warm-up {r['warmup_s']:.0f} s" + ("" if r["loss_finite"] else ", LOSS NaN")
            print(f"  {r['precision']:<9} {r['compile']!s:<7} {r['images_per_s']:>9.1f} "
                  f"{1e3 * r['step_s']:>8.1f} {tf:>8} {mfu:>6} {pk:>5}  {note}")  # fmt: skip
    hs = s.get("host_syncs")
    if hs:
        if "skipped" in hs:
            print(f"\nhost syncs per step of celldino.train: skipped ({hs['skipped']})")
        else:
            print(f"\nhost syncs per step of celldino.train: {hs['per_step']:.2f} "
                  f"({hs['syncs_2_steps']} in a 2-step epoch, {hs['syncs_6_steps']} in 6)")  # fmt: skip
    ex = s.get("extract")
    if ex:
        print(f"\nextraction, {ex['model']}, batch {ex['batch']}, bf16 autocast {ex['amp_bf16']} "
              f"(class tokens equal to {ex['cls_max_abs_diff_fp32']:.1e} in fp32):")  # fmt: skip
        for name, r in ex["rows"].items():
            print(
                f"  {name:<12} {r['images_per_s']:>10.1f} img/s  (spread {100 * r['spread']:.0f}%)"
            )
        print(f"  celldino / HF ViTModel = {ex['ratio_celldino_over_hf']:.2f}x")
    bb = s.get("bbbc021")
    if bb:
        if "skipped" in bb:
            print(f"\nBBBC021 training: skipped ({bb['skipped']})")
        else:
            t = bb["train"]
            print(f"\nBBBC021: {bb['cells']} cells, {t['epochs']} epochs in {t['seconds']:.0f} s "
                  f"({t['images_per_s']:.0f} img/s); score rc {bb.get('score', {}).get('returncode')}")  # fmt: skip
            head = (bb.get("score") or {}).get("headline") or {}
            for name, h in head.items():
                for k, v in h.items():
                    if " - " not in k and not k.endswith(" ci"):
                        ci = h.get(f"{k} ci", ["?", "?"])
                        print(f"  {name}: {k} = {v} [{ci[0]}, {ci[1]}]")
                for k, v in h.items():
                    if " - " in k:
                        print(f"  {name}: {k}: {v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]")


# ---- main ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", default=os.environ.get("GPU_CHECK_SMOKE") == "1"
    )
    ap.add_argument("--out", type=Path, default=None, help="folder of the results (default $OUT)")
    ap.add_argument("--cells", default=None, help="transport .npz (default transport/bbbc021.npz;"
                    " --smoke: a synthetic one)")  # fmt: skip
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for everything")
    ap.add_argument("--train-seconds", type=float, default=300.0)
    ap.add_argument("--only", default="", help="comma list: train_step,host_syncs,extract,bbbc021")
    ap.add_argument("--train-override", action="append", default=[], help="key=value (BBBC021)")
    args = ap.parse_args(argv)
    start = time.time()
    deadline = start + args.budget
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: gpu_check: no CUDA GPU is visible; use --smoke for the CPU check")
        return 2
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    sz = sizes(args.smoke)
    only = set(filter(None, args.only.split(","))) or {
        "train_step",
        "host_syncs",
        "extract",
        "bbbc021",
    }
    name, _ = card_peaks(device)
    meta = {
        "smoke": args.smoke,
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)),
        "budget_s": args.budget,
        "elapsed_s": 0.0,
    }
    res = Results(out / ("gpu_check_smoke.json" if args.smoke else "gpu_check.json"), meta)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        steps = [
            ("train_step", lambda: section_train_step(res, sz, device, deadline - 330, args.smoke)),
            ("host_syncs", lambda: section_host_syncs(res, sz, device, work)),
            ("extract", lambda: section_extract(res, sz, device, args.smoke)),
            ("bbbc021", lambda: section_bbbc021(res, args, device, work, out, deadline)),
            ("late", lambda: late_variants(res, sz, device, deadline)),
        ]
        for key, fn in steps:
            if key != "late" and key not in only:
                continue
            t0 = time.time()
            print(f"[gpu_check] {key} ...", flush=True)
            try:
                fn()
            except Exception as e:  # one broken section must not lose the others' numbers
                failed.append(key)
                res.put(f"{key}_error", f"{type(e).__name__}: {e}")
                print(f"[gpu_check] {key} FAILED: {type(e).__name__}: {e}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"[gpu_check] {key}: {time.time() - t0:.0f} s", flush=True)
            res.data["meta"]["elapsed_s"] = time.time() - start
            res.save()
    print_tables(res.data)
    print(f"\nwrote {res.path}" + (f"; FAILED sections: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
