"""The `celldino` command: load config → call the API → write. No logic of its own.

Every stage takes an optional YAML config and `key.sub=value` overrides; the keys a stage reads
are listed, with their comments and defaults, by `celldino <stage> --help`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from celldino import __version__, log
from celldino import config as C

logger = log.get_logger(__name__)
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def _split(items: list[str]) -> tuple[str | None, list[str]]:
    """Separate an optional YAML config path from key=value overrides."""
    cfg_path, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif item.endswith((".yaml", ".yml")) and cfg_path is None:
            cfg_path = item
        else:
            raise C.ConfigError(
                f"'{item}' is neither a .yaml config nor a key=value override "
                "(example: celldino train configs/tiny.yaml train.epochs=3)"
            )
    return cfg_path, overrides


def _config(args: argparse.Namespace, extra: list[str] | None = None) -> C.Config:
    path, overrides = _split(args.settings)
    return C.load_config(path, overrides + (extra or []))


# ---- commands ----------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from celldino.synth import make_screen

    cfg = _config(args)
    out = make_screen(args.out_dir, cfg.synth)
    print(out / "load_data.csv")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from celldino.data.prepare import INPUT_ERRORS, prepare

    cfg = _config(args)
    try:
        print(prepare(cfg.prepare))
    except INPUT_ERRORS as e:
        logger.error("prepare: %s", e)
        return 2
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from celldino.pp import run_profile

    cfg = _config(args)
    try:
        written = run_profile(cfg.profile)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        logger.error("profile: %s", e.args[0] if e.args else e)
        return 2
    for path in written.values():
        print(path)
    return 0


class _SpecThenSettings(argparse.Action):
    """`--spec SPEC.yaml key=value ...`: the spec, then settings that argparse would drop."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.spec = Path(values[0])
        namespace.spec_settings = list(values[1:])


def cmd_evaluate(args: argparse.Namespace) -> int:
    from celldino.eval.runner import evaluate

    args.settings = list(args.settings) + list(getattr(args, "spec_settings", []))
    cfg = _config(args)
    out = evaluate(args.profiles, spec=args.spec, cfg=cfg.evaluate)
    print(out / "summary.json")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from celldino.extract import extract

    # --overwrite / --format take the key=value settings that follow them (argparse would drop
    # settings written after an option), so flags and settings may come in any order
    flags, extra = [], []
    if args.overwrite is not None:
        flags.append("extract.overwrite=true")
        extra += args.overwrite
    if args.format:
        fmt, *rest = args.format
        flags.append(f"extract.format={fmt}")
        extra += rest
    args.settings = list(args.settings) + extra
    cfg = _config(args, flags)
    try:
        print(extract(cfg.extract))
    except (ValueError, KeyError, FileNotFoundError) as e:  # bad data, settings or checkpoint
        logger.error("extract: %s", e.args[0] if e.args else e)
        return 2
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from celldino.train import train

    cfg = _config(args)
    try:
        print(train(cfg, resume=args.resume))
    except (ValueError, FileNotFoundError) as e:  # bad data, settings or checkpoints
        logger.error("train: %s", e, exc_info=logger.isEnabledFor(10))
        return 2
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from celldino.pl.report import build_report

    cfg = _config(args)
    out = args.out or Path(args.run_dir) / "report.html"
    try:
        print(build_report(args.run_dir, out=out, title=cfg.report.title))
    except FileNotFoundError as e:
        logger.error("report: %s", e)
        return 2
    return 0


def _run_pipeline(args: argparse.Namespace, demo: bool) -> int:
    from celldino.pipeline import StageError, run_demo, run_pipeline

    out_dir = getattr(args, "out_dir", None)
    if out_dir is not None and ("=" in str(out_dir) or str(out_dir).endswith((".yaml", ".yml"))):
        args.settings, out_dir = [str(out_dir)] + list(args.settings), None  # a setting, not a dir
    extra = [f"run.out_dir={out_dir}"] if out_dir else []
    if demo and not any(str(s).endswith((".yaml", ".yml")) for s in args.settings):
        args.settings = [str(DEMO_CONFIG)] + list(args.settings)
    cfg = _config(args, extra)
    try:
        out = run_demo(cfg) if demo else run_pipeline(cfg, force=tuple(args.force or ()))
    except StageError as e:
        logger.error("%s", e)
        return 1
    print(out)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _run_pipeline(args, demo=False)


def cmd_demo(args: argparse.Namespace) -> int:
    return _run_pipeline(args, demo=True)


