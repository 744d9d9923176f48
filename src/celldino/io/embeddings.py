"""The embeddings folder's manifest: where it lives and whether the folder is complete.

`extract` writes Parquet shards `part-NNNNN.parquet` and `_manifest.json` (the leading underscore
keeps it out of Parquet readers, so `pd.read_parquet(folder)` reads the shards as one dataset).
Folders written before the rename hold `manifest.json`; both are read. `profile` and `run` call
`require_complete` before using a folder, so a partial extraction is never aggregated silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celldino.errors import IncompleteInputError, MissingInputError
from celldino.io.files import read_json, write_json

MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def manifest_path(folder: str | Path) -> Path:
    """The manifest of `folder` (the legacy name when only that exists)."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists() and (folder / LEGACY_MANIFEST).exists():
        return folder / LEGACY_MANIFEST
    return folder / MANIFEST


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    p = manifest_path(folder)
    return read_json(p) if p.exists() else None


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    folder = Path(folder)
    (folder / LEGACY_MANIFEST).unlink(missing_ok=True)  # one manifest per folder
    return write_json(folder / MANIFEST, manifest)


def require_complete(folder: str | Path) -> dict[str, Any]:
    """The manifest of a finished extraction with every shard present, or a clear error."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise MissingInputError(
            f"{folder}: no {MANIFEST}, so this is not a finished `celldino extract` output; "
            "run or rerun `celldino extract` into it first"
        )
    n = len(manifest.get("shards", []))
    missing = [shard_name(k) for k in range(n) if not (folder / shard_name(k)).exists()]
    if not manifest.get("complete", False) or missing:
        what = (
            f"{len(missing)} of {n} shards are missing (first: {missing[0]})"
            if missing
            else "its manifest says the extraction is incomplete"
        )
        raise IncompleteInputError(
            f"{folder}: {what}; rerun `celldino extract` with the same settings to finish it "
            "(it resumes), or pass profile.allow_partial=true to profile what is there"
        )
    return manifest
