"""Hostile settings and input files (issue 22): no setting or input file may run code or write
outside its folder. Every payload here would create a file if it ran; each test asserts the file
does not exist and that the refusal names the setting or file."""

from __future__ import annotations

import io
import os
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile

from celldino import pp
from celldino.config import ConfigError, SynthConfig, load_config
from celldino.io.masks import read_user_mask
from celldino.io.runlayout import RunLayout
from celldino.names import UnsafeNameError, component_problem, safe_component
from celldino.query import QueryError, columns, evaluate
from celldino.synth import make_screen


def _payloads(marker) -> list[str]:
    """Selections that, given to pandas' query/eval, would create `marker`."""
    m = str(marker)
    return [
        f"@pd.io.common.os.system('touch {m}')",
        f"Metadata_Plate == @pd.io.common.os.system('touch {m}')",
        f"__import__('os').system('touch {m}')",
        f"Metadata_Plate.__class__.__init__.__globals__['os'].system('touch {m}')",
        f"Metadata_Plate == [open('{m}', 'w')]",
        f"(lambda: __import__('os').system('touch {m}'))()",
        f"[__import__('os').system('touch {m}') for _ in '1'] == Metadata_Plate",
        f'Metadata_Plate == f\'{{__import__("os").system("touch {m}")}}\'',
        f"Metadata_Plate[__import__('os').system('touch {m}')] == 1",
        f"`Metadata_Plate` == 'P1' & @os.system('touch {m}')",
    ]


def _adata() -> ad.AnnData:
    obs = pd.DataFrame(
        {
            "Metadata_Plate": ["P1", "P1", "P2", "P2", "P2", "P1"],
            "Metadata_pert_type": ["control", "trt", "control", "trt", "trt", None],
            "Metadata_Compound": ["DMSO", "a", "DMSO", "b", "none", "c"],
            "Metadata_Dose": [0.0, 1.0, 0.0, 10.0, np.nan, 3.0],
            "Metadata_Dose (uM)": [0, 1, 0, 10, 5, 3],
            "Metadata_is_control": [True, False, True, False, False, False],
        },
        index=[f"w{i}" for i in range(6)],
    )
    return ad.AnnData(np.arange(12, dtype=np.float32).reshape(6, 2), obs=obs)


# ---- profile.controls: a selection is data, never Python ------------------------------------


def test_controls_payloads_run_nothing_and_are_refused(tmp_path):
    marker = tmp_path / "X"
    adata = _adata()
    for text in _payloads(marker):
        with pytest.raises(QueryError, match=r"profile\.controls: .* a selection is") as e:
            pp.annotate(adata, controls=text)
        assert not marker.exists(), text
        assert "Metadata_pert_type == 'control'" in str(e.value)  # the grammar, by example
        with pytest.raises(ConfigError, match="profile.controls"):  # refused at config load too
            load_config(None, [f"profile.controls={text}"])
        with pytest.raises(QueryError, match="^samples: "):  # feature selection's subset
            pp.feature_select(adata, operations=["variance"], samples=text)
        assert not marker.exists(), text


def test_controls_payload_on_the_command_line_runs_nothing(tmp_path, run_cli):
    """The issue's case: `profile.controls="@pd.io.common.os.system('touch X')"` ran the
    command, then exited 2 with 'query failed'."""
    marker = tmp_path / "X"
    emb = tmp_path / "emb"
    emb.mkdir()
    cells = pd.DataFrame(
        {
            "Metadata_Plate": ["P1"] * 4,
            "Metadata_Well": ["A01", "A01", "A02", "A02"],
            "Metadata_pert_type": ["control", "control", "trt", "trt"],
            "emb_0000": [0.0, 1.0, 2.0, 3.0],
        }
    )
    cells.to_parquet(emb / "part-00000.parquet", index=False)
    rc, text = run_cli(
        "profile",
        f"profile.input=[{emb}]",
        f"profile.out={tmp_path}/w.h5ad",
        f"profile.controls=@pd.io.common.os.system('touch {marker}')",
    )
    assert rc == 2 and "profile.controls" in text and "'@' reaches Python variables" in text
    assert not marker.exists() and not (tmp_path / "w.h5ad").exists()


