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
import math
import re
import string
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from celldino.errors import UserError
from celldino.names import component_problem


class ConfigError(UserError, ValueError):
    """A configuration file or override that does not fit the schema.

    `key` is the dotted setting it is about (when there is one) and `problem` the message
    without it, so that `load_config` can say where the value came from: the YAML file and
    line, or the command-line argument.
    """

    def __init__(self, message: str, *, key: str = "", problem: str = ""):
        super().__init__(message)
        self.key, self.problem = key, problem or message


def _key_error(key: str, problem: str) -> ConfigError:
    return ConfigError(f"{key}: {problem}", key=key, problem=problem)


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
    artefacts: tuple[str, ...] = ()  # artefact types to plant, with truth (empty = none)
    artefact_rate: float = 0.03  # fraction of sites given each type in synth.artefacts


@dataclass(frozen=True)
class PrepareConfig:
    load_data: str = ""  # load-data table (CSV/Parquet) in the CellProfiler convention
    image_dir: str = ""  # or: a folder of images matched by `pattern` (when load_data is empty)
    pattern: str = ""  # file-name regex with groups plate/well/site/channel, or opera_phenix, nf1
    channel_map: dict[str, str] = field(default_factory=dict)  # file channel → name: {'5': 'DNA'}
    plate: str = ""  # plate name for image_dir sets without a plate group (default: folder name)
    platemap: str = ""  # plate-map table (Metadata_Well [, Metadata_Plate], Metadata_*) joined in
    channels: tuple[str, ...] = ()  # channel order to use and record (empty = all, table order)
    out_dir: str = "runs/prep"  # prep folder: cells.parquet, crops.zarr, qc.parquet, ...
    illumination: bool = True  # CellProfiler-style illumination correction per plate and channel
    illum_filter: str = "polynomial"  # illumination fit: polynomial (quadratic), median, gaussian
    illum_size: int = 0  # background block side in px (0 = 2.5 nucleus diameters, <= side/8)
    illum_min_images: int = 10  # plates with fewer QC-passing images get no illumination correction
    illum_stability_test: bool = True  # apply a function only where two halves of the images agree
    normalization: str = "percentile_image"  # percentile_image, percentile_plate, divisor or none
    norm_percentiles: tuple[float, ...] = (1.0, 99.8)  # low/high percentiles for percentile_*
    norm_divisor: float = 65535.0  # divisor for normalization=divisor
    segmentation: str = "watershed"  # watershed (find nuclei and cells), masks, or locations
    nuclei_channel: str = "DNA"  # channel to find nuclei in
    cell_channel: str = ""  # cell-body channel for cell watershed (empty = expand nuclei)
    nuclei_method: str = "adaptive"  # adaptive (settings from the nucleus diameter) or fixed (0.2)
    nucleus_diameter: float = 0.0  # typical nucleus diameter in px (0 = estimate from each image)
    nuclei_declump: str = "shape"  # split nuclei by: shape, shape_intensity, intensity
    smooth_sigma: float = 0.0  # Gaussian smoothing (px) before thresholding (0 = diameter/30)
    nuclei_min_area: int = 0  # smallest nucleus kept, px (0 = disc of 0.3 x nucleus diameter)
    nuclei_max_area: int = 0  # largest nucleus kept, px (0 = disc of 3 x nucleus diameter)
    nuclei_min_distance: int = 0  # minimum distance between nucleus seeds, px (0 = diameter/3)
    exclude_border: bool = True  # drop nuclei touching the image edge (as CellProfiler does)
    cell_method: str = "propagation"  # cells on cell_channel: propagation (CellProfiler), watershed
    cell_regularization: float = 0.05  # propagation: weight of distance vs intensity (as CP)
    cell_expand: int = 0  # without a cell channel: grow nuclei by this many px (0 = diameter/2)
    mask_dir: str = ""  # folder of label masks (segmentation=masks)
    nuclei_masks: str = ""  # nuclei mask file name template, e.g. '{stem_DNA}_MaskNuclei.tiff'
    cell_masks: str = ""  # cell mask template; binary masks are split between the nuclei
    save_masks: bool = False  # save each site's nuclei and cell labels as masks/<site>_*.tiff
    save_outlines: bool = False  # save each site's outline overlay as outlines/<site>.png
    locations: str = ""  # cell-locations table (segmentation=locations), CSV or Parquet
    location_x: str = "Nuclei_Location_Center_X"  # x column (pixels) of the locations table
    location_y: str = "Nuclei_Location_Center_Y"  # y column (pixels) of the locations table
    crop_size: int = 96  # side of the square single-cell crops in pixels
    border: str = "pad"  # cells near the border: pad (with zeros) or drop
    mask_neighbours: bool = False  # zero pixels of other cells inside each crop
    qc_blur_z: float = -5.0  # flag blur when the robust z of the sharpness score is below this
    qc_max_saturation: float = 0.05  # flag when more than this fraction of pixels is saturated
    qc_min_foreground: float = 0.002  # flag empty when the DNA foreground fraction is below this
    qc_debris_area: float = 0.005  # flag debris when one very bright object covers this fraction
    qc_exclude: bool = True  # leave QC-flagged images out of the cells and crops
    on_error: str = "raise"  # bad image: raise, or skip (recorded in skipped.parquet)
    features: bool = True  # compute CellProfiler's per-cell measurements (engineered.parquet)
    feature_families: tuple[str, ...] = ("all",)  # measurement set: all, fast, or families
    feature_scale: float = 0.0  # divide intensities by this before measuring (0 = type max, 65535)
    workers: int = 1  # processes for segmentation, cropping and features
    parts: int = 0  # split the screen into this many parts, each its own job (docs/cluster.md)
    part: int = -1  # with parts: prepare only this part, 0 .. parts-1 (-1: plan/merge/all)
    parts_dir: str = ""  # folder of the parts' outputs (empty = <out_dir>/prepare_parts)
    scheduler: str = ""  # prepare-cluster: Dask scheduler address (empty = local, `workers`)
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
    threads: int = 0  # torch CPU threads (0 = auto: free cores per rank, or OMP_NUM_THREADS)
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
    centering: str = (
        "center"  # teacher centring: center (running mean, DINO) or sinkhorn_knopp (DINOv2)
    )
    clip_grad: float = 3.0  # clip the gradient norm to this value (0 = off)
    clip_mode: str = "global"  # clip_grad over all gradients together (global) or per_tensor (DINO)
    freeze_last_layer: int = 1  # epochs during which the head's last layer is not updated
    ibot_weight: float = 0.0  # weight of the iBOT masked patch-token loss (0 = plain DINO)
    ibot_mask_ratio: tuple[float, ...] = (0.1, 0.5)  # range of the masked fraction of patches
    ibot_mask_prob: float = 0.5  # fraction of global crops that get masked
    koleo_weight: float = 0.0  # weight of the KoLeo regulariser on class tokens (DINOv2: 0.1)
    weak_label: str = ""  # WS-DINO: metadata column of weak labels, e.g. Metadata_Compound
    monitor_label: str = ""  # label column (Metadata_MoA...): kNN/linear probe each epoch; '' = off
    monitor_cells: int = 2000  # cells in the probes' fixed stratified sample (train.monitor_label)
    amp: bool = True  # bf16 autocast on CUDA (always off on CPU)
    compile: bool = False  # torch.compile the backbones (GPU speed; minutes of compiling first)
    log_every: int = 10  # steps between diagnostics in metrics.jsonl and the log
    save_every: int = 1  # keep an epoch_NNNN checkpoint every this many epochs (0 = only last)
    diagnostics: bool = True  # prototype usage, entropies, rank, std; warns on collapse and more


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
    resize: int = 0  # cells resized to this side first: 0 = as stored, -1 = trained crop size
    dtype: str = "float32"  # embedding columns: float32 or float16
    batch_size: int = 128  # images per forward pass
    num_workers: int = 0  # DataLoader worker processes reading crops (0 = main process)
    threads: int = 0  # torch CPU threads (0 = auto: free cores per rank, or OMP_NUM_THREADS)
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
    features: tuple[str, ...] = ("infer",)  # column names or prefixes (a,b), or infer (see docs)
    by: tuple[str, ...] = ("Metadata_Plate", "Metadata_Well")  # keys of one aggregated profile
    via: tuple[str, ...] = ()  # intermediate level added to `by` first, e.g. Metadata_Site
    method: str = "mean"  # aggregation of cells: mean or median
    memory_limit: str = "2GB"  # DuckDB memory limit while aggregating (spills to disk beyond)
    threads: int = 0  # DuckDB threads (0 = all cores)
    nonfinite: str = "drop_feature"  # NaN/inf in profiles: drop_feature, drop_row or error
    controls: str = "Metadata_pert_type == 'control'"  # negative controls (selection; '' = none)
    recipe: str = "auto"  # preset filling unset steps: auto, cellprofiler, embeddings, none
    normalize: str = ""  # standardize, mad_robustize, none ('' = from profile.recipe)
    normalize_by: str = "Metadata_Plate"  # normalise within each value of this key ('' = global)
    normalize_reference: str = "controls"  # fit normalisation on: controls or all
    normalize_floor: float = -1.0  # scale >= this x feature spread (0 = pycytominer, <0 = recipe)
    normalize_floor_reference: str = ""  # floor relative to: all (wells), controls ('' = recipe)
    mad_epsilon: float = 1e-18  # added to the MAD when normalize_floor=0 (pycytominer's epsilon)
    clip: float = -1.0  # clip normalised values to ±clip (0 = off; <0 = from profile.recipe)
    select: tuple[str, ...] = ("recipe",)  # selection; recipe = the preset's (recipe,replicate)
    min_variance: float = 1e-6  # variance threshold (pycytominer min_variance)
    freq_cut: float = 0.05  # frequency: 2nd/1st most common value ratio (pycytominer freq_cut)
    unique_cut: float = 0.01  # frequency: unique values / profiles (pycytominer unique_cut)
    corr_threshold: float = 0.9  # correlation threshold (pycytominer corr_threshold)
    outlier_cutoff: float = 500.0  # drop_outliers: |normalised value| above which a feature goes
    blocklist: tuple[str, ...] = ()  # names for the blocklist operation ([] = pycytominer's list)
    replicate_key: tuple[str, ...] = ()  # replicate selection: columns equal within replicates
    replicate_threshold: float = 0.0  # replicate: keep features with replicate correlation above it
    sphere: str = ""  # sphering on the controls: none, ZCA, PCA, ZCA-cor, PCA-cor ('' = recipe)
    sphere_shrinkage: str = (
        ""  # oas, ledoit_wolf, ratio, cv, a number in [0, 1], none ('' = recipe)
    )
    sphere_components: int = -1  # whiten only the k leading control directions (0 = all; <0 recipe)
    sphere_epsilon: float = 1e-6  # added to singular values if sphere_shrinkage=none (pycytominer)
    sphere_by: str = ""  # one sphering per value of this key; global = one ('' = recipe)
    harmony_key: str = ""  # batch key for Harmony on principal components ('' = skip)
    harmony_pcs: int = 50  # principal components Harmony corrects (capped at profiles - 1)
    inverse_normal: bool = False  # rank-based inverse-normal transform of each feature (last)
    consensus: tuple[str, ...] = ()  # keys of treatment-level consensus profiles ('' = skip)
    consensus_method: str = "median"  # consensus of replicate profiles: mean or median
    allow_partial: bool = False  # profile an unfinished extraction (recorded in the output)
    fit_controls: str = "split"  # X on all controls + a layer on half (split), half, or all
    input_state: str = "auto"  # auto (detect already-normalised input), raw or normalized


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
    n_boot: int = 1000  # bootstrap resamples for the metrics' 95% intervals (0: no intervals)
    resume: bool = True  # keep finished (feature set, analysis) parts of an earlier run
    columns: dict[str, str] = field(default_factory=dict)  # column roles (win over the spec's)
    activity_negatives: str = "held_out"  # activity vs held_out controls (not fitted on) or all


