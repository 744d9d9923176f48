"""One provenance module (`celldino.io.provenance`, issue 22 §2): every stage, run on its own,
either redoes its work from an input file that changed since its last run (the output checked
against an independent computation: a fresh run, or a hand count) or refuses naming the changed
file; never "up to date" with the stale result. Content changes that keep the size and the
modification time are caught wherever the stage keys its results by content.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from celldino.errors import IncompleteInputError
from celldino.io import provenance
from celldino.io.files import file_fingerprint


def _rewrite_keeping_stat(path: Path, data: bytes) -> None:
    """Replace a file's bytes with others of the same length and put its time back: what a
    backup restore or a copy tool that keeps times does."""
    st = path.stat()
    assert len(data) == st.st_size and data != path.read_bytes()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns


# ---- the module ------------------------------------------------------------------------------


def test_digest_sees_a_same_size_change_with_the_time_kept(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"0123456789")
    assert provenance.digest(f) == file_fingerprint(f)  # a file: the one file hash
    folder_before, file_before = provenance.digest(tmp_path), provenance.digest(f)
    _rewrite_keeping_stat(f, b"0123456780")
    assert provenance.digest(f) != file_before
    assert provenance.digest(tmp_path) != folder_before


def test_record_and_changed_name_the_file(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one")
    b.write_text("two")
    rec = provenance.record([tmp_path], tmp_path)
    assert set(rec) == {"a.txt", "b.txt"} and rec["a.txt"][0] == 3
    assert provenance.changed(rec, [tmp_path], tmp_path) == []
    st = a.stat()
    a.write_text("one")  # the same bytes rewritten: no change
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert provenance.changed(rec, [tmp_path], tmp_path) == []
    a.write_text("ONE")  # same size, other bytes, new time
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    b.unlink()
    (tmp_path / "c.txt").write_text("new")
    what = provenance.changed(rec, [tmp_path], tmp_path)
    assert what == [
        "1 file(s) changed (a.txt)",
        "1 file(s) new (c.txt)",
        "1 file(s) no longer used (b.txt)",
    ]
    stat_only = provenance.record([a], hash_up_to=-1)  # prepare's images: never the bytes
    assert list(stat_only.values())[0][2] == ""


def test_table_changes_name_the_row_column_and_values():
    old = pd.DataFrame({"Metadata_Well": ["A01", "A02", "A03"], "Metadata_Compound": list("xyz")})
    new = old.copy()
    new.loc[1, "Metadata_Compound"] = "w"
    text = provenance.describe_table_changes(old, new, lambda r: f"line {r + 2} of ld.csv")
    assert text == "line 3 of ld.csv, Metadata_Compound: 'y' → 'w'"
    assert provenance.table_digest(old) != provenance.table_digest(new)
    assert "1 → 3 rows" in provenance.describe_table_changes(new.head(1), new)


def test_one_run_record_check_for_run_and_report(tmp_path):
    path = tmp_path / "pipeline.json"
    path.write_text('{"stages": [1]}')
    with pytest.raises(IncompleteInputError, match="not a celldino run record.*fix it"):
        provenance.read_run_record(path, "fix it")
    assert provenance.read_run_record(path, "fix it", stages=False) == {"stages": [1]}


# ---- prepare ---------------------------------------------------------------------------------


def _disks(yx, seed: int, value: float = 3000.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.poisson(100, (64, 64)).astype(np.float64)
    yy, xx = np.mgrid[:64, :64]
    for y, x in yx:
        img[(yy - y) ** 2 + (xx - x) ** 2 < 49] += value
    return img.astype(np.uint16)


LAYOUTS = [
    [(20, 20), (40, 44), (22, 46)],
    [(14, 30), (44, 18), (46, 48)],
    [(30, 14), (18, 44), (48, 36)],
]


def _screen(tmp_path: Path) -> Path:
    """Three sites of three nuclei (wells A01-A03), two channels, as a load-data CSV."""
    import tifffile

    folder = tmp_path / "img"
    folder.mkdir()
    rows = []
    for k, yx in enumerate(LAYOUTS):
        row = {"Metadata_Plate": "P", "Metadata_Well": f"A0{k + 1}", "Metadata_Compound": f"c{k}"}
        for ch, value in (("DNA", 3000.0), ("ER", 1500.0)):
            tifffile.imwrite(folder / f"s{k}_{ch}.tif", _disks(yx, seed=k, value=value))
            row[f"FileName_{ch}"], row[f"PathName_{ch}"] = f"s{k}_{ch}.tif", str(folder)
        rows.append(row)
    path = tmp_path / "ld.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


FAST = ("prepare.features=false", "prepare.crop_size=32", "prepare.qc_exclude=false")


def _prepare(run_cli, ld: Path, out: Path) -> tuple[int, str]:
    return run_cli("prepare", f"prepare.load_data={ld}", f"prepare.out_dir={out}", *FAST)


def test_prepare_redoes_a_changed_table_cell_and_image(run_cli, tmp_path):
    import tifffile

    ld = _screen(tmp_path)
    out = tmp_path / "prep"
    rc, text = _prepare(run_cli, ld, out)
    assert rc == 0, text
    cells = pd.read_parquet(out / "cells.parquet")
    assert cells.Metadata_Well.value_counts().to_dict() == {"A01": 3, "A02": 3, "A03": 3}

    # the table: one cell edited to a value of the same length, the file's time put back
    _rewrite_keeping_stat(ld, ld.read_bytes().replace(b",c1,", b",d1,"))
    rc, text = _prepare(run_cli, ld, out)
    assert rc == 0, text
    assert "inputs changed" in text and "starting afresh" in text, text
    assert f"line 3 of {ld}" in text and "Metadata_Compound" in text and "'d1'" in text
    cells = pd.read_parquet(out / "cells.parquet")
    assert set(cells.loc[cells.Metadata_Well == "A02", "Metadata_Compound"]) == {"d1"}

    # an image: site A02's DNA redrawn with two nuclei (same size; a new time)
    image = tmp_path / "img" / "s1_DNA.tif"
    size = image.stat().st_size
    tifffile.imwrite(image, _disks([(14, 30), (46, 48)], seed=1))
    assert image.stat().st_size == size
    rc, text = _prepare(run_cli, ld, out)
    assert rc == 0, text
    assert "1 image file(s) changed" in text and str(image) in text, text
    assert f"line 3 of {ld}, channel DNA" in text  # the file and its load-data row
    cells = pd.read_parquet(out / "cells.parquet")
    assert cells.Metadata_Well.value_counts().to_dict() == {"A01": 3, "A02": 2, "A03": 3}
    fresh = tmp_path / "fresh"  # an independent prepare of the changed inputs
    assert _prepare(run_cli, ld, fresh)[0] == 0
    pd.testing.assert_frame_equal(cells, pd.read_parquet(fresh / "cells.parquet"))


# ---- profile ---------------------------------------------------------------------------------

FEATS = [f"emb_{j:04d}" for j in range(4)]


def _cells(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [("P1", f"A{w:02d}") for w in range(4) for _ in range(3)]
    df = pd.DataFrame(rows, columns=["Metadata_Plate", "Metadata_Well"])
    for f in FEATS:
        df[f] = rng.normal(size=len(df))
    return df


def test_profile_aggregates_again_after_an_input_shard_changed(run_cli, tmp_path):
    from celldino.io.profiles import read_h5ad

    df = _cells()
    emb = tmp_path / "emb"
    emb.mkdir()
    halves = np.array_split(np.arange(len(df)), 2)
    for k, part in enumerate(halves):
        df.iloc[part].to_parquet(emb / f"part-{k:05d}.parquet", index=False)
    out = tmp_path / "p.h5ad"
    args = (
        "profile",
        f"profile.input=[{emb}]",
        f"profile.out={out}",
        "profile.recipe=none",
        "profile.controls=",
    )
    rc, text = run_cli(*args)
    assert rc == 0, text
    rc, text = run_cli(*args)  # unchanged: the aggregation is reused
    assert rc == 0 and "reusing aggregated profiles" in text, text

    df.loc[halves[1], FEATS] += 5.0  # the second shard re-made with other numbers
    df.iloc[halves[1]].to_parquet(emb / "part-00001.parquet", index=False)
    rc, text = run_cli(*args)
    assert rc == 0, text
    assert "reusing" not in text and "profile.input changed" in text, text
    assert "part-00001.parquet" in text and "part-00000.parquet" not in text
    got = read_h5ad(out)
    want = df.groupby(["Metadata_Plate", "Metadata_Well"])[FEATS].mean()  # by hand
    order = list(zip(got.obs["Metadata_Plate"], got.obs["Metadata_Well"]))
    np.testing.assert_allclose(np.asarray(got.X), want.loc[order].to_numpy(), rtol=1e-5)


# ---- evaluate (and report, which shows its numbers) ------------------------------------------


def _profiles_csv(path: Path) -> pd.DataFrame:
    """Four compounds × four replicates, each compound its own centroid; every number written
    with the same width, so swapping two rows' features keeps the file's size."""
    rng = np.random.default_rng(0)
    compounds = ["DMSO", "cpd1", "cpd2", "cpd3"]
    centre = {c: rng.uniform(12, 18, 5) for c in compounds}
    rows = [(c, "control" if c == "DMSO" else "trt") for c in compounds for _ in range(4)]
    df = pd.DataFrame(rows, columns=["Metadata_Compound", "Metadata_pert_type"])
    X = np.stack([centre[c] + rng.normal(0, 0.3, 5) for c in df.Metadata_Compound])
    for j in range(5):
        df[f"f{j}"] = X[:, j]
    df.to_csv(path, index=False, float_format="%.6f")
    return df


def _swap_features(path: Path, df: pd.DataFrame, i: int, j: int) -> None:
    feats = [c for c in df.columns if c.startswith("f")]
    swapped = df.copy()
    swapped.loc[[i, j], feats] = df.loc[[j, i], feats].to_numpy()
    _rewrite_keeping_stat(path, swapped.to_csv(index=False, float_format="%.6f").encode())


def _evaluate(run_cli, profiles: Path, spec: Path, out: Path) -> pd.DataFrame:
    rc, text = run_cli(
        "evaluate", profiles, "--spec", spec, f"evaluate.out_dir={out}", "evaluate.null_size=50"
    )
    assert rc == 0, text
    return pd.read_parquet(out / "metrics.parquet")


def test_evaluate_recomputes_after_a_same_size_change_with_the_time_kept(run_cli, tmp_path):
    path = tmp_path / "p.csv"
    df = _profiles_csv(path)
    spec = tmp_path / "spec.yaml"
    spec.write_text("analyses: [map_replicate]\n")
    out = tmp_path / "ev"
    first = _evaluate(run_cli, path, spec, out)
    assert (first["value"] == _evaluate(run_cli, path, spec, out)["value"]).all()  # resumed
    _swap_features(path, df, 4, 8)  # a cpd1 and a cpd2 replicate swap places
    again = _evaluate(run_cli, path, spec, out)  # resume is on: parts are keyed by content
    fresh = _evaluate(run_cli, path, spec, tmp_path / "fresh")  # independent: a new folder
    mean = lambda m: m.loc[m.metric == "mAP", "value"].to_numpy()  # noqa: E731
    np.testing.assert_array_equal(mean(again), mean(fresh))
    assert mean(again)[0] < mean(first)[0]  # the swap broke two replicate groups


def test_report_shows_the_metrics_of_the_changed_evaluation(run_cli, tmp_path):
    path = tmp_path / "p.csv"
    df = _profiles_csv(path)
    spec = tmp_path / "spec.yaml"
    spec.write_text("analyses: [map_replicate]\n")
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "pipeline.json").write_text(json.dumps({"stages": {}, "fingerprint": "abc"}))

    def report_value() -> str:
        rc, text = run_cli("report", run, "--out", tmp_path / "r.html")
        assert rc == 0, text
        return (tmp_path / "r.html").read_text()

    def shown(metrics: pd.DataFrame) -> str:
        value = metrics.loc[metrics.metric == "mAP", "value"].iloc[0]
        return f"{value:.3f}"

    before = shown(_evaluate(run_cli, path, spec, run / "eval"))
    assert before in report_value()
    _swap_features(path, df, 4, 8)
    after = shown(_evaluate(run_cli, path, spec, run / "eval"))
    assert after != before
    html = report_value()  # the report reads the files as they are now, never a cached page
    assert after in html


# ---- train and extract -----------------------------------------------------------------------

CHANNELS = ["ch0", "ch1", "ch2"]


@pytest.fixture
def prep(tmp_path) -> Path:
    from train_helpers import write_prep

    rng = np.random.default_rng(0)
    crops = rng.random((8, 3, 16, 16), dtype=np.float32)
    meta = pd.DataFrame(
        {
            "Metadata_CellID": [f"c{i}" for i in range(8)],
            "Metadata_Plate": "P1",
            "Metadata_Well": [f"A{i % 3:02d}" for i in range(8)],
        }
    )
    return write_prep(tmp_path / "prep", crops, meta)


def _edit_cells_table(prep: Path) -> Path:
    """One cell's well corrected in the prep's cell table (same rows), its time put back."""
    table = prep / "cells.parquet"
    st = table.stat()
    cells = pd.read_parquet(table)
    cells.loc[0, "Metadata_Well"] = "A09"
    cells.to_parquet(table, index=False)
    os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns))
    return table


def _checkpoint(path: Path, seed: int) -> Path:
    import torch

    from celldino.config import ModelConfig
    from celldino.io.checkpoints import write_safetensors
    from celldino.models import build_model

    mcfg = ModelConfig(arch="vit_tiny", patch_size=8, in_chans=3, img_size=16, depth=1)
    torch.manual_seed(seed)
    net = build_model(mcfg).eval()
    sd = {
        f"{w}.backbone.{k}": v for w in ("teacher", "student") for k, v in net.state_dict().items()
    }
    meta = {"model_config": dataclasses.asdict(mcfg)}
    return write_safetensors(path, sd, meta, channels=CHANNELS)


def _extract(run_cli, ckpt: Path, prep: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli(
        "extract",
        f"extract.checkpoint={ckpt}",
        f"extract.data={prep}",
        f"extract.out_dir={out}",
        "extract.device=cpu",
        "extract.batch_size=4",
        *extra,
    )


def _embeddings(out: Path) -> np.ndarray:
    from celldino.extract import read_embeddings

    df = read_embeddings(out)
    return df[[c for c in df.columns if c.startswith("emb_")]].to_numpy()


def test_extract_refuses_a_changed_checkpoint_or_cell_table_naming_it(run_cli, prep, tmp_path):
    ckpt = _checkpoint(tmp_path / "m.safetensors", seed=0)
    out = tmp_path / "emb"
    rc, text = _extract(run_cli, ckpt, prep, out)
    assert rc == 0, text
    first = _embeddings(out)

    other = _checkpoint(tmp_path / "other.safetensors", seed=1).read_bytes()
    _rewrite_keeping_stat(ckpt, other)  # other weights, same size, the time put back
    rc, text = _extract(run_cli, ckpt, prep, out)
    assert rc == 2 and f"checkpoint {ckpt}: its content changed" in text, text
    np.testing.assert_array_equal(_embeddings(out), first)  # the refusal changed nothing
    rc, text = _extract(run_cli, ckpt, prep, out, "extract.overwrite=true")
    assert rc == 0, text
    assert _extract(run_cli, ckpt, prep, tmp_path / "fresh")[0] == 0  # independent
    np.testing.assert_array_equal(_embeddings(out), _embeddings(tmp_path / "fresh"))
    assert not np.allclose(_embeddings(out), first)

    table = _edit_cells_table(prep)
    rc, text = _extract(run_cli, ckpt, prep, out)
    assert rc == 2 and f"data {table}: its content changed" in text, text


def test_train_resume_refuses_an_edited_cell_table_naming_it(run_cli, prep, tmp_path):
    from celldino.io.configfile import save_config
    from celldino.train import train
    from train_helpers import tiny_config

    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, "train.epochs=1", "model.in_chans=3", "model.depth=1", data=prep)
    train(cfg)
    before = (run_dir / "checkpoints" / "last.safetensors").read_bytes()
    table = _edit_cells_table(prep)
    path = save_config(cfg, tmp_path / "c.yaml")
    rc, text = run_cli("train", path, "train.epochs=2", "--resume")
    assert rc == 2 and f"data {table}: its content changed" in text, text
    assert (run_dir / "checkpoints" / "last.safetensors").read_bytes() == before
    rc, text = run_cli("train", path)  # without --resume: the run is never overwritten
    assert rc == 2 and "already holds a training run" in text, text
    shutil.rmtree(run_dir)  # a new run trains on the corrected table
    assert run_cli("train", path)[0] == 0
