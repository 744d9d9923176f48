"""A screen prepared in parts (celldino.data.parts, issue 23) is the single run, bit for bit:
three parts as three processes at once, a part killed and resumed alone, and a real Dask
LocalCluster of two worker processes, each merged and compared with one plain `prepare`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from celldino.config import PrepareConfig
from celldino.data import parts as PT
from celldino.data.prepare import prepare

TABLES = (
    "cells.parquet",
    "engineered.parquet",
    "qc.parquet",
    "images.parquet",
    "skipped.parquet",
    "inputs.parquet",
)


@pytest.fixture(scope="module")
def one_plate(tiny_screen, tmp_path_factory) -> Path:
    """Plate P01 of the tiny screen (16 sites, 2 flagged by QC): one plate, so every part holds
    some of its sites and its illumination statistics must be shared, not recomputed."""
    ld = pd.read_csv(tiny_screen / "load_data.csv", dtype=str)
    ld = ld[ld.Metadata_Plate == "P01"]
    path = tmp_path_factory.mktemp("one_plate") / "load_data.csv"
    ld.to_csv(path, index=False)
    return path


def settings(load_data: Path, out: Path) -> dict:
    # cp_measure's fast families: engineered features on, their bit identity checked
    return dict(
        load_data=str(load_data), out_dir=str(out), crop_size=32, feature_families=("fast",)
    )


@pytest.fixture(scope="module")
def single(one_plate, tmp_path_factory) -> Path:
    """The plain single run the parts must reproduce."""
    return prepare(PrepareConfig(**settings(one_plate, tmp_path_factory.mktemp("single"))))


def assert_same_prep(a: Path, b: Path, min_cells: int = 100) -> None:
    """Every output of two prep folders equal: tables exactly (values, dtypes, row order),
    prepare.json and the ledger as JSON, illumination files and crop chunks byte for byte."""
    for name in TABLES:
        assert (a / name).exists() == (b / name).exists(), name
        if name == "engineered.parquet" and not (a / name).exists():
            continue  # features off
        pd.testing.assert_frame_equal(
            pd.read_parquet(a / name), pd.read_parquet(b / name), check_exact=True, obj=name
        )
    for name in ("prepare.json", "ledger.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    za, zb = zarr.open_array(str(a / "crops.zarr")), zarr.open_array(str(b / "crops.zarr"))
    assert za.shape == zb.shape and za.dtype == zb.dtype and za.chunks == zb.chunks
    assert za.shape[0] > min_cells
    assert np.array_equal(za[:], zb[:])
    assert dict(za.attrs) == dict(zb.attrs)
    for folder in ("crops.zarr", "illum"):
        fa = sorted(p.relative_to(a) for p in (a / folder).rglob("*") if p.is_file())
        fb = sorted(p.relative_to(b) for p in (b / folder).rglob("*") if p.is_file())
        assert fa == fb and fa
        for rel in fa:
            if rel.name != "zarr.json":  # attributes compared above (JSON key order aside)
                assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "celldino.cli", "-q", *args]


def _overrides(s: dict) -> list[str]:
    return [f"prepare.{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in s.items()]


def test_three_parts_as_three_concurrent_processes_equal_one_run(one_plate, single, tmp_path):
    s = _overrides(settings(one_plate, tmp_path / "prep"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plan = subprocess.run(
        _cli("prepare-plan", *s, "prepare.parts=3"), capture_output=True, text=True, env=env
    )
    assert plan.returncode == 0, plan.stderr
    procs = [
        subprocess.Popen(
            _cli("prepare", *s, "prepare.parts=3", f"prepare.part={i}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(3)
    ]
    outs = [p.communicate() for p in procs]  # all three started before any is waited for
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    plan_ = json.loads((tmp_path / "prep" / "prepare_parts" / "plan.json").read_text())
    sizes = [len(p["sites"]) for p in plan_["parts"]]
    assert sum(sizes) == int(pd.read_parquet(single / "images.parquet").QC_Pass.sum())
    assert max(sizes) - min(sizes) <= 1  # balanced by site count
    for i, part in enumerate(plan_["parts"]):  # each part prepared exactly its sites
        ledger = json.loads(
            (tmp_path / "prep" / "prepare_parts" / f"part-{i:04d}" / "ledger.json").read_text()
        )
        assert [x["key"] for x in ledger["sites"]] == part["sites"]
    merged = subprocess.run(
        _cli("prepare-merge", *s, "prepare.parts=3"), capture_output=True, text=True, env=env
    )
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.strip() == str(tmp_path / "prep")
    assert_same_prep(single, tmp_path / "prep")


def test_killed_part_resumes_alone_and_dask_local_cluster_equals_one_run(
    one_plate, single, tmp_path
):
    cfg = PrepareConfig(**settings(one_plate, tmp_path / "prep"), parts=3, workers=2)
    PT.plan(cfg)
    part1 = PT.part_dir(cfg, 1)

    class Killed(Exception):
        pass

    def kill_after_2(n_done, key):
        if n_done == 2:
            raise Killed

    with pytest.raises(Killed):
        PT.run_part(PrepareConfig(**{**cfg.__dict__, "part": 1}), after_site=kill_after_2)
    assert not (part1 / "part.json").exists()  # not complete: the merge would refuse it
    committed = json.loads((part1 / "ledger.json").read_text())["sites"]
    assert len(committed) == 2
    before = {s["part"]: (part1 / "parts" / s["part"]).stat() for s in committed}

    timings: dict = {}
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        out = PT.run_parts_dask(cfg, client, timings=timings)
        pids = set(client.run(os.getpid).values())
    assert len(pids) == 2 and os.getpid() not in pids  # parts ran in two other processes
    assert sorted(r["part"] for r in timings["results"]) == [0, 1, 2]
    # the killed part's committed sites were not redone: their files are the same files
    for name, st in before.items():
        now = (part1 / "parts" / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    ledger = json.loads((part1 / "ledger.json").read_text())["sites"]
    assert ledger[:2] == committed and len(ledger) == len(
        json.loads((PT.parts_dir(cfg) / "plan.json").read_text())["parts"][1]["sites"]
    )
    assert_same_prep(single, out)
    # a complete part is not redone by a rerun
    seen = []
    PT.run_part(
        PrepareConfig(**{**cfg.__dict__, "part": 0}), after_site=lambda n, k: seen.append(k)
    )
    assert seen == []


def test_prepare_cluster_command_on_a_local_cluster_equals_one_run(tiny_screen, tmp_path, run_cli):
    """`celldino prepare-cluster` (a LocalCluster of prepare.workers=2 processes), features off."""
    ld = tmp_path / "ld.csv"
    pd.read_csv(tiny_screen / "load_data.csv").head(12).to_csv(ld, index=False)
    s = [f"prepare.load_data={ld}", "prepare.features=false", "prepare.crop_size=32"]
    s.append("prepare.qc_exclude=false")
    rc, msg = run_cli("prepare", *s, f"prepare.out_dir={tmp_path / 'plain'}")
    assert rc == 0, msg
    args = [*s, f"prepare.out_dir={tmp_path / 'parted'}", "prepare.parts=3", "prepare.workers=2"]
    rc, msg = run_cli("prepare-cluster", *args)
    assert rc == 0, msg
    assert len(list((tmp_path / "parted" / "prepare_parts").glob("part-*/part.json"))) == 3
    assert_same_prep(tmp_path / "plain", tmp_path / "parted", min_cells=50)
