"""Training diagnostics (celldino.diagnostics, DINOMetaArch.diagnostics), the verdicts, the
probes (celldino.probes) and the training monitor, against independent computations."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from celldino import diagnostics as D
from celldino.losses import DINOLoss
from celldino.probes import (
    knn_predict,
    linear_predict,
    probe_folds,
    probe_scores,
    stratified_sample,
)
from celldino.train.meta_arch import DINOMetaArch, TeacherUsage, effective_rank
from train_helpers import one_thread, tiny_config, write_prep  # noqa: F401

K = 512
LOGK = math.log(K)


# ---- the verdicts, hand-made cases ---------------------------------------------------------
def _verdict(**kw):
    return D.training_verdict(out_dim=K, **kw)


def test_verdict_uniform_teacher_is_collapse():
    v = _verdict(
        teacher_entropy=0.999 * LOGK,
        mean_teacher_entropy=0.9999 * LOGK,
        loss_over_logk=1.0002,
        prototypes_used=300,
        prototype_top_share=0.01,
        teacher_samples=4000,
        effective_rank=30.0,
        embedding_std=0.8,
    )
    assert v.kind == "collapsed_uniform" and v.collapsed and "COLLAPSED" in v.message


def test_verdict_one_prototype_is_collapse():
    for used, top in ((1, 1.0), (3, 0.97)):
        v = _verdict(
            teacher_entropy=0.01,
            mean_teacher_entropy=0.1,
            loss_over_logk=0.2,
            prototypes_used=used,
            prototype_top_share=top,
            teacher_samples=4000,
            effective_rank=30.0,
            embedding_std=0.8,
        )
        assert v.kind == "collapsed_one_prototype" and v.collapsed, (used, top)


def test_verdict_rank_one_features_is_collapse():
    for rank, std in ((1.3, 0.5), (20.0, 0.01)):
        v = _verdict(
            teacher_entropy=2.0,
            mean_teacher_entropy=5.0,
            loss_over_logk=0.7,
            prototypes_used=200,
            prototype_top_share=0.05,
            effective_rank=rank,
            embedding_std=std,
        )
        assert v.kind == "collapsed_features" and v.collapsed, (rank, std)


def test_verdict_coarse_partition_is_not_collapse():
    # the audit's demo run: 6 of 512 prototypes, one with 40 %, sharp teacher, spread backbone
    v = _verdict(
        teacher_entropy=0.2,
        mean_teacher_entropy=1.4,
        loss_over_logk=0.45,
        prototypes_used=6,
        prototype_top_share=0.4,
        teacher_samples=3435,
        effective_rank=53.0,
        embedding_std=0.94,
    )
    assert v.kind == "coarse_partition" and v.warn and not v.collapsed
    assert "COLLAPSED" not in v.message
    assert "sinkhorn_knopp" in v.message and "model.out_dim" in v.message
    assert "n_local_crops" in v.message
    # top share alone (> 0.3) with enough prototypes used
    v = _verdict(prototypes_used=100, prototype_top_share=0.35, teacher_samples=3435)
    assert v.kind == "coarse_partition"
    # few prototypes, but only 40 cells sampled: 5 of min(512, 40) is not coarse
    v = _verdict(prototypes_used=5, prototype_top_share=0.25, teacher_samples=40)
    assert v.kind == "healthy"


def test_verdict_does_not_judge_shares_on_a_small_sample():
    """16 teacher distributions (a one-step log interval of batch 8) put most cells on a few
    prototypes by chance: neither collapse nor coarse partition, but the sentence says why."""
    spread = dict(effective_rank=30.0, embedding_std=0.8, teacher_entropy=0.2)
    for used, top in ((1, 1.0), (2, 0.9), (5, 0.4)):
        v = _verdict(prototypes_used=used, prototype_top_share=top, teacher_samples=16, **spread)
        assert v.kind == "healthy" and not v.collapsed, (used, top)
        assert "not judged" in v.message and "16 teacher distributions" in v.message
        assert "too small" in v.message
    # from MIN_SHARE_SAMPLES on, the rules apply
    n = D.MIN_SHARE_SAMPLES
    v = _verdict(prototypes_used=1, prototype_top_share=1.0, teacher_samples=n, **spread)
    assert v.kind == "collapsed_one_prototype"
    v = _verdict(prototypes_used=5, prototype_top_share=0.4, teacher_samples=n - 1, **spread)
    assert v.kind == "healthy"


def test_verdict_advice_fits_the_centering():
    coarse = dict(prototypes_used=6, prototype_top_share=0.4, teacher_samples=3435)
    one = dict(prototypes_used=1, prototype_top_share=1.0, teacher_samples=3435)
    for kw, kind in ((coarse, "coarse_partition"), (one, "collapsed_one_prototype")):
        v = _verdict(**kw)  # the default: DINO's running centre
        assert v.kind == kind and "Try: train.centering=sinkhorn_knopp" in v.message
        v = _verdict(**kw, centering="sinkhorn_knopp")
        assert v.kind == kind
        assert "Try: train.centering" not in v.message and "center_momentum" not in v.message
        assert "already uses train.centering=sinkhorn_knopp" in v.message


def test_verdict_rank_rule_needs_enough_rows():
    """2 class tokens have rank at most 2: a rank of 1.8 from them is no collapse."""
    v = _verdict(effective_rank=1.8, embedding_std=0.8, rank_rows=2)
    assert v.kind == "healthy"
    v = _verdict(effective_rank=1.8, embedding_std=0.8, rank_rows=D.MIN_RANK_ROWS)
    assert v.kind == "collapsed_features"
    assert D.verdict_inputs({"rank_rows": 2, "effective_rank": 1.8})["rank_rows"] == 2.0


def test_verdict_not_learning_yet():
    # the audit's 2-epoch run: loss 5.548 vs log K 5.545, teacher at 97 % of max entropy
    v = _verdict(
        teacher_entropy=0.97 * LOGK,
        mean_teacher_entropy=0.995 * LOGK,
        loss_over_logk=5.548 / 5.545,
        prototypes_used=350,
        prototype_top_share=0.01,
        teacher_samples=3435,
        effective_rank=47.0,
        embedding_std=0.9,
    )
    assert v.kind == "not_learning" and v.warn and not v.collapsed
    assert "No sign of collapse" not in v.message and "not learning yet" in v.message


def test_verdict_healthy_sharp_teacher():
    # a low per-sample entropy (sharpening) with many prototypes used is healthy
    v = _verdict(
        teacher_entropy=0.2,
        mean_teacher_entropy=5.2,
        loss_over_logk=0.5,
        prototypes_used=300,
        prototype_top_share=0.02,
        teacher_samples=5000,
        effective_rank=45.0,
        embedding_std=0.9,
    )
    assert v.kind == "healthy" and not v.warn
    assert v.message.startswith("No sign of collapse") and "300 of 512" in v.message


# ---- the numbers, against numpy ------------------------------------------------------------
def test_effective_rank_matches_numpy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 6))
    s = np.linalg.svd(X, compute_uv=False)
    ps = s / s.sum()
    want = math.exp(-(ps * np.log(ps)).sum())
    assert effective_rank(torch.tensor(X)) == pytest.approx(want, rel=1e-9)
    # one direction: rank 1; an orthonormal set of 4 rows: rank 4
    assert effective_rank(torch.ones(10, 5)) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.eye(4) * 3) == pytest.approx(4.0)


def test_meta_arch_diagnostics_match_numpy():
    rng = np.random.default_rng(1)
    B2, k, d, temp = 12, 9, 5, 0.07
    steps = [
        {
            "teacher_head": torch.tensor(rng.normal(size=(B2, k)), dtype=torch.float32),
            "student_head": torch.tensor(rng.normal(size=(B2, k)), dtype=torch.float32),
            "teacher_cls": torch.tensor(rng.normal(size=(B2, d)), dtype=torch.float32),
            "center": torch.tensor(rng.normal(size=(1, k)) * 0.1, dtype=torch.float32),
            "loss_dino": torch.tensor(1.7),
        }
        for _ in range(3)
    ]
    loss = DINOLoss(k, student_temp=0.1)
    fake = SimpleNamespace(dino_loss=loss)
    usage = TeacherUsage(k)
    for parts in steps:  # the step keeps the targets it gave the loss
        parts["teacher_probs"] = loss.teacher_probs(parts["teacher_head"], temp, parts["center"])
        usage.add(parts["teacher_probs"])
    out = DINOMetaArch.diagnostics(fake, steps[-1], usage)

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    qs = [softmax((s["teacher_head"].double().numpy() - s["center"].double().numpy()) / temp)
          for s in steps]  # fmt: skip
    allq = np.concatenate(qs)
    counts = np.bincount(allq.argmax(1), minlength=k)
    mean_q = allq.mean(0)
    assert out["teacher_samples"] == 3 * B2
    assert out["prototypes_used"] == (counts > 0).sum()
    assert out["prototype_top_share"] == pytest.approx(counts.max() / counts.sum())
    assert out["mean_teacher_entropy"] == pytest.approx(-(mean_q * np.log(mean_q)).sum(), 1e-5)
    q = qs[-1]
    assert out["teacher_entropy"] == pytest.approx(
        -(q * np.log(np.maximum(q, 1e-12))).sum(1).mean(), rel=1e-4
    )
    assert out["loss_over_logk"] == pytest.approx(1.7 / math.log(k), rel=1e-6)
    X = steps[-1]["teacher_cls"].double().numpy()
    s = np.linalg.svd(X, compute_uv=False)
    assert out["effective_rank"] == pytest.approx(
        math.exp(-(s / s.sum() * np.log(s / s.sum())).sum())
    )
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert out["embedding_std"] == pytest.approx(Z.std(0, ddof=1).mean() * math.sqrt(d), rel=1e-4)
    # without an accumulator: this batch alone
    alone = DINOMetaArch.diagnostics(fake, steps[0])
    assert alone["teacher_samples"] == B2
    assert alone["prototypes_used"] == len(set(qs[0].argmax(1)))
    usage.reset()
    assert usage.summary() == {}


# ---- the probes ------------------------------------------------------------------------------
def test_knn_predict_matches_a_brute_force_vote():
    rng = np.random.default_rng(2)
    Xtr, Xte = rng.normal(size=(40, 6)), rng.normal(size=(15, 6))
    ytr = np.array(list("abc") * 13 + ["a"])
    got = knn_predict(Xtr, ytr, Xte, k=20, temperature=0.07)
    for i, x in enumerate(Xte):
        sims = np.array([x @ t / np.linalg.norm(x) / np.linalg.norm(t) for t in Xtr])
        top = np.argsort(-sims)[:20]
        votes = {}
        for j in top:
            votes[ytr[j]] = votes.get(ytr[j], 0.0) + math.exp(sims[j] / 0.07)
        assert got[i] == max(votes, key=votes.get)


def test_linear_predict_matches_sklearn_pipeline():
    rng = np.random.default_rng(3)
    Xtr = rng.normal(size=(60, 4)) * [1, 10, 100, 0.1]
    ytr = np.where(Xtr[:, 0] + Xtr[:, 1] / 10 > 0, "x", "y")
    Xte = rng.normal(size=(20, 4)) * [1, 10, 100, 0.1]
    sc = StandardScaler().fit(Xtr)
    want = (
        LogisticRegression(max_iter=5000, class_weight="balanced", random_state=0)
        .fit(sc.transform(Xtr), ytr)
        .predict(sc.transform(Xte))
    )
    got, converged = linear_predict(Xtr, ytr, Xte)
    assert list(got) == list(want) and converged
    _, converged = linear_predict(Xtr, ytr, Xte, max_iter=1)
    assert not converged


def test_probe_folds_and_scores():
    y = np.array(["a", "b"] * 6)
    plates = np.array(["P1"] * 4 + ["P2"] * 4 + ["P3"] * 4)
    folds, split = probe_folds(y, plates)
    assert split == "leave-one-plate-out" and len(folds) == 3
    for tr, te in folds:
        assert len(set(plates[te])) == 1 and set(plates[te]).isdisjoint(plates[tr])
    folds, split = probe_folds(y, ["P1"] * 12)
    assert split == "half" and len(folds) == 1
    tr, te = folds[0]
    assert sorted(np.concatenate([tr, te])) == list(range(12))
    assert list(np.unique(y[te], return_counts=True)[1]) == [3, 3]  # each label halved
    # separable labels: both probes perfect
    rng = np.random.default_rng(4)
    X = rng.normal(size=(12, 3)) * 0.1 + np.where(y == "a", 1.0, -1.0)[:, None]
    out = probe_scores(X, y, plates)
    assert out["knn20_f1"] == out["linear_f1"] == 1.0 and out["n_cells"] == 12
    # random features: the mean over held-out plates of sklearn's macro-F1 of each plate; both
    # probes on features z-scored with the training plates (as eval's cell_probe)
    X = rng.normal(size=(12, 3)) * [1, 10, 100]
    out = probe_scores(X, y, plates)
    want_knn, want_lin = [], []
    for p in ("P1", "P2", "P3"):
        tr, te = plates != p, plates == p
        sc = StandardScaler().fit(X[tr])
        Ztr, Zte = sc.transform(X[tr]), sc.transform(X[te])
        want_knn.append(f1_score(y[te], knn_predict(Ztr, y[tr], Zte), average="macro"))
        lr = LogisticRegression(max_iter=5000, class_weight="balanced", random_state=0)
        want_lin.append(f1_score(y[te], lr.fit(Ztr, y[tr]).predict(Zte), average="macro"))
    assert out["knn20_f1"] == pytest.approx(np.mean(want_knn))
    assert out["linear_f1"] == pytest.approx(np.mean(want_lin))


def test_stratified_sample_is_proportional_and_fixed():
    strata = np.array(["a"] * 600 + ["b"] * 300 + ["c"] * 100)
    pick = stratified_sample(strata, 100, seed=0)
    assert len(pick) == 100 and len(set(pick)) == 100
    counts = {s: int((strata[pick] == s).sum()) for s in "abc"}
    assert counts == {"a": 60, "b": 30, "c": 10}
    assert list(pick) == list(stratified_sample(strata, 100, seed=0))
    assert list(pick) != list(stratified_sample(strata, 100, seed=1))
    assert list(stratified_sample(strata[:5], 100)) == [0, 1, 2, 3, 4]
    # every stratum keeps a row, and the one-row minimums do not push the sample past the cap
    tail = np.array(["a"] * 991 + list("bcdefghij"))
    assert len(stratified_sample(tail, 10)) == 10 and set(tail[stratified_sample(tail, 10)]) == set(
        tail
    )
    # a full stratum with the largest remainder: its leftover row goes to a stratum with room
    small = np.array(["a"] + ["b"] * 10 + ["c"] * 10)  # quotas 0.95, 9.52, 9.52 of cap 20
    pick = stratified_sample(small, 20)
    assert len(pick) == len(set(pick)) == 20
    assert sorted(int((small[pick] == s).sum()) for s in "abc") == [1, 9, 10]
    rng = np.random.default_rng(0)
    for _ in range(200):  # exactly cap rows whenever there are more rows and few strata
        sizes = rng.integers(1, 12, size=rng.integers(2, 6))
        strata = np.repeat(np.arange(len(sizes)), sizes)
        cap = int(rng.integers(len(sizes), len(strata) + 1))
        pick = stratified_sample(strata, cap)
        assert len(set(pick)) == len(pick) == min(cap, len(strata)), (sizes, cap)


# ---- the loop: diagnostics in metrics.jsonl and the probe monitor ---------------------------
def _labelled_prep(path, n=16):
    rng = np.random.default_rng(0)
    crops = rng.random((n, 2, 16, 16), dtype=np.float32)
    meta = pd.DataFrame(
        {
            "Metadata_CellID": [f"c{i}" for i in range(n)],
            "Metadata_Plate": ["P1", "P2"] * (n // 2),
            "Metadata_MoA": [["m0", "m1", None, "m2"][i % 4] for i in range(n)],
            "Metadata_pert_type": ["control" if i in (1, 3) else "trt" for i in range(n)],
        }
    )
    meta.loc[meta.Metadata_pert_type == "control", "Metadata_MoA"] = "DMSO"
    return write_prep(path, crops, meta), crops, meta


def test_training_logs_diagnostics_and_monitor(tmp_path, monkeypatch):
    from celldino.models.build import build_model
    from celldino.train import loop, train

    judged = []

    def verdict(**kw):
        judged.append(kw)
        return D.training_verdict(**kw)

    monkeypatch.setattr(loop, "training_verdict", verdict)

    prep, crops, meta = _labelled_prep(tmp_path / "prep")
    cfg = tiny_config(
        tmp_path / "run",
        "train.log_every=2",
        "train.monitor_label=Metadata_MoA",
        "train.monitor_cells=10",
        data=prep,
    )
    train(cfg)
    assert judged and all(kw["centering"] == cfg.train.centering for kw in judged)
    assert all(kw["rank_rows"] == 8 for kw in judged)  # the loop's verdict sees the rows
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    probes = [r for r in lines if "monitor_knn20_f1" in r]
    # 16 cells, batch 4: 4 steps per epoch, 2 epochs; probes at step 0 and each epoch end
    assert [r["step"] for r in probes] == [0, 4, 8] and [r["epoch"] for r in probes] == [0, 1, 2]
    assert [r["step"] for r in steps] == [2, 4, 6, 8]
    for r in steps:
        # 2 global crops x batch 4 x 2 steps of the log interval
        assert r["teacher_samples"] == 16
        assert 1 <= r["prototypes_used"] <= 16
        assert r["prototype_top_share"] >= 1 / r["prototypes_used"]
        assert 0 <= r["mean_teacher_entropy"] <= math.log(32) + 1e-6
        assert r["loss_over_logk"] == pytest.approx(r["loss_dino"] / math.log(32))
        assert 1 <= r["effective_rank"] <= 8 + 1e-6  # 8 class tokens in the batch
        assert r["rank_rows"] == 8
    for r in probes:
        assert r["monitor_cells"] == 10 and r["monitor_split"] == "leave-one-plate-out"
        assert r["monitor_labels"] == 3  # the controls (DMSO) are left out, as by cell_probe
        assert isinstance(r["monitor_linear_converged"], bool)
        assert 0 <= r["monitor_knn20_f1"] <= 1 and 0 <= r["monitor_linear_f1"] <= 1
    # step 0 = the random init: the same sample embedded independently gives the same scores
    treated = (meta["Metadata_pert_type"] != "control").to_numpy()
    labelled = np.flatnonzero(meta["Metadata_MoA"].notna().to_numpy() & treated)
    strata = [
        f"{p}\x1f{m}" for p, m in meta.iloc[labelled][["Metadata_Plate", "Metadata_MoA"]].values
    ]
    rows = labelled[stratified_sample(strata, 10, seed=cfg.train.seed)]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        X = model(torch.from_numpy(crops[rows]))["cls"].numpy()
    want = probe_scores(
        X, meta["Metadata_MoA"].to_numpy()[rows], meta["Metadata_Plate"].to_numpy()[rows]
    )
    assert probes[0]["monitor_knn20_f1"] == pytest.approx(want["knn20_f1"])
    assert probes[0]["monitor_linear_f1"] == pytest.approx(want["linear_f1"])


def test_monitor_label_must_be_a_column(tmp_path):
    from celldino.config import ConfigError
    from celldino.train import train

    prep, _, _ = _labelled_prep(tmp_path / "prep")
    cfg = tiny_config(tmp_path / "run", "train.monitor_label=Metadata_Nope", data=prep)
    with pytest.raises(ConfigError, match="Metadata_Nope.*Metadata_MoA"):
        train(cfg)
    assert not (tmp_path / "run/config.yaml").exists()


# ---- the report's training section -------------------------------------------------------------
def _run_with_metrics(root, records, out_dim=512, label="Metadata_MoA"):
    from celldino.io.runlayout import RunLayout

    lay = RunLayout(root)
    lay.train_metrics.parent.mkdir(parents=True, exist_ok=True)
    lay.train_metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    lay.train_config.write_text(f"model:\n  out_dim: {out_dim}\ntrain:\n  monitor_label: {label}\n")
    return root


def test_report_training_section_says_coarse_partition_and_shows_the_probe_curve(tmp_path):
    import html as H

    from celldino.report.sections import section_training

    step = lambda s, **kw: {"step": s, "epoch": s / 10, "loss": 3.0, "lr": 1e-4, **kw}  # noqa: E731
    audit = dict(
        loss_dino=2.5,
        loss_over_logk=2.5 / LOGK,
        prototypes_used=6,
        prototype_top_share=0.41,
        teacher_samples=3435,
        mean_teacher_entropy=1.4,
        teacher_entropy=0.2,
        effective_rank=53.0,
        embedding_std=0.94,
    )
    probe = lambda s, k, lin: {  # noqa: E731
        "step": s,
        "epoch": s / 10,
        "monitor_knn20_f1": k,
        "monitor_linear_f1": lin,
        "monitor_cells": 2000,
        "monitor_split": "leave-one-plate-out",
    }
    records = [probe(0, 0.31, 0.35), step(10, **audit), probe(10, 0.42, 0.47), step(20, **audit)]
    page = H.unescape(section_training(_run_with_metrics(tmp_path, records)).html())
    assert "coarse partition (not a collapse): 6 of 512 prototypes used (top one 41%)" in page
    assert "COLLAPSED" not in page and "No sign of collapse" not in page
    assert "sharpens the teacher" in page  # the per-sample entropy's meaning
    assert page.count("<img") == 2  # the curves and the probe learning curve
    assert "<th>prototypes_used</th><td>6</td>" in page.replace("\n", "")
    assert "0.420" in page and "0.470" in page and "leave-one-plate-out" in page


def test_report_training_section_judges_the_last_record_with_enough_samples(tmp_path):
    """The last log interval can be one step (16 distributions): the verdict comes from the
    last record with enough teacher samples, with advice for the run's centering."""
    import html as H

    from celldino.io.runlayout import RunLayout
    from celldino.report.sections import section_training

    step = lambda s, **kw: {"step": s, "epoch": s / 10, "loss": 3.0, "lr": 1e-4, **kw}  # noqa: E731
    common = dict(loss_dino=2.5, teacher_entropy=0.2, effective_rank=53.0, embedding_std=0.94)
    coarse = dict(prototypes_used=6, prototype_top_share=0.41, teacher_samples=3435)
    tail = dict(prototypes_used=12, prototype_top_share=0.1, teacher_samples=16)
    records = [step(10, **common, **coarse), step(11, **common, **tail)]
    run = _run_with_metrics(tmp_path / "a", records)
    page = H.unescape(section_training(run).html())
    assert "coarse partition (not a collapse): 6 of 512" in page
    assert "judged at step 10" in page and "No sign of collapse" not in page
    assert "Try: train.centering=sinkhorn_knopp" in page
    # a run on sinkhorn_knopp (config.yaml) is not told to switch to it
    run = _run_with_metrics(tmp_path / "b", records)
    cfg = RunLayout(run).train_config
    cfg.write_text(cfg.read_text() + "  centering: sinkhorn_knopp\n")
    page = H.unescape(section_training(run).html())
    assert "coarse partition" in page and "Try: train.centering" not in page
    assert "already uses train.centering=sinkhorn_knopp" in page