@dataclass(frozen=True)
class QCConfig:
    prep: str = ""  # prepared folder (prepare.out_dir) whose fields learned QC scores
    checkpoint: str = "random"  # encoder: run dir, checkpoint, DINO/DINOv2 weights, or random
    which: str = "teacher"  # network of a two-network checkpoint: teacher or student
    detector: str = "outlier"  # outlier (no labels), fewshot (labelled fields) or both
    labels: str = ""  # table of Metadata_ImageKey, Metadata_QC_Label (empty = load-data column)
    outlier_z: float = 5.0  # flag learned_outlier above this outlier score (robust z per plate)
    fewshot_threshold: float = 0.5  # flag learned_fewshot above this artefact probability
    neighbours: int = 10  # outlier score: mean distance to this many nearest fields of the plate
    classical_features: bool = True  # append classical QC metrics and pixel noise to the embedding
    tile: int = 0  # tile side in px, resized to the model's input (0 = the model's input side)
    batch_size: int = 16  # tiles per forward pass
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    exclude: bool = False  # learned flags exclude images from prepare's cells (as classical QC)


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
    spread_checkpoints: int = 2  # epoch checkpoints before the last also evaluated (0 = off)


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
    qc: QCConfig = field(default_factory=QCConfig)  # learned artefact detection (`celldino qc`)
    report: ReportConfig = field(default_factory=ReportConfig)  # metrics → report.html
    run: RunConfig = field(default_factory=RunConfig)  # the whole pipeline (`celldino run`, `demo`)


