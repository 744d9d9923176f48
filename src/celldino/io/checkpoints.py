"""Reading and writing model weights safely: safetensors, or torch files without arbitrary pickles.

`read_state_dict` never runs code from a file: safetensors holds only tensors, and torch files are
opened with `torch.load(weights_only=True)`, which refuses any pickled object that is not a
tensor, a container or a plain value (argparse.Namespace, as saved in the `args` entry of
official DINO / DINO4Cells checkpoints, is also allowed: it holds plain values).
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from celldino.io.files import atomic_write_bytes


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely or does not hold what was expected."""


def is_safetensors(path: Path) -> bool:
    """True for a safetensors file (by suffix, or by its 8-byte header length + JSON header)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """The tensors of a checkpoint (possibly nested dicts, as saved by torch), on the CPU.

    Raises CheckpointError naming the file when it is missing, unreadable, or holds pickled
    objects other than tensors and plain values (which are never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_safetensors(path):
        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {path} is not a readable safetensors file: {e}"
            ) from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled Python objects other than tensors "
            f"({why.strip() or 'unsupported global'}). celldino never unpickles arbitrary "
            "objects because that can run code. If you trust the file, convert it once to "
            "safetensors (safetensors.torch.save_file(state_dict, 'weights.safetensors'))."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable torch file: {e}") from None
    if isinstance(obj, torch.nn.Module):  # cannot happen with weights_only, kept for clarity
        raise CheckpointError(f"checkpoint {path} holds a whole module, not a state dict")
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other files)."""
    path = Path(path)
    if not is_safetensors(path):
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {e}") from e


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
) -> Path:
    """Write tensors (+ string metadata; non-strings are JSON-encoded) atomically to `path`."""
    seen: set[int] = set()
    flat: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(ptr)
        flat[k] = t
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write_bytes(Path(path), safetensors_bytes(flat, metadata=meta or None))
