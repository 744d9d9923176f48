"""Losses against hand computations (plain Python math on tiny tensors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from celldino.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss


def _softmax(row: list[float], temp: float) -> list[float]:
    m = max(v / temp for v in row)
    e = [math.exp(v / temp - m) for v in row]
    s = sum(e)
    return [x / s for x in e]


def _ce(q: list[float], s_row: list[float], s_temp: float) -> float:
    p = _softmax(s_row, s_temp)
    return -sum(qi * math.log(pi) for qi, pi in zip(q, p))


def test_dino_loss_matches_hand_computation():
    B, K, n_crops, n_global = 2, 3, 3, 2
    student = [
        [[0.1, 0.5, -0.2], [1.0, 0.0, 0.3]],  # crop 0 (global 1)
        [[0.3, -0.4, 0.9], [0.0, 0.2, 0.2]],  # crop 1 (global 2)
        [[-1.0, 0.6, 0.1], [0.7, 0.7, -0.5]],  # crop 2 (local)
    ]
    teacher = [
        [[0.2, 0.1, 0.0], [0.5, -0.5, 0.4]],
        [[0.9, 0.3, -0.3], [0.1, 0.1, 0.8]],
    ]
    center = [0.05, -0.1, 0.2]
    s_temp, t_temp, m = 0.1, 0.04, 0.9

    loss_fn = DINOLoss(K, student_temp=s_temp, center_momentum=m)
    loss_fn.center.copy_(torch.tensor([center]))
    s = torch.tensor([row for crop in student for row in crop])  # (n_crops*B, K)
    t = torch.tensor([row for crop in teacher for row in crop])  # (n_global*B, K)
    got = loss_fn(s, t, t_temp, n_global=n_global)

    total, terms = 0.0, 0
    for iq in range(n_global):
        for v in range(n_crops):
            if v == iq:
                continue
            per_image = []
            for b in range(B):
                q = _softmax([teacher[iq][b][k] - center[k] for k in range(K)], t_temp)
                per_image.append(_ce(q, student[v][b], s_temp))
            total += sum(per_image) / B
            terms += 1
    expected = total / terms
    assert terms == 4
    assert got.item() == pytest.approx(expected, rel=1e-5)

    # the centre moved by momentum towards the batch mean of the teacher outputs
    mean = [sum(teacher[c][b][k] for c in range(2) for b in range(B)) / 4 for k in range(K)]
    want_center = [m * center[k] + (1 - m) * mean[k] for k in range(K)]
    assert loss_fn.center[0].tolist() == pytest.approx(want_center, rel=1e-6)


def test_dino_loss_gradient_only_through_student():
    loss_fn = DINOLoss(4)
    s = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(4, 4, requires_grad=True)
    loss_fn(s, t, 0.04).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_ibot_loss_matches_hand_computation():
    K, s_temp, t_temp = 3, 0.1, 0.07
    # image 0 has two masked patches, image 1 one
    student = [[0.2, 0.0, -0.1], [0.5, 0.4, 0.3], [-0.3, 0.9, 0.0]]
    teacher = [[0.1, 0.3, 0.0], [0.0, -0.2, 0.6], [0.4, 0.4, 0.1]]
    owner = [0, 0, 1]
    loss_fn = iBOTPatchLoss(K, student_temp=s_temp, center_momentum=0.5)
    weight = torch.tensor([0.5, 0.5, 1.0])
    got = loss_fn(torch.tensor(student), torch.tensor(teacher), weight, t_temp, n_images=2)
    per_image = {0: [], 1: []}
    for i in range(3):
        q = _softmax(teacher[i], t_temp)  # centre starts at zero
        per_image[owner[i]].append(_ce(q, student[i], s_temp))
    expected = sum(sum(v) / len(v) for v in per_image.values()) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)
    mean = [sum(teacher[i][k] for i in range(3)) / 3 for k in range(K)]
    assert loss_fn.center[0].tolist() == pytest.approx([0.5 * v for v in mean], rel=1e-6)


def test_koleo_matches_hand_computation():
    pts = [[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.1]]
    unit = [[x / math.hypot(x, y), y / math.hypot(x, y)] for x, y in pts]
    logs = []
    for i, a in enumerate(unit):
        d = min(math.dist(a, b) for j, b in enumerate(unit) if j != i)
        logs.append(math.log(d + 1e-8))
    expected = -sum(logs) / len(logs)
    got = KoLeoLoss()(torch.tensor(pts))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # a collapsed batch is punished far more than a spread one
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 1e-4], [1.0, -1e-4]])
    assert KoLeoLoss()(collapsed) > got + 5


def _dinov2_sinkhorn_numpy(t: np.ndarray, temp: float, n_iterations: int = 3) -> np.ndarray:
    """DINOv2's sinkhorn_knopp_teacher (dinov2/loss/dino_clstoken_loss.py), one rank, float64,
    as written there (celldino computes the same in the log domain)."""
    Q = np.exp(t / temp).T  # (K, B)
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(n_iterations):
        Q = Q / Q.sum(axis=1, keepdims=True) / K
        Q = Q / Q.sum(axis=0, keepdims=True) / B
    return (Q * B).T


def test_sinkhorn_knopp_matches_dinov2_and_balances_prototypes():
    from celldino.losses.dino_loss import sinkhorn_knopp

    g = torch.Generator().manual_seed(0)
    t = torch.randn(12, 5, generator=g, dtype=torch.float64)
    t[:, 0] += 2.0  # every crop prefers prototype 0: a plain softmax piles them there
    got = sinkhorn_knopp(t, 0.5).double().numpy()
    want = _dinov2_sinkhorn_numpy(t.numpy(), 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)  # each crop: a distribution
    # prototype 0 keeps about its fair share B/K of the mass (softmax alone gives it most)
    plain = torch.softmax(t / 0.5, dim=-1).numpy()
    assert plain[:, 0].sum() > 0.5 * 12
    assert abs(got[:, 0].sum() - 12 / 5) < 0.2 * 12 / 5
    # far-apart logits at a low temperature: exp() alone would give inf or 0/0
    sharp = sinkhorn_knopp(t.float() * 100, 0.04)
    assert torch.isfinite(sharp).all()


def test_dino_loss_sinkhorn_uses_no_centre():
    torch.manual_seed(0)
    loss = DINOLoss(4, centering="sinkhorn_knopp")
    s, t = torch.randn(8, 4), torch.randn(4, 4)
    from celldino.losses.dino_loss import sinkhorn_knopp

    q = sinkhorn_knopp(t, 0.04).chunk(2)
    logp = torch.log_softmax(s / 0.1, dim=-1).chunk(4)
    want = (
        sum(torch.sum(-q[i] * logp[v], dim=-1).mean() for i in range(2) for v in range(4) if v != i)
        / 6
    )
    got = loss(s, t, 0.04)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(loss.center, torch.zeros(1, 4))  # never moved
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(4, centering="sinkhorn")


def test_sinkhorn_knopp_with_no_rows_is_empty():
    from celldino.losses.dino_loss import sinkhorn_knopp

    assert sinkhorn_knopp(torch.zeros(0, 5), 0.04).shape == (0, 5)
    for centering in ("sinkhorn_knopp", "center"):  # a batch without masked patches: loss 0
        student = torch.zeros(0, 5, requires_grad=True)
        loss = iBOTPatchLoss(5, centering=centering)
        got = loss(student, torch.zeros(0, 5), torch.zeros(0), 0.04, n_images=4)
        assert got.item() == 0.0
        got.backward()


def _sinkhorn_rank(rank: int, port: int, rows: list[int], out: str) -> None:
    import torch.distributed as dist

    from celldino.losses.dino_loss import sinkhorn_knopp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        t = torch.randn(sum(rows), 5, generator=torch.Generator().manual_seed(0))
        t[:, 0] += 2.0
        start = sum(rows[:rank])
        torch.save(sinkhorn_knopp(t[start : start + rows[rank]], 0.5), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("rows", [[4, 6], [0, 6]])
def test_sinkhorn_knopp_over_ranks_with_unequal_rows_matches_one_process(tmp_path, rows):
    """iBOT's masked patches differ per rank: B is the rows of every rank, not rows × world."""
    import socket

    import torch.multiprocessing as mp

    from celldino.losses.dino_loss import sinkhorn_knopp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "q")
    mp.spawn(_sinkhorn_rank, args=(port, rows, out), nprocs=2, join=True)
    got = torch.cat([torch.load(f"{out}.{r}") for r in (0, 1)])
    t = torch.randn(sum(rows), 5, generator=torch.Generator().manual_seed(0))
    t[:, 0] += 2.0
    want = _dinov2_sinkhorn_numpy(t.double().numpy(), 0.5)  # one process, every row
    assert got.shape == (sum(rows), 5)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, sinkhorn_knopp(t, 0.5))
