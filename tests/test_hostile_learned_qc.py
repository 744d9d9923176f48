"""`celldino qc` refusals: each exits 2 with a one-line message naming the file, setting, class
or key, and leaves qc.parquet and images.parquet as they were."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from celldino.config import ModelConfig, PrepareConfig
from celldino.data.prepare import prepare
from celldino.io.checkpoints import write_safetensors
from celldino.models import build_model

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


@pytest.fixture(scope="module")
def made(tiny_screen, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_learned_qc")
    prep = prepare(
        PrepareConfig(
            load_data=str(tiny_screen / "load_data.csv"),
            out_dir=str(root / "prep"),
            features=False,
            crop_size=32,
        )
    )
    return prep, root


def _ckpt(path: Path, channels: list[str]) -> Path:
    mcfg = ModelConfig(
        arch="vit_tiny", patch_size=8, in_chans=len(channels), img_size=32, depth=1,
        drop_path_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    net = build_model(mcfg).eval()
    sd = {f"teacher.backbone.{k}": v for k, v in net.state_dict().items()}
    return write_safetensors(
        path, sd, {"model_config": dataclasses.asdict(mcfg)}, channels=channels
    )


def _copy(made, tmp_path: Path) -> Path:
    return Path(
        shutil.copytree(made[0], tmp_path / "prep", ignore=shutil.ignore_patterns(".celldino.lock"))
    )


def _snapshot(prep: Path) -> dict[str, bytes]:
    return {n: (prep / n).read_bytes() for n in ("qc.parquet", "images.parquet")}


def _keys(prep: Path) -> list[str]:
    return pd.read_parquet(prep / "qc.parquet")["Metadata_ImageKey"].tolist()


def _labels(path: Path, rows: list[tuple[str, str]]) -> Path:
    pd.DataFrame(rows, columns=["Metadata_ImageKey", "Metadata_QC_Label"]).to_csv(path, index=False)
    return path


def _refused(run_cli, prep: Path, *args: str) -> str:
    before = _snapshot(prep)
    rc, text = run_cli("qc", f"qc.prep={prep}", *args)
    assert rc == 2, text
    assert _snapshot(prep) == before  # nothing rewritten
    return text


def test_labels_naming_unknown_images_are_refused_naming_them(made, tmp_path, run_cli):
    prep = _copy(made, tmp_path)
    k = _keys(prep)
    rows = [(x, "clean") for x in k[:4]] + [("P09/Z99/1", "blur"), ("P09/Z98/1", "blur")]
    lab = _labels(tmp_path / "labels.csv", rows)
    text = _refused(run_cli, prep, "qc.detector=fewshot", f"qc.labels={lab}")
    assert "'P09/Z99/1'" in text and "'P09/Z98/1'" in text and str(lab) in text
    assert "2 image key(s) not in the prep" in text


def test_a_label_class_with_one_example_is_refused_naming_it(made, tmp_path, run_cli):
    prep = _copy(made, tmp_path)
    k = _keys(prep)
    lab = _labels(tmp_path / "l.csv", [(x, "clean") for x in k[:5]] + [(k[6], "debris")])
    text = _refused(run_cli, prep, "qc.detector=both", f"qc.labels={lab}")
    assert "'debris' (1)" in text and "fewer than 2 examples" in text and str(lab) in text
    assert not (prep / "field_embeddings.parquet").exists()  # refused before any embedding


def test_labels_of_one_class_are_refused(made, tmp_path, run_cli):
    prep = _copy(made, tmp_path)
    k = _keys(prep)
    lab = _labels(tmp_path / "l.csv", [(x, "clean") for x in k[:6]])
    text = _refused(run_cli, prep, "qc.detector=fewshot", f"qc.labels={lab}")
    assert "every labelled field is 'clean'" in text
    lab = _labels(tmp_path / "m.csv", [(x, "blur") for x in k[:6]])
    text = _refused(run_cli, prep, "qc.detector=fewshot", f"qc.labels={lab}")
    assert "no field is labelled 'clean'" in text and "'blur'" in text


def test_label_text_is_not_guessed(made, tmp_path, run_cli):
    prep = _copy(made, tmp_path)
    k = _keys(prep)
    rows = [(x, "clean") for x in k[:3]] + [(k[3], "Clean")] + [(x, "blur") for x in k[4:6]]
    lab = _labels(tmp_path / "l.csv", rows)
    text = _refused(run_cli, prep, "qc.detector=fewshot", f"qc.labels={lab}")
    assert "line 5" in text and "'Clean'" in text
    rows = [(x, "clean") for x in k[:3]] + [(k[0], "blur"), (k[4], "blur")]
    lab = _labels(tmp_path / "m.csv", rows)
    text = _refused(run_cli, prep, "qc.detector=fewshot", f"qc.labels={lab}")
    assert repr(k[0]) in text and "['blur', 'clean']" in text
    lab = tmp_path / "n.csv"
    pd.DataFrame({"Metadata_ImageKey": k[:4], "Label": ["clean"] * 4}).to_csv(lab, index=False)
    text = _refused(run_cli, prep, "qc.detector=fewshot", f"qc.labels={lab}")
    assert "no Metadata_QC_Label column" in text


def test_fewshot_without_labels_is_refused_naming_both_ways_to_give_them(made, tmp_path, run_cli):
    prep = _copy(made, tmp_path)
    text = _refused(run_cli, prep, "qc.detector=fewshot")
    assert "qc.labels" in text and "Metadata_QC_Label" in text


def test_a_checkpoint_of_other_channels_is_refused_naming_both_lists(made, tmp_path, run_cli):
    prep = _copy(made, tmp_path)
    other = ["DNA", "ER", "RNA", "AGP", "Actin"]
    ck = _ckpt(tmp_path / "other.safetensors", other)
    text = _refused(run_cli, prep, f"qc.checkpoint={ck}")
    assert str(other) in text and str(CHANNELS) in text and "['Actin']" in text
    assert not (prep / "field_embeddings.parquet").exists()


def test_exclusion_from_a_prep_that_keeps_flagged_images_is_refused(made, tmp_path, run_cli):
    prep = _copy(made, tmp_path)
    state = json.loads((prep / "prepare.json").read_text())
    state["settings"]["qc_exclude"] = False  # as `prepare.qc_exclude=false` records it
    (prep / "prepare.json").write_text(json.dumps(state))
    text = _refused(run_cli, prep, "qc.exclude=true")
    assert "prepare.qc_exclude=false" in text and "qc.exclude=false" in text


def test_settings_and_missing_prep_are_refused(made, tmp_path, run_cli):
    prep = _copy(made, tmp_path)
    text = _refused(run_cli, prep, "qc.fewshot_threshold=1.0")
    assert "qc.fewshot_threshold=1.0" in text
    text = _refused(run_cli, prep, "qc.detector=knn")
    assert "qc.detector" in text and "outlier, fewshot, both" in text
    rc, text = run_cli("qc", f"qc.prep={tmp_path / 'nowhere'}")
    assert rc == 2 and "qc.prep" in text and "celldino prepare" in text
    assert not (tmp_path / "nowhere").exists()


def test_a_prep_locked_by_another_writer_is_refused(made, tmp_path, run_cli):
    prep = _copy(made, tmp_path)
    code = textwrap.dedent(
        f"""
        import sys
        from celldino.io.lock import output_lock
        with output_lock({str(prep)!r}, "prepare"):
            print("held", flush=True)
            sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        text = _refused(run_cli, prep)
        assert "prepare" in text and str(prep) in text
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)


