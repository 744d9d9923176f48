"""Logging and progress bars, through one library (rich).

`setup(verbosity)` is called once by the CLI: -q → warnings only and no progress bars,
default → info, -v → debug. Library code calls `get_logger(__name__)` and `progress(...)`.
"""

from __future__ import annotations

import logging
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


class ProgressBar:
    """A rich progress bar on stderr with an optional text field (latest diagnostics).

    Hidden with -q (and when `enabled` is False, e.g. on non-main ranks); transient when stderr
    is not a terminal. Call `update()` once per unit of work and `close()` at the end.
    """

    def __init__(self, desc: str, *, total: int | None, done: int = 0, enabled: bool = True):
        self.bar: Progress | None = None
        if not enabled or _state["quiet"]:
            return
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=not console.is_terminal,
        )
        self.task = self.bar.add_task(desc, total=total, completed=done, info="")
        self.bar.start()

    def update(self, info: str | None = None, advance: int = 1) -> None:
        if self.bar is not None:
            kw = {"info": info} if info is not None else {}
            self.bar.update(self.task, advance=advance, **kw)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def progress(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", disable: bool = False
) -> Iterator[T]:
    """Iterate with a progress bar on stderr (hidden with -q)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = ProgressBar(desc, total=total, enabled=not disable)
    try:
        for item in iterable:
            yield item
            bar.update()
    finally:
        bar.close()
