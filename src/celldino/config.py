"""Configuration: frozen dataclasses, YAML files and command-line dotlist overrides.

One `Config` holds a section per stage. A YAML file under `configs/` sets any subset of it and
`key.sub=value` overrides on the command line win over the file. Unknown keys are errors that
list the valid keys at that level. The resolved config is written into every run directory.

Every field carries a one-line comment; `field_docs` reads those comments so that the CLI help
and the docs show them (the comment is the documentation).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from celldino.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file or override that does not fit the schema."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    preset: str = "tiny"  # size preset: tiny (tests), demo (the demo), or custom (fields below)
    seed: int = 0  # random seed; the same seed gives byte-identical files
    n_plates: int = 0  # plates (0 = take from the preset)
    n_batches: int = 0  # experimental batches the plates are spread over (0 = preset)
    n_moas: int = 0  # mechanisms of action, 1 to 6 (0 = preset)
    compounds_per_moa: int = 0  # compounds per MoA; 2+ makes NSC meaningful (0 = preset)
    n_doses: int = 0  # doses per compound, log-spaced 0.3 to 30 uM (0 = preset)
    wells_per_compound: int = 0  # replicate wells per compound and dose on each plate (0 = preset)
    control_wells: int = 0  # negative-control (DMSO) wells per plate (0 = preset)
    sites_per_well: int = 0  # fields of view per well (0 = preset)
    image_size: int = 0  # field-of-view side in pixels (0 = preset)
    cells_per_site: int = 0  # mean number of cells per field of view (0 = preset)
    channels: tuple[str, ...] = ("DNA", "ER", "RNA", "AGP", "Mito")  # channel names, DNA first
    protein_channel: bool = False  # add a 'Protein' channel with HPA-like localisation classes
    n_bad_images: int = -1  # planted out-of-focus and debris images (-1 = preset)


@dataclass(frozen=True)
class PrepareConfig:
    load_data: str = ""  # load-data table (CSV/Parquet) in the CellProfiler convention
    image_dir: str = ""  # or: a folder of images matched by `pattern` (when load_data is empty)
    pattern: str = ""  # file-name regex with groups plate/well/site/channel, or opera_phenix, nf1
    channel_map: dict[str, str] = field(default_factory=dict)  # file channel → name: {'5': 'DNA'}
    plate: str = ""  # plate name for image_dir sets without a plate group (default: folder name)
    channels: tuple[str, ...] = ()  # channel order to use and record (empty = all, table order)
    out_dir: str = "runs/prep"  # prep folder: cells.parquet, crops.zarr, qc.parquet, ...
    illumination: bool = True  # CellProfiler-style illumination correction per plate and channel
    illum_filter: str = "median"  # illumination smoothing: median or gaussian
    illum_size: int = 0  # smoothing window in pixels (0 = 1/20 of the image side)
    normalization: str = "percentile_image"  # percentile_image, percentile_plate, divisor or none
    norm_percentiles: tuple[float, ...] = (1.0, 99.8)  # low/high percentiles for percentile_*
    norm_divisor: float = 65535.0  # divisor for normalization=divisor
    segmentation: str = "watershed"  # watershed (Otsu + watershed), masks, or locations
    nuclei_channel: str = "DNA"  # channel to find nuclei in
    cell_channel: str = ""  # cell-body channel for cell watershed (empty = expand nuclei)
    smooth_sigma: float = 2.0  # Gaussian smoothing (px) before thresholding
    nuclei_min_area: int = 50  # smallest nucleus kept, in pixels
    nuclei_max_area: int = 20000  # largest nucleus kept, in pixels
    nuclei_min_distance: int = 7  # minimum distance between nucleus seeds (px) when splitting
    exclude_border: bool = True  # drop nuclei touching the image edge (as CellProfiler does)
    cell_expand: int = 15  # without a cell channel: grow nuclei by this many px to get cells
    mask_dir: str = ""  # folder of label masks (segmentation=masks)
    nuclei_masks: str = ""  # nuclei mask file name template, e.g. '{stem_DNA}_MaskNuclei.tiff'
    cell_masks: str = ""  # cell mask file name template (empty = expand nuclei)
    locations: str = ""  # cell-locations table (segmentation=locations), CSV or Parquet
    location_x: str = "Nuclei_Location_Center_X"  # x column (pixels) of the locations table
    location_y: str = "Nuclei_Location_Center_Y"  # y column (pixels) of the locations table
    crop_size: int = 96  # side of the square single-cell crops in pixels
    border: str = "pad"  # cells near the border: pad (with zeros) or drop
    mask_neighbours: bool = False  # zero pixels of other cells inside each crop
    qc_blur_z: float = -3.0  # flag blur when the robust z of log blur score is below this
    qc_max_saturation: float = 0.05  # flag when more than this fraction of pixels is saturated
    qc_min_foreground: float = 0.002  # flag empty when the DNA foreground fraction is below this
    qc_debris_area: float = 0.005  # flag debris when one very bright object covers this fraction
    qc_exclude: bool = True  # leave QC-flagged images out of the cells and crops
    on_error: str = "raise"  # bad image: raise, or skip (recorded in skipped.parquet)
    features: bool = True  # compute engineered CellProfiler-like features (engineered.parquet)
    workers: int = 1  # processes for segmentation, cropping and features
    seed: int = 0  # random seed for anything sampled while preparing


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "vit_tiny"  # backbone: vit_tiny, vit_small, vit_base, vit_large
    patch_size: int = 16  # patch side in pixels: 8, 14 or 16
    depth: int = 0  # transformer blocks (0 = the architecture's own; e.g. 4 for quick CPU runs)
    channel_mode: str = "multichannel"  # multichannel, channelwise or channel_adaptive
    in_chans: int = 5  # input channels (channel_adaptive: number of known channels)
    backbone_chans: int = 3  # channelwise: channels of the shared backbone (3 = RGB model, or 1)
    img_size: int = 224  # image side the position embeddings are made for (others interpolated)
    num_registers: int = 0  # register tokens (DINOv2 'registers'); 0 = none
    layerscale: float = 0.0  # LayerScale initial value (0 = off; DINOv2 uses 1e-5)
    qkv_bias: bool = True  # bias in the attention qkv projection
    drop_path_rate: float = 0.1  # stochastic depth rate of the last block (linear from 0)
    out_dim: int = 4096  # DINO head output dimension (paper: 65536)
    head_hidden_dim: int = 2048  # DINO head hidden width
    head_bottleneck_dim: int = 256  # DINO head bottleneck before the weight-normalised layer
    head_nlayers: int = 3  # DINO head MLP layers
    norm_last_layer: bool = True  # fix the norm of the head's last layer at 1 (DINO default)
    pretrained: str = ""  # local checkpoint to start from (DINO, DINOv2, DINO4Cells or celldino)
    pretrained_which: str = "teacher"  # network of a two-network checkpoint: teacher or student


@dataclass(frozen=True)
class AugmentConfig:
    global_crop_size: int = 224  # side in pixels of the 2 global crops (e.g. 96 for tiny models)
    global_crop_scale: tuple[float, ...] = (0.4, 1.0)  # area fraction range of global crop boxes
    local_crop_size: int = 96  # side in pixels of the local crops (e.g. 48 for tiny models)
    local_crop_scale: tuple[float, ...] = (0.05, 0.4)  # area fraction range of local crop boxes
    n_local_crops: int = 8  # local crops per image (0 = no multi-crop, only the 2 global crops)
    random_resized_crop: bool = True  # random crop boxes; off = resize the whole image
    crop_ratio: tuple[float, ...] = (0.75, 1.3333333)  # aspect-ratio (w/h) range, log-uniform
    hflip_p: float = 0.5  # probability of a horizontal flip
    vflip_p: float = 0.5  # probability of a vertical flip
    rot90: bool = True  # random rotation by 0, 90, 180 or 270 degrees (uniform)
    affine_p: float = 0.0  # probability of a random affine warp (rotation, scale, shear, shift)
    affine_degrees: float = 15.0  # affine rotation range in degrees (+-)
    affine_scale: tuple[float, ...] = (0.9, 1.1)  # affine zoom range (>1 enlarges the content)
    affine_shear: float = 0.0  # affine shear range in degrees (+-)
    affine_translate: float = 0.0  # affine shift range as a fraction of the crop side (+-)
    elastic_p: float = 0.0  # probability of a smooth random elastic warp
    elastic_alpha: float = 0.03  # elastic displacement std as a fraction of the crop side
    elastic_grid: int = 4  # control points per side of the elastic noise (lower = smoother)
    padding_mode: str = "reflection"  # fill outside the image: reflection, border or zeros
    brightness_p: float = 0.8  # probability per image of a brightness change
    brightness: float = 0.2  # per-channel gain drawn from [1-brightness, 1+brightness]
    contrast_p: float = 0.8  # probability per image of a contrast change
    contrast: float = 0.2  # per-channel contrast factor drawn from [1-contrast, 1+contrast]
    per_channel: bool = True  # independent brightness/contrast per channel (else one per image)
    channel_drop_p: float = 0.0  # probability each channel is zeroed (never all channels)
    protein_channel: int = -1  # index of the channel to rescale, e.g. the HPA protein (-1 = none)
    protein_rescale_p: float = 0.2  # probability per image of rescaling the protein channel
    protein_rescale: tuple[float, ...] = (0.0, 2.0)  # range of the protein channel's random gain
    blur_p: float = 0.0  # probability of a Gaussian blur (off: useless for cells per Cell-DINO)
    blur_sigma: tuple[float, ...] = (0.1, 2.0)  # blur sigma range in pixels
    solarize_p: float = 0.0  # probability of solarisation (off: useless for cells)
    solarize_threshold: float = 0.5  # values >= threshold become 1 - value (data in [0, 1])
    greyscale_p: float = 0.0  # probability of replacing every channel by the channel mean (off)


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/train"  # where checkpoints/, metrics.jsonl and config.yaml go
    data: str = ""  # prepared folder (cells.parquet + crops.zarr) written by `celldino prepare`
    channels: tuple[str, ...] = ()  # channels to train on, by name (empty = all in the crop store)
    epochs: int = 10  # passes over the data
    batch_size: int = 64  # global batch size (split across ranks under torchrun)
    seed: int = 0  # random seed for weights, augmentation and sampling
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    num_workers: int = 0  # DataLoader worker processes reading crops (0 = main process)
    lr: float = 5e-4  # peak learning rate for a batch of 256 (scaled by batch_size / 256)
    min_lr: float = 1e-6  # learning rate at the end of the cosine schedule
    warmup_epochs: float = 1.0  # epochs of linear learning-rate warm-up from 0
    weight_decay: float = 0.04  # AdamW weight decay at the start (cosine schedule)
    weight_decay_end: float = 0.4  # AdamW weight decay at the end
    momentum_teacher: float = 0.996  # teacher EMA momentum at the start (cosine to 1)
    teacher_temp: float = 0.04  # teacher softmax temperature after warm-up
    warmup_teacher_temp: float = 0.04  # teacher temperature at the start (linear warm-up)
    warmup_teacher_temp_epochs: float = 0.0  # epochs of teacher-temperature warm-up
    student_temp: float = 0.1  # student softmax temperature
    center_momentum: float = 0.9  # momentum of the running centre of the teacher outputs
    clip_grad: float = 3.0  # clip the gradient norm to this value (0 = off)
    freeze_last_layer: int = 1  # epochs during which the head's last layer is not updated
    ibot_weight: float = 0.0  # weight of the iBOT masked patch-token loss (0 = plain DINO)
    ibot_mask_ratio: tuple[float, ...] = (0.1, 0.5)  # range of the masked fraction of patches
    ibot_mask_prob: float = 0.5  # fraction of global crops that get masked
    koleo_weight: float = 0.0  # weight of the KoLeo regulariser on class tokens (DINOv2: 0.1)
    weak_label: str = ""  # WS-DINO: metadata column of weak labels, e.g. Metadata_Compound
    amp: bool = True  # bf16 autocast on CUDA (always off on CPU)
    log_every: int = 10  # steps between diagnostics in metrics.jsonl and the log
    save_every: int = 1  # keep an epoch_NNNN checkpoint every this many epochs (0 = only last)
    diagnostics: bool = True  # teacher entropy, KL and embedding std, with a collapse warning


@dataclass(frozen=True)
class ExtractConfig:
    checkpoint: str = ""  # celldino run dir or checkpoint, or a DINO/DINOv2/DINO4Cells weights file
    data: str = ""  # prepared folder (cells.parquet + crops.zarr) written by `celldino prepare`
    out_dir: str = "runs/embeddings"  # where the Parquet shards and manifest go
    which: str = "teacher"  # network of a two-network checkpoint: teacher or student
    channels: tuple[str, ...] = ()  # channels in model order (empty = the run's, else all stored)
    channel_mode: str = ""  # channelwise: RGB/1-channel model on each channel, features joined
    adapt_channels: bool = False  # foreign weights on other channel counts: average the kernel
    feature: str = "cls"  # cls, last_blocks, block, patch_mean or cls_patch_mean
    n_blocks: int = 4  # feature=last_blocks: how many last blocks' class tokens to concatenate
    block: int = -1  # feature=block: block index (0-based; negative counts from the end)
    level: str = "cell"  # cell (single-cell crops) or field (whole fields of view)
    field_mode: str = "center4"  # level=field: center4 (median of 4 centre crops) or tile
    field_crop: int = 224  # level=field: side in pixels of the centre crops or tiles
    field_stride: int = 0  # level=field, tile: step between tiles in pixels (0 = field_crop)
    field_pool: str = "mean"  # level=field, tile: pooling of the tiles' features, mean or median
    dtype: str = "float32"  # embedding columns: float32 or float16
    batch_size: int = 128  # images per forward pass
    num_workers: int = 0  # DataLoader worker processes reading crops (0 = main process)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: bool = True  # bf16 autocast on CUDA (always off on CPU)
    shard_size: int = 4096  # rows per Parquet shard (the unit of resuming and of torchrun ranks)
    attention_cells: tuple[str, ...] = ()  # Metadata_CellID values: save patch tokens + attention
    attention_sample: int = 0  # or: save them for this many cells spread evenly over the table
    format: str = "parquet"  # parquet, or h5ad (also writes embeddings.h5ad, AnnData)
    overwrite: bool = False  # replace embeddings made with another checkpoint or options


@dataclass(frozen=True)
class ProfileConfig:
    input: tuple[str, ...] = ("runs/embeddings",)  # per-cell Parquet shards: folders/files/globs
    out: str = "runs/profiles.h5ad"  # AnnData file written by `celldino profile` (+ .parquet/.csv)
    formats: tuple[str, ...] = ("h5ad", "parquet", "csv")  # outputs: h5ad, parquet, csv
    features: str = "emb_"  # feature columns: a prefix, or a comma-separated list of names
    by: tuple[str, ...] = ("Metadata_Plate", "Metadata_Well")  # keys of one aggregated profile
    via: tuple[str, ...] = ()  # intermediate level added to `by` first, e.g. Metadata_Site
    method: str = "mean"  # aggregation of cells: mean or median
    memory_limit: str = "2GB"  # DuckDB memory limit while aggregating (spills to disk beyond)
    threads: int = 0  # DuckDB threads (0 = all cores)
    nonfinite: str = "drop_feature"  # NaN/inf in profiles: drop_feature, drop_row or error
    controls: str = "Metadata_pert_type == 'control'"  # negative controls (pandas query; '' = none)
    normalize: str = "mad_robustize"  # standardize, mad_robustize, or none
    normalize_by: str = "Metadata_Plate"  # normalise within each value of this key ('' = global)
    normalize_reference: str = "controls"  # fit normalisation on: controls or all
    mad_epsilon: float = 1e-18  # added to the MAD (pycytominer's mad_robustize_epsilon)
    sphere: str = "none"  # sphering of controls: none, ZCA, PCA, ZCA-cor, PCA-cor
    sphere_epsilon: float = 1e-6  # regularisation added to singular values (as pycytominer)
    sphere_by: str = ""  # fit one sphering per value of this key, e.g. Metadata_Batch ('' = global)
    harmony_key: str = ""  # batch key for Harmony (harmonypy) correction ('' = skip)
    inverse_normal: bool = False  # rank-based inverse-normal transform of each feature
    select: tuple[str, ...] = ()  # selection: variance, frequency, correlation, drop_na, blocklist
    min_variance: float = 1e-6  # variance threshold (pycytominer min_variance)
    corr_threshold: float = 0.9  # correlation threshold (pycytominer corr_threshold)
    blocklist: tuple[str, ...] = ()  # feature names to drop with the blocklist operation
    consensus: tuple[str, ...] = ()  # keys of treatment-level consensus profiles ('' = skip)
    consensus_method: str = "median"  # consensus of replicate profiles: mean or median
    allow_partial: bool = False  # profile an unfinished extraction (recorded in the output)


@dataclass(frozen=True)
class EvaluateConfig:
    out_dir: str = "runs/eval"  # tables and summary.json
    seed: int = 0  # random seed for splits and permutations
    spec: str = ""  # evaluation spec YAML (feature sets, columns, analyses); --spec sets it
    null_size: int = 10000  # permutations in each mAP null distribution (copairs' null_size)
    threshold: float = 0.05  # significance level for BH-corrected mAP p-values
    map_method: str = (
        "auto"  # mAP backend: auto (copairs when small, else blocked), copairs, blocked
    )
    map_memory_mb: int = 256  # working memory of one block of queries in the blocked mAP
    resume: bool = True  # keep finished (feature set, analysis) parts of an earlier run


@dataclass(frozen=True)
class ReportConfig:
    out: str = "runs/report.html"  # the self-contained HTML report
    title: str = "celldino report"  # heading of the report


PIPELINE_STAGES = ("prepare", "train", "extract", "profile", "evaluate", "report")
BASELINES = ("engineered", "pca_engineered", "random_init")


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = (
        "runs/pipeline"  # run directory of `celldino run` / `demo` (every stage's outputs)
    )
    stages: tuple[str, ...] = PIPELINE_STAGES  # stages to run (prepare … report), in this order
    force: tuple[str, ...] = ()  # stages to redo even when their fingerprint matches (--force)
    baselines: tuple[str, ...] = BASELINES  # feature sets evaluated beside the learned embeddings
    eval_spec: str = ""  # evaluation spec YAML (empty = NSC, NSCB, mAP and kNN F1 on well profiles)


@dataclass(frozen=True)
class Config:
    synth: SynthConfig = field(default_factory=SynthConfig)  # the synthetic screen
    prepare: PrepareConfig = field(default_factory=PrepareConfig)  # images → cells and crops
    model: ModelConfig = field(default_factory=ModelConfig)  # vision transformer and DINO head
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # augmentations, multi-crop
    train: TrainConfig = field(default_factory=TrainConfig)  # self-supervised training
    extract: ExtractConfig = field(default_factory=ExtractConfig)  # checkpoint → embeddings
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # embeddings → profiles
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)  # profiles → metrics
    report: ReportConfig = field(default_factory=ReportConfig)  # metrics → report.html
    run: RunConfig = field(default_factory=RunConfig)  # the whole pipeline (`celldino run`, `demo`)


# --------------------------------------------------------------------------------------------
# Building from dicts, YAML and overrides
# --------------------------------------------------------------------------------------------


def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {_valid_keys(tp)}, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    valid = _valid_keys(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            at = where or "top level"
            raise ConfigError(
                f"unknown config key '{(where + '.' if where else '') + str(key)}' "
                f"(valid keys at {at}: {', '.join(valid)})"
            )
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_dotlist(overrides: list[str]) -> dict:
    """Turn ['train.epochs=3', 'model.arch=vit_small'] into a nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples as lists) suitable for YAML."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve the configuration: defaults ← YAML file ← dotlist overrides."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist (see configs/ for examples)")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of sections")
        data = loaded
    data = _merge(data, parse_dotlist(overrides or []))
    try:
        return _build(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def replace(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` with dotted keys: replace(cfg, **{'train.epochs': 3})."""
    nested: dict = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    direct = {}
    for head, value in nested.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(cfg, head, None)):
            direct[head] = replace(getattr(cfg, head), **value)
        else:
            direct[head] = value
    try:
        return dataclasses.replace(cfg, **direct)
    except TypeError as e:
        raise ConfigError(f"{e} (valid keys: {', '.join(_valid_keys(type(cfg)))})") from None


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    from celldino.io.files import atomic_write_text

    return atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """The one-line comment of each field, read from the class source.

    The comment may sit on any line of the field's statement (a formatter may wrap long ones).
    """
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    docs = {}
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            found = [comments[i] for i in lines if i in comments]
            if found:
                docs[node.target.id] = " ".join(found)
    return docs


def describe(cls: type, prefix: str) -> str:
    """Human-readable list of a section's keys, defaults and comments (for --help)."""
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):
            default = ",".join(map(str, default)) if default else "[]"
        lines.append(f"  {prefix}.{f.name}={default!s:<14} {docs.get(f.name, '')}")
    return "\n".join(lines)
