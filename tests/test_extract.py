"""celldino extract: embeddings against an independent forward pass, feature modes against the
model's own output dict, whole fields, attention, resume, refusal, bad input and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from celldino.config import ExtractConfig, ModelConfig, PrepareConfig
from celldino.errors import IncompleteInputError
from celldino.extract import ExtractError, extract, read_attention, read_embeddings
from celldino.io.checkpoints import write_safetensors
from celldino.io.embeddings import MANIFEST, read_manifest, shard_name
from celldino.models import build_model

CROP = 32  # crop side: 2 x 2 patches of 16 px


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread avoids spin-waiting when other tests load the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prep(tiny_screen, tmp_path_factory) -> Path:
    from celldino.data.prepare import prepare

    out = tmp_path_factory.mktemp("prep")
    cfg = PrepareConfig(
        load_data=str(tiny_screen / "load_data.csv"),
        out_dir=str(out),
        crop_size=CROP,
        features=False,
    )
    return prepare(cfg)


def _model_config(**kw) -> ModelConfig:
    base = dict(arch="vit_tiny", patch_size=16, in_chans=5, img_size=CROP, drop_path_rate=0.0)
    return ModelConfig(**{**base, **kw})


def _save_run(run_dir: Path, mcfg: ModelConfig, seed: int = 0) -> tuple[Path, dict]:
    """A celldino run dir in the training layout; teacher and student differ."""
    torch.manual_seed(seed)
    teacher, student = build_model(mcfg), build_model(mcfg)
    sd = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    sd |= {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    write_safetensors(
        run_dir / "checkpoints" / "last.safetensors",
        sd,
        {"model_config": dataclasses.asdict(mcfg)},
    )
    return run_dir, {"teacher": teacher.eval(), "student": student.eval()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _save_run(tmp_path_factory.mktemp("run"), _model_config())


def _crops(prep: Path) -> torch.Tensor:
    from celldino.data import CropDataset

    ds = CropDataset(prep)
    return torch.stack([ds[i] for i in range(len(ds))])  # (N, C, H, W)


@pytest.fixture(scope="module")
def reference(prep, run):
    """Direct forward of the teacher on every normalised crop, with blocks."""
    x = _crops(prep)
    with torch.no_grad():
        return run[1]["teacher"](x, return_blocks=True)


def _cfg(prep, run_dir, out, **kw) -> ExtractConfig:
    base = dict(
        checkpoint=str(run_dir), data=str(prep), out_dir=str(out), batch_size=24, shard_size=64
    )
    return ExtractConfig(**{**base, **kw})


def _emb(df: pd.DataFrame) -> np.ndarray:
    return df[[c for c in df.columns if c.startswith("emb_")]].to_numpy()


# ---- numbers ---------------------------------------------------------------------------------


def test_embeddings_equal_direct_forward_with_metadata(prep, run, reference, tmp_path):
    out = extract(_cfg(prep, run[0], tmp_path / "emb"))
    df = read_embeddings(out)
    cells = pd.read_parquet(prep / "cells.parquet")
    meta_cols = [c for c in cells.columns if c.startswith("Metadata_")]
    assert list(df.columns[: len(meta_cols)]) == meta_cols
    pd.testing.assert_frame_equal(df[meta_cols], cells[meta_cols])
    emb = _emb(df)
    assert emb.dtype == np.float32 and emb.shape == (len(cells), 192)
    np.testing.assert_allclose(emb, reference["cls"].numpy(), atol=1e-5, rtol=1e-5)
    m = read_manifest(out)
    assert m["complete"] and m["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert m["checkpoint"]["which"] == "teacher" and len(m["checkpoint"]["sha256_16"]) == 16
    assert m["n_rows"] == len(cells) and len(m["shards"]) == -(-len(cells) // 64)


def test_cells_resized_to_the_trained_crop_size(prep, tmp_path):
    """A checkpoint trained on 16 px global crops sees the 32 px cells at 16 px (the patch grid it
    learned on), sampled as training samples a whole-cell crop; resize=0 keeps them as stored."""
    from safetensors.torch import load_file

    from celldino.io.checkpoints import TRAIN_CROP_SIZE

    mcfg = _model_config(patch_size=8)
    run_dir, nets = _save_run(tmp_path / "run", mcfg)
    file = run_dir / "checkpoints" / "last.safetensors"
    meta = {"model_config": dataclasses.asdict(mcfg), TRAIN_CROP_SIZE: "16"}
    write_safetensors(file, load_file(str(file)), meta)
    x = _crops(prep)
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        want16 = nets["teacher"](small)["cls"].numpy()
        want32 = nets["teacher"](x)["cls"].numpy()
    out = extract(_cfg(prep, run_dir, tmp_path / "auto", resize=-1))
    np.testing.assert_allclose(_emb(read_embeddings(out)), want16, atol=1e-5, rtol=1e-5)
    assert read_manifest(out)["features"]["resize"] == 16
    out = extract(_cfg(prep, run_dir, tmp_path / "stored"))  # the default: as stored
    np.testing.assert_allclose(_emb(read_embeddings(out)), want32, atol=1e-5, rtol=1e-5)
    assert "resize" not in read_manifest(out)["features"]
    # the same options as the first run: kept; another size: refused (the numbers differ)
    with pytest.raises(ExtractError, match="resize"):
        extract(_cfg(prep, run_dir, tmp_path / "auto", resize=24))
    with pytest.raises(ExtractError, match="extract.resize=16 applies to single cells"):
        extract(_cfg(prep, run_dir, tmp_path / "f", resize=16, level="field"))


def test_attention_grid_is_the_resized_cells_grid(prep, tmp_path):
    """Cells resized to the trained 16 px crops give a 2x2 patch grid (8 px patches), not the
    stored 32 px crops' 4x4: attrs `grid` must fit the maps and `cls_attention_maps`."""
    from safetensors.torch import load_file

    from celldino.eval.subcellular import cls_attention_maps
    from celldino.io.attention_store import read_attention_store
    from celldino.io.checkpoints import TRAIN_CROP_SIZE

    mcfg = _model_config(patch_size=8)
    run_dir, _ = _save_run(tmp_path / "run", mcfg)
    file = run_dir / "checkpoints" / "last.safetensors"
    meta = {"model_config": dataclasses.asdict(mcfg), TRAIN_CROP_SIZE: "16"}
    write_safetensors(file, load_file(str(file)), meta)
    out = extract(_cfg(prep, run_dir, tmp_path / "a", attention_sample=3, resize=-1))
    arrays, attrs = read_attention_store(out, ("attn", "attn_maps"))
    assert list(attrs["grid"]) == [16 // 8, 16 // 8] == list(arrays["attn_maps"].shape[-2:])
    maps = cls_attention_maps(
        arrays["attn"], grid=tuple(attrs["grid"]), num_prefix_tokens=1 + attrs["num_registers"]
    )
    np.testing.assert_allclose(maps, arrays["attn_maps"], atol=1e-6)


def test_student_network(prep, run, tmp_path):
    df = read_embeddings(extract(_cfg(prep, run[0], tmp_path / "s", which="student")))
    with torch.no_grad():
        ref = run[1]["student"](_crops(prep))["cls"].numpy()
    np.testing.assert_allclose(_emb(df), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "opts, expected",
    [
        ({"feature": "last_blocks", "n_blocks": 3}, lambda r: torch.cat(r["blocks"][-3:], -1)),
        ({"feature": "block", "block": 4}, lambda r: r["blocks"][4]),
        ({"feature": "block", "block": -1}, lambda r: r["cls"]),
        ({"feature": "patch_mean"}, lambda r: r["patch"].mean(1)),
        (
            {"feature": "cls_patch_mean"},
            lambda r: torch.cat([r["cls"], r["patch"].mean(1)], -1),
        ),
    ],
)
def test_feature_modes_match_model_dict(prep, run, reference, tmp_path, opts, expected):
    df = read_embeddings(extract(_cfg(prep, run[0], tmp_path / "f", **opts)))
    np.testing.assert_allclose(_emb(df), expected(reference).numpy(), atol=1e-5, rtol=1e-5)


def test_float16_and_h5ad(prep, run, reference, tmp_path):
    import anndata as ad

    out = extract(_cfg(prep, run[0], tmp_path / "h", dtype="float16", format="h5ad"))
    df = read_embeddings(out)
    emb = _emb(df)
    assert emb.dtype == np.float16
    np.testing.assert_allclose(emb, reference["cls"].numpy(), atol=2e-2, rtol=1e-2)
    adata = ad.read_h5ad(out / "embeddings.h5ad")
    np.testing.assert_array_equal(adata.X, emb.astype(np.float32))
    assert list(adata.obs["Metadata_CellID"]) == list(df["Metadata_CellID"])
    assert list(adata.var_names[:2]) == ["emb_0000", "emb_0001"]


def test_channelwise_rgb_model(prep, tmp_path):
    """An RGB model in the official DINO layout: each channel as grey RGB, features joined."""
    torch.manual_seed(3)
    rgb = build_model(_model_config(in_chans=3)).eval()
    write_safetensors(tmp_path / "dino_rgb.safetensors", rgb.state_dict())
    out = extract(
        _cfg(prep, tmp_path / "dino_rgb.safetensors", tmp_path / "cw", channel_mode="channelwise")
    )
    x = _crops(prep)
    with torch.no_grad():
        ref = torch.cat(
            [rgb(x[:, c : c + 1].expand(-1, 3, -1, -1))["cls"] for c in range(x.shape[1])], -1
        )
    np.testing.assert_allclose(_emb(read_embeddings(out)), ref.numpy(), atol=1e-5, rtol=1e-5)

    # adapt_channels: every channel gets the mean RGB kernel x 3/5, so the 5-channel model sees
    # what the RGB model sees on the grey image (channel mean) replicated to R=G=B
    out = extract(
        _cfg(prep, tmp_path / "dino_rgb.safetensors", tmp_path / "ad", adapt_channels=True)
    )
    with torch.no_grad():
        ref = rgb(x.mean(1, keepdim=True).expand(-1, 3, -1, -1))["cls"]
    np.testing.assert_allclose(_emb(read_embeddings(out)), ref.numpy(), atol=1e-4, rtol=1e-4)


def test_dino4cells_torch_checkpoint(prep, tmp_path):
    """A DINO4Cells-style training checkpoint (.pth: teacher/student with `module.backbone.`
    prefixes, head weights and an argparse Namespace) loads without unpickling objects."""
    import argparse

    torch.manual_seed(5)
    teacher, student = build_model(_model_config()).eval(), build_model(_model_config())
    ckpt = {
        "teacher": {f"module.backbone.{k}": v for k, v in teacher.state_dict().items()}
        | {"module.head.last_layer.weight": torch.zeros(8, 4)},
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    out = extract(_cfg(prep, tmp_path / "checkpoint.pth", tmp_path / "d4c"))
    with torch.no_grad():
        ref = teacher(_crops(prep))["cls"].numpy()
    np.testing.assert_allclose(_emb(read_embeddings(out)), ref, atol=1e-5, rtol=1e-5)
    assert read_manifest(out)["model_config"]["arch"] == "vit_tiny"


def test_whole_fields_center4_median_and_tiles(prep, run, tmp_path):
    from celldino.data import FieldDataset

    fields = FieldDataset(prep)
    x = torch.stack([fields[i] for i in range(len(fields))]).numpy()  # (F, C, 128, 128)
    model = run[1]["teacher"]

    def cls(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(a)))["cls"].numpy()

    c, s = x.shape[-1] // 2, CROP
    quads = [
        x[..., c - s : c, c - s : c],
        x[..., c - s : c, c : c + s],
        x[..., c : c + s, c - s : c],
        x[..., c : c + s, c : c + s],
    ]
    ref = np.median(np.stack([cls(q) for q in quads]), axis=0)
    df = read_embeddings(extract(_cfg(prep, run[0], tmp_path / "c4", level="field", field_crop=s)))
    assert list(df["Metadata_ImageKey"]) == list(fields.metadata["Metadata_ImageKey"])
    np.testing.assert_allclose(_emb(df), ref, atol=1e-5, rtol=1e-5)

    # tiles of 48 px every 40 px on 128 px: starts 0, 40, 80 (the last ends at the border)
    tiles = [x[..., y : y + 48, z : z + 48] for y in (0, 40, 80) for z in (0, 40, 80)]
    ref = np.mean(np.stack([cls(t) for t in tiles]), axis=0)
    cfg = _cfg(
        prep,
        run[0],
        tmp_path / "t",
        level="field",
        field_mode="tile",
        field_crop=48,
        field_stride=40,
        field_pool="mean",
    )
    np.testing.assert_allclose(_emb(read_embeddings(extract(cfg))), ref, atol=1e-5, rtol=1e-5)


def test_attention_for_requested_cells(prep, run, tmp_path):
    cells = pd.read_parquet(prep / "cells.parquet")
    ids = [cells["Metadata_CellID"][5], cells["Metadata_CellID"][100]]
    out = extract(_cfg(prep, run[0], tmp_path / "a", attention_cells=ids))
    x = _crops(prep)[[5, 100]]
    with torch.no_grad():
        ref = run[1]["teacher"](x, return_attention=True)
    for j, cid in enumerate(ids):
        got = read_attention(out, cid)
        attn = ref["attn"][j].numpy()  # (heads, T, T)
        assert got["attn"].shape == (3, 5, 5)
        np.testing.assert_allclose(got["attn"], attn, atol=1e-5)
        np.testing.assert_allclose(got["attn"].sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got["attn_maps"], attn[:, 0, 1:].reshape(3, 2, 2), atol=1e-5)
        np.testing.assert_allclose(got["patch"], ref["patch"][j].numpy(), atol=1e-5)
    with pytest.raises(KeyError, match="not in"):
        read_attention(out, str(cells["Metadata_CellID"][6]))
    with pytest.raises(KeyError, match="attention_cells"):
        extract(_cfg(prep, run[0], tmp_path / "a2", attention_cells=["no/such/cell"]))


def test_batch_reader_equals_crop_dataset(prep):
    """Slice-at-a-time reading gives the same normalised crops as CropDataset item by item."""
    from celldino.data import CropDataset
    from celldino.extract.reader import CropBatches

    ds = CropDataset(prep, channels=["Mito", "DNA"])
    assert ds.norm["method"] == "percentile_image"
    batches = CropBatches(ds, [(0, 7), (7, 70), (200, len(ds))])
    for b, (start, stop) in enumerate(batches.ranges):
        ref = torch.stack([ds[i] for i in range(start, stop)])
        torch.testing.assert_close(batches[b], ref, rtol=0, atol=0)


# ---- resume, refusal ---------------------------------------------------------------------------


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("overwrite", [False, True])  # overwrite: as `celldino run` reruns it
def test_killed_and_rerun_has_every_cell_once(prep, run, tmp_path, overwrite):
    cfg = _cfg(prep, run[0], tmp_path / "k", shard_size=32, overwrite=overwrite)
    seen: list[int] = []

    def die_after_two(k: int) -> None:
        seen.append(k)
        if len(seen) == 2:
            raise Killed

    with pytest.raises(Killed):
        extract(cfg, after_shard=die_after_two)
    out = Path(cfg.out_dir)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [shard_name(0), shard_name(1)]
    assert read_manifest(out)["complete"] is False
    first = (out / shard_name(0)).stat().st_mtime_ns
    with pytest.raises(IncompleteInputError, match="missing"):
        read_embeddings(out)

    rest: list[int] = []
    extract(cfg, after_shard=rest.append)
    n_shards = len(read_manifest(out)["shards"])
    assert rest == list(range(2, n_shards))  # only the missing shards were computed
    assert (out / shard_name(0)).stat().st_mtime_ns == first
    df = read_embeddings(out)
    cells = pd.read_parquet(prep / "cells.parquet")
    assert df["Metadata_CellID"].is_unique
    assert list(df["Metadata_CellID"]) == list(cells["Metadata_CellID"])
    # uninterrupted, crops read by 2 DataLoader worker processes
    whole = read_embeddings(
        extract(_cfg(prep, run[0], tmp_path / "w", shard_size=32, num_workers=2))
    )
    np.testing.assert_array_equal(_emb(df), _emb(whole))

    again: list[int] = []
    extract(cfg, after_shard=again.append)  # complete: nothing to do
    assert again == [] and read_manifest(out)["complete"]


def test_rerun_with_other_settings_refused_unless_overwrite(prep, run, tmp_path):
    out = tmp_path / "r"
    extract(_cfg(prep, run[0], out))
    with pytest.raises(ExtractError, match=r"features\.feature: 'cls' → 'patch_mean'.*overwrite"):
        extract(_cfg(prep, run[0], out, feature="patch_mean"))
    other, _ = _save_run(tmp_path / "other_run", _model_config(), seed=1)
    with pytest.raises(ExtractError, match=r"checkpoint\.sha256_16"):
        extract(_cfg(prep, other, out))
    with pytest.raises(ExtractError, match="channels"):
        extract(_cfg(prep, run[0], out, channels=("DNA", "ER", "RNA", "Mito", "AGP")))
    assert read_manifest(out)["features"]["feature"] == "cls"  # untouched by the refusals

    extract(_cfg(prep, other, out, feature="patch_mean", overwrite=True))
    m = read_manifest(out)
    assert m["features"]["feature"] == "patch_mean" and m["complete"]
    assert m["checkpoint_path"].startswith(str(other))
    assert len(read_embeddings(out)) == m["n_rows"]


# ---- bad input -------------------------------------------------------------------------------


def test_channel_count_mismatch_names_both(prep, tmp_path):
    run_dir, _ = _save_run(tmp_path / "rgb_run", _model_config(in_chans=3))
    with pytest.raises(ExtractError, match=r"takes 3 channels.*has 5 channels"):
        extract(_cfg(prep, run_dir, tmp_path / "e"))
    # choosing 3 of the stored channels fits
    out = extract(_cfg(prep, run_dir, tmp_path / "e3", channels=("DNA", "RNA", "Mito")))
    assert read_manifest(out)["channels"] == ["DNA", "RNA", "Mito"]


def test_run_training_channels_are_used_in_order(prep, tmp_path):
    """A run trained on [Mito, DNA, ER] (its config.yaml) gets those channels in that order."""
    from celldino.config import Config, TrainConfig
    from celldino.io.configfile import save_config

    run_dir, nets = _save_run(tmp_path / "run3", _model_config(in_chans=3))
    save_config(Config(train=TrainConfig(channels=("Mito", "DNA", "ER"))), run_dir / "config.yaml")
    out = extract(_cfg(prep, run_dir, tmp_path / "e"))
    assert read_manifest(out)["channels"] == ["Mito", "DNA", "ER"]
    with torch.no_grad():
        ref = nets["teacher"](_crops(prep)[:, [4, 0, 1]])["cls"].numpy()
    np.testing.assert_allclose(_emb(read_embeddings(out)), ref, atol=1e-5, rtol=1e-5)

    save_config(Config(train=TrainConfig(channels=("Mito", "GFP", "ER"))), run_dir / "config.yaml")
    with pytest.raises(ExtractError, match=r"trained on channels.*lacks \['GFP'\]"):
        extract(_cfg(prep, run_dir, tmp_path / "e2"))


def test_patch_size_mismatch_names_both(prep, tmp_path):
    run_dir, _ = _save_run(tmp_path / "p14", _model_config(patch_size=14, img_size=28))
    with pytest.raises(ExtractError, match=r"patch size 14 px.*32x32 px"):
        extract(_cfg(prep, run_dir, tmp_path / "e"))


def test_missing_crop_store_names_path_and_command(run, tmp_path):
    empty = tmp_path / "not_prepared"
    empty.mkdir()
    with pytest.raises(ExtractError, match=r"not_prepared/crops\.zarr.*celldino prepare"):
        extract(_cfg(empty, run[0], tmp_path / "e"))


def test_cli_extract(prep, run, reference, tmp_path, capsys):
    from celldino.cli import main

    out = tmp_path / "cli"
    args = [
        "extract",
        f"extract.checkpoint={run[0]}",
        f"extract.data={prep}",
        f"extract.out_dir={out}",
        "extract.batch_size=64",
    ]
    assert main(args[:2] + ["--format", "h5ad"] + args[2:]) == 0  # flags anywhere
    assert (out / "embeddings.h5ad").exists()
    np.testing.assert_allclose(
        _emb(read_embeddings(out)), reference["cls"].numpy(), atol=1e-5, rtol=1e-5
    )
    assert main(args + ["extract.feature=patch_mean"]) == 2  # refused: other options
    assert main(["extract", "--overwrite"] + args[1:] + ["extract.feature=patch_mean"]) == 0
    assert json.loads((out / MANIFEST).read_text())["features"]["feature"] == "patch_mean"
    assert main(["extract", f"extract.checkpoint={run[0]}", f"extract.data={tmp_path}"]) == 2
    assert main(args + ["--format", "zarr"]) == 2  # not a format: one error line


@pytest.mark.slow
def test_torchrun_two_processes_union_equals_single(prep, run, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank writes its shards; together the output
    equals the single-process output."""
    import os
    import subprocess
    import sys

    single = read_embeddings(extract(_cfg(prep, run[0], tmp_path / "one", shard_size=32)))
    out = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "celldino",
        "extract",
        f"extract.checkpoint={run[0]}",
        f"extract.data={prep}",
        f"extract.out_dir={out}",
        "extract.shard_size=32",
        "extract.batch_size=24",
        "extract.device=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_manifest(out)
    assert m["complete"] and m["world_size"] == 2
    df = read_embeddings(out)
    assert df["Metadata_CellID"].is_unique and len(df) == len(single)
    pd.testing.assert_frame_equal(df, single, check_exact=False, atol=1e-5, rtol=1e-5)