# --------------------------------------------------------------------------------------------
# Valid values: checked when a config is loaded, listed by --help. The one place they live;
# the stages that consume a setting accept at least these (and check them again).
# --------------------------------------------------------------------------------------------

CHOICES: dict[str, tuple[str, ...]] = {
    "synth.preset": ("tiny", "demo", "custom"),
    "synth.artefacts": (  # celldino.synth.artefacts.PLANTERS
        "blur",
        "saturated",
        "debris",
        "debris_dim",
        "autofluorescence",
        "noise",
        "empty",
    ),
    "prepare.illum_filter": ("polynomial", "median", "gaussian"),
    "prepare.normalization": ("percentile_image", "percentile_plate", "divisor", "none"),
    "prepare.segmentation": ("watershed", "masks", "locations"),
    "prepare.nuclei_method": ("adaptive", "fixed"),
    "prepare.nuclei_declump": ("shape_intensity", "shape", "intensity"),
    "prepare.cell_method": ("propagation", "watershed"),
    "prepare.border": ("pad", "drop"),
    "prepare.on_error": ("raise", "skip"),
    # celldino.data.engineered.FEATURE_SETS and FAMILIES (tests/test_engineered.py checks)
    "prepare.feature_families": (
        "all",
        "fast",
        "shape_intensity",
        "AreaShape",
        "Intensity",
        "RadialDistribution",
        "Texture",
        "Granularity",
        "Correlation",
    ),
    "model.arch": ("vit_tiny", "vit_small", "vit_base", "vit_large"),
    "model.channel_mode": ("multichannel", "channelwise", "channel_adaptive"),
    "model.pretrained_which": ("teacher", "student"),
    "augment.padding_mode": ("reflection", "border", "zeros"),
    "extract.which": ("teacher", "student"),
    "extract.channel_mode": ("", "channelwise"),
    "extract.feature": ("cls", "last_blocks", "block", "patch_mean", "cls_patch_mean"),
    "extract.level": ("cell", "field"),
    "extract.field_mode": ("center4", "tile"),
    "extract.field_pool": ("mean", "median"),
    "extract.dtype": ("float32", "float16"),
    "extract.format": ("parquet", "h5ad"),
    "qc.which": ("teacher", "student"),
    "qc.detector": ("outlier", "fewshot", "both"),
    "profile.formats": ("h5ad", "parquet", "csv"),
    "profile.method": ("mean", "median"),
    "profile.nonfinite": ("drop_feature", "drop_row", "error"),
    "profile.recipe": ("auto", "cellprofiler", "embeddings", "none"),
    "profile.normalize": ("", "standardize", "mad_robustize", "none"),
    "profile.normalize_reference": ("controls", "all"),
    "profile.sphere": ("", "none", "ZCA", "PCA", "ZCA-cor", "PCA-cor"),
    "profile.select": (
        "recipe",
        "variance",
        "frequency",
        "correlation",
        "drop_na",
        "drop_outliers",
        "blocklist",
        "replicate",
    ),
    "profile.consensus_method": ("mean", "median"),
    "profile.fit_controls": ("split", "half", "all"),
    "profile.normalize_floor_reference": ("", "all", "controls"),
    "profile.input_state": ("auto", "raw", "normalized"),
    "train.centering": ("center", "sinkhorn_knopp"),
    "train.clip_mode": ("global", "per_tensor"),
    "evaluate.map_method": ("auto", "copairs", "blocked"),
    "evaluate.activity_negatives": ("held_out", "all"),
    "run.stages": PIPELINE_STAGES,
    "run.force": PIPELINE_STAGES,
    "run.baselines": BASELINES,
}
# For tuple settings the choices apply to each item.

