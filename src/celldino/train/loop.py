"""The training loop: data → multi-crop → student/teacher losses → AdamW → EMA → diagnostics.

`train(cfg)` runs DINO (or WS-DINO with `train.weak_label`, iBOT / KoLeo with their weights) on
one CPU, one GPU or every rank of a `torchrun` job, writing into `train.run_dir`:
`config.yaml` (the resolved config), `metrics.jsonl` (diagnostics every `train.log_every`
steps) and `checkpoints/` (see celldino.train.checkpoint). `resume=True` continues exactly
where `last` stopped: same weights at the end as an uninterrupted run on CPU.

Randomness is split so that resuming is exact: the data order is a function of (seed, epoch),
the augmentation and iBOT masks of a step use a generator seeded from (seed, step, rank), and
the global torch RNG (stochastic depth) is saved in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from celldino import log
from celldino.augment import N_GLOBAL_CROPS, MultiCrop
from celldino.config import Config, save_config
from celldino.diagnostics import collapse_message
from celldino.log import get_logger
from celldino.models.build import build_head, build_model
from celldino.train import checkpoint, distributed
from celldino.train import schedules as S
from celldino.train.meta_arch import DINOMetaArch
from celldino.train.sampler import StepBatchSampler, WeakLabelPairSampler

logger = get_logger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class _Items(Dataset):
    """Maps sampler items (an index, or a WS-DINO pair of indices) to image tensors."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def _image(self, i: int) -> torch.Tensor:
        x = self.base[i]
        if isinstance(x, (tuple, list)):
            x = x[0]
        elif isinstance(x, dict):
            x = x["image"]
        return torch.as_tensor(x, dtype=torch.float32)  # (C, H, W)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(item, (tuple, list)):
            return tuple(self._image(int(i)) for i in item)
        return (self._image(int(item)),)

    def __getitems__(self, items: list[Any]) -> list[tuple[torch.Tensor, ...]]:
        """A whole batch at once when the dataset reads batches faster (CropDataset)."""
        read = getattr(self.base, "__getitems__", None)
        if read is None:
            return [self[item] for item in items]
        if items and isinstance(items[0], (tuple, list)):  # WS-DINO pairs
            width = len(items[0])
            flat = read([int(i) for item in items for i in item])
            return [tuple(flat[k * width : (k + 1) * width]) for k in range(len(items))]
        return [(t,) for t in read([int(i) for i in items])]


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of one step's augmentation and masks (independent of history)."""
    state = np.random.SeedSequence([seed, step, rank, 0xD1]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def sample_masks(
    n_images: int,
    n_tokens: int,
    *,
    ratio: Sequence[float],
    prob: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """(n_images, n_tokens) bool iBOT masks: a fraction `prob` of images get a random ratio of
    their patches (uniform in `ratio`) masked at random positions; the others none."""
    masks = torch.zeros(n_images, n_tokens, dtype=torch.bool)
    n_masked_images = int(round(n_images * prob))
    chosen = torch.randperm(n_images, generator=generator)[:n_masked_images]
    lo, hi = float(ratio[0]), float(ratio[1])
    for i in chosen.tolist():
        r = lo + (hi - lo) * float(torch.rand((), generator=generator))
        k = max(1, int(round(r * n_tokens)))
        masks[i, torch.randperm(n_tokens, generator=generator)[:k]] = True
    return masks


def _param_groups(model: nn.Module) -> list[dict]:
    """DINO's rule: no weight decay on biases and norm parameters (1-D tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "no_wd": True}]


def _open_dataset(cfg: Config) -> Dataset:
    if not cfg.train.data:
        raise ValueError(
            "train.data is empty: set it to a folder written by `celldino prepare` "
            "(cells.parquet + crops.zarr), e.g. celldino train configs/tiny.yaml train.data=prep"
        )
    from celldino.data import CropDataset

    return CropDataset(cfg.train.data, channels=list(cfg.train.channels) or None)


def _weak_labels(dataset: Dataset, column: str) -> list:
    meta = getattr(dataset, "metadata", None)
    if meta is None:
        raise ValueError(
            f"train.weak_label={column!r} needs per-image metadata, but the dataset has no "
            "`.metadata` table"
        )
    if column not in meta.columns:
        cols = [c for c in meta.columns if c.startswith("Metadata_")]
        raise ValueError(f"train.weak_label={column!r} is not a metadata column (have: {cols})")
    return meta[column].tolist()


def train(
    cfg: Config,
    *,
    dataset: Dataset | None = None,
    resume: bool = False,
    stop_at_step: int | None = None,
) -> Path:
    """Train (or fine-tune from `model.pretrained`) and return the run directory.

    `dataset` (optional) replaces the crop store of `train.data`: any map-style dataset whose
    items are (C, H, W) float tensors, with a `.metadata` DataFrame for WS-DINO. `stop_at_step`
    saves a checkpoint and returns after that many optimisation steps (for interruption tests).
    """
    # The sharp teacher softmax and Adam's second moments produce denormal floats, which x86
    # CPUs compute far slower: in a cProfile of 4 demo training steps, flushing them to zero took
    # the steps from 29.2 s to 12.2 s. It is set before the first parallel op so that torch's
    # worker threads inherit it, and switched off again afterwards (library callers).
    torch.set_flush_denormal(True)
    info = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, info, dataset=dataset, resume=resume, stop_at_step=stop_at_step)
    finally:
        distributed.teardown()
        torch.set_flush_denormal(False)


def _train(
    cfg: Config,
    info: distributed.DistInfo,
    *,
    dataset: Dataset | None,
    resume: bool,
    stop_at_step: int | None,
) -> Path:
    tc = cfg.train
    device = info.device
    run_dir = Path(tc.run_dir)
    if info.is_main:
        if not resume and checkpoint.has_checkpoint(run_dir):
            raise ValueError(
                f"{run_dir} already holds a training run; pass --resume to continue it or "
                "choose another train.run_dir"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # ---- data ---------------------------------------------------------------------------
    dataset = dataset if dataset is not None else _open_dataset(cfg)
    if tc.weak_label:
        sampler: StepBatchSampler = WeakLabelPairSampler(
            _weak_labels(dataset, tc.weak_label),
            tc.batch_size,
            seed=tc.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
    else:
        sampler = StepBatchSampler(
            len(dataset),  # type: ignore[arg-type]
            tc.batch_size,
            seed=tc.seed,
            rank=info.rank,
            world_size=info.world_size,
        )
    loader = DataLoader(
        _Items(dataset),
        batch_sampler=sampler,
        num_workers=tc.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
        persistent_workers=False,
    )
    multicrop = MultiCrop(cfg.augment)
    spe = sampler.steps_per_epoch
    total_steps = tc.epochs * spe

    # ---- model --------------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    backbone = build_model(cfg.model)
    head = build_head(cfg.model, backbone.embed_dim)
    if tc.ibot_weight > 0 and cfg.model.channel_mode == "channelwise":
        raise ValueError(
            "train.ibot_weight > 0 needs model.channel_mode multichannel or channel_adaptive"
        )
    meta = DINOMetaArch(
        backbone,
        head,
        out_dim=cfg.model.out_dim,
        n_global=N_GLOBAL_CROPS,
        student_temp=tc.student_temp,
        center_momentum=tc.center_momentum,
        ibot_weight=tc.ibot_weight,
        koleo_weight=tc.koleo_weight,
    ).to(device)
    if info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        meta.student_ddp = DDP(
            meta.student,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    peak_lr = S.scaled_lr(tc.lr, tc.batch_size)
    # foreach: one kernel per op over all tensors (torch picks the per-tensor loop on CPU).
    optimizer = torch.optim.AdamW(_param_groups(meta.student), lr=peak_lr, foreach=True)
    last_layer = list(meta.student.head.last_layer.parameters())

    step = 0
    if resume and checkpoint.has_checkpoint(run_dir):
        state = checkpoint.load(run_dir, meta_arch=meta, optimizer=optimizer, device=device)
        step = int(state["step"])
        logger.info("resuming %s at step %d (epoch %d)", run_dir, step, step // max(spe, 1))
        if info.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
    elif resume:
        logger.warning("--resume: no checkpoint in %s yet, starting from scratch", run_dir)

    warmup_steps = int(round(tc.warmup_epochs * spe))
    temp_warmup_steps = int(round(tc.warmup_teacher_temp_epochs * spe))
    use_amp = tc.amp and device.type == "cuda"
    enabled = info.is_main and logger.isEnabledFor(logging.INFO)
    bar = log.ProgressBar("train", total=total_steps, done=step, enabled=enabled)
    metrics_path = run_dir / "metrics.jsonl"
    warned = False
    t0, seen = time.perf_counter(), 0
    try:
        while step < total_steps:
            epoch = step // spe
            sampler.set_epoch(epoch, start_step=step % spe)
            meta.train()
            for batch in loader:
                lr = S.learning_rate(
                    step,
                    base_lr=peak_lr,
                    min_lr=tc.min_lr,
                    total_steps=total_steps,
                    warmup_steps=warmup_steps,
                )
                wd = S.weight_decay(
                    step, base=tc.weight_decay, final=tc.weight_decay_end, total_steps=total_steps
                )
                mom = S.teacher_momentum(step, base=tc.momentum_teacher, total_steps=total_steps)
                t_temp = S.teacher_temperature(
                    step,
                    warmup_temp=tc.warmup_teacher_temp,
                    temp=tc.teacher_temp,
                    warmup_steps=temp_warmup_steps,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                    if not group.get("no_wd"):
                        group["weight_decay"] = wd

                gen = step_generator(tc.seed, step, info.rank)
                images = batch[0].to(device, non_blocking=True)  # (B, C, H, W)
                local_images = batch[1].to(device, non_blocking=True) if len(batch) > 1 else None
                crops = multicrop(images, generator=gen, local_images=local_images)
                global_crops, local_crops = crops[:N_GLOBAL_CROPS], crops[N_GLOBAL_CROPS:]
                masks = None
                if tc.ibot_weight > 0:
                    masks = sample_masks(
                        N_GLOBAL_CROPS * images.shape[0],
                        _n_patch_tokens(cfg, global_crops[0]),
                        ratio=tc.ibot_mask_ratio,
                        prob=tc.ibot_mask_prob,
                        generator=gen,
                    ).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss, parts = meta.forward_losses(
                        global_crops, local_crops, teacher_temp=t_temp, masks=masks
                    )
                if not math.isfinite(loss.item()):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at step {step}: lower train.lr, raise "
                        "train.warmup_epochs or set train.clip_grad (the last checkpoint is kept)"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(meta.student.parameters(), tc.clip_grad)
                if epoch < tc.freeze_last_layer:
                    for p in last_layer:
                        p.grad = None
                optimizer.step()
                meta.update_teacher(mom)
                step += 1
                seen += images.shape[0] * info.world_size

                text = None
                if step % max(tc.log_every, 1) == 0 or step == total_steps:
                    record = {
                        "step": step,
                        "epoch": step / spe,
                        "loss": float(loss.detach()),
                        "lr": lr,
                        "weight_decay": wd,
                        "momentum": mom,
                        "teacher_temp": t_temp,
                        **{k: float(v) for k, v in parts.items() if k.startswith("loss_")},
                    }
                    if tc.diagnostics:
                        record.update(meta.diagnostics(parts, t_temp))
                    record = distributed.mean_over_ranks(record, device)
                    record["step"] = step
                    record["images_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
                    if info.is_main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    text = f"loss {record['loss']:.4f} lr {lr:.2e}"
                    if tc.diagnostics:
                        text += (
                            f" H(t) {record['teacher_entropy']:.2f}"
                            f" KL {record['kl_student_teacher']:.2f}"
                            f" std {record['embedding_std']:.2f}"
                        )
                        msg = collapse_message(
                            record["teacher_entropy"], cfg.model.out_dim, record["embedding_std"]
                        )
                        if msg and step > warmup_steps and not warned and info.is_main:
                            logger.warning(msg)
                            warned = True
                    logger.debug("step %d: %s", step, text)
                bar.update(text)

                end_of_epoch = step % spe == 0
                if end_of_epoch or step == stop_at_step:
                    ep = (step - 1) // spe + 1  # epochs begun so far
                    keep = end_of_epoch and tc.save_every > 0 and ep % tc.save_every == 0
                    _save(cfg, info, run_dir, meta, optimizer, step, ep, epoch_copy=keep)
                if step == stop_at_step:
                    return run_dir
    except KeyboardInterrupt:
        if step > 0:
            _save(cfg, info, run_dir, meta, optimizer, step, step // spe, epoch_copy=False)
            logger.warning("interrupted at step %d; `--resume` continues from here", step)
        raise
    finally:
        bar.close()
    logger.info("training finished: %d steps, checkpoints in %s", step, run_dir / "checkpoints")
    return run_dir


def _n_patch_tokens(cfg: Config, crop: torch.Tensor) -> int:
    _, C, H, W = crop.shape
    n = (H // cfg.model.patch_size) * (W // cfg.model.patch_size)
    return n * C if cfg.model.channel_mode == "channel_adaptive" else n


def _save(
    cfg: Config,
    info: distributed.DistInfo,
    run_dir: Path,
    meta: DINOMetaArch,
    optimizer: torch.optim.Optimizer,
    step: int,
    epoch: int,
    *,
    epoch_copy: bool,
) -> None:
    if info.is_main:
        checkpoint.save(
            run_dir,
            meta_arch=meta,
            optimizer=optimizer,
            step=step,
            epoch=epoch,
            model_config=cfg.model,
            epoch_copy=epoch_copy,
        )
    distributed.barrier()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be redone)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


__all__ = ["TrainingDiverged", "sample_masks", "step_generator", "train"]
