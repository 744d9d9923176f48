"""Shared fixtures. Real data lives at ../shared/data beside the repository (never copied in)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def _require_shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        msg = f"real test data missing: {path} (expected ../shared/data beside the repository)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data; fails under CI=true when missing, skips otherwise."""
    return _require_shared("")


@pytest.fixture(scope="session")
def bbbc021_dir() -> Path:
    return _require_shared("bbbc021_crops")


@pytest.fixture(scope="session")
def cellpainting_fovs() -> Path:
    return _require_shared("cellpainting_fovs")


@pytest.fixture(scope="session")
def lincs_csv() -> Path:
    return _require_shared("lincs_SQ00015054") / "SQ00015054_normalized_feature_select.csv.gz"


@pytest.fixture(scope="session")
def tiny_screen(tmp_path_factory) -> Path:
    """The `tiny` synthetic screen, generated once per test session."""
    from celldino.config import SynthConfig
    from celldino.synth import make_screen

    out = tmp_path_factory.mktemp("tiny_screen")
    return make_screen(out, SynthConfig(preset="tiny", seed=0))


@pytest.fixture(scope="session")
def demo_screen(tmp_path_factory) -> Path:
    """The `demo` synthetic screen (128 sites of 256x256), generated once per test session."""
    from celldino.config import SynthConfig
    from celldino.synth import make_screen

    out = tmp_path_factory.mktemp("demo_screen")
    return make_screen(out, SynthConfig(preset="demo", seed=0))


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """Two cores on CI: keep torch from oversubscribing when several processes run."""
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:
        pass
    yield


@pytest.fixture
def run_cli(capsys):
    """Run `celldino ARGS...` in-process: returns (exit code, stderr text with newlines joined).

    The rich console wraps long lines at the terminal width, so the message is returned with
    line breaks replaced by spaces: assert on words of the message, not on its layout.
    """
    from celldino import log
    from celldino.cli import main

    def _run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        width = log.console.width
        log.console.width = 10_000  # one user error = one line
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            rc = int(e.code or 0)
        finally:
            log.console.width = width
        out = capsys.readouterr()
        return rc, " ".join((out.err + "\n" + out.out).split())

    return _run


@pytest.fixture
def read_only():
    """`read_only(folder)` makes a folder unwritable, also for root (which ignores chmod).

    As a normal user: chmod 555. As root (CI containers): `chattr +i` (immutable), undone at
    teardown; skips when the filesystem does not support it.
    """
    import shutil
    import subprocess

    done: list[Path] = []

    def _make(folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            folder.chmod(0o555)
        elif (
            not shutil.which("chattr")
            or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode
        ):
            pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
        done.append(folder)
        return folder

    yield _make
    for folder in done:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)
