"""The one kind of user error: something the person running celldino can fix.

The command line catches `UserError` (and only it) and prints its message on one line with exit
code 2: the message names the file, row, column or key and says what to do. Anything else is a
bug and keeps its traceback. `-v` shows the traceback of user errors too.

The subclasses also derive from the built-in exception a Python caller would expect
(`ValueError`, `FileNotFoundError`, `OSError`), so `except ValueError` in user code keeps working.
This module imports nothing from celldino: every package may raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the inputs, settings or environment that the user can fix."""


class DataError(UserError, ValueError):
    """Input data that cannot give a right result: a table, image, checkpoint or profile file."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder a stage needs does not exist (or an earlier stage has not run)."""


class OutputError(UserError, OSError):
    """The output cannot be written: folder not writable, disk full, or locked by another run."""


class IncompleteInputError(DataError):
    """An input written by an earlier stage is unfinished or partly missing."""
