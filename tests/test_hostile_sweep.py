"""Issue 22's final sweep (/tmp/exp/sweep/sweep.py, docs/reliability.md "A third sweep"): each
case it found wrong, refused with exit code 2 and one line naming the cause, nothing written."""

from __future__ import annotations

import numpy as np
import pandas as pd

FEATS = [f"emb_{j:04d}" for j in range(4)]


def _cells(tmp_path, edit=None):
    """2 plates × 4 wells × 3 cells, wells A00/A01 controls; `edit(df)` changes it in place."""
    rng = np.random.default_rng(0)
    rows = [
        (p, f"A{w:02d}", "control" if w < 2 else "trt", "DMSO" if w < 2 else f"cpd{w % 2}")
        for p in ("P1", "P2")
        for w in range(4)
        for _ in range(3)
    ]
    df = pd.DataFrame(
        rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_pert_type", "Metadata_Compound"]
    )
    for f in FEATS:
        df[f] = rng.normal(size=len(df))
    if edit is not None:
        edit(df)
    path = tmp_path / "cells.parquet"
    df.to_parquet(path, index=False)
    return path


def _written(folder):
    """Files in `folder` but the output locks (they name the last writer, and stay)."""
    return [p.name for p in folder.iterdir() if not p.name.endswith(".celldino.lock")]


def _profile(run_cli, tmp_path, inp, *extra):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    rc, text = run_cli(
        "profile",
        f"profile.input={inp}",
        f"profile.out={out}/wells",
        "profile.formats=parquet",
        *extra,
    )
    return rc, text, out


def test_a_profile_key_named_twice_is_refused(run_cli, tmp_path):
    rc, text, out = _profile(
        run_cli,
        tmp_path,
        _cells(tmp_path),
        "profile.by=[Metadata_Plate,Metadata_Well,Metadata_Well]",
    )
    assert rc == 2 and "profile.by" in text and "'Metadata_Well' named more than once" in text, text
    assert "list each column once" in text and "Traceback" not in text
    assert _written(out) == []


def test_a_profile_key_that_is_a_feature_is_refused(run_cli, tmp_path):
    rc, text, out = _profile(
        run_cli, tmp_path, _cells(tmp_path), "profile.by=[Metadata_Plate,emb_0000]"
    )
    assert rc == 2 and "emb_0000" in text and "feature column" in text, text
    assert "Traceback" not in text and _written(out) == []


def test_cells_without_a_well_are_not_averaged_into_a_profile_of_their_own(run_cli, tmp_path):
    def blank(df):  # one cell of P1/A02 and one of P2/A03 lose their well
        df.loc[[6, 21], "Metadata_Well"] = None

    rc, text, out = _profile(run_cli, tmp_path, _cells(tmp_path, blank))
    assert rc == 2 and "2 row(s) have no value in Metadata_Well" in text, text
    assert _written(out) == []
    # the same cells with their wells: 8 profiles, 3 cells each (the count numpy gives)
    rc, text, out = _profile(run_cli, tmp_path, _cells(tmp_path))
    wells = pd.read_parquet(out / "wells.parquet")
    assert rc == 0 and len(wells) == 8 and (wells["Metadata_Count_Cells"] == 3).all()


def _moa_profiles(path):
    """Wells of 4 compounds (2 MoAs) × 3 replicates and 3 DMSO wells, as a Parquet table."""
    rng = np.random.default_rng(0)
    cpds = {"a": "m1", "b": "m1", "c": "m2", "d": "m2", "DMSO": None}
    rows = [(c, m, "control" if c == "DMSO" else "trt") for c, m in cpds.items() for _ in range(3)]
    df = pd.DataFrame(rows, columns=["Metadata_Compound", "Metadata_MoA", "Metadata_pert_type"])
    df["Metadata_Plate"] = "P1"
    centre = {"m1": 2.0, "m2": -2.0, None: 0.0}
    for j in range(5):
        df[f"f{j}"] = [centre[m] * (j % 2) + rng.normal(scale=0.3) for m in df["Metadata_MoA"]]
    df.to_parquet(path, index=False)
    return path


