"""Nothing a user made is overwritten or mixed (issue 22 §2): a stage never writes over one of its
own inputs or into an input folder, writes only into an empty folder or one it made, and holds
the output lock while it writes. Each refusal: exit code 2, the message names the cause, and
every file there before is unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from celldino.config import SynthConfig
from celldino.errors import OutputError
from celldino.io.embeddings import shard_name, write_manifest
from celldino.io.provenance import changed, record, refuse_overwriting_inputs
from celldino.synth import make_screen

FEATS = [f"emb_{j:04d}" for j in range(4)]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the output locks' (they name the last writer)."""
    return {
        str(p): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".celldino.lock")
    }


def _cells(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [
        (p, f"A{w:02d}", "control" if w < 2 else "trt", "DMSO" if w < 2 else f"cpd{w % 2}")
        for p in ("P1", "P2")
        for w in range(6)
        for _ in range(3)
    ]
    df = pd.DataFrame(
        rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_pert_type", "Metadata_Compound"]
    )
    for f in FEATS:
        df[f] = rng.normal(size=len(df))
    return df


def _extraction(folder: Path, n: int = 2) -> Path:
    """A finished extraction: n shards and a manifest that says complete."""
    folder.mkdir(parents=True, exist_ok=True)
    df = _cells()
    for k, part in enumerate(np.array_split(np.arange(len(df)), n)):
        df.iloc[part].to_parquet(folder / shard_name(k), index=False)
    write_manifest(folder, {"complete": True, "shards": [shard_name(k) for k in range(n)]})
    return folder


def _hold(folder: Path, stage: str, name: str = "") -> subprocess.Popen:
    """Another process holding the output lock of `folder` (of the `name` stem)."""
    code = textwrap.dedent(
        f"""
        import sys
        from celldino.io.lock import output_lock
        with output_lock({str(folder)!r}, {stage!r}, name={name!r}):
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


# ---- profile ----------------------------------------------------------------------------------


def test_profile_out_naming_an_input_shard_is_refused(tmp_path, run_cli):
    """The reported case: profile.out=<embeddings>/part-00000.h5ad wrote part-00000.parquet over
    the first shard while the manifest still said complete."""
    emb = _extraction(tmp_path / "emb")
    before = _snapshot(emb)
    rc, text = run_cli(
        "profile",
        f"profile.input=[{emb}]",
        f"profile.out={emb}/part-00000.h5ad",
        "profile.formats=[h5ad,parquet]",
    )
    assert rc == 2 and "Traceback" not in text
    assert "profile.out" in text and "part-00000.parquet" in text and "profile.input" in text
    assert _snapshot(emb) == before


def test_profile_out_inside_an_input_folder_is_refused(tmp_path, run_cli):
    """A folder of the user's tables: a profile written there is read back as an input by the
    next run (a *.parquet among the tables)."""
    tables = tmp_path / "tables"
    tables.mkdir()
    _cells().to_parquet(tables / "cells.parquet", index=False)
    before = _snapshot(tables)
    rc, text = run_cli("profile", f"profile.input=[{tables}]", f"profile.out={tables}/p.h5ad")
    assert rc == 2 and "inside the input folder" in text and str(tables) in text
    assert _snapshot(tables) == before
    # the same input named as a file: the output is that very file
    rc, text = run_cli(
        "profile",
        f"profile.input=[{tables}/cells.parquet]",
        f"profile.out={tables}/cells.h5ad",
        "profile.formats=[parquet]",
    )
    assert rc == 2 and "would replace the input" in text and _snapshot(tables) == before


def test_profile_through_a_symlink_to_its_input_is_refused(tmp_path, run_cli):
    emb = _extraction(tmp_path / "emb")
    (tmp_path / "link").symlink_to(emb)
    before = _snapshot(emb)
    rc, text = run_cli(
        "profile", f"profile.input=[{emb}]", f"profile.out={tmp_path}/link/part-00001.parquet"
    )
    assert rc == 2 and "profile.out" in text and _snapshot(emb) == before


def test_two_profile_runs_to_one_output_do_not_mix(tmp_path, run_cli):
    emb = _extraction(tmp_path / "emb")
    out = tmp_path / "out"
    out.mkdir()
    (out / "wells.h5ad").write_bytes(b"earlier profiles")
    proc = _hold(out, "profile", name="wells")
    try:
        rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={out}/wells.h5ad")
        assert rc == 2 and "being written by 'profile'" in text and f"pid {proc.pid}" in text
        assert (out / "wells.h5ad").read_bytes() == b"earlier profiles"
        # another output name in the same folder is another writer's business: it goes on
        rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={out}/other.h5ad")
        assert rc == 0, text
        assert (out / "other.h5ad").exists()
    finally:
        _release(proc)
    rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={out}/wells.h5ad")
    assert rc == 0, text  # released when the holder is done


# ---- synth ------------------------------------------------------------------------------------

SMALL = {"n_plates": 1, "n_batches": 1, "cells_per_site": 3, "image_size": 64}


def test_synth_into_a_folder_of_the_users_files_is_refused(tmp_path, run_cli):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "load_data.csv").write_text("FileName_DNA,PathName_DNA\nmy.tif,/data\n")
    before = _snapshot(mine)
    rc, text = run_cli("synth", mine, "synth.n_plates=1", "synth.n_batches=1")
    assert rc == 2 and "load_data.csv" in text and "not empty" in text and str(mine) in text
    assert _snapshot(mine) == before and not (mine / "images").exists()


def test_synth_rerun_into_its_own_folder_gives_only_the_new_screen(tmp_path):
    """A screen of other settings drawn where an earlier one was: no image of the old one is
    left beside the new (compared with the same screen drawn into a fresh folder)."""
    out = tmp_path / "s"
    make_screen(out, SynthConfig(seed=1, **{**SMALL, "n_plates": 2, "n_batches": 2}))
    make_screen(out, SynthConfig(seed=2, **SMALL))
    fresh = make_screen(tmp_path / "fresh", SynthConfig(seed=2, **SMALL))

    def rel(folder):
        return {
            Path(k).relative_to(folder).as_posix(): v
            for k, v in _snapshot(folder).items()
            if Path(k).suffix == ".tif"
        }

    assert rel(fresh)  # the comparison below is of images, not of two empty sets
    assert rel(out) == rel(fresh)  # the same files, byte for byte: nothing of seed 1 is left


def test_two_synth_runs_into_one_folder_do_not_mix(tmp_path, run_cli):
    out = tmp_path / "s"
    proc = _hold(out, "synth")
    try:
        rc, text = run_cli("synth", out, "synth.n_plates=1", "synth.n_batches=1")
        assert rc == 2 and "being written by 'synth'" in text and f"pid {proc.pid}" in text
        assert not (out / "images").exists()
    finally:
        _release(proc)
    (out / ".DS_Store").write_bytes(b"")  # hidden files are not at risk: synth writes none
    rc, text = run_cli("synth", out, "synth.n_plates=1", "synth.n_batches=1", "synth.image_size=64")
    assert rc == 0, text
    assert json.loads((out / ".celldino-synth.json").read_text())["complete"] is True


# ---- the helper itself ---------------------------------------------------------------------


def test_refuse_overwriting_inputs_cases(tmp_path):
    a = tmp_path / "a.parquet"
    a.write_bytes(b"x")
    (tmp_path / "hard.parquet").hardlink_to(a)
    sub = tmp_path / "in"
    sub.mkdir()
    for outputs, inputs, owned in (
        ({"o": a}, {"i": a}, ()),
        ({"o": tmp_path / "hard.parquet"}, {"i": a}, ()),  # same inode, other name
        ({"o": sub / "new.h5ad"}, {"i": sub}, ()),  # into an input folder
        ({"o": tmp_path / "x"}, {"i": tmp_path / "own" / "m.tif"}, (tmp_path / "own",)),
    ):
        with pytest.raises(OutputError):
            refuse_overwriting_inputs(outputs, inputs, "stage", owned=owned)
    # beside the input, not over it: fine
    refuse_overwriting_inputs({"o": tmp_path / "b.parquet"}, {"i": a, "j": sub}, "stage")


def test_record_and_changed_name_what_changed(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(b"1")
    (folder / "b.parquet").write_bytes(b"2")
    (folder / ".lock").write_bytes(b"")  # hidden files of writers are not inputs
    rec = record([folder])
    assert sorted(Path(p).name for p in rec) == ["a.parquet", "b.parquet"]
    assert changed(rec, [folder]) == []
    os.utime(folder / "b.parquet", ns=(1, 10**18))  # rewritten with the same bytes: no change
    assert changed(rec, [folder]) == []
    (folder / "a.parquet").write_bytes(b"11")  # re-made by hand: other size
    (folder / "b.parquet").unlink()
    (folder / "c.parquet").write_bytes(b"3")
    what = changed(rec, [folder])
    assert len(what) == 3
    assert "1 file(s) changed" in what[0] and "a.parquet" in what[0]
    assert "new" in what[1] and "c.parquet" in what[1]
    assert "no longer used" in what[2] and "b.parquet" in what[2]


# ---- prepare ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    return make_screen(tmp_path_factory.mktemp("screen"), SynthConfig(seed=0, **SMALL))


def test_prepare_reading_masks_from_a_folder_it_clears_is_refused(screen, tmp_path, run_cli):
    """prepare.out_dir=<screen> with prepare.mask_dir=<screen>/masks: prepare's own masks/ (which
    it clears when its inputs change) would be the user's masks."""
    before = _snapshot(screen)
    rc, text = run_cli(
        "prepare",
        f"prepare.load_data={screen}/load_data.csv",
        f"prepare.out_dir={screen}",
        "prepare.segmentation=masks",
        f"prepare.mask_dir={screen}/masks",
        "prepare.nuclei_masks={stem_DNA}_nuclei.tif",
        "prepare.crop_size=32",
    )
    assert rc == 2 and "prepare.mask_dir" in text and "clears" in text and str(screen) in text
    assert _snapshot(screen) == before and not (screen / "cells.parquet").exists()


def test_prepare_into_the_image_folder_it_scans_is_refused(screen, tmp_path, run_cli):
    """prepare.image_dir is scanned (recursively) for images: a prep inside it would be scanned
    on the next run (its masks and outlines are TIFFs too)."""
    images = screen / "images"
    before = _snapshot(images)
    rc, text = run_cli(
        "prepare",
        f"prepare.image_dir={images}",
        r"prepare.pattern=(?P<plate>[^_]+)_(?P<well>[^_]+)_s(?P<site>\d+)_(?P<channel>[^_.]+)\.tif",
        f"prepare.out_dir={images}/prep",
        "prepare.crop_size=32",
    )
    assert rc == 2 and "inside the input folder" in text and "prepare.image_dir" in text
    assert _snapshot(images) == before and not (images / "prep").exists()


# ---- evaluate ---------------------------------------------------------------------------------


def test_evaluate_over_its_own_profiles_is_refused(tmp_path, run_cli):
    """Profiles named metrics.parquet in evaluate.out_dir: the metrics would replace them."""
    out = tmp_path / "ev"
    out.mkdir()
    _cells().to_parquet(out / "metrics.parquet", index=False)
    before = _snapshot(out)
    rc, text = run_cli("evaluate", out / "metrics.parquet", f"evaluate.out_dir={out}")
    assert rc == 2 and "evaluate.out_dir" in text and "would replace the input" in text
    assert _snapshot(out) == before
    # profiles kept in the tables/ folder evaluate rewrites
    (out / "tables").mkdir()
    (out / "metrics.parquet").rename(out / "tables" / "p.parquet")
    before = _snapshot(out)
    rc, text = run_cli("evaluate", out / "tables" / "p.parquet", f"evaluate.out_dir={out}")
    assert rc == 2 and "lies inside the output folder" in text and "tables" in text
    assert _snapshot(out) == before


# ---- report -----------------------------------------------------------------------------------


def test_report_over_a_file_of_the_run_is_refused(tmp_path, run_cli):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "pipeline.json").write_text('{"stages": {}}\n')
    (run / "eval" / "summary.json").write_text("{}\n")
    before = _snapshot(run)
    rc, text = run_cli("report", run, "--out", run / "pipeline.json")
    assert rc == 2 and "pipeline.json" in text and "would replace the input" in text
    rc, text = run_cli("report", run, "--out", run / "eval" / "summary.json")
    assert rc == 2 and "inside the input folder" in text and str(run / "eval") in text
    assert _snapshot(run) == before
    rc, text = run_cli("report", run, "--out", run / "report.html")
    assert rc == 0, text  # beside them: the usual place


