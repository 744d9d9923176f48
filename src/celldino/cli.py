"""The `celldino` command: load config → call the API → write. No logic of its own.

Every stage takes an optional YAML config and `key.sub=value` overrides; the keys a stage reads
are listed, with their comments and defaults, by `celldino <stage> --help`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from celldino import __version__, log
from celldino import config as C
from celldino.errors import OutputError, UserError
from celldino.io.files import WRITE_ERRNOS
from celldino.io.results import SUMMARY
from celldino.io.runlayout import RunLayout

logger = log.get_logger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def _split(items: list[str]) -> tuple[str | None, list[str]]:
    """Separate an optional YAML config path from key=value overrides."""
    cfg_path, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif item.endswith((".yaml", ".yml")) and cfg_path is None:
            cfg_path = item
        elif item.endswith((".yaml", ".yml")):
            raise C.ConfigError(
                f"two config files, {cfg_path} and {item}: give one, and key=value overrides"
            )
        else:
            data = item.endswith((".parquet", ".csv", ".csv.gz", ".h5ad", ".zarr"))
            hint = (
                " (a data file is given by a setting such as profile.input=PATH or "
                "extract.data=PATH, or as the first argument of `celldino evaluate`)"
                if data
                else ""
            )
            raise C.ConfigError(
                f"'{item}' is neither a .yaml config nor a key=value override{hint} "
                "(example: celldino train configs/tiny.yaml train.epochs=3)"
            )
    return cfg_path, overrides


def _positional_first(args: argparse.Namespace, name: str) -> None:
    """`celldino evaluate evaluate.null_size=50 p.parquet`: argparse gives the positional
    argument the first word (an override) and the path lands among the settings. Put them back
    where they belong when the word is an override and exactly one setting is not."""
    given = getattr(args, name, None)
    if given is None or not re.match(r"[A-Za-z_][\w.]*=", str(given)):
        return
    rest = [a for a in args.settings if "=" not in a and not a.endswith((".yaml", ".yml"))]
    if len(rest) == 1:
        args.settings = [str(given), *(a for a in args.settings if a != rest[0])]
        setattr(args, name, Path(rest[0]))


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
    from celldino.data.prepare import prepare

    cfg = _config(args)
    if cfg.prepare.parts or cfg.prepare.part != -1:  # one part of a planned screen
        from celldino.data.parts import run_part

        print(run_part(cfg.prepare))
        return 0
    print(prepare(cfg.prepare))
    return 0


def cmd_prepare_plan(args: argparse.Namespace) -> int:
    from celldino.data.parts import plan

    print(plan(_config(args).prepare))
    return 0


def cmd_prepare_merge(args: argparse.Namespace) -> int:
    from celldino.data.parts import merge

    print(merge(_config(args).prepare))
    return 0


def cmd_prepare_cluster(args: argparse.Namespace) -> int:
    from celldino.data.parts import run_parts_dask

    print(run_parts_dask(_config(args).prepare))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from celldino.pp import run_profile

    cfg = _config(args)
    written = run_profile(cfg.profile)
    for path in written.values():
        print(path)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from celldino.eval.runner import evaluate

    _positional_first(args, "profiles")
    cfg = _config(args)
    out = evaluate(args.profiles, spec=args.spec, cfg=cfg.evaluate)
    print(out / SUMMARY)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from celldino.extract import extract

    flags = ["extract.overwrite=true"] if args.overwrite else []
    if args.format:
        flags.append(f"extract.format={args.format}")
    cfg = _config(args, flags)
    print(extract(cfg.extract))
    return 0


def cmd_qc(args: argparse.Namespace) -> int:
    from celldino.extract.learned_qc import run_learned_qc

    cfg = _config(args)
    print(run_learned_qc(cfg.qc))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from celldino.train import train

    cfg = _config(args)
    print(train(cfg, resume=args.resume))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from celldino.report import build_report

    _positional_first(args, "run_dir")
    cfg = _config(args)
    out = args.out or RunLayout(Path(args.run_dir)).report
    print(build_report(args.run_dir, out=out, title=cfg.report.title))
    return 0


def _run_pipeline(args: argparse.Namespace, demo: bool) -> int:
    from celldino.pipeline import run_demo, run_pipeline

    _positional_first(args, "out_dir")
    out_dir = getattr(args, "out_dir", None)
    if out_dir is not None and ("=" in str(out_dir) or str(out_dir).endswith((".yaml", ".yml"))):
        args.settings, out_dir = [str(out_dir)] + list(args.settings), None  # a setting, not a dir
    extra = [f"run.out_dir={out_dir}"] if out_dir else []
    force = tuple(args.force or ())
    if demo and not any(str(s).endswith((".yaml", ".yml")) for s in args.settings):
        args.settings = [str(DEMO_CONFIG)] + list(args.settings)
    if demo and force:
        extra.append(f"run.force={','.join(force)}")
    cfg = _config(args, extra)
    out = run_demo(cfg) if demo else run_pipeline(cfg, force=force)
    from celldino.report.headline import headline_of_run

    headline = headline_of_run(cfg.run.out_dir)
    if headline and "evaluate" not in cfg.run.stages:  # eval/ was neither made nor checked now
        print(
            f"From an earlier evaluation ({RunLayout(Path(cfg.run.out_dir)).eval}; evaluate was "
            "not among run.stages, so it may not match these settings):"
        )
    if headline:
        print(headline)
    print(out)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _run_pipeline(args, demo=False)


def cmd_demo(args: argparse.Namespace) -> int:
    return _run_pipeline(args, demo=True)


def cmd_config(args: argparse.Namespace) -> int:
    if args.settings:
        raise C.ConfigError(f"config show takes one name, not {' '.join(args.settings)}")
    if args.name is None:
        print("starting configs (celldino config show NAME > my.yaml):")
        for name, (path, what) in STARTERS.items():
            print(f"  {name:<10} {what}  [{path.name}]")
        return 0
    if args.name not in STARTERS:
        raise C.ConfigError(
            f"no starting config named '{args.name}' (choose from: {', '.join(STARTERS)})"
        )
    text = STARTERS[args.name][0].read_text()
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        e._celldino_stdout = True  # the CLI's one line, see main
        raise
    return 0


# name → (file, one line) for `celldino config show NAME`
STARTERS: dict[str, tuple[Path, str]] = {
    "tiny": (CONFIG_DIR / "tiny.yaml", "a few minutes on one CPU: synth → prepare → train"),
    "demo": (CONFIG_DIR / "demo.yaml", "the whole pipeline on the demo screen (`celldino demo`)"),
    "real-cells": (
        CONFIG_DIR / "real-cells.yaml",
        "DINO on a few thousand small real crops on a CPU (measured on BBBC021)",
    ),
    "eval-spec": (
        CONFIG_DIR / "eval-spec.yaml",
        "an evaluation spec for `celldino evaluate PROFILES --spec` / run.eval_spec",
    ),
}


def _stage_list(text: str) -> list[str]:
    """`--force train` / `--force train,extract`: stage names, checked."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in C.PIPELINE_STAGES]
    if bad or not stages:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a stage (choose from: {', '.join(C.PIPELINE_STAGES)})"
        )
    return stages


