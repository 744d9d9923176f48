"""Hostile inputs to `profile`, `evaluate` and `report` (issue 11): each is either done right or
refused with exit code 2 and one line naming the file, row, column or key, and nothing that was
already written is lost or changed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from celldino import pp
from celldino.io.embeddings import shard_name, write_manifest
from celldino.io.profiles import read_h5ad

FEATS = [f"emb_{j:04d}" for j in range(6)]


def _cells(n_wells: int = 6, cells: int = 4, seed: int = 0) -> pd.DataFrame:
    """Per-cell table: 2 plates × n_wells wells, the first 2 wells of a plate are controls."""
    rng = np.random.default_rng(seed)
    rows = [
        (p, f"A{w:02d}", "control" if w < 2 else "trt", "DMSO" if w < 2 else f"cpd{w % 2}")
        for p in ("P1", "P2")
        for w in range(n_wells)
        for _ in range(cells)
    ]
    df = pd.DataFrame(
        rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_pert_type", "Metadata_Compound"]
    )
    for f in FEATS:
        df[f] = rng.normal(size=len(df))
    return df


def _shards(folder, df: pd.DataFrame, n: int = 3, manifest: bool | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(len(df)), n)):
        df.iloc[part].to_parquet(folder / shard_name(k), index=False)
    if manifest is not None:
        write_manifest(folder, {"complete": manifest, "shards": [shard_name(k) for k in range(n)]})
    return folder


def _snapshot(folder) -> dict[str, bytes]:
    """Every file's bytes, but the output locks' (they name the last writer)."""
    return {
        str(p): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".celldino.lock")
    }


def _kept(before: dict[str, bytes], folder) -> bool:
    """Every file there before is still there, byte for byte (caches may be added)."""
    after = _snapshot(folder)
    return all(after.get(k) == v for k, v in before.items())


@pytest.fixture
def earlier(tmp_path):
    """An output folder holding the files of an earlier run (must survive every refusal)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "wells.h5ad").write_bytes(b"earlier profiles")
    (out / "metrics.csv").write_text("earlier,metrics\n")
    return out


# ---- profile: inputs ---------------------------------------------------------------------


def test_profile_refuses_an_unfinished_extraction_unless_allowed(tmp_path, earlier, run_cli):
    emb = _shards(tmp_path / "emb", _cells(), n=3, manifest=True)
    (emb / shard_name(2)).unlink()  # a shard lost: the manifest still says complete
    before = _snapshot(earlier)
    rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={earlier}/wells.h5ad")
    assert rc == 2 and str(emb) in text and "part-00002.parquet" in text
    assert "allow_partial" in text and "Traceback" not in text
    assert _kept(before, earlier)
    rc, text = run_cli(  # a glob into the folder is checked against its manifest too
        "profile", f"profile.input=[{emb}/*.parquet]", f"profile.out={earlier}/wells.h5ad"
    )
    assert rc == 2 and "part-00002.parquet" in text and _kept(before, earlier)
    # a manifest that says incomplete is refused as well
    write_manifest(emb, {"complete": False, "shards": [shard_name(0), shard_name(1)]})
    rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={earlier}/wells.h5ad")
    assert rc == 2 and "incomplete" in text and _kept(before, earlier)
    # the explicit flag profiles what is there and records it in the output
    write_manifest(emb, {"complete": True, "shards": [shard_name(k) for k in range(3)]})
    out = tmp_path / "partial" / "wells.h5ad"
    rc, text = run_cli(
        "profile", f"profile.input=[{emb}]", f"profile.out={out}", "profile.allow_partial=true"
    )
    assert rc == 0, text
    assert "part-00002.parquet" in text  # the warning names the missing shard
    partial = read_h5ad(out).uns["celldino"]["partial_input"]
    assert list(partial["missing_shards"]) == [f"{emb}/part-00002.parquet"]


def test_profile_all_nan_features_is_an_error_naming_the_step(tmp_path, earlier, run_cli):
    df = _cells()
    df[FEATS] = np.nan
    emb = _shards(tmp_path / "emb", df)
    before = _snapshot(earlier)
    rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={earlier}/wells.h5ad")
    assert rc == 2 and str(emb) in text
    assert "every feature holds NaN" in text and "profile.nonfinite" in text
    assert "0 features" in text and _kept(before, earlier)


def test_profile_zero_rows_says_the_input_is_empty(tmp_path, run_cli):
    emb = _shards(tmp_path / "emb", _cells().iloc[:0], n=1)
    rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={tmp_path}/w.h5ad")
    assert rc == 2 and str(emb / shard_name(0)) in text and "0 rows" in text
    assert "controls" not in text  # not "controls match no profile"


def test_profile_empty_controls_with_control_normalisation_says_which_setting(tmp_path, run_cli):
    emb = _shards(tmp_path / "emb", _cells())
    rc, text = run_cli(
        "profile", f"profile.input=[{emb}]", f"profile.out={tmp_path}/w.h5ad", "profile.controls="
    )
    assert rc == 2 and "profile.normalize_reference=all" in text and "pp.annotate" not in text
    assert not (tmp_path / "w.h5ad").exists()
    rc, text = run_cli(
        "profile",
        f"profile.input=[{emb}]",
        f"profile.out={tmp_path}/w.h5ad",
        "profile.controls=",
        "profile.normalize_reference=all",
    )
    assert rc == 0, text


def test_one_control_well_per_plate_is_not_divided_by_epsilon(tmp_path, earlier, run_cli):
    """mad_robustize against one control well: MAD 0 everywhere, profiles × 1e18 (was exit 0).
    The default floors each scale at 0.1 × the plate's spread; pycytominer's arithmetic
    (normalize_floor=0) refuses."""
    df = _cells()
    df = df[~df["Metadata_Well"].isin(["A01"])]  # one control well (A00) per plate
    emb = _shards(tmp_path / "emb", df)
    rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={tmp_path}/ok.h5ad")
    assert rc == 0, text
    X = read_h5ad(tmp_path / "ok.h5ad").X
    assert np.isfinite(X).all() and np.abs(X).max() <= 50  # floored, clipped: no 1e18
    before = _snapshot(earlier)
    rc, text = run_cli(
        "profile",
        f"profile.input=[{emb}]",
        f"profile.out={earlier}/wells.h5ad",
        "profile.normalize=mad_robustize",
        "profile.normalize_floor=0",
    )
    assert rc == 2 and "Metadata_Plate 'P1'" in text and "zero spread (MAD 0)" in text
    assert "profile.normalize_reference=all" in text and _kept(before, earlier)
    rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={earlier}")
    assert rc == 2 and "is a folder" in text and _kept(before, earlier)


