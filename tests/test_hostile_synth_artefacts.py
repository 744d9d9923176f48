"""Refusals of the planted-artefact settings (issue 24): each names the setting and what to do,
before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

from celldino import cli
from celldino.config import ConfigError, SynthConfig, load_config
from celldino.synth import artefacts as A
from celldino.synth import make_screen


@pytest.mark.parametrize(
    "override, words",
    [
        ("synth.artefacts=[blur,smudge]", ["synth.artefacts", "'smudge'", "debris_dim"]),
        ("synth.artefacts=[blur,blur]", ["synth.artefacts", "'blur' named more than once"]),
        ("synth.artefact_rate=0.6", ["synth.artefact_rate", "<= 0.5"]),
        ("synth.artefact_rate=0.05", ["synth.artefact_rate", "synth.artefacts is empty"]),
    ],
)
def test_bad_artefact_settings_refused_on_loading(override, words, tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)
    out = tmp_path / "screen"
    assert cli.main(["synth", str(out), override]) == 2
    assert not out.exists() or not any(out.iterdir())


def test_unknown_type_in_a_python_config_refused_before_writing(tmp_path):
    out = tmp_path / "screen"
    with pytest.raises(ConfigError, match="synth.artefacts: 'smudge' is not an artefact type"):
        make_screen(out, SynthConfig(artefacts=("smudge",)))
    assert not out.exists()


def test_more_artefacts_than_sites_refused_before_writing(tmp_path):
    out = tmp_path / "screen"
    cfg = SynthConfig(artefacts=tuple(A.ARTEFACTS), artefact_rate=0.5)  # 7 x 16 of 32 sites
    with pytest.raises(ConfigError, match=r"synth.artefact_rate=0.5 asks for 16 sites of each"):
        make_screen(out, cfg)
    assert not out.exists()


def test_plant_refuses_unknown_type_and_a_plane():
    img = np.zeros((2, 16, 16), np.uint16)
    with pytest.raises(ValueError, match="unknown artefact type 'smudge'"):
        A.plant("smudge", img, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(C, H, W\) field"):
        A.plant("blur", img[0], np.random.default_rng(0))
