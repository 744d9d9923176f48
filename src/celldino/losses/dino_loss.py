"""DINO loss: cross-entropy between the centred, sharpened teacher and the student (torch only).

Caron et al. 2021. The teacher's outputs for the global crops are centred (a running mean of the
teacher outputs, the *centre*, is subtracted) and sharpened with a low temperature; the student's
outputs for every crop are compared with every teacher crop except the same view. The centre is
updated with momentum after each step and, under torch.distributed, averaged over all ranks.

`centering="sinkhorn_knopp"` replaces the running centre by DINOv2's Sinkhorn-Knopp
normalisation of the batch (Oquab et al. 2023, after SwAV): the teacher's assignments of the
batch's global crops are rescaled, a few times alternately, so that every prototype receives the
same total mass over the batch and every crop a distribution summing to one. The teacher can no
longer put most cells on a few prototypes (the "coarse partition" a running centre allows).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_reduce_sum(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum `x` over ranks (in place) when distributed; return it with the world size."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
        return x, dist.get_world_size()
    return x, 1


CENTERINGS = ("center", "sinkhorn_knopp")


def _logsumexp_over_ranks(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log(sum(exp(x))) along `dim`, summed over every rank's rows when distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.logsumexp(x, dim=dim, keepdim=True)
    if x.shape[dim] == 0:  # no rows here: contribute max -inf and sum 0 (amax fails on empty)
        shape = list(x.shape)
        shape[dim] = 1
        m = x.new_full(shape, -math.inf)
        s = x.new_zeros(shape)
    else:
        m = x.amax(dim=dim, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    if x.shape[dim] > 0:
        s = torch.exp(x - m).sum(dim=dim, keepdim=True)
    dist.all_reduce(s)
    return m + torch.log(s)


def _log_rows_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """log(number of rows of `x` summed over ranks), a 0-d tensor (no host sync).

    Ranks may hold different numbers of rows (iBOT's masked patches): B is their sum, not
    rows × world size (DINOv2 passes n_masked_patches_tensor all-reduced the same way).
    """
    n = torch.tensor(float(x.shape[0]), device=x.device, dtype=torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
    return torch.log(n)


@torch.no_grad()
def sinkhorn_knopp(teacher_out: torch.Tensor, teacher_temp: float, n_iterations: int = 3):
    """DINOv2's `sinkhorn_knopp_teacher`: (B, K) logits → (B, K) assignments, rows summing to 1.

    Q = exp(logits / T), then `n_iterations` times: each prototype's column (over every rank's
    batch) scaled to total 1/K, then each crop's row to 1/B; returned × B. Computed in the log
    domain (the same numbers): no overflow or 0/0 at low temperatures. B counts every rank's
    rows, which may differ between ranks; a rank with no rows takes part in the reductions and
    gets an empty (0, K) tensor back.
    """
    log_q = teacher_out.detach().float() / teacher_temp  # (B_local, K)
    K = log_q.shape[1]
    log_b = _log_rows_over_ranks(log_q)  # log B, B = rows over every rank
    for _ in range(n_iterations):
        log_q = log_q - _logsumexp_over_ranks(log_q, 0) - math.log(K)  # prototypes: 1/K each
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_b  # crops: 1/B
    return torch.exp(log_q + log_b)


class DINOLoss(nn.Module):
    """Multi-crop DINO loss with teacher centring.

    forward(student_out (n_crops*B, K), teacher_out (n_global*B, K), teacher_temp) -> scalar.
    Crops are stacked crop-major: rows [c*B:(c+1)*B] hold crop c of every image; the first
    `n_global` student crops are the global crops seen by the teacher.
    """

    def __init__(
        self,
        out_dim: int,
        *,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
    ) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering={centering!r}: one of {', '.join(CENTERINGS)}")
        self.centering = centering
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # (1, K)

    def teacher_probs(
        self, teacher_out: torch.Tensor, teacher_temp: float, center: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Centred, sharpened teacher distribution (no gradient): (n_global*B, K).

        `center` (1, K) replaces the running centre, e.g. the one a past loss call used. With
        Sinkhorn-Knopp centring the rows are normalised together (all global crops of the batch)
        and no centre is used.
        """
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_out, teacher_temp)
        c = self.center if center is None else center
        return F.softmax((teacher_out.detach().float() - c) / teacher_temp, dim=-1)

    def forward(
        self,
        student_out: torch.Tensor,  # (n_crops*B, K)
        teacher_out: torch.Tensor,  # (n_global*B, K)
        teacher_temp: float,
        *,
        n_global: int = 2,
        update_center: bool = True,
        teacher_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`teacher_probs`: `self.teacher_probs(teacher_out, teacher_temp)` when the caller has
        computed it already (the training step keeps it for its diagnostics)."""
        n_crops = student_out.shape[0] * n_global // teacher_out.shape[0]
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        s_chunks = student_logp.chunk(n_crops)  # n_crops x (B, K)
        if teacher_probs is None:
            teacher_probs = self.teacher_probs(teacher_out, teacher_temp)
        t_chunks = teacher_probs.chunk(n_global)
        total = student_out.new_zeros((), dtype=torch.float32)
        n_terms = 0
        for iq, q in enumerate(t_chunks):
            for v, logp in enumerate(s_chunks):
                if v == iq:  # the same view: skipped
                    continue
                total = total + torch.sum(-q * logp, dim=-1).mean()
                n_terms += 1
        if n_terms == 0:
            raise ValueError("DINO loss needs at least two crops (2 global, or 1 global + locals)")
        if update_center and self.centering == "center":
            self.update_center(teacher_out)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """center ← m·center + (1−m)·mean(teacher_out) over every rank's batch."""
        batch_sum = teacher_out.detach().float().sum(dim=0, keepdim=True)  # (1, K)
        batch_sum, world = _all_reduce_sum(batch_sum)
        batch_center = batch_sum / (teacher_out.shape[0] * world)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
