"""Reading and writing model weights safely: safetensors, or torch files without arbitrary pickles.

`read_state_dict` never runs code from a file: safetensors holds only tensors, and torch files are
opened with `torch.load(weights_only=True)`, which refuses any pickled object that is not a
tensor, a container or a plain value (argparse.Namespace, as saved in the `args` entry of
official DINO / DINO4Cells checkpoints, is also allowed: it holds plain values).

celldino checkpoints carry string metadata: `model_config` (JSON), `channels` (JSON list of the
channel names in the order the model takes them; `checkpoint_channels` reads it) and, for training
checkpoints, `step`, `epoch` and `data` (the training data's identity). `check_finite` refuses
NaN or infinite weights naming the tensor. Writing failures (disk full, read-only folder) become
`OutputError`s naming the file; the file that was there before is left as it was.
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

from celldino.errors import DataError
from celldino.io.files import atomic_write_bytes, write_error


class CheckpointError(DataError):
    """A checkpoint file that cannot be read safely or does not hold what was expected."""


def unsafe_global(error: BaseException) -> str:
    """The refused global of a `weights_only` unpickling error ('GLOBAL os.system'), without
    torch's advice around it (which suggests `weights_only=False`: never pass that on)."""
    import re

    m = re.search(r"GLOBAL\s+([\w.]+)", str(error))
    if m:
        return f"GLOBAL {m.group(1)}"
    m = re.search(r"Unsupported operand (\d+)", str(error))
    return f"unsupported pickle opcode {m.group(1)}" if m else "an object that is not a tensor"


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
    not_a_checkpoint = (
        f"checkpoint {path} is not a checkpoint: neither safetensors nor a torch file "
        "(a .safetensors file, or a .pth/.pt written by torch.save)"
    )
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # zip or pickle
        raise CheckpointError(not_a_checkpoint)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled Python objects other than tensors "
            f"({unsafe_global(e)}). celldino never unpickles arbitrary "
            "objects because that can run code. If you trust the file, convert it once to "
            "safetensors (safetensors.torch.save_file(state_dict, 'weights.safetensors'))."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is not a readable torch file: {first}") from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as e:
        # the weights-only unpickler on bytes that are not a pickle (e.g. KeyError: 105)
        raise CheckpointError(f"{not_a_checkpoint} ({type(e).__name__}: {e})") from None
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


def metadata_json(path: str | Path, key: str, kind: type = dict) -> Any:
    """The metadata entry `key` of a safetensors checkpoint decoded from JSON (None when absent);
    an entry that is not JSON of type `kind` (a damaged or hand-edited file) names the file and
    the key."""
    raw = read_metadata(path).get(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(
            f"checkpoint {path}: metadata {key!r} is not valid JSON ({e}): the file was "
            "damaged or edited; use the checkpoint as training wrote it (train again, or an "
            "earlier epoch's checkpoint)"
        ) from None
    if not isinstance(value, kind):
        raise CheckpointError(
            f"checkpoint {path}: metadata {key!r} is a {type(value).__name__}, not a "
            f"{kind.__name__}: the file was damaged or edited; use the checkpoint as training "
            "wrote it"
        )
    return value


def checkpoint_channels(path: str | Path) -> list[str]:
    """The channel names, in model order, recorded in a checkpoint ([] when not recorded)."""
    raw = read_metadata(path).get("channels")
    if not raw:
        return []
    try:
        names = json.loads(raw)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise CheckpointError(f"checkpoint {path}: metadata 'channels' is not a list of names")
    return names


TRAIN_CROP_SIZE = "train_crop_size"  # metadata key: the global crop side trained on (pixels)


def checkpoint_crop_size(path: str | Path) -> int | None:
    """The side in pixels of the global crops a checkpoint was trained on (None when not
    recorded: foreign weights, checkpoints of celldino before 0.4)."""
    raw = read_metadata(path).get(TRAIN_CROP_SIZE)
    if raw is None:
        return None
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise CheckpointError(
            f"checkpoint {path}: metadata '{TRAIN_CROP_SIZE}' is {raw!r}, not a positive size"
        )
    return size


def check_finite(tensors: dict[str, Any], path: str | Path) -> None:
    """Refuse weights holding NaN or infinite values, naming the file and the tensors."""
    bad = [
        k
        for k, v in tensors.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds NaN or infinite weights in {len(bad)} tensor(s) "
            f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): its embeddings would be "
            "NaN; use an earlier checkpoint (checkpoints/epoch_NNNN.safetensors) or retrain"
        )


def write_safetensors(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
    *,
    channels: list[str] | tuple[str, ...] | None = None,
) -> Path:
    """Write tensors (+ string metadata; non-strings are JSON-encoded) atomically to `path`.

    `channels`: the channel names in the order the model takes them (stored as metadata
    `channels`, so extraction can match a prep's channels by name). A failed write (disk full)
    raises OutputError naming `path` and leaves the previous file in place.
    """
    data = safetensors_payload(tensors, metadata, channels=channels)
    try:
        return atomic_write_bytes(Path(path), data)
    except OSError as e:
        raise write_error(path, e, what="checkpoint") from None


def safetensors_payload(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
    *,
    channels: list[str] | tuple[str, ...] | None = None,
) -> bytes:
    """The bytes of a safetensors file (see `write_safetensors`)."""
    seen: set[int] = set()
    flat: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(ptr)
        flat[k] = t
    metadata = dict(metadata or {})
    if channels is not None:
        metadata["channels"] = [str(c) for c in channels]
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return safetensors_bytes(flat, metadata=meta or None)
