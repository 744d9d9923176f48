"""Training checkpoints: weights in safetensors, training state in `last.state.pt`.

`<run_dir>/checkpoints/last.safetensors` holds `student.backbone.*`, `student.head.*`,
`teacher.backbone.*`, `teacher.head.*` with metadata `model_config` (JSON) and `step`;
`epoch_NNNN.safetensors` copies are kept every `train.save_every` epochs. `last.state.pt` holds
what an exact resume needs: optimizer state, step and epoch (the sampler position), the loss
centres and the RNG states; it is read with `torch.load(weights_only=True)`. Both files are
written atomically (temporary file + rename); weights first, state second, and the step is in
both so a torn pair is detected.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import torch

from celldino.io.checkpoints import (
    CheckpointError,
    read_metadata,
    read_state_dict,
    write_safetensors,
)
from celldino.io.files import atomic_write_bytes


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(
    run_dir: str | Path,
    *,
    meta_arch: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    epoch: int,
    model_config: Any,
    epoch_copy: bool = False,
) -> Path:
    """Write last.safetensors (+ an epoch copy) and last.state.pt; return the weights path."""
    ckpt = checkpoint_dir(run_dir)
    tensors = {f"student.{k}": v for k, v in meta_arch.student.state_dict().items()}
    tensors |= {f"teacher.{k}": v for k, v in meta_arch.teacher.state_dict().items()}
    metadata = {
        "model_config": dataclasses.asdict(model_config),
        "step": str(step),
        "epoch": str(epoch),
        "format": "celldino-train",
    }
    last = write_safetensors(ckpt / "last.safetensors", tensors, metadata)
    if epoch_copy:
        write_safetensors(ckpt / f"epoch_{epoch:04d}.safetensors", tensors, metadata)
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
    atomic_write_bytes(ckpt / "last.state.pt", buf.getvalue())
    return last


def has_checkpoint(run_dir: str | Path) -> bool:
    ckpt = checkpoint_dir(run_dir)
    return (ckpt / "last.safetensors").is_file() and (ckpt / "last.state.pt").is_file()


def load(
    run_dir: str | Path,
    *,
    meta_arch: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> dict[str, Any]:
    """Restore weights, optimizer, centres and RNG states; return the state (step, epoch)."""
    ckpt = checkpoint_dir(run_dir)
    weights_path, state_path = ckpt / "last.safetensors", ckpt / "last.state.pt"
    if not has_checkpoint(run_dir):
        raise CheckpointError(
            f"cannot resume: {weights_path} and {state_path} are not both there "
            "(start without --resume, or point train.run_dir at the run to continue)"
        )
    tensors = read_state_dict(weights_path)
    step_w = int(read_metadata(weights_path).get("step", "-1"))
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if state["step"] != step_w:
        raise CheckpointError(
            f"{weights_path} (step {step_w}) and {state_path} (step {state['step']}) disagree: "
            "the run was killed while saving; resume from an epoch_NNNN checkpoint instead"
        )
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