# ---- extract ----------------------------------------------------------------------------------


def test_extract_into_its_prep_folder_is_refused(tmp_path, run_cli):
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "cells.parquet").write_bytes(b"the user's prep")
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"weights")
    before = _snapshot(tmp_path)
    for out, cause in ((prep / "emb", "inside the input folder"), (prep, "replace the input")):
        rc, text = run_cli(
            "extract",
            f"extract.data={prep}",
            f"extract.checkpoint={ckpt}",
            f"extract.out_dir={out}",
        )
        assert rc == 2 and "extract.out_dir" in text and cause in text and "extract.data" in text
    # the prep inside the output folder extract fills with shards
    rc, text = run_cli(
        "extract",
        f"extract.data={prep}",
        f"extract.checkpoint={ckpt}",
        f"extract.out_dir={tmp_path}",
    )
    assert rc == 2 and "lies inside the output folder" in text
    assert _snapshot(tmp_path) == before


# ---- celldino run: a stage whose input files changed is not up to date --------------------


def _profiles(seed: int) -> pd.DataFrame:
    """Well profiles of 2 plates × 8 wells (2 controls, 3 compounds of 3 MoAs, replicated)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in ("P1", "P2"):
        for w in range(8):
            cpd = "DMSO" if w < 2 else f"cpd{w % 3}"
            moa = "control" if w < 2 else f"moa{w % 3}"
            rows.append((p, f"A{w:02d}", cpd, moa))
    df = pd.DataFrame(
        rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_MoA"]
    )
    for f in FEATS:
        df[f] = rng.normal(size=len(df))
    return df


def test_run_reruns_a_stage_whose_input_files_were_remade_by_hand(tmp_path, caplog):
    """Profiles re-made by hand after evaluate ran: the rerun does not call evaluate up to date;
    it says which file changed and evaluates again (the metrics then match the new profiles)."""
    from celldino.config import load_config
    from celldino.pipeline import run_pipeline

    run = tmp_path / "run"
    (run / "profiles").mkdir(parents=True)
    profiles = run / "profiles" / "learned.parquet"
    _profiles(0).to_parquet(profiles, index=False)
    cfg = load_config(
        None,
        [
            f"run.out_dir={run}",
            f"prepare.load_data={tmp_path / 'none.csv'}",
            "run.stages=[evaluate,report]",
            "run.baselines=[]",
            "run.spread_checkpoints=0",
            "evaluate.null_size=50",
        ],
    )
    caplog.set_level("INFO", logger="celldino")
    run_pipeline(cfg)
    first = (run / "eval" / "summary.json").read_text()
    caplog.clear()
    run_pipeline(cfg)  # nothing changed: both up to date
    assert [
        r.getMessage().split(":")[0] for r in caplog.records if "up to date" in r.getMessage()
    ] == [
        "stage evaluate",
        "stage report",
    ]
    _profiles(1).to_parquet(profiles, index=False)  # re-made by hand, other values
    caplog.clear()
    run_pipeline(cfg)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "up to date" not in text
    assert (
        "stage evaluate: the files it read changed since it ran "
        "(1 file(s) changed (profiles/learned.parquet))" in text
    )
    assert (run / "eval" / "summary.json").read_text() != first  # evaluated again


def test_a_copied_run_folder_keeps_its_record(tmp_path):
    """Files inside the run folder are recorded relative to it: a copy is not 'changed'."""
    import shutil

    run = tmp_path / "run"
    (run / "profiles").mkdir(parents=True)
    (run / "profiles" / "learned.parquet").write_bytes(b"p")
    rec = record([run / "profiles"], root=run)
    assert list(rec) == ["profiles/learned.parquet"]
    shutil.copytree(run, tmp_path / "copy")  # copy2 keeps the times; the bytes are the same
    assert changed(rec, [tmp_path / "copy" / "profiles"], root=tmp_path / "copy") == []
    (tmp_path / "copy" / "profiles" / "learned.parquet").write_bytes(b"q")  # same size
    os.utime(tmp_path / "copy" / "profiles" / "learned.parquet", ns=(1, 10**18))
    what = changed(rec, [tmp_path / "copy" / "profiles"], root=tmp_path / "copy")
    assert what == ["1 file(s) changed (profiles/learned.parquet)"]


# ---- train ------------------------------------------------------------------------------------


def test_train_into_its_prep_folder_is_refused(tmp_path, run_cli):
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "cells.parquet").write_bytes(b"the user's prep")
    before = _snapshot(tmp_path)
    for run_dir, cause in ((prep / "run", "inside the input folder"), (prep, "replace the input")):
        rc, text = run_cli("train", f"train.data={prep}", f"train.run_dir={run_dir}")
        assert rc == 2 and "train.run_dir" in text and cause in text and "train.data" in text
    rc, text = run_cli("train", f"train.data={prep}", f"train.run_dir={tmp_path}")
    assert rc == 2 and "lies inside the output folder" in text
    assert _snapshot(tmp_path) == before
