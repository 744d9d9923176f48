"""Hostile inputs and faults for train and extract (issue 11): each case asserts the exit code,
that the one-line message names the file / key / cells, and that nothing already written was lost
or changed. Tiny ViTs (depth 1-2, 16 px crops of 8 px patches) on a handful of crops.

Disk-full cases simulate ENOSPC by monkeypatching the module-level write function (no real disk
is filled). Read-only folders come from the `read_only` fixture (chmod 555, or chattr +i as root,
which ignores mode bits).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from celldino.config import ModelConfig
from celldino.io.checkpoints import checkpoint_channels, write_safetensors
from celldino.io.configfile import save_config
from celldino.models import build_model
from train_helpers import one_thread, tiny_config  # noqa: F401

CHANNELS = ["DNA", "ER", "Mito"]
SIDE = 16
DEPTH2 = "model.depth=2"


# ---- helpers -----------------------------------------------------------------------------------


def make_prep(
    prep_dir: Path,
    n: int = 8,
    channels: list[str] = CHANNELS,
    *,
    seed: int = 0,
    order: list[str] | None = None,
    nan_rows: tuple[int, ...] = (),
) -> Path:
    """A prep folder of n random crops with named channels; `order` stores the same crops with
    the channels permuted (names permuted with them)."""
    from celldino.io.cropstore import CropStore

    rng = np.random.default_rng(seed)
    crops = rng.random((n, len(channels), SIDE, SIDE), dtype=np.float32)  # (N, C, H, W)
    for r in nan_rows:
        crops[r, 0, 2:5, 2:5] = np.nan
    names = list(channels)
    if order is not None:
        crops = crops[:, [channels.index(c) for c in order]]
        names = list(order)
    meta = pd.DataFrame(
        {
            "Metadata_CellID": [f"c{i}" for i in range(n)],
            "Metadata_Plate": "P1",
            "Metadata_Well": [f"A{i % 3:02d}" for i in range(n)],
        }
    )
    store = CropStore(
        prep_dir,
        channels=names,
        crop_size=SIDE,
        dtype=np.float32,
        attrs={"normalization": {"method": "none"}},
    )
    store.append("all", crops, meta)
    store.finalize()
    return prep_dir


def train_args(run_dir: Path, prep: Path, *extra: str) -> list[str]:
    """`celldino train` arguments of a tiny run (a YAML of tiny_config + overrides)."""
    cfg = tiny_config(run_dir, "train.epochs=1", "model.in_chans=3", DEPTH2, data=prep)
    path = save_config(cfg, run_dir.parent / f"{run_dir.name}.yaml")
    return ["train", str(path), *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path → bytes), the lock file aside."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".celldino.lock"
    }


def model_cfg(**kw) -> ModelConfig:
    base = dict(
        arch="vit_tiny", patch_size=8, in_chans=3, img_size=SIDE, depth=1, drop_path_rate=0.0
    )
    return ModelConfig(**{**base, **kw})


def save_checkpoint(
    path: Path, mcfg: ModelConfig, channels: list[str] | None = CHANNELS, seed: int = 0
):
    """A celldino checkpoint file of a random model (teacher = student), with channel names."""
    torch.manual_seed(seed)
    net = build_model(mcfg).eval()
    sd = {
        f"{w}.backbone.{k}": v for w in ("teacher", "student") for k, v in net.state_dict().items()
    }
    write_safetensors(path, sd, {"model_config": dataclasses.asdict(mcfg)}, channels=channels)
    return path, net


def extract_args(ckpt: Path, prep: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract",
        f"extract.checkpoint={ckpt}",
        f"extract.data={prep}",
        f"extract.out_dir={out}",
        "extract.device=cpu",
        "extract.batch_size=4",
        *extra,
    ]


def emb(df: pd.DataFrame) -> np.ndarray:
    return df[[c for c in df.columns if c.startswith("emb_")]].to_numpy()


def read_emb(out: Path) -> pd.DataFrame:
    from celldino.extract import read_embeddings

    return read_embeddings(out)


def raw_crops(prep: Path) -> torch.Tensor:
    from celldino.data import CropDataset

    ds = CropDataset(prep)
    return torch.stack([ds[i] for i in range(len(ds))])  # (N, C, H, W)


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> Path:
    return make_prep(tmp_path_factory.mktemp("prep") / "prep")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prep) -> Path:
    """A finished 1-epoch run (2 steps); tests copy it before changing anything."""
    from celldino.train import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = tiny_config(run_dir, "train.epochs=1", "model.in_chans=3", DEPTH2, data=prep)
    train(cfg)
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".celldino.lock"))
    return dst


def resume_args(run_dir: Path, prep: Path, *extra: str) -> list[str]:
    """Resume `run_dir` with its own config.yaml plus overrides."""
    return [
        "train",
        str(run_dir / "config.yaml"),
        f"train.run_dir={run_dir}",
        f"train.data={prep}",
        *extra,
        "--resume",
    ]


# ---- 1. channel identity -----------------------------------------------------------------------


def test_trained_checkpoint_records_channels_and_data(trained, prep):
    from celldino.train.checkpoint import read_run_metadata

    ckpt = trained / "checkpoints" / "last.safetensors"
    assert checkpoint_channels(ckpt) == CHANNELS
    assert checkpoint_channels(trained / "checkpoints" / "epoch_0001.safetensors") == CHANNELS
    data = read_run_metadata(trained)["data"]
    assert data["n"] == 8 and data["channels"] == CHANNELS and data["cells_sha256_16"]


def test_permuted_store_is_reordered_by_name(run_cli, prep, tmp_path):
    """The same crops stored as [Mito, DNA, ER] give the embeddings of the [DNA, ER, Mito] store,
    and both equal the model's own forward pass on the crops in the checkpoint's order."""
    ckpt, net = save_checkpoint(tmp_path / "m.safetensors", model_cfg())
    permuted = make_prep(tmp_path / "permuted", order=["Mito", "DNA", "ER"])
    rc, text = run_cli(*extract_args(ckpt, permuted, tmp_path / "e_perm"))
    assert rc == 0, text
    rc, text = run_cli(*extract_args(ckpt, prep, tmp_path / "e_orig"))
    assert rc == 0, text
    got, orig = read_emb(tmp_path / "e_perm"), read_emb(tmp_path / "e_orig")
    # independent reorder: the permuted store's crops put back by hand
    x = raw_crops(permuted)[:, [1, 2, 0]]  # stored [Mito, DNA, ER] → [DNA, ER, Mito]
    with torch.no_grad():
        ref = net(x)["cls"].numpy()
    np.testing.assert_allclose(emb(got), ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(emb(got), emb(orig))
    from celldino.extract import read_manifest

    assert read_manifest(tmp_path / "e_perm")["channels"] == CHANNELS


def test_missing_channel_is_named(run_cli, tmp_path):
    ckpt, _ = save_checkpoint(tmp_path / "m.safetensors", model_cfg())
    other = make_prep(tmp_path / "other", channels=["DNA", "ER", "AGP"])
    out = tmp_path / "e"
    rc, text = run_cli(*extract_args(ckpt, other, out))
    assert rc == 2, text
    assert "['Mito']" in text and str(ckpt) in text and "extract.channels" in text
    assert not list(out.glob("part-*")) if out.exists() else True


def test_channel_adaptive_subset_uses_the_named_ids(run_cli, prep, tmp_path):
    """extract.channels=[Mito, ER] on a channel-adaptive model trained on [DNA, ER, Mito] uses
    channel ids [2, 1] (not [0, 1])."""
    ckpt, net = save_checkpoint(
        tmp_path / "ca.safetensors", model_cfg(channel_mode="channel_adaptive")
    )
    rc, text = run_cli(*extract_args(ckpt, prep, tmp_path / "e", "extract.channels=[Mito,ER]"))
    assert rc == 0, text
    x = raw_crops(prep)[:, [2, 1]]  # (N, 2, H, W): Mito, ER
    with torch.no_grad():
        right = net(x, channel_ids=torch.tensor([2, 1]))["cls"].numpy()
        wrong = net(x, channel_ids=torch.tensor([0, 1]))["cls"].numpy()
    got = emb(read_emb(tmp_path / "e"))
    np.testing.assert_allclose(got, right, atol=1e-5, rtol=1e-5)
    assert not np.allclose(got, wrong, atol=1e-3)
    # a channel the model never saw is refused by name
    rc, text = run_cli(*extract_args(ckpt, prep, tmp_path / "e2", "extract.channels=[Mito,GFP]"))
    assert rc == 2 and "GFP" in text


def test_fine_tuning_reads_the_pretrained_channel_order(run_cli, trained, tmp_path):
    """model.pretrained recorded [DNA, ER, Mito]: a prep stored as [Mito, DNA, ER] is read in
    the pretrained order; an explicit train.channels in another order is refused."""
    permuted = make_prep(tmp_path / "permuted", order=["Mito", "DNA", "ER"])
    pre = f"model.pretrained={trained / 'checkpoints' / 'last.safetensors'}"
    rc, text = run_cli(*train_args(tmp_path / "ft", permuted, pre))
    assert rc == 0, text
    assert checkpoint_channels(tmp_path / "ft/checkpoints/last.safetensors") == CHANNELS
    rc, text = run_cli(*train_args(tmp_path / "ft2", permuted, pre, "train.channels=[ER,DNA,Mito]"))
    assert rc == 2, text
    assert "train.channels" in text and "['DNA', 'ER', 'Mito']" in text


# ---- 2. resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, named",
    [
        ("model.depth=1", "model.depth: 2 → 1"),
        ("train.lr=0.001", "train.lr: 0.0005 → 0.001"),
        ("augment.hflip_p=0.0", "augment.hflip_p"),
    ],
)
def test_resume_with_changed_settings_is_refused_and_writes_nothing(
    run_cli, trained, prep, tmp_path, change, named
):
    run_dir = copy_run(trained, tmp_path / "run")
    before = snapshot(run_dir)
    rc, text = run_cli(*resume_args(run_dir, prep, "train.epochs=2", change))
    assert rc == 2, text
    assert named in text and str(run_dir) in text and "Traceback" not in text
    assert snapshot(run_dir) == before  # config.yaml, checkpoints, metrics untouched


def test_resume_may_add_epochs_and_change_speed_settings(run_cli, trained, prep, tmp_path):
    run_dir = copy_run(trained, tmp_path / "run")
    rc, text = run_cli(
        *resume_args(run_dir, prep, "train.epochs=2", "train.log_every=5", "train.save_every=0")
    )
    assert rc == 0, text
    state = torch.load(run_dir / "checkpoints/last.state.pt", weights_only=True)
    assert state["step"] == 4 and "epochs: 2" in (run_dir / "config.yaml").read_text()


def test_resume_on_changed_data_is_refused(run_cli, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path / "run")
    before = snapshot(run_dir)
    redrawn = make_prep(tmp_path / "redrawn", n=9, seed=1)
    rc, text = run_cli(*resume_args(run_dir, redrawn, "train.epochs=2"))
    assert rc == 2, text
    assert "data cells: 8 → 9" in text and "cells_sha256_16" in text
    assert snapshot(run_dir) == before


# ---- 3. silent garbage -------------------------------------------------------------------------


def test_nan_crops_are_a_data_error_naming_the_cells(run_cli, tmp_path):
    bad = make_prep(tmp_path / "nanprep", nan_rows=(3, 6))
    run_dir = tmp_path / "run"
    rc, text = run_cli(*train_args(run_dir, bad, "train.batch_size=8"))
    assert rc == 2, text
    assert "c3" in text and "c6" in text and str(bad) in text and "NaN" in text
    assert "train.lr" not in text
    assert not (run_dir / "checkpoints" / "last.safetensors").exists()


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_nonpositive_epochs_refused(run_cli, prep, tmp_path, epochs):
    run_dir = tmp_path / "run"
    rc, text = run_cli(*train_args(run_dir, prep, f"train.epochs={epochs}"))
    assert rc == 2, text
    assert "train.epochs" in text and "0 steps" not in text
    assert not (run_dir / "checkpoints").exists()


def test_empty_prep_and_too_large_batch(run_cli, tmp_path):
    empty = make_prep(tmp_path / "empty", n=0)
    rc, text = run_cli(*train_args(tmp_path / "r0", empty))
    assert rc == 2, text
    assert "0 cells" in text and str(empty) in text and "batch" not in text
    small = make_prep(tmp_path / "small", n=3)
    rc, text = run_cli(*train_args(tmp_path / "r3", small))
    assert rc == 2, text
    assert "3 cells" in text and "train.batch_size=2" in text
    assert not (tmp_path / "r0" / "checkpoints").exists()


def test_nan_crops_at_extraction_are_named(run_cli, tmp_path):
    bad = make_prep(tmp_path / "nanprep", nan_rows=(5,))
    ckpt, _ = save_checkpoint(tmp_path / "m.safetensors", model_cfg())
    rc, text = run_cli(*extract_args(ckpt, bad, tmp_path / "e"))
    assert rc == 0, text  # the other cells are fine; profile drops non-finite rows or features
    assert "1 cells" in text and "c5" in text and "NaN/inf embeddings" in text


def test_nan_weights_refused_at_extract_and_load(run_cli, prep, tmp_path):
    from celldino.io.checkpoints import CheckpointError, read_state_dict
    from celldino.models import load_backbone

    ckpt, _ = save_checkpoint(tmp_path / "good.safetensors", model_cfg())
    sd = read_state_dict(ckpt)
    sd["teacher.backbone.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    write_safetensors(bad, sd, {"model_config": dataclasses.asdict(model_cfg())}, channels=CHANNELS)
    out = tmp_path / "e"
    rc, text = run_cli(*extract_args(bad, prep, out))
    assert rc == 2, text
    assert str(bad) in text and "blocks.0.attn.qkv.weight" in text and "NaN" in text
    assert not list(out.glob("part-*")) if out.exists() else True
    with pytest.raises(CheckpointError, match="qkv.weight"):
        load_backbone(bad)


# ---- 4. poisoned training state, foreign weights without metadata ------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_poisoned_state_refused_without_torch_advice(run_cli, trained, prep, tmp_path):
    run_dir = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    state = run_dir / "checkpoints" / "last.state.pt"
    torch.save({"step": 2, "x": evil}, state)
    before = snapshot(run_dir)
    rc, text = run_cli(*resume_args(run_dir, prep, "train.epochs=2"))
    assert rc == 2, text
    assert str(state) in text and "not a celldino training state" in text
    assert "weights_only" not in text and "Traceback" not in text
    assert not marker.exists()  # the pickle never ran
    assert snapshot(run_dir) == before


def test_malicious_weights_refused_before_any_code_runs(run_cli, prep, tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"x": evil}}, path)
    rc, text = run_cli(*extract_args(path, prep, tmp_path / "e"))
    assert rc == 2, text
    assert str(path) in text and "weights_only" not in text
    assert not marker.exists()


def test_weights_without_celldino_metadata(run_cli, prep, tmp_path):
    """No model_config metadata: a known width loads with the depth read from the shapes; an
    unknown width says which metadata is missing and how to give the architecture."""
    torch.manual_seed(0)
    net = build_model(model_cfg(depth=2)).eval()
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, net.state_dict())  # no metadata at all
    rc, text = run_cli(*extract_args(plain, prep, tmp_path / "e"))
    assert rc == 0, text
    with torch.no_grad():
        ref = net(raw_crops(prep))["cls"].numpy()
    np.testing.assert_allclose(emb(read_emb(tmp_path / "e")), ref, atol=1e-5, rtol=1e-5)

    odd = {k: v for k, v in net.state_dict().items()}
    odd = {k: (v[..., :100] if k in ("cls_token", "pos_embed") else v) for k, v in odd.items()}
    weird = tmp_path / "weird.safetensors"
    write_safetensors(weird, odd)
    rc, text = run_cli(*extract_args(weird, prep, tmp_path / "e2"))
    assert rc == 2, text
    assert "width 100" in text and "model_config" in text and "model.arch" in text
    assert "no known architecture has width" not in text


# ---- 5. disk full, read-only folders -----------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (simulated)")


@pytest.mark.parametrize("fail_on", ["weights", "state"])
def test_disk_full_while_saving_a_checkpoint_keeps_the_old_one(
    run_cli, trained, prep, tmp_path, monkeypatch, fail_on
):
    """ENOSPC (simulated) on the weights or on the training state written after them: the
    previous last.safetensors + last.state.pt pair stays byte-identical and resumable."""
    import celldino.train.checkpoint as ck

    run_dir = copy_run(trained, tmp_path / "run")
    ckpt = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    real = ck.atomic_write_bytes
    calls = []

    def full_disk(path, data):
        calls.append(path)
        if fail_on == "weights" or len(calls) == 2:
            _enospc()
        return real(path, data)

    monkeypatch.setattr(ck, "atomic_write_bytes", full_disk)
    rc, text = run_cli(*resume_args(run_dir, prep, "train.epochs=2", "train.save_every=0"))
    assert rc == 2, text
    name = "last.safetensors" if fail_on == "weights" else "last.state.pt"
    assert str(ckpt / name) in text and "No space left" in text and "Traceback" not in text
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # no leftovers either
    monkeypatch.undo()
    rc, text = run_cli(*resume_args(run_dir, prep, "train.epochs=2"))
    assert rc == 0, text  # the kept pair resumes


def test_disk_full_while_writing_a_shard(run_cli, prep, tmp_path, monkeypatch):
    """ENOSPC (simulated) on the third shard: shards already written stay whole, the manifest
    says incomplete, and a rerun finishes with the embeddings of an uninterrupted run."""
    import celldino.io.embeddings as w

    ckpt, _ = save_checkpoint(tmp_path / "m.safetensors", model_cfg())
    out = tmp_path / "e"
    args = extract_args(ckpt, prep, out, "extract.shard_size=2")
    real = w.atomic_write_bytes
    calls = []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) == 3:
            _enospc()
        return real(path, data)

    monkeypatch.setattr(w, "atomic_write_bytes", full_disk)
    rc, text = run_cli(*args)
    assert rc == 2, text
    assert str(out / "part-00002.parquet") in text and "No space left" in text
    kept = snapshot(out)
    assert sorted(k for k in kept if k.startswith("part-")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    rc, text = run_cli(*args)
    assert rc == 0, text
    assert all((out / k).read_bytes() == v for k, v in kept.items() if k.startswith("part-"))
    rc, _ = run_cli(*extract_args(ckpt, prep, tmp_path / "whole", "extract.shard_size=2"))
    np.testing.assert_array_equal(emb(read_emb(out)), emb(read_emb(tmp_path / "whole")))


def test_read_only_output_folders_fail_before_work(run_cli, prep, tmp_path, read_only):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "kept.txt").write_text("kept")
    read_only(ro)
    before = snapshot(ro)
    rc, text = run_cli(*train_args(tmp_path / "unused", prep, f"train.run_dir={ro}"))
    assert rc == 2, text
    assert f"cannot write to {ro}" in text and "train.run_dir" in text
    ckpt, _ = save_checkpoint(tmp_path / "m.safetensors", model_cfg())
    rc, text = run_cli(*extract_args(ckpt, prep, ro))
    assert rc == 2, text
    assert f"cannot write to {ro}" in text and "extract.out_dir" in text
    assert snapshot(ro) == before


# ---- 6. concurrent writers ---------------------------------------------------------------------

HOLD = """
import sys, time
from celldino.io.lock import output_lock
with output_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("stage", ["extract", "train"])
def test_second_writer_is_refused_naming_the_holder(run_cli, prep, trained, tmp_path, stage):
    ckpt, _ = save_checkpoint(tmp_path / "m.safetensors", model_cfg())
    if stage == "extract":
        folder = tmp_path / "e"
        assert run_cli(*extract_args(ckpt, prep, folder))[0] == 0
        args = extract_args(ckpt, prep, folder, "extract.feature=patch_mean", "--overwrite")
    else:
        folder = copy_run(trained, tmp_path / "run")
        args = resume_args(folder, prep, "train.epochs=2")
    before = snapshot(folder)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), stage],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, text = run_cli(*args)
    finally:
        holder.kill()  # the process this test started, by its handle
        holder.wait()
    assert rc == 2, text
    assert f"pid {holder.pid}" in text and f"'{stage}'" in text and str(folder) in text
    assert snapshot(folder) == before


