"""`celldino run` and `celldino demo`: prepare → train → extract → profile → evaluate → report.

Every stage writes into one run directory (see `celldino.io.runlayout`) and records a fingerprint
of what it was made from (its config sections and the fingerprint of the stage before it) in
`pipeline.json`. A rerun skips a stage whose fingerprint matches and whose outputs exist, redoes
it when its inputs changed, and redoes it on request (`run.force`). The stages themselves resume
half-finished work (prepare and extract per site/shard, train from its last checkpoint). A failure
names the stage and leaves every earlier stage's outputs as they were.

The learned embeddings are always evaluated beside the baselines in `run.baselines`:
`engineered` (CellProfiler's measurements from prepare), `pca_engineered` (PCA of those, fitted by
the evaluation) and `random_init` (the same architecture with random weights).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import celldino
from celldino import log
from celldino.config import Config, ConfigError, ProfileConfig, replace, to_dict
from celldino.errors import DataError, OutputError, UserError
from celldino.io import provenance
from celldino.io.configfile import save_config
from celldino.io.embeddings import manifest_path, read_manifest
from celldino.io.files import fingerprint, read_json, write_json
from celldino.io.lock import output_lock
from celldino.io.runlayout import STAGES, RunLayout

logger = log.get_logger(__name__)


class StageError(RuntimeError):
    """A stage failed; earlier stages' outputs are intact and a rerun resumes from this stage.

    `__cause__` is the original exception: a `UserError` (the CLI prints one line) or a bug
    (the CLI shows its traceback).
    """


# Config sections each stage reads (its fingerprint covers them).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("prepare",),
    "train": ("model", "augment", "train"),
    "extract": ("extract",),
    "profile": ("profile",),
    "evaluate": ("evaluate",),
    "report": ("report",),
}

# Evaluation used when run.eval_spec is empty: the analyses of the Cell-DINO/WS-DINO papers that
# read well profiles (NSC, NSCB, replicate and MoA mAP, kNN macro-F1 split by plate), the
# plate-vs-treatment check, Mantel against the engineered features and attention-channel IoU;
# and the single-cell probes of DINO / Cell-DINO (linear and weighted 20-NN, by plate).
RUN_ANALYSES = {
    "nsc": {},
    "map_replicate": {},
    "map_moa": {},
    "classify": {"classifiers": ["knn"], "ks": [1, 5], "split_by": "Metadata_Plate"},
    "plate_effect": {},  # the report warns when profiles separate by plate more than treatment
    "mantel": {},  # each set vs the engineered features (skipped without them)
    "attention_iou": {},  # heads vs channels, from attention.zarr (skipped without one)
    "cell_probe": {},  # single cells of learned, random_init, engineered (the same cells)
}


def _stage_configs(cfg: Config, lay: RunLayout) -> Config:
    """The config with every stage's paths pointed into the run directory."""
    return replace(
        cfg,
        **{
            "prepare.out_dir": str(lay.prep),
            "train.run_dir": str(lay.train),
            "train.data": str(lay.prep),
            "extract.data": str(lay.prep),
            "extract.checkpoint": str(lay.train),
            "extract.out_dir": str(lay.embeddings("learned")),
            "evaluate.out_dir": str(lay.eval),
            "report.out": str(lay.report),
        },
    )


def _random_init_checkpoint(cfg: Config, lay: RunLayout) -> Path:
    """A celldino-layout checkpoint of the untrained backbone (the random-init baseline), with
    the learned model's channel order, so both are extracted from the same channels."""
    import torch

    from celldino.io.checkpoints import TRAIN_CROP_SIZE, checkpoint_channels, write_safetensors
    from celldino.models import build_model

    path = lay.random_init_checkpoint
    torch.manual_seed(cfg.train.seed)
    model_cfg = dataclasses.replace(cfg.model, pretrained="")
    backbone = build_model(model_cfg)
    tensors = {
        f"teacher.backbone.{k}": v.detach().contiguous() for k, v in backbone.state_dict().items()
    }
    metadata = {
        "model_config": dataclasses.asdict(model_cfg),
        "format": "celldino-random-init",
        # embedded at the learned model's input size: the same cells on the same grid
        TRAIN_CROP_SIZE: str(cfg.augment.global_crop_size),
    }
    learned = lay.checkpoint
    channels = checkpoint_channels(learned) if learned.exists() else list(cfg.train.channels)
    return write_safetensors(path, tensors, metadata, channels=channels or None)


