"""celldino: self-supervised vision transformers for fluorescence microscopy of cells.

    import celldino as cd
    cd.pp.normalize(adata)   # profiles
    cd.pl.umap(...)          # plots
    cd.eval.mean_average_precision(...)

The subpackages are imported on first access (`__getattr__` below), so `import celldino` stays
light: it loads neither torch nor anndata until a subpackage that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

_LAZY = ("config", "eval", "io", "pl", "pp")  # subpackages / modules exported on first access

if TYPE_CHECKING:  # for type checkers and editors; at run time they load lazily
    from celldino import config, eval, io, pl, pp


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"celldino.{name}")
        globals()[name] = module  # later accesses skip this function
        return module
    raise AttributeError(f"module 'celldino' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["__version__", "config", "eval", "io", "pl", "pp"]