# ---- 7. progress in batch logs -----------------------------------------------------------------


def test_progress_lines_per_epoch_and_per_shards(run_cli, prep, tmp_path):
    rc, text = run_cli(*train_args(tmp_path / "run", prep, "train.epochs=2"))
    assert rc == 0, text
    for ep in (1, 2):
        assert f"epoch {ep}/2: loss" in text
    assert "teacher entropy" in text and " lr " in text
    ckpt, _ = save_checkpoint(tmp_path / "m.safetensors", model_cfg())
    rc, text = run_cli(*extract_args(ckpt, prep, tmp_path / "e", "extract.shard_size=2"))
    assert rc == 0, text
    assert "4 of 4 shards written" in text


# ---- 8. an embeddings folder is one Parquet dataset --------------------------------------------


def test_embeddings_folder_reads_as_one_parquet_dataset(run_cli, prep, tmp_path):
    ckpt, _ = save_checkpoint(tmp_path / "m.safetensors", model_cfg())
    out = tmp_path / "e"
    rc, text = run_cli(*extract_args(ckpt, prep, out, "extract.shard_size=3"))
    assert rc == 0, text
    assert (out / ".celldino.lock").exists() and (out / "_manifest.json").exists()
    whole = pd.read_parquet(out)  # pyarrow skips the dot- and underscore-files
    ref = read_emb(out)
    key = "Metadata_CellID"
    pd.testing.assert_frame_equal(
        whole.sort_values(key).reset_index(drop=True), ref.sort_values(key).reset_index(drop=True)
    )