VALID = [
    "Metadata_pert_type == 'control'",
    'Metadata_pert_type == "control"',
    "Metadata_pert_type != 'control'",
    "Metadata_Compound in ['DMSO', 'none']",
    "Metadata_Compound not in ('DMSO', 'none')",
    "Metadata_Compound == ['DMSO', 'none']",
    "Metadata_Compound != ['DMSO', 'none']",
    "['DMSO', 'c'] == Metadata_Compound",
    "Metadata_Dose == 0 and not (Metadata_Plate == 'P1')",
    "Metadata_Dose == 0 or Metadata_Compound == 'c'",
    "(Metadata_Dose == 0) & (Metadata_Plate == 'P2') | (Metadata_Compound == 'a')",
    "~(Metadata_Dose > 0)",
    "Metadata_Dose > 0.5",
    "Metadata_Dose >= 1",
    "Metadata_Dose < 5",
    "Metadata_Dose <= 3",
    "1 <= Metadata_Dose < 10",
    "Metadata_Dose > -1.5e0",
    "`Metadata_Dose (uM)` >= 5",
    "`Metadata_Dose (uM)` in [0, 3] and Metadata_Plate == 'P1'",
    "Metadata_is_control",
    "not Metadata_is_control and Metadata_Dose != 10",
    "Metadata_pert_type == 'control' and Metadata_Plate in ['P1']",
]


@pytest.mark.parametrize("text", VALID)
def test_selection_selects_what_pandas_query_selects(text):
    """Valid selections keep their meaning: pandas' own query (trusted text here) is the
    independent computation."""
    obs = _adata().obs
    expected = obs.index.isin(obs.query(text).index)
    np.testing.assert_array_equal(pp.controls.select(obs, text), expected)


def test_selection_hand_worked_rows():
    """Rows by hand: controls w0 and w2; the missing pert_type (w5) and dose (w4) match nothing."""
    obs = _adata().obs
    rows = lambda text: list(obs.index[evaluate(obs, text)])  # noqa: E731
    assert rows("Metadata_pert_type == 'control'") == ["w0", "w2"]
    assert rows("Metadata_pert_type != 'control'") == ["w1", "w3", "w4", "w5"]
    assert rows("Metadata_Dose < 100") == ["w0", "w1", "w2", "w3", "w5"]
    assert rows("Metadata_Compound in ['DMSO', 'none']") == ["w0", "w2", "w4"]
    assert columns("`Metadata_Dose (uM)` > 1 and Metadata_Plate == 'P1'") == [
        "Metadata_Dose (uM)",
        "Metadata_Plate",
    ]


@pytest.mark.parametrize(
    "text, words",
    [
        ("Metadata_Nope == 'control'", ["no column 'Metadata_Nope'", "Metadata_pert_type"]),
        ("`Metadata Nope` == 1", ["no column 'Metadata Nope'", "Metadata_Compound"]),
        ("Metadata_Compound < 1", ["'Metadata_Compound < 1'", "compare"]),
        ("Metadata_Compound", ["stands alone", "not true/false"]),
        ("'DMSO' in Metadata_Compound", ["'in' needs a list"]),
        ("Metadata_Dose + 1 > 2", ["arithmetic", "'Metadata_Dose + 1'"]),
        ("Metadata_Dose is None", ["'is' is not one of its comparisons"]),
        ("Metadata_Dose == None", ["'None'"]),
        ("Metadata_Dose ==", ["not a valid expression"]),
        ("`Metadata_Dose == 1", ["a backtick is not closed"]),
        ("   ", ["the selection is empty"]),
        ("x == 1 " * 1000, ["longer than 5000 characters"]),
        ("Metadata_Dose < [1, 2]", ["a list goes only with ==, !=, in or not in"]),
        ("not " * 120 + "Metadata_is_control", ["nested more than 100 deep"]),
    ],
)
def test_selection_outside_the_grammar_is_refused_naming_why(text, words):
    with pytest.raises(QueryError) as e:
        evaluate(_adata().obs, text, "profile.controls")
    msg = str(e.value)
    assert msg.startswith("profile.controls: ") and all(w in msg for w in words), msg


