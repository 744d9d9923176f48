"""The command line with hostile and ordinary input: every mistake is one line naming the file,
line, argument or setting (exit 2), and what people type (1e-6, a,b, flags anywhere) works."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from celldino import cli
from celldino import config as C
from celldino.errors import DataError, MissingInputError

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(rc: int, text: str, *words: str) -> None:
    """Exit 2, an `ERROR` line without a traceback, naming every word."""
    assert rc == 2, text
    assert "Traceback" not in text, text
    for w in words:
        assert w in text, f"{w!r} not in: {text}"


@pytest.fixture
def captured(monkeypatch):
    """Replace the API calls behind the commands: record (command, config, extras)."""
    seen: dict = {}

    def fake_train(cfg, resume=False):
        seen.update(cmd="train", cfg=cfg, resume=resume)
        return "trained"

    def fake_run(cfg, force=()):
        seen.update(cmd="run", cfg=cfg, force=tuple(force))
        return "ran"

    def fake_profile(pcfg):
        seen.update(cmd="profile", profile=pcfg)
        return {}

    def fake_extract(ecfg):
        seen.update(cmd="extract", extract=ecfg)
        return "extracted"

    def fake_report(run_dir, out=None, title=""):
        seen.update(cmd="report", run_dir=run_dir, out=out, title=title)
        return out

    monkeypatch.setattr("celldino.train.train", fake_train)
    monkeypatch.setattr("celldino.pipeline.run_pipeline", fake_run)
    monkeypatch.setattr("celldino.pp.run_profile", fake_profile)
    monkeypatch.setattr("celldino.extract.extract", fake_extract)
    monkeypatch.setattr("celldino.report.build_report", fake_report)
    return seen


def _yaml(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- broken config files: the file and the line -------------------------------------------


def test_broken_yaml_names_the_file_and_line(tmp_path, run_cli):
    path = _yaml(tmp_path, "train:\n  epochs: 3\n  lr: [0.1, 0.2\nmodel:\n  arch: vit_small\n")
    rc, text = run_cli("train", path)
    _one_error_line(rc, text, "ERROR train:", str(path), "line 4", "not valid YAML", "line 3")


def test_tab_indented_yaml_names_the_line(tmp_path, run_cli):
    path = _yaml(tmp_path, "train:\n  epochs: 3\n\tlr: 0.1\n")
    rc, text = run_cli("train", path)
    _one_error_line(rc, text, str(path), "line 3", "'\\t'")


def test_key_set_twice_in_yaml_names_both_lines(tmp_path, run_cli):
    path = _yaml(tmp_path, "train:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n")
    rc, text = run_cli("train", path)
    _one_error_line(rc, text, str(path), "line 4", "line 2", "train.epochs", "set twice")


def test_unknown_key_in_yaml_names_file_line_and_valid_keys(tmp_path, run_cli):
    path = _yaml(tmp_path, "train:\n  epochs: 3\n  lrate: 0.1\n")
    rc, text = run_cli("train", path)
    _one_error_line(rc, text, str(path), "line 3", "train.lrate", "min_lr", "batch_size")


def test_wrong_type_in_yaml_names_file_line_and_key(tmp_path, run_cli):
    path = _yaml(tmp_path, "model:\n  arch: vit_tiny\ntrain:\n  epochs: 3\n  lr: fast\n")
    rc, text = run_cli("train", path)
    _one_error_line(rc, text, str(path), "line 5", "train.lr", "expected a number", "'fast'")


def test_invalid_choice_in_yaml_lists_every_valid_value(tmp_path, run_cli):
    path = _yaml(tmp_path, "model:\n  arch: vit_huge\n")
    rc, text = run_cli("train", path)
    _one_error_line(rc, text, str(path), "line 2", "model.arch", "'vit_huge'")
    for arch in C.CHOICES["model.arch"]:
        assert arch in text


def test_section_that_is_not_a_mapping_names_the_line(tmp_path, run_cli):
    path = _yaml(tmp_path, "synth:\n  seed: 1\ntrain: 3\n")
    rc, text = run_cli("train", path)
    _one_error_line(rc, text, str(path), "line 3", "train", "expected a mapping")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"train:\n  weak_label: Compos\xe9\n", ["not UTF-8"]),
        (b"- train\n- model\n", ["top level must be a mapping", "synth, prepare"]),
    ],
)
def test_unreadable_config_file_is_named(tmp_path, run_cli, content, words):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    rc, text = run_cli("train", path)
    _one_error_line(rc, text, str(path), *words)


def test_missing_config_file_is_named(tmp_path, run_cli):
    rc, text = run_cli("prepare", tmp_path / "nope.yaml")
    _one_error_line(rc, text, "ERROR prepare:", str(tmp_path / "nope.yaml"), "does not exist")


def test_two_config_files_or_a_stray_word_are_named(tmp_path, run_cli):
    a, b = _yaml(tmp_path, "{}\n", "a.yaml"), _yaml(tmp_path, "{}\n", "b.yaml")
    rc, text = run_cli("train", a, b)
    _one_error_line(rc, text, str(a), str(b), "two config files")
    rc, text = run_cli("train", a, "epochs3")
    _one_error_line(rc, text, "'epochs3'", "neither a .yaml config nor a key=value")


# ---- command-line values: the argument, not the YAML file ---------------------------------


def test_bad_override_names_the_argument_not_the_yaml_file(tmp_path, run_cli):
    path = _yaml(tmp_path, "train:\n  epochs: 3\n", "mine.yaml")
    rc, text = run_cli("train", path, "train.lr=abc")
    _one_error_line(rc, text, "command-line override train.lr=abc: expected a number")
    assert "mine.yaml" not in text


def test_broken_yaml_in_an_override_names_the_argument(run_cli):
    rc, text = run_cli("profile", "profile.by=[Metadata_Plate,Metadata_Well")
    _one_error_line(rc, text, "command-line override profile.by=[Metadata_Plate", "not valid YAML")


@pytest.mark.parametrize(
    ("command", "setting", "valid"),
    [
        ("extract", "extract.feature=cls_token", C.CHOICES["extract.feature"]),
        ("profile", "profile.normalize=zscore", ("standardize", "mad_robustize", "none")),
        ("profile", "profile.sphere=zca", ("none", "ZCA", "PCA", "ZCA-cor", "PCA-cor")),
        ("prepare", "prepare.segmentation=cellpose", ("watershed", "masks", "locations")),
        ("extract", "extract.format=zarr", ("parquet", "h5ad")),
        ("train", "train.device=gpu", ("auto", "cpu", "cuda", "cuda:N")),
        ("run", "run.stages=prepare,trian", C.PIPELINE_STAGES),
        ("profile", "profile.select=variance,corelation", C.CHOICES["profile.select"]),
    ],
)
def test_invalid_choice_on_the_command_line_lists_every_valid_value(
    run_cli, command, setting, valid
):
    rc, text = run_cli(command, setting)
    bad = setting.split("=", 1)[1].split(",")[-1]
    _one_error_line(rc, text, f"command-line override {setting}", f"'{bad}'", *valid)


@pytest.mark.parametrize(
    ("command", "setting", "bound"),
    [
        ("train", "train.epochs=-1", ">= 1"),
        ("train", "train.epochs=0", ">= 1"),
        ("train", "train.batch_size=0", ">= 1"),
        ("extract", "extract.shard_size=0", ">= 1"),
        ("prepare", "prepare.crop_size=0", ">= 1"),
        ("train", "augment.hflip_p=1.5", "<= 1"),
        ("train", "augment.global_crop_scale=1.0,0.4", "min <= max"),
        ("train", "train.lr=nan", "finite"),
        ("profile", "profile.formats=", "must not be empty"),
        ("evaluate", "evaluate.threshold=0", "> 0"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_argument(run_cli, command, setting, bound):
    args = [command, *(["p.parquet"] if command == "evaluate" else []), setting]
    rc, text = run_cli(*args)
    _one_error_line(rc, text, f"command-line override {setting}", bound)


def test_settings_that_contradict_each_other_name_both(tmp_path, run_cli):
    rc, text = run_cli("train", "model.img_size=50", "model.patch_size=16")
    _one_error_line(rc, text, "model.img_size=50", "not a multiple of model.patch_size=16")
    path = _yaml(tmp_path, "prepare:\n  nuclei_min_area: 500\n  nuclei_max_area: 400\n")
    rc, text = run_cli("prepare", path)
    _one_error_line(rc, text, str(path), "line 2", "prepare.nuclei_min_area", "nuclei_max_area=400")


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("train.epochs.max=3", ["train.epochs.max=3", "is a setting, not a section"]),
        ("=3", ["override =3:", "key is empty"]),
        ("trian.epochs=3", ["trian.epochs", "valid keys at top level: synth, prepare"]),
        ("train.epoch=3", ["train.epoch=3", "epochs", "batch_size"]),
        ("train.amp=maybe", ["train.amp=maybe", "expected true or false"]),
        ("train.epochs=2.5", ["train.epochs=2.5", "expected an integer"]),
    ],
)
def test_malformed_overrides_name_the_argument(run_cli, setting, words):
    rc, text = run_cli("train", setting)
    _one_error_line(rc, text, "command-line override", *words)


# ---- flags and options --------------------------------------------------------------------


def test_bad_flags_are_usage_errors(run_cli):
    rc, text = run_cli("run", "--force", "trian")
    assert rc == 2 and "'trian' is not a stage" in text and "prepare, train" in text
    rc, text = run_cli("run", "--force")
    assert rc == 2 and "--force" in text
    rc, text = run_cli("-q", "train", "-v")
    assert rc == 2 and "-q and -v" in text
    rc, text = run_cli("train", "--epochs", "3")
    assert rc == 2 and "--epochs" in text


def test_config_show_unknown_name_lists_the_names(run_cli):
    rc, text = run_cli("config", "show", "tinyy")
    _one_error_line(rc, text, "'tinyy'", "tiny, demo, real-cells, eval-spec")


# ---- user errors vs bugs ------------------------------------------------------------------


def test_user_error_is_one_line_and_v_adds_the_traceback(monkeypatch, run_cli):
    def broken(pcfg):
        raise DataError("profile file p.parquet, column Metadata_Well:\nall values are missing")

    monkeypatch.setattr("celldino.pp.run_profile", broken)
    rc, text = run_cli("profile")
    _one_error_line(rc, text, "ERROR profile: profile file p.parquet, column Metadata_Well")
    rc, text = run_cli("profile", "-v")
    assert rc == 2 and "Traceback" in text and "all values are missing" in text


def test_a_bug_keeps_its_traceback(monkeypatch, run_cli):
    def buggy(pcfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("celldino.pp.run_profile", buggy)
    with pytest.raises(ZeroDivisionError):  # not caught: Python prints it and exits 1
        run_cli("profile")


def test_stage_error_is_one_line_when_caused_by_a_user_error(monkeypatch, run_cli):
    from celldino.pipeline import StageError

    def failing(cfg, force=()):
        try:
            raise MissingInputError("embeddings folder emb/ does not exist: run extract first")
        except MissingInputError as e:
            raise StageError(f"stage 'profile' failed: {e}") from e

    monkeypatch.setattr("celldino.pipeline.run_pipeline", failing)
    rc, text = run_cli("run")
    _one_error_line(rc, text, "ERROR run: stage 'profile' failed", "emb/ does not exist")

    def failing_bug(cfg, force=()):
        try:
            raise KeyError("oops")
        except KeyError as e:
            raise StageError("stage 'profile' failed: 'oops'") from e

    monkeypatch.setattr("celldino.pipeline.run_pipeline", failing_bug)
    with pytest.raises(StageError):
        run_cli("run")


# ---- what people type works ---------------------------------------------------------------


def test_scientific_notation_on_the_command_line_and_in_yaml(tmp_path, captured, run_cli):
    rc, _ = run_cli(
        "train",
        "train.min_lr=1e-6",
        "train.lr=5E-4",
        "profile.sphere_epsilon=1.0e+3",
        "train.epochs=1e1",
        "augment.global_crop_scale=[5e-1, 1]",
    )
    assert rc == 0
    cfg = captured["cfg"]
    assert (cfg.train.min_lr, cfg.train.lr, cfg.profile.sphere_epsilon) == (1e-6, 5e-4, 1e3)
    assert cfg.train.epochs == 10 and isinstance(cfg.train.epochs, int)
    assert cfg.augment.global_crop_scale == (0.5, 1.0)
    path = _yaml(tmp_path, "train:\n  min_lr: 1e-6\n  lr: 1E-6\n  warmup_epochs: 5e-1\n")
    cfg = C.load_config(path)  # PyYAML reads 1e-6 as a string: coerced for float fields
    assert (cfg.train.min_lr, cfg.train.lr, cfg.train.warmup_epochs) == (1e-6, 1e-6, 0.5)
    # ... and never for string fields
    cfg = C.load_config(None, ["train.weak_label=1e-6", "report.title=1E3"])
    assert (cfg.train.weak_label, cfg.report.title) == ("1e-6", "1E3")


def test_lists_as_help_prints_them(captured, run_cli):
    rc, _ = run_cli(
        "profile",
        "profile.by=Metadata_Plate,Metadata_Well",
        "profile.select=[variance, drop_na]",
        "profile.features=emb_0001,emb_0002",
        "profile.controls=Metadata_Compound in ['DMSO', 'none']",
        "profile.consensus=",
    )
    assert rc == 0
    p = captured["profile"]
    assert p.by == ("Metadata_Plate", "Metadata_Well")
    assert p.select == ("variance", "drop_na")
    assert p.features == ("emb_0001", "emb_0002")  # names or prefixes, as a list
    assert p.controls == "Metadata_Compound in ['DMSO', 'none']"  # commas and quotes kept
    assert p.consensus == ()  # '' = skip, as documented
    cfg = C.load_config(None, ["run.stages=prepare,train", "augment.global_crop_scale=0.7,1.0"])
    assert cfg.run.stages == ("prepare", "train")
    assert cfg.augment.global_crop_scale == (0.7, 1.0)
    cfg = C.load_config(None, ["report.title=Plate 3: MoA #1", "prepare.channel_map={5: DNA}"])
    assert cfg.report.title == "Plate 3: MoA #1"  # not a YAML mapping, not a comment
    assert cfg.prepare.channel_map == {"5": "DNA"}


def test_flags_anywhere_and_force_does_not_swallow_the_config(tmp_path, captured, run_cli):
    path = _yaml(tmp_path, "run:\n  out_dir: somewhere\n", "x.yaml")
    for args in (
        ["run", "--force", "train", path],
        ["run", path, "--force", "train", "-q"],
        ["-q", "run", "--force", "train", path],
        ["run", path, "-v", "--force=train"],
    ):
        captured.clear()
        rc, text = run_cli(*args)
        assert rc == 0, (args, text)
        assert captured["force"] == ("train",), args
        assert captured["cfg"].run.out_dir == "somewhere", args
    rc, _ = run_cli("run", "--force", "train", "extract", path, "run.baselines=random_init")
    assert rc == 0 and captured["force"] == ("train", "extract")
    assert captured["cfg"].run.baselines == ("random_init",)
    rc, _ = run_cli("run", "--force", "train,profile", "--force", "report", path)
    assert rc == 0 and captured["force"] == ("train", "profile", "report")
    rc, _ = run_cli("train", path, "-q", "train.epochs=2", "--resume")
    assert rc == 0 and captured["resume"] and captured["cfg"].train.epochs == 2


def test_settings_after_options_are_kept(tmp_path, captured, run_cli):
    rc, _ = run_cli("report", tmp_path, "--out", tmp_path / "r.html", "report.title=My run")
    assert rc == 0 and captured["title"] == "My run" and captured["out"] == tmp_path / "r.html"
    rc, _ = run_cli("extract", "--overwrite", "extract.batch_size=8", "--format", "h5ad", "-q")
    e = captured["extract"]
    assert rc == 0 and (e.overwrite, e.batch_size, e.format) == (True, 8, "h5ad")


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_default_printed_by_help_is_accepted_back(capsys):
    """Copy any `key=value` line of any command's --help onto the command line: it loads, and
    gives the default back (1e-06, a,b lists, [] and '' included)."""
    section_cls = C.typing.get_type_hints(C.Config)
    seen = set()
    for command, (_, _, sections, _) in cli.COMMANDS.items():
        text = _help(capsys, command)
        entries = [
            line.strip().split("  ")[0]
            for line in text.splitlines()
            if re.match(r"^  [a-z]+\.[a-z_0-9]+=", line)
        ]
        expected = {f"{s}.{f.name}" for s in sections for f in dataclasses.fields(section_cls[s])}
        assert {e.split("=", 1)[0] for e in entries} == expected, command
        for entry in entries:
            key = entry.split("=", 1)[0]
            section, name = key.split(".")
            cfg = C.load_config(None, [entry])
            assert (
                getattr(getattr(cfg, section), name) == getattr(C.Config(), section).__dict__[name]
            ), entry
            seen.add(key)
    assert len(seen) > 150  # every setting of every section shown somewhere


def test_help_lists_the_valid_values(capsys):
    text = " ".join(_help(capsys, "extract").split())
    assert "one of: cls, last_blocks, block, patch_mean, cls_patch_mean" in text
    text = " ".join(_help(capsys, "profile").split())
    assert "one of: '', standardize, mad_robustize, none" in text  # '' = from profile.recipe
    assert "profile.recipe=auto" in text and "one of: auto, cellprofiler, embeddings, none" in text


def test_config_show_prints_starting_configs_that_load(tmp_path, capsys):
    assert cli.main(["config", "show"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("tiny", "demo", "real-cells", "eval-spec"))
    for name in ("tiny", "demo", "real-cells"):
        assert cli.main(["config", "show", name]) == 0
        text = capsys.readouterr().out
        assert text.startswith("#")  # commented
        path = _yaml(tmp_path, text, f"{name}.yaml")
        assert C.load_config(path) == C.load_config(ROOT / "configs" / f"{name}.yaml")
    assert cli.main(["config", "show", "eval-spec"]) == 0
    spec_text = capsys.readouterr().out
    from celldino.eval.runner import _analyses, load_spec

    spec, _ = load_spec(_yaml(tmp_path, spec_text, "eval.yaml"))
    assert "nsc" in _analyses(spec) and spec["columns"]["moa"] == "Metadata_MoA"
    assert yaml.safe_load(spec_text)["name"] == "learned"


def _readme_tour() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A tour of the command line", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_readme_tour_uses_only_commands_and_settings_that_exist():
    tour = _readme_tour()
    assert tour.startswith("celldino config show tiny") and "celldino report" in tour
    for key in re.findall(r"\b([a-z]+\.[a-z_]+)=", tour):
        C._setting_type(key)  # raises for a misspelt key


@pytest.mark.slow
def test_readme_tour_runs_as_written(tmp_path):
    """The README's tour, verbatim, in an empty folder: synth → ... → report."""
    bin_dir = ROOT / ".venv" / "bin"
    script = "set -euo pipefail\n" + _readme_tour()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "tour" / "report.html").stat().st_size > 10_000
    assert (tmp_path / "tour" / "eval" / "summary.json").exists()


# ---- channel lists: each name once (#28/#140) ---------------------------------------------------


@pytest.mark.parametrize(
    "command, setting",
    [
        ("prepare", "prepare.channels=[DNA,ER,DNA]"),
        ("train", "train.channels=[DNA,ER,DNA]"),
        ("extract", "extract.channels=DNA,DNA,ER,RNA,AGP"),
    ],
)
def test_a_channel_named_twice_is_refused(captured, run_cli, command, setting):
    rc, text = run_cli(command, setting)
    _one_error_line(rc, text, f"command-line override {setting}", "'DNA'", "more than once")
    assert not captured  # nothing ran


def test_a_channel_named_twice_in_yaml_names_the_line(tmp_path, captured, run_cli):
    path = _yaml(tmp_path, "extract:\n  batch_size: 4\n  channels: [DNA, ER, Mito, ER]\n")
    rc, text = run_cli("extract", path)
    _one_error_line(rc, text, str(path), "line 3", "extract.channels", "'ER'", "more than once")
    assert not captured