_DEVICE = (r"auto|cpu|(cuda|mps|xpu)(:\d+)?", "auto, cpu, cuda, cuda:N (or mps, xpu)")
PATTERNS: dict[str, tuple[str, str]] = {
    "train.device": _DEVICE,
    "extract.device": _DEVICE,
    "qc.device": _DEVICE,
    "profile.sphere_shrinkage": (
        r"|oas|ledoit_wolf|ratio|cv|none|[01]|0?\.\d+|1\.0*",
        "oas, ledoit_wolf, ratio, cv, none, a number in [0, 1], or '' (from profile.recipe)",
    ),
    "profile.memory_limit": (
        r"(?i)\d+(\.\d+)?\s*([KMGT]i?B|B)",
        "a size such as 2GB, 500MB or 1.5GiB",
    ),
}


@dataclass(frozen=True)
class Range:
    """Numeric bounds of a setting (for tuples: of each item, and `pair` = [min, max])."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    pair: bool = False

    def problem(self, value: Any) -> str | None:
        items = list(value) if isinstance(value, tuple) else [value]
        if self.pair and (len(items) != 2 or items[0] > items[1]):
            return f"expected [min, max] with min <= max{self._text(' and each ')}, got {items}"
        for v in items:
            if self.low is not None and (v <= self.low if self.low_open else v < self.low):
                return f"{self._text()[1:]}, got {_show(value)}"
            if self.high is not None and v > self.high:
                return f"{self._text()[1:]}, got {_show(value)}"
        return None

    def _text(self, lead: str = " ") -> str:
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f"<= {self.high:g}"
        if lo and hi:
            return f"{lead}must be {lo} and {hi}" if lead == " " else f"{lead}{lo}, {hi}"
        return f"{lead}must be {lo or hi}" if lead == " " else f"{lead}{lo or hi}"


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


_POSITIVE, _COUNT = Range(1), Range(0)
_PROB, _FRACTION = Range(0.0, 1.0), Range(0.0, 1.0)
RANGES: dict[str, Range] = {
    **{f"{s}.seed": _COUNT for s in ("synth", "prepare", "train", "evaluate")},
    **{
        f"synth.{k}": _COUNT
        for k in (
            "n_plates",
            "n_batches",
            "compounds_per_moa",
            "n_doses",
            "wells_per_compound",
            "control_wells",
            "sites_per_well",
            "cells_per_site",
        )
    },
    # a field's pixels are drawn in memory, several float planes per channel: 4096 px is ~1 GB
    # with 5 channels; 100000 px asked for hundreds of GB before failing (0 = the preset's)
    "synth.image_size": Range(0, 4096),
    "synth.n_moas": Range(0, 6),
    "synth.n_bad_images": Range(-1),
    "synth.artefact_rate": Range(0.0, 0.5),
    "prepare.illum_size": _COUNT,
    "prepare.illum_min_images": _COUNT,
    "prepare.norm_percentiles": Range(0.0, 100.0, pair=True),
    "prepare.norm_divisor": Range(0.0, low_open=True),
    "prepare.smooth_sigma": Range(0.0),
    "prepare.nuclei_min_area": _COUNT,
    "prepare.nuclei_max_area": _COUNT,
    "prepare.nuclei_min_distance": _COUNT,
    "prepare.nucleus_diameter": Range(0.0),
    "prepare.cell_regularization": Range(0.0),
    "prepare.cell_expand": _COUNT,
    "prepare.crop_size": _POSITIVE,
    "prepare.qc_max_saturation": _FRACTION,
    "prepare.qc_min_foreground": _FRACTION,
    "prepare.qc_debris_area": _FRACTION,
    "prepare.workers": _POSITIVE,
    "prepare.feature_scale": Range(0.0),
    "model.patch_size": _POSITIVE,
    "model.depth": _COUNT,
    "model.in_chans": _POSITIVE,
    "model.backbone_chans": _POSITIVE,
    "model.img_size": _POSITIVE,
    "model.num_registers": _COUNT,
    "model.layerscale": Range(0.0),
    "model.drop_path_rate": Range(0.0, 1.0),
    "model.out_dim": _POSITIVE,
    "model.head_hidden_dim": _POSITIVE,
    "model.head_bottleneck_dim": _POSITIVE,
    "model.head_nlayers": _POSITIVE,
    # the same bounds as augment.check_config, so a config that loads also augments
    "augment.global_crop_size": _POSITIVE,
    "augment.local_crop_size": _POSITIVE,
    "augment.global_crop_scale": Range(1e-6, 1.0, pair=True),
    "augment.local_crop_scale": Range(1e-6, 1.0, pair=True),
    "augment.n_local_crops": _COUNT,
    "augment.crop_ratio": Range(1e-3, 1e3, pair=True),
    "augment.affine_scale": Range(1e-3, 1e3, pair=True),
    "augment.affine_degrees": Range(0.0),
    "augment.affine_shear": Range(0.0),
    "augment.affine_translate": Range(0.0),
    "augment.elastic_alpha": Range(0.0),
    "augment.elastic_grid": Range(2),
    "augment.brightness": _FRACTION,
    "augment.contrast": _FRACTION,
    "augment.protein_channel": Range(-1),
    "augment.protein_rescale": Range(0.0, 1e6, pair=True),
    "augment.blur_sigma": Range(0.0, 1e3, pair=True),
    **{
        f"augment.{k}": _PROB
        for k in (
            "hflip_p",
            "vflip_p",
            "affine_p",
            "elastic_p",
            "brightness_p",
            "contrast_p",
            "channel_drop_p",
            "protein_rescale_p",
            "blur_p",
            "solarize_p",
            "greyscale_p",
        )
    },
    "train.epochs": _POSITIVE,
    "train.batch_size": _POSITIVE,
    "train.num_workers": _COUNT,
    "train.monitor_cells": _POSITIVE,
    "train.threads": _COUNT,
    "train.lr": Range(0.0),
    "train.min_lr": Range(0.0),
    "train.warmup_epochs": Range(0.0),
    "train.weight_decay": Range(0.0),
    "train.weight_decay_end": Range(0.0),
    "train.momentum_teacher": _FRACTION,
    "train.teacher_temp": Range(0.0, low_open=True),
    "train.warmup_teacher_temp": Range(0.0, low_open=True),
    "train.warmup_teacher_temp_epochs": Range(0.0),
    "train.student_temp": Range(0.0, low_open=True),
    "train.center_momentum": _FRACTION,
    "train.clip_grad": Range(0.0),
    "train.freeze_last_layer": _COUNT,
    "train.ibot_weight": Range(0.0),
    "train.ibot_mask_ratio": Range(0.0, 1.0, pair=True),
    "train.ibot_mask_prob": _PROB,
    "train.koleo_weight": Range(0.0),
    "train.log_every": _POSITIVE,
    "train.save_every": _COUNT,
    "extract.n_blocks": _POSITIVE,
    "extract.field_crop": _POSITIVE,
    "extract.field_stride": _COUNT,
    "extract.batch_size": _POSITIVE,
    "extract.num_workers": _COUNT,
    "extract.threads": _COUNT,
    "extract.resize": Range(-1.0),
    "extract.shard_size": _POSITIVE,
    "extract.attention_sample": _COUNT,
    "qc.fewshot_threshold": Range(0.0, 1.0, low_open=True),
    "qc.neighbours": _POSITIVE,
    "qc.tile": _COUNT,
    "qc.batch_size": _POSITIVE,
    "profile.threads": _COUNT,
    "profile.mad_epsilon": Range(0.0),
    "profile.sphere_epsilon": Range(0.0),
    "profile.min_variance": Range(0.0),
    "profile.corr_threshold": _FRACTION,
    "profile.normalize_floor": Range(None, 1.0),
    "profile.freq_cut": _FRACTION,
    "profile.unique_cut": _FRACTION,
    "profile.outlier_cutoff": Range(0.0, low_open=True),
    "profile.replicate_threshold": Range(-1.0, 1.0),
    "profile.harmony_pcs": _POSITIVE,
    "evaluate.null_size": _POSITIVE,
    "evaluate.threshold": Range(0.0, 1.0, low_open=True),
    "evaluate.map_memory_mb": _POSITIVE,
    "evaluate.n_boot": _COUNT,
}
# Mapping settings and the keys they take (`evaluate.columns.moa=Metadata_moa`).
# EVAL_COLUMN_ROLES are the fields of `celldino.eval.spec.Columns` (a test keeps them equal).
EVAL_COLUMN_ROLES = (
    "compound",
    "dose",
    "moa",
    "batch",
    "plate",
    "well",
    "control",
    "control_value",
    "moa_sep",
)
KEYS: dict[str, tuple[str, ...]] = {"evaluate.columns": EVAL_COLUMN_ROLES}
# Settings that must not be empty (an empty list would silently do nothing).
NON_EMPTY = (
    "profile.formats",
    "profile.by",
    "profile.input",
    "run.stages",
    "prepare.feature_families",
)
# List settings whose items must be distinct (a channel named twice is fed twice, another dropped).
UNIQUE = (
    "synth.artefacts",
    "prepare.channels",
    "train.channels",
    "extract.channels",
    "profile.by",  # a key named twice: a pandas traceback in aggregation (issue 22 sweep)
    "profile.via",
    "profile.consensus",
)


def check(cfg: Config) -> list[tuple[str, str]]:
    """Every (dotted key, problem) of a config's values against CHOICES, PATTERNS, RANGES."""
    problems = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            key, value = f"{section.name}.{f.name}", getattr(sub, f.name)
            problem = _check_value(key, value)
            if problem:
                problems.append((key, problem))
            for k in value if key in KEYS else ():
                if k not in KEYS[key]:
                    valid = ", ".join(KEYS[key])
                    problems.append((f"{key}.{k}", f"unknown key {k!r}; valid keys: {valid}"))
    for name in cfg.synth.channels:  # channel names become file names (celldino.names)
        problem = component_problem(name)
        if problem:
            problems.append(("synth.channels", f"{problem}; it becomes a file name: rename it"))
    if cfg.synth.artefact_rate != SynthConfig.artefact_rate and not cfg.synth.artefacts:
        problems.append(  # a rate without types would plant nothing, silently
            ("synth.artefact_rate", "is set but synth.artefacts is empty: name the types to plant")
        )
    for key in ("prepare.nuclei_masks", "prepare.cell_masks"):
        problem = name_template_problem(getattr(cfg.prepare, key.split(".")[1]))
        if problem:
            problems.append((key, problem))
    if cfg.profile.controls.strip():  # text in celldino.query's grammar, never Python
        from celldino.query import QueryError, parse

        try:
            parse(cfg.profile.controls, "profile.controls")
        except QueryError as e:
            problems.append(("profile.controls", str(e).removeprefix("profile.controls: ")))
    m, p = cfg.model, cfg.prepare
    if m.patch_size >= 1 and m.img_size % m.patch_size:
        problems.append(
            ("model.img_size", f"{m.img_size} is not a multiple of model.patch_size={m.patch_size}")
        )
    if p.nuclei_max_area and p.nuclei_min_area > p.nuclei_max_area:
        problems.append(
            (
                "prepare.nuclei_min_area",
                f"{p.nuclei_min_area} is above prepare.nuclei_max_area={p.nuclei_max_area}",
            )
        )
    return problems