def _feature_sets(cfg: Config) -> list[str]:
    return ["learned"] + [b for b in cfg.run.baselines if b in ("engineered", "random_init")]


# ---- stages ---------------------------------------------------------------------------------


def stage_prepare(cfg: Config, lay: RunLayout, *, resume: bool) -> None:
    from celldino.data.prepare import prepare

    if resume or not lay.prep.exists():
        prepare(cfg.prepare)
        return
    # other settings or inputs: the crop store refuses to mix, so prepare starts a new folder;
    # the finished one is set aside until the new one is done and put back if prepare fails
    # (a missing image must not cost the prep that was there). Interrupted, the new one stays
    # (the rerun resumes it) and the old one goes.
    old = lay.prep.with_name(lay.prep.name + ".replaced")
    shutil.rmtree(old, ignore_errors=True)
    lay.prep.rename(old)
    try:
        prepare(cfg.prepare)
    except Exception:
        shutil.rmtree(lay.prep, ignore_errors=True)
        old.rename(lay.prep)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def stage_train(cfg: Config, lay: RunLayout, *, resume: bool) -> None:
    from celldino.train.checkpoint import has_checkpoint
    from celldino.train.loop import train

    # changed, forced or upstream redone, or interrupted before a resumable checkpoint (weights
    # and training state) was saved: this run's own train folder starts again from scratch
    resume = resume and has_checkpoint(lay.train)
    if not resume:
        shutil.rmtree(lay.train, ignore_errors=True)
    train(cfg, resume=resume)


def _extract(cfg: Config, **settings) -> None:
    """Extraction into the run folder (a finished folder of the same identity is kept, one of
    another checkpoint or options replaced); `settings` override `extract.*`."""
    from celldino.extract import extract

    extract(dataclasses.replace(cfg.extract, overwrite=True, **settings))


def stage_extract(cfg: Config, lay: RunLayout, *, resume: bool) -> None:
    _extract(cfg)
    if "random_init" in cfg.run.baselines:
        _extract(
            cfg,
            checkpoint=str(_random_init_checkpoint(cfg, lay)),
            out_dir=str(lay.embeddings("random_init")),
        )


def stage_profile(cfg: Config, lay: RunLayout, *, resume: bool) -> None:
    inputs = {
        "learned": (str(lay.embeddings("learned")), "emb_"),
        "random_init": (str(lay.embeddings("random_init")), "emb_"),
        # CellProfiler's measurements under CellProfiler's names (data/engineered.py)
        "engineered": (str(lay.engineered), ("Nuclei_", "Cells_", "Cytoplasm_")),
    }
    for i, name in enumerate(_feature_sets(cfg)):
        _profile(cfg, lay, name, *inputs[name], warn=i == 0)


def _profile(cfg: Config, lay: RunLayout, name: str, path: str, prefix, warn=False) -> None:
    """Well profiles of one feature set (`profiles/<name>.h5ad` + .parquet) with the run's
    `profile` settings: every set of a run, epoch checkpoints included, is profiled alike."""
    from celldino.pp.recipe import run_profile

    run_profile(
        dataclasses.replace(
            _profile_controls(cfg, lay, warn=warn),
            input=(path,),
            features=prefix,
            out=str(lay.profiles(name)),
            formats=tuple(dict.fromkeys(("h5ad", "parquet", *cfg.profile.formats))),
        )
    )


def _profile_controls(cfg: Config, lay: RunLayout, *, warn: bool = False):
    """cfg.profile, or, when profile.controls is the default query and the prepared cells lack
    its column (a screen without control annotation), the same settings with no controls and
    normalisation fitted on every well of each plate (profile.normalize_reference=all), with a
    warning: refusing would cost the user the run for a default they never chose."""
    import pyarrow.parquet as pq

    p = cfg.profile
    if p.controls != DEFAULT_CONTROLS or not lay.cells.exists():
        return p
    columns = set(pq.read_schema(lay.cells).names)
    missing = sorted(_query_columns(p.controls) - columns)
    if not missing:
        return p
    (logger.warning if warn else logger.debug)(
        "profile.controls is the default (%s) but the prepared cells have no %s column: no "
        "negative controls, so each plate is normalised against all its wells "
        "(profile.normalize_reference=all) and nothing is fitted on controls; name the controls "
        "with profile.controls=<query> to normalise against them",
        p.controls,
        ", ".join(missing),
    )
    return dataclasses.replace(p, controls="", normalize_reference="all")