# ---- 9. the second hostile sweep (#149/#151, #29, #30, #113, #25, #91, #92, #34) ---------------


def test_train_never_overwrites_a_trained_checkpoint(run_cli, trained, prep, tmp_path):
    """#149/#151: a run dir with last.safetensors but no last.state.pt. Without --resume the
    run is refused naming the run dir; with --resume it is refused naming the missing state.
    Either way the trained weights stay byte-identical."""
    run_dir = copy_run(trained, tmp_path / "run")
    (run_dir / "checkpoints" / "last.state.pt").unlink()
    before = snapshot(run_dir)
    rc, text = run_cli(*train_args(run_dir, prep))
    assert rc == 2, text
    assert str(run_dir) in text and "--resume" in text and "another train.run_dir" in text
    assert "remove" in text and "Traceback" not in text
    assert snapshot(run_dir) == before
    rc, text = run_cli(*resume_args(run_dir, prep))
    assert rc == 2, text
    assert str(run_dir / "checkpoints" / "last.state.pt") in text and "cannot resume" in text
    assert "starting from scratch" not in text
    assert snapshot(run_dir) == before
    # a complete run is refused as well without --resume (the weights are kept)
    full = copy_run(trained, tmp_path / "full")
    before = snapshot(full)
    rc, text = run_cli(*train_args(full, prep))
    assert rc == 2 and str(full) in text and "--resume" in text, text
    assert snapshot(full) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu_is_refused(run_cli, prep, tmp_path):
    """#29: train.device=cuda with no GPU: one line naming train.device, nothing written."""
    run_dir = tmp_path / "run"
    rc, text = run_cli(*train_args(run_dir, prep, "train.device=cuda"))
    assert rc == 2, text
    assert "train.device" in text and "no CUDA GPU" in text and "Traceback" not in text
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_extract_cuda_device_without_a_gpu_is_refused(run_cli, prep, trained, tmp_path):
    """extract.device=cuda with no GPU: one line naming extract.device (celldino.distributed)."""
    out = tmp_path / "emb"
    rc, text = run_cli(*extract_args(trained, prep, out, "extract.device=cuda"))
    assert rc == 2, text
    assert "extract.device" in text and "no CUDA GPU" in text and "Traceback" not in text
    assert not list(out.glob("part-*.parquet"))


