"""Schedules against closed-form formulas written independently of dsv3.train.schedules."""
from __future__ import annotations

import math

import pytest

from dsv3.train.config import TrainConfig
from dsv3.train.schedules import BatchRamp, bias_gamma_at, lr_at, mtp_lambda_at


def reference_lr(s, peak, low, warm, start, end):
    """The paper's shape, from its definition: warmup, constant, half-cosine, tail."""
    if s < warm:
        return peak * (s + 1) / warm
    if s < start:
        return peak
    if s < end:
        return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * (s - start) / (end - start)))
    return low


def test_lr_matches_closed_form_everywhere():
    t = TrainConfig(steps=1000, lr=3e-4, min_lr_ratio=0.1, warmup_steps=50, decay_start=0.6, decay_end=0.9)
    for s in range(1000):
        assert lr_at(s, t) == pytest.approx(reference_lr(s, 3e-4, 3e-5, 50, 600, 900), rel=1e-12)
    # landmarks: the first step, end of warmup, middle of the decay, the tail
    assert lr_at(0, t) == pytest.approx(3e-4 / 50)
    assert lr_at(49, t) == pytest.approx(3e-4)
    assert lr_at(750, t) == pytest.approx(3e-5 + 0.5 * 2.7e-4)
    assert lr_at(999, t) == pytest.approx(3e-5)


def test_lr_no_decay_is_constant_after_warmup():
    t = TrainConfig(steps=100, lr=1e-3, warmup_steps=0, decay_start=1.0, decay_end=1.0)
    assert {lr_at(s, t) for s in range(100)} == {1e-3}


def test_mtp_lambda_and_gamma_switch_at_fractions():
    t = TrainConfig(steps=200, mtp_lambda=0.3, mtp_lambda_late=0.1, mtp_lambda_switch=0.7,
                    bias_gamma=0.001, bias_gamma_off=0.95)
    assert [mtp_lambda_at(s, t) for s in (0, 139, 140, 199)] == [0.3, 0.3, 0.1, 0.1]
    assert [bias_gamma_at(s, t) for s in (0, 189, 190, 199)] == [0.001, 0.001, 0.0, 0.0]


def test_batch_ramp_by_steps():
    t = TrainConfig(batch_size=32, batch_ramp_start=8, batch_ramp_steps=10, micro_batch_size=4, seq_len=16)
    ramp = BatchRamp(t, granularity=4)
    expect = [max(8, min(32, int(8 + 24 * min(1, s / 10)) // 4 * 4)) for s in range(15)]
    assert [ramp(s) for s in range(15)] == expect
    assert expect[0] == 8 and expect[-1] == 32
    assert ramp.tokens_before(5) == sum(expect[:5]) * 16


def test_batch_ramp_by_tokens():
    t = TrainConfig(batch_size=16, batch_ramp_start=4, batch_ramp_tokens=1000, seq_len=10)
    ramp = BatchRamp(t, granularity=2)
    seen, expect = 0, []
    for s in range(20):  # independent re-derivation: size from tokens seen before the step
        b = max(4, min(16, int(4 + 12 * min(1.0, seen / 1000)) // 2 * 2))
        expect.append(b)
        seen += b * 10
    assert [ramp(s) for s in range(20)] == expect
    assert expect[-1] == 16


def test_no_ramp_is_constant():
    ramp = BatchRamp(TrainConfig(batch_size=12), granularity=12)
    assert {ramp(s) for s in range(10)} == {12}
