"""`import celldino as cd` is light, and `cd.pp`, `cd.pl`, `cd.eval`, `cd.io`, `cd.config` load on
first access."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_import_celldino_loads_neither_torch_nor_anndata():
    out = _run(
        "import sys, celldino; "
        "print(sorted(m for m in ('torch', 'anndata', 'pandas', 'sklearn') if m in sys.modules))"
    )
    assert out == "[]"


def test_subpackages_are_exported_lazily():
    import celldino as cd

    assert callable(cd.pp.normalize) and callable(cd.pp.pca)
    for name in ("pl", "eval", "io", "config"):
        assert getattr(cd, name).__name__ == f"celldino.{name}"
    assert {"pp", "pl", "eval", "io", "config"} <= set(dir(cd))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cd.nope  # noqa: B018


def test_pp_alone_does_not_load_torch():
    assert _run("import sys, celldino as cd; cd.pp.normalize; print('torch' in sys.modules)") == (
        "False"
    )
