"""Field-level embeddings for learned image QC (issue 24): whole fields of view → one vector.

`field_embeddings(images, model, channels_in=...)` embeds each field (C, H, W) with any backbone
celldino loads (`load_backbone`, `build_model`, random init as the baseline):

- **Intensity**: every field is divided by one scale per plate and channel (`field_scale`: the
  median over the plate's fields of each field's 99.8th percentile), never by its own
  percentiles, so a saturated, auto-fluorescent or empty field keeps its brightness against the
  others (per-image normalisation would erase exactly those artefacts). No offset is taken off
  and values above 1 are kept (clipped at `CLIP`), non-finite pixels become 0.
- **Tiles**: the field is cut into non-overlapping square tiles of the model's input side
  (`model_side`: the trained crop size of a celldino checkpoint, else the position grid's side)
  on a grid centred in the field (the border left over is split on both sides); with `tile=t`
  the tiles are `t` px and resized (bilinear, antialiased) to the model's side. A field smaller
  than the tile is one tile, cut to a multiple of the patch size and fed at its own size (the
  position embeddings are resampled).
- **Pooling**: the class token of each tile, pooled per field as [mean over tiles, max over
  tiles] (2·D values): the mean is the field's typical content, the max keeps a local artefact
  (one tile of debris or a bright blob) that the mean over many clean tiles would dilute.

`embed_prep_fields(prep_dir, checkpoint_or_model)` does this for every readable field of a
prepared folder (images through `celldino.data.imagesets.ImageSet`, i.e. `celldino.io.images`),
one scale per plate (from at most `SCALE_FIELDS` fields spread over it: the others are read
once), and stores the table (`Metadata_Plate/Well/Site/ImageKey` + `femb_####`) as
`field_embeddings.parquet` in the prep folder (`celldino.io.prepared`), with its identity
(checkpoint, tiles, prep): a rerun with the same identity reads it back instead of recomputing.

`run_learned_qc(QCConfig)` (the `celldino qc` command) lives in `celldino.extract.learned_qc`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from celldino import log
from celldino.data.artefacts import BRIGHT_LEVELS, bright_measures, channel_noise
from celldino.errors import DataError, MissingInputError
from celldino.io.files import file_fingerprint, read_json
from celldino.io.prepared import (
    FEMB_PREFIX,
    FIELD_EMBEDDINGS,
    IMAGES,
    NOISE_PREFIX,
    STATE,
    read_field_embeddings,
    read_images,
    write_field_embeddings,
)
from celldino.models import ChannelwiseModel, VisionTransformer

logger = log.get_logger(__name__)

SCALE_PERCENTILE = 99.8  # per field; the plate's scale is the median over its fields
SCALE_FIELDS = 64  # a prep's plate scale: from at most this many fields, spread over the plate
CLIP = 50.0  # scaled intensities above this (50x the plate's bright level) are clipped
RANDOM = "random"  # checkpoint_or_model: a randomly initialised ViT (the baseline)
RANDOM_SEED = 0
BRIGHT_PREFIX = "bright"  # field_embeddings.parquet: each channel's largest bright object


def bright_columns(channels: list[str]) -> list[str]:
    """bright<level %>_<channel> for each of `BRIGHT_LEVELS` (outer) and channel (inner), then
    extent50_<channel> (`bright_extent`): `bright_measures`' order."""
    cols = [f"{BRIGHT_PREFIX}{round(lv * 100)}_{c}" for lv in BRIGHT_LEVELS for c in channels]
    return cols + [f"extent50_{c}" for c in channels]


_SAMPLE = 65536  # pixels per field and channel for its percentile (strided, deterministic)


class FieldQCError(DataError):
    """Fields, settings or a checkpoint that learned QC cannot use (the message says what to do)."""


# ---- the model -----------------------------------------------------------------------------


def _vit(model: nn.Module) -> VisionTransformer:
    return model.backbone if isinstance(model, ChannelwiseModel) else model  # type: ignore[return-value]


def model_side(model: nn.Module) -> int:
    """The side in pixels a model takes: `model.celldino_input_side` when set (the trained crop
    size of a celldino checkpoint, set by `load_qc_model`), else its position grid's side."""
    side = getattr(model, "celldino_input_side", 0)
    if side:
        return int(side)
    vit = _vit(model)
    return int(vit.grid_size * vit.patch_size)


