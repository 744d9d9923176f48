"""Student and teacher: multi-crop wrappers, the EMA teacher update and the per-step losses.

The student sees every crop (global and local), the teacher only the global crops. The teacher
starts as a copy of the student and follows it by exponential moving average (EMA); it gets no
gradient. With iBOT on, the student sees its global crops with some patch tokens masked and the
teacher's tokens at those positions are the targets; KoLeo spreads the student's class tokens.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from celldino.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss


@torch.no_grad()
def effective_rank(x: torch.Tensor) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the singular values of the (N, D)
    features (not centred) normalised to sum 1; 1 when every row is on one direction."""
    s = torch.linalg.svdvals(x.float().cpu().double())
    if float(s.sum()) <= 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))


class TeacherUsage:
    """The teacher's argmax counts per prototype and its summed distribution over many steps,
    kept on the device (no host sync per step); `summary()` reads them (summed over ranks under
    torchrun: every rank must call it at the same steps) and `reset()` starts a new interval."""

    def __init__(self, out_dim: int, device: torch.device | str = "cpu") -> None:
        self.counts = torch.zeros(out_dim, dtype=torch.float64, device=device)
        self.prob_sum = torch.zeros(out_dim, dtype=torch.float64, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, q: torch.Tensor) -> None:
        """q (N, K): teacher distributions of N crops."""
        q = q.detach().to(self.counts.device)
        ones = torch.ones(q.shape[0], dtype=self.counts.dtype, device=q.device)
        self.counts.index_add_(0, q.argmax(-1), ones)
        self.prob_sum += q.sum(0).double()
        self.n += q.shape[0]

    def reset(self) -> None:
        self.counts.zero_()
        self.prob_sum.zero_()
        self.n = 0

    @torch.no_grad()
    def summary(self) -> dict[str, float]:
        """prototypes_used, prototype_top_share, mean_teacher_entropy (nats; of the mean
        distribution) and teacher_samples over the accumulated steps."""
        t = torch.cat([self.counts, self.prob_sum, self.counts.new_tensor([self.n])])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = t.clone()
            torch.distributed.all_reduce(t)
        k = self.counts.shape[0]
        counts, prob_sum, n = t[:k].cpu(), t[k : 2 * k].cpu(), float(t[-1])
        if n <= 0:
            return {}
        p = prob_sum / prob_sum.sum()
        return {
            "prototypes_used": float((counts > 0).sum()),
            "prototype_top_share": float(counts.max() / counts.sum()),
            "mean_teacher_entropy": float(-(p * torch.log(p.clamp_min(1e-300))).sum()),
            "teacher_samples": n,
        }