# ---- Cellpose _seg.npy: read without running its pickle -------------------------------------


def _cellpose_seg(masks: np.ndarray) -> dict:
    """The entries Cellpose's GUI/API writes into `<name>_seg.npy` (cellpose.io.masks_flows_to_seg)."""
    h, w = masks.shape
    return {
        "masks": masks,
        "outlines": np.zeros_like(masks),
        "flows": [np.zeros((h, w, 3), np.uint8), np.zeros((2, h, w), np.float32), np.zeros((h, w))],
        "chan_choose": [0, 0],
        "ismanual": np.zeros(int(masks.max()), bool),
        "filename": "A01_1_DNA.tif",
        "diameter": np.float64(30.0),
        "est_diam": 30.0,
        "colors": np.random.default_rng(0).integers(0, 255, (int(masks.max()), 3)),
        "zdraw": [],
        "model_path": 0,
        "flow_threshold": 0.4,
        "cellprob_threshold": 0.0,
        "normalize_params": {"lowhigh": None, "percentile": [1.0, 99.0], "norm3D": False},
    }


def _labels() -> np.ndarray:
    masks = np.zeros((12, 10), np.uint16)
    masks[1:4, 1:5], masks[6:11, 3:9] = 1, 2
    return masks


def test_real_cellpose_seg_npy_is_read(tmp_path):
    path = tmp_path / "A01_1_DNA_seg.npy"
    np.save(path, _cellpose_seg(_labels()), allow_pickle=True)
    np.testing.assert_array_equal(read_user_mask(path), _labels())


@pytest.mark.parametrize("protocol", [2, 3])
def test_cellpose_seg_npy_written_by_numpy_1_is_read(tmp_path, protocol):
    """numpy 1.x pickles (protocol 2 before numpy 1.17, then 3) name numpy.core.multiarray
    (numpy 2: numpy._core.multiarray); protocol 2 writes bytes through _codecs.encode."""
    data = pickle.dumps(np.array(_cellpose_seg(_labels()), dtype=object), protocol=protocol)
    old = data.replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray\n_reconstruct" in old
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    path = tmp_path / "old_seg.npy"
    path.write_bytes(buf.getvalue() + old)
    np.testing.assert_array_equal(read_user_mask(path), _labels())


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _Open:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    "payload, named", [(_System, "posix.system"), (_Exec, "builtins.exec"), (_Open, "io.open")]
)
def test_cellpose_seg_npy_whose_pickle_runs_code_is_refused_unrun(tmp_path, payload, named):
    marker = tmp_path / "PWNED"
    path = tmp_path / "A01_1_DNA_seg.npy"
    seg = {**_cellpose_seg(_labels()), "extra": payload(marker)}
    np.save(path, seg, allow_pickle=True)
    with pytest.raises(ValueError) as e:
        read_user_mask(path)
    assert not marker.exists()
    msg = str(e.value)
    assert str(path) in msg and named in msg and "_cp_masks" in msg, msg


def test_cellpose_seg_npy_payload_through_prepare_runs_nothing(tmp_path, run_cli):
    """`celldino prepare` with prepare.segmentation=masks reading a hostile `_seg.npy`."""
    marker = tmp_path / "PWNED"
    img, masks = tmp_path / "img", tmp_path / "masks"
    img.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for well in ["A01", "A02"]:
        row = {"Metadata_Plate": "P", "Metadata_Well": well, "Metadata_Site": 1}
        for ch in ("DNA", "ER"):
            plane = (rng.normal(100, 5, (12, 10)) + 2000 * (_labels() > 0)).astype(np.uint16)
            tifffile.imwrite(img / f"{well}_{ch}.tif", plane)
            row[f"FileName_{ch}"], row[f"PathName_{ch}"] = f"{well}_{ch}.tif", str(img)
        rows.append(row)
        seg = {**_cellpose_seg(_labels()), "extra": _System(marker)}
        np.save(masks / f"{well}_DNA_seg.npy", seg, allow_pickle=True)
    pd.DataFrame(rows).to_csv(tmp_path / "ld.csv", index=False)
    rc, text = run_cli(
        "prepare",
        f"prepare.load_data={tmp_path / 'ld.csv'}",
        f"prepare.out_dir={tmp_path / 'prep'}",
        "prepare.features=false",
        "prepare.crop_size=8",
        "prepare.qc_exclude=false",
        "prepare.segmentation=masks",
        f"prepare.mask_dir={masks}",
        "prepare.nuclei_masks={stem_DNA}_seg.npy",
    )
    assert rc == 2 and "_DNA_seg.npy" in text and "posix.system" in text, text
    assert not marker.exists()


