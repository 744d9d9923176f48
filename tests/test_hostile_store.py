"""A prepared folder damaged or changed under its readers: every case is right or refused.

A real prep of the tiny screen (14 sites, 32 px crops, two 64-cell chunks) is made once and copied
per test. Each case runs the command line (`run_cli`) and checks the exit code, that the one-line
message names the file / chunk / rows, and that nothing already written changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from celldino.config import ModelConfig
from celldino.io.checkpoints import write_safetensors
from celldino.models import build_model

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
SIDE = 32
FAST = ("prepare.features=false", f"prepare.crop_size={SIDE}", "prepare.qc_exclude=false")


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".celldino.lock"
    }


def _prepare_args(ld: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", f"prepare.load_data={ld}", f"prepare.out_dir={out}", *FAST, *extra]


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_screen) -> tuple[Path, Path]:
    """(load-data table of 14 sites, its prep folder): copy the folder before changing it."""
    from celldino.cli import main

    root = tmp_path_factory.mktemp("store")
    ld = root / "ld.csv"
    pd.read_csv(tiny_screen / "load_data.csv").head(14).to_csv(ld, index=False)
    assert main(_prepare_args(ld, root / "prep")) == 0
    assert zarr.open_array(str(root / "prep" / "crops.zarr")).shape[0] > 64  # two chunks
    return ld, root / "prep"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random tiny ViT for the 5-channel 32 px crops, with its channel names."""
    mcfg = ModelConfig(
        arch="vit_tiny", patch_size=8, in_chans=5, img_size=SIDE, depth=1, drop_path_rate=0.0
    )
    torch.manual_seed(0)
    net = build_model(mcfg).eval()
    sd = {
        f"{w}.backbone.{k}": v for w in ("teacher", "student") for k, v in net.state_dict().items()
    }
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    write_safetensors(path, sd, {"model_config": dataclasses.asdict(mcfg)}, channels=CHANNELS)
    return path


def _copy(made, tmp_path: Path) -> Path:
    return Path(
        shutil.copytree(made[1], tmp_path / "prep", ignore=shutil.ignore_patterns(".celldino.lock"))
    )