def name_template_problem(template: str) -> str | None:
    """Why a mask file name template is not valid, or None. Its fields are plain names (a column
    of the image table, or stem_<channel>): no position ({0}), attribute ({x.real}), index
    ({x[0]}), conversion ({x!r}) or format ({x:03d}) - each read a value's Python internals or
    raise when the template is filled in, image by image."""
    fix = "write each field as {column} or {stem_<channel>}, a literal brace as {{ or }}"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"{template!r} is not a valid name template ({e}): {fix}"
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        whole = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
        whole += "}"
        if not name.strip() or name.isdigit():
            return f"{whole} in {template!r} is a field by position, not by name: {fix}"
        if "." in name or "[" in name or conversion or spec:
            return f"{whole} in {template!r} is not a plain field name: {fix}"
    return None


def _check_value(key: str, value: Any) -> str | None:
    if key in NON_EMPTY and not value:
        return "must not be empty"
    if key in UNIQUE and isinstance(value, (tuple, list)):
        repeated = [v for i, v in enumerate(value) if v in value[:i]]
        if repeated:
            what = ", ".join(map(repr, dict.fromkeys(repeated)))
            each = "channel" if key.endswith(".channels") else "column"
            return f"{what} named more than once in {list(value)}: list each {each} once"
    if key in CHOICES:
        valid = CHOICES[key]
        items = value if isinstance(value, tuple) else (value,)
        bad = [v for v in items if v not in valid]
        if bad:
            shown = ", ".join(v if v else "'' (empty)" for v in valid)
            what = " and ".join(map(repr, bad))
            return f"{what} {'is' if len(bad) == 1 else 'are'} not valid; choose from: {shown}"
    if key in PATTERNS:
        pattern, text = PATTERNS[key]
        if not re.fullmatch(pattern, str(value)):
            return f"{value!r} is not a valid value; choose from: {text}"
    if key in RANGES:
        return RANGES[key].problem(value)
    return None