_FORCE = (
    "--force",
    "redo these stages even when up to date (run.force); one or more of: "
    + ", ".join(C.PIPELINE_STAGES),
    {"action": "extend", "type": _stage_list, "metavar": "STAGE", "default": None},
)

# name → (help, handler, config sections shown in --help, extra arguments)
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
    "qc": (
        "learned image QC: field embeddings → outlier and few-shot artefact flags in qc.parquet",
        cmd_qc,
        ["qc"],
        [],
    ),
    "prepare-plan": (
        "prepare in parts, step 1: QC and illumination of the whole screen, and the plan of "
        "prepare.parts parts (then `celldino prepare ... prepare.part=i` per part; docs/cluster.md)",
        cmd_prepare_plan,
        ["prepare"],
        [],
    ),
    "prepare-merge": (
        "prepare in parts, last step: join the complete parts into prepare.out_dir (the same "
        "files as one prepare)",
        cmd_prepare_merge,
        ["prepare"],
        [],
    ),
    "prepare-cluster": (
        "plan, every part as a Dask task (prepare.scheduler, or a local cluster of "
        "prepare.workers processes), merge",
        cmd_prepare_cluster,
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
                {"action": "store_true"},
            ),
            (
                "--format",
                "parquet, or h5ad to write embeddings.h5ad too (extract.format)",
                {"metavar": "FORMAT", "default": None},
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
                "evaluation spec YAML: more feature sets, columns, analyses (docs/evaluation.md; "
                "`celldino config show eval-spec` prints an example)",
                {"metavar": "SPEC.yaml", "type": Path, "default": None},
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
        [_FORCE],
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
            ),
            _FORCE,
        ],
    ),
}