# ---- names that become path components -------------------------------------------------------


@pytest.mark.parametrize(
    "name, why",
    [
        ("../../../../outside/x", "path separator '/'"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        (".", "'..'"),
        ("a\\b", "path separator"),
        ("DNA\n", "control character"),
        ("DNA\x00", "control character"),
        ("", "empty"),
        ("  ", "empty"),
        ("x" * 201, "longer than 200 bytes"),
        (3, "not text"),
    ],
)
def test_unsafe_path_components_are_refused_naming_the_setting(name, why):
    assert why in (component_problem(name) or "")
    with pytest.raises(UnsafeNameError, match=r"^synth\.channels: .*rename it"):
        safe_component(name, "synth.channels")


@pytest.mark.parametrize("name", ["DNA", "Alexa 488", "Mito-1.2", "ER_syto14", "Ph\u00e4", "P01"])
def test_ordinary_names_pass(name):
    assert safe_component(name, "synth.channels") == name


def test_synth_channel_outside_the_output_folder_writes_nothing(tmp_path, run_cli):
    """The issue's case: `synth.channels=[DNA, ../../../../outside/x]` wrote x.tif outside the
    output folder, creating folders to get there."""
    out = tmp_path / "a" / "b" / "c" / "screen"
    rc, text = run_cli("synth", out, "synth.channels=[DNA, ../../../../outside/x]")
    assert rc == 2 and "synth.channels" in text and "'../../../../outside/x'" in text
    assert not list(tmp_path.rglob("x.tif")) and not (tmp_path / "a" / "outside").exists()
    assert not out.exists()
    # the API refuses too (a SynthConfig built in Python skips the config checks)
    with pytest.raises(UnsafeNameError, match="synth.channels"):
        make_screen(out, SynthConfig(channels=("DNA", "../../../../outside/x")))
    assert not list(tmp_path.rglob("*.tif")) and not out.exists()


def test_feature_set_names_that_leave_the_folder_are_refused(tmp_path, run_cli):
    prof = tmp_path / "p.parquet"
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "Metadata_Compound": ["a", "a", "b", "b", "DMSO", "DMSO"],
            "Metadata_MoA": ["m1", "m1", "m2", "m2", None, None],
            "Metadata_pert_type": ["trt"] * 4 + ["control"] * 2,
            "Metadata_Plate": "P1",
        }
    )
    for j in range(3):
        df[f"f{j}"] = rng.normal(size=len(df))
    df.to_parquet(prof, index=False)
    out = tmp_path / "deep" / "er" / "ev"
    spec = tmp_path / "spec.yaml"
    for text, words in [
        (f"inputs: {{'../../../evil': {prof}}}\nanalyses: [nsc]\n", ["inputs", "'../../../evil'"]),
        ("name: ../../../evil\nanalyses: [nsc]\n", ["the spec's name", "'../../../evil'"]),
        (
            f"inputs: {{b: {prof}}}\nderived: {{'../../../evil': {{pca: b}}}}\nanalyses: [nsc]\n",
            ["derived", "'../../../evil'"],
        ),
    ]:
        spec.write_text(text)
        rc, msg = run_cli("evaluate", prof, "--spec", spec, f"evaluate.out_dir={out}")
        assert rc == 2 and all(w in msg for w in words), msg
        assert not [p for p in tmp_path.rglob("*") if "evil" in p.name]
    lay = RunLayout(tmp_path / "run")
    for call in (lay.embeddings, lay.profiles, lay.attention):
        with pytest.raises(UnsafeNameError, match="feature set name"):
            call("../x")