def eval_spec(cfg: Config, lay: RunLayout) -> dict:
    """The evaluation spec: the user's (run.eval_spec) or the default, with the run's inputs.

    The user's spec is read by the evaluation's own reader, and its relative `inputs` are made
    absolute from the spec's folder (as `celldino evaluate --spec` reads them), since the spec
    travels on as a dict.
    """
    from celldino.eval.runner import load_spec

    spec, base = load_spec(cfg.run.eval_spec or None)
    spec["inputs"] = {
        name: str(p if Path(p).is_absolute() else base / p)
        for name, p in (spec.get("inputs") or {}).items()
    }
    for name in _feature_sets(cfg):
        spec["inputs"].setdefault(name, str(lay.profiles(name).with_suffix(".parquet")))
    if "engineered" in spec["inputs"] and "pca_engineered" in cfg.run.baselines:
        spec.setdefault("derived", {}).setdefault(
            "pca_engineered", {"pca": "engineered", "n_components": 50}
        )
    spec.setdefault("analyses", dict(RUN_ANALYSES))
    return spec


def stage_evaluate(cfg: Config, lay: RunLayout, *, resume: bool) -> None:
    from celldino.eval.runner import evaluate

    # an unlabelled or one-plate screen may allow no analysis: the report still comes, listing
    # each skipped one and why
    evaluate(None, spec=eval_spec(cfg, lay), cfg=cfg.evaluate, allow_nothing=True)
    checkpoint_spread(cfg, lay)


# The well-level and cell-level scores whose checkpoint-to-checkpoint spread the report states:
# (analysis, metric) of the main evaluation; cell_probe's kNN metric is named after its k.
SPREAD_ANALYSES = ("nsc", "map_moa", "cell_probe")
SPREAD_METRICS = (("nsc", "NSC"), ("nsc", "NSCB"), ("map_moa", "mAP"), ("cell_probe", "linear_f1"))


def _spread_metric(analysis: str, metric: str) -> bool:
    import re

    return (analysis, metric) in SPREAD_METRICS or (
        analysis == "cell_probe" and re.fullmatch(r"knn\d+_f1", metric) is not None
    )


