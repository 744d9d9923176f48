"""Degenerate inputs never score as perfect, and errors point at their cause (issue 22, §4-5).

Each case runs the command line (`run_cli`) or the reader it exercises, and checks the exit code,
that the one-line message names the file, key or setting, and that nothing written before changed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from copairs.map import average_precision as copairs_ap
from copairs.map.normalization import expected_ap as copairs_expected_ap


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- §4 a collapsed embedding ------------------------------------------------------------------


def _collapsed(tmp_path: Path) -> Path:
    """5 compounds × 4 replicates and 8 DMSO wells, every profile the same vector."""
    meta = pd.DataFrame(
        {
            "Metadata_Compound": [f"c{i}" for i in range(5) for _ in range(4)] + ["DMSO"] * 8,
            "Metadata_pert_type": ["trt"] * 20 + ["control"] * 8,
        }
    )
    feats = pd.DataFrame(np.tile([0.3, -1.2, 2.0, 0.7], (len(meta), 1)), columns=list("abcd"))
    path = tmp_path / "collapsed.parquet"
    pd.concat([meta, feats], axis=1).to_parquet(path)
    return path


def test_collapsed_embedding_scores_chance_and_is_flagged(tmp_path, run_cli):
    path = _collapsed(tmp_path)
    (tmp_path / "spec.yaml").write_text("analyses: [map_replicate, activity]\n")
    out = tmp_path / "ev"
    rc, text = run_cli(
        "evaluate",
        path,
        "--spec",
        tmp_path / "spec.yaml",
        f"evaluate.out_dir={out}",
        "evaluate.null_size=50",
    )
    assert rc == 0, text
    assert "no variance" in text  # logged as a warning
    tidy = pd.read_csv(out / "metrics.csv")
    maps = tidy[tidy.metric.str.startswith("mAP") & ~tidy.metric.str.contains("normalized")]
    assert len(maps) >= 2, tidy
    # copairs ranks tied positives first (AP 1.0); the tie average is copairs' expected AP
    df = pd.read_parquet(path)
    cp = copairs_ap(
        df[["Metadata_Compound"]].assign(ctrl=df.Metadata_pert_type == "control"),
        df[list("abcd")].to_numpy(),
        pos_sameby=["Metadata_Compound"],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=["ctrl"],
        progress_bar=False,
    )
    assert (cp.average_precision.dropna() == 1.0).all()
    for r in maps.itertuples():
        assert r.value < 0.9, r
        assert r.value == pytest.approx(r.chance, abs=1e-9), r
        assert "no variance" in r.flags, r
    # replicate retrieval: 3 positives among 3 + 8 controls (activity) - the chance level itself
    act = tidy[(tidy.analysis == "activity") & (tidy.metric == "mAP")]
    if len(act):
        assert act.value.iloc[0] == pytest.approx(copairs_expected_ap(3, 8), abs=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert any("no variance" in str(v) for v in summary["flags"].values())


# ---- §4 a stage that produces nothing -----------------------------------------------------------

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
FAST = ("prepare.features=false", "prepare.crop_size=32", "prepare.qc_exclude=false")


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory, tiny_screen) -> Path:
    """A load-data table of 4 sites of the tiny screen."""
    ld = tmp_path_factory.mktemp("four") / "ld.csv"
    pd.read_csv(tiny_screen / "load_data.csv").head(4).to_csv(ld, index=False)
    return ld


def test_prepare_skipping_every_site_is_an_error(tmp_path, four_sites, run_cli):
    table = pd.read_csv(four_sites)
    bad = tmp_path / "images"
    bad.mkdir()
    for c in CHANNELS:  # every image file replaced by one that is not an image
        for f in table[f"FileName_{c}"]:
            (bad / f).write_bytes(b"not a tiff")
        table[f"PathName_{c}"] = str(bad)
    table.to_csv(tmp_path / "ld.csv", index=False)
    out = tmp_path / "prep"
    rc, text = run_cli(
        "prepare",
        f"prepare.load_data={tmp_path / 'ld.csv'}",
        f"prepare.out_dir={out}",
        "prepare.on_error=skip",
        *FAST,
    )
    assert rc == 2, text
    assert "no site of 4 prepared" in text and "4 skipped" in text
    assert table.FileName_DNA[0] in text and "skipped.parquet" in text and "not a TIFF" in text
    assert "Traceback" not in text
    assert not (out / "crops.zarr").exists() and not (out / "cells.parquet").exists()
    assert len(pd.read_parquet(out / "skipped.parquet")) == 4  # the reasons, one per site


# ---- §5 user masks and their name templates ----------------------------------------------------


def _masks(folder: Path, table: pd.DataFrame, value: int) -> None:
    import tifffile

    folder.mkdir()
    shape = tifffile.imread(Path(table.PathName_DNA[0]) / table.FileName_DNA[0]).shape
    for f in table.FileName_DNA:
        m = np.zeros(shape, np.int16)
        m[10:20, 10:20] = value
        m[30:40, 30:40] = 2
        tifffile.imwrite(folder / (f.split(".")[0] + "_mask.tiff"), m)


def test_negative_label_in_user_mask_names_the_file(tmp_path, four_sites, run_cli):
    _masks(tmp_path / "masks", pd.read_csv(four_sites), -1)
    rc, text = run_cli(
        "prepare",
        f"prepare.load_data={four_sites}",
        f"prepare.out_dir={tmp_path / 'prep'}",
        "prepare.segmentation=masks",
        f"prepare.mask_dir={tmp_path / 'masks'}",
        "prepare.nuclei_masks={stem_DNA}_mask.tiff",
        *FAST,
    )
    assert rc == 2 and "Traceback" not in text, text
    assert "_mask.tiff" in text and "100 pixels hold negative values" in text


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{stem_DNA", "not a valid name template"),
        ("{0}", "by position"),
        ("{}", "by position"),
        ("{x.real}", "not a plain field name"),
        ("{x[99]}", "not a plain field name"),
        ("{stem_DNA!r}", "not a plain field name"),
    ],
)
def test_mask_name_template_checked_when_the_config_loads(tmp_path, template, says, run_cli):
    out = tmp_path / "prep"
    for key in ("nuclei_masks", "cell_masks"):
        rc, text = run_cli(  # the load-data table does not even exist: the config is refused first
            "prepare",
            f"prepare.load_data={tmp_path / 'absent.csv'}",
            f"prepare.out_dir={out}",
            "prepare.segmentation=masks",
            f"prepare.mask_dir={tmp_path}",
            f"prepare.{key}={template}",
        )
        assert rc == 2 and f"prepare.{key}" in text and says in text, text
        assert "Traceback" not in text and not out.exists()


# ---- §5 truncated state and record files --------------------------------------------------------


def _truncate(path: Path) -> None:
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2])


def test_truncated_ledger_names_it_and_says_the_prep_is_redone(tmp_path, four_sites, run_cli):
    out = tmp_path / "prep"
    args = ("prepare", f"prepare.load_data={four_sites}", f"prepare.out_dir={out}", *FAST)
    rc, text = run_cli(*args)
    assert rc == 0, text
    _truncate(out / "ledger.json")
    before = _snapshot(out)
    rc, text = run_cli(*args)
    assert rc == 2 and "Traceback" not in text, text
    assert str(out / "ledger.json") in text and "not valid JSON" in text
    assert "delete that folder and rerun prepare" in text
    after = _snapshot(out)
    after.pop(".celldino.lock", None), before.pop(".celldino.lock", None)
    assert after == before


def test_truncated_manifest_summary_and_pipeline_record(tmp_path):
    from celldino.errors import IncompleteInputError, UserError
    from celldino.io import results
    from celldino.io.embeddings import MANIFEST, read_manifest
    from celldino.io.files import read_json, write_json

    for name in (MANIFEST, "summary.json", "pipeline.json"):
        write_json(tmp_path / name, {"complete": True, "shards": [[0, 10]], "stages": {}})
        _truncate(tmp_path / name)
    with pytest.raises(IncompleteInputError, match="overwrite") as e:
        read_manifest(tmp_path)
    assert MANIFEST in str(e.value) and "not valid JSON" in str(e.value)
    with pytest.raises(IncompleteInputError, match="rerun evaluate") as e:
        results.read_summary(tmp_path)
    assert "summary.json" in str(e.value)
    with pytest.raises(UserError, match="pipeline.json is not valid JSON"):
        read_json(tmp_path / "pipeline.json")
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xff"}')  # not UTF-8: also named
    with pytest.raises(IncompleteInputError, match="latin.json"):
        read_json(tmp_path / "latin.json")


# ---- §5 checkpoints: metadata and channel counts ------------------------------------------------


@pytest.fixture(scope="module")
def prep(tmp_path_factory, four_sites) -> Path:
    from celldino.cli import main

    out = tmp_path_factory.mktemp("prep4") / "prep"
    assert (
        main(["prepare", f"prepare.load_data={four_sites}", f"prepare.out_dir={out}", *FAST]) == 0
    )
    return out


def _checkpoint(path: Path, metadata: dict, channels=CHANNELS) -> Path:
    import dataclasses

    import torch

    from celldino.config import ModelConfig
    from celldino.io.checkpoints import write_safetensors
    from celldino.models import build_model

    mcfg = ModelConfig(arch="vit_tiny", patch_size=8, in_chans=5, img_size=32, depth=1)
    torch.manual_seed(0)
    net = build_model(mcfg).eval()
    sd = {
        f"{w}.backbone.{k}": v for w in ("teacher", "student") for k, v in net.state_dict().items()
    }
    meta = {"model_config": dataclasses.asdict(mcfg), **metadata}
    return write_safetensors(path, sd, meta, channels=channels)


def _extract(run_cli, ckpt: Path, prep: Path, out: Path, *extra: str):
    return run_cli(
        "extract",
        f"extract.checkpoint={ckpt}",
        f"extract.data={prep}",
        f"extract.out_dir={out}",
        "extract.device=cpu",
        *extra,
    )


def test_checkpoint_metadata_not_json_names_file_and_key(tmp_path, prep, run_cli):
    ckpt = _checkpoint(tmp_path / "m.safetensors", {"model_config": '{"arch": "vit_tiny", '})
    rc, text = _extract(run_cli, ckpt, prep, tmp_path / "emb")
    assert rc == 2 and "Traceback" not in text, text
    assert "m.safetensors" in text and "'model_config' is not valid JSON" in text
    assert not (tmp_path / "emb").exists() or not any((tmp_path / "emb").glob("part-*"))


def test_channel_count_mismatch_names_its_cause(tmp_path, prep, run_cli):
    good = _checkpoint(tmp_path / "good.safetensors", {})
    rc, text = _extract(run_cli, good, prep, tmp_path / "e1", "extract.channels=[DNA,ER,RNA]")
    assert rc == 2 and "extract.channels=['DNA', 'ER', 'RNA'] names 3 channels" in text, text
    assert "takes 5" in text
    # metadata names 4 channels, the weights take 5: the checkpoint is the cause, not the prep
    odd = _checkpoint(tmp_path / "odd.safetensors", {}, channels=CHANNELS[:4])
    rc, text = _extract(run_cli, odd, prep, tmp_path / "e2")
    assert rc == 2 and "odd.safetensors: its metadata 'channels' lists 4 channels" in text, text
    assert "weights take 5" in text and "Traceback" not in text


# ---- §5 messages that point at the cause --------------------------------------------------------


def test_error_line_says_error_once(tmp_path, run_cli):
    rc, text = run_cli("prepare", f"prepare.load_data={tmp_path / 'absent.csv'}")
    assert rc == 2 and "ERROR prepare:" in text and "error:" not in text, text


def test_synth_image_size_refused_before_allocating(tmp_path, run_cli):
    from celldino.config import ConfigError, SynthConfig
    from celldino.synth import make_screen

    rc, text = run_cli("synth", tmp_path / "s", "synth.image_size=100000")
    assert rc == 2 and "synth.image_size" in text and "<= 4096" in text, text
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="synth.image_size"):  # the library call too
        make_screen(tmp_path / "s", SynthConfig(image_size=100000))
    assert not (tmp_path / "s").exists()


def test_demo_folder_not_writable_names_run_out_dir(tmp_path, read_only, run_cli):
    out = read_only(tmp_path / "ro")
    rc, text = run_cli("demo", out)
    assert rc == 2 and "run.out_dir=" in text and "OUT_DIR" not in text, text
    assert list(out.iterdir()) == []


def test_profiles_path_after_the_overrides(tmp_path, run_cli):
    path = _collapsed(tmp_path)
    (tmp_path / "spec.yaml").write_text("analyses: [map_replicate]\n")
    out = tmp_path / "ev"
    rc, text = run_cli(  # the overrides first, the profiles last: still the profiles
        "evaluate",
        "--spec",
        tmp_path / "spec.yaml",
        f"evaluate.out_dir={out}",
        "evaluate.null_size=50",
        path,
    )
    assert rc == 0, text
    assert (out / "summary.json").exists()
    rc, text = run_cli("profile", "profile.out=x", path)  # profile takes it as a setting
    assert rc == 2 and "profile.input=PATH" in text and path.name in text, text


def test_rgb_tiff_is_named_rgb_not_a_narrow_image(tmp_path, four_sites, run_cli):
    import tifffile

    table = pd.read_csv(four_sites)
    grey = tifffile.imread(Path(table.PathName_DNA[0]) / table.FileName_DNA[0])
    (tmp_path / "images").mkdir()
    rgb = tmp_path / "images" / "rgb.tif"
    tifffile.imwrite(rgb, np.stack([grey] * 3, axis=-1), photometric="rgb")
    table.loc[0, ["PathName_DNA", "FileName_DNA"]] = [str(rgb.parent), rgb.name]
    table.to_csv(tmp_path / "ld.csv", index=False)
    out = tmp_path / "prep"
    rc, text = run_cli(
        "prepare", f"prepare.load_data={tmp_path / 'ld.csv'}", f"prepare.out_dir={out}"
    )
    assert rc == 2 and "Traceback" not in text, text
    h, w = grey.shape
    assert "rgb.tif" in text and f"RGB image of {h}x{w} pixels with 3 colour samples" in text
    assert "crop_size" not in text and f"{w}x3" not in text


# ---- §5 a full disk (fault injection: the write system call fails with ENOSPC) ------------------


def _disk_full_under(monkeypatch, folder: Path, call: str = "fsync") -> None:
    """`os.<call>` (fsync: every atomic write; pwrite: the lock file) fails with ENOSPC for files
    under `folder`, as on a full disk; everything else is written as usual."""
    import errno
    import os

    real = getattr(os, call)

    def fail(fd, *args):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, *args)

    monkeypatch.setattr(os, call, fail)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".celldino-" in p.name]


def test_disk_full_while_profile_writes_hdf5(tmp_path, monkeypatch, run_cli):
    import anndata as ad

    from celldino.io.embeddings import shard_name, write_manifest

    rng = np.random.default_rng(0)
    cells = pd.DataFrame(
        {
            "Metadata_Plate": "P1",
            "Metadata_Well": np.repeat([f"A{i:02d}" for i in range(8)], 5),
            "Metadata_pert_type": np.repeat(["control"] * 4 + ["trt"] * 4, 5),
        }
    )
    for f in range(6):
        cells[f"emb_{f}"] = rng.normal(size=len(cells))
    emb = tmp_path / "emb"
    emb.mkdir()
    cells.to_parquet(emb / shard_name(0), index=False)
    write_manifest(emb, {"complete": True, "shards": [shard_name(0)]})
    out = tmp_path / "profiles"
    out.mkdir()
    (out / "kept.txt").write_text("an earlier result")

    def full_disk(self, filename, *args, **kwargs):  # HDF5's own words for ENOSPC
        Path(filename).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # half a file
        raise OSError(
            "Can't write data (file write failed: time = Mon Dec  7 22:00:00 2026, filename = "
            f"'{filename}', errno = 28, error message = 'No space left on device')"
        )

    monkeypatch.setattr(ad.AnnData, "write_h5ad", full_disk)
    rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={out}/wells.h5ad")
    assert rc == 2 and "Traceback" not in text, text
    # the file that failed: the profiles or the aggregated wells written before them
    assert re.search(rf"{re.escape(str(out))}/wells\S*\.h5ad: No space left on device", text)
    assert not (out / "wells.h5ad").exists() and _leftovers(out) == []
    assert (out / "kept.txt").read_text() == "an earlier result"


def test_disk_full_while_evaluate_writes(tmp_path, monkeypatch, run_cli):
    path = _collapsed(tmp_path)
    (tmp_path / "spec.yaml").write_text("analyses: [map_replicate]\n")
    out = tmp_path / "ev"
    out.mkdir()
    (out / "kept.txt").write_text("an earlier result")
    _disk_full_under(monkeypatch, out)
    rc, text = run_cli(
        "evaluate", path, "--spec", tmp_path / "spec.yaml", f"evaluate.out_dir={out}"
    )
    assert rc == 2 and "Traceback" not in text, text
    assert str(out) in text and "No space left on device" in text
    assert _leftovers(out) == [] and not (out / "summary.json").exists()
    assert (out / "kept.txt").read_text() == "an earlier result"


def test_disk_full_on_the_lock_file(tmp_path, prep, monkeypatch, run_cli):
    ckpt = _checkpoint(tmp_path / "m.safetensors", {})
    out = tmp_path / "emb"
    _disk_full_under(monkeypatch, out, "pwrite")
    rc, text = _extract(run_cli, ckpt, prep, out)
    assert rc == 2 and "Traceback" not in text, text
    assert f"cannot write the lock file {out / '.celldino.lock'}" in text
    assert "No space left on device" in text
    assert not out.exists() or list(out.iterdir()) == []  # no empty lock file left behind


def test_disk_full_while_report_writes(tmp_path, monkeypatch, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("the earlier report")
    _disk_full_under(monkeypatch, out)
    rc, text = run_cli("report", run, "--out", out / "report.html")
    assert rc == 2 and "Traceback" not in text, text
    assert str(out / "report.html") in text and "No space left on device" in text
    assert (out / "report.html").read_text() == "the earlier report"
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]  # no temp, no lock file


def test_truncated_pipeline_record_through_run(tmp_path, four_sites, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.json").write_text('{"stages": {"prepare": {"fingerprint": "ab')
    before = _snapshot(run)
    rc, text = run_cli("run", f"run.out_dir={run}", f"prepare.load_data={four_sites}")
    assert rc == 2 and "Traceback" not in text, text
    assert str(run / "pipeline.json") in text and "not valid JSON" in text
    assert "delete it and rerun: every stage in run.stages then runs again" in text
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if k in before} == before


def test_damaged_evaluation_part_is_computed_again(tmp_path, run_cli):
    path = _collapsed(tmp_path)
    (tmp_path / "spec.yaml").write_text("analyses: [map_replicate]\n")
    out = tmp_path / "ev"
    args = ("evaluate", path, "--spec", tmp_path / "spec.yaml", f"evaluate.out_dir={out}")
    assert run_cli(*args, "evaluate.null_size=50")[0] == 0
    first = pd.read_csv(out / "metrics.csv")
    (part,) = (out / "parts").glob("map_replicate__*.json")
    _truncate(part)
    rc, text = run_cli(*args, "evaluate.null_size=50")
    assert rc == 0 and "Traceback" not in text, text
    assert part.name in text and "runs again" in text
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"), first)
    json.loads(part.read_text())  # rewritten whole