def test_profile_controls_matching_nothing_show_the_values(tmp_path, run_cli):
    emb = _shards(tmp_path / "emb", _cells())
    rc, text = run_cli(
        "profile",
        f"profile.input=[{emb}]",
        f"profile.out={tmp_path}/w.h5ad",
        "profile.controls=Metadata_pert_type == 'negcon'",
    )
    assert rc == 2 and "match none of the 12 profiles" in text
    assert "'control'" in text and "Metadata_pert_type" in text


def test_profile_reads_a_cellprofiler_csv_gz_and_keeps_every_column_name(
    lincs_csv, tmp_path, run_cli
):
    """The real LINCS plate: read as gzipped CSV (was DuckDB 'No magic bytes'); it holds both
    `Metadata_plate_map_name` and `Metadata_Plate_Map_Name`, which DuckDB (case-insensitive
    names) renamed `Metadata_Plate_Map_Name_1`."""
    out = tmp_path / "lincs.h5ad"
    rc, text = run_cli(
        "profile",
        f"profile.input=[{lincs_csv}]",
        f"profile.out={out}",
        "profile.features=",
        "profile.recipe=none",
        "profile.formats=[h5ad,parquet]",
    )
    assert rc == 0, text
    src = pd.read_csv(lincs_csv)
    adata = read_h5ad(out)
    meta = [c for c in src.columns if c.startswith("Metadata_")]
    assert set(meta) <= set(adata.obs.columns)
    assert not [c for c in adata.obs.columns if c.endswith("_1")]
    assert adata.obs["Metadata_Batch_Date"].iloc[0] == "2016-05-17"  # DuckDB read it as a date
    assert adata.shape == (384, src.shape[1] - len(meta))
    # one well per profile: the profile is the well's row, in the same row as its metadata
    src = src.set_index("Metadata_Well").loc[list(adata.obs["Metadata_Well"])]
    np.testing.assert_allclose(adata.X, src[list(adata.var_names)].to_numpy(float), atol=1e-9)
    assert list(adata.obs_names[:2]) == ["SQ00015054_A01", "SQ00015054_A02"]
    table = pd.read_parquet(out.with_suffix(".parquet"))
    assert {"Metadata_plate_map_name", "Metadata_Plate_Map_Name"} <= set(table.columns)


def test_profile_into_a_read_only_folder_fails_before_computing(tmp_path, read_only, run_cli):
    emb = _shards(tmp_path / "emb", _cells())
    ro = read_only(tmp_path / "ro")
    rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={ro}/w.h5ad")
    assert rc == 2 and str(ro) in text and "cannot write" in text
    assert "Traceback" not in text and "aggregating" not in text


# ---- profile: files the ecosystem reads back ---------------------------------------------


def _wells() -> ad.AnnData:
    df = _cells(n_wells=8)
    df["Metadata_MoA"] = np.where(df["Metadata_Compound"] == "cpd0", "tubulin", None)
    df["Metadata_Batch"] = np.where(df["Metadata_Plate"] == "P1", "b1", "b2")
    return df


def test_every_pp_step_leaves_an_anndata_that_anndata_can_write(tmp_path):
    emb = _shards(tmp_path / "emb", _wells())
    adata = pp.aggregate(emb, by=["Metadata_Plate", "Metadata_Well"], features="emb_")
    assert adata.obs_names[0] == "P1_A00"  # plate_well, not '0'
    chain = [
        ("nonfinite", lambda a: pp.handle_nonfinite(a, policy="drop_feature")),
        ("annotate", lambda a: pp.annotate(a, controls="Metadata_pert_type == 'control'")),
        ("normalize", lambda a: pp.normalize(a, method="mad_robustize", by="Metadata_Plate")),
        ("feature_select", lambda a: pp.feature_select(a, operations=["variance"])),
        ("sphere", lambda a: pp.sphere(a, method="ZCA", epsilon=1e-2)),
        ("harmony", lambda a: pp.harmony(a, key="Metadata_Batch", nclust=2)),
        ("inverse_normal", lambda a: pp.inverse_normal(a)),
        ("pca", lambda a: pp.pca(a, n_components=3)),
        ("consensus", lambda a: pp.consensus(a, by=["Metadata_Compound"])),
    ]
    for name, step in chain:
        out = step(adata)  # pp steps modify adata in place and return None; consensus is new
        adata = adata if out is None else out
        path = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(path)  # plain anndata, no celldino helper
        back = ad.read_h5ad(path)
        history = json.loads(back.uns["celldino"]["steps"])
        assert [s["step"] for s in history] == pp.steps(adata) and history[-1]["step"] == name
        assert list(back.obs_names) == list(adata.obs_names)
        np.testing.assert_allclose(back.X, adata.X)
    assert list(adata.obs_names) == ["DMSO", "cpd0", "cpd1"]


def test_steps_are_the_documented_list_of_step_and_params(tmp_path):
    emb = _shards(tmp_path / "emb", _cells())
    adata = pp.aggregate(emb, by=["Metadata_Plate", "Metadata_Well"], features="emb_")
    pp.annotate(adata, controls=("Metadata_pert_type", "control"))
    history = pp.history(adata)
    assert [set(s) for s in history] == [{"step", "params"}] * 2
    assert history[1]["params"] == {"controls": ["Metadata_pert_type", "control"], "n_controls": 4}
    doc = pytest.importorskip("pathlib").Path(__file__).parents[1] / "docs/profiling.md"
    assert "pp.history(adata)" in doc.read_text()


# ---- evaluate --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lincs(lincs_csv) -> pd.DataFrame:
    return pd.read_csv(lincs_csv)


SPEC = (
    "columns: {compound: Metadata_pert_id, dose: Metadata_mmoles_per_liter, moa: Metadata_moa, "
    "moa_sep: '|'}\n"
)