def checkpoint_spread(cfg: Config, lay: RunLayout) -> Path | None:
    """Evaluate the last `run.spread_checkpoints` epoch checkpoints before the final one, each
    extracted and profiled as the learned set is, with nsc, map_moa and cell_probe into
    `eval/checkpoints/`, and write the spread table (`lay.checkpoint_spread`): per metric the
    value at each of those checkpoints and at the final one (the main evaluation's `learned`),
    and their spread (max − min). Returns the table's path, or None when skipped (the reason
    is recorded in `lay.checkpoint_spread_record` for the report).

    Each epoch set is extracted and profiled once: a rerun keeps those whose checkpoint and
    extract/profile settings are unchanged, and the evaluation keeps its finished parts.
    """
    import numpy as np
    import pandas as pd

    from celldino.eval.runner import evaluate
    from celldino.io import results
    from celldino.io.checkpoints import read_metadata
    from celldino.io.embeddings import read_manifest
    from celldino.io.tables import write_parquet

    n = cfg.run.spread_checkpoints
    if n < 0:
        raise ConfigError(
            f"run.spread_checkpoints={n}: give the number of epoch checkpoints to evaluate "
            "beside the final one (0 = off)"
        )
    folder = lay.eval_checkpoints
    folder.mkdir(parents=True, exist_ok=True)
    old = read_json(lay.checkpoint_spread_record) if lay.checkpoint_spread_record.exists() else {}

    def skip(reason: str) -> None:
        logger.info("checkpoint spread skipped: %s", reason)
        lay.checkpoint_spread.unlink(missing_ok=True)  # never a table of an earlier run
        write_json(lay.checkpoint_spread_record, {"skipped": reason, "sets": old.get("sets", {})})

    if n == 0:
        return skip("run.spread_checkpoints=0")
    spec = eval_spec(cfg, lay)
    analyses = {a: p for a, p in spec["analyses"].items() if a in SPREAD_ANALYSES}
    if not analyses:
        return skip(
            f"the evaluation runs none of {', '.join(SPREAD_ANALYSES)} (run.eval_spec "
            f"{cfg.run.eval_spec})"
        )
    epochs = lay.epoch_checkpoints()
    final = read_metadata(lay.checkpoint).get("epoch")
    final = int(final) if final and str(final).isdigit() else max(epochs, default=0)
    chosen = [e for e in epochs if e < final][-n:]
    if not chosen:
        return skip(
            f"no epoch checkpoint before the final one (epoch {final}) in "
            f"{lay.checkpoint.parent} (train.save_every={cfg.train.save_every}; set it to 1, "
            "with train.epochs of 2 or more, to keep one per epoch)"
        )
    if len(chosen) < n:
        logger.info(
            "checkpoint spread: run.spread_checkpoints=%d but only %d epoch checkpoint(s) "
            "before the final one",
            n,
            len(chosen),
        )
    # what makes an epoch set's embeddings and profiles: its checkpoint and the run's extract
    # and profile settings (the speed-only ones left out, as in the stage fingerprints)
    settings = {}
    for section in ("extract", "profile"):
        values = to_dict(getattr(cfg, section))
        for key in NOT_FINGERPRINTED[section]:
            values.pop(key, None)
        settings[section] = values
    made = dict(old.get("sets") or {})
    sets = {}
    for i, epoch in enumerate(chosen):
        name, ckpt = lay.epoch_set(epoch), epochs[epoch]
        key = fingerprint([provenance.digest(ckpt), settings, celldino.__version__])
        sets[name] = key
        manifest = read_manifest(lay.embeddings(name))
        if made.get(name) == key and manifest is not None and lay.profiles(name).exists():
            logger.info(
                "checkpoint spread: %s (epoch %d) extracted and profiled before, kept", name, epoch
            )
            continue
        logger.info(
            "checkpoint spread: extracting and profiling epoch %d (%d of %d) → %s",
            epoch,
            i + 1,
            len(chosen),
            lay.embeddings(name),
        )
        _extract(cfg, checkpoint=str(ckpt), out_dir=str(lay.embeddings(name)), attention_sample=0)
        _profile(cfg, lay, name, str(lay.embeddings(name)), "emb_")
        made[name] = key
        write_json(lay.checkpoint_spread_record, {"sets": made})  # kept by an interrupted run
    logger.info("checkpoint spread: evaluating %s with %s", ", ".join(sets), ", ".join(analyses))
    spread_spec = {k: v for k, v in spec.items() if k not in ("inputs", "derived", "analyses")}
    spread_spec["inputs"] = {s: str(lay.profiles(s).with_suffix(".parquet")) for s in sets}
    spread_spec["analyses"] = analyses
    try:
        evaluate(None, spec=spread_spec, cfg=dataclasses.replace(cfg.evaluate, out_dir=str(folder)))
    except DataError as e:  # no analysis could run on the epoch sets: the main results stand
        logger.warning("checkpoint spread: %s", e)
        return skip(f"no analysis could run on the epoch checkpoints' profiles ({e})")
    tidy = pd.concat(
        [
            results.read_results(folder).assign(
                epoch=lambda d: d.feature_set.map({lay.epoch_set(e): e for e in chosen})
            ),
            results.read_results(lay.eval).query("feature_set == 'learned'").assign(epoch=final),
        ],
        ignore_index=True,
    )
    wanted = [_spread_metric(a, m) for a, m in zip(tidy.analysis, tidy.metric, strict=True)]
    tidy = tidy[
        pd.Series(wanted, index=tidy.index, dtype=bool) & tidy.value.notna() & tidy.epoch.notna()
    ]
    rows = []
    for (analysis, metric), g in tidy.groupby(["analysis", "metric"], sort=False):
        g = g.sort_values("epoch")
        low, high = float(g.value.min()), float(g.value.max())
        for r in g.itertuples(index=False):
            final_row = r.feature_set == "learned"
            rows.append(
                {
                    "analysis": analysis,
                    "metric": metric,
                    "checkpoint": "final" if final_row else epochs[int(r.epoch)].stem,
                    "epoch": int(r.epoch),
                    "value": float(r.value),
                    "low": low,
                    "high": high,
                    "spread": high - low if len(g) > 1 else np.nan,
                }
            )
    table = pd.DataFrame(rows, columns=results.SPREAD_COLUMNS)
    write_parquet(table, lay.checkpoint_spread)
    write_json(
        lay.checkpoint_spread_record,
        {"sets": made, "checkpoints": [*chosen, final], "final_epoch": final},
    )
    for (analysis, metric), g in table.groupby(["analysis", "metric"], sort=False):
        logger.info(
            "checkpoint spread: %s %s moved by %.3f (%.3f–%.3f) over epochs %s",
            analysis,
            metric,
            g.spread.iloc[0],
            g.low.iloc[0],
            g.high.iloc[0],
            ", ".join(map(str, g.epoch)),
        )
    return lay.checkpoint_spread


