"""`celldino extract`: a backbone over a prepared dataset → per-cell (or per-field) embeddings.

`extract(ExtractConfig)` loads the backbone (`celldino.models.load_backbone`: celldino run dirs
and checkpoints, or foreign DINO / DINOv2 / DINO4Cells weights), checks that it fits the data
(channels, patch size), and writes Parquet shards joined with every `Metadata_*` column (see
`celldino.io.embeddings`). Inference is batched under `torch.inference_mode`, reads crops with
DataLoader workers and uses bf16 autocast on CUDA. Shard k covers rows [k·S, (k+1)·S) whatever
the number of processes; under `torchrun` (one node or several: ranks are global) the shards
not yet on disk, as rank 0 lists them, are dealt round-robin over the W ranks, so the union of
the ranks' output is the single-process output. Shards on disk are whole (atomic writes) and
skipped on a rerun: killed (a lost node too) and rerun with any number of processes, every cell
is there exactly once and only the unfinished shards are computed. Every rank writes its shards
into `extract.out_dir`, so on several nodes it must be a folder every node shares; a shard a rank
wrote that rank 0 cannot see is an error saying so. A rerun with
another checkpoint, other options or other data is refused unless `extract.overwrite=true`.

Channels are matched by name: a checkpoint records the ordered channel names it was trained on
(safetensors metadata `channels`, or `train.channels` of an older run's config.yaml), and the
prep's channels are read in that order whatever order the crop store holds them in; a missing
channel is an error naming it. A channel-adaptive model given `extract.channels=[Mito, ER]` uses
the channel ids of Mito and ER in the checkpoint's list. The output folder is locked while it is
written (`celldino.io.lock`); a second writer stops naming the first. Progress is logged every few
shards, so batch logs show it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from celldino import distributed, log
from celldino.augment.geometric import whole_cell_view
from celldino.config import ExtractConfig
from celldino.errors import DataError, IncompleteInputError
from celldino.extract import feature_modes as F
from celldino.extract.attention_maps import attention_outputs, pick_cells
from celldino.extract.reader import CropBatches
from celldino.extract.shard_plan import (
    DTYPES,
    assign_shards,
    done_shards,
    identity_differences,
    shard_plan,
)
from celldino.io import provenance
from celldino.io.attention_store import ATTENTION, write_attention
from celldino.io.checkpoints import checkpoint_channels, checkpoint_crop_size, read_metadata
from celldino.io.embeddings import (
    EMB_PREFIX,
    H5AD,
    MANIFEST,
    clear_outputs,
    read_manifest,
    read_shards,
    shard_name,
    write_manifest,
    write_shard,
)
from celldino.io.files import read_json, require_writable, write_error
from celldino.io.lock import input_lock, output_lock
from celldino.io.prepared import IMAGES, STATE
from celldino.io.provenance import refuse_overwriting_inputs
from celldino.io.trainrun import run_channels, run_epochs
from celldino.models import ChannelwiseModel, VisionTransformer, load_backbone, resolve_checkpoint

logger = log.get_logger(__name__)
LEVELS = ("cell", "field")
FORMATS = ("parquet", "h5ad")


class ExtractError(DataError):
    """Extraction settings, data or checkpoint that do not fit (the message says what to do)."""


# ---- processes -------------------------------------------------------------------------------


# ---- inputs ----------------------------------------------------------------------------------


def _check_options(cfg: ExtractConfig) -> None:
    if not cfg.checkpoint:
        raise ExtractError(
            "extract.checkpoint is empty: give a celldino run dir (from `celldino train`), "
            "a checkpoint file, or DINO/DINOv2/DINO4Cells weights"
        )
    if not cfg.data:
        raise ExtractError(
            "extract.data is empty: give the folder written by `celldino prepare` (prepare.out_dir)"
        )
    checks = [
        ("which", cfg.which, ("teacher", "student")),
        ("level", cfg.level, LEVELS),
        ("dtype", cfg.dtype, DTYPES),
        ("format", cfg.format, FORMATS),
        ("channel_mode", cfg.channel_mode, ("", "channelwise")),
        ("field_mode", cfg.field_mode, F.FIELD_MODES),
        ("field_pool", cfg.field_pool, F.POOLS),
        ("feature", cfg.feature, F.FEATURES),
    ]
    for name, value, valid in checks:
        if value not in valid:
            shown = ", ".join(v or "''" for v in valid)
            raise ExtractError(f"extract.{name}={value!r} is not one of {shown}")
    if cfg.batch_size < 1:
        raise ExtractError(f"extract.batch_size must be at least 1, not {cfg.batch_size}")
    if cfg.shard_size < 1:
        raise ExtractError(f"extract.shard_size must be at least 1, not {cfg.shard_size}")
    if cfg.resize < -1:
        raise ExtractError(
            f"extract.resize={cfg.resize}: 0 (as stored), -1 (the trained crop size) or a side "
            "in pixels"
        )
    if cfg.resize and cfg.level != "cell":  # would be ignored: the fields' side is field_crop
        raise ExtractError(
            f"extract.resize={cfg.resize} applies to single cells (extract.level=cell); whole "
            "fields are cut into extract.field_crop px views: set that instead, or resize=0"
        )


def _open_data(cfg: ExtractConfig, channels: list[str] | None):
    """(dataset, Metadata_* table, data identity, image side) of the prep folder."""
    from celldino.data import CropDataset, FieldDataset
    from celldino.io.cropstore import CELLS, CROPS

    prep = Path(cfg.data)
    make = f"make it with `celldino prepare prepare.load_data=... prepare.out_dir={prep}`"
    if cfg.level == "cell":
        for name in (CROPS, CELLS):
            if not (prep / name).exists():
                raise ExtractError(f"crop store {prep / name} not found: {make}")
        try:
            ds = CropDataset(prep, channels=channels or None)
        except KeyError as e:
            raise ExtractError(f"{prep / CROPS}: {e.args[0]}") from None
        side = tuple(int(s) for s in ds.array.shape[-2:])
        fp = str(ds.array.attrs.get("settings_fingerprint", ""))
    else:
        for name in (IMAGES, STATE):
            if not (prep / name).exists():
                raise ExtractError(f"whole-field index {prep / name} not found: {make}")
        try:
            ds = FieldDataset(prep, channels=channels or None)
        except KeyError as e:
            raise ExtractError(f"{prep / STATE}: {e.args[0]}") from None
        side = (cfg.field_crop, cfg.field_crop)
        fp = str(read_json(prep / STATE).get("fingerprint", ""))
    meta = ds.metadata[[c for c in ds.metadata.columns if str(c).startswith("Metadata_")]]
    # the prep's cell (or image) table by content: a prep remade or edited by hand is other data
    table = CELLS if cfg.level == "cell" else IMAGES
    identity = {"fingerprint": fp, "n_rows": len(meta), "level": cfg.level, "table": table}
    identity["table_sha256_16"] = provenance.digest(prep / table)
    return ds, meta.reset_index(drop=True), identity, side


def _stored_channels(cfg: ExtractConfig) -> list[str]:
    prep = Path(cfg.data)
    if cfg.level == "field":
        p = prep / STATE
        return list(read_json(p)["channels"]) if p.exists() else []
    from celldino.io.cropstore import CROPS, open_crops

    if not (prep / CROPS).exists():
        return []
    return list(open_crops(prep).attrs.get("channels", []))


def _vit(model: nn.Module) -> VisionTransformer:
    return model.backbone if isinstance(model, ChannelwiseModel) else model  # type: ignore[return-value]


def _check_fit(
    model: nn.Module,
    file: Path,
    channels: list[str],
    side: tuple[int, int],
    cfg: ExtractConfig,
    known: list[str] | None = None,
) -> None:
    """Channel count and patch size of the model against the data; errors name both, and the
    channel count's source: extract.channels, the checkpoint's recorded channels (`known`), or
    the data."""
    vit = _vit(model)
    C = len(channels)
    p = vit.patch_size
    where = f"the data in {cfg.data}"
    if isinstance(model, ChannelwiseModel):
        want, ok = model.num_chans, model.num_chans == C
    elif vit.channel_adaptive:
        want, ok = vit.in_chans, C <= vit.in_chans
    else:
        want, ok = vit.in_chans, vit.in_chans == C
    if not ok and cfg.channels:
        raise ExtractError(
            f"extract.channels={list(cfg.channels)} names {C} channels but checkpoint {file} "
            f"takes {want}: list {want} of the channels it was trained on"
            + (f" ({known})" if known else "")
        )
    if not ok and known and channels == list(known):
        raise ExtractError(
            f"checkpoint {file}: its metadata 'channels' lists {C} channels {known} but its "
            f"weights take {want}: the metadata disagrees with the weights (a damaged or edited "
            f"file); use the checkpoint as training wrote it, or pick {want} channels with "
            "extract.channels=[...]"
        )
    if not ok:
        raise ExtractError(
            f"checkpoint {file} takes {want} channels but {where} has {C} channels {channels}: "
            "pick the model's channels with extract.channels=[...], use "
            "extract.channel_mode=channelwise for an RGB/1-channel model, or "
            "extract.adapt_channels=true to average a foreign model's patch kernel over channels"
        )
    H, W = side
    if H % p or W % p:
        what = "crops" if cfg.level == "cell" else "field crops (extract.field_crop)"
        raise ExtractError(
            f"checkpoint {file} has patch size {p} px but the {what} of {where} are {H}x{W} px, "
            f"not a multiple of {p}: use crops of a multiple of {p} px (prepare.crop_size or "
            "extract.field_crop) or a checkpoint with a fitting patch size"
        )


def _load_model(cfg: ExtractConfig, file: Path, n_chans: int) -> tuple[nn.Module, dict]:
    from celldino.io.checkpoints import CheckpointError

    try:
        model, mcfg = load_backbone(
            file, cfg.which, in_chans=n_chans if cfg.adapt_channels else None
        )
    except CheckpointError as e:
        raise ExtractError(str(e)) from None
    if cfg.channel_mode == "channelwise" and not isinstance(model, ChannelwiseModel):
        if model.channel_adaptive or model.in_chans not in (1, 3):
            raise ExtractError(
                f"extract.channel_mode=channelwise needs a 1- or 3-channel (RGB) model, but "
                f"checkpoint {file} takes {model.in_chans} channels"
            )
        model = ChannelwiseModel(model, n_chans)
    return model.eval(), dataclasses.asdict(mcfg)


def _input_size(cfg: ExtractConfig, file: Path, side: tuple[int, int]) -> int:
    """The side single cells are resized to before the model (0 = as stored).

    `extract.resize=-1`: the side of the global crops the checkpoint was trained on (recorded in
    celldino checkpoints), the patch grid it learned on; a foreign or older checkpoint records
    none and gets the cells as stored. `0` (default): as stored. Fields are never resized
    (their crops are `extract.field_crop`)."""
    if cfg.level != "cell" or cfg.resize == 0:
        return 0
    from celldino.io.checkpoints import CheckpointError

    try:
        size = cfg.resize if cfg.resize > 0 else checkpoint_crop_size(file) or 0
    except CheckpointError as e:
        raise ExtractError(
            f"{e}; or set extract.resize=0 (as stored) or a side in pixels"
        ) from None
    return 0 if size == side[0] == side[1] else size


def _feature_options(cfg: ExtractConfig) -> dict[str, Any]:
    """The options that decide the numbers (only those that matter for the chosen mode)."""
    opts: dict[str, Any] = {"feature": cfg.feature, "level": cfg.level}
    if cfg.level == "cell" and cfg.resize > 0:
        opts["resize"] = cfg.resize
    if cfg.feature == "last_blocks":
        opts["n_blocks"] = cfg.n_blocks
    if cfg.feature == "block":
        opts["block"] = cfg.block
    if cfg.channel_mode:
        opts["channel_mode"] = cfg.channel_mode
    if cfg.adapt_channels:
        opts["adapt_channels"] = True
    if cfg.level == "field":
        opts.update(field_mode=cfg.field_mode, field_crop=cfg.field_crop)
        if cfg.field_mode == "tile":
            opts.update(field_stride=cfg.field_stride or cfg.field_crop, field_pool=cfg.field_pool)
    return opts


# ---- the forward pass ------------------------------------------------------------------------


class Embedder:
    """Backbone + feature choice: (B, C, H, W) normalised images → (B, F) float32 embeddings."""

    def __init__(
        self,
        model: nn.Module,
        cfg: ExtractConfig,
        device: torch.device,
        channel_ids: torch.Tensor | None = None,
    ):
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.device = device
        self.channel_ids = None if channel_ids is None else channel_ids.to(device)
        self.amp = cfg.amp and device.type == "cuda"

    def autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        out = self.model(x, channel_ids=self.channel_ids, return_blocks=F.needs_blocks(cfg.feature))
        return F.select_features(out, cfg.feature, n_blocks=cfg.n_blocks, block=cfg.block).float()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.on_device(x).cpu()

    @torch.inference_mode()
    def on_device(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, F) embeddings left on the model's device: the caller copies a whole shard at
        once (one wait for the GPU per shard, not per batch)."""
        cfg = self.cfg
        x = self.resized(x.to(self.device, non_blocking=True))  # pinned by the loader on a GPU
        with self.autocast():
            if cfg.level == "cell":
                return self._forward(x)  # (B, F)
            views = F.field_views(x, cfg.field_mode, cfg.field_crop, cfg.field_stride)
            B, K = views.shape[:2]
            flat = views.flatten(0, 1)  # (B·K, C, s, s)
            feats = torch.cat(
                [
                    self._forward(flat[i : i + cfg.batch_size])
                    for i in range(0, len(flat), cfg.batch_size)
                ]
            )  # (B·K, F)
        pool = "median" if cfg.field_mode == "center4" else cfg.field_pool
        return F.pool_views(feats.reshape(B, K, -1), pool)  # (B, F)

    def resized(self, x: torch.Tensor) -> torch.Tensor:
        """Cells at `extract.resize` px (resolved by `_input_size`; 0 = as stored), sampled as
        training's crops are (bilinear, align_corners=False: a global crop of the whole cell)."""
        return x if self.cfg.level != "cell" else whole_cell_view(x, self.cfg.resize)

    @torch.inference_mode()
    def attention(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.autocast():
            x = self.resized(x.to(self.device))
            out = attention_outputs(self.model, x, channel_ids=self.channel_ids)
        return {k: v.float().cpu() for k, v in out.items()}


def _batches(
    plan: list[tuple[int, int]], shards: list[int], batch_size: int
) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of batches that never cross a shard boundary, shard after shard."""
    out = []
    for k in shards:
        start, stop = plan[k]
        out += [(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]
    return out


def _loader(ds, batches: list[tuple[int, int]], cfg: ExtractConfig, device: torch.device):
    """Batches (B, C, H, W) in order: single cells read a slice at a time (`CropBatches`),
    whole fields one by one."""
    common = dict(num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    if cfg.level == "cell":
        return torch.utils.data.DataLoader(CropBatches(ds, batches), batch_size=None, **common)
    index = [list(range(s, e)) for s, e in batches]
    return torch.utils.data.DataLoader(ds, batch_sampler=index, **common)


# ---- the command -----------------------------------------------------------------------------


def extract(cfg: ExtractConfig, *, after_shard: Callable[[int], None] | None = None) -> Path:
    """Write the embeddings of `cfg.data` by `cfg.checkpoint` into `cfg.out_dir`; returns it.

    `after_shard(k)` is called after shard k is on disk (progress hooks; tests use it to
    simulate a kill). Resumes a folder made with the same settings; refuses one made with other
    settings unless `cfg.overwrite`. The prep folder is read under its read lock: `prepare` cannot
    rewrite it meanwhile.
    """
    _check_options(cfg)
    # the shards must not land in (or replace) the prep folder or the checkpoint it reads
    refuse_overwriting_inputs(
        {"extract.out_dir": cfg.out_dir},
        {"extract.data": cfg.data, "extract.checkpoint": cfg.checkpoint},
        "extract",
        owned=[cfg.out_dir],
    )
    threads = distributed.set_threads(cfg.threads, workers=cfg.num_workers, key="extract.threads")
    try:
        with input_lock(cfg.data, "extract"):
            return _extract(cfg, after_shard=after_shard)
    finally:
        torch.set_num_threads(threads)  # the caller's count (library callers)


def _extract(cfg: ExtractConfig, *, after_shard: Callable[[int], None] | None = None) -> Path:
    try:
        file = resolve_checkpoint(cfg.checkpoint)
    except ValueError as e:
        raise ExtractError(str(e)) from None
    known = checkpoint_channels(file) or run_channels(file)
    channels = _pick_channels(cfg, file, _stored_channels(cfg), known)
    ds, meta, data_id, side = _open_data(cfg, channels)
    channels = list(ds.channels)
    model, model_cfg = _load_model(cfg, file, len(channels))
    cfg = dataclasses.replace(cfg, resize=_input_size(cfg, file, side))  # -1 resolved
    if cfg.resize:
        side = (cfg.resize, cfg.resize)
    _check_fit(model, file, channels, side, cfg, known)
    vit = _vit(model)
    F.check_feature(cfg.feature, cfg.n_blocks, cfg.block, len(vit.blocks))
    channel_ids = None
    if vit.channel_adaptive and not isinstance(model, ChannelwiseModel):
        channel_ids = _channel_ids(file, channels, known, vit.in_chans)
    elif cfg.channels:
        _check_explicit_order(file, list(cfg.channels), known)
    n_features = F.feature_dim(cfg.feature, model.embed_dim, cfg.n_blocks)
    progress = _training_progress(file)
    if cfg.level == "cell" and (cfg.attention_cells or cfg.attention_sample):
        ids = meta["Metadata_CellID"].astype(str).tolist()
        pick_cells(ids, list(cfg.attention_cells), cfg.attention_sample)  # unknown ids: now

    ranks = distributed.setup(cfg.device, key="extract.device")  # set_device before NCCL
    try:
        if ranks.rank == 0:
            _warn_if_unfinished(file, progress)
        out_dir = Path(cfg.out_dir)
        if ranks.rank == 0:  # one writer: rank 0 checks the folder and holds its lock for all
            require_writable(out_dir, "extract.out_dir")
        with output_lock(out_dir, "extract") if ranks.rank == 0 else contextlib.nullcontext():
            return _extract_into(
                cfg,
                file,
                ds,
                meta,
                data_id,
                channels,
                model,
                model_cfg,
                channel_ids,
                n_features,
                ranks.device,
                ranks,
                after_shard,
                progress=progress,
            )
    finally:
        distributed.teardown(ranks)  # only a group this call initialised


def _training_progress(file: Path) -> dict[str, int] | None:
    """How far the training behind a celldino checkpoint got: step, epoch and, when known, the
    planned total_steps / epochs (None for checkpoints that are not from `celldino train`)."""
    meta = read_metadata(file)
    if meta.get("format") != "celldino-train" or "step" not in meta:
        return None
    try:
        out = {"step": int(meta["step"]), "epoch": int(meta.get("epoch", -1))}
        if "total_steps" in meta:
            out["total_steps"] = int(meta["total_steps"])
        epochs = int(meta["epochs_planned"]) if "epochs_planned" in meta else run_epochs(file)
    except ValueError:
        return None
    if epochs is not None:
        out["epochs"] = epochs
    return out


def _warn_if_unfinished(file: Path, progress: dict[str, int] | None) -> None:
    """A warning naming the checkpoint when its training stopped before the planned end."""
    if not progress:
        return
    step, epoch = progress["step"], progress["epoch"]
    total, epochs = progress.get("total_steps"), progress.get("epochs")
    if total is not None:
        short = step < total
    else:  # older checkpoints: only the epoch count is known
        short = epochs is not None and 0 <= epoch < epochs
    if short:
        where = f"step {step}" + (f" of {total}" if total is not None else "")
        where += f", epoch {epoch}" + (f" of {epochs}" if epochs is not None else "")
        logger.warning(
            "checkpoint %s was saved before the planned end of its training (%s): these are the "
            "embeddings of a partly trained model; `celldino train ... --resume` finishes the run",
            file,
            where,
        )


def _pick_channels(
    cfg: ExtractConfig, file: Path, stored: list[str], known: list[str]
) -> list[str]:
    """The prep's channels to read, in model order: extract.channels, else the checkpoint's
    recorded channels (by name, whatever the stored order), else all stored channels."""
    if cfg.channels:
        wanted = list(cfg.channels)
        repeated = [c for i, c in enumerate(wanted) if c in wanted[:i]]
        if repeated:  # also checked when the config is loaded
            raise ExtractError(
                f"extract.channels={wanted}: {sorted(set(repeated))} named more than once; "
                "list each channel once"
            )
        missing = [c for c in wanted if c not in stored]
        if missing and stored:
            raise ExtractError(
                f"extract.channels={wanted}: {missing} not in the crop store of {cfg.data} "
                f"(it holds {stored}); pick among those"
            )
        return wanted
    if known:
        missing = [c for c in known if c not in stored]
        if missing and stored:
            raise ExtractError(
                f"checkpoint {file} was trained on channels {known} but {cfg.data} lacks "
                f"{missing} (it has {stored}): prepare the data with these channels, or choose "
                "channels with extract.channels=[...] (a channel-adaptive model takes any subset)"
            )
        if stored and known != stored:
            logger.info(
                "channels matched by name: %s stores %s, the checkpoint takes %s",
                cfg.data,
                stored,
                known,
            )
        return list(known)
    return stored


def _check_explicit_order(file: Path, wanted: list[str], known: list[str]) -> None:
    """extract.channels for a model that takes channels by position (not channel-adaptive)."""
    if wanted == known or not known:
        return
    if sorted(wanted) == sorted(known):
        raise ExtractError(
            f"extract.channels={wanted} puts the channels of checkpoint {file} in another "
            f"order than it was trained on ({known}): leave extract.channels empty (channels "
            "are matched by name) or list them in the checkpoint's order"
        )
    swaps = [f"{w} as {k}" for w, k in zip(wanted, known) if w != k]
    logger.warning(
        "checkpoint %s was trained on channels %s; extract.channels=%s feeds, by position, %s",
        file,
        known,
        wanted,
        ", ".join(swaps) or "them in that order",
    )


def _channel_ids(file: Path, channels: list[str], known: list[str], n_known: int) -> torch.Tensor:
    """A channel-adaptive model's channel-table rows for `channels` (by name when known)."""
    if not known:
        return torch.arange(len(channels))
    unknown = [c for c in channels if c not in known]
    if unknown:
        raise ExtractError(
            f"checkpoint {file} is channel-adaptive and knows channels {known}; {unknown} are not "
            "among them: choose extract.channels from that list"
        )
    ids = [known.index(c) for c in channels]
    if max(ids) >= n_known:
        raise ExtractError(
            f"checkpoint {file} records channels {known} but its channel table has {n_known} rows"
        )
    return torch.tensor(ids)


def _extract_into(
    cfg: ExtractConfig,
    file: Path,
    ds,
    meta: pd.DataFrame,
    data_id: dict,
    channels: list[str],
    model: nn.Module,
    model_cfg: dict,
    channel_ids: torch.Tensor | None,
    n_features: int,
    device: torch.device,
    ranks: distributed.DistInfo,
    after_shard: Callable[[int], None] | None,
    *,
    progress: dict[str, int] | None = None,
) -> Path:
    out_dir = Path(cfg.out_dir)
    plan = shard_plan(len(meta), cfg.shard_size)
    manifest = {
        "checkpoint": {"sha256_16": provenance.digest(file), "which": cfg.which},
        "features": _feature_options(cfg),
        "channels": channels,
        "data": data_id,
        "n_features": n_features,
        "dtype": cfg.dtype,
        "shard_size": cfg.shard_size,
        "checkpoint_path": str(file),
        "model_config": model_cfg,
        "data_path": str(Path(cfg.data).resolve()),
        "shards": [list(s) for s in plan],
        "n_rows": len(meta),
        "complete": False,
    }
    if progress:
        manifest["training"] = progress  # step / epoch of the checkpoint and the planned ones
    try:
        old = read_manifest(out_dir)
    except IncompleteInputError:  # a damaged manifest: only overwrite may replace its shards
        if not cfg.overwrite:
            raise
        old = None
    stray = out_dir.exists() and any(out_dir.glob("part-*.parquet"))
    diffs = identity_differences(old, manifest) if old is not None else []
    if not cfg.overwrite:
        if diffs:
            raise ExtractError(
                f"{out_dir} holds embeddings made from other inputs or settings ("
                + "; ".join(diffs[:6])
                + "): set extract.overwrite=true (--overwrite) to replace them, or choose "
                "another extract.out_dir"
            )
        if old is None and stray:
            raise ExtractError(
                f"{out_dir} holds embedding shards without {MANIFEST}: set extract.overwrite=true "
                "(--overwrite) to replace them, or choose another extract.out_dir"
            )
    if ranks.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # overwrite replaces only embeddings of another identity: the same checkpoint,
        # options and data resume from the finished shards, with or without overwrite
        replace = cfg.overwrite and (bool(diffs) or (old is None and stray))
        if replace:
            logger.info("overwrite: removing the earlier extraction in %s", out_dir)
            clear_outputs(out_dir)
        if replace or old is None:
            _write_manifest(out_dir, manifest)
    ranks.barrier()

    # one reading of the folder for every rank: a rank reading it after another rank's first
    # write would deal the shards differently and leave one undone
    done = distributed.broadcast_object(done_shards(out_dir, plan) if ranks.rank == 0 else None)
    mine = assign_shards(len(plan), done, ranks.rank, ranks.world_size)
    if ranks.rank == 0:
        logger.info(
            "extract: %d %ss, %s %s (%d features, channels %s) → %s; %d of %d shards to do%s",
            len(meta),
            cfg.level,
            model_cfg["arch"],
            cfg.feature,
            n_features,
            channels,
            out_dir,
            len(plan) - len(done),
            len(plan),
            f" on {ranks.world_size} processes" if ranks.world_size > 1 else "",
        )
    embed = Embedder(model, cfg, device, channel_ids)
    batches = _batches(plan, mine, cfg.batch_size)
    if batches:
        loader = _loader(ds, batches, cfg, device)
        pending: list[torch.Tensor] = []
        shard_iter = iter(mine)
        k = next(shard_iter)
        start, stop = plan[k]
        every = max(1, len(mine) // 20)  # about 20 progress lines in a batch log
        n_written, t0 = 0, time.perf_counter()
        for x in log.progress(loader, total=len(batches), desc="embed", disable=ranks.rank != 0):
            pending.append(embed.on_device(x))
            if sum(len(p) for p in pending) == stop - start:
                emb = torch.cat(pending).cpu().numpy()  # (rows, F)
                _warn_nonfinite(emb, meta.iloc[start:stop], cfg)
                path = out_dir / shard_name(k)
                try:
                    write_shard(path, meta.iloc[start:stop], emb, cfg.dtype)
                except OSError as e:
                    raise write_error(path, e, what="shard") from None
                pending = []
                n_written += 1
                if ranks.rank == 0 and (n_written % every == 0 or n_written == len(mine)):
                    logger.info(
                        "extract: %d of %d shards written (%s, %.1f s)",
                        n_written,
                        len(mine),
                        path.name,
                        time.perf_counter() - t0,
                    )
                if after_shard is not None:
                    after_shard(k)
                k = next(shard_iter, -1)
                if k >= 0:
                    start, stop = plan[k]
    written = distributed.gather_objects(mine)  # (also the barrier) every rank's shards

    problem = None  # rank 0's verdict, raised on every rank (no rank left waiting for another)
    if ranks.rank == 0:
        missing = sorted(set(range(len(plan))) - done_shards(out_dir, plan))
        # rank 0 sees its own folder: a shard of its own that is gone was removed, not unshared
        unseen = {r: sorted(set(w) & set(missing)) for r, w in enumerate(written) if r}
        unseen = {r: ks for r, ks in unseen.items() if ks}
        if unseen:
            r, ks = next(iter(unseen.items()))
            problem = (
                f"{out_dir}: rank {r} wrote shards {[shard_name(k) for k in ks[:3]]} that rank 0 "
                "does not see there: extract.out_dir must be a folder every node shares (a "
                "network filesystem), not a node's local disk; set it to a shared path and rerun"
            )
        elif missing:
            problem = (
                f"{out_dir}: shards {missing[:5]} are missing after extraction; rerun to finish"
            )
    problem = distributed.broadcast_object(problem)
    if problem:
        raise ExtractError(problem)

    if ranks.rank == 0:
        if cfg.attention_cells or cfg.attention_sample:
            _save_attention(embed, ds, meta, channels, out_dir, cfg)
        if cfg.format == "h5ad":
            _write_anndata(out_dir, manifest)
            logger.info("wrote %s", out_dir / H5AD)
        _write_manifest(out_dir, {**manifest, "complete": True, "world_size": ranks.world_size})
        logger.info("embeddings of %d %ss in %s", len(meta), cfg.level, out_dir)
    ranks.barrier()
    return out_dir


def _warn_nonfinite(emb: np.ndarray, meta: pd.DataFrame, cfg: ExtractConfig) -> None:
    """Name the cells whose embeddings are NaN/inf (their crops hold NaN or inf pixels)."""
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        col = "Metadata_CellID" if "Metadata_CellID" in meta.columns else None
        names = meta[col][bad].astype(str).tolist() if col else meta.index[bad].tolist()
        logger.warning(
            "extract: %d %ss of %s have NaN/inf embeddings (%s%s): their images hold NaN or "
            "infinite values; check them and rerun `celldino prepare`, or drop them when "
            "profiling",
            int(bad.sum()),
            cfg.level,
            cfg.data,
            ", ".join(map(str, names[:5])),
            ", ..." if len(names) > 5 else "",
        )


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    try:
        write_manifest(out_dir, manifest)
    except OSError as e:
        raise write_error(out_dir / MANIFEST, e, what="manifest") from None


def _save_attention(
    embed: Embedder,
    ds,
    meta: pd.DataFrame,
    channels: list[str],
    out_dir: Path,
    cfg: ExtractConfig,
) -> Path | None:
    if cfg.level != "cell":
        logger.warning("attention maps are saved for single cells only (extract.level=cell)")
        return None
    ids = meta["Metadata_CellID"].astype(str).tolist()
    rows = pick_cells(ids, list(cfg.attention_cells), cfg.attention_sample)
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(rows), cfg.batch_size):
        x = torch.stack([ds[i] for i in rows[s : s + cfg.batch_size]])  # (b, C, H, W)
        for name, t in embed.attention(x).items():
            parts.setdefault(name, []).append(t.numpy())
    arrays = {name: np.concatenate(v) for name, v in parts.items()}
    p = _vit(embed.model).patch_size
    H, W = embed.resized(x[:1]).shape[-2:]  # the model's input side, not the stored crop's
    path = write_attention(
        out_dir / ATTENTION,
        arrays,
        cell_ids=[ids[i] for i in rows],
        channels=channels,
        grid=(H // p, W // p),
        num_registers=_vit(embed.model).num_registers,
    )
    logger.info("patch tokens and attention of %d cells → %s", len(rows), path)
    return path


def _write_anndata(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """embeddings.h5ad from the shards: X (cells, F) float32, obs = Metadata_*, uns = manifest."""
    import anndata as ad

    from celldino.io.profiles import write_h5ad

    df = read_shards(Path(out_dir), len(manifest["shards"]))  # before `complete` is set
    feats = [c for c in df.columns if c.startswith(EMB_PREFIX)]
    X = df[feats].to_numpy(dtype=np.float32)  # (N, F)
    obs = df.drop(columns=feats).reset_index(drop=True)
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(feats, dtype=str)))
    params = {k: manifest[k] for k in ("checkpoint", "features", "channels", "data")}
    adata.uns["celldino"] = {"steps": [{"step": "extract", "params": params}]}
    adata.uns["manifest_json"] = json.dumps(manifest, default=str)
    return write_h5ad(adata, Path(out_dir) / H5AD)
