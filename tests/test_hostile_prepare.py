"""`celldino prepare` on hostile input and faults: every case is either right or refused.

Each test runs the command line (`run_cli`: exit code + one-line message) and checks the exit code,
that the message names the file / row / column / key, and that nothing already written was lost or
changed. Row numbers in messages are line numbers of the CSV file (the header is line 1).
Screens are the tiny synthetic one (copied tables, shared images) or hand-made 64 px sites.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from celldino.config import PrepareConfig
from celldino.data.prepare import input_fingerprint
from celldino.io.lock import output_lock

FAST = ("prepare.features=false", "prepare.crop_size=32", "prepare.qc_exclude=false")


def _table(tiny_screen: Path, tmp_path: Path, n: int = 6) -> pd.DataFrame:
    """The first n sites of the tiny screen (absolute image paths), not yet written."""
    ld = pd.read_csv(tiny_screen / "load_data.csv").head(n).copy()
    return ld


def _write(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


def _prep(run_cli, ld: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli("prepare", f"prepare.load_data={ld}", f"prepare.out_dir={out}", *FAST, *extra)


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder (the lock file aside): to prove nothing changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".celldino.lock"
    }


def _disk(yx: list[tuple[int, int]], shape=(64, 64), value=3000.0, dtype=np.uint16, seed=0):
    """A plane with bright disks (nuclei) at the given centres on a Poisson background."""
    rng = np.random.default_rng(seed)
    img = rng.poisson(100, shape).astype(np.float64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for y, x in yx:
        img[(yy - y) ** 2 + (xx - x) ** 2 < 49] += value
    return img.astype(dtype)


def _hand_made(tmp_path: Path, sites: list[dict], name: str = "ld.csv") -> Path:
    """sites: [{"well": "A01", "planes": {"DNA": arr, "ER": arr}}]; one plate P."""
    rows = []
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    for k, site in enumerate(sites):
        row = {
            "Metadata_Plate": site.get("plate", "P"),
            "Metadata_Well": site["well"],
            "Metadata_Site": site.get("site", 1),
            "Metadata_Compound": f"c{k}",
        }
        for ch, arr in site["planes"].items():
            f = f"{site['well']}_{k}_{ch}.tif"
            tifffile.imwrite(folder / f, arr)
            row[f"FileName_{ch}"], row[f"PathName_{ch}"] = f, str(folder)
        rows.append(row)
    return _write(pd.DataFrame(rows), tmp_path / name)


def _four_sites(dtype=np.uint16, value=3000.0) -> list[dict]:
    """Four sites of 3 nuclei each, at other places in each site (so illumination keeps them)."""
    layouts = [
        [(20, 20), (40, 44), (22, 46)],
        [(14, 30), (44, 18), (46, 48)],
        [(30, 14), (18, 44), (48, 36)],
        [(16, 16), (32, 32), (48, 48)],
    ]
    return [
        {
            "well": f"A0{k + 1}",
            "planes": {
                "DNA": _disk(yx, value=value, dtype=dtype, seed=k),
                "ER": _disk(yx, value=value / 2, dtype=dtype, seed=10 + k),
            },
        }
        for k, yx in enumerate(layouts)
    ]


# ---- 1. input content in the fingerprint ----------------------------------------------------


def test_edited_metadata_cell_redoes_prepare(run_cli, tiny_screen, tmp_path):
    ld = _table(tiny_screen, tmp_path)
    path = _write(ld, tmp_path / "ld.csv")
    out = tmp_path / "prep"
    rc, text = _prep(run_cli, path, out)
    assert rc == 0, text
    fp0 = input_fingerprint(PrepareConfig(load_data=str(path), out_dir=str(out)))
    assert set(fp0) >= {"table", "images", "n_images"} and fp0["n_images"] == 6 * 5
    rc, text = _prep(run_cli, path, out)  # unchanged: resumed, nothing redone
    assert rc == 0 and "starting afresh" not in text and "0 sites" not in text
    well = ld.at[2, "Metadata_Well"]
    ld.at[2, "Metadata_Compound"] = "NEWCPD"  # one cell of the plate map corrected
    _write(ld, path)
    fp1 = input_fingerprint(PrepareConfig(load_data=str(path), out_dir=str(out)))
    assert fp1["table"] != fp0["table"] and fp1["images"] == fp0["images"]
    rc, text = _prep(run_cli, path, out)
    assert rc == 0, text
    # one log line says what changed: the file, the line, the column, old and new value
    assert "inputs changed" in text and "starting afresh" in text
    assert f"line 4 of {path}" in text and "Metadata_Compound" in text and "NEWCPD" in text
    cells = pd.read_parquet(out / "cells.parquet")
    assert set(cells.loc[cells.Metadata_Well == well, "Metadata_Compound"]) == {"NEWCPD"}
    assert cells["Metadata_CellID"].is_unique


def test_replaced_image_redoes_prepare(run_cli, tiny_screen, tmp_path):
    ld = _table(tiny_screen, tmp_path)
    src = Path(ld.at[1, "PathName_DNA"]) / ld.at[1, "FileName_DNA"]
    mine = tmp_path / "dna_site1.tif"
    shutil.copy(src, mine)
    ld.at[1, "PathName_DNA"], ld.at[1, "FileName_DNA"] = str(tmp_path), mine.name
    path = _write(ld, tmp_path / "ld.csv")
    out = tmp_path / "prep"
    assert _prep(run_cli, path, out)[0] == 0
    key = "/".join(str(ld.at[1, c]) for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site"))
    before = pd.read_parquet(out / "cells.parquet")
    assert (before.Metadata_ImageKey == key).sum() > 0
    # the site is redrawn in place: an empty field now (new size and modification time)
    tifffile.imwrite(mine, np.full((128, 128), 100, np.uint16), compression="zlib")
    os.utime(mine, ns=(mine.stat().st_atime_ns, mine.stat().st_mtime_ns + 10**9))
    rc, text = _prep(run_cli, path, out)
    assert rc == 0, text
    assert "starting afresh" in text and "1 image file(s) changed" in text and mine.name in text
    after = pd.read_parquet(out / "cells.parquet")
    assert (after.Metadata_ImageKey == key).sum() == 0  # the new (empty) image was used
    others = before[before.Metadata_ImageKey != key].Metadata_CellID.tolist()
    assert after.Metadata_CellID.tolist() == others


def test_changed_settings_refused_before_writing(run_cli, tiny_screen, tmp_path):
    path = _write(_table(tiny_screen, tmp_path, 4), tmp_path / "ld.csv")
    out = tmp_path / "prep"
    assert _prep(run_cli, path, out)[0] == 0
    snap = _snapshot(out)
    rc, text = _prep(run_cli, path, out, "prepare.crop_size=40")
    assert rc == 2 and "other settings" in text and "crop_size: 32 → 40" in text
    assert str(out) in text and _snapshot(out) == snap


# ---- 2. duplicate and ambiguous rows --------------------------------------------------------


def test_duplicate_load_data_rows_are_refused(run_cli, tiny_screen, tmp_path):
    ld = _table(tiny_screen, tmp_path)
    ld = pd.concat([ld, ld.iloc[[2]]], ignore_index=True)  # row 2 again, as line 8
    path = _write(ld, tmp_path / "ld.csv")
    rc, text = _prep(run_cli, path, tmp_path / "prep")
    key = "/".join(str(ld.at[2, c]) for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site"))
    assert rc == 2 and f"lines 4, 8 of {path}" in text and key in text, text
    assert not (tmp_path / "prep" / "qc.parquet").exists()


def test_two_sites_naming_the_same_images_are_refused(run_cli, tiny_screen, tmp_path):
    ld = _table(tiny_screen, tmp_path)
    for c in ("DNA", "ER", "RNA", "AGP", "Mito"):  # a copy-paste slip: site of line 5 = line 3
        ld.at[3, f"FileName_{c}"] = ld.at[1, f"FileName_{c}"]
        ld.at[3, f"PathName_{c}"] = ld.at[1, f"PathName_{c}"]
    path = _write(ld, tmp_path / "ld.csv")
    rc, text = _prep(run_cli, path, tmp_path / "prep")
    assert rc == 2 and f"lines 3, 5 of {path}" in text and "same image files" in text, text


def test_empty_key_cell_is_refused(run_cli, tiny_screen, tmp_path):
    ld = _table(tiny_screen, tmp_path)
    ld.at[4, "Metadata_Well"] = None
    path = _write(ld, tmp_path / "ld.csv")
    rc, text = _prep(run_cli, path, tmp_path / "prep")
    assert rc == 2 and f"line 6 of {path}" in text and "Metadata_Well is empty" in text, text


def test_two_channels_naming_one_file_are_refused(run_cli, tiny_screen, tmp_path):
    ld = _table(tiny_screen, tmp_path)
    ld["FileName_ER"] = ld["FileName_DNA"]  # ER column filled with the DNA files
    path = _write(ld, tmp_path / "ld.csv")
    rc, text = _prep(run_cli, path, tmp_path / "prep")
    assert rc == 2 and f"line 2 of {path}" in text and "DNA and ER" in text, text


# ---- 3. / 4. pixel types, NaN, sizes --------------------------------------------------------


def test_float_site_after_uint16_sites_is_not_zeroed(run_cli, tmp_path):
    sites = _four_sites()
    f = _four_sites()[3]  # a float [0, 1] site last (the same scene scaled to [0, 0.8])
    f["planes"] = {c: (a / 4000.0).astype(np.float32) for c, a in f["planes"].items()}
    sites[3] = f
    path = _hand_made(tmp_path, sites)
    out = tmp_path / "prep"
    rc, text = _prep(run_cli, path, out, "prepare.illumination=false")
    assert rc == 0, text
    assert "different pixel types" in text and "float32" in text and "uint16" in text
    arr = zarr.open_array(str(out / "crops.zarr"))
    assert arr.dtype == np.float32
    cells = pd.read_parquet(out / "cells.parquet")
    rows = np.flatnonzero(cells.Metadata_Well == "A04")
    assert len(rows) == 3
    for r in rows:  # each crop is the float image around the centre (32 px, half 16)
        y = int(np.floor(cells.Metadata_Cell_Center_Y[r]))
        x = int(np.floor(cells.Metadata_Cell_Center_X[r]))
        pad = np.pad(f["planes"]["DNA"], 16)
        assert np.array_equal(arr[r][0], pad[y : y + 32, x : x + 32])
        assert arr[r][0].max() > 0.5
    # uint16 sites keep their raw values
    assert arr[int(np.flatnonzero(cells.Metadata_Well == "A01")[0])][0].max() > 1000
    # one divisor for both kinds would make one of them garbage: refused, naming both
    snap = _snapshot(out)
    rc, text = _prep(run_cli, path, tmp_path / "p2", "prepare.normalization=divisor")
    assert rc == 2 and "different pixel types" in text and "A04_3_DNA.tif" in text, text
    assert "A01_0_DNA.tif" in text and _snapshot(out) == snap


def test_nan_patch_poisons_nothing(run_cli, tmp_path):
    sites = _four_sites(np.float32)
    sites[1]["planes"]["ER"][5:25, 30:50] = np.nan  # 20x20 NaN patch in one image
    sites[1]["planes"]["ER"][0, 0] = np.inf
    path = _hand_made(tmp_path, sites)
    out = tmp_path / "prep"
    rc, text = _prep(run_cli, path, out)
    assert rc == 0, text
    assert "A02_1_ER.tif" in text and "non-finite" in text and "401" in text
    illum = np.load(out / "illum" / "P.npy")
    assert np.isfinite(illum).all() and illum.min() >= 1.0
    arr = zarr.open_array(str(out / "crops.zarr"))[:]
    assert np.isfinite(arr).all()
    cells = pd.read_parquet(out / "cells.parquet")
    # the ER channel of every other site keeps its signal (was all zero through a NaN function)
    for well in ("A01", "A03", "A04"):
        assert arr[np.flatnonzero(cells.Metadata_Well == well), 1].max() > 500  # disk: 1600
    assert pd.read_parquet(out / "qc.parquet").QC_Blur.notna().all()
    from celldino.data import FieldDataset  # whole fields (WS-DINO) are cleaned the same way

    fields = FieldDataset(out)
    assert all(bool(fields[i].isfinite().all()) for i in range(len(fields)))


def test_sites_of_different_sizes_in_one_plate(run_cli, tmp_path):
    sites = _four_sites()
    for k, big in ((2, [(20, 20), (50, 60), (60, 24)]), (3, [(16, 70), (40, 40), (64, 60)])):
        sites[k]["planes"] = {
            "DNA": _disk(big, (80, 90), seed=k),
            "ER": _disk(big, (80, 90), value=1500, seed=k),
        }
    path = _hand_made(tmp_path, sites)
    out = tmp_path / "prep"
    rc, text = _prep(run_cli, path, out)  # was a raw traceback from the illumination step
    assert rc == 0, text
    assert "2 sizes" in text and "64x64" in text and "80x90" in text and "A03_2_DNA.tif" in text
    assert sorted(p.name for p in (out / "illum").iterdir()) == ["P_64x64.npy", "P_80x90.npy"]
    cells = pd.read_parquet(out / "cells.parquet")
    assert (cells.Metadata_Well == "A03").sum() == 3 and (cells.Metadata_Well == "A04").sum() == 3
    from celldino.data import FieldDataset  # whole fields find their size's function

    fields = FieldDataset(out)
    assert [tuple(fields[i].shape) for i in range(4)] == [(2, 64, 64)] * 2 + [(2, 80, 90)] * 2


# ---- 5. tables and files that cannot be used ----------------------------------------------


def test_header_only_and_empty_tables(run_cli, tiny_screen, tmp_path):
    ld = _table(tiny_screen, tmp_path)
    head = _write(ld.head(0), tmp_path / "head.csv")
    rc, text = _prep(run_cli, head, tmp_path / "prep")
    assert rc == 2 and str(head) in text and "no data rows" in text, text
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    rc, text = _prep(run_cli, empty, tmp_path / "prep")
    assert rc == 2 and str(empty) in text and "0 bytes" in text, text
    assert not (tmp_path / "prep").exists()  # nothing created for a table that cannot be used


def test_latin1_table_is_read_with_a_warning(run_cli, tiny_screen, tmp_path):
    ld = _table(tiny_screen, tmp_path, 4)
    ld["Metadata_Compound"] = "Café ß"
    path = tmp_path / "ld.csv"
    path.write_bytes(ld.to_csv(index=False).encode("latin-1"))
    rc, text = _prep(run_cli, path, tmp_path / "prep")
    assert rc == 0, text
    assert str(path) in text and "not UTF-8" in text
    cells = pd.read_parquet(tmp_path / "prep" / "cells.parquet")
    assert set(cells.Metadata_Compound) == {"Café ß"}


def test_non_utf8_file_names_under_image_dir(run_cli, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for ch in ("w1", "w2"):
        tifffile.imwrite(folder / f"A01_s1_{ch}.tif", _disk([(30, 30)]))
    junk = os.fsencode(folder) + b"/notes_caf\xe9.txt"  # not an image: ignored with a warning
    Path(os.fsdecode(junk)).write_bytes(b"x")
    args = (
        "prepare",
        f"prepare.image_dir={folder}",
        r"prepare.pattern=(?P<well>[A-P]\d\d)_s(?P<site>\d)_(?P<channel>w\d)",
        "prepare.channel_map={w1: DNA, w2: ER}",
        f"prepare.out_dir={tmp_path / 'prep'}",
        *FAST,
    )
    rc, text = run_cli(*args)
    assert rc == 0 and "not UTF-8 ignored" in text and r"notes_caf\xe9.txt" in text, text
    bad = os.fsencode(folder) + b"/A01_s2_w1_\xe9.tif"  # an image the pattern would take
    Path(os.fsdecode(bad)).write_bytes((folder / "A01_s1_w1.tif").read_bytes())
    snap = _snapshot(tmp_path / "prep")
    rc, text = run_cli(*args)
    assert rc == 2 and r"A01_s2_w1_\xe9.tif" in text and "rename" in text, text
    assert _snapshot(tmp_path / "prep") == snap


def test_missing_image_file_is_named(run_cli, tiny_screen, tmp_path):
    ld = _table(tiny_screen, tmp_path)
    ld.at[3, "FileName_Mito"] = "gone.tif"
    path = _write(ld, tmp_path / "ld.csv")
    rc, text = _prep(run_cli, path, tmp_path / "prep")
    assert rc == 2 and "gone.tif" in text and f"line 5 of {path}" in text and "Mito" in text
    assert "not found" in text and not (tmp_path / "prep" / "qc.parquet").exists()  # before pass 1


def test_missing_column_is_named(run_cli, tiny_screen, tmp_path):
    path = _write(_table(tiny_screen, tmp_path).drop(columns="PathName_ER"), tmp_path / "ld.csv")
    rc, text = _prep(run_cli, path, tmp_path / "prep")
    assert rc == 2 and str(path) in text and "PathName_ER" in text, text
    path = _write(_table(tiny_screen, tmp_path).drop(columns="FileName_RNA"), tmp_path / "l2.csv")
    rc, text = _prep(run_cli, path, tmp_path / "prep", "prepare.channels=[DNA,RNA]")
    assert rc == 2 and str(path) in text and "FileName_RNA" in text and "available" in text


def test_excel_style_tables(run_cli, tiny_screen, tmp_path):
    """';'-separated (European Excel) is read; a column named twice is refused, naming it."""
    ld = _table(tiny_screen, tmp_path, 4)
    semi = tmp_path / "semi.csv"
    ld.to_csv(semi, index=False, sep=";")
    rc, text = _prep(run_cli, semi, tmp_path / "prep")
    assert rc == 0, text
    assert len(pd.read_parquet(tmp_path / "prep" / "cells.parquet")) > 0
    twice = tmp_path / "twice.csv"
    lines = ld.to_csv(index=False).splitlines()
    lines[0] += ",Metadata_Compound"  # a second Compound column, e.g. pasted from the plate map
    twice.write_text("\n".join([lines[0]] + [x + ",DMSO" for x in lines[1:]]) + "\n")
    rc, text = _prep(run_cli, twice, tmp_path / "p2")
    assert rc == 2 and str(twice) in text and "Metadata_Compound appears more than once" in text


def test_locations_outside_the_image_or_empty(run_cli, tmp_path):
    path = _hand_made(tmp_path, _four_sites())
    loc = pd.DataFrame(
        {
            "Metadata_Plate": ["P"] * 4,
            "Metadata_Well": ["A01", "A01", "A02", "A02"],
            "Metadata_Site": [1] * 4,
            "X": [20.0, 400.0, 30.0, 18.0],
            "Y": [20.0, 500.0, 14.0, 44.0],
        }
    )
    loc.to_csv(tmp_path / "loc.csv", index=False)
    args = (
        "prepare.segmentation=locations",
        f"prepare.locations={tmp_path / 'loc.csv'}",
        "prepare.location_x=X",
        "prepare.location_y=Y",
    )
    rc, text = _prep(run_cli, path, tmp_path / "prep", *args)
    assert rc == 0 and "1 of 2 locations lie outside the 64x64 image" in text and "A01" in text
    assert len(pd.read_parquet(tmp_path / "prep" / "cells.parquet")) == 3
    loc.loc[2, "X"] = None
    loc.to_csv(tmp_path / "loc.csv", index=False)
    snap = _snapshot(tmp_path / "prep")
    rc, text = _prep(run_cli, path, tmp_path / "prep", *args)
    assert rc == 2 and f"line 4 of {tmp_path / 'loc.csv'}" in text and "column X" in text, text
    assert _snapshot(tmp_path / "prep") == snap


# ---- 6. output folder faults ---------------------------------------------------------------


def test_unwritable_output_folder_fails_before_computing(run_cli, tiny_screen, tmp_path, read_only):
    path = _write(_table(tiny_screen, tmp_path, 4), tmp_path / "ld.csv")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    rc, text = _prep(run_cli, path, a_file / "prep")  # a folder below a file: cannot exist
    assert rc == 2 and str(a_file / "prep") in text and "writable" in text, text
    # a read-only folder holding an earlier prep: refused at once, the prep untouched
    out = tmp_path / "prep"
    assert _prep(run_cli, path, out)[0] == 0
    snap = _snapshot(out)
    read_only(out)  # chmod 555, or chattr +i as root (root writes through mode bits)
    rc, text = _prep(run_cli, path, out, "prepare.qc_blur_z=-4")  # would redo pass 1
    assert rc == 2 and str(out) in text and "prepare.out_dir" in text, text
    assert _snapshot(out) == snap


def test_disk_full_while_writing_crops_keeps_committed_sites(
    run_cli, tiny_screen, tmp_path, monkeypatch
):
    """Simulates ENOSPC: the crop array's write raises it on the 4th site."""
    path = _write(_table(tiny_screen, tmp_path), tmp_path / "ld.csv")
    out = tmp_path / "prep"
    calls = {"n": 0}
    real = zarr.Array.__setitem__

    def full(self, sel, value):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, sel, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    rc, text = _prep(run_cli, path, out)
    assert rc == 2 and "No space left on device" in text and str(out) in text, text
    assert not (out / "cells.parquet").exists()  # never a 'done' prep after a failure
    ledger = pd.read_json(out / "ledger.json", typ="series")
    assert len(ledger["sites"]) == 3  # the three committed sites stay
    monkeypatch.setattr(zarr.Array, "__setitem__", real)
    rc, text = _prep(run_cli, path, out)
    assert rc == 0 and "3 of 6 sites already in the store" in text, text
    ref = tmp_path / "ref"
    assert _prep(run_cli, path, ref)[0] == 0
    a, b = pd.read_parquet(out / "cells.parquet"), pd.read_parquet(ref / "cells.parquet")
    assert a.Metadata_CellID.tolist() == b.Metadata_CellID.tolist()
    za, zb = zarr.open_array(str(out / "crops.zarr")), zarr.open_array(str(ref / "crops.zarr"))
    assert np.array_equal(za[:], zb[:])