def _spec(tmp_path, analyses: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC + f"analyses: {analyses}\n")
    return str(path)


def test_evaluate_h5ad_takes_features_from_x_only(tmp_path, run_cli):
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "Metadata_Compound": np.repeat(["a", "b", "c", "DMSO"], 4),
            "Metadata_pert_type": ["trt"] * 12 + ["control"] * 4,
            "cell_area": rng.normal(size=16),  # numeric, no Metadata_ prefix: still metadata
        }
    )
    adata = ad.AnnData(X=rng.normal(size=(16, 5)), obs=obs.set_axis(obs.index.astype(str)))
    adata.var_names = [f"f{i}" for i in range(5)]
    adata.write_h5ad(tmp_path / "p.h5ad")
    out = tmp_path / "ev"
    (tmp_path / "spec.yaml").write_text("analyses: [map_replicate]\n")
    rc, text = run_cli(
        "evaluate",
        tmp_path / "p.h5ad",
        "--spec",
        tmp_path / "spec.yaml",
        f"evaluate.out_dir={out}",
        "evaluate.null_size=50",
    )
    assert rc == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["feature_sets"]["learned"]["n_features"] == 5


def test_misspelled_analysis_parameter_lists_the_valid_ones(tmp_path, lincs, earlier, run_cli):
    lincs.to_parquet(tmp_path / "p.parquet")
    before = _snapshot(earlier)
    rc, text = run_cli(
        "evaluate",
        tmp_path / "p.parquet",
        "--spec",
        _spec(tmp_path, "{map_replicate: {null_sze: 100}}"),
        f"evaluate.out_dir={earlier}",
    )
    assert rc == 2 and "analyses.map_replicate" in text and "null_sze" in text
    assert "null_size" in text and "threshold" in text
    assert _kept(before, earlier)
    rc, text = run_cli(  # a known parameter with an impossible value
        "evaluate",
        tmp_path / "p.parquet",
        "--spec",
        _spec(tmp_path, "{map_replicate: {null_size: 0}}"),
        f"evaluate.out_dir={earlier}",
    )
    assert rc == 2 and "null_size must be >= 1" in text and _kept(before, earlier)
    rc, text = run_cli(  # a misspelled option one level down, under mlp:
        "evaluate",
        tmp_path / "p.parquet",
        "--spec",
        _spec(tmp_path, "{classify: {mlp: {epoch: 3}}}"),
        f"evaluate.out_dir={earlier}",
    )
    assert rc == 2 and "analyses.classify.mlp" in text and "'epoch'" in text and "epochs" in text
    assert _kept(before, earlier)


def test_moa_column_all_nan_skips_what_needs_it_and_says_so(tmp_path, lincs, run_cli):
    lincs.assign(Metadata_moa=np.nan).to_parquet(tmp_path / "p.parquet")
    out = tmp_path / "ev"
    rc, text = run_cli(
        "evaluate",
        tmp_path / "p.parquet",
        "--spec",
        _spec(tmp_path, "[nsc, activity]"),
        f"evaluate.out_dir={out}",
        "evaluate.null_size=50",
    )
    assert rc == 0, text
    assert "nsc on learned skipped" in text and "Metadata_moa" in text
    summary = json.loads((out / "summary.json").read_text())
    assert "Metadata_moa" in summary["skipped"]["nsc on learned"]
    assert "nsc" not in summary["metrics"] and "activity" in summary["metrics"]
    # nothing at all to run: an error, not an empty table
    rc, text = run_cli(
        "evaluate",
        tmp_path / "p.parquet",
        "--spec",
        _spec(tmp_path, "[nsc]"),
        f"evaluate.out_dir={tmp_path / 'ev2'}",
    )
    assert rc == 2 and "no analysis could run" in text and "Metadata_moa" in text


def test_single_compound_with_and_without_dmso(tmp_path, lincs, run_cli):
    """One compound, one well per dose: no replicate pairs (was copairs' UnpairedException)."""
    cpd = lincs[lincs.Metadata_pert_type != "control"].Metadata_pert_id.iloc[0]
    one = lincs[lincs.Metadata_pert_id == cpd]
    dmso = lincs[lincs.Metadata_pert_type == "control"]
    pd.concat([one, dmso]).to_parquet(tmp_path / "with.parquet")
    one.to_parquet(tmp_path / "without.parquet")
    spec = _spec(tmp_path, "[nsc, map_replicate, activity]")
    out = tmp_path / "ev"
    rc, text = run_cli(
        "evaluate",
        tmp_path / "with.parquet",
        "--spec",
        spec,
        f"evaluate.out_dir={out}",
        "evaluate.null_size=50",
    )
    assert rc == 0 and "map_replicate on learned skipped" in text and "positive pairs" in text
    assert "nsc on learned skipped" in text and "at least 2 compounds" in text  # was NaN
    assert "Traceback" not in text and "UnpairedException" not in text
    assert "activity" in json.loads((out / "summary.json").read_text())["metrics"]
    rc, text = run_cli(
        "evaluate",
        tmp_path / "without.parquet",
        "--spec",
        spec,
        f"evaluate.out_dir={tmp_path / 'ev2'}",
        "evaluate.null_size=50",
    )
    assert rc == 2 and "Traceback" not in text
    assert "map_replicate" in text and "activity" in text


def test_evaluate_missing_profiles_file_names_it(tmp_path, run_cli):
    missing = tmp_path / "nope" / "profiles.parquet"
    rc, text = run_cli("evaluate", missing, f"evaluate.out_dir={tmp_path / 'ev'}")
    assert rc == 2 and str(missing) in text and "does not exist" in text
    missing_spec = tmp_path / "nope.yaml"
    rc, text = run_cli("evaluate", missing, "--spec", missing_spec)
    assert rc == 2 and str(missing_spec) in text
    rc, text = run_cli("evaluate", tmp_path, f"evaluate.out_dir={tmp_path / 'ev'}")
    assert rc == 2 and f"{tmp_path} is a folder" in text


def test_broken_spec_yaml_names_file_and_line(tmp_path, lincs, run_cli):
    lincs.to_parquet(tmp_path / "p.parquet")
    spec = tmp_path / "broken.yaml"
    spec.write_text("columns:\n  compound: Metadata_pert_id\nanalyses: [nsc, map_replicate\n")
    rc, text = run_cli(
        "evaluate", tmp_path / "p.parquet", "--spec", spec, f"evaluate.out_dir={tmp_path / 'e'}"
    )
    assert rc == 2 and str(spec) in text and "line " in text and "Traceback" not in text