def stage_report(cfg: Config, lay: RunLayout, *, resume: bool) -> None:
    from celldino.report import build_report

    build_report(lay.root, out=cfg.report.out, title=cfg.report.title)


STAGE_FUNCTIONS: dict[str, Callable[..., None]] = {
    "prepare": stage_prepare,
    "train": stage_train,
    "extract": stage_extract,
    "profile": stage_profile,
    "evaluate": stage_evaluate,
    "report": stage_report,
}


def stage_outputs_exist(stage: str, cfg: Config, lay: RunLayout) -> bool:
    checks = {
        "prepare": lambda: lay.cells.exists(),
        "train": lambda: lay.checkpoint.exists(),
        "extract": lambda: all(
            read_manifest(lay.embeddings(n)) is not None
            for n in _feature_sets(cfg)
            if n != "engineered"
        ),
        "profile": lambda: all(lay.profiles(n).exists() for n in _feature_sets(cfg)),
        "evaluate": lambda: lay.eval_metrics.exists() and lay.checkpoint_spread_record.exists(),
        "report": lambda: Path(cfg.report.out).exists(),
    }
    return checks[stage]()


def stage_reads(stage: str, cfg: Config, lay: RunLayout) -> list[Path]:
    """The files (and folders) a stage reads that an earlier stage, or the user by hand, made:
    their paths, sizes, times and content hashes are recorded when the stage runs
    (`celldino.io.provenance.record`), and a stage whose files changed since is not up to date
    (`provenance.changed`). Prepare's inputs (the load-data table and the images) are
    fingerprinted by prepare itself (`input_fingerprint`, with the same module)."""
    sets = _feature_sets(cfg)
    # the prep's cell table is rewritten whenever its crops are (the crop store's chunks, and
    # an extraction's attention maps, are too many files to list in pipeline.json)
    if stage in ("train", "extract"):
        return [lay.cells] + ([lay.checkpoint] if stage == "extract" else [])
    if stage == "profile":
        reads = [lay.engineered] if "engineered" in sets else []
        for folder in (lay.embeddings(n) for n in sets if n != "engineered"):
            reads += [manifest_path(folder), *sorted(folder.glob("*.parquet"))]
        return reads
    if stage == "evaluate":
        try:
            inputs = eval_spec(cfg, lay)["inputs"].values()
        except UserError:  # the stage itself names the problem
            inputs = [lay.profiles(n).with_suffix(".parquet") for n in sets]
        return sorted({Path(p) for p in inputs})
    if stage == "report":
        return [lay.eval_metrics, lay.eval_summary]
    return []


# Not fingerprinted: settings that change how fast a stage runs, never what it computes, and the
# paths `_stage_configs` points into the run directory (a moved or copied run stays up to date).
NOT_FINGERPRINTED = {
    "prepare": ("workers", "out_dir"),
    "train": (
        "num_workers",
        "threads",
        "device",
        "log_every",
        "run_dir",
        "data",
        # what training reports, not the weights (--resume may change them)
        "monitor_label",
        "monitor_cells",
        "diagnostics",
    ),
    "extract": ("batch_size", "num_workers", "threads", "device", "data", "checkpoint", "out_dir"),
    "profile": ("threads", "memory_limit"),
    "evaluate": ("map_memory_mb", "resume", "out_dir"),
    "report": ("out",),
}


def input_fingerprint(cfg: Config, record: dict) -> dict:
    """What prepare reads beyond its settings: the load-data table's content and every image
    file's size and modification time (`celldino.data.prepare.input_fingerprint`).

    When the inputs cannot be read but prepare is not among the stages to run (its outputs are
    used as they are), the inputs recorded by the run that made them stand in.
    """
    from celldino.data.prepare import input_fingerprint as prepare_inputs

    try:
        return prepare_inputs(cfg.prepare)
    except UserError:
        if "prepare" in cfg.run.stages:
            raise
        # prepare does not run: its table is not needed (a report-only run into a new folder)
        return record.get("inputs", {})


