"""`celldino run` and `celldino demo`: prepare → train → extract → profile → evaluate → report.

Every stage writes into one run directory (see `celldino.io.runlayout`) and records a fingerprint
of what it was made from (its config sections and the fingerprint of the stage before it) in
`pipeline.json`. A rerun skips a stage whose fingerprint matches and whose outputs exist, redoes
it when its inputs changed, and redoes it on request (`run.force`). The stages themselves resume
half-finished work (prepare and extract per site/shard, train from its last checkpoint). A failure
names the stage and leaves every earlier stage's outputs as they were.

The learned embeddings are always evaluated beside the baselines in `run.baselines`:
`engineered` (CellProfiler-like features from prepare), `pca_engineered` (PCA of those, fitted by
the evaluation) and `random_init` (the same architecture with random weights).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from celldino import log
from celldino.config import Config, ConfigError, replace, to_dict
from celldino.io.files import fingerprint, read_json, write_json
from celldino.io.runlayout import STAGES, RunLayout

logger = log.get_logger(__name__)


class StageError(RuntimeError):
    """A stage failed; earlier stages' outputs are intact and a rerun resumes from this stage."""


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
# read well profiles (NSC, NSCB, replicate and MoA mAP, kNN macro-F1 split by plate).
DEFAULT_ANALYSES = {
    "nsc": {},
    "map_replicate": {},
    "map_moa": {},
    "classify": {"classifiers": ["knn"], "ks": [1, 5], "split_by": "Metadata_Plate"},
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
    """A celldino-layout checkpoint of the untrained backbone (the random-init baseline)."""
    import torch

    from celldino.io.checkpoints import write_safetensors
    from celldino.models import build_model

    path = lay.root / "baselines" / "random_init.safetensors"
    if path.exists():
        return path
    torch.manual_seed(cfg.train.seed)
    model_cfg = dataclasses.replace(cfg.model, pretrained="")
    backbone = build_model(model_cfg)
    tensors = {
        f"teacher.backbone.{k}": v.detach().contiguous() for k, v in backbone.state_dict().items()
    }
    metadata = {"model_config": dataclasses.asdict(model_cfg), "format": "celldino-random-init"}
    return write_safetensors(path, tensors, metadata)


def _feature_sets(cfg: Config) -> list[str]:
    return ["learned"] + [b for b in cfg.run.baselines if b in ("engineered", "random_init")]


# ---- stages ---------------------------------------------------------------------------------


def stage_prepare(cfg: Config, lay: RunLayout) -> None:
    from celldino.data.prepare import prepare

    prepare(cfg.prepare)


def stage_train(cfg: Config, lay: RunLayout) -> None:
    from celldino.train.checkpoint import has_checkpoint
    from celldino.train.loop import train

    train(cfg, resume=has_checkpoint(lay.train))


def stage_extract(cfg: Config, lay: RunLayout) -> None:
    from celldino.extract import extract

    extract(dataclasses.replace(cfg.extract, overwrite=True))
    if "random_init" in cfg.run.baselines:
        extract(
            dataclasses.replace(
                cfg.extract,
                checkpoint=str(_random_init_checkpoint(cfg, lay)),
                out_dir=str(lay.embeddings("random_init")),
                overwrite=True,
            )
        )


def stage_profile(cfg: Config, lay: RunLayout) -> None:
    from celldino.pp.pipeline import run_profile

    inputs = {
        "learned": (str(lay.embeddings("learned")), "emb_"),
        "random_init": (str(lay.embeddings("random_init")), "emb_"),
        "engineered": (str(lay.prep / "engineered.parquet"), "CP_"),
    }
    for name in _feature_sets(cfg):
        path, prefix = inputs[name]
        run_profile(
            dataclasses.replace(
                cfg.profile, input=(path,), features=prefix, out=str(lay.profiles(name))
            )
        )


def eval_spec(cfg: Config, lay: RunLayout) -> dict:
    """The evaluation spec: the user's (run.eval_spec) or the default, with the run's inputs."""
    import yaml

    spec: dict = {}
    if cfg.run.eval_spec:
        path = Path(cfg.run.eval_spec)
        if not path.exists():
            raise ConfigError(f"run.eval_spec: {path} does not exist")
        spec = yaml.safe_load(path.read_text()) or {}
    spec.setdefault("inputs", {})
    for name in _feature_sets(cfg):
        spec["inputs"].setdefault(name, str(lay.profiles(name).with_suffix(".parquet")))
    if "engineered" in spec["inputs"] and "pca_engineered" in cfg.run.baselines:
        spec.setdefault("derived", {}).setdefault(
            "pca_engineered", {"pca": "engineered", "n_components": 50}
        )
    spec.setdefault("analyses", dict(DEFAULT_ANALYSES))
    return spec


def stage_evaluate(cfg: Config, lay: RunLayout) -> None:
    from celldino.eval.runner import evaluate

    evaluate(None, spec=eval_spec(cfg, lay), cfg=cfg.evaluate)


def stage_report(cfg: Config, lay: RunLayout) -> None:
    from celldino.pl.report import build_report

    build_report(lay.root, out=cfg.report.out, title=cfg.report.title)


STAGE_FUNCTIONS: dict[str, Callable[[Config, RunLayout], None]] = {
    "prepare": stage_prepare,
    "train": stage_train,
    "extract": stage_extract,
    "profile": stage_profile,
    "evaluate": stage_evaluate,
    "report": stage_report,
}


def stage_outputs_exist(stage: str, cfg: Config, lay: RunLayout) -> bool:
    checks = {
        "prepare": lambda: (lay.prep / "cells.parquet").exists(),
        "train": lambda: (lay.train / "checkpoints" / "last.safetensors").exists(),
        "extract": lambda: all(
            (lay.embeddings(n) / "manifest.json").exists()
            for n in _feature_sets(cfg)
            if n != "engineered"
        ),
        "profile": lambda: all(lay.profiles(n).exists() for n in _feature_sets(cfg)),
        "evaluate": lambda: (lay.eval / "metrics.parquet").exists(),
        "report": lambda: Path(cfg.report.out).exists(),
    }
    return checks[stage]()


def run_pipeline(cfg: Config, *, force: tuple[str, ...] = ()) -> Path:
    """Run the configured stages into `run.out_dir`; returns the report path (or the run dir)."""
    lay = RunLayout(Path(cfg.run.out_dir))
    lay.root.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in (*cfg.run.stages, *cfg.run.force, *force) if s not in STAGES]
    if unknown:
        raise ConfigError(
            f"unknown stage(s) {unknown} in run.stages/run.force (valid: {', '.join(STAGES)})"
        )
    cfg = _stage_configs(cfg, lay)
    from celldino.config import save_config

    save_config(cfg, lay.root / "config.yaml")
    record = read_json(lay.manifest) if lay.manifest.exists() else {"stages": {}}
    forced = set(cfg.run.force) | set(force)
    upstream = ""
    redo_rest = False
    for stage in STAGES:
        sections = {s: to_dict(getattr(cfg, s)) for s in STAGE_SECTIONS[stage]}
        if stage in ("profile", "evaluate", "extract"):
            sections["run"] = {"baselines": list(cfg.run.baselines), "eval_spec": cfg.run.eval_spec}
        fp = fingerprint({"upstream": upstream, "sections": sections})
        upstream = fp
        if stage not in cfg.run.stages:
            continue
        done = record["stages"].get(stage, {})
        if (
            not redo_rest
            and stage not in forced
            and done.get("fingerprint") == fp
            and stage_outputs_exist(stage, cfg, lay)
        ):
            logger.info("stage %s: up to date (fingerprint %s), skipped", stage, fp)
            continue
        redo_rest = True  # everything after a rerun stage is rerun too
        logger.info("stage %s: running", stage)
        t0 = time.perf_counter()
        try:
            STAGE_FUNCTIONS[stage](cfg, lay)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            raise StageError(
                f"stage '{stage}' failed: {e}. Outputs of earlier stages in {lay.root} are intact; "
                f"fix the cause and rerun the same command to resume from '{stage}'."
            ) from e
        record["stages"][stage] = {"fingerprint": fp, "seconds": round(time.perf_counter() - t0, 1)}
        record["fingerprint"] = fp
        write_json(lay.manifest, record)
        logger.info("stage %s: done in %.1f s", stage, record["stages"][stage]["seconds"])
    return (Path(cfg.report.out) if "report" in cfg.run.stages else lay.root).resolve()


def run_demo(cfg: Config) -> Path:
    """The whole pipeline on the synthetic `demo` screen (drawn first if missing)."""
    from celldino.synth import make_screen

    lay = RunLayout(Path(cfg.run.out_dir))
    load_data = lay.screen / "load_data.csv"
    if not load_data.exists():
        make_screen(lay.screen, cfg.synth)
    return run_pipeline(replace(cfg, **{"prepare.load_data": str(load_data)}))
