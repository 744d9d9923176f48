"""`build_report`: the sections drawn one by one into one self-contained HTML file."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

from celldino import log
from celldino.errors import MissingInputError, OutputError
from celldino.io.files import atomic_write_text, require_writable
from celldino.io.provenance import read_run_record, refuse_overwriting_inputs
from celldino.io.runlayout import RunLayout
from celldino.report.html import Section, render_html
from celldino.report.sections import DEFAULT_SECTIONS

logger = log.get_logger(__name__)


def build_report(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    title: str = "celldino report",
    sections: list[Callable[[Path], Section]] | None = None,
) -> Path:
    """Write `report.html` for a run directory laid out by `celldino run` and return its path."""
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise MissingInputError(
            f"run directory {run} is a file, not a folder: give the folder `celldino run` or "
            "`celldino demo` wrote (it holds pipeline.json)"
        )
    if not run.is_dir():
        raise MissingInputError(
            f"run directory {run} does not exist: run `celldino run` or `celldino demo` first"
        )
    lay = RunLayout(run)
    path = Path(out) if out else lay.report
    if path.is_dir():
        raise OutputError(
            f"report --out {path} is a folder; give a file name, e.g. --out {path / 'report.html'}"
        )
    # the report reads the run's files: it must not replace one, nor write into a stage's folder
    refuse_overwriting_inputs(
        {"report --out": path},
        {
            "the run folder's": [
                lay.manifest,
                lay.config,
                lay.prep,
                lay.train,
                lay.root / "embeddings",
                lay.root / "profiles",
                lay.root / "baselines",
                lay.eval,
                lay.screen,
            ]
        },
        "report",
    )
    require_writable(path.parent, "report --out")  # before drawing any figure
    subtitle = f"run directory: {run.resolve()}"
    if lay.manifest.exists():
        # the report reads only the run's fingerprint: a record of any stages will do
        fix = "delete it (a `celldino run` writes it again)"
        record = read_run_record(lay.manifest, fix, stages=False)
        subtitle += f" · pipeline fingerprint {record.get('fingerprint', '?')}"
    built = []
    for make in sections or DEFAULT_SECTIONS:
        try:
            built.append(make(run))
        except Exception as e:  # one broken section must not lose the others
            logger.warning("report section %s failed: %s", make.__name__, e)
            sec = Section(
                make.__name__.removeprefix("section_"), make.__name__.removeprefix("section_")
            )
            sec.parts.append(
                f'<p class="warn">This section could not be drawn: {html.escape(str(e))}</p>'
            )
            built.append(sec)
    atomic_write_text(path, render_html(title, subtitle, built))
    logger.info("report written: %s", path)
    return path
