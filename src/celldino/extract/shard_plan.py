"""The shard plan of an extraction and what a rerun may continue: which rows go into which shard,
which shards are already on disk, and on which identity entries two manifests differ. The
embeddings folder itself (shards, manifest, h5ad) is read and written by `celldino.io.embeddings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celldino.io.embeddings import shard_name, shard_rows

DTYPES = ("float32", "float16")
# manifest entries that must agree for a rerun to continue an existing folder
IDENTITY = ("checkpoint", "features", "channels", "data", "n_features", "dtype", "shard_size")


def shard_plan(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] row ranges of the shards of an `n_rows` table."""
    if shard_size < 1:
        raise ValueError(f"extract.shard_size must be at least 1, not {shard_size}")
    return [(s, min(s + shard_size, n_rows)) for s in range(0, n_rows, shard_size)]


def done_shards(out_dir: Path, plan: list[tuple[int, int]]) -> set[int]:
    """Indices of planned shards already on disk with the expected number of rows."""
    out = set()
    for k, (start, stop) in enumerate(plan):
        p = Path(out_dir) / shard_name(k)
        if p.exists() and shard_rows(p) == stop - start:
            out.add(k)
    return out


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of identity entries on which two manifests differ. A content change
    (`celldino.io.provenance.digest`) names the file: the checkpoint, the prep's cell table. A
    data entry the old manifest lacks (recorded only by a later celldino) is not compared."""
    diffs = []
    for key in IDENTITY:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if key == "data" and sub not in a:
                    continue
                if a.get(sub) != b.get(sub):
                    diffs.append(_difference(old, new, key, sub))
        else:
            diffs.append(f"{key}: {a!r} → {b!r}")
    return diffs


def _difference(old: dict[str, Any], new: dict[str, Any], key: str, sub: str) -> str:
    a, b = old[key].get(sub), new[key].get(sub)
    if (key, sub) == ("checkpoint", "sha256_16"):
        was, now = old.get("checkpoint_path"), new.get("checkpoint_path")
        if was == now:
            return (
                f"checkpoint {now}: its content changed since (checkpoint.sha256_16 {a!r} → {b!r})"
            )
        return f"checkpoint.sha256_16: {a!r} → {b!r} (the file {was} → {now})"
    if (key, sub) == ("data", "table_sha256_16"):
        table = Path(str(new.get("data_path", ""))) / str(new[key].get("table", ""))
        return f"data {table}: its content changed since (data.table_sha256_16 {a!r} → {b!r})"
    return f"{key}.{sub}: {a!r} → {b!r}"


def assign_shards(n_shards: int, done: set[int], rank: int, world_size: int) -> list[int]:
    """The shards rank `rank` of `world_size` computes: those not `done`, dealt round-robin.

    Dealing the unfinished shards (not every shard by k % world_size) spreads a rerun's work over
    all ranks whatever finished before: after a lost node, the shards left are mostly that node's
    rank's, and k % world_size would give them all to one rank again. Every rank must be given
    the same `done` (the extractor broadcasts rank 0's reading) so the ranks' lists partition the
    unfinished shards."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    todo = [k for k in range(n_shards) if k not in done]
    return todo[rank::world_size]
