"""The import graph follows docs/architecture.md: imports go one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "celldino"

# package → celldino packages it must never import
FORBIDDEN = {
    "layers": {"config", "io", "synth", "data", "augment", "models", "losses", "train", "extract", "pp", "eval", "pl", "pipeline", "cli"},
    "losses": {"config", "io", "synth", "data", "augment", "layers", "models", "train", "extract", "pp", "eval", "pl", "pipeline", "cli"},
    "io": {"synth", "data", "augment", "layers", "models", "losses", "train", "extract", "pp", "eval", "pl", "pipeline", "cli"},
    "synth": {"data", "augment", "layers", "models", "losses", "train", "extract", "pp", "eval", "pl", "pipeline", "cli"},
    "data": {"augment", "layers", "models", "losses", "train", "extract", "pp", "eval", "pl", "pipeline", "cli"},
    "augment": {"layers", "models", "losses", "train", "extract", "pp", "eval", "pl", "pipeline", "cli"},
    "models": {"losses", "train", "extract", "pp", "eval", "pl", "pipeline", "cli"},
    "extract": {"train", "pp", "eval", "pl", "pipeline", "cli"},
    "pp": {"train", "extract", "eval", "pl", "pipeline", "cli", "layers", "models", "losses", "augment"},
    "eval": {"train", "pl", "pipeline", "cli"},
    "pl": {"train", "pipeline", "cli"},
    "config": {"synth", "data", "augment", "layers", "models", "losses", "train", "extract", "pp", "eval", "pl", "pipeline", "cli"},
}  # fmt: skip
THIRD_PARTY_ONLY_TORCH = {"layers", "losses"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_imports_go_one_way(pkg):
    files = (
        [SRC / f"{pkg}.py"] if (SRC / f"{pkg}.py").exists() else sorted((SRC / pkg).rglob("*.py"))
    )
    assert files, f"no sources for {pkg}"
    bad = []
    for f in files:
        for name in _imports(f):
            parts = name.split(".")
            if parts[0] == "celldino" and len(parts) > 1 and parts[1] in FORBIDDEN[pkg]:
                bad.append(f"{f.relative_to(SRC)} imports {name}")
            if pkg in THIRD_PARTY_ONLY_TORCH and parts[0] not in (
                "torch",
                "celldino",
                "__future__",
                "math",
                "typing",
                "collections",
                "dataclasses",
                "functools",
                "warnings",
            ):
                bad.append(
                    f"{f.relative_to(SRC)} imports {name} (layers/ and losses/ import only torch)"
                )
    assert not bad, "\n".join(bad)


def test_no_cuda_calls_in_model_code():
    offenders = [
        f"{f.relative_to(SRC)}:{i + 1}"
        for pkg in ("layers", "models", "losses")
        for f in (SRC / pkg).rglob("*.py")
        for i, line in enumerate(f.read_text().splitlines())
        if ".cuda()" in line
    ]
    assert not offenders, offenders
