"""Logging and progress bars, through one library (rich).

`setup(verbosity)` is called once by the CLI: -q → warnings only and no progress bars,
default → info, -v → debug. Library code calls `get_logger(__name__)` and `progress(...)`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
_state = {"quiet": False}
console = Console(stderr=True)


def setup(verbosity: int = 0) -> None:
    """Configure the 'celldino' logger: verbosity -1 quiet, 0 info, 1+ debug."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    _state["quiet"] = verbosity < 0
    logger = logging.getLogger("celldino")
    logger.handlers.clear()
    handler = RichHandler(console=console, show_path=verbosity > 0, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("celldino") else f"celldino.{name}")


def progress(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", disable: bool = False
) -> Iterator[T]:
    """Iterate with a progress bar on stderr (hidden with -q or when not interactive and quiet)."""
    if disable or _state["quiet"]:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=not sys.stderr.isatty()) as bar:
        task = bar.add_task(desc, total=total)
        for item in iterable:
            yield item
            bar.advance(task)
