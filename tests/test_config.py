"""Configuration: YAML ← dotlist, unknown keys, type checks, round trip, CLI help."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from celldino import cli
from celldino import config as C
from celldino.io.configfile import save_config


def test_defaults_file_and_overrides_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 32\nmodel:\n  arch: vit_small\n")
    cfg = C.load_config(path, ["train.epochs=3", "synth.channels=[DNA,RNA]"])
    assert cfg.train.epochs == 3  # override beats file
    assert cfg.train.batch_size == 32  # file beats default
    assert cfg.model.arch == "vit_small"
    assert cfg.model.patch_size == C.ModelConfig().patch_size  # default kept
    assert cfg.synth.channels == ("DNA", "RNA")  # list coerced to the declared tuple


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(None, ["train.epoch=3"])
    msg = str(e.value)
    assert "train.epoch" in msg and "epochs" in msg and "batch_size" in msg
    with pytest.raises(C.ConfigError, match="valid keys at top level: synth, prepare"):
        C.load_config(None, ["trian.epochs=3"])


def test_type_errors_name_the_key():
    with pytest.raises(C.ConfigError, match="override train.epochs=three: expected an integer"):
        C.load_config(None, ["train.epochs=three"])
    with pytest.raises(C.ConfigError, match="protein_channel=3: expected true or false"):
        C.load_config(None, ["synth.protein_channel=3"])


def test_frozen_and_replace():
    cfg = C.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 2  # type: ignore[misc]
    cfg2 = C.replace(cfg, **{"train.epochs": 2, "model.arch": "vit_base"})
    assert (cfg2.train.epochs, cfg2.model.arch, cfg.train.epochs) == (2, "vit_base", 10)


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load_config(None, ["train.epochs=4", "synth.preset=demo"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["train"]["epochs"] == 4
    assert C.load_config(path) == cfg


def test_every_field_is_documented():
    classes = [C.Config] + [
        C.typing.get_type_hints(C.Config)[f.name] for f in dataclasses.fields(C.Config)
    ]
    for cls in classes:
        docs = C.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a one-line comment: {missing}"


def test_cli_help_lists_every_synth_setting(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["synth", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(C.SynthConfig):
        assert f"synth.{f.name}=" in out
    assert "random seed" in out


def test_cli_rejects_bad_setting(capsys, tmp_path):
    assert cli.main(["synth", str(tmp_path), "synth.nope=1"]) == 2
    assert cli.main(["synth", str(tmp_path), "not_a_yaml"]) == 2


@dataclasses.dataclass(frozen=True)
class _Wrapped:
    plain: int = 1  # a plain comment
    wrapped: tuple[str, ...] = (
        "a",
        "b",
    )  # the formatter moved this comment to the closing line
    bare: int = 2


def test_field_docs_survive_formatter_wrapping():
    assert C.field_docs(_Wrapped) == {
        "plain": "a plain comment",
        "wrapped": "the formatter moved this comment to the closing line",
    }


def test_mapping_settings_take_key_value_pairs_and_yaml_mappings(tmp_path):
    """`evaluate.columns.moa=Metadata_moa` (and `prepare.channel_map.5=DNA`) set one key of a
    mapping setting; a YAML mapping too; the command line wins key by key."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "evaluate:\n  columns: {moa: Metadata_MoA, compound: Metadata_Compound}\n"
        "prepare:\n  channel_map: {'1': DNA}\n"
    )
    cfg = C.load_config(
        path,
        [
            "evaluate.columns.moa=Metadata_moa",
            "evaluate.columns.control_value=DMSO",
            "prepare.channel_map.5=RNA",
            "prepare.channel_map.ch.2=ER",  # the rest of the key is one key, dots and all
        ],
    )
    assert cfg.evaluate.columns == {
        "moa": "Metadata_moa",
        "compound": "Metadata_Compound",
        "control_value": "DMSO",
    }
    assert cfg.prepare.channel_map == {"1": "DNA", "5": "RNA", "ch.2": "ER"}


def test_unknown_column_role_is_refused_naming_the_argument_and_the_roles():
    from celldino.eval.spec import Columns

    assert C.EVAL_COLUMN_ROLES == tuple(f.name for f in dataclasses.fields(Columns))
    with pytest.raises(C.ConfigError) as e:
        C.load_config(None, ["evaluate.columns.mao=Metadata_moa"])
    msg = str(e.value)
    assert "evaluate.columns.mao=Metadata_moa" in msg and "'mao'" in msg
    assert all(role in msg for role in C.EVAL_COLUMN_ROLES)


def test_list_settings_take_yaml_lists_and_comma_lists(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("profile:\n  features: [Cells_, Nuclei_]\n  by: [Metadata_Plate]\n")
    cfg = C.load_config(path)
    assert cfg.profile.features == ("Cells_", "Nuclei_") and cfg.profile.by == ("Metadata_Plate",)
    cfg = C.load_config(None, ["profile.features=Cells_,Cytoplasm_", "profile.via=[Metadata_Site]"])
    assert cfg.profile.features == ("Cells_", "Cytoplasm_") and cfg.profile.via == (
        "Metadata_Site",
    )
    assert C.load_config().profile.features == ("infer",)