def test_evaluate_nan_features_name_column_and_row(tmp_path, lincs, run_cli):
    bad = lincs.copy()
    feature = [c for c in bad.columns if not c.startswith("Metadata_")][3]
    bad.loc[7, feature] = np.nan
    bad.to_parquet(tmp_path / "p.parquet")
    rc, text = run_cli("evaluate", tmp_path / "p.parquet", f"evaluate.out_dir={tmp_path / 'e'}")
    assert rc == 2 and feature in text and "row 7" in text


def test_evaluate_into_a_read_only_folder_fails_first(tmp_path, lincs, read_only, run_cli):
    lincs.to_parquet(tmp_path / "p.parquet")
    ro = read_only(tmp_path / "ro")
    rc, text = run_cli("evaluate", tmp_path / "p.parquet", f"evaluate.out_dir={ro}")
    assert rc == 2 and str(ro) in text and "cannot write" in text
    assert "profiles ×" not in text  # refused before any analysis ran


def test_evaluate_holds_the_output_lock(tmp_path, lincs, earlier, run_cli):
    lincs.to_parquet(tmp_path / "p.parquet")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom celldino.io.lock import output_lock\n"
            f"with output_lock({str(earlier)!r}, 'evaluate'):\n"
            "    print('held', flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(earlier)
        rc, text = run_cli("evaluate", tmp_path / "p.parquet", f"evaluate.out_dir={earlier}")
        assert rc == 2 and str(earlier) in text and f"pid {holder.pid}" in text
        assert _kept(before, earlier)
    finally:
        holder.kill()
        holder.wait(timeout=30)


# ---- report ---------------------------------------------------------------------------------


def test_report_into_a_read_only_folder_fails_before_drawing(tmp_path, read_only, run_cli):
    from celldino.errors import OutputError
    from celldino.report import Section, build_report

    run = tmp_path / "run"
    run.mkdir()
    ro = read_only(tmp_path / "ro")
    drawn: list[float] = []

    def section_slow(_run):
        drawn.append(time.time())
        return Section("slow", "slow")

    with pytest.raises(OutputError, match=str(ro)):
        build_report(run, out=ro / "report.html", sections=[section_slow])
    assert drawn == []
    rc, text = run_cli("report", run, "--out", ro / "report.html")
    assert rc == 2 and str(ro) in text and "Traceback" not in text


# ---- profile: inputs given twice, mixed, stray or bracketed (#103/#105/#106, #79/#81/#82) ----


def _extraction(folder, df, checkpoint="c458f7e92fb66f51", n=1):
    _shards(folder, df, n=n)
    write_manifest(
        folder,
        {
            "complete": True,
            "shards": [shard_name(k) for k in range(n)],
            "checkpoint": {"sha256_16": checkpoint, "which": "teacher"},
            "features": {"feature": "cls", "level": "cell"},
            "channels": ["DNA", "ER"],
            "n_features": len(FEATS),
        },
    )
    return folder


def _with_ids(df: pd.DataFrame, prefix: str = "") -> pd.DataFrame:
    df = df.copy()
    df["Metadata_CellID"] = [
        f"{prefix}{p}/{w}/{i}"
        for i, (p, w) in enumerate(zip(df["Metadata_Plate"], df["Metadata_Well"]))
    ]
    return df


def test_profile_refuses_duplicated_or_mixed_extractions(tmp_path, earlier, run_cli):
    cells = _with_ids(_cells())
    emb = _extraction(tmp_path / "emb", cells)
    other = _extraction(tmp_path / "e34", cells, checkpoint="2ca17b879bf6ba28")
    again = _extraction(tmp_path / "again", cells)  # the same cells extracted a second time
    before = _snapshot(earlier)
    out = f"profile.out={earlier}/wells.h5ad"
    rc, text = run_cli("profile", f"profile.input=[{emb},{other}]", out)
    assert rc == 2 and str(emb) in text and str(other) in text and "'checkpoint'" in text
    rc, text = run_cli("profile", f"profile.input=[{emb},{emb}]", out)
    assert rc == 2 and "twice" in text and str(emb / shard_name(0)) in text
    rc, text = run_cli("profile", f"profile.input=[{emb},{emb}/*.parquet]", out)
    assert rc == 2 and "twice" in text
    rc, text = run_cli("profile", f"profile.input=[{emb},{again}]", out)
    assert rc == 2 and "Metadata_CellID" in text and "'P1/A00/0'" in text
    assert _kept(before, earlier) and "Traceback" not in text
    # plates extracted separately with one checkpoint are profiled together
    p1 = _extraction(tmp_path / "p1", cells[cells["Metadata_Plate"] == "P1"])
    p2 = _extraction(tmp_path / "p2", cells[cells["Metadata_Plate"] == "P2"])
    rc, text = run_cli("profile", f"profile.input=[{p1},{p2}]", f"profile.out={tmp_path}/w.h5ad")
    assert rc == 0, text
    assert int(read_h5ad(tmp_path / "w.h5ad").obs["Metadata_Count_Cells"].sum()) == len(cells)


def test_profile_reads_only_the_shards_the_manifest_lists(tmp_path, run_cli):
    cells = _cells()
    emb = _extraction(tmp_path / "emb", cells)
    _cells(seed=1).to_parquet(emb / shard_name(1), index=False)  # stray, not in the manifest
    for i, inp in enumerate([str(emb), f"{emb}/part-*.parquet"]):
        out = tmp_path / f"w{i}.h5ad"
        rc, text = run_cli("profile", f"profile.input=['{inp}']", f"profile.out={out}")
        assert rc == 0, text
        assert int(read_h5ad(out).obs["Metadata_Count_Cells"].sum()) == len(cells)