def _extract(run_cli, ckpt: Path, prep: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli(
        "extract",
        f"extract.checkpoint={ckpt}",
        f"extract.data={prep}",
        f"extract.out_dir={out}",
        "extract.device=cpu",
        "extract.batch_size=32",
        *extra,
    )


def _hold(folder: Path, mode: str) -> subprocess.Popen:
    """A real second process holding `folder`'s lock: mode "read" (input_lock) or "write"."""
    fn, stage = ("input_lock", "extract") if mode == "read" else ("output_lock", "prepare")
    code = textwrap.dedent(
        f"""
        import sys
        from celldino.io.lock import {fn}
        with {fn}({str(folder)!r}, {stage!r}):
            print("held", flush=True)
            sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(timeout=60)


# ---- #88: readers and prepare never overlap ---------------------------------------------------


def test_prepare_is_refused_while_the_folder_is_read(run_cli, made, tmp_path):
    prep = _copy(made, tmp_path)
    before = _snapshot(prep)
    proc = _hold(prep, "read")
    try:
        rc, msg = run_cli(*_prepare_args(made[0], prep, "prepare.crop_size=24"))
    finally:
        _release(proc)
    assert rc == 2 and str(prep) in msg and "being read" in msg, msg
    assert _snapshot(prep) == before


def test_readers_are_refused_while_prepare_writes(run_cli, made, ckpt, tmp_path):
    prep = _copy(made, tmp_path)
    proc = _hold(prep, "write")
    try:
        rc, msg = _extract(run_cli, ckpt, prep, tmp_path / "emb")
        rc_t, msg_t = run_cli(
            "train",
            f"train.data={prep}",
            f"train.run_dir={tmp_path / 'run'}",
            "train.device=cpu",
            "model.in_chans=5",
        )
    finally:
        _release(proc)
    assert rc == 2 and str(prep) in msg and "being written" in msg and "'prepare'" in msg, msg
    assert rc_t == 2 and str(prep) in msg_t and "being written" in msg_t, msg_t
    assert not (tmp_path / "emb").exists() and not (tmp_path / "run").exists()


def test_two_readers_at_once_and_a_read_only_prep(run_cli, made, ckpt, tmp_path, read_only):
    from celldino.io.lock import input_lock

    prep = _copy(made, tmp_path)
    proc = _hold(prep, "read")
    try:
        with input_lock(prep, "train"):  # readers share the folder
            pass
    finally:
        _release(proc)
    ro = read_only(_copy(made, tmp_path / "ro"))  # no lock file and none can be made
    rc, msg = _extract(run_cli, ckpt, ro, tmp_path / "emb")
    assert rc == 0, msg
    assert not (ro / ".celldino.lock").exists()


# ---- #17/#84/#85: a deleted chunk reads as zeros -----------------------------------------------


def test_deleted_chunk_is_refused_and_prepare_redoes_its_sites(run_cli, made, ckpt, tmp_path):
    prep = _copy(made, tmp_path)
    chunk = prep / "crops.zarr" / "c" / "1" / "0" / "0" / "0"
    chunk.unlink()
    before = _snapshot(prep)
    rc, msg = _extract(run_cli, ckpt, prep, tmp_path / "emb")
    assert rc == 2 and str(prep / "crops.zarr") in msg and "cell rows 64-" in msg, msg
    assert "rerun `celldino prepare`" in msg
    assert _snapshot(prep) == before and not (tmp_path / "emb").exists()

    rc, msg = run_cli(*_prepare_args(made[0], prep))  # redoes the sites of the missing chunk
    assert rc == 0, msg
    assert "missing" in msg and "redoing" in msg
    want = zarr.open_array(str(made[1] / "crops.zarr"))[:]
    np.testing.assert_array_equal(zarr.open_array(str(prep / "crops.zarr"))[:], want)
    assert _snapshot(prep)["cells.parquet"] == _snapshot(made[1])["cells.parquet"]
    assert _extract(run_cli, ckpt, prep, tmp_path / "emb")[0] == 0


# ---- #87/#86: cells.parquet not the one the crops were written with ----------------------------


def test_reordered_or_foreign_cells_table_is_refused(run_cli, made, ckpt, tmp_path):
    prep = _copy(made, tmp_path)
    cells = pd.read_parquet(prep / "cells.parquet")
    swapped = cells.copy()
    swapped.iloc[[0, 1]] = cells.iloc[[1, 0]].to_numpy()
    swapped.to_parquet(prep / "cells.parquet")
    rc, msg = _extract(run_cli, ckpt, prep, tmp_path / "emb")
    assert rc == 2 and "cells.parquet" in msg and "crops.zarr" in msg and "Metadata_CellID" in msg
    assert "rerun `celldino prepare`" in msg and not (tmp_path / "emb").exists()

    cells.head(20).to_parquet(prep / "cells.parquet")  # another prep's (shorter) table
    rc, msg = _extract(run_cli, ckpt, prep, tmp_path / "emb")
    assert rc == 2 and "cells.parquet" in msg and "crops.zarr" in msg and "20 rows" in msg, msg


# ---- #16/#18: damaged files ---------------------------------------------------------------------


def test_damaged_chunk_and_truncated_cells_table_are_named(run_cli, made, ckpt, tmp_path):
    prep = _copy(made, tmp_path)
    chunk = prep / "crops.zarr" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))
    for workers in ("0", "1"):  # read in a DataLoader worker too: still one line
        rc, msg = _extract(run_cli, ckpt, prep, tmp_path / "emb", f"extract.num_workers={workers}")
        assert rc == 2 and "c/1/0/0/0" in msg and "cell rows 64-" in msg and "damaged" in msg
        assert "Traceback" not in msg and "Caught" not in msg, msg

    prep2 = _copy(made, tmp_path / "b")
    with open(prep2 / "cells.parquet", "r+b") as f:
        f.truncate(500)
    rc, msg = _extract(run_cli, ckpt, prep2, tmp_path / "emb2")
    assert rc == 2 and str(prep2 / "cells.parquet") in msg and "cannot be read" in msg, msg
    assert not (tmp_path / "emb2").exists()