def test_disk_full_while_writing_cells_table_keeps_the_old_one(
    run_cli, tiny_screen, tmp_path, monkeypatch
):
    """Simulates ENOSPC in the atomic writer when cells.parquet is rewritten."""
    import celldino.io.tables as tables

    path = _write(_table(tiny_screen, tmp_path, 4), tmp_path / "ld.csv")
    out = tmp_path / "prep"
    assert _prep(run_cli, path, out)[0] == 0
    snap = _snapshot(out)
    real = tables.atomic_write_bytes

    def full(p, data):
        if Path(p).name == "cells.parquet":
            raise OSError(errno.ENOSPC, "No space left on device", str(p))
        return real(p, data)

    monkeypatch.setattr(tables, "atomic_write_bytes", full)
    rc, text = _prep(run_cli, path, out)
    assert rc == 2 and "No space left on device" in text and "cells.parquet" in text, text
    after = _snapshot(out)
    assert after["cells.parquet"] == snap["cells.parquet"]
    # every other file too, but the two JSON files the rerun rewrites with the same content
    rewritten = ("ledger.json", "crops.zarr/zarr.json")
    assert {k: v for k, v in after.items() if k not in rewritten} == {
        k: v for k, v in snap.items() if k not in rewritten
    }
    assert pd.read_parquet(out / "cells.parquet").Metadata_CellID.is_unique


