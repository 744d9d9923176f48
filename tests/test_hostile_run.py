"""Hostile inputs at the level of the whole run: file modes, folder locks, batch-log progress,
and `celldino run` refusing, before any stage starts, a run bound to fail later."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from celldino import log
from celldino.config import load_config
from celldino.errors import OutputError
from celldino.io.configfile import save_config
from celldino.io.files import atomic_write_text
from celldino.io.lock import LOCK_NAME, output_lock


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    """Results get the mode a plain open() gives (0666 less the umask), not mkstemp's 0600."""
    old = os.umask(umask)
    try:
        written = atomic_write_text(tmp_path / "a.txt", "x")
        plain = tmp_path / "b.txt"
        plain.write_text("x")  # the independent reference: what open() does
        cfg = save_config(load_config(), tmp_path / "config.yaml")
    finally:
        os.umask(old)
    expected = plain.stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    assert written.stat().st_mode & 0o777 == expected
    assert cfg.stat().st_mode & 0o777 == expected


def _hold_lock_in_subprocess(folder: Path) -> subprocess.Popen:
    code = textwrap.dedent(
        f"""
        import sys, time
        from celldino.io.lock import output_lock
        with output_lock({str(folder)!r}, "extract"):
            print("held", flush=True)
            sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_frees_the_folder(tmp_path):
    folder = tmp_path / "emb"
    proc = _hold_lock_in_subprocess(folder)
    try:
        with pytest.raises(OutputError) as err:
            with output_lock(folder, "extract"):
                pass
        msg = str(err.value)
        assert str(folder) in msg and f"pid {proc.pid}" in msg and "'extract'" in msg
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    with output_lock(folder, "extract"):  # released when the holder exited
        assert (folder / LOCK_NAME).exists()


def test_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "prep"
    proc = _hold_lock_in_subprocess(folder)
    proc.kill()
    proc.wait(timeout=60)
    with output_lock(folder, "prepare"):
        pass


def test_lock_on_a_read_only_folder_names_it(tmp_path, read_only):
    ro = read_only(tmp_path / "ro")
    with pytest.raises(OutputError, match=str(ro)):
        with output_lock(ro / "out", "profile"):
            pass
    with pytest.raises(OutputError, match=str(ro)):
        with output_lock(ro, "profile"):
            pass


def test_run_into_a_read_only_folder_is_refused(tiny_screen, tmp_path, read_only, run_cli):
    ro = read_only(tmp_path / "ro")
    rc, text = run_cli(
        "run", f"prepare.load_data={tiny_screen / 'load_data.csv'}", f"run.out_dir={ro / 'run'}"
    )
    assert rc == 2 and str(ro) in text and "Traceback" not in text


def test_progress_prints_log_lines_when_not_on_a_terminal(capsys):
    """Batch jobs (SLURM logs) get a line at each tenth and one at the end, not a silent bar."""
    assert not log.console.is_terminal  # pytest captures stderr
    log.setup(0)
    width = log.console.width
    log.console.width = 1000
    try:
        for _ in log.progress(range(25), desc="sites"):
            pass
    finally:
        log.console.width = width
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "sites:" in ln]
    counts = [int(ln.split("sites: ")[1].split("/")[0]) for ln in lines]
    assert counts == [3, 5, 8, 10, 13, 15, 18, 20, 23, 25]  # ceil(k * 25 / 10), k = 1..10
    assert "left" in lines[0] and "left" not in lines[-1]


def test_progress_is_silent_with_quiet(capsys):
    log.setup(-1)
    try:
        for _ in log.progress(range(5), desc="sites"):
            pass
    finally:
        log.setup(0)
    assert "sites" not in capsys.readouterr().err


# ---- celldino run: preconditions checked before the first stage ---------------------------


def test_run_refuses_engineered_baselines_without_features_before_starting(
    tiny_screen, tmp_path, run_cli
):
    """configs/tiny.yaml has prepare.features=false: `run` used to fail after training."""
    out = tmp_path / "run"
    rc, text = run_cli(
        "run",
        f"prepare.load_data={tiny_screen / 'load_data.csv'}",
        "prepare.features=false",
        f"run.out_dir={out}",
    )
    assert rc == 2
    assert "prepare.features" in text and "run.baselines" in text
    assert "Traceback" not in text
    assert not out.exists()  # nothing was started or written


def test_run_refuses_a_table_with_the_evaluation_column_misspelt(tiny_screen, tmp_path, run_cli):
    """A table without Metadata_MoA runs (tests/test_real_screens.py: the MoA analyses are
    skipped, the report says why); one with Metadata_moa is a spelling, refused before training."""
    table = pd.read_csv(tiny_screen / "load_data.csv").rename(
        columns={"Metadata_MoA": "Metadata_moa"}
    )
    path = tmp_path / "load_data.csv"
    table.to_csv(path, index=False)
    out = tmp_path / "run"
    rc, text = run_cli("run", f"prepare.load_data={path}", f"run.out_dir={out}")
    assert rc == 2
    assert (
        "Metadata_MoA" in text and str(path) in text and "evaluate.columns.moa=Metadata_moa" in text
    )
    assert not out.exists()


def test_run_checks_the_evaluation_columns_named_on_the_command_line(tiny_screen, tmp_path):
    """evaluate.columns.moa=... is the column evaluate will read: the run's check takes it
    (the default Metadata_MoA was demanded although evaluate would not read it), and refuses
    one the table lacks, naming it."""
    from celldino.config import load_config
    from celldino.pipeline import check_preconditions

    table = pd.read_csv(tiny_screen / "load_data.csv").rename(
        columns={"Metadata_MoA": "Metadata_moa"}
    )
    path = tmp_path / "load_data.csv"
    table.to_csv(path, index=False)
    base = [f"prepare.load_data={path}", f"run.out_dir={tmp_path / 'run'}"]
    check_preconditions(load_config(None, [*base, "evaluate.columns.moa=Metadata_moa"]))
    with pytest.raises(ValueError, match="Metadata_Mechanism.*moa"):
        check_preconditions(load_config(None, [*base, "evaluate.columns.moa=Metadata_Mechanism"]))


def test_run_refuses_a_controls_query_on_a_missing_column(tiny_screen, tmp_path, run_cli):
    out = tmp_path / "run"
    rc, text = run_cli(
        "run",
        f"prepare.load_data={tiny_screen / 'load_data.csv'}",
        "profile.controls=Metadata_Treatment == 'DMSO'",
        f"run.out_dir={out}",
    )
    assert rc == 2
    assert "Metadata_Treatment" in text and "profile.controls" in text
    assert not out.exists()


def test_run_refuses_a_missing_load_data_table(tmp_path, run_cli):
    missing = tmp_path / "nope.csv"
    rc, text = run_cli("run", f"prepare.load_data={missing}", f"run.out_dir={tmp_path / 'run'}")
    assert rc == 2 and str(missing) in text and "prepare.load_data" in text


def test_run_into_a_locked_run_dir_is_refused(tiny_screen, tmp_path, run_cli):
    out = tmp_path / "run"
    proc = _hold_lock_in_subprocess(out)
    try:
        before = sorted(p.name for p in out.iterdir())
        rc, text = run_cli(
            "run",
            f"prepare.load_data={tiny_screen / 'load_data.csv'}",
            f"run.out_dir={out}",
        )
        assert rc == 2 and f"pid {proc.pid}" in text
        assert sorted(p.name for p in out.iterdir()) == before  # no config.yaml, nothing started
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)


# ---- celldino run: input content is part of the fingerprint ---------------------------------


def _prepare_only(run_cli, table: Path, out: Path) -> tuple[int, str]:
    return run_cli(
        "run",
        f"prepare.load_data={table}",
        "prepare.features=false",
        "prepare.crop_size=32",
        "prepare.nuclei_min_area=30",
        "run.stages=prepare",
        "run.baselines=random_init",
        f"run.out_dir={out}",
    )


def test_run_redoes_prepare_when_a_metadata_cell_or_an_image_changes(
    tiny_screen, tmp_path, run_cli
):
    """Editing the plate map or replacing an image used to leave `run` 'up to date' (stale)."""
    import shutil

    screen = tmp_path / "screen"
    shutil.copytree(tiny_screen, screen)
    table = screen / "load_data.csv"
    ld = pd.read_csv(table)
    for col in [c for c in ld.columns if c.startswith("PathName_")]:  # point at the copy
        ld[col] = ld[col].str.replace(str(tiny_screen), str(screen), regex=False)
    ld.to_csv(table, index=False)
    out = tmp_path / "run"
    rc, text = _prepare_only(run_cli, table, out)
    assert rc == 0, text
    rc, text = _prepare_only(run_cli, table, out)
    assert rc == 0 and "up to date" in text  # unchanged inputs: skipped

    first = ld.index[ld["Metadata_QC_Truth"] == "ok"][0]
    plate, well = ld.loc[first, "Metadata_Plate"], ld.loc[first, "Metadata_Well"]
    rows = (ld["Metadata_Well"] == well) & (ld["Metadata_Plate"] == plate)
    ld.loc[rows, "Metadata_Compound"] = "corrected_compound"
    ld.to_csv(table, index=False)
    rc, text = _prepare_only(run_cli, table, out)
    assert rc == 0 and "inputs changed" in text and "table" in text
    cells = pd.read_parquet(out / "prep" / "cells.parquet")
    mine = cells[(cells["Metadata_Well"] == well) & (cells["Metadata_Plate"] == plate)]
    assert len(mine) and (mine["Metadata_Compound"] == "corrected_compound").all()
    assert (cells["Metadata_Compound"] == "corrected_compound").sum() == len(mine)

    image = Path(ld.loc[first, "PathName_DNA"]) / ld.loc[first, "FileName_DNA"]
    assert str(image).startswith(str(screen)) and image.exists()
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # a replaced file
    rc, text = _prepare_only(run_cli, table, out)
    assert rc == 0 and "inputs changed" in text and "images" in text
    rc, text = _prepare_only(run_cli, table, out)
    assert rc == 0 and "up to date" in text


def test_run_refuses_control_normalisation_without_controls_before_starting(
    tiny_screen, tmp_path, run_cli
):
    out = tmp_path / "run"
    rc, text = run_cli(
        "run",
        f"prepare.load_data={tiny_screen / 'load_data.csv'}",
        "profile.controls=",
        f"run.out_dir={out}",
    )
    assert rc == 2 and "profile.controls" in text and "normalize_reference=all" in text
    assert not out.exists()


def test_run_into_a_read_only_folder_says_the_command_once(tmp_path, read_only, run_cli):
    ro = read_only(tmp_path / "ro")
    rc, text = run_cli("run", "run.stages=report", f"run.out_dir={ro / 'run'}")
    assert rc == 2 and str(ro) in text and "cannot write" in text
    assert "run: run:" not in text  # was "error: run: run: cannot write ..."


def test_report_only_run_into_a_new_folder_needs_no_load_data_table(tmp_path, run_cli):
    out = tmp_path / "emptyd"
    out.mkdir()
    rc, text = run_cli(
        "run",
        f"prepare.load_data={tmp_path / 'nope.csv'}",
        f"run.out_dir={out}",
        "run.stages=report",
    )
    assert rc == 0, text
    assert (out / "report.html").exists() and "nope.csv" not in text
    # with prepare among the stages the table is still required, by its setting
    rc, text = run_cli("run", f"prepare.load_data={tmp_path / 'nope.csv'}", f"run.out_dir={out}")
    assert rc == 2 and "prepare.load_data" in text and "nope.csv" in text


def test_demo_and_synth_into_a_file_are_refused(tmp_path, run_cli):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    rc, text = run_cli("demo", afile)
    assert rc == 2 and str(afile) in text and "is a file, not a folder" in text
    assert "run.out_dir" in text and "Traceback" not in text
    rc, text = run_cli("synth", afile)
    assert rc == 2 and str(afile) in text and "is a file, not a folder" in text
    assert afile.read_text() == "keep me"


def test_stdout_that_cannot_be_written_is_one_line(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "celldino", "config", "show", "tiny"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert "cannot write to standard output" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_run_eval_spec_inputs_start_at_the_spec_folder(tmp_path, monkeypatch):
    """`run.eval_spec` inputs are read as `celldino evaluate --spec` reads them: relative to the
    spec's folder, not to wherever `celldino run` was started."""
    from celldino.io.runlayout import RunLayout
    from celldino.pipeline import eval_spec

    (tmp_path / "spec").mkdir()
    spec = tmp_path / "spec" / "eval.yaml"
    spec.write_text("inputs:\n  extra: extra.parquet\n  abs: /data/x.parquet\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [f"run.eval_spec={spec}", "run.baselines=random_init"])
    got = eval_spec(cfg, RunLayout(tmp_path / "run"))
    assert got["inputs"]["extra"] == str(tmp_path / "spec" / "extra.parquet")
    assert got["inputs"]["abs"] == "/data/x.parquet"
    assert got["inputs"]["learned"].endswith("profiles/learned.parquet")


def test_a_failed_prepare_does_not_make_the_next_run_retrain(tiny_screen, tmp_path, run_cli):
    """An image missing for one run (an unmounted share) made the next run, with the image back,
    delete and retrain the model: the failed attempt had dropped train's record."""
    import shutil

    screen = tmp_path / "screen"
    shutil.copytree(tiny_screen, screen)
    table = screen / "load_data.csv"
    ld = pd.read_csv(table)
    for col in [c for c in ld.columns if c.startswith("PathName_")]:
        ld[col] = ld[col].str.replace(str(tiny_screen), str(screen), regex=False)
    ld.to_csv(table, index=False)
    out = tmp_path / "run"
    args = [
        "run",
        f"prepare.load_data={table}",
        "prepare.features=false",
        "prepare.crop_size=32",
        "prepare.nuclei_min_area=30",
        "model.depth=1",
        "model.patch_size=8",
        "model.img_size=32",
        "model.out_dim=64",
        "model.head_hidden_dim=64",
        "model.head_bottleneck_dim=32",
        "augment.global_crop_size=32",
        "augment.local_crop_size=16",
        "augment.n_local_crops=0",
        "train.epochs=1",
        "train.batch_size=32",
        "run.stages=prepare,train",
        "run.baselines=random_init",
        f"run.out_dir={out}",
    ]
    rc, text = run_cli(*args)
    assert rc == 0, text
    weights = out / "train" / "checkpoints" / "last.safetensors"
    trained = weights.read_bytes()
    cells = (out / "prep" / "cells.parquet").read_bytes()
    image = Path(ld.loc[0, "PathName_DNA"]) / ld.loc[0, "FileName_DNA"]
    moved = tmp_path / "moved.tif"
    shutil.move(image, moved)
    rc, text = run_cli(*args)
    assert rc == 2 and "prepare" in text and image.name in text
    assert weights.read_bytes() == trained  # the failed prepare touched no later stage
    assert (out / "prep" / "cells.parquet").read_bytes() == cells  # nor the prep it replaced
    assert not (out / "prep.replaced").exists()
    shutil.move(moved, image)
    rc, text = run_cli(*args)
    assert rc == 0, text
    assert "stage train: up to date" in text
    assert weights.read_bytes() == trained  # not retrained


@pytest.mark.parametrize("code", ["ENOLCK", "ENOSYS", "EOPNOTSUPP"])
def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog, code):
    """Lustre without -o flock, NFS mounted nolock: flock fails with ENOLCK/ENOSYS/EOPNOTSUPP
    (simulated here). The stage goes on, saying it holds no lock, instead of a traceback."""
    import errno
    import logging

    import celldino.io.lock as lock
    from celldino.io.lock import input_lock

    def no_locks(fd, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    celldino_logger = logging.getLogger("celldino")
    propagate, celldino_logger.propagate = celldino_logger.propagate, True
    try:
        with caplog.at_level(logging.WARNING, logger="celldino"):
            with output_lock(tmp_path / "out", "extract"):
                (tmp_path / "out" / "x").write_text("x")
            with input_lock(tmp_path / "out", "train"):
                pass
    finally:
        celldino_logger.propagate = propagate
    assert (tmp_path / "out" / "x").read_text() == "x"
    warned = {
        r.getMessage().split(":")[0] for r in caplog.records if "no file locks" in r.getMessage()
    }
    assert warned == {"extract", "train"}