def _verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """-q / -v: accepted anywhere on the line (main takes them out before argparse)."""
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more detail (debug logging; tracebacks of user errors too)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celldino",
        description="Self-supervised vision transformers for cell images: "
        "images in, morphology profiles and biology out.",
        epilog="-q and -v may come anywhere on the line; `celldino COMMAND --help` lists every "
        "setting of a command with its default.",
    )
    parser.add_argument("--version", action="version", version=f"celldino {__version__}")
    _verbosity_flags(parser)
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
                "settings (key=value on the command line, or in the YAML config; lists as "
                "a,b or [a,b]; `celldino config show tiny` prints a starting config):\n"
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
            default=[],
            metavar="[CONFIG.yaml] [key=value ...]",
            help="an optional YAML config, then overrides such as train.epochs=3 (any order)",
        )
        _verbosity_flags(p)
        p.set_defaults(handler=handler)
    p = sub.add_parser(
        "config",
        help="print a commented starting config: celldino config show tiny|demo|real-cells|eval-spec",
        description="`celldino config show` lists the starting configs; "
        "`celldino config show NAME > my.yaml` writes one to edit.",
    )
    p.add_argument("action", choices=["show"], help="show: print a starting config")
    p.add_argument("name", nargs="?", default=None, help=", ".join(STARTERS))
    _verbosity_flags(p)
    p.set_defaults(handler=cmd_config, settings=[])
    return parser


def _take_global_flags(argv: list[str]) -> tuple[int | None, list[str]]:
    """Remove -q/--quiet and -v/-vv/--verbose from anywhere before `--`: (verbosity, rest).

    Verbosity is -1 for quiet, else the number of v's; None when both were given.
    """
    quiet, verbose, rest = False, 0, []
    for i, tok in enumerate(argv):
        if tok == "--":
            rest += argv[i:]
            break
        if tok in ("-q", "--quiet"):
            quiet = True
        elif tok == "--verbose":
            verbose += 1
        elif len(tok) > 1 and tok[0] == "-" and set(tok[1:]) == {"v"}:
            verbose += len(tok) - 1
        else:
            rest.append(tok)
    if quiet and verbose:
        return None, rest
    return (-1 if quiet else verbose), rest