def _evaluate(run_cli, tmp_path, spec_text):
    prof = _moa_profiles(tmp_path / "p.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text)
    out = tmp_path / "ev"
    out.mkdir(exist_ok=True)
    (out / "metrics.csv").write_text("earlier,metrics\n")
    rc, text = run_cli(
        "evaluate", prof, "--spec", spec, f"evaluate.out_dir={out}", "evaluate.n_boot=0"
    )
    return rc, text, out


def test_a_spec_key_set_twice_is_refused_naming_both_lines(run_cli, tmp_path):
    rc, text, out = _evaluate(run_cli, tmp_path, "analyses: [nsc]\nanalyses: [map_replicate]\n")
    assert rc == 2 and "spec.yaml, line 2: 'analyses' is set twice (also on line 1)" in text, text
    assert (out / "metrics.csv").read_text() == "earlier,metrics\n"
    rc, text, _ = _evaluate(run_cli, tmp_path, "columns: {moa: Metadata_MoA, moa: X}\n")
    assert rc == 2 and "'columns.moa' is set twice" in text, text


def test_spec_counts_that_yaml_or_int_would_bend_are_refused(run_cli, tmp_path):
    for value, shown in [("yes", "True"), ("1.5", "1.5")]:
        spec = f"analyses:\n  map_replicate: {{null_size: {value}}}\n"
        rc, text, out = _evaluate(run_cli, tmp_path, spec)
        assert rc == 2 and "null_size" in text and f"{shown} is not a whole number" in text, text
        assert (out / "metrics.csv").read_text() == "earlier,metrics\n"
    rc, text, _ = _evaluate(run_cli, tmp_path, "analyses:\n  map_replicate: {threshold: on}\n")
    assert rc == 2 and "threshold True is not a number" in text, text
    rc, text, _ = _evaluate(run_cli, tmp_path, "analyses:\n  activity: {permutations: 2.5}\n")
    assert rc == 2 and "analyses.activity.permutations must be a whole number" in text, text
    # a whole number written as a float is one
    rc, text, out = _evaluate(
        run_cli, tmp_path, "analyses:\n  map_replicate: {null_size: 1.0e+2}\n"
    )
    assert rc == 0, text


def test_an_h5ad_with_a_feature_named_twice_or_also_in_obs_is_refused(run_cli, tmp_path):
    import anndata as ad

    df = pd.read_parquet(_moa_profiles(tmp_path / "p.parquet"))
    feats = [f"f{j}" for j in range(5)]
    obs = df.drop(columns=feats).set_axis([str(i) for i in range(len(df))])
    spec = tmp_path / "spec.yaml"
    spec.write_text("analyses: [nsc]\n")
    for var, extra, words in [
        (["f0", "f1", "f2", "f3", "f0"], {}, ["['f0'] appear more than once in var_names"]),
        (feats, {"f0": "label"}, ["['f0'] name both an obs (metadata) column and a feature"]),
    ]:
        a = ad.AnnData(X=df[feats].to_numpy(float), obs=obs.assign(**extra))
        a.var_names = var
        a.write_h5ad(tmp_path / "p.h5ad")
        rc, text = run_cli(
            "evaluate", tmp_path / "p.h5ad", "--spec", spec, f"evaluate.out_dir={tmp_path}/ev"
        )
        assert rc == 2 and "p.h5ad" in text and all(w in text for w in words), text
        assert not (tmp_path / "ev" / "metrics.csv").exists()


def test_a_run_record_that_is_json_but_not_a_record_is_named(run_cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for text in ['"hello"', "[1, 2]", '{"stages": [1]}']:
        (run / "pipeline.json").write_text(text)
        rc, out = run_cli("report", run, "--out", tmp_path / "r.html")
        if text.startswith("{"):  # report reads only the fingerprint: a list of stages is fine
            assert rc == 0, out
            continue
        assert rc == 2 and "pipeline.json is JSON but not a celldino run record" in out, out
        assert "Traceback" not in out and not (tmp_path / "r.html").exists()
    rc, out = run_cli("run", f"run.out_dir={run}", "run.stages=report")
    assert rc == 2 and "not a celldino run record" in out and "delete it and rerun" in out, out
    assert (run / "pipeline.json").read_text() == '{"stages": [1]}'


def test_profile_out_ending_in_a_slash_is_a_folder_not_a_file_name(run_cli, tmp_path):
    out = tmp_path / "out"
    rc, text = run_cli("profile", f"profile.input={_cells(tmp_path)}", f"profile.out={out}/sub/")
    assert rc == 2 and f"profile.out={out}/sub/ is a folder; give a file name" in text, text
    assert not out.exists()  # before: out/sub.h5ad, beside the folder the user named


def test_a_nul_character_in_a_plate_name_is_named_not_an_hdf5_traceback(run_cli, tmp_path):
    def nul(df):
        df.loc[df["Metadata_Plate"] == "P2", "Metadata_Plate"] = "P\x002"

    rc, text, out = _profile(run_cli, tmp_path, _cells(tmp_path, nul))
    assert rc == 2 and "column Metadata_Plate holds a NUL" in text and "'P\\x002'" in text, text
    assert "Traceback" not in text and _written(out) == []


def test_a_semicolon_separated_table_for_profile_is_read_as_prepare_reads_it(run_cli, tmp_path):
    """Excel's `;` CSV: read_table (prepare, evaluate) splits it on `;`, and so does profile's
    DuckDB reader now: the profiles equal those of the same cells given as Parquet."""
    cells = pd.read_parquet(_cells(tmp_path))
    cells["Metadata_Plate"] = cells["Metadata_Plate"].str.replace("P", "00")  # text as written
    cells.to_parquet(tmp_path / "cells.parquet", index=False)
    (tmp_path / "cells.csv").write_text(cells.to_csv(index=False, sep=";"))
    rc, text, out = _profile(run_cli, tmp_path, tmp_path / "cells.csv")
    assert rc == 0, text
    from_csv = pd.read_parquet(out / "wells.parquet")
    rc, text = run_cli(
        "profile",
        f"profile.input={tmp_path / 'cells.parquet'}",
        f"profile.out={tmp_path / 'pq' / 'wells'}",
        "profile.formats=parquet",
    )
    assert rc == 0, text
    from_parquet = pd.read_parquet(tmp_path / "pq" / "wells.parquet")
    assert set(from_csv["Metadata_Plate"]) == {"001", "002"}  # not the numbers 1 and 2
    pd.testing.assert_frame_equal(from_csv, from_parquet, check_exact=False, rtol=1e-9)


def test_csv_inputs_split_two_ways_are_refused_naming_both(run_cli, tmp_path):
    cells = pd.read_parquet(_cells(tmp_path))
    folder = tmp_path / "cells"
    folder.mkdir()
    half = len(cells) // 2
    (folder / "a.csv").write_text(cells.iloc[:half].to_csv(index=False, sep=";"))
    (folder / "b.csv").write_text(cells.iloc[half:].to_csv(index=False))
    rc, text, out = _profile(run_cli, tmp_path, folder)
    assert rc == 2 and "a.csv by ';'" in text and "b.csv by ','" in text, text
    assert "Traceback" not in text and _written(out) == []


def test_a_header_only_table_for_profile_says_it_has_no_rows(run_cli, tmp_path):
    cells = pd.read_parquet(_cells(tmp_path))
    (tmp_path / "cells.csv").write_text(",".join(cells.columns) + "\n")
    rc, text, out = _profile(run_cli, tmp_path, tmp_path / "cells.csv")
    assert rc == 2 and "cells.csv: a header line and no data rows" in text, text
    assert "found no feature columns" not in text and _written(out) == []


def test_a_damaged_metrics_table_is_named_in_the_report(run_cli, tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.parquet").write_bytes(b"")  # cut off by a crash
    rc, text = run_cli("report", run, "--out", tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    # one broken section never loses the others (exit 0), but it says which file and why
    assert rc == 0 and "could not be drawn" in html, text
    assert "metrics.parquet cannot be read" in html and "rerun evaluate" in html
    assert "No evaluation results found" not in html


def test_every_count_parameter_of_an_analysis_refuses_yes_and_fractions(run_cli, tmp_path):
    for analysis, param, value, words in [
        ("lowshot", "n_repeats", "yes", "analyses.lowshot.n_repeats must be a whole number"),
        ("heterogeneity", "min_cells", "2.5", "analyses.heterogeneity.min_cells must be a whole"),
        ("classify", "test_size", "on", "analyses.classify.test_size must be a number, got True"),
    ]:
        spec = f"analyses:\n  {analysis}: {{{param}: {value}}}\n"
        rc, text, out = _evaluate(run_cli, tmp_path, spec)
        assert rc == 2 and words in text, text
        assert (out / "metrics.csv").read_text() == "earlier,metrics\n"


def test_synth_channels_differing_only_in_case_are_refused(run_cli, tmp_path):
    rc, text = run_cli("synth", tmp_path / "s", "synth.channels=[DNA,ER,er]")
    assert rc == 2 and "differ only in case" in text and "['DNA', 'ER', 'er']" in text, text
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.tif"))
