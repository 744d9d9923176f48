"""The resolved config written beside a run as YAML (config.py parses; writing a file is io's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from celldino.config import to_dict
from celldino.io.files import atomic_write_text

__all__ = ["save_config"]


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    return atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