# Stages redone when celldino's version changes: cheap ones whose results depend on defaults in
# the code (profile recipes, evaluation statistics, the report); prepare, train and extract are
# redone only when their settings or inputs change.
VERSIONED = ("profile", "evaluate", "report")


def stage_fingerprints(
    cfg: Config, *, demo: bool = False, inputs: dict | None = None
) -> dict[str, str]:
    """Each stage's fingerprint: what it computes from (its settings and, for prepare, the
    content of its inputs) and the fingerprint of the stage before it."""
    out, upstream = {}, ""
    for stage in STAGES:
        sections = {}
        for name in STAGE_SECTIONS[stage]:
            values = to_dict(getattr(cfg, name))
            for key in NOT_FINGERPRINTED.get(name, ()):
                values.pop(key, None)
            sections[name] = values
        if stage == "prepare" and demo:
            sections["synth"] = to_dict(cfg.synth)  # the demo draws its own images
        if stage == "prepare" and inputs is not None:
            sections["inputs"] = inputs  # table content, image sizes and times
        if stage in ("extract", "profile", "evaluate"):
            sections["baselines"] = list(cfg.run.baselines)
        if stage in VERSIONED:  # their defaults live in code (recipes, statistics): an upgrade
            sections["celldino"] = celldino.__version__  # redoes them (seconds, not hours)
        if stage == "evaluate":  # the epoch checkpoints it evaluates for the spread
            sections["spread_checkpoints"] = cfg.run.spread_checkpoints
        if stage == "evaluate" and cfg.run.eval_spec and Path(cfg.run.eval_spec).exists():
            sections["eval_spec"] = provenance.digest(cfg.run.eval_spec)  # its contents
        out[stage] = upstream = fingerprint({"upstream": upstream, "sections": sections})
    return out


# Column roles the default analyses read (RUN_ANALYSES): nsc, map_moa and classify need the
# MoA, nsc and map_replicate the compound. A screen without them (unlabelled, or one plate of
# one treatment) still runs: the analyses that need them are skipped, each with its reason in
# the report. Roles the user names (evaluate.columns.*, the spec's columns) are checked against
# the load-data table before any stage runs, so a typo fails in a second, not after training.
DEFAULT_ROLE_COLUMNS = {"compound": "Metadata_Compound", "moa": "Metadata_MoA"}
# profile.controls as shipped: on a table without its column the run normalises each plate
# against all its wells (pycytominer's samples='all') and says so, instead of refusing
DEFAULT_CONTROLS = ProfileConfig().controls


def _query_columns(query: str) -> set[str]:
    """Metadata column names a pandas query mentions (backticks or bare Metadata_* names)."""
    import re

    return set(re.findall(r"`([^`]+)`", query)) | set(re.findall(r"\bMetadata_\w+", query))