def test_second_prepare_into_a_locked_folder_is_refused(run_cli, tiny_screen, tmp_path):
    path = _write(_table(tiny_screen, tmp_path, 4), tmp_path / "ld.csv")
    out = tmp_path / "prep"
    with output_lock(out, "prepare"):
        # the lock is re-entrant within one process: take it from another one
        import subprocess
        import sys

        code = (
            "import sys; from celldino.cli import main; "
            f"sys.exit(main(['prepare', 'prepare.load_data={path}', 'prepare.out_dir={out}']))"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2 and "being written by" in p.stderr and "prepare" in p.stderr
    assert not (out / "qc.parquet").exists()


# ---- 7. progress for batch logs --------------------------------------------------------------


def test_progress_lines_when_not_on_a_terminal(run_cli, tiny_screen, tmp_path):
    path = _write(_table(tiny_screen, tmp_path, 4), tmp_path / "ld.csv")
    rc, text = _prep(run_cli, path, tmp_path / "prep")
    assert rc == 0 and "QC + illumination" in text and "cells → crops" in text, text


# ---- 8. image sizes and pixel types the crops cannot hold ---------------------------------------


def test_crop_larger_than_the_images_is_refused_before_allocating(run_cli, tmp_path):
    path = _hand_made(tmp_path, _four_sites())  # 64 px sites
    for size in ("100000", "200"):
        out = tmp_path / f"prep{size}"
        rc, text = run_cli(
            "prepare",
            f"prepare.load_data={path}",
            f"prepare.out_dir={out}",
            "prepare.features=false",
            f"prepare.crop_size={size}",
        )
        assert rc == 2 and f"crop_size={size}" in text and "64x64" in text, text
        assert "A01_0_DNA.tif" in text and "MemoryError" not in text
        assert not out.exists()


def test_complex_image_is_refused_naming_its_file(run_cli, tmp_path):
    sites = _four_sites()
    sites[2]["planes"]["ER"] = sites[2]["planes"]["ER"].astype(np.complex64) * (1 + 1j)
    out = tmp_path / "prep"
    rc, text = _prep(run_cli, _hand_made(tmp_path, sites), out)
    assert rc == 2 and "A03_2_ER.tif" in text and "complex" in text, text
    assert not (out / "crops.zarr").exists()


def test_mixed_type_warning_names_the_file_of_that_type(run_cli, tmp_path):
    sites = _four_sites()
    sites[3]["planes"]["ER"] = (sites[3]["planes"]["ER"] / 4000.0).astype(np.float32)
    rc, text = _prep(run_cli, _hand_made(tmp_path, sites), tmp_path / "prep")
    assert rc == 0, text
    assert "float32 (e.g." in text and "A04_3_ER.tif" in text and "A04_3_DNA.tif" not in text


def test_image_path_that_is_a_folder_is_named_as_one(run_cli, tmp_path):
    path = _hand_made(tmp_path, _four_sites())
    ld = pd.read_csv(path)
    (tmp_path / "img" / "dir.tif").mkdir()
    ld.loc[1, "FileName_ER"] = "dir.tif"
    rc, text = _prep(run_cli, _write(ld, tmp_path / "ld2.csv"), tmp_path / "prep")
    assert rc == 2 and "dir.tif" in text and "is a folder" in text and "corrupt" not in text, text


def test_float_images_beyond_one_refused_for_texture_naming_the_site(run_cli, tmp_path):
    """Float images in raw counts (0..4000) cannot be quantised as CellProfiler's Texture does
    (it reads intensities on 0..1): refused naming the site and prepare.feature_scale; with the
    scale given, the features are those of the same images stored as uint16 (same masks)."""
    layouts = [s["planes"] for s in _four_sites()]
    yy, xx = np.mgrid[:64, :64]
    masks = tmp_path / "masks"
    masks.mkdir()
    for k, yx in enumerate(
        [
            [(20, 20), (40, 44), (22, 46)],
            [(14, 30), (44, 18), (46, 48)],
            [(30, 14), (18, 44), (48, 36)],
            [(16, 16), (32, 32), (48, 48)],
        ]
    ):
        lab = np.zeros((64, 64), np.uint16)
        for j, (y, x) in enumerate(yx):
            lab[(yy - y) ** 2 + (xx - x) ** 2 < 49] = j + 1
        tifffile.imwrite(masks / f"A0{k + 1}_{k}_DNA_nuc.tif", lab)
    args = (
        "prepare.features=true",
        "prepare.feature_families=Texture,Intensity",
        "prepare.illumination=false",
        "prepare.segmentation=masks",
        f"prepare.mask_dir={masks}",
        "prepare.nuclei_masks={stem_DNA}_nuc.tif",
        "prepare.cell_expand=4",
    )
    floats = [
        {"well": f"A0{k + 1}", "planes": {c: a.astype(np.float32) for c, a in p.items()}}
        for k, p in enumerate(layouts)
    ]
    (tmp_path / "f").mkdir()
    (tmp_path / "u").mkdir()
    path = _hand_made(tmp_path / "f", floats)
    rc, text = _prep(run_cli, path, tmp_path / "p", *args)
    assert rc == 2 and "prepare.feature_scale" in text and "P/A01" in text, text
    assert "Traceback" not in text
    rc, text = _prep(run_cli, path, tmp_path / "p2", *args, "prepare.feature_scale=65535")
    assert rc == 0, text
    ints = _hand_made(tmp_path / "u", _four_sites())
    rc, text = _prep(run_cli, ints, tmp_path / "p3", *args)
    assert rc == 0, text
    a = pd.read_parquet(tmp_path / "p2" / "engineered.parquet")
    b = pd.read_parquet(tmp_path / "p3" / "engineered.parquet")
    feats = [c for c in a.columns if not c.startswith("Metadata_")]
    assert len(a) == 12 and "Cells_Texture_Contrast_DNA_3_00_256" in feats
    np.testing.assert_allclose(a[feats].to_numpy(float), b[feats].to_numpy(float), rtol=1e-6)


# ---- 9. the user's masks ------------------------------------------------------------------------


def _seg_files(tmp_path: Path, content) -> tuple[Path, Path]:
    """Four hand-made sites and a mask folder whose `<stem>_seg.npy` files hold `content(k)`."""
    sites = _four_sites()
    path = _hand_made(tmp_path, sites)
    masks = tmp_path / "masks"
    masks.mkdir()
    for k, site in enumerate(sites):
        f = masks / f"{site['well']}_{k}_DNA_seg.npy"
        obj = content(k)
        if isinstance(obj, bytes):
            f.write_bytes(obj)
        else:
            np.save(f, obj, allow_pickle=True)
    return path, masks


def _labels(k: int) -> np.ndarray:
    lab = np.zeros((64, 64), np.uint16)
    lab[10:20, 10:20] = 1
    lab[40:50, 30:40] = 2
    return lab


@pytest.mark.parametrize(
    "content, words",
    [
        (lambda k: _labels(k), ["must be a dict with a 'masks' entry", "ndarray"]),
        (lambda k: {"outlines": _labels(k)}, ["'masks' entry", "outlines"]),
        (lambda k: {"masks": np.stack([_labels(k)] * 2)}, ["2-D integer label image"]),
        (lambda k: {"masks": _labels(k).astype(float)}, ["2-D integer label image"]),
        (lambda k: b"\x93NUMPY garbage", ["not a Cellpose _seg.npy", "_cp_masks"]),
    ],
)
def test_cellpose_seg_npy_that_is_not_one_is_refused(run_cli, tmp_path, content, words):
    """A `_seg.npy` is read as Cellpose writes it (a dict with 'masks') or refused by name."""
    path, masks = _seg_files(tmp_path, content)
    rc, text = _prep(
        run_cli,
        path,
        tmp_path / "prep",
        "prepare.segmentation=masks",
        f"prepare.mask_dir={masks}",
        "prepare.nuclei_masks={stem_DNA}_seg.npy",
    )
    assert rc == 2, text
    assert "A01_0_DNA_seg.npy" in text and all(w in text for w in words), text


def test_cellpose_seg_npy_read(run_cli, tmp_path):
    path, masks = _seg_files(tmp_path, lambda k: {"masks": _labels(k), "est_diam": 10.0})
    out = tmp_path / "prep"
    rc, text = _prep(
        run_cli,
        path,
        out,
        "prepare.segmentation=masks",
        f"prepare.mask_dir={masks}",
        "prepare.nuclei_masks={stem_DNA}_seg.npy",
    )
    assert rc == 0, text
    assert len(pd.read_parquet(out / "cells.parquet")) == 8  # two per site