def _gather_force(argv: list[str]) -> list[str]:
    """`--force train extract CONFIG.yaml` → `--force=train,extract CONFIG.yaml`.

    argparse's nargs='+' would also swallow the config path and the overrides that follow; here
    --force takes the stage names that follow it and nothing else.
    """
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--force":
            stages = []
            while i + 1 < len(argv) and argv[i + 1] and not argv[i + 1].startswith("-"):
                parts = [s.strip() for s in argv[i + 1].split(",")]
                if not all(s in C.PIPELINE_STAGES for s in parts if s):
                    break
                stages += [s for s in parts if s]
                i += 1
            out.append(f"--force={','.join(stages)}" if stages else tok)
        else:
            out.append(tok)
        i += 1
    return out


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _user_error(command: str, err: BaseException, verbosity: int) -> int:
    text = _one_line(err)
    if text.startswith(f"{command}: "):  # the message names the stage already: say it once
        text = text[len(command) + 2 :]
    # the log line says ERROR already: "ERROR prepare: <message>", not "ERROR error: prepare: ..."
    logger.error("%s: %s", command, text, exc_info=err if verbosity > 0 else None)
    return 2


def _stdout_failed(command: str, err: OSError, verbosity: int) -> int:
    """Writing the result to standard output failed (a full disk, /dev/full, a closed pipe):
    one line, not a traceback; stdout goes to /dev/null so the exit does not fail again."""
    try:
        sys.stdout = open(os.devnull, "w")  # lives until the process exits
    except OSError:
        pass
    what = err.strerror or type(err).__name__
    return _user_error(
        command,
        OutputError(f"cannot write to standard output ({what}); redirect it to a writable file"),
        verbosity,
    )


def _after_interrupt(command: str) -> str:
    """What to run after Ctrl-C: only `train` needs a flag to continue (a plain rerun into a run
    folder that holds checkpoints is refused, so that trained weights are never overwritten)."""
    if command == "train":
        return (
            "the last checkpoint is kept: rerun the same command with --resume to continue "
            "(a plain rerun is refused)"
        )
    if command in (
        "prepare",
        "prepare-plan",
        "prepare-cluster",
        "extract",
        "evaluate",
        "run",
        "demo",
    ):
        return f"finished work is kept: rerun the same `celldino {command}` command to resume"
    return f"rerun the same `celldino {command}` command to start it again"


def main(argv: list[str] | None = None) -> int:
    verbosity, argv = _take_global_flags(list(sys.argv[1:] if argv is None else argv))
    argv = _gather_force(argv)
    parser = build_parser()
    if verbosity is None:
        parser.error("-q and -v exclude each other: give one")
    args, unknown = parser.parse_known_args(argv)
    options = [a for a in unknown if a.startswith("-") and a != "-"]
    if options:
        parser.error(f"unrecognized arguments: {' '.join(options)}")
    # settings written after an option (`report RUN --out x.html report.title=T`) come back as
    # unknown positionals: they are settings too, in the order given
    args.settings = list(getattr(args, "settings", [])) + [a for a in unknown if a not in options]
    log.setup(verbosity)
    command = args.command
    try:
        rc = int(args.handler(args) or 0)
        try:
            sys.stdout.flush()  # a failing write of the result is found here, not at exit
        except OSError as e:
            return _stdout_failed(command, e, verbosity)
        return rc
    except UserError as e:
        return _user_error(command, e, verbosity)
    except OSError as e:
        if isinstance(e, BrokenPipeError) or getattr(e, "_celldino_stdout", False):
            return _stdout_failed(command, e, verbosity)
        if e.errno in WRITE_ERRNOS:  # a full disk or read-only folder met by any writer
            what = f"writing {e.filename}" if e.filename else "writing its output"
            err = OutputError(
                f"{what} failed ({e.strerror or e}): free disk space or fix the folder's "
                "permissions, then rerun"
            )
            return _user_error(command, err, verbosity)
        raise
    except KeyboardInterrupt:
        logger.error("interrupted; %s", _after_interrupt(command))
        return 130
    except Exception as e:
        # `celldino run` wraps a stage's failure in StageError; the cause decides what it is
        cause = e.__cause__
        if type(e).__name__ == "StageError" and isinstance(cause, UserError):
            return _user_error(command, e, verbosity)
        raise


if __name__ == "__main__":
    sys.exit(main())