def test_unknown_weak_label_is_refused_before_writing(run_cli, prep, tmp_path):
    """#30: train.weak_label=Metadata_Nope: named with the columns there are; no config.yaml."""
    run_dir = tmp_path / "run"
    rc, text = run_cli(*train_args(run_dir, prep, "train.weak_label=Metadata_Nope"))
    assert rc == 2, text
    assert "train.weak_label='Metadata_Nope'" in text and "Metadata_Well" in text
    assert str(prep) in text and "Traceback" not in text
    assert not run_dir.exists()


def test_model_channel_count_against_the_prep(run_cli, prep, tmp_path):
    """#113: a 5-channel model on a 3-channel prep is refused naming model.in_chans and the
    prep's channels, before config.yaml is written."""
    run_dir = tmp_path / "run"
    rc, text = run_cli(*train_args(run_dir, prep, "model.in_chans=5"))
    assert rc == 2, text
    assert "model.in_chans=5" in text and "3 channels" in text and str(prep) in text
    assert "['DNA', 'ER', 'Mito']" in text and "Traceback" not in text
    assert not run_dir.exists()


def test_channels_fed_in_place_of_others_are_named(run_cli, tmp_path):
    """#28: extract.channels that replace a checkpoint channel by position: the warning says which
    channel stands in for which (it said `feeds []` when the replacement was a known name)."""
    ckpt, _ = save_checkpoint(tmp_path / "m.safetensors", model_cfg())
    four = make_prep(tmp_path / "four", channels=["DNA", "ER", "Mito", "AGP"])
    rc, text = run_cli(*extract_args(ckpt, four, tmp_path / "e", "extract.channels=[DNA,AGP,ER]"))
    assert rc == 0, text
    assert "AGP as ER, ER as Mito" in text and str(ckpt) in text and "feeds []" not in text


