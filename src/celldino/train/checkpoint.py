"""Training checkpoints: weights in safetensors, training state in `last.state.pt`.

`<run_dir>/checkpoints/last.safetensors` holds `student.backbone.*`, `student.head.*`,
`teacher.backbone.*`, `teacher.head.*` with metadata `model_config` (JSON), `channels` (the
ordered channel names the model takes), `data` (the training data's identity, checked on
`--resume`) and `step`;
`epoch_NNNN.safetensors` copies are kept every `train.save_every` epochs. `last.state.pt` holds
what an exact resume needs: optimizer state, step and epoch (the sampler position), the loss
centres and the RNG states; it is read with `torch.load(weights_only=True)`. Both files are
written in full under temporary names first and only then renamed into place (weights, then
state), so a failed write (disk full) leaves the previous pair untouched; the step is in both so
a pair torn by a kill between the two renames is detected.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from celldino.io.checkpoints import (
    TRAIN_CROP_SIZE,
    CheckpointError,
    check_finite,
    read_metadata,
    read_state_dict,
    safetensors_payload,
    unsafe_global,
    write_safetensors,
)
from celldino.io.files import atomic_write_bytes, write_error
from celldino.io.trainrun import CHECKPOINTS, EPOCH_WEIGHTS, LAST_STATE, LAST_WEIGHTS

STATE_KEYS = ("step", "epoch", "optimizer", "dino_center", "ibot_center", "torch_rng")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def save(
    run_dir: str | Path,
    *,
    meta_arch: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    epoch: int,
    model_config: Any,
    epoch_copy: bool = False,
    channels: Sequence[str] | None = None,
    data_identity: dict[str, Any] | None = None,
    planned: tuple[int, int] | None = None,
    crop_size: int | None = None,
) -> Path:
    """Write last.safetensors (+ an epoch copy) and last.state.pt; return the weights path.

    `channels`: channel names in model order; `data_identity`: what `--resume` compares;
    `planned`: (total steps, epochs) the run was set to train for (extract warns when short);
    `crop_size`: the side of the global crops trained on (extract resizes cells to it).
    """
    ckpt = checkpoint_dir(run_dir)
    tensors = {f"student.{k}": v for k, v in meta_arch.student.state_dict().items()}
    tensors |= {f"teacher.{k}": v for k, v in meta_arch.teacher.state_dict().items()}
    metadata: dict[str, Any] = {
        "model_config": dataclasses.asdict(model_config),
        "step": str(step),
        "epoch": str(epoch),
        "format": "celldino-train",
    }
    if data_identity is not None:
        metadata["data"] = data_identity
    if planned is not None:
        metadata["total_steps"], metadata["epochs_planned"] = str(planned[0]), str(planned[1])
    if crop_size is not None:
        metadata[TRAIN_CROP_SIZE] = str(crop_size)
    chans = list(channels) if channels else None
    if epoch_copy:
        write_safetensors(
            ckpt / EPOCH_WEIGHTS.format(epoch=epoch), tensors, metadata, channels=chans
        )
    state = {
        "step": step,
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "dino_center": meta_arch.dino_loss.center.detach().cpu(),
        "ibot_center": meta_arch.ibot_loss.center.detach().cpu(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    last, state_path = ckpt / LAST_WEIGHTS, ckpt / LAST_STATE
    # both files complete on disk under temporary names before either replaces the old pair
    staged = [last.with_name(".pending." + last.name), state_path.with_name(".pending.state.pt")]
    try:
        for target, tmp, data, what in (
            (last, staged[0], safetensors_payload(tensors, metadata, channels=chans), "checkpoint"),
            (state_path, staged[1], buf.getvalue(), "training state"),
        ):
            try:
                atomic_write_bytes(tmp, data)
            except OSError as e:
                raise write_error(target, e, what=what) from None
        os.replace(staged[0], last)
        os.replace(staged[1], state_path)
    except BaseException:
        for p in staged:
            p.unlink(missing_ok=True)
        raise
    return last


def has_checkpoint(run_dir: str | Path) -> bool:
    ckpt = checkpoint_dir(run_dir)
    return (ckpt / LAST_WEIGHTS).is_file() and (ckpt / LAST_STATE).is_file()


def saved_files(run_dir: str | Path) -> list[Path]:
    """The checkpoint files a run folder holds (weights of any name and the training state)."""
    ckpt = checkpoint_dir(run_dir)
    if not ckpt.is_dir():
        return []
    held = [
        p
        for p in ckpt.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and (p.suffix == ".safetensors" or p.name == LAST_STATE)
    ]
    return sorted(held, key=lambda p: (p.name != LAST_WEIGHTS, p.name))  # last.safetensors first


def resume_problem(run_dir: str | Path) -> str | None:
    """Why `--resume` cannot continue the run exactly (None when it can, or when the run folder
    holds no checkpoint at all and training starts from scratch)."""
    ckpt = checkpoint_dir(run_dir)
    weights, state = ckpt / LAST_WEIGHTS, ckpt / LAST_STATE
    held = saved_files(run_dir)
    if not held or (weights.is_file() and state.is_file()):
        return None
    missing = [p for p in (weights, state) if not p.is_file()]
    kept = [p for p in held if p.suffix == ".safetensors"]
    tune = (
        f", fine-tune from its weights in another train.run_dir with model.pretrained={kept[0]}"
        if kept
        else ""
    )
    return (
        f"cannot resume {run_dir} exactly: {' and '.join(map(str, missing))} "
        f"{'is' if len(missing) == 1 else 'are'} missing (the folder holds "
        f"{', '.join(p.name for p in held)}); restore the missing file from a copy{tune}, or "
        f"remove {ckpt} to train from scratch"
    )


def read(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, state) of the run's last checkpoint, checked: both files there, the state a
    celldino training state (never unpickling objects), finite weights, the same step in both."""
    ckpt = checkpoint_dir(run_dir)
    weights_path, state_path = ckpt / LAST_WEIGHTS, ckpt / LAST_STATE
    if not has_checkpoint(run_dir):
        raise CheckpointError(
            f"cannot resume: {weights_path} and {state_path} are not both there "
            "(start without --resume, or point train.run_dir at the run to continue)"
        )
    state = read_state(state_path)
    tensors = read_state_dict(weights_path)
    check_finite(tensors, weights_path)
    step_w = int(read_metadata(weights_path).get("step", "-1"))
    if state["step"] != step_w:
        raise CheckpointError(
            f"{weights_path} (step {step_w}) and {state_path} (step {state['step']}) disagree: "
            "the run was killed while saving; resume from an epoch_NNNN checkpoint instead"
        )
    return tensors, state