def test_report_training_section_on_an_old_run_and_a_flat_loss(tmp_path):
    import html as H

    from celldino.report.sections import section_training

    # an old run's metrics (no usage numbers): a sharp teacher is not called a collapse
    old = [{"step": 10, "epoch": 1.0, "loss": 3.0, "loss_dino": 3.0, "teacher_entropy": 0.2,
            "embedding_std": 0.94}]  # fmt: skip
    page = H.unescape(section_training(_run_with_metrics(tmp_path / "a", old)).html())
    assert "No sign of collapse" in page and "COLLAPSED" not in page
    # the audit's 2-epoch run: loss at log K, teacher at 97 % of max entropy (loss / log K
    # computed from loss_dino when not logged)
    flat = [{"step": 10, "epoch": 2.0, "loss": 5.548, "loss_dino": 5.548,
             "teacher_entropy": 0.97 * math.log(256), "embedding_std": 0.9}]  # fmt: skip
    run = _run_with_metrics(tmp_path / "b", flat, out_dim=256)  # log 256 = 5.545
    page = H.unescape(section_training(run).html())
    assert "not learning yet" in page and "No sign of collapse" not in page
    assert page.count("<img") == 1  # no probe records: no learning curve


def test_labelled_rows_drops_blank_and_control_rows_of_read_only_arrays():
    from celldino.probes import labelled_rows

    labels = pd.Series(["a", None, " ", "b", "c"])
    controls = np.array([False, False, False, True, False])
    controls.flags.writeable = False  # as pandas hands back some columns
    keep = labelled_rows(labels, controls)
    assert keep.tolist() == [True, False, False, False, True]
