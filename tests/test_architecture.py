"""The import graph follows docs/architecture.md: imports go one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "celldino"

# every top-level module and package of celldino (a new one gets a place in the table below)
ALL = set(
    "errors names query marks log diagnostics probes config distributed io synth data augment layers "
    "models losses train extract pp eval pl report pipeline cli".split()
)

# package → celldino packages it must never import
FORBIDDEN = {
    "errors":      ALL - {"errors"},  # every package may raise these
    "names":       ALL - {"errors", "names"},  # path-component checks, for config and io alike
    "query":       ALL - {"errors", "query"},  # the selection grammar (profile.controls)
    "marks":       ALL - {"errors", "marks"},  # profile's fit marks, read by pp and eval
    "log":         ALL - {"errors", "log"},
    "diagnostics": ALL - {"errors", "log", "diagnostics"},
    "probes":      ALL - {"errors", "log", "probes"},  # shared by train's monitor and eval
    "config":      ALL - {"errors", "log", "config", "names", "query"},  # config → io would close a config ↔ io cycle
    "distributed": ALL - {"errors", "log", "config", "distributed"},  # shared by train and extract
    "layers":      {"config", "io", "synth", "data", "augment", "models", "losses", "train", "extract", "pp", "eval", "pl", "report", "pipeline", "cli", "diagnostics"},
    "losses":      {"config", "io", "synth", "data", "augment", "layers", "models", "train", "extract", "pp", "eval", "pl", "report", "pipeline", "cli", "diagnostics"},
    "io":          {"synth", "data", "augment", "layers", "models", "losses", "train", "extract", "pp", "eval", "pl", "report", "pipeline", "cli", "diagnostics"},
    "synth":       {"data", "augment", "layers", "models", "losses", "train", "extract", "pp", "eval", "pl", "report", "pipeline", "cli", "diagnostics"},
    "data":        {"augment", "layers", "models", "losses", "train", "extract", "pp", "eval", "pl", "report", "pipeline", "cli", "diagnostics"},
    "augment":     {"layers", "models", "losses", "train", "extract", "pp", "eval", "pl", "report", "pipeline", "cli", "diagnostics"},
    "models":      {"losses", "train", "extract", "pp", "eval", "pl", "report", "pipeline", "cli", "diagnostics"},
    "train":       {"extract", "pp", "eval", "pl", "report", "pipeline", "cli"},
    "extract":     {"train", "pp", "eval", "pl", "report", "pipeline", "cli", "diagnostics"},
    "pp":          {"train", "extract", "eval", "pl", "report", "pipeline", "cli", "layers", "models", "losses", "augment", "diagnostics"},
    "eval":        {"train", "pl", "report", "pipeline", "cli"},
    "pl":          {"train", "report", "pipeline", "cli"},
    "report":      {"train", "pipeline", "cli"},
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


def _module_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module → the modules of the same tree it imports, at module level or inside functions.

    `from pkg import name` points at `pkg.name` when that is a module, else at `pkg` itself; the
    parent packages Python also runs on the way are left out (every module would then sit in a
    cycle with its package's `__init__`).
    """
    top = src.name
    modules = {}
    for path in src.rglob("*.py"):
        parts = path.relative_to(src.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:  # the innermost module of a dotted name
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names if a.name.split(".")[0] == top}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                if base.split(".")[0] == top:
                    targets |= {
                        f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base)
                        for a in node.names
                    }
        graph[mod] = targets - {None, mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = _cycles(_module_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" ↔ ".join(sorted(c)) for c in cycles)


def test_cycle_check_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "celldino"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from celldino.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("from celldino.sub import b\n\ndef f():\n    return b\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from .a import f\n\n    return f\n")
    (pkg / "c.py").write_text("import celldino.sub.b\n")
    graph = _module_graph(pkg)
    assert graph["celldino.c"] == {"celldino.sub.b"}
    assert _cycles(graph) == [{"celldino.sub.a", "celldino.sub.b"}]


def test_every_module_has_a_place():
    names = {p.name.removesuffix(".py") for p in SRC.iterdir() if p.suffix == ".py" or p.is_dir()}
    unknown = names - ALL - {"__init__", "__main__", "configs", "__pycache__"}
    assert not unknown, f"new top-level modules {unknown}: add them to ALL and FORBIDDEN"