@pytest.mark.parametrize("content", [b"not a model\n", b"\x00" * 64])
def test_a_file_that_is_not_a_checkpoint_is_named(run_cli, prep, tmp_path, content):
    """#25: extract.checkpoint= a text file gave `KeyError: 105` from torch's unpickler."""
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    out = tmp_path / "e"
    rc, text = run_cli(*extract_args(path, prep, out))
    assert rc == 2, text
    assert str(path) in text and "neither safetensors nor a torch file" in text
    assert "Traceback" not in text and "KeyError" not in text
    assert not list(out.glob("part-*")) if out.exists() else True


@pytest.mark.parametrize(
    "extra, named",
    [
        (("extract.feature=block", "extract.block=99"), "extract.block=99"),
        (("extract.feature=last_blocks", "extract.n_blocks=99"), "extract.n_blocks=99"),
    ],
)
def test_blocks_beyond_the_model_depth_are_refused(run_cli, prep, tmp_path, extra, named):
    """#91/#92: a block index or block count beyond the model's depth: one line, nothing written."""
    ckpt, _ = save_checkpoint(tmp_path / "m.safetensors", model_cfg(depth=2))
    out = tmp_path / "e"
    rc, text = run_cli(*extract_args(ckpt, prep, out, *extra))
    assert rc == 2, text
    assert named in text and ("2 blocks" in text or "depth 2" in text), text
    assert "Traceback" not in text
    assert not list(out.glob("part-*")) if out.exists() else True