def check_preconditions(cfg: Config) -> None:
    """Refuse, before the first stage starts, a run that is bound to fail in a later stage.

    Checks: every configured input exists; the engineered baselines have engineered features to
    read; the load-data table has the columns that profiling (`profile.by`, `profile.via`,
    `profile.controls`) and evaluation (the spec's column roles) will look for. Raises one
    ConfigError listing every problem, each with the setting to change.
    """

    stages, problems = set(cfg.run.stages), []
    p = cfg.prepare
    if "prepare" in stages:
        if not p.load_data and not p.image_dir:
            problems.append(
                "prepare.load_data (or prepare.image_dir) is empty: say where the images are"
            )
        elif p.load_data and not Path(p.load_data).exists():
            problems.append(f"prepare.load_data: {p.load_data} does not exist")
        elif p.image_dir and not p.load_data and not Path(p.image_dir).is_dir():
            problems.append(f"prepare.image_dir: {p.image_dir} is not a folder")
        if p.platemap and not Path(p.platemap).is_file():
            problems.append(f"prepare.platemap: {p.platemap} does not exist (or is not a file)")
    engineered = [b for b in cfg.run.baselines if b in ("engineered", "pca_engineered")]
    if engineered and not p.features and stages & {"profile", "evaluate"}:
        problems.append(
            f"run.baselines has {', '.join(engineered)}, which read engineered features, but "
            "prepare.features=false: set prepare.features=true, or leave them out "
            "(run.baselines=random_init)"
        )
    if stages & {"profile", "evaluate"}:
        from celldino.pp.recipe import check_settings

        try:
            check_settings(cfg.profile)
        except UserError as e:
            problems.append(str(e))
    spec: dict = {}
    if cfg.run.eval_spec:
        from celldino.eval.runner import load_spec

        try:
            spec, _ = load_spec(cfg.run.eval_spec)
        except UserError as e:
            problems.append(f"run.eval_spec: {e}")
    table = Path(p.load_data) if p.load_data else None
    if table is not None and table.exists() and "prepare" in stages:
        from celldino.io.tables import read_table

        try:
            columns = set(read_table(table).columns)
            if p.platemap:  # its columns are joined to the table's (data/imagesets.py)
                columns |= set(read_table(p.platemap).columns)
        except Exception:  # prepare itself reports an unreadable table, naming the problem
            columns = None
        if columns is not None:
            need: dict[str, str] = {}
            if stages & {"profile", "evaluate"}:
                for col in (*cfg.profile.by, *cfg.profile.via):
                    need.setdefault(col, "profile.by/via")
                if (
                    cfg.profile.normalize != "none"
                    and cfg.profile.normalize_reference == "controls"
                    and cfg.profile.controls != DEFAULT_CONTROLS  # absent: normalised on all
                ):
                    for col in _query_columns(cfg.profile.controls):
                        need.setdefault(col, "profile.controls")
            if "evaluate" in stages:
                # a default role whose column is absent (an unlabelled screen) is no problem:
                # the analyses that need it are skipped and the report says why; one the user
                # named must be there
                roles = dict(spec.get("columns") or {})
                roles = {**roles, **cfg.evaluate.columns}  # evaluate.columns.* win, as in evaluate
                for role, col in roles.items():
                    if isinstance(col, str) and col.startswith("Metadata_"):
                        need.setdefault(col, f"evaluation column '{role}'")
                for role, col in DEFAULT_ROLE_COLUMNS.items():
                    near = [c for c in columns if c != col and c.lower() == col.lower()]
                    if role not in roles and col not in columns and near:  # a spelling, not
                        problems.append(  # an unlabelled screen: the analyses would be skipped
                            f"{table} has no column {col} (evaluation column '{role}') but has "
                            f"{near[0]}: rename it, or set evaluate.columns.{role}={near[0]}"
                        )
            for col, why in need.items():
                if col not in columns:
                    problems.append(
                        f"{table} has no column {col} ({why} needs it; its Metadata columns: "
                        f"{', '.join(sorted(c for c in columns if c.startswith('Metadata_')))})"
                    )
    if problems:
        raise ConfigError(
            "celldino run checked every stage before starting and ran nothing: "
            + "; ".join(problems)
        )


def _run_folder(cfg: Config) -> Path:
    """run.out_dir, refused when it is a file (before anything is drawn or read)."""
    out = Path(cfg.run.out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"run.out_dir={out} is a file, not a folder: give a folder for the run "
            "(it is created if missing)"
        )
    return out


def run_pipeline(cfg: Config, *, force: tuple[str, ...] = (), demo: bool = False) -> Path:
    """Run the configured stages into `run.out_dir`; returns the report path (or the run dir).

    pipeline.json records each stage as started (with its fingerprint) before it runs and as done
    after. A stage is skipped when done with the same fingerprint and its outputs exist; resumed
    when it was started with the same fingerprint and interrupted; otherwise run afresh. Later
    stages rerun because their fingerprints chain this one's (and, after a forced stage, because
    their records are dropped once it is done); a failed attempt leaves their records alone, so
    fixing the cause never redoes finished work whose inputs are back as they were.
    """
    lay = RunLayout(_run_folder(cfg))
    unknown = [s for s in (*cfg.run.stages, *cfg.run.force, *force) if s not in STAGES]
    if unknown:
        raise ConfigError(
            f"unknown stage(s) {unknown} in run.stages/run.force (valid: {', '.join(STAGES)})"
        )
    check_preconditions(cfg)
    with output_lock(lay.root, "run"):
        return _run_stages(_stage_configs(cfg, lay), lay, force=force, demo=demo)