class MultiCropNet(nn.Module):
    """Backbone + DINO head over a list of crops of possibly different sizes.

    forward(crops: list of (B, C, H_i, W_i), masks=None, apply_masks=True) returns
    `cls` (n_crops*B, D) backbone class tokens, `head` (n_crops*B, K) head outputs, and with
    `masks` ((n_global*B, N) bool, for the first crops) `patch_head` (M, K): the head on the
    patch tokens of the masked positions. Crops of one size go through the backbone together.
    `mask_index` (M,): the positions of True in `masks.flatten()`; given (computed on the CPU),
    picking the masked tokens needs no host sync on a GPU.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        crops: list[torch.Tensor],
        *,
        masks: torch.Tensor | None = None,
        apply_masks: bool = True,
        channel_ids: torch.Tensor | None = None,
        mask_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        # consecutive runs of equal spatial size → one backbone call each
        groups: list[list[torch.Tensor]] = []
        for c in crops:
            if groups and groups[-1][0].shape[-2:] == c.shape[-2:]:
                groups[-1].append(c)
            else:
                groups.append([c])
        cls_parts, patch_tokens = [], None
        for gi, group in enumerate(groups):
            x = torch.cat(group)  # (g*B, C, H, W)
            kwargs = {}
            if channel_ids is not None:
                kwargs["channel_ids"] = channel_ids
            if gi == 0 and masks is not None and apply_masks:
                kwargs["masks"] = masks
            out = self.backbone(x, **kwargs)
            cls_parts.append(out["cls"])  # (g*B, D)
            if gi == 0 and masks is not None:
                patch_tokens = out["patch"]  # (g*B, N, D)
        cls = torch.cat(cls_parts)  # (n_crops*B, D)
        result = {"cls": cls}
        if patch_tokens is not None:
            if patch_tokens.shape[:2] != masks.shape:
                raise ValueError(
                    f"iBOT masks have shape {tuple(masks.shape)} but the global crops give "
                    f"{tuple(patch_tokens.shape[:2])} patch tokens"
                )
            if mask_index is None:
                mask_index = masks.flatten().nonzero().squeeze(1)  # a host sync on a GPU
            picked = patch_tokens.flatten(0, 1).index_select(0, mask_index)  # (M, D)
            both = self.head(torch.cat([cls, picked]))  # one head call: (n*B + M, K)
            result["head"], result["patch_head"] = both[: cls.shape[0]], both[cls.shape[0] :]
        else:
            result["head"] = self.head(cls)
        return result


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← momentum · teacher + (1 − momentum) · student, parameter by parameter.

    Computed as teacher + (1 − momentum)(student − teacher) (a lerp), which leaves a teacher that
    equals the student exactly unchanged."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


CLIP_MODES = ("global", "per_tensor")


@torch.no_grad()
def clip_gradients(params, max_norm: float, mode: str = "global") -> None:
    """Clip gradients to `max_norm`. `global`: the norm of all gradients together
    (torch's clip_grad_norm_); `per_tensor`: each parameter's gradient on its own, as the
    original DINO's `utils.clip_gradients` does (grad × max_norm / (‖grad‖ + 1e-6) where
    that factor is below 1)."""
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode {mode!r}: one of {', '.join(CLIP_MODES)}")
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    coefs = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)


class DINOMetaArch(nn.Module):
    """Student, teacher and losses. The student may later be wrapped in DDP (`student_ddp`)."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        out_dim: int,
        n_global: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        ibot_weight: float = 0.0,
        koleo_weight: float = 0.0,
        centering: str = "center",
    ) -> None:
        super().__init__()
        self.student = MultiCropNet(backbone, head)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.n_global = n_global
        self.dino_loss = DINOLoss(
            out_dim, student_temp=student_temp, center_momentum=center_momentum, centering=centering
        )
        self.ibot_weight = ibot_weight
        self.koleo_weight = koleo_weight
        self.ibot_loss = iBOTPatchLoss(
            out_dim, student_temp=student_temp, center_momentum=center_momentum, centering=centering
        )
        self.koleo_loss = KoLeoLoss()
        self.student_ddp: nn.Module = self.student  # replaced by a DDP wrapper when distributed

    def forward_losses(
        self,
        global_crops: list[torch.Tensor],
        local_crops: list[torch.Tensor],
        *,
        teacher_temp: float,
        masks: torch.Tensor | None = None,
        channel_ids: torch.Tensor | None = None,
        mask_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and the tensors the diagnostics need (all detached but `loss`).
        `mask_index`: the positions of True in `masks.flatten()` (see MultiCropNet)."""
        B = global_crops[0].shape[0]
        use_ibot = self.ibot_weight > 0 and masks is not None
        if use_ibot and mask_index is None:
            mask_index = masks.flatten().nonzero().squeeze(1)  # a host sync on a GPU
        with torch.no_grad():
            t_out = self.teacher(
                global_crops,
                masks=masks if use_ibot else None,
                apply_masks=False,
                channel_ids=channel_ids,
                mask_index=mask_index,
            )
        s_out = self.student_ddp(
            global_crops + local_crops,
            masks=masks if use_ibot else None,
            channel_ids=channel_ids,
            mask_index=mask_index,
        )
        # (n_global*B, K): the teacher's targets, computed once for the loss and the diagnostics
        # (centred before the loss call moves the centre; Sinkhorn-Knopp needs its reductions once)
        q = self.dino_loss.teacher_probs(t_out["head"], teacher_temp)
        dino = self.dino_loss(
            s_out["head"], t_out["head"], teacher_temp, n_global=self.n_global, teacher_probs=q
        )
        loss = dino
        parts = {"loss_dino": dino.detach()}
        if use_ibot:
            counts = masks.sum(dim=1, keepdim=True).clamp_min(1).float()  # (n_global*B, 1)
            weight = (1.0 / counts).expand_as(masks).flatten().index_select(0, mask_index)  # (M,)
            ibot = self.ibot_loss(
                s_out["patch_head"],
                t_out["patch_head"],
                weight,
                teacher_temp,
                n_images=masks.shape[0],
            )
            loss = loss + self.ibot_weight * ibot
            parts["loss_ibot"] = ibot.detach()
        if self.koleo_weight > 0:
            s_cls = s_out["cls"][: self.n_global * B]
            koleo = sum(self.koleo_loss(c) for c in s_cls.chunk(self.n_global))
            loss = loss + self.koleo_weight * koleo
            parts["loss_koleo"] = koleo.detach()
        parts.update(
            student_head=s_out["head"][: self.n_global * B].detach(),
            teacher_cls=t_out["cls"].detach(),
            teacher_probs=q,
        )
        return loss, parts

    @torch.no_grad()
    def diagnostics(
        self, parts: dict[str, torch.Tensor], usage: TeacherUsage | None = None
    ) -> dict[str, float]:
        """The training-health numbers (celldino.diagnostics explains them).

        From this step's batch: `teacher_entropy` (mean per-sample entropy of the sharpened
        teacher), `kl_student_teacher` (on the same global views), `loss_over_logk`,
        `effective_rank` and `embedding_std` of the teacher class tokens (`rank_rows` of them). From `usage` (the
        teacher distributions accumulated over the steps since it was reset; this batch's alone
        when None): `prototypes_used`, `prototype_top_share`, `mean_teacher_entropy` and
        `teacher_samples` (how many distributions they were computed from).
        """
        q = parts["teacher_probs"]  # the distribution the loss used
        logq = torch.log(q.clamp_min(1e-12))
        entropy = -(q * logq).sum(-1).mean()
        logp = F.log_softmax(parts["student_head"].float() / self.dino_loss.student_temp, dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1).mean()
        cls = parts["teacher_cls"].float()  # (n_g*B, D)
        z = F.normalize(cls, dim=-1)
        emb_std = z.std(dim=0).mean() * z.shape[1] ** 0.5  # ~1 when spread, → 0 when collapsed
        out = {
            "teacher_entropy": float(entropy),
            "kl_student_teacher": float(kl),
            "embedding_std": float(emb_std),
            "effective_rank": effective_rank(cls),
            "rank_rows": float(cls.shape[0]),  # the rank is at most this
        }
        if "loss_dino" in parts:
            out["loss_over_logk"] = float(parts["loss_dino"]) / math.log(q.shape[-1])
        if usage is None:
            usage = TeacherUsage(q.shape[-1], q.device)
            usage.add(q)
        out.update(usage.summary())
        return out

    def train(self, mode: bool = True) -> DINOMetaArch:
        """Train mode for the student only: the teacher never uses stochastic depth."""
        super().train(mode)
        self.teacher.eval()
        return self

    def update_teacher(self, momentum: float) -> None:
        ema_update(self.teacher, self.student, momentum)
