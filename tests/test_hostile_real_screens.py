"""Refusals of issue 22 §6 (real screens): plate maps that cannot be joined, a run whose
plate map is missing. Each names the file, line or well and what to do."""

from __future__ import annotations

import pytest

from celldino.config import PrepareConfig, load_config
from celldino.data.imagesets import ImageSet, PlateMapError

NF1 = dict(pattern="nf1", channel_map={"DAPI": "DNA", "GFP": "GFP", "RFP": "RFP"})
WELLS = ["B7", "D6", "D7", "F7", "H12"]


@pytest.fixture
def nf1(cellpainting_fovs):
    return cellpainting_fovs / "NF1_cellpainting_data_shrunken" / "Plate_2_images"


def _join(nf1, tmp_path, text: str):
    pm = tmp_path / "platemap.csv"
    pm.write_text(text)
    return ImageSet.from_config(PrepareConfig(image_dir=str(nf1), platemap=str(pm), **NF1))


def _rows(wells, extra=""):
    return "".join(f"{w},x{extra}\n" for w in wells)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        # no well column (Well or well_position would be one)
        ("Position,Metadata_Compound\nB7,x\n", "no well column.*Metadata_Position"),
        # two columns that are one once prefixed, as pycytominer prefixes
        ("Metadata_Well,Compound,Metadata_Compound\n" + _rows(WELLS, ",y"), "Compound, Metadata_"),
        # a well the images do not name twice: B7 and B07 are one well
        (
            "Metadata_Well,Metadata_Compound\n" + _rows(WELLS) + "B07,y\n",
            "'B7' is named on 2 lines",
        ),
        # an imaged well missing: its treatment would be silently empty
        ("Metadata_Well,Metadata_Compound\n" + _rows(WELLS[:-1]), "does not name 1 of the 5.*H12"),
        # an empty well cell
        ("Metadata_Well,Metadata_Compound\n" + _rows(WELLS) + ",y\n", "empty on line 7"),
        # a column the image table has: which one wins would be a guess
        ("Metadata_Well,Metadata_Site\n" + _rows(WELLS), "Metadata_Site are in the image table"),
    ],
)
def test_a_plate_map_that_cannot_be_joined_is_refused_naming_the_cause(nf1, tmp_path, text, match):
    with pytest.raises(PlateMapError, match=match) as e:
        _join(nf1, tmp_path, text)
    assert "platemap.csv" in str(e.value)


def test_a_run_with_a_missing_plate_map_is_refused_before_starting(tmp_path, tiny_screen):
    from celldino.pipeline import check_preconditions

    cfg = load_config(
        None,
        [
            f"prepare.load_data={tiny_screen / 'load_data.csv'}",
            f"prepare.platemap={tmp_path / 'nope.csv'}",
            f"run.out_dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(ValueError, match="prepare.platemap.*nope.csv does not exist"):
        check_preconditions(cfg)