def _run_stages(cfg: Config, lay: RunLayout, *, force: tuple[str, ...], demo: bool) -> Path:
    fix = "delete it and rerun: every stage in run.stages then runs again (none counts as done)"
    record = provenance.read_run_record(lay.manifest, fix) if lay.manifest.exists() else {}
    record.setdefault("stages", {})
    forced = set(cfg.run.force) | set(force)
    inputs, old_inputs = input_fingerprint(cfg, record), record.get("inputs")
    if old_inputs is not None and old_inputs != inputs:
        changed = ", ".join(
            k for k in sorted({*inputs, *old_inputs}) if inputs.get(k) != old_inputs.get(k)
        )
        if "prepare" in cfg.run.stages:
            logger.info("inputs changed since the last run (%s): prepare runs again", changed)
        else:  # the prep on disk was made from the recorded inputs: keep describing it so
            logger.warning(
                "inputs changed since prepare ran (%s) but prepare is not in run.stages: later "
                "stages use the prep in %s, made from the old inputs",
                changed,
                lay.prep,
            )
            inputs = old_inputs
    fps = stage_fingerprints(cfg, demo=demo, inputs=inputs)
    save_config(cfg, lay.root / "config.yaml")  # after the inputs were read: nothing before
    for i, stage in enumerate(STAGES):
        if stage not in cfg.run.stages:
            continue
        fp, old = fps[stage], record["stages"].get(stage, {})
        same = old.get("fingerprint") == fp and stage not in forced
        reads = stage_reads(stage, cfg, lay)
        what = (
            provenance.changed(old.get("read"), reads, lay.root) if same and old.get("done") else []
        )
        if same and old.get("done") and stage_outputs_exist(stage, cfg, lay) and not what:
            logger.info("stage %s: up to date (fingerprint %s), skipped", stage, fp)
            continue
        if what:  # its settings are the same, but the files it read were replaced or re-made
            logger.warning(
                "stage %s: the files it read changed since it ran (%s): it runs again",
                stage,
                "; ".join(what),
            )
        resume = same and not old.get("done")
        # A later stage's fingerprint chains this one's, so a changed stage invalidates them by
        # itself; their records are kept until this stage succeeds (a failed attempt must not
        # make a later rerun redo finished work). A forced stage has the fingerprint it had, so
        # it invalidates them explicitly once done, even if it is finished by a later rerun.
        forced_now = stage in forced or bool(old.get("forced") and not old.get("done"))
        record["stages"][stage] = {"fingerprint": fp, "done": False, "forced": forced_now}
        write_json(lay.manifest, record)
        logger.info("stage %s: %s", stage, "resuming" if resume else "running")
        t0 = time.perf_counter()
        # what this run of the stage reads (before it runs), relative to the run folder
        read = provenance.record(reads, lay.root, old.get("read"))
        try:
            STAGE_FUNCTIONS[stage](cfg, lay, resume=resume)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            raise StageError(
                f"stage '{stage}' failed: {e}. Outputs of earlier stages in {lay.root} are intact; "
                f"fix the cause and rerun the same command to resume from '{stage}'."
            ) from e
        seconds = round(time.perf_counter() - t0, 1)
        record["stages"][stage] = {"fingerprint": fp, "done": True, "seconds": seconds}
        if reads:
            record["stages"][stage]["read"] = read
        if forced_now:
            for later in STAGES[i + 1 :]:
                record["stages"].pop(later, None)
        if stage == "prepare":
            record["inputs"] = inputs  # what the prep on disk was made from
        record["fingerprint"] = fp
        write_json(lay.manifest, record)
        logger.info("stage %s: done in %.1f s", stage, seconds)
    return (Path(cfg.report.out) if "report" in cfg.run.stages else lay.root).resolve()


def run_demo(cfg: Config) -> Path:
    """The whole pipeline on the synthetic `demo` screen (drawn first if missing)."""
    from celldino.synth import make_screen

    lay = RunLayout(_run_folder(cfg))
    load_data = lay.screen / "load_data.csv"
    drawn = lay.screen / "screen.json"
    if not drawn.exists() or read_json(drawn).get("config") != to_dict(cfg.synth):
        shutil.rmtree(lay.screen, ignore_errors=True)  # missing, or other synth settings
        make_screen(lay.screen, cfg.synth, setting="run.out_dir")
    return run_pipeline(replace(cfg, **{"prepare.load_data": str(load_data)}), demo=True)