# name → (help, handler, config sections shown in --help, extra positional arguments)
COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int], list[str], list[tuple]]] = {
    "synth": (
        "write the synthetic screen (TIFF images, plate map, load-data table, ground truth)",
        cmd_synth,
        ["synth"],
        [("out_dir", "folder to write the screen into (created if missing)")],
    ),
    "prepare": (
        "images → cells table, single-cell crop store, QC and engineered features",
        cmd_prepare,
        ["prepare"],
        [],
    ),
    "train": (
        "self-supervised training (DINO / WS-DINO); runs under torchrun too",
        cmd_train,
        ["model", "augment", "train"],
        [
            (
                "--resume",
                "continue the run in train.run_dir from checkpoints/last exactly",
                {"action": "store_true"},
            )
        ],
    ),
    "extract": (
        "checkpoint + crops → per-cell embeddings (Parquet shards with metadata)",
        cmd_extract,
        ["extract"],
        [
            (
                "--overwrite",
                "replace embeddings made with another checkpoint or options (extract.overwrite)",
                {"nargs": "*", "metavar": "key=value", "default": None},
            ),
            (
                "--format",
                "parquet, or h5ad to write embeddings.h5ad too (extract.format)",
                {"nargs": "+", "metavar": ("FORMAT", "key=value"), "default": None},
            ),
        ],
    ),
    "profile": (
        "embeddings → well/treatment profiles (aggregate, normalise, batch-correct)",
        cmd_profile,
        ["profile"],
        [],
    ),
    "evaluate": (
        "profiles → retrieval, classification and biology metrics",
        cmd_evaluate,
        ["evaluate"],
        [
            ("profiles", "profiles (.parquet, .csv, .h5ad): the feature set named by spec `name`"),
            (
                "--spec",
                "evaluation spec YAML: more feature sets, columns, analyses (docs/evaluation.md)",
                {"nargs": "+", "metavar": "SPEC.yaml", "action": _SpecThenSettings},
            ),
        ],
    ),
    "report": (
        "metrics and plots → one self-contained report.html",
        cmd_report,
        ["report"],
        [
            ("run_dir", "run directory written by `celldino run` or `celldino demo`"),
            ("--out", "where to write the report (default RUN_DIR/report.html)", {"type": Path}),
        ],
    ),
    "run": (
        "prepare → train → extract → profile → evaluate → report from one config; "
        "finished stages are skipped by fingerprint",
        cmd_run,
        ["run"],
        [
            (
                "--force",
                "redo these stages even when up to date (run.force)",
                {"nargs": "+", "metavar": "STAGE", "choices": list(C.PIPELINE_STAGES)},
            )
        ],
    ),
    "demo": (
        "the whole pipeline on the built-in synthetic screen (configs/demo.yaml); prints the report path",
        cmd_demo,
        ["run", "synth"],
        [
            (
                "out_dir",
                "run directory (default: run.out_dir of the config, demo_out/)",
                {"nargs": "?", "type": Path, "default": None},
            )
        ],
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celldino",
        description="Self-supervised vision transformers for cell images: "
        "images in, morphology profiles and biology out.",
    )
    parser.add_argument("--version", action="version", version=f"celldino {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    verbosity.add_argument(
        "-v", "--verbose", action="count", default=0, help="more detail (debug logging)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    section_cls = C.typing.get_type_hints(C.Config)
    section_docs = C.field_docs(C.Config)
    for name, (help_text, handler, sections, positionals) in COMMANDS.items():
        epilog = ""
        if sections:
            parts = [
                f"[{s}] {section_docs.get(s, '')}\n" + C.describe(section_cls[s], s)
                for s in sections
            ]
            epilog = (
                "settings (key=value on the command line, or in the YAML config):\n"
                + "\n".join(parts)
            )
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for pos_name, pos_help, *pos_kw in positionals:  # optional 3rd item: argparse kwargs
            p.add_argument(pos_name, help=pos_help, **(pos_kw[0] if pos_kw else {"type": Path}))
        p.add_argument(
            "settings",
            nargs="*",
            metavar="[CONFIG.yaml] [key=value ...]",
            help="an optional YAML config, then overrides such as train.epochs=3",
        )
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.setup(-1 if args.quiet else args.verbose)
    try:
        return int(args.handler(args) or 0)
    except C.ConfigError as e:
        logger.error("configuration error: %s", e)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; finished work is kept and a rerun resumes where it stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