# --------------------------------------------------------------------------------------------
# Building from dicts, YAML and overrides
# --------------------------------------------------------------------------------------------


def yaml_key_lines(
    node: Any, where: str, error: type[Exception], prefix: str = "", lines: dict | None = None
) -> dict[str, int]:
    """The line of every key (dotted path; list items as their index) of a composed YAML
    node. A key given twice in one mapping, which YAML keeps the last of silently, raises
    `error` naming `where` and both lines (the config loader's and the evaluation spec's)."""
    lines = {} if lines is None else lines
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yaml_key_lines(item, where, error, f"{prefix}{i}.", lines)
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            if key in lines:
                raise error(
                    f"{where}, line {k.start_mark.line + 1}: '{key}' is set twice (also on line "
                    f"{lines[key]}); keep one"
                )
            lines[key] = k.start_mark.line + 1
            yaml_key_lines(v, where, error, key + ".", lines)
    return lines


def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _number(value: Any, where: str, what: str) -> float | int:
    """A YAML value as a number: numbers as they are, strings such as '1e-6' parsed."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _key_error(where, f"expected {what}, got {value!r}")
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise _key_error(where, f"expected {what}, got {value!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise _key_error(where, f"expected {what} (finite), got {value!r}")
    return value


def _split_list(text: str) -> list[str]:
    """'a,b' → ['a', 'b'] ('' → []): a list written the way --help prints it."""
    return [s.strip() for s in text.split(",") if s.strip()]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _key_error(where, f"expected a mapping of {_valid_keys(tp)}, got {value!r}")
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
        raise _key_error(where, f"{value!r} fits none of {tp}")
    if origin is tuple:
        if isinstance(value, str):
            value = _split_list(value)
        elif value is None:
            value = []
        elif not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        if inner is str:  # a list of names: an unquoted NO is not the name 'False'
            for i, v in enumerate(value):
                _refuse_non_name(v, f"{where}[{i}]", numbers=True)
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _key_error(where, f"expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _key_error(where, f"expected a mapping such as {{a: b}}, got {value!r}")
        kt, vt = args if len(args) == 2 else (Any, Any)
        for k, v in value.items():  # keys may be numbers ({5: DNA}: file channel 5); the
            if kt is str:  # values are names (channels, columns), but for a control's value
                _refuse_non_name(k, f"{where}[{k!r}]", numbers=False)
            if vt is str:
                name = k not in ("control_value", "moa_sep")
                _refuse_non_name(v, f"{where}[{k!r}]", numbers=name)
        return {
            _coerce(k, kt, f"{where}[{k!r}]"): _coerce(v, vt, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _key_error(where, f"expected true or false, got {value!r}")
    if tp is int:
        number = _number(value, where, "an integer")
        if isinstance(number, float):
            if not number.is_integer():
                raise _key_error(where, f"expected an integer, got {value!r}")
            return int(number)
        return number
    if tp is float:
        return float(_number(value, where, "a number"))
    if tp is str:
        if value is None:
            return ""
        _refuse_non_name(value, where, numbers=where in NAME_SETTINGS)
        if isinstance(value, (dict, list)):
            raise _key_error(where, f"expected a string, got {value!r}")
        return str(value)
    return value


# Text settings that hold one name (a column, channel or plate): a YAML number there is refused
# as in name lists (`plate: 000123` is the octal 83 to YAML 1.1, `1.10` is 1.1).
NAME_SETTINGS = (
    "prepare.plate",
    "prepare.nuclei_channel",
    "prepare.cell_channel",
    "prepare.location_x",
    "prepare.location_y",
    "train.weak_label",
    "train.monitor_label",
    "profile.normalize_by",
    "profile.sphere_by",
    "profile.harmony_key",
)


def _refuse_non_name(value: Any, where: str, *, numbers: bool) -> None:
    """Refuse a YAML boolean where text is expected, and a YAML number where a name is (YAML 1.1
    reads unquoted NO, off, yes as booleans and 000123 as the octal 83: the text written cannot
    be recovered from the value, so it is never guessed back)."""
    if isinstance(value, bool):
        raise _key_error(
            where,
            f"YAML read this as the boolean {value} (unquoted yes/no/on/off/true/false are "
            "booleans in YAML 1.1), not as text; quote it as written, e.g. 'NO'",
        )
    if numbers and isinstance(value, (int, float)):
        raise _key_error(
            where,
            f"YAML read this name as the number {value!r}, which may not be the text written "
            "(000123 is 83, 1.10 is 1.1); quote it as written, e.g. '000123'",
        )


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    valid = _valid_keys(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise _unknown_key(f"{where}.{key}" if where else str(key), where, valid)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _unknown_key(key: str, where: str, valid: list[str]) -> ConfigError:
    problem = (
        f"unknown config key '{key}' (valid keys at {where or 'top level'}: {', '.join(valid)})"
    )
    return ConfigError(problem, key=key, problem=problem)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _setting_type(key: str) -> Any:
    """The annotated type of a dotted key ('train.lr' → float), or ConfigError if unknown.
    Below a mapping setting the rest of the key is one of its keys: 'evaluate.columns.moa' →
    str (the mapping's value type)."""
    tp: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if typing.get_origin(tp) is dict:
            return typing.get_args(tp)[1] if typing.get_args(tp) else Any
        if not dataclasses.is_dataclass(tp):
            raise _key_error(where, f"is a setting, not a section: write {where}=VALUE")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise _unknown_key(key, where, _valid_keys(tp))
        tp = hints[part]
    return tp


def _unquote(text: str) -> str:
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        try:
            out = yaml.safe_load(t)
            return "" if out is None else str(out)
        except yaml.YAMLError:
            return t[1:-1]
    return t


def _yaml_value(raw: str, what: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = f"not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})"
        raise ConfigError(f"{what}: {problem}", problem=problem) from None


def _override_value(raw: str, tp: Any, item: str) -> Any:
    """A command-line value read for the type of its setting.

    Strings are taken as written (`profile.controls=Metadata_x == 'a'`, `report.title=A: B`),
    lists may be `a,b` as --help prints them or `[a, b]`, numbers may be `1e-6`.
    """
    origin = typing.get_origin(tp)
    if tp is str:
        return _unquote(raw)
    if origin is tuple:
        text = raw.strip()
        if text.startswith("["):
            return _yaml_value(text, f"command-line override {item}")
        return [_unquote(s) for s in _split_list(text)]
    if raw == "":
        return ""
    return _yaml_value(raw, f"command-line override {item}")


def _split_key(key: str) -> list[str]:
    """A dotted key's parts, the rest kept whole below a mapping setting ('prepare.channel_map.
    ch.5' → ['prepare', 'channel_map', 'ch.5'])."""
    parts = key.split(".")
    tp: Any = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            break
        tp = typing.get_type_hints(tp).get(part)
        if typing.get_origin(tp) is dict and i + 1 < len(parts):
            return parts[: i + 1] + [".".join(parts[i + 1 :])]
    return parts


def parse_dotlist(overrides: list[str]) -> dict:
    """Turn ['train.epochs=3', 'model.arch=vit_small'] into a nested dict of typed values.

    Errors name the command-line argument. Values are read for their setting's type (see
    `_override_value`); the result still goes through `_build` for the final checks.
    """
    out: dict = {}
    for item in overrides:
        where = f"command-line override {item}"
        if "=" not in item:
            raise ConfigError(f"{where}: not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{where}: the key is empty (expected key.sub=value)")
        try:
            tp = _setting_type(key)
            value = _coerce(_override_value(raw, tp, item), tp, key)
        except ConfigError as e:
            if e.problem.startswith(where):
                raise
            raise ConfigError(f"{where}: {e.problem}", key=key, problem=e.problem) from None
        node = out
        parts = _split_key(key)
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: conflicts with an earlier override")
        node[parts[-1]] = to_dict(value) if dataclasses.is_dataclass(value) else value
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


def _read_yaml(p: Path) -> tuple[dict, dict[str, int]]:
    """(data, dotted key → line) of a YAML config; errors name the file (and line)."""
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist (see configs/ for examples)")
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder, not a YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        loaded = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = e.problem or e.context or "cannot be parsed"
        if e.context and e.problem:
            started = f" on line {e.context_mark.line + 1}" if e.context_mark else ""
            what += f" ({e.context}{started})"
        raise ConfigError(f"config file {p}{at}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p}: not valid YAML: {e}") from None
    if loaded is None:
        return {}, {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {p}: the top level must be a mapping of sections "
            f"({', '.join(_valid_keys(Config))}), not a {type(loaded).__name__}"
        )
    return loaded, yaml_key_lines(root, f"config file {p}", ConfigError)


def _innermost(table: dict[str, Any], key: str) -> Any:
    """The entry of `table` for the longest dotted prefix of `key` ('a.b[2]' → 'a.b', 'a')."""
    parts = re.sub(r"\[.*$", "", key).split(".")
    for n in range(len(parts), 0, -1):
        found = table.get(".".join(parts[:n]))
        if found:
            return found
    return None


def _in_file(p: Path, lines: dict[str, int], key: str) -> str:
    """'config file F, line N' for the innermost key of the file that `key` falls under."""
    line = _innermost(lines, key)
    return f"config file {p}, line {line}" if line else ""  # not in the file: a default


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve the configuration: defaults ← YAML file ← dotlist overrides.

    Every error is a ConfigError naming where the value came from: the YAML file and line,
    or the command-line argument. Values are checked against CHOICES, PATTERNS and RANGES.
    """
    data: dict = {}
    lines: dict[str, int] = {}
    p = Path(path) if path else None
    if p is not None:
        data, lines = _read_yaml(p)
    from_cli: dict[str, str] = {}  # dotted key → the argument that set it
    for item in overrides or []:
        update = parse_dotlist([item])
        data = _merge(data, update)
        from_cli[item.split("=", 1)[0].strip()] = item

    def origin(key: str) -> str:
        if item := _innermost(from_cli, key):
            return f"command-line override {item}"
        return _in_file(p, lines, key) if p is not None else ""

    try:
        cfg = _build(Config, data)
    except ConfigError as e:
        where = (origin(e.key) if e.key else "") or (f"config file {p}" if p else "")
        if where.startswith("command-line"):
            raise ConfigError(f"{where}: {e.problem}", key=e.key, problem=e.problem) from None
        msg = f"{where}: {e}" if where else str(e)
        raise ConfigError(msg, key=e.key, problem=e.problem) from None
    problems = check(cfg)
    if problems:
        parts = []
        for key, problem in problems:
            where = origin(key)
            if where.startswith("command-line"):
                parts.append(f"{where}: {problem}")
            else:
                parts.append(f"{where}: {key}: {problem}" if where else f"{key}: {problem}")
        key, problem = problems[0]
        raise ConfigError("; ".join(parts), key=key, problem=problem)
    return cfg


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


def default_text(value: Any) -> str:
    """A value the way --help prints it, and the way a command line gives it back."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "[]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    if value == "":
        return "''"
    return str(value)


def describe(cls: type, prefix: str) -> str:
    """Human-readable list of a section's keys, defaults and comments (for --help)."""
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        key = f"{prefix}.{f.name}"
        text = docs.get(f.name, "")
        if key in CHOICES:
            valid = ", ".join(v or "''" for v in CHOICES[key])
            text += f" [{'each ' if isinstance(default, tuple) else ''}one of: {valid}]"
        elif key in PATTERNS:
            text += f" [one of: {PATTERNS[key][1]}]"
        rows.append((f"{key}={default_text(default)}", text))
    width = min(max(len(entry) for entry, _ in rows), 40)
    return "\n".join(f"  {entry:<{width}}  {text}" for entry, text in rows)