def test_extract_from_an_interrupted_training_warns_and_records_the_step(
    run_cli, trained, prep, tmp_path
):
    """#34: a checkpoint saved at step 1 of 2 (an interrupted run): extract warns naming it, its
    step/epoch and the planned total, and the manifest records them; a finished run does not."""
    from celldino.extract import read_manifest
    from celldino.train import train

    run_dir = tmp_path / "run"
    train(
        tiny_config(run_dir, "train.epochs=1", "model.in_chans=3", DEPTH2, data=prep),
        stop_at_step=1,
    )
    ckpt = run_dir / "checkpoints" / "last.safetensors"
    rc, text = run_cli(*extract_args(ckpt, prep, tmp_path / "e"))
    assert rc == 0, text
    assert str(ckpt) in text and "step 1 of 2" in text and "epoch 1 of 1" in text
    assert "--resume" in text
    training = read_manifest(tmp_path / "e")["training"]
    assert training["step"] == 1 and training["total_steps"] == 2 and training["epochs"] == 1
    done = trained / "checkpoints" / "last.safetensors"
    rc, text = run_cli(*extract_args(done, prep, tmp_path / "e2"))
    assert rc == 0, text
    assert "planned end" not in text
    assert read_manifest(tmp_path / "e2")["training"]["step"] == 2