def test_a_damaged_field_embeddings_file_is_computed_again(made, tmp_path, run_cli):
    prep = _copy(made, tmp_path)
    ck = _ckpt(tmp_path / "m.safetensors", CHANNELS)
    rc, _ = run_cli("qc", f"qc.prep={prep}", f"qc.checkpoint={ck}", "-q")
    assert rc == 0
    good = pd.read_parquet(prep / "qc.parquet")
    path = prep / "field_embeddings.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short
    rc, text = run_cli("qc", f"qc.prep={prep}", f"qc.checkpoint={ck}")
    assert rc == 0 and "cannot be read: computed again" in text
    pd.testing.assert_frame_equal(pd.read_parquet(prep / "qc.parquet"), good)
    from celldino.errors import IncompleteInputError
    from celldino.io.prepared import read_field_embeddings

    path.write_bytes(b"not parquet")
    with pytest.raises(IncompleteInputError, match="field_embeddings.parquet cannot be read"):
        read_field_embeddings(prep)


def test_labels_from_the_load_data_column_and_its_bad_values(made, tmp_path, run_cli):
    """Without qc.labels the load-data table's Metadata_QC_Label (kept in images.parquet) is
    read: empty cells are unlabelled, a label on a key is taken, bad text refused naming it."""
    prep = _copy(made, tmp_path)
    ck = _ckpt(tmp_path / "m.safetensors", CHANNELS)
    images = pd.read_parquet(prep / "images.parquet")
    truth = images["Metadata_QC_Truth"]
    label = pd.Series([""] * len(images), dtype=object)
    label[truth != "ok"] = "artefact"
    label[(truth == "ok").to_numpy().nonzero()[0][:6]] = "clean"
    images["Metadata_QC_Label"] = label.to_numpy()
    images.to_parquet(prep / "images.parquet", index=False)
    rc, text = run_cli("qc", f"qc.prep={prep}", f"qc.checkpoint={ck}", "qc.detector=fewshot", "-q")
    assert rc == 0, text
    qc = pd.read_parquet(prep / "qc.parquet")
    assert (
        set(qc["QC_Learned_Type"]) <= {"clean", "artefact"}
        and qc["QC_Learned_FewShot"].notna().all()
    )
    images.loc[0, "Metadata_QC_Label"] = "CLEAN"
    images.to_parquet(prep / "images.parquet", index=False)
    text = _refused(run_cli, prep, f"qc.checkpoint={ck}", "qc.detector=fewshot")
    assert "Metadata_QC_Label column of the load-data table" in text and "'CLEAN'" in text
    assert f"image {images.loc[0, 'Metadata_ImageKey']}" in text


def test_a_missing_labels_table_and_a_read_only_prep_are_refused(
    made, tmp_path, run_cli, read_only
):
    prep = _copy(made, tmp_path)
    text = _refused(run_cli, prep, "qc.detector=fewshot", f"qc.labels={tmp_path / 'none.csv'}")
    assert "none.csv" in text and "does not exist" in text
    text = _refused(run_cli, prep, "qc.detector=fewshot", f"qc.labels={tmp_path}")
    assert "is a folder" in text
    before = _snapshot(prep)
    read_only(prep)
    rc, text = run_cli("qc", f"qc.prep={prep}")
    assert rc == 2 and "qc.prep" in text and str(prep) in text
    assert _snapshot(prep) == before
