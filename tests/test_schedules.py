"""Schedules against closed-form values."""

from __future__ import annotations

import math

import pytest

from celldino.train import schedules as S


def test_cosine_lr_warmup_then_cosine():
    kw = dict(base_lr=1e-3, min_lr=1e-5, total_steps=110, warmup_steps=10)
    assert S.learning_rate(0, **kw) == 0.0
    assert S.learning_rate(5, **kw) == pytest.approx(5e-4)
    assert S.learning_rate(10, **kw) == pytest.approx(1e-3)  # warm-up ends at base
    # halfway through the cosine: the mean of base and final
    assert S.learning_rate(60, **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    t = 73 - 10
    want = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 100))
    assert S.learning_rate(73, **kw) == pytest.approx(want)
    assert S.learning_rate(110, **kw) == pytest.approx(1e-5)
    assert S.learning_rate(500, **kw) == pytest.approx(1e-5)  # clamped after the end
    values = [S.learning_rate(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_weight_decay_and_momentum():
    assert S.weight_decay(0, base=0.04, final=0.4, total_steps=100) == pytest.approx(0.04)
    assert S.weight_decay(50, base=0.04, final=0.4, total_steps=100) == pytest.approx(0.22)
    assert S.weight_decay(100, base=0.04, final=0.4, total_steps=100) == pytest.approx(0.4)
    assert S.teacher_momentum(0, base=0.996, total_steps=40) == pytest.approx(0.996)
    assert S.teacher_momentum(10, base=0.996, total_steps=40) == pytest.approx(
        1 - 0.5 * 0.004 * (1 + math.cos(math.pi / 4))
    )
    assert S.teacher_momentum(40, base=0.996, total_steps=40) == pytest.approx(1.0)


def test_teacher_temperature_warmup():
    kw = dict(warmup_temp=0.04, temp=0.07, warmup_steps=30)
    assert S.teacher_temperature(0, **kw) == pytest.approx(0.04)
    assert S.teacher_temperature(10, **kw) == pytest.approx(0.05)
    assert S.teacher_temperature(30, **kw) == pytest.approx(0.07)
    assert S.teacher_temperature(1000, **kw) == pytest.approx(0.07)
    assert S.teacher_temperature(3, warmup_temp=0.04, temp=0.07, warmup_steps=0) == 0.07


def test_lr_scaling_rule():
    assert S.scaled_lr(5e-4, 256) == pytest.approx(5e-4)
    assert S.scaled_lr(5e-4, 64) == pytest.approx(1.25e-4)
    assert S.scaled_lr(5e-4, 1024) == pytest.approx(2e-3)


def test_schedules_are_pure():
    kw = dict(base_lr=1.0, min_lr=0.0, total_steps=20, warmup_steps=4)
    assert [S.learning_rate(s, **kw) for s in (7, 3, 7)][0] == S.learning_rate(7, **kw)
    with pytest.raises(ValueError, match="step"):
        S.learning_rate(-1, **kw)