def random_model(
    n_chans: int,
    *,
    arch: str = "vit_small",
    patch_size: int = 16,
    img_size: int = 224,
    seed: int = RANDOM_SEED,
) -> nn.Module:
    """A randomly initialised multichannel ViT (seeded: the same weights every time), the
    baseline encoder of learned QC."""
    from celldino.config import ModelConfig
    from celldino.models import build_model

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        cfg = ModelConfig(
            arch=arch,
            patch_size=patch_size,
            img_size=img_size,
            in_chans=n_chans,
            drop_path_rate=0.0,
        )
        model = build_model(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def _channel_plan(
    model: nn.Module, channels_in: list[str], model_channels: list[str] | None, source: str
) -> tuple[list[int], torch.Tensor | None]:
    """(indices into channels_in, in model order; channel ids of a channel-adaptive model)."""
    vit = _vit(model)
    adaptive = vit.channel_adaptive and not isinstance(model, ChannelwiseModel)
    if model_channels:
        missing = [c for c in model_channels if c not in channels_in]
        if adaptive:
            use = [c for c in model_channels if c in channels_in]
            if not use:
                raise FieldQCError(
                    f"{source} knows channels {list(model_channels)} but the fields have "
                    f"{list(channels_in)}: none in common; use a checkpoint trained on these "
                    "channels"
                )
            ids = torch.tensor([list(model_channels).index(c) for c in use])
            return [channels_in.index(c) for c in use], ids
        if missing:
            raise FieldQCError(
                f"{source} was trained on channels {list(model_channels)} but the fields have "
                f"{list(channels_in)} (missing {missing}): use a checkpoint trained on these "
                "channels, or `random` (qc.checkpoint=random)"
            )
        order = [channels_in.index(c) for c in model_channels]
    else:
        order = list(range(len(channels_in)))
    C = len(order)
    if isinstance(model, ChannelwiseModel):
        ok, want = model.num_chans == C, model.num_chans
    elif adaptive:
        ok, want = C <= vit.in_chans, vit.in_chans
    else:
        ok, want = vit.in_chans == C, vit.in_chans
    if not ok:
        raise FieldQCError(
            f"{source} takes {want} channels but the fields have {C} ({list(channels_in)}): "
            "use a checkpoint made for these channels, or `random` (qc.checkpoint=random)"
        )
    ids = torch.arange(C) if adaptive else None
    return order, ids


# ---- intensity and tiles -------------------------------------------------------------------


def _as_float(img: np.ndarray) -> np.ndarray:
    x = np.asarray(img, dtype=np.float32)
    if x.ndim != 3:
        raise FieldQCError(f"a field must be (C, H, W), not an array of shape {x.shape}")
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return x


def _field_percentile(img: np.ndarray, q: float) -> np.ndarray:
    """(C,) q-th percentile of each channel of one field, from an evenly strided pixel sample."""
    x = _as_float(img).reshape(len(img), -1)
    step = max(1, x.shape[1] // _SAMPLE)
    return np.percentile(x[:, ::step], q, axis=1).astype(np.float64)


def field_scale(images: Sequence[np.ndarray], q: float = SCALE_PERCENTILE) -> np.ndarray:
    """(C,) the intensity scale of a plate: per channel, the median over its fields of each
    field's q-th percentile (robust to a few saturated or empty fields); a channel whose
    scale is not positive gets 1."""
    if len(images) == 0:
        raise FieldQCError("no fields to compute an intensity scale from")
    per = np.stack([_field_percentile(images[i], q) for i in range(len(images))])  # (n, C)
    scale = np.median(per, axis=0)
    return np.where(np.isfinite(scale) & (scale > 0), scale, 1.0).astype(np.float32)


def field_tiles(x: torch.Tensor, tile: int, side: int, patch: int) -> torch.Tensor:
    """(C, H, W) → (K, C, s, s): non-overlapping `tile` px tiles on a grid centred in the field,
    row by row, resized to `side` when `tile != side`. A field smaller than `tile` is one tile,
    cut to a multiple of `patch` (centred) and left at its own size."""
    C, H, W = x.shape
    if H < tile or W < tile:
        h, w = (H // patch) * patch, (W // patch) * patch
        if h < patch or w < patch:
            raise FieldQCError(f"a field of {H}x{W} px is smaller than the patch size {patch} px")
        y0, x0 = (H - h) // 2, (W - w) // 2
        return x[None, :, y0 : y0 + h, x0 : x0 + w]  # (1, C, h, w)
    ny, nx = H // tile, W // tile
    y0, x0 = (H - ny * tile) // 2, (W - nx * tile) // 2
    out = [
        x[:, y0 + i * tile : y0 + (i + 1) * tile, x0 + j * tile : x0 + (j + 1) * tile]
        for i in range(ny)
        for j in range(nx)
    ]
    t = torch.stack(out)  # (K, C, tile, tile)
    if tile != side:
        t = torch.nn.functional.interpolate(
            t, size=(side, side), mode="bilinear", align_corners=False, antialias=True
        )
    return t


def pool_tiles(feats: np.ndarray) -> np.ndarray:
    """(K, D) tile features of one field → (2·D,) [mean over tiles, max over tiles]."""
    return np.concatenate([feats.mean(axis=0), feats.max(axis=0)]).astype(np.float32)


def field_embeddings(
    images: Sequence[np.ndarray],
    model: nn.Module,
    *,
    channels_in: list[str],
    batch_size: int = 16,
    tile: int | None = None,
    scale: np.ndarray | None = None,
    model_channels: list[str] | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """(n_fields, 2·D) float32: each field's tile class tokens pooled as [mean, max].

    `images`: a sequence of (C, H, W) arrays (any dtype) with channels in the order
    `channels_in`; `model`: a backbone from `load_backbone` / `build_model` (or
    `random_model`); `model_channels`: the channel names the model was trained on, in its
    order (a checkpoint's recorded channels): the fields' channels are matched to them by name
    (a channel-adaptive model gets their channel ids); without it `channels_in` is taken as the
    model's order. `scale` (C,): the plate's intensity scale in `channels_in` order (default
    `field_scale(images)`: all the given fields are one plate). `tile`: tile side in px
    (default the model's input side; other sides are resized to it). `device`: default the
    model's. See the module docstring for the choices.
    """
    channels_in = list(channels_in)
    n = len(images)
    if batch_size < 1:
        raise FieldQCError(f"batch_size must be at least 1, not {batch_size}")
    order, ids = _channel_plan(model, channels_in, model_channels, "the model")
    vit = _vit(model)
    side = model_side(model)
    t = int(tile or side)
    if t < vit.patch_size:
        raise FieldQCError(f"tile={t} px is smaller than the model's patch size {vit.patch_size}")
    if scale is None:
        scale = field_scale(images) if n else np.ones(len(channels_in), np.float32)
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    if len(scale) != len(channels_in):
        raise FieldQCError(
            f"scale has {len(scale)} values but there are {len(channels_in)} channels "
            f"{channels_in}: give one per channel"
        )
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model = model.to(device).eval()
    if ids is not None:
        ids = ids.to(device)
    dim = int(model.embed_dim)
    out = np.zeros((n, 2 * dim), np.float32)
    sc = torch.from_numpy(scale[order]).view(-1, 1, 1)
    pending: list[tuple[int, torch.Tensor]] = []  # (field, tile (C, s, s)) of one size
    feats: dict[int, list[np.ndarray]] = {}
    left: dict[int, int] = {}

    def flush() -> None:
        if not pending:
            return
        x = torch.stack([p[1] for p in pending]).to(device)  # (B, C, s, s)
        with torch.inference_mode():
            cls = model(x, channel_ids=ids)["cls"].float().cpu().numpy()  # (B, D)
        for (i, _), f in zip(pending, cls):
            feats[i].append(f)
            left[i] -= 1
            if left[i] == 0:
                out[i] = pool_tiles(np.stack(feats.pop(i)))
        pending.clear()

    for i in range(n):
        img = _as_float(images[i])
        if len(img) != len(channels_in):
            raise FieldQCError(
                f"field {i} has {len(img)} channels but channels_in names {len(channels_in)} "
                f"({channels_in})"
            )
        x = torch.from_numpy(img[order]) / sc
        x = x.clamp_(0.0, CLIP)
        tiles = field_tiles(x, t, side, vit.patch_size)  # (K, C, s, s)
        feats[i], left[i] = [], len(tiles)
        for tt in tiles:
            if pending and pending[0][1].shape != tt.shape:
                flush()  # one tile size per batch
            pending.append((i, tt))
            if len(pending) >= batch_size:
                flush()
    flush()
    return out


# ---- a prepared folder ---------------------------------------------------------------------


class _Fields:
    """The fields of an image set, read when indexed (a lazy sequence); each field's channel
    noise (`channel_noise`) and largest bright objects (`bright_objects`) are kept from its
    first reading."""

    def __init__(self, iset, rows: list[int]):
        self.iset, self.rows = iset, rows
        self.noise: dict[int, np.ndarray] = {}
        self.bright: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> np.ndarray:
        img = self.iset.read(self.rows[k])
        if k not in self.noise:
            self.noise[k] = channel_noise(img)
            self.bright[k] = bright_measures(img)
        return img


class _Subset:
    """Some items of a lazy sequence, still lazy."""

    def __init__(self, seq, idx: list[int]):
        self.seq, self.idx = seq, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.seq[self.idx[k]]


def prep_fields(prep_dir: str | Path):
    """(ImageSet of the prep's readable fields, their channels, the prep's fingerprint)."""
    from celldino.data.imagesets import ImageSet

    prep = Path(prep_dir)
    for name in (IMAGES, STATE):
        if not (prep / name).exists():
            raise MissingInputError(
                f"{prep / name} not found: {prep} is not a prepared folder; run "
                f"`celldino prepare prepare.out_dir={prep}` first"
            )
    state = read_json(prep / STATE)
    channels = list(state["channels"])
    table = read_images(prep)
    if "Skipped" in table:
        table = table[~table["Skipped"].astype(bool)]
    meta = [
        c for c in table.columns if c.startswith(("Metadata_", "FileName_", "PathName_", "Frame_"))
    ]
    iset = ImageSet(
        table[meta].drop(columns=["Metadata_ImageKey"]).reset_index(drop=True), channels
    )
    keys = table["Metadata_ImageKey"].astype(str).tolist()
    if list(iset.table["Metadata_ImageKey"]) != keys:  # the same rule made both: a bug if not
        raise RuntimeError(f"{prep / IMAGES}: image keys differ from the image set's")
    return iset, channels, str(state.get("fingerprint", ""))


def load_qc_model(
    checkpoint_or_model: str | Path | nn.Module,
    n_chans: int,
    *,
    which: str = "teacher",
) -> tuple[nn.Module, list[str] | None, dict]:
    """(model, its channel names or None, identity) for `random`, a checkpoint, or a module.

    A celldino checkpoint's model takes tiles of its trained crop size; a foreign 1- or
    3-channel (RGB) model without recorded channels is run on each channel alone
    (`ChannelwiseModel`, as extract's channel_mode=channelwise)."""
    from celldino.io.checkpoints import checkpoint_channels, checkpoint_crop_size
    from celldino.io.trainrun import run_channels
    from celldino.models import load_backbone, resolve_checkpoint

    if isinstance(checkpoint_or_model, nn.Module):
        return checkpoint_or_model, None, {"model": "module"}
    if str(checkpoint_or_model) == RANDOM:
        return (
            random_model(n_chans),
            None,
            {"model": RANDOM, "seed": RANDOM_SEED, "arch": "vit_small/16"},
        )
    from celldino.io.checkpoints import CheckpointError

    try:
        file = resolve_checkpoint(checkpoint_or_model)
        model, _ = load_backbone(file, which)
        known = checkpoint_channels(file) or run_channels(file) or None
        crop = checkpoint_crop_size(file)
    except (CheckpointError, ValueError) as e:
        raise FieldQCError(f"qc.checkpoint: {e}") from None
    vit = _vit(model)
    if (
        not known
        and not vit.channel_adaptive
        and vit.in_chans in (1, 3)
        and vit.in_chans != n_chans
    ):
        logger.info(
            "checkpoint %s takes %d channel(s) and records no channel names: each of the %d "
            "channels goes through it alone (channelwise)",
            file,
            vit.in_chans,
            n_chans,
        )
        model = ChannelwiseModel(vit, n_chans)
    if crop:
        model.celldino_input_side = int(crop)  # type: ignore[assignment]
    ident = {"model": "checkpoint", "sha256_16": file_fingerprint(file), "which": which}
    return model.eval(), known, ident


def embed_prep_fields(
    prep_dir: str | Path,
    checkpoint_or_model: str | Path | nn.Module,
    *,
    which: str = "teacher",
    batch_size: int = 16,
    tile: int | None = None,
    device: str | None = None,
    write: bool = True,
    model_channels: list[str] | None = None,
) -> pd.DataFrame:
    """The field embeddings of every readable field of a prepared folder (one intensity scale
    per plate and channel), as a table: Metadata_Plate/Well/Site/ImageKey + femb_#### (+ each
    channel's pixel noise, `noise_<channel>`, and largest bright object at each of
    `BRIGHT_LEVELS`, `bright50_<channel>`, `bright80_<channel>`, and longest bright object,
    `extent50_<channel>`, for `classical_features`).

    `checkpoint_or_model`: a celldino run dir or checkpoint, foreign DINO/DINOv2/DINO4Cells
    weights, `"random"` (a seeded random-init ViT-S/16), or a backbone module (then
    `model_channels` names its channels, by default the prep's in order). With `write`, the
    table is stored as field_embeddings.parquet in the prep folder (under its lock), and a
    stored table of the same identity (model, tiles, prep) is read back instead of recomputed.
    """
    from celldino.io.lock import output_lock

    prep = Path(prep_dir)
    iset, channels, prep_fp = prep_fields(prep)
    if not len(iset):
        raise FieldQCError(f"{prep / IMAGES}: no readable field to embed (all skipped)")
    model, known, ident = load_qc_model(checkpoint_or_model, len(channels), which=which)
    if known is None and model_channels:
        known = list(model_channels)
    source = "the model" if ident["model"] != "checkpoint" else f"checkpoint {checkpoint_or_model}"
    _channel_plan(model, channels, known, source)  # refuses before anything is read
    identity = {
        **ident,
        "tile": int(tile or 0),
        "side": model_side(model),
        "channels": channels,
        "prep": prep_fp,
        "keys": int(len(iset)),
        "pool": "mean+max",
        "scale": f"plate median of field p{SCALE_PERCENTILE} over <= {SCALE_FIELDS} fields",
        "columns": 3,  # femb_, noise_, bright (a table of an older layout is recomputed)
    }
    reuse = write and ident["model"] != "module"
    if reuse:
        old = read_field_embeddings(prep, identity=True)
        if old is not None and old[1] == identity:
            logger.info("field embeddings already in %s: reused", prep)
            return old[0]
        if old is None and (prep / FIELD_EMBEDDINGS).exists():
            logger.warning("%s cannot be read: computed again", prep / FIELD_EMBEDDINGS)
    dev = None
    if device and device != "auto":
        dev = torch.device(device)
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = iset.table
    plates = table["Metadata_Plate"].astype(str)
    emb = np.zeros((len(table), 0), np.float32)
    noise = np.zeros((len(table), len(channels)), np.float64)
    bright = np.zeros((len(table), (len(BRIGHT_LEVELS) + 1) * len(channels)), np.float64)
    for plate in dict.fromkeys(plates):
        rows = list(np.flatnonzero((plates == plate).to_numpy()))
        fields = _Fields(iset, rows)
        # the scale from at most SCALE_FIELDS fields spread over the plate (a median: robust)
        pick = np.unique(np.linspace(0, len(rows) - 1, min(len(rows), SCALE_FIELDS)).round())
        scale = field_scale(_Subset(fields, pick.astype(int).tolist()))
        logger.info(
            "learned QC: embedding %d fields of plate %s (scale %s)",
            len(rows),
            plate,
            ", ".join(f"{c} {s:.4g}" for c, s in zip(channels, scale)),
        )
        e = field_embeddings(
            fields,
            model,
            channels_in=channels,
            batch_size=batch_size,
            tile=tile,
            scale=scale,
            model_channels=known,
            device=dev,
        )
        if emb.shape[1] == 0:
            emb = np.zeros((len(table), e.shape[1]), np.float32)
        emb[rows] = e
        noise[rows] = np.stack([fields.noise[k] for k in range(len(rows))])
        bright[rows] = np.stack([fields.bright[k] for k in range(len(rows))])
    cols = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site") if c in table]
    meta = table[cols + ["Metadata_ImageKey"]].astype(str).reset_index(drop=True)
    width = max(4, int(math.log10(max(emb.shape[1], 1))) + 1)
    feats = pd.DataFrame(emb, columns=[f"{FEMB_PREFIX}{j:0{width}d}" for j in range(emb.shape[1])])
    noisy = pd.DataFrame(noise, columns=[f"{NOISE_PREFIX}{c}" for c in channels])
    brights = pd.DataFrame(bright, columns=bright_columns(channels))
    df = pd.concat([meta, feats, noisy, brights], axis=1)
    if write:
        with output_lock(prep, "qc"):
            write_field_embeddings(df, prep, identity)
    return df
