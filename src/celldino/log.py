"""Logging and progress bars, through one library (rich).

`setup(verbosity)` is called once by the CLI: -q → warnings only and no progress bars,
default → info, -v → debug. On a terminal, log records and progress go through rich; elsewhere
(batch jobs, SLURM logs, pipes) each record is one plain, unwrapped line with a timestamp. Library code calls `get_logger(__name__)` and `progress(...)`.
"""

from __future__ import annotations

import logging
import sys
import time
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
    if console.is_terminal:
        handler: logging.Handler = RichHandler(
            console=console, show_path=verbosity > 0, rich_tracebacks=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # batch logs, pipes: one plain line per record, never wrapped at 80 columns
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("celldino") else f"celldino.{name}")


class ProgressBar:
    """Progress on stderr with an optional text field (latest diagnostics).

    On a terminal: a rich progress bar. Elsewhere (batch jobs, SLURM logs, pipes): plain log
    lines, one at each tenth of the work and at least every `LOG_SECONDS`, plus one at the end,
    each with the count, elapsed time, an estimate of the time left and the latest info text.
    Hidden with -q (and when `enabled` is False, e.g. on non-main ranks). Call `update()` once
    per unit of work and `close()` at the end.
    """

    LOG_SECONDS = 60.0

    def __init__(self, desc: str, *, total: int | None, done: int = 0, enabled: bool = True):
        self.bar: Progress | None = None
        self.lines = False
        if not enabled or _state["quiet"]:
            return
        if not console.is_terminal:
            self.lines = True
            self.desc, self.total, self.done, self.start_done = desc, total, done, done
            self.info, self.t0 = "", time.monotonic()
            self.next_count = self._next_mark(done)
            self.next_time = self.t0 + self.LOG_SECONDS
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

    def _next_mark(self, done: int) -> float:
        if not self.total:
            return float("inf")
        tenth = -(-done * 10 // self.total) if done else 0  # first tenth not yet logged
        while tenth <= 10 and -(-tenth * self.total // 10) <= done:
            tenth += 1
        return -(-tenth * self.total // 10)

    def _log_line(self) -> None:
        elapsed = time.monotonic() - self.t0
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        line = f"{self.desc}: {count}, {elapsed:.0f} s"
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        if self.total and rate > 0 and self.done < self.total:
            line += f", about {(self.total - self.done) / rate:.0f} s left"
        if self.info:
            line += f" ({self.info})"
        get_logger("celldino.progress").info("%s", line)

    def update(self, info: str | None = None, advance: int = 1) -> None:
        if self.bar is not None:
            kw = {"info": info} if info is not None else {}
            self.bar.update(self.task, advance=advance, **kw)
        elif self.lines:
            self.done += advance
            self.info = info if info is not None else self.info
            now = time.monotonic()
            if self.done >= self.next_count or now >= self.next_time:
                if not (self.total and self.done >= self.total):  # the end line says it
                    self._log_line()
                self.next_count = self._next_mark(self.done)
                self.next_time = now + self.LOG_SECONDS

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.lines:
            self.lines = False
            self._log_line()


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
