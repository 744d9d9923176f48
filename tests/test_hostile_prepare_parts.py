"""A screen prepared in parts (issue 23) on hostile settings and damaged parts: every case is
right or refused before anything is merged, with exit code 2 and a one-line message naming the
setting or the part folder, and nothing already prepared lost.

The screen: the first 9 sites of the tiny synthetic one, features off, QC exclusion off, planned
once into 3 parts and prepared once (module fixture); each test works on a copy."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

FAST = ("prepare.features=false", "prepare.crop_size=32", "prepare.qc_exclude=false")


def _args(ld: Path, out: Path, *extra: str) -> list[str]:
    return [f"prepare.load_data={ld}", f"prepare.out_dir={out}", *FAST, *extra]


@pytest.fixture(scope="module")
def done(tiny_screen, tmp_path_factory) -> tuple[Path, Path]:
    """(load-data table, prep folder) with the plan and its 3 parts complete, not merged."""
    from celldino.config import PrepareConfig
    from celldino.data import parts as PT

    root = tmp_path_factory.mktemp("parts")
    ld = root / "ld.csv"
    pd.read_csv(tiny_screen / "load_data.csv").head(9).to_csv(ld, index=False)
    cfg = PrepareConfig(
        load_data=str(ld),
        out_dir=str(root / "prep"),
        features=False,
        crop_size=32,
        qc_exclude=False,
        parts=3,
    )
    PT.plan(cfg)
    for i in range(3):
        PT.run_part(PrepareConfig(**{**cfg.__dict__, "part": i}))
    return ld, root / "prep"


@pytest.fixture
def copy(done, tmp_path) -> tuple[Path, Path]:
    ld, prep = done
    shutil.copytree(prep, tmp_path / "prep")
    return ld, tmp_path / "prep"


def _part(prep: Path, i: int) -> Path:
    return prep / "prepare_parts" / f"part-{i:04d}"


def _not_merged(prep: Path) -> None:
    assert not (prep / "cells.parquet").exists() and not (prep / "ledger.json").exists()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("3", "prepare.part=3 is not a part of prepare.parts=3: give 0 to 2"),
        ("-2", "prepare.part=-2 is not a part of prepare.parts=3"),
        ("two", "prepare.part"),
        ("1.5", "prepare.part"),
    ],
)
def test_bad_part_index_refused(run_cli, done, value, words):
    ld, prep = done
    rc, msg = run_cli("prepare", *_args(ld, prep, "prepare.parts=3", f"prepare.part={value}"))
    assert rc == 2 and words in msg, msg


def test_part_without_parts_refused(run_cli, done):
    ld, prep = done
    rc, msg = run_cli("prepare", *_args(ld, prep, "prepare.part=1"))
    assert rc == 2 and "prepare.parts=0" in msg, msg


def test_part_before_the_plan_refused(run_cli, tiny_screen, tmp_path):
    ld = tmp_path / "ld.csv"
    pd.read_csv(tiny_screen / "load_data.csv").head(4).to_csv(ld, index=False)
    rc, msg = run_cli("prepare", *_args(ld, tmp_path / "p", "prepare.parts=2", "prepare.part=0"))
    assert rc == 2 and "plan.json not found" in msg and "prepare-plan" in msg, msg


def test_more_parts_than_sites_refused(run_cli, tiny_screen, tmp_path):
    ld = tmp_path / "ld.csv"
    pd.read_csv(tiny_screen / "load_data.csv").head(4).to_csv(ld, index=False)
    rc, msg = run_cli("prepare-plan", *_args(ld, tmp_path / "p", "prepare.parts=5"))
    assert rc == 2 and "prepare.parts=5 is more than the 4 sites" in msg, msg


def test_part_with_other_settings_or_count_than_the_plan_refused(run_cli, copy):
    ld, prep = copy
    rc, msg = run_cli(
        "prepare", *_args(ld, prep, "prepare.parts=3", "prepare.part=0", "prepare.crop_size=40")
    )
    assert rc == 2 and "planned with other settings" in msg and "crop_size: 32 → 40" in msg, msg
    rc, msg = run_cli("prepare", *_args(ld, prep, "prepare.parts=4", "prepare.part=0"))
    assert rc == 2 and "splits the screen into 3 parts, not prepare.parts=4" in msg, msg


def test_merge_with_a_part_missing_refused_naming_it(run_cli, copy):
    ld, prep = copy
    shutil.rmtree(_part(prep, 1))
    rc, msg = run_cli("prepare-merge", *_args(ld, prep, "prepare.parts=3"))
    assert rc == 2 and "part(s) 1 missing" in msg and str(_part(prep, 1)) in msg, msg
    assert "prepare.part=1" in msg
    _not_merged(prep)


def test_merge_with_an_incomplete_part_refused_then_resumed(run_cli, copy):
    ld, prep = copy
    (_part(prep, 2) / "part.json").unlink()  # as a part killed before its end
    rc, msg = run_cli("prepare-merge", *_args(ld, prep, "prepare.parts=3"))
    assert rc == 2 and "part(s) 2 incomplete" in msg and str(_part(prep, 2)) in msg, msg
    _not_merged(prep)
    before = {p.name: p.stat().st_mtime_ns for p in (_part(prep, 0)).rglob("*.parquet")}
    rc, msg = run_cli("prepare", *_args(ld, prep, "prepare.parts=3", "prepare.part=2"))
    assert rc == 0, msg
    rc, msg = run_cli("prepare-merge", *_args(ld, prep, "prepare.parts=3"))
    assert rc == 0, msg
    assert len(pd.read_parquet(prep / "cells.parquet")) > 20
    assert before == {p.name: p.stat().st_mtime_ns for p in (_part(prep, 0)).rglob("*.parquet")}


def test_merge_with_a_part_of_another_config_refused(run_cli, copy, tmp_path):
    """Part 1 replaced by part 1 of the same screen prepared with another setting."""
    ld, prep = copy
    other = tmp_path / "other"
    args = _args(ld, other, "prepare.parts=3", "prepare.qc_blur_z=-4")
    assert run_cli("prepare-plan", *args)[0] == 0
    assert run_cli("prepare", *args, "prepare.part=1")[0] == 0
    shutil.rmtree(_part(prep, 1))
    shutil.copytree(_part(other, 1), _part(prep, 1))
    rc, msg = run_cli("prepare-merge", *_args(ld, prep, "prepare.parts=3"))
    assert rc == 2 and str(_part(prep, 1)) in msg and "another config" in msg, msg
    _not_merged(prep)


def test_merge_with_overlapping_parts_refused(run_cli, copy):
    """Part 0's folder copied over part 1's (its sites twice, part 1's none)."""
    ld, prep = copy
    shutil.rmtree(_part(prep, 1))
    shutil.copytree(_part(prep, 0), _part(prep, 1))
    rc, msg = run_cli("prepare-merge", *_args(ld, prep, "prepare.parts=3"))
    assert rc == 2 and str(_part(prep, 1)) in msg and "holds part 0's sites" in msg, msg
    _not_merged(prep)


def test_merge_with_a_site_in_two_parts_refused(run_cli, copy):
    """A part whose ledger also holds a site of the next part (its records edited)."""
    ld, prep = copy
    p0, p1 = _part(prep, 0), _part(prep, 1)
    led0 = json.loads((p0 / "ledger.json").read_text())
    led1 = json.loads((p1 / "ledger.json").read_text())
    led0["sites"].append(dict(led1["sites"][0]))
    (p0 / "ledger.json").write_text(json.dumps(led0))
    rc, msg = run_cli("prepare-merge", *_args(ld, prep, "prepare.parts=3"))
    assert rc == 2 and led1["sites"][0]["key"] in msg and "in two parts" in msg, msg
    assert str(p0) in msg and str(p1) in msg
    _not_merged(prep)


def test_merge_after_an_input_changed_refused(run_cli, copy):
    ld, prep = copy
    row = pd.read_csv(ld).iloc[4]
    image = Path(row.PathName_ER) / row.FileName_ER
    st = image.stat()
    try:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched since the plan
        rc, msg = run_cli("prepare-merge", *_args(ld, prep, "prepare.parts=3"))
    finally:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert rc == 2 and "planned from other inputs" in msg and row.FileName_ER in msg, msg
    _not_merged(prep)


def test_merge_with_parts_count_other_than_the_plan_refused(run_cli, copy):
    ld, prep = copy
    rc, msg = run_cli("prepare-merge", *_args(ld, prep, "prepare.parts=2"))
    assert rc == 2 and "not prepare.parts=2" in msg, msg
    rc, msg = run_cli("prepare-merge", *_args(ld, prep, "prepare.parts=3", "prepare.part=1"))
    assert rc == 2 and "leave prepare.part out" in msg, msg
    _not_merged(prep)


def test_replan_after_a_setting_changed_removes_stale_parts(run_cli, copy):
    ld, prep = copy
    rc, msg = run_cli("prepare-plan", *_args(ld, prep, "prepare.parts=3", "prepare.qc_blur_z=-4"))
    assert rc == 0, msg
    assert not any(_part(prep, i).exists() for i in range(3))  # another fingerprint: redone


def test_dask_run_with_a_failing_part_names_it_and_keeps_the_others(tmp_path, done, read_only):
    """Part 1's folder unwritable: the Dask run fails naming part 1 after parts 0 and 2 are
    complete; once writable, a rerun redoes part 1 alone and the merge equals a plain run."""
    from distributed import Client, LocalCluster

    from celldino.config import PrepareConfig
    from celldino.data import parts as PT
    from celldino.data.prepare import prepare

    ld, _ = done
    base = dict(load_data=str(ld), features=False, crop_size=32, qc_exclude=False)
    plain = prepare(PrepareConfig(out_dir=str(tmp_path / "plain"), **base))
    cfg = PrepareConfig(out_dir=str(tmp_path / "prep"), parts=3, **base)
    read_only(PT.part_dir(cfg, 1))
    with (
        LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        with pytest.raises(PT.PartsError) as e:
            PT.run_parts_dask(cfg, client)
        assert "part(s) 1 of 3 failed" in str(e.value) and "part-0001" in str(e.value)
        assert (PT.part_dir(cfg, 0) / "part.json").exists()
        assert (PT.part_dir(cfg, 2) / "part.json").exists()
        _not_merged(tmp_path / "prep")
        kept = {i: (PT.part_dir(cfg, i) / "part.json").stat().st_mtime_ns for i in (0, 2)}
        os.system(f"chattr -i {PT.part_dir(cfg, 1)} 2>/dev/null")
        PT.part_dir(cfg, 1).chmod(0o755)
        timings: dict = {}
        out = PT.run_parts_dask(cfg, client, timings=timings)
    assert kept == {i: (PT.part_dir(cfg, i) / "part.json").stat().st_mtime_ns for i in (0, 2)}
    cells = pd.read_parquet(out / "cells.parquet")
    pd.testing.assert_frame_equal(cells, pd.read_parquet(plain / "cells.parquet"), check_exact=True)
