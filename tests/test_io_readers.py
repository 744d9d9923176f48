"""The io readers the report uses, checked against plain pandas reads of the same files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from celldino.errors import MissingInputError
from celldino.io import cropstore, results, trainrun
from celldino.io.embeddings import sample_embeddings, shard_name, write_manifest
from celldino.io.files import write_json
from celldino.io.runlayout import RunLayout
from celldino.io.tables import write_parquet


def _embeddings(folder, n=30, shard=12):
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "Metadata_Plate": [f"P{i % 3}" for i in range(n)],
            "Metadata_CellID": [f"c{i}" for i in range(n)],
            **{f"emb_{j:04d}": rng.normal(size=n).astype(np.float32) for j in range(4)},
        }
    )
    plan = [(s, min(s + shard, n)) for s in range(0, n, shard)]
    for k, (a, b) in enumerate(plan):
        write_parquet(df.iloc[a:b], folder / shard_name(k))
    write_manifest(folder, {"shards": [list(p) for p in plan], "complete": True})
    return df


def test_sample_embeddings_reads_the_manifests_shards(tmp_path):
    df = _embeddings(tmp_path)
    write_parquet(df.head(3), tmp_path / "stray.parquet")  # not in the manifest: never read
    X, meta = sample_embeddings(tmp_path, None)
    np.testing.assert_array_equal(X, df.filter(like="emb_").to_numpy(np.float32))
    pd.testing.assert_frame_equal(meta, df.filter(like="Metadata_"))
    X, meta = sample_embeddings(tmp_path, 10, seed=1, columns=["Metadata_CellID"])
    assert X.shape == (10, 4) and list(meta.columns) == ["Metadata_CellID"]
    rows = df.set_index("Metadata_CellID").loc[meta.Metadata_CellID].filter(like="emb_")
    np.testing.assert_array_equal(X, rows.to_numpy(np.float32))  # rows stay whole
    X2, meta2 = sample_embeddings(tmp_path, 10, seed=1, columns=["Metadata_CellID"])
    assert list(meta2.Metadata_CellID) == list(meta.Metadata_CellID)  # the seed repeats it
    with pytest.raises(MissingInputError, match="_manifest.json"):
        sample_embeddings(tmp_path / "nowhere", 10)


def test_crop_store_queries_match_pandas(tmp_path):
    rng = np.random.default_rng(0)
    store = cropstore.CropStore(tmp_path, channels=["DNA", "ER"], crop_size=4, dtype=np.uint16)
    for s, n in enumerate([5, 7]):
        index = pd.DataFrame(
            {
                "Metadata_Plate": [f"P{s}"] * n,
                "Metadata_Well": [f"A0{i % 2}" for i in range(n)],
                "Metadata_CellID": [f"s{s}c{i}" for i in range(n)],
                "Metadata_MoA": [["a", "b", "c"][i % 3] for i in range(n)],
            }
        )
        store.append(f"site{s}", rng.integers(0, 99, (n, 2, 4, 4)).astype(np.uint16), index)
    cells = store.finalize()
    arr = cropstore.open_crops(tmp_path)
    assert cropstore.cells_columns(tmp_path) == list(cells.columns)
    assert cropstore.count_cells(tmp_path) == len(cells)
    distinct = ["Metadata_Plate", "Metadata_Well"]
    assert cropstore.count_cells(tmp_path, distinct=distinct) == len(
        cells[distinct].drop_duplicates()
    )
    per = cropstore.cells_per(tmp_path, "Metadata_Plate")
    assert per.cells.to_dict() == cells.Metadata_Plate.value_counts().sort_index().to_dict()
    pick = cropstore.sample_rows_per_group(tmp_path, "Metadata_MoA", 2)
    assert pick.groupby("label").size().to_dict() == {"a": 2, "b": 2, "c": 2}
    assert list(cells.Metadata_MoA.iloc[pick.row]) == list(pick.label)
    np.testing.assert_array_equal(cropstore.read_crops(tmp_path, pick.row), arr[:][pick.row])
    found = cropstore.rows_of_cells(tmp_path, ["s1c3", "s0c0"], label="Metadata_MoA")
    assert found.loc["s1c3"].tolist() == [8, "a"] and found.loc["s0c0"].tolist() == [0, "a"]
    assert cropstore.crop_channels(tmp_path) == ["DNA", "ER"]


def test_run_layout_readers_of_eval_and_training(tmp_path):
    lay = RunLayout(tmp_path)
    assert results.read_summary(lay.eval) is None
    tidy = pd.DataFrame(
        {"feature_set": ["learned"], "analysis": ["nsc"], "metric": ["NSC"], "value": [0.5]}
    )
    write_parquet(tidy, lay.eval_metrics)
    write_json(lay.eval_summary, {"notes": ["n"]})
    pd.testing.assert_frame_equal(results.read_results(lay.eval), tidy)
    assert results.read_summary(lay.eval) == {"notes": ["n"]}
    lay.train.mkdir()
    for step in (1, 2, 3):
        trainrun.append_metrics(lay.train_metrics, {"step": step, "loss": 1.0 / step})
    trainrun.truncate_metrics(lay.train_metrics, 2)
    assert trainrun.read_metrics(lay.train_metrics).step.tolist() == [1, 2]