def load(
    run_dir: str | Path,
    *,
    meta_arch: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    loaded: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Restore weights, optimizer, centres and RNG states; return the state (step, epoch).
    `loaded`: what `read(run_dir)` returned (read once, before anything was written)."""
    weights_path = checkpoint_dir(run_dir) / LAST_WEIGHTS
    tensors, state = loaded if loaded is not None else read(run_dir)
    for name in ("student", "teacher"):
        net = getattr(meta_arch, name)
        sub = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        missing, unexpected = net.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{weights_path} does not fit the configured model ({name}): missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}; use the run's own config.yaml"
            )
    optimizer.load_state_dict(state["optimizer"])
    meta_arch.dino_loss.center.copy_(state["dino_center"].to(device))
    meta_arch.ibot_loss.center.copy_(state["ibot_center"].to(device))
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def read_state(path: str | Path) -> dict[str, Any]:
    """A `last.state.pt` written by celldino, read without unpickling objects; anything else
    (a pickle holding code, another program's file, a truncated file) is refused naming it."""
    path = Path(path)
    what = (
        "it is not a celldino training state, so the run cannot resume from it: restore the "
        "file from the run's own checkpoints/ (a copy or backup), start a new run in another "
        "train.run_dir, or fine-tune from its weights with "
        f"model.pretrained={path.with_name(LAST_WEIGHTS)}"
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to read {path}: it holds pickled Python objects other than tensors "
            f"({unsafe_global(e)}), which celldino never unpickles because that can run code; "
            f"{what}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        # not a pickle at all (the weights-only unpickler says e.g. KeyError: 105), torn, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"cannot read {path} ({first}): {what}") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: {what}")
    return state


def read_run_metadata(run_dir: str | Path) -> dict[str, Any]:
    """The decoded metadata of a run's last.safetensors: channels, data identity, step."""
    path = checkpoint_dir(run_dir) / LAST_WEIGHTS
    meta = read_metadata(path)
    out: dict[str, Any] = {}
    for key in ("channels", "data", "model_config"):
        if key in meta:
            try:
                out[key] = json.loads(meta[key])
            except ValueError:
                raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON") from None
    return out