def test_profile_input_with_brackets_is_a_path_when_it_exists(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cells = _cells()
    _extraction(tmp_path / "emb[1]", cells)
    _extraction(tmp_path / "emb1", _cells(seed=5).iloc[:8], checkpoint="2ca17b879bf6ba28")
    for i, inp in enumerate(["emb[1]", "emb[1]/part-*.parquet", "emb[1]/part-00000.parquet"]):
        rc, text = run_cli("profile", f"profile.input=['{inp}']", f"profile.out=w{i}.h5ad")
        assert rc == 0, (inp, text)
        adata = read_h5ad(tmp_path / f"w{i}.h5ad")
        assert int(adata.obs["Metadata_Count_Cells"].sum()) == len(cells), inp
    # a path that does not exist is still a glob
    rc, text = run_cli("profile", "profile.input=['emb[9]/*.parquet']", "profile.out=w9.h5ad")
    assert rc == 2 and "emb[9]" in text and "glob" in text


def test_profile_null_values_count_as_nan(tmp_path, run_cli):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = _cells()
    folder = tmp_path / "emb"
    folder.mkdir()
    table = pa.Table.from_pandas(cells, preserve_index=False)
    col = table.column(FEATS[0]).to_pylist()
    col[0] = None  # P1/A00, first cell
    table = table.set_column(table.schema.get_field_index(FEATS[0]), FEATS[0], pa.array(col))
    pq.write_table(table, folder / "cells.parquet")
    out = tmp_path / "w.h5ad"
    rc, text = run_cli(
        "profile", f"profile.input=[{folder}]", f"profile.out={out}", "profile.nonfinite=error"
    )
    assert rc == 2 and FEATS[0] in text, text
    from celldino.pp.aggregate import aggregate

    for method in ("mean", "median"):
        adata = aggregate(folder, method=method)
        assert np.isnan(adata[0, FEATS[0]].X).all(), method  # not the mean of the other 3 cells


# ---- profile: settings naming absent columns, profiles as input, bad memory_limit ------------


def test_profile_setting_naming_an_absent_column_writes_nothing(tmp_path, run_cli):
    emb = _extraction(tmp_path / "emb", _cells())
    out = tmp_path / "o" / "wells.h5ad"
    rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={out}")
    assert rc == 0, text
    before = _snapshot(out.parent)
    other = _extraction(tmp_path / "emb2", _cells(seed=3), checkpoint="2ca17b879bf6ba28")
    for setting in [
        "profile.normalize_by=Metadata_Nope",
        "profile.sphere_by=Metadata_Nope",
        "profile.consensus=[Metadata_Nope]",
        "profile.harmony_key=Metadata_Nope",
        "profile.by=[Metadata_Plate,Metadata_Nope]",
        "profile.via=[Metadata_Nope]",
    ]:
        extra = ["profile.sphere=ZCA"] if "sphere_by" in setting else []
        rc, text = run_cli(
            "profile", f"profile.input=[{other}]", f"profile.out={out}", setting, *extra
        )
        assert rc == 2 and setting.split("=")[0] in text and "Metadata_Nope" in text, text
        assert _snapshot(out.parent) == before, setting  # no cache, no profiles rewritten
    # a later step failing (one control well per plate) keeps the old cache too
    df = _cells()
    df = df[df["Metadata_Well"] != "A01"]
    bad = _extraction(tmp_path / "bad", df)
    floor0 = ["profile.normalize=mad_robustize", "profile.normalize_floor=0"]  # pycytominer's
    rc, text = run_cli("profile", f"profile.input=[{bad}]", f"profile.out={out}", *floor0)
    assert rc == 2 and _kept(before, out.parent)
    # and a successful run replaces it
    rc, text = run_cli("profile", f"profile.input=[{other}]", f"profile.out={out}")
    assert rc == 0, text
    cache = read_h5ad(out.with_name("wells.aggregated.h5ad"))
    np.testing.assert_allclose(cache.X, pp.aggregate(other).X)  # the new input's aggregation
    assert not out.with_name("wells.aggregated.pending.h5ad").exists()


def test_profile_refuses_profiles_and_bad_memory_limit(tmp_path, earlier, run_cli):
    emb = _extraction(tmp_path / "emb", _cells())
    rc, text = run_cli("profile", f"profile.input=[{emb}]", f"profile.out={tmp_path}/w.h5ad")
    assert rc == 0, text
    before = _snapshot(earlier)
    # well profiles (they count their cells) grouped again by plate: a mean of means, refused
    rc, text = run_cli(
        "profile",
        f"profile.input={tmp_path}/w.parquet",
        f"profile.out={earlier}/wells.h5ad",
        "profile.by=Metadata_Plate",
    )
    assert rc == 2 and "w.parquet" in text and "aggregated already" in text
    assert (
        "Metadata_Count_Cells" in text and "Metadata_Plate" in text and "average averages" in text
    )
    with pytest.raises(ValueError, match="aggregated already"):  # the library call too
        pp.aggregate(tmp_path / "w.parquet", by=["Metadata_Plate"])
    other = pd.read_parquet(tmp_path / "w.parquet").rename(
        columns={"Metadata_Count_Cells": "Metadata_Object_Count"}  # pycytominer's name
    )
    other.to_parquet(tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="Metadata_Object_Count"):
        pp.aggregate(tmp_path / "o.parquet", by=["Metadata_Plate"])
    # ... but by well, one row each: the rows are the profiles, counts kept (identity)
    wells = pd.read_parquet(tmp_path / "w.parquet")
    again = pp.aggregate(tmp_path / "w.parquet")
    np.testing.assert_array_equal(again.X, wells[FEATS].to_numpy())
    assert list(again.obs["Metadata_Count_Cells"]) == list(wells["Metadata_Count_Cells"])
    rc, text = run_cli(
        "profile",
        f"profile.input=[{emb}]",
        f"profile.out={earlier}/w.h5ad",
        "profile.memory_limit=lots",
    )
    assert rc == 2 and "profile.memory_limit" in text and "2GB" in text
    assert _kept(before, earlier) and "Traceback" not in text


# ---- evaluate: control column / value that match nothing, parts of a failing run ------------


def _moa_profiles(path, seed: int = 0):
    """Wells of 4 compounds (2 MoAs) × 3 replicates and DMSO controls, as a Parquet table."""
    rng = np.random.default_rng(seed)
    cpds = {"a": "m1", "b": "m1", "c": "m2", "d": "m2", "DMSO": None}
    rows = [(c, m, "control" if c == "DMSO" else "trt") for c, m in cpds.items() for _ in range(3)]
    df = pd.DataFrame(rows, columns=["Metadata_Compound", "Metadata_MoA", "Metadata_pert_type"])
    df["Metadata_Plate"] = "P1"
    centre = {"m1": 2.0, "m2": -2.0, None: 0.0}
    for j in range(5):
        df[f"f{j}"] = [centre[m] * (j % 2) + rng.normal(scale=0.3) for m in df["Metadata_MoA"]]
    df.to_parquet(path, index=False)
    return path


def test_evaluate_control_column_or_value_matching_nothing_is_refused(tmp_path, earlier, run_cli):
    prof = _moa_profiles(tmp_path / "p.parquet")
    spec = tmp_path / "spec.yaml"
    before = _snapshot(earlier)
    for columns, words in [
        ("{control: Metadata_Nope}", ["columns.control", "Metadata_Nope", "Metadata_pert_type"]),
        ("{control_value: ctrl}", ["columns.control_value", "'ctrl'", "'control'", "'trt'"]),
    ]:
        spec.write_text(f"columns: {columns}\nanalyses: [nsc]\n")
        rc, text = run_cli("evaluate", prof, "--spec", spec, f"evaluate.out_dir={earlier}")
        assert rc == 2 and str(spec) in text and all(w in text for w in words), text
        assert "nsc on" not in text  # refused before any analysis ran
        assert _kept(before, earlier) and not (earlier / "parts").exists()
    # the default control column may be absent: a screen without controls
    df = pd.read_parquet(prof).drop(columns="Metadata_pert_type")
    df[df["Metadata_Compound"] != "DMSO"].to_parquet(tmp_path / "noctl.parquet")
    spec.write_text("analyses: [nsc]\n")
    rc, text = run_cli(
        "evaluate", tmp_path / "noctl.parquet", "--spec", spec, f"evaluate.out_dir={tmp_path}/ev"
    )
    assert rc == 0, text


def test_evaluate_missing_spec_input_names_the_key(tmp_path, earlier, run_cli):
    prof = _moa_profiles(tmp_path / "p.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text("inputs: {baseline: nothere/profiles.parquet}\nanalyses: [nsc]\n")
    before = _snapshot(earlier)
    rc, text = run_cli("evaluate", prof, "--spec", spec, f"evaluate.out_dir={earlier}")
    assert rc == 2 and "inputs.baseline" in text and str(spec) in text
    assert "nothere/profiles.parquet" in text and _kept(before, earlier)


def test_failing_evaluate_leaves_the_finished_run_alone(tmp_path, run_cli, monkeypatch):
    from celldino.eval import analyses as registry

    out = tmp_path / "ev"
    spec = tmp_path / "spec.yaml"
    spec.write_text("analyses: [nsc, activity]\n")
    rc, text = run_cli(
        "evaluate",
        _moa_profiles(tmp_path / "p.parquet"),
        "--spec",
        spec,
        f"evaluate.out_dir={out}",
        "evaluate.null_size=50",
    )
    assert rc == 0, text
    before = {k: v for k, v in _snapshot(out).items() if not k.endswith(".celldino.lock")}
    assert any("parts/nsc__learned.json" in k for k in before)

    def broken(*_a, **_k):
        raise ValueError("column 'Metadata_X' has bad values")

    monkeypatch.setitem(registry.ANALYSES, "activity", broken)
    new = _moa_profiles(tmp_path / "p2.parquet", seed=7)  # other data: nsc runs again
    rc, text = run_cli(
        "evaluate", new, "--spec", spec, f"evaluate.out_dir={out}", "evaluate.null_size=50"
    )
    assert rc == 2 and "activity" in text
    assert _kept(before, out)  # parts/, tables/, summary.json as the finished run left them
    monkeypatch.undo()
    rc, text = run_cli(
        "evaluate", new, "--spec", spec, f"evaluate.out_dir={out}", "evaluate.null_size=50"
    )
    assert rc == 0, text
    assert "nsc on learned: done before, kept" in text  # resumed from the failed run's part
    assert not (out / "pending").exists()
    part = json.loads((out / "parts" / "nsc__learned.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert dict(part["metrics"])["NSC"] == summary["metrics"]["nsc"]["NSC"]["learned"]


def test_report_out_an_existing_folder_or_a_file_as_run_dir(tmp_path, run_cli):
    from celldino.report import Section, build_report

    run = tmp_path / "r89"
    run.mkdir()
    (run / "keep.txt").write_text("earlier")
    drawn: list[int] = []

    def section_counted(_run):
        drawn.append(1)
        return Section("s", "s")

    from celldino.errors import OutputError

    with pytest.raises(OutputError, match="is a folder"):
        build_report(run, out=run, sections=[section_counted])
    assert drawn == []  # refused before drawing
    rc, text = run_cli("report", run, "--out", run)
    assert rc == 2 and str(run) in text and "is a folder" in text and "report.html" in text
    assert (run / "keep.txt").read_text() == "earlier" and not (run / "report.html").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, text = run_cli("report", afile)
    assert rc == 2 and str(afile) in text and "not a folder" in text
    assert "does not exist" not in text


# ---- evaluate: column roles as key=value, screens without controls, cytotable names ----------

ROLES = [
    "evaluate.columns.compound=Metadata_pert_id",
    "evaluate.columns.dose=Metadata_mmoles_per_liter",
    "evaluate.columns.moa=Metadata_moa",
    "evaluate.columns.moa_sep=|",
    "evaluate.null_size=50",
    "evaluate.n_boot=0",
]


def _spec_file(tmp_path, text: str):
    path = tmp_path / "spec_only.yaml"
    path.write_text(text)
    return path


def _metrics(out) -> pd.DataFrame:
    return pd.read_csv(out / "metrics.csv").set_index(["analysis", "metric"])


def test_evaluate_column_roles_as_key_value_without_a_spec(tmp_path, lincs_csv, run_cli):
    """The real LINCS table with the roles on the command line only: activity mAP 0.6178, the
    value copairs gives (docs/validation.md); a spec's role is overridden by the command line."""
    rc, text = run_cli("evaluate", lincs_csv, *ROLES, f"evaluate.out_dir={tmp_path / 'a'}")
    assert rc == 0, text
    m = _metrics(tmp_path / "a")
    assert round(m.loc[("activity", "mAP"), "value"], 4) == 0.6178
    assert {"nsc", "map_replicate", "activity"} <= set(m.index.get_level_values(0))
    spec = tmp_path / "spec.yaml"  # the spec names another compound column: the CLI wins
    spec.write_text("columns: {compound: Metadata_broad_sample}\nanalyses: [activity]\n")
    rc, text = run_cli(
        "evaluate", lincs_csv, "--spec", spec, *ROLES, f"evaluate.out_dir={tmp_path / 'b'}"
    )
    assert rc == 0, text
    assert (
        _metrics(tmp_path / "b").loc[("activity", "mAP"), "value"]
        == m.loc[("activity", "mAP"), "value"]
    )


def test_evaluate_column_roles_refused_naming_the_argument(tmp_path, lincs_csv, earlier, run_cli):
    before = _snapshot(earlier)
    rc, text = run_cli(
        "evaluate", lincs_csv, "evaluate.columns.mao=Metadata_moa", f"evaluate.out_dir={earlier}"
    )
    assert rc == 2 and "evaluate.columns.mao=Metadata_moa" in text and "'mao'" in text
    assert "compound" in text and "control_value" in text and "moa_sep" in text
    rc, text = run_cli(  # a role naming a column the profiles lack: refused before any analysis
        "evaluate", lincs_csv, "evaluate.columns.moa=Metadata_MOA", f"evaluate.out_dir={earlier}"
    )
    assert rc == 2 and "evaluate.columns.moa" in text and "'Metadata_MOA'" in text
    assert "Metadata_moa" in text and "nsc on" not in text
    assert _kept(before, earlier) and not (earlier / "parts").exists()
    # a role left at its default whose column is absent (no Metadata_MoA): what needs it is
    # skipped with the setting to use, the others run (was: the whole run stopped at nsc)
    rc, text = run_cli(
        "evaluate",
        lincs_csv,
        "--spec",
        _spec_file(tmp_path, "analyses: [nsc, activity]\n"),
        "evaluate.columns.compound=Metadata_pert_id",
        "evaluate.null_size=50",
        "evaluate.n_boot=0",
        f"evaluate.out_dir={tmp_path / 'ev'}",
    )
    assert rc == 0 and "nsc on learned skipped" in text and "evaluate.columns.moa=" in text
    assert "activity" in json.loads((tmp_path / "ev" / "summary.json").read_text())["metrics"]


def test_screen_without_controls_evaluates_what_it_can(tmp_path, lincs, run_cli):
    """No control column: activity (needs DMSO) is skipped with its reason in metrics and
    summary, the others run; NSC equals NSC on the same plate with its DMSO wells (which NSC
    leaves out anyway)."""
    lincs.to_parquet(tmp_path / "all.parquet")
    trt = lincs[lincs["Metadata_pert_type"] != "control"].drop(columns="Metadata_pert_type")
    trt.to_parquet(tmp_path / "noctl.parquet")
    rc, text = run_cli(
        "evaluate", tmp_path / "all.parquet", *ROLES, f"evaluate.out_dir={tmp_path / 'all'}"
    )
    assert rc == 0, text
    out = tmp_path / "noctl"
    rc, text = run_cli("evaluate", tmp_path / "noctl.parquet", *ROLES, f"evaluate.out_dir={out}")
    assert rc == 0, text
    assert "activity on learned skipped" in text and "no column 'Metadata_pert_type'" in text
    m = _metrics(out)
    assert np.isnan(m.loc[("activity", "skipped"), "value"])
    assert "evaluate.columns.control" in m.loc[("activity", "skipped"), "flags"]
    assert m.loc[("nsc", "NSC"), "value"] == _metrics(tmp_path / "all").loc[("nsc", "NSC"), "value"]
    summary = json.loads((out / "summary.json").read_text())
    assert "activity" not in summary["metrics"] and "nsc" in summary["metrics"]
    assert "negative controls" in summary["skipped"]["activity on learned"]
    # nothing that can run: exit 2 naming what is missing
    rc, text = run_cli(
        "evaluate",
        tmp_path / "noctl.parquet",
        *ROLES,
        f"evaluate.out_dir={tmp_path / 'none'}",
        "--spec",
        _spec(tmp_path, "[activity]"),
    )
    assert rc == 2 and "no analysis could run" in text and "negative controls" in text


def test_evaluate_reads_a_cytotable_named_table(tmp_path, lincs, run_cli):
    """cytotable's Image_Metadata_Plate/_Well are metadata (read as Metadata_Plate/_Well), a
    string image column is left out by the spec's feature prefixes (a list)."""
    df = lincs.rename(
        columns={"Metadata_Plate": "Image_Metadata_Plate", "Metadata_Well": "Image_Metadata_Well"}
    )
    df = df.copy()  # one block: no fragmentation warning
    df["Image_FileName_DNA"] = "r01c01f01p01-ch5.tiff"
    df.to_parquet(tmp_path / "ct.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text("feature_prefix: [Cells_, Cytoplasm_, Nuclei_]\nanalyses: [activity]\n")
    out = tmp_path / "ev"
    rc, text = run_cli(
        "evaluate", tmp_path / "ct.parquet", "--spec", spec, *ROLES, f"evaluate.out_dir={out}"
    )
    assert rc == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["feature_sets"]["learned"]["n_features"] == 454
    assert round(_metrics(out).loc[("activity", "mAP"), "value"], 4) == 0.6178
    ap = pd.read_parquet(out / "tables" / "activity__learned__map.parquet")
    assert "Image_Metadata_Plate" not in ap.columns


def test_profile_feature_columns_that_match_nothing_or_mix_families(tmp_path, earlier, run_cli):
    """profile.features: a token matching no column, infer finding nothing or two families,
    infer beside other tokens: refused naming them and the prefixes present, nothing written."""
    from tests.test_pp_cli import _cytotable_cells

    df = _cytotable_cells()
    df["emb_0000"] = np.random.default_rng(1).normal(size=len(df))  # any recipe can run on it
    df.to_parquet(tmp_path / "mixed.parquet", index=False)
    other = df.drop(
        columns=[c for c in df.columns if c.startswith(("Cells", "Cyto", "Nuc", "emb"))]
    )
    other["dino_0"] = 1.0
    other.to_parquet(tmp_path / "other.parquet", index=False)
    before = _snapshot(earlier)
    out = f"profile.out={earlier}/wells.h5ad"
    cases = [
        (
            ["profile.features=Cells_,Cytosol_,Nucleus_"],
            ["'Cytosol_', 'Nucleus_'", "Cells_ (3)", "Cytoplasm_ (3)", "Nuclei_ (3)", "emb_ (1)"],
        ),
        (
            [],  # the default, infer
            ["two feature families", "CellProfiler (9 columns)", "embeddings (1 columns)"],
        ),
        (["profile.features=infer,emb_"], ["'infer' stands alone"]),
    ]
    for args, words in cases:
        rc, text = run_cli("profile", f"profile.input={tmp_path / 'mixed.parquet'}", out, *args)
        assert rc == 2 and "mixed.parquet" in text and all(w in text for w in words), text
    rc, text = run_cli("profile", f"profile.input={tmp_path / 'other.parquet'}", out)
    assert rc == 2 and "found no feature columns" in text and "dino_ (1)" in text
    assert _kept(before, earlier) and "Traceback" not in text
    # asked for, both families together are fine
    rc, text = run_cli(
        "profile",
        f"profile.input={tmp_path / 'mixed.parquet'}",
        f"profile.out={tmp_path}/both.h5ad",
        "profile.features=Cells_,Cytoplasm_,Nuclei_,emb_",
        "profile.normalize=none",
    )
    assert rc == 0, text


def test_evaluate_comparison_naming_an_unknown_feature_set_names_the_key(
    tmp_path, earlier, run_cli
):
    prof = _moa_profiles(tmp_path / "p.parquet")

    def files():
        return {k: v for k, v in _snapshot(earlier).items() if not k.endswith(".celldino.lock")}

    before = files()
    for analysis, key, value in (
        ("mantel", "other", "engineerd"),
        ("cca", "other", "engineerd"),
        ("block_search", "blocks", "[learned_block9]"),
    ):
        spec = tmp_path / f"{analysis}.yaml"
        spec.write_text(f"analyses: {{{analysis}: {{{key}: {value}}}}}\n")
        rc, text = run_cli("evaluate", prof, "--spec", spec, f"evaluate.out_dir={earlier}")
        assert rc == 2 and f"analyses.{analysis}.{key}" in text, text
        assert value.strip("[]") in text and "learned" in text
        assert files() == before  # the earlier outputs untouched (the lock names the last run)


def test_negative_bootstrap_count_is_refused(tmp_path, lincs, earlier, run_cli):
    lincs.to_parquet(tmp_path / "p.parquet")
    before = _snapshot(earlier)
    rc, text = run_cli(
        "evaluate", tmp_path / "p.parquet", f"evaluate.out_dir={earlier}", "evaluate.n_boot=-1"
    )
    assert rc == 2 and "evaluate.n_boot" in text and _kept(before, earlier)


def test_negative_map_permutations_are_refused(tmp_path, lincs, earlier, run_cli):
    lincs.to_parquet(tmp_path / "p.parquet")
    rc, text = run_cli(
        "evaluate",
        tmp_path / "p.parquet",
        "--spec",
        _spec(tmp_path, "{activity: {permutations: -5}}"),
        f"evaluate.out_dir={tmp_path / 'ev'}",
        "evaluate.null_size=50",
    )
    assert rc == 2 and "analyses.activity.permutations" in text and ">= 0" in text


def test_cellprofiler_per_object_csv_gets_a_hint_then_profiles(tmp_path, run_cli):
    """CellProfiler's ExportToSpreadsheet Nuclei.csv names measurements without the compartment
    (AreaShape_Area): infer finds nothing and says which prefixes to give; given, the per-cell
    CSV is averaged per well like the pandas groupby."""
    rng = np.random.default_rng(0)
    n = 24
    df = pd.DataFrame(
        {
            "ImageNumber": np.repeat(np.arange(1, 7), 4),
            "ObjectNumber": np.tile(np.arange(1, 5), 6),
            "Metadata_Plate": "P1",
            "Metadata_Well": np.repeat(["A01", "A02", "A03"], 8),
            "Metadata_pert_type": np.repeat(["control", "trt", "trt"], 8),
            "AreaShape_Area": rng.normal(100, 10, n),
            "Intensity_MeanIntensity_DNA": rng.uniform(size=n),
        }
    )
    df.to_csv(tmp_path / "Nuclei.csv", index=False)
    out = f"profile.out={tmp_path}/p.h5ad"
    rc, text = run_cli("profile", f"profile.input={tmp_path / 'Nuclei.csv'}", out)
    assert rc == 2 and "per-object export" in text and "features=AreaShape_,Intensity_" in text
    rc, text = run_cli(
        "profile",
        f"profile.input={tmp_path / 'Nuclei.csv'}",
        out,
        "profile.features=AreaShape_,Intensity_",
    )
    assert rc == 0, text
    adata = pp.aggregate(tmp_path / "Nuclei.csv", features="AreaShape_,Intensity_")
    ref = df.groupby("Metadata_Well")[["AreaShape_Area", "Intensity_MeanIntensity_DNA"]].mean()
    np.testing.assert_allclose(adata.X, ref.loc[list(adata.obs["Metadata_Well"])].to_numpy())
    assert list(adata.obs["Metadata_Count_Cells"]) == [8, 8, 8]


def test_profile_recipe_settings_that_cannot_work_are_refused(tmp_path, run_cli):
    """A sphering shrinkage that is no estimator or number in [0, 1], and replicate selection
    without a replicate key: exit 2 naming the setting, nothing written."""
    emb = _shards(tmp_path / "emb", _cells())
    out = f"profile.out={tmp_path}/w.h5ad"
    rc, text = run_cli("profile", f"profile.input=[{emb}]", out, "profile.sphere_shrinkage=2")
    assert rc == 2 and "profile.sphere_shrinkage" in text and "oas, ledoit_wolf" in text
    rc, text = run_cli("profile", f"profile.input=[{emb}]", out, "profile.select=[replicate]")
    assert rc == 2 and "replicate_key" in text and "Traceback" not in text
    assert not (tmp_path / "w.h5ad").exists()