def test_interrupt_message_says_what_to_run(run_cli, prep, tmp_path, monkeypatch):
    """#35: after Ctrl-C, `train` says to rerun with --resume (a plain rerun is refused), and
    that rerun continues; other commands say a plain rerun resumes."""
    import celldino.train.loop as loop

    real = loop.append_metrics

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    args = train_args(run_dir, prep)
    monkeypatch.setattr(loop, "append_metrics", interrupt)  # Ctrl-C after step 1
    rc, text = run_cli(*args)
    assert rc == 130, text
    assert "rerun the same command with --resume" in text and "Traceback" not in text
    monkeypatch.setattr(loop, "append_metrics", real)
    before = snapshot(run_dir)
    rc, text = run_cli(*args)
    assert rc == 2 and "--resume" in text, text  # a plain rerun is refused, as the message said
    assert snapshot(run_dir) == before
    rc, text = run_cli(*args, "--resume")
    assert rc == 0 and "resuming" in text, text

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr("celldino.extract.extract", interrupted)
    rc, text = run_cli(*extract_args(tmp_path / "m.safetensors", prep, tmp_path / "e"))
    assert rc == 130 and "rerun the same `celldino extract` command to resume" in text, text
    assert "--resume" not in text


def test_bad_pretrained_weights_leave_no_config_behind(run_cli, prep, tmp_path):
    """config.yaml is the first file `train` writes, after the model is built (#30's rule):
    model.pretrained= a file that is not a checkpoint leaves the run dir without files."""
    bad = tmp_path / "bad.pth"
    bad.write_text("not weights\n")
    run_dir = tmp_path / "run"
    rc, text = run_cli(*train_args(run_dir, prep, f"model.pretrained={bad}"))
    assert rc == 2, text
    assert str(bad) in text and "Traceback" not in text
    assert not snapshot(run_dir) if run_dir.exists() else True


def test_a_channel_named_twice_is_refused_by_the_library_calls_too(prep, tmp_path):
    """#140: train.channels / extract.channels with a repeated name, set past the config loader
    (dataclasses.replace): refused naming the setting, nothing written."""
    from celldino.config import ConfigError, ExtractConfig
    from celldino.extract import extract
    from celldino.extract.extractor import ExtractError
    from celldino.train import train

    cfg = tiny_config(tmp_path / "run", "model.in_chans=3", data=prep)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, channels=("DNA", "DNA")))
    with pytest.raises(ConfigError, match=r"train.channels=.*'DNA'.*more than once"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    ckpt, _ = save_checkpoint(tmp_path / "m.safetensors", model_cfg())
    ecfg = ExtractConfig(
        checkpoint=str(ckpt),
        data=str(prep),
        out_dir=str(tmp_path / "e"),
        device="cpu",
        channels=("DNA", "DNA", "ER"),
    )
    with pytest.raises(ExtractError, match=r"extract.channels=.*'DNA'.*more than once"):
        extract(ecfg)
    assert not (tmp_path / "e").exists()
