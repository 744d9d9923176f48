"""The training loop: data → multi-crop → student/teacher losses → AdamW → EMA → diagnostics.

`train(cfg)` runs DINO (or WS-DINO with `train.weak_label`, iBOT / KoLeo with their weights) on
one CPU, one GPU or every rank of a `torchrun` job, writing into `train.run_dir`:
`config.yaml` (the resolved config), `metrics.jsonl` (diagnostics every `train.log_every`
steps) and `checkpoints/` (see celldino.train.checkpoint). `resume=True` continues exactly
where `last` stopped: same weights at the end as an uninterrupted run on CPU; it is refused,
before anything is written, when the settings (other than `RESUMABLE` ones) or the training data
differ from the run's, naming each difference. The run dir is locked while training
(`celldino.io.lock`), so a second `train` into it stops at once naming the first. Every epoch
logs one line (loss, learning rate, the diagnostics, time), for batch logs; the diagnostics'
verdict (`celldino.diagnostics.training_verdict`) is logged once per kind after the warm-up.
With `train.monitor_label`, kNN and linear probes of the teacher are scored at step 0 and at
each epoch end and appended to metrics.jsonl as separate records.

Randomness is split so that resuming is exact: the data order is a function of (seed, epoch),
the augmentation and iBOT masks of a step use a generator seeded from (seed, step, rank), and
the global torch RNG (stochastic depth) is saved in the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from celldino import distributed, log
from celldino.augment import N_GLOBAL_CROPS, MultiCrop
from celldino.config import Config, ConfigError, load_config, to_dict
from celldino.diagnostics import training_verdict, verdict_inputs
from celldino.errors import DataError, MissingInputError, UserError
from celldino.io import provenance
from celldino.io.configfile import save_config
from celldino.io.files import require_writable, write_error
from celldino.io.lock import input_lock, output_lock
from celldino.io.provenance import refuse_overwriting_inputs
from celldino.io.trainrun import CONFIG, METRICS, append_metrics, truncate_metrics
from celldino.log import get_logger
from celldino.models.build import build_head, build_model
from celldino.train import checkpoint
from celldino.train import schedules as S
from celldino.train.meta_arch import DINOMetaArch, TeacherUsage, clip_gradients
from celldino.train.sampler import StepBatchSampler, WeakLabelPairSampler

logger = get_logger(__name__)


# settings `--resume` may change: more epochs, and what changes speed or logging, not results
RESUMABLE = frozenset(
    {
        "train.epochs",
        "train.num_workers",
        "train.threads",
        "train.device",
        "train.amp",
        "train.compile",
        "train.log_every",
        "train.save_every",
        "train.diagnostics",
        "train.monitor_label",  # the probes read the weights, they do not change them
        "train.monitor_cells",
        "train.run_dir",  # a moved run
        "train.data",  # a moved prep folder: its content is compared instead
    }
)
RESUME_SECTIONS = ("model", "augment", "train")


class TrainingDiverged(UserError, RuntimeError):
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

    # items: (image, ..., indices) where indices (k,) are the dataset rows of the k images
    def __getitem__(self, item: Any) -> tuple[torch.Tensor, ...]:
        idx = [int(i) for i in item] if isinstance(item, (tuple, list)) else [int(item)]
        return (*(self._image(i) for i in idx), torch.tensor(idx))

    def __getitems__(self, items: list[Any]) -> list[tuple[torch.Tensor, ...]]:
        """A whole batch at once when the dataset reads batches faster (CropDataset)."""
        read = getattr(self.base, "__getitems__", None)
        if read is None:
            return [self[item] for item in items]
        if items and isinstance(items[0], (tuple, list)):  # WS-DINO pairs
            width = len(items[0])
            flat = read([int(i) for item in items for i in item])
            return [
                (*flat[k * width : (k + 1) * width], torch.tensor([int(i) for i in items[k]]))
                for k in range(len(items))
            ]
        return [(t, torch.tensor([int(i)])) for t, i in zip(read([int(i) for i in items]), items)]


def _collate(items: list[tuple[torch.Tensor, ...]]) -> tuple[Any, ...]:
    """The batch, its (B, k) dataset rows and a (B, k) numpy mask of the images that are finite
    (checked here, in the loader's workers, so the step loop does not scan the pixels)."""
    batch = torch.utils.data.default_collate(items)
    finite = np.stack([t.flatten(1).isfinite().all(1).numpy() for t in batch[:-1]], axis=1)
    return (*batch, finite)


def _set_update_kernel(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """AdamW's update as one fused CUDA kernel on a GPU, foreach on CPU, whatever kernel the
    resumed checkpoint's optimizer used (a run may resume on another device)."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (True, None) if fused else (None, True)
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st and "step" in st:  # fused keeps its step count on the device, foreach on CPU
                st["step"] = st["step"].to(p.device if fused else "cpu", torch.float32)


def _raise_if_diverged(
    bad_step: torch.Tensor, bad_loss: torch.Tensor, *, collective: bool = True
) -> None:
    """The divergence check: one host sync, made at log steps and before every save. Under
    torchrun every rank calls it at the same steps and learns of any rank's non-finite loss (DDP
    has averaged that rank's NaN gradients into every rank's weights, rank 0's included);
    `collective=False` (an interrupt, where ranks stop at different points) checks this rank."""
    if collective and torch.distributed.is_available() and torch.distributed.is_initialized():
        bad_step = bad_step.clone()
        torch.distributed.all_reduce(bad_step, op=torch.distributed.ReduceOp.MAX)
    at = int(bad_step)
    if at >= 0:
        loss = f"{float(bad_loss)}" if float(bad_loss) != 0.0 else "non-finite on another rank"
        raise TrainingDiverged(
            f"loss is {loss} at step {at}: lower train.lr, raise "
            "train.warmup_epochs or set train.clip_grad (the last checkpoint is kept)"
        )


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
        raise ConfigError(
            "train.data is empty: set it to a folder written by `celldino prepare` "
            "(cells.parquet + crops.zarr), e.g. celldino train configs/tiny.yaml train.data=prep"
        )
    from celldino.data import CropDataset
    from celldino.io.cropstore import CELLS, CROPS

    prep = Path(cfg.train.data)
    for name in (CELLS, CROPS):
        if not (prep / name).exists():
            raise MissingInputError(
                f"train.data={prep}: {prep / name} not found; make the folder with "
                f"`celldino prepare ... prepare.out_dir={prep}`"
            )
    channels = list(cfg.train.channels)
    if len(set(channels)) < len(channels):  # also checked when the config is loaded
        twice = sorted({c for i, c in enumerate(channels) if c in channels[:i]})
        raise ConfigError(
            f"train.channels={channels}: {twice} named more than once; list each channel once",
            key="train.channels",
        )
    known = _pretrained_channels(cfg)
    if known and cfg.model.channel_mode != "channel_adaptive":
        if channels and channels != known:
            raise ConfigError(
                f"train.channels={channels} but model.pretrained={cfg.model.pretrained} was "
                f"trained on {known} in that order: leave train.channels empty (channels are "
                "matched by name) or list the checkpoint's channels in its order"
            )
        channels = known  # the pretrained model's order, whatever the crop store's
    try:
        return CropDataset(prep, channels=channels or None)
    except KeyError as e:
        where = "fix train.channels" if cfg.train.channels else "channels of model.pretrained"
        raise DataError(f"{prep / CROPS}: {e.args[0]}; {where}") from None


def _pretrained_channels(cfg: Config) -> list[str]:
    """The channel names recorded in the `model.pretrained` checkpoint ([] when none)."""
    if not cfg.model.pretrained:
        return []
    from celldino.io.checkpoints import checkpoint_channels
    from celldino.models.build import resolve_checkpoint

    return checkpoint_channels(resolve_checkpoint(cfg.model.pretrained))


def _check_settings(cfg: Config) -> None:
    """Settings that cannot give a training run (the config loader may check them too)."""
    tc = cfg.train
    for key, value in (("epochs", tc.epochs), ("batch_size", tc.batch_size)):
        if value < 1:
            raise ConfigError(f"train.{key}={value}: must be at least 1")
    if tc.num_workers < 0:
        raise ConfigError(f"train.num_workers={tc.num_workers}: must be 0 or more")
    if tc.ibot_weight > 0 and cfg.model.channel_mode == "channelwise":
        raise ConfigError(
            f"train.ibot_weight={tc.ibot_weight} needs model.channel_mode multichannel or "
            "channel_adaptive (not channelwise): set train.ibot_weight=0 or another channel mode",
            key="train.ibot_weight",
        )


def _check_size(cfg: Config, dataset: Dataset) -> None:
    n = len(dataset)  # type: ignore[arg-type]
    where = f"train.data={cfg.train.data}" if cfg.train.data else "the dataset"
    if n == 0:
        raise DataError(
            f"{where} holds 0 cells (crops): nothing to train on. Check that `celldino prepare` "
            "found cells (its log and qc.parquet: segmentation, QC filters, load-data table) and "
            "rerun it"
        )
    if n < cfg.train.batch_size:
        raise DataError(
            f"{where} holds {n} cells, fewer than one batch (train.batch_size="
            f"{cfg.train.batch_size}): set train.batch_size={_pow2_at_most(n)} (at most {n}), "
            "or prepare more cells"
        )


def _pow2_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def data_identity(dataset: Dataset) -> dict[str, Any]:
    """What a resumed run's data must share with the run's: cell count, channels and, for a
    prep folder, the cells table's hash and the crop store's shape and settings fingerprint."""
    ident: dict[str, Any] = {"n": len(dataset)}  # type: ignore[arg-type]
    chans = getattr(dataset, "channels", None)
    if chans:
        ident["channels"] = [str(c) for c in chans]
    prep = getattr(dataset, "prep_dir", None)
    if prep is not None:
        from celldino.io.cropstore import CELLS

        ident["cells_sha256_16"] = provenance.digest(Path(prep) / CELLS)  # content
        arr = getattr(dataset, "array", None)
        if arr is not None:
            ident["crops_shape"] = [int(x) for x in arr.shape]
            fp = arr.attrs.get("settings_fingerprint")
            if fp:
                ident["crops_fingerprint"] = str(fp)
    return ident


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_differences(cfg: Config, run_dir: Path, identity: dict[str, Any] | None) -> list[str]:
    """'key: old → new' for each setting or data property that a resume may not change."""
    from celldino.train.checkpoint import read_run_metadata

    diffs = []
    old_path = run_dir / CONFIG
    if old_path.is_file():
        try:
            old_cfg = load_config(old_path)
        except UserError as e:
            raise DataError(
                f"cannot resume: the run's {old_path} no longer loads ({e}); start a new run in "
                "another train.run_dir"
            ) from None
        old = _flat({k: to_dict(getattr(old_cfg, k)) for k in RESUME_SECTIONS})
        new = _flat({k: to_dict(getattr(cfg, k)) for k in RESUME_SECTIONS})
        for key in sorted(set(old) | set(new)):
            if key not in RESUMABLE and old.get(key) != new.get(key):
                diffs.append(f"{key}: {old.get(key)!r} → {new.get(key)!r}")
    recorded = read_run_metadata(run_dir).get("data")
    if isinstance(recorded, dict) and identity is not None:
        for key in sorted(set(recorded) & set(identity)):
            if recorded[key] != identity[key]:
                a, b = recorded[key], identity[key]
                if key == "channels":
                    diffs.append(f"data channels: {a} → {b}")
                elif key == "n":
                    diffs.append(f"data cells: {a} → {b}")
                elif key == "cells_sha256_16" and cfg.train.data:  # name the file
                    from celldino.io.cropstore import CELLS

                    table = Path(cfg.train.data) / CELLS
                    diffs.append(f"data {table}: its content changed (cells_sha256_16 {a} → {b})")
                else:
                    diffs.append(f"data {key}: {a} → {b}")
    return diffs


def _nonfinite_message(cfg: Config, dataset: Dataset, rows: list[int]) -> str:
    meta = getattr(dataset, "metadata", None)
    rows = sorted(set(rows))
    ids = ""
    if meta is not None and "Metadata_CellID" in getattr(meta, "columns", []):
        names = [str(meta["Metadata_CellID"].iloc[r]) for r in rows[:5]]
        ids = f"cells {', '.join(names)}{', ...' if len(rows) > 5 else ''}, "
    where = f"train.data={cfg.train.data}" if cfg.train.data else "the dataset"
    return (
        f"{where}: crops with NaN or infinite values ({ids}rows {rows[:5]}"
        f"{'...' if len(rows) > 5 else ''} of cells.parquet): training on them gives NaN losses. "
        "Check the images of these cells for NaN/inf pixels and rerun `celldino prepare`, or "
        "remove these cells from the prep folder"
    )


def _weak_labels(cfg: Config, dataset: Dataset, column: str) -> list:
    meta = getattr(dataset, "metadata", None)
    where = f"train.data={cfg.train.data}" if cfg.train.data else "the dataset"
    if meta is None:
        raise ConfigError(
            f"train.weak_label={column!r} needs per-image metadata, but {where} has no "
            "`.metadata` table",
            key="train.weak_label",
        )
    if column not in meta.columns:
        cols = [c for c in meta.columns if c.startswith("Metadata_")]
        shown = ", ".join(cols[:15]) + (", ..." if len(cols) > 15 else "")
        raise ConfigError(
            f"train.weak_label={column!r} is not a metadata column of {where} "
            f"(have: {shown}); set train.weak_label to one of them, or empty for plain DINO",
            key="train.weak_label",
        )
    return meta[column].tolist()


def _check_channels(cfg: Config, dataset: Dataset) -> None:
    """The data's channel count against the model's, before anything is written."""
    m = cfg.model
    chans = getattr(dataset, "channels", None)
    n = len(chans) if chans else int(_Items(dataset)._image(0).shape[0])
    where = f"train.data={cfg.train.data}" if cfg.train.data else "the dataset"
    named = f" {[str(c) for c in chans]}" if chans else ""
    if m.channel_mode == "channel_adaptive":
        if n > m.in_chans:
            raise ConfigError(
                f"{where} has {n} channels{named} but model.in_chans={m.in_chans} "
                f"(channel_adaptive: the number of known channels): set model.in_chans={n}, "
                "or choose channels with train.channels",
                key="model.in_chans",
            )
    elif n != m.in_chans:
        raise ConfigError(
            f"{where} has {n} channels{named} but model.in_chans={m.in_chans} "
            f"(model.channel_mode={m.channel_mode}): set model.in_chans={n}, or choose "
            f"{m.in_chans} channels with train.channels",
            key="model.in_chans",
        )


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
    # worker threads inherit it, and switched off again afterwards (library callers). The thread
    # count (train.threads) is set before it too, and the caller's count restored at the end.
    threads = distributed.set_threads(cfg.train.threads, workers=cfg.train.num_workers)
    torch.set_flush_denormal(True)
    info = distributed.setup(cfg.train.device)
    # the prep folder is read under its read lock: `prepare` cannot rewrite it meanwhile
    reading = (
        input_lock(cfg.train.data, "train")
        if dataset is None and cfg.train.data
        else contextlib.nullcontext()
    )
    try:
        with reading:
            return _train(cfg, info, dataset=dataset, resume=resume, stop_at_step=stop_at_step)
    finally:
        distributed.teardown(info)
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _train(
    cfg: Config,
    info: distributed.DistInfo,
    *,
    dataset: Dataset | None,
    resume: bool,
    stop_at_step: int | None,
) -> Path:
    # every check before anything is written into the run dir
    _check_settings(cfg)
    if dataset is None and cfg.train.data:  # the run must not land in (or hold) the prep folder
        refuse_overwriting_inputs(
            {"train.run_dir": cfg.train.run_dir},
            {"train.data": cfg.train.data},
            "train",
            owned=[cfg.train.run_dir],
        )
    dataset = dataset if dataset is not None else _open_dataset(cfg)
    _check_size(cfg, dataset)
    _check_channels(cfg, dataset)
    if cfg.train.weak_label:
        _weak_labels(cfg, dataset, cfg.train.weak_label)
    if cfg.train.monitor_label:
        _Monitor(cfg, dataset)  # checks the column before anything is written
    run_dir = Path(cfg.train.run_dir)
    if not info.is_main:
        return _train_locked(cfg, info, dataset=dataset, resume=resume, stop_at_step=stop_at_step)
    held = checkpoint.saved_files(run_dir)
    if not resume and held:  # never overwrite trained weights
        raise DataError(
            f"train.run_dir={run_dir} already holds a training run ({held[0]}): use --resume "
            "to continue it, another train.run_dir, or remove the folder to train from scratch"
        )
    if resume and (problem := checkpoint.resume_problem(run_dir)):
        raise DataError(problem)
    require_writable(run_dir, "train.run_dir")
    if checkpoint.checkpoint_dir(run_dir).is_dir():
        require_writable(checkpoint.checkpoint_dir(run_dir), "train.run_dir")
    with output_lock(run_dir, "train"):
        return _train_locked(cfg, info, dataset=dataset, resume=resume, stop_at_step=stop_at_step)


def _train_locked(
    cfg: Config,
    info: distributed.DistInfo,
    *,
    dataset: Dataset,
    resume: bool,
    stop_at_step: int | None,
) -> Path:
    tc = cfg.train
    device = info.device
    run_dir = Path(tc.run_dir)
    identity = data_identity(dataset)
    channels = [str(c) for c in (getattr(dataset, "channels", None) or tc.channels)]
    loaded = None  # the checkpoint to resume from, read and checked before anything is written
    if resume and checkpoint.has_checkpoint(run_dir):
        loaded = checkpoint.read(run_dir)
    if info.is_main:
        if loaded is not None:
            diffs = resume_differences(cfg, run_dir, identity)
            if diffs:
                data_changed = any(d.startswith("data ") for d in diffs)
                hint = (
                    "the training data is not the data this run was trained on: point "
                    "train.data at that prep folder, or start a new run in another "
                    "train.run_dir (model.pretrained= fine-tunes from this one)"
                    if data_changed
                    else "--resume may change only train.epochs and speed or logging settings "
                    "(num_workers, threads, device, amp, compile, log_every, save_every, "
                    "diagnostics, monitor_label, monitor_cells): "
                    "use the run's own settings (its config.yaml), or start a new run in another "
                    "train.run_dir (model.pretrained= fine-tunes from this one)"
                )
                raise DataError(
                    f"cannot resume {run_dir}: "
                    + "; ".join(diffs[:8])
                    + ("; ..." if len(diffs) > 8 else "")
                    + f". {hint[0].upper()}{hint[1:]}"
                )

    # ---- data ---------------------------------------------------------------------------
    if tc.weak_label:
        sampler: StepBatchSampler = WeakLabelPairSampler(
            _weak_labels(cfg, dataset, tc.weak_label),
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
    # pinned batches copy to the GPU without blocking; workers stay up between epochs and keep
    # a few batches ready ahead of the step
    workers = tc.num_workers
    loader = DataLoader(
        _Items(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    multicrop = MultiCrop(cfg.augment)
    spe = sampler.steps_per_epoch
    total_steps = tc.epochs * spe
    saved = {
        "channels": channels or None,
        "identity": identity,
        "planned": (total_steps, tc.epochs),
    }

    # ---- model --------------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    backbone = build_model(cfg.model)
    head = build_head(cfg.model, backbone.embed_dim)
    meta = DINOMetaArch(
        backbone,
        head,
        out_dim=cfg.model.out_dim,
        n_global=N_GLOBAL_CROPS,
        student_temp=tc.student_temp,
        center_momentum=tc.center_momentum,
        ibot_weight=tc.ibot_weight,
        koleo_weight=tc.koleo_weight,
        centering=tc.centering,
    ).to(device)
    if tc.compile:  # in place: parameter names (checkpoint keys) stay those of the module;
        # static shapes: one graph per crop size (2 or 3 in all), no dynamic-shape kernels
        meta.student.backbone.compile(dynamic=False)
        meta.teacher.backbone.compile(dynamic=False)
    if info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        meta.student_ddp = DDP(
            meta.student,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    peak_lr = S.scaled_lr(tc.lr, tc.batch_size)
    # fused on a GPU: the whole update in one kernel; foreach on CPU: one op over all tensors
    fused = device.type == "cuda"
    kernel = {"fused": True} if fused else {"foreach": True}
    optimizer = torch.optim.AdamW(_param_groups(meta.student), lr=peak_lr, **kernel)
    last_layer = list(meta.student.head.last_layer.parameters())

    step = 0
    if loaded is not None:
        state = checkpoint.load(
            run_dir, meta_arch=meta, optimizer=optimizer, device=device, loaded=loaded
        )
        del loaded
        _set_update_kernel(optimizer, fused)
        step = int(state["step"])
        logger.info("resuming %s at step %d (epoch %d)", run_dir, step, step // max(spe, 1))
        if info.is_main:
            truncate_metrics(run_dir / METRICS, step)
    elif resume:
        logger.warning("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
    if resume and info.world_size > 1:
        _check_same_start(run_dir, step)
    if info.is_main:  # the first file written: every check above has passed
        try:
            save_config(cfg, run_dir / CONFIG)
        except OSError as e:
            raise write_error(run_dir / CONFIG, e, what="config") from None

    warmup_steps = int(round(tc.warmup_epochs * spe))
    temp_warmup_steps = int(round(tc.warmup_teacher_temp_epochs * spe))
    use_amp = tc.amp and device.type == "cuda"
    enabled = info.is_main and logger.isEnabledFor(logging.INFO)
    bar = log.ProgressBar("train", total=total_steps, done=step, enabled=enabled)
    metrics_path = run_dir / METRICS
    warned: set[str] = set()  # the verdicts already warned about
    t0, seen = time.perf_counter(), 0
    t_epoch, diag = t0, None  # diag: the diagnostics last logged in this epoch
    # the teacher's prototype usage, accumulated over the steps of each log interval
    usage = TeacherUsage(cfg.model.out_dim, device) if tc.diagnostics else None
    monitor = _Monitor(cfg, dataset) if tc.monitor_label and info.is_main else None
    if monitor is not None and step == 0:  # the probes at random initialisation
        monitor.log(meta, metrics_path, step=0, epoch=0.0, device=device, amp=use_amp)
    # a non-finite loss is recorded on the device (step and value of the first) and checked at
    # log steps and before each save: no host sync in the steps between
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    bad_loss = torch.zeros((), dtype=torch.float32, device=device)
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
                *tensors, rows, finite = batch  # rows, finite: (B, k) for the k images of an item
                if not finite.all():
                    raise DataError(
                        _nonfinite_message(cfg, dataset, rows.numpy()[~finite].tolist())
                    )
                images = tensors[0].to(device, non_blocking=True)  # (B, C, H, W)
                local_images = (
                    tensors[1].to(device, non_blocking=True) if len(tensors) > 1 else None
                )
                crops = multicrop(images, generator=gen, local_images=local_images)
                global_crops, local_crops = crops[:N_GLOBAL_CROPS], crops[N_GLOBAL_CROPS:]
                masks = mask_index = None
                if tc.ibot_weight > 0:
                    cpu_masks = sample_masks(
                        N_GLOBAL_CROPS * images.shape[0],
                        _n_patch_tokens(cfg, global_crops[0]),
                        ratio=tc.ibot_mask_ratio,
                        prob=tc.ibot_mask_prob,
                        generator=gen,
                    )
                    masks = cpu_masks.to(device, non_blocking=True)
                    # the masked positions found on the CPU: no host sync to pick them
                    mask_index = cpu_masks.flatten().nonzero().squeeze(1)
                    mask_index = mask_index.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss, parts = meta.forward_losses(
                        global_crops,
                        local_crops,
                        teacher_temp=t_temp,
                        masks=masks,
                        mask_index=mask_index,
                    )
                if usage is not None:
                    usage.add(parts["teacher_probs"])  # on the device: no host sync
                new_bad = ~torch.isfinite(loss.detach()) & (bad_step < 0)
                bad_step = torch.where(new_bad, step, bad_step)
                bad_loss = torch.where(new_bad, loss.detach().float(), bad_loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.clip_grad > 0:
                    clip_gradients(meta.student.parameters(), tc.clip_grad, tc.clip_mode)
                if epoch < tc.freeze_last_layer:
                    for p in last_layer:
                        p.grad = None
                optimizer.step()
                meta.update_teacher(mom)
                step += 1
                seen += images.shape[0] * info.world_size

                text = None
                end_of_epoch = step % spe == 0
                log_step = step % max(tc.log_every, 1) == 0 or step == total_steps
                if end_of_epoch or step == stop_at_step or log_step:  # never save diverged weights
                    _raise_if_diverged(bad_step, bad_loss)
                if log_step:
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
                    if usage is not None:
                        record.update(meta.diagnostics(parts, usage))
                        usage.reset()
                    record = distributed.mean_over_ranks(record, device)
                    record["step"] = step
                    record["images_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
                    if info.is_main:
                        try:
                            append_metrics(metrics_path, record)
                        except OSError as e:
                            raise write_error(metrics_path, e, what="metrics") from None
                    text = f"loss {record['loss']:.4f} lr {lr:.2e}"
                    if usage is not None:
                        diag = record
                        text += " " + _diagnostics_text(record, cfg.model.out_dim)
                        verdict = training_verdict(
                            out_dim=cfg.model.out_dim,
                            centering=tc.centering,
                            **verdict_inputs(record),
                        )
                        seen_kind = verdict.kind in warned
                        if verdict.warn and step > warmup_steps and not seen_kind:
                            if info.is_main:
                                logger.warning(verdict.message)
                            warned.add(verdict.kind)
                    logger.debug("step %d: %s", step, text)
                bar.update(text)

                if end_of_epoch:
                    if usage is not None and diag is None:  # no log step in this epoch
                        diag = meta.diagnostics(parts, usage)  # every rank: all-reduce
                    now = time.perf_counter()
                    if info.is_main:
                        logger.info(
                            "epoch %d/%d: loss %.4f, lr %.2e%s, %.1f s",
                            step // spe,
                            tc.epochs,
                            float(loss.detach()),
                            lr,
                            ", " + _diagnostics_text(diag, cfg.model.out_dim) if diag else "",
                            now - t_epoch,
                        )
                    t_epoch, diag = now, None
                    if monitor is not None:  # before the save: a resume never repeats it
                        monitor.log(
                            meta,
                            metrics_path,
                            step=step,
                            epoch=step / spe,
                            device=device,
                            amp=use_amp,
                        )
                if end_of_epoch or step == stop_at_step:
                    ep = (step - 1) // spe + 1  # epochs begun so far
                    keep = end_of_epoch and tc.save_every > 0 and ep % tc.save_every == 0
                    _save(cfg, info, run_dir, meta, optimizer, step, ep, epoch_copy=keep, **saved)
                if step == stop_at_step:
                    return run_dir
    except KeyboardInterrupt:
        _raise_if_diverged(bad_step, bad_loss, collective=False)
        if step > 0:
            _save(cfg, info, run_dir, meta, optimizer, step, step // spe, epoch_copy=False, **saved)
            logger.warning("interrupted at step %d; `--resume` continues from here", step)
        raise
    finally:
        bar.close()
    logger.info("training finished: %d steps, checkpoints in %s", step, run_dir / "checkpoints")
    return run_dir


def _diagnostics_text(d: dict[str, Any], out_dim: int) -> str:
    """The diagnostics in one line: prototypes used (top share), mean-teacher and per-sample
    entropy against log K, loss / log K, effective rank and embedding std."""
    parts = []
    if "prototypes_used" in d:
        parts.append(
            f"prototypes {int(d['prototypes_used'])}/{out_dim} (top {d['prototype_top_share']:.0%})"
        )
    if "mean_teacher_entropy" in d:
        parts.append(f"mean-teacher entropy {d['mean_teacher_entropy']:.2f}/{np.log(out_dim):.2f}")
    if "teacher_entropy" in d:
        parts.append(f"per-sample teacher entropy {d['teacher_entropy']:.2f}")
    if "loss_over_logk" in d:
        parts.append(f"loss/logK {d['loss_over_logk']:.3f}")
    if "effective_rank" in d:
        parts.append(f"rank {d['effective_rank']:.1f}")
    if "embedding_std" in d:
        parts.append(f"std {d['embedding_std']:.2f}")
    return ", ".join(parts)


class _Monitor:
    """`train.monitor_label`: kNN and linear probes of the teacher backbone's class tokens on the
    un-augmented crops of a fixed, stratified sample of labelled cells (at most
    `train.monitor_cells`, stratified by plate x label). Scored by celldino.probes exactly as the
    evaluation's `cell_probe` scores (z-scored features for both probes, macro-F1 per held-out
    plate averaged over the plates); the same rows are left out: an NA or blank label, and the
    negative controls (`evaluate.columns.control` == `control_value`, by default
    Metadata_pert_type == 'control', when the table has that column)."""

    def __init__(self, cfg: Config, dataset: Dataset) -> None:
        from celldino.probes import labelled_rows, stratified_sample

        tc = cfg.train
        col = tc.monitor_label
        meta = getattr(dataset, "metadata", None)
        where = f"train.data={tc.data}" if tc.data else "the dataset"
        if meta is None or col not in meta.columns:
            cols = (
                [c for c in meta.columns if c.startswith("Metadata_")] if meta is not None else []
            )
            shown = ", ".join(cols[:15]) + (", ..." if len(cols) > 15 else "")
            raise ConfigError(
                f"train.monitor_label={col!r} is not a metadata column of {where} "
                f"(have: {shown or 'no metadata table'}); set it to one of them, or empty to "
                "turn the probes off",
                key="train.monitor_label",
            )
        columns = cfg.evaluate.columns  # eval's defaults (celldino.eval.spec.Columns)
        control = columns.get("control", "Metadata_pert_type")
        controls = None
        if control and control in meta.columns:
            value = columns.get("control_value", "control")
            controls = (meta[control].astype(str) == str(value)).to_numpy()
        rows = np.flatnonzero(labelled_rows(meta[col], controls))
        values = meta[col].astype(str).to_numpy()[rows]
        if len(np.unique(values)) < 2:
            raise ConfigError(
                f"train.monitor_label={col!r}: {where} has {len(np.unique(values))} distinct "
                "non-empty labels outside the controls; the probes need at least 2 (or set it "
                "empty)",
                key="train.monitor_label",
            )
        plates = (
            meta["Metadata_Plate"].astype(str).to_numpy()[rows]
            if "Metadata_Plate" in meta.columns
            else None
        )
        strata = values if plates is None else [f"{p}\x1f{v}" for p, v in zip(plates, values)]
        pick = stratified_sample(strata, tc.monitor_cells, seed=tc.seed)
        self.rows = rows[pick]
        self.labels = values[pick]
        self.plates = None if plates is None else plates[pick]
        self.seed = tc.seed
        self.items = _Items(dataset)
        self.batch_size = 128
        # the cells at the size `celldino extract` with this config embeds them
        self.size = cfg.augment.global_crop_size if cfg.extract.resize < 0 else cfg.extract.resize

    @torch.no_grad()
    def embed(self, meta: DINOMetaArch, device: torch.device, amp: bool) -> np.ndarray:
        """(n, D) teacher class tokens of the sample's crops, un-augmented, at the size
        extraction feeds them (`extract.resize`; `augment.geometric.whole_cell_view`)."""
        from celldino.augment.geometric import whole_cell_view

        backbone = meta.teacher.backbone
        was_training = backbone.training
        backbone.eval()  # no stochastic depth (before the first step the copy is in train mode)
        out = []
        try:
            for i in range(0, len(self.rows), self.batch_size):
                chunk = [int(r) for r in self.rows[i : i + self.batch_size]]
                x = torch.stack([t[0] for t in self.items.__getitems__(chunk)]).to(device)
                x = whole_cell_view(x, self.size)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out.append(backbone(x)["cls"].float().cpu())
        finally:
            backbone.train(was_training)
        return torch.cat(out).numpy()

    def log(
        self,
        meta: DINOMetaArch,
        path: Path,
        *,
        step: int,
        epoch: float,
        device: torch.device,
        amp: bool,
    ) -> dict[str, Any]:
        """Embed, score, append one record to metrics.jsonl and log it."""
        from celldino.probes import probe_scores

        t = time.perf_counter()
        scores = probe_scores(
            self.embed(meta, device, amp), self.labels, self.plates, seed=self.seed
        )
        record = {
            "step": step,
            "epoch": epoch,
            "monitor_knn20_f1": scores["knn20_f1"],
            "monitor_linear_f1": scores["linear_f1"],
            "monitor_cells": scores["n_cells"],
            "monitor_labels": scores["n_labels"],
            "monitor_split": scores["split"],
            "monitor_linear_converged": scores["linear_converged"],
            "monitor_s": time.perf_counter() - t,
        }
        try:
            append_metrics(path, record)
        except OSError as e:
            raise write_error(path, e, what="metrics") from None
        logger.info(
            "probe at step %d%s: %d-NN macro-F1 %.3f, linear %.3f (%d cells, %s)",
            step,
            " (random init)" if step == 0 else "",
            20,
            record["monitor_knn20_f1"],
            record["monitor_linear_f1"],
            record["monitor_cells"],
            record["monitor_split"],
        )
        return record


def _check_same_start(run_dir: Path, step: int) -> None:
    """Every rank resumes at the same step: a rank on a node that does not share train.run_dir
    (rank 0 writes the checkpoints) would otherwise start again from scratch, or from a stale
    copy, next to the others."""
    steps = distributed.gather_objects(step)
    odd = next((r for r, s in enumerate(steps) if s != steps[0]), None)
    if odd is not None:
        seen = f"step {steps[odd]}" if steps[odd] else "no checkpoint (step 0)"
        raise DataError(
            f"cannot resume {run_dir}: rank 0 resumes at step {steps[0]} but rank {odd} finds "
            f"{seen} there: train.run_dir must be a folder every node shares (a network "
            "filesystem), not a node's local disk; set it to a shared path"
        )


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
    channels: list[str] | None = None,
    identity: dict[str, Any] | None = None,
    planned: tuple[int, int] | None = None,
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
            channels=channels,
            data_identity=identity,
            planned=planned,
            crop_size=cfg.augment.global_crop_size,
        )
    distributed.barrier()


__all__ = ["TrainingDiverged", "sample_masks", "step_generator", "train"]
