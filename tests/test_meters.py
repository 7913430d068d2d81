"""AverageMeter weighting and EarlyStopping behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from dltemplate.engine.early_stopping import EarlyStopping
from dltemplate.engine.meters import AverageMeter


def test_average_meter_weighs_batches_by_size():
    gen = torch.Generator().manual_seed(3)
    per_sample = torch.rand(70, generator=gen, dtype=torch.float64) * 10
    meter = AverageMeter()
    for start in range(0, 70, 32):  # batches of 32, 32, 6
        chunk = per_sample[start : start + 32]
        meter.update(chunk.mean(), len(chunk))
    assert meter.avg == pytest.approx(float(per_sample.mean()), rel=1e-12)
    # the naive mean of batch means would be skewed by the short last batch
    naive = sum(float(per_sample[s : s + 32].mean()) for s in range(0, 70, 32)) / 3
    assert abs(naive - meter.avg) > 1e-6


def test_average_meter_floats_state_and_reset():
    meter = AverageMeter()
    assert meter.avg == 0.0  # before any update
    meter.update(2.0, n=3)
    meter.update(torch.tensor(4.0, requires_grad=True) * 1, n=1)  # a loss still in the graph
    assert meter.avg == pytest.approx((2.0 * 3 + 4.0) / 4)
    total, count = meter.state()
    assert float(total) == pytest.approx(10.0)
    assert float(count) == 4
    meter.reset()
    assert meter.avg == 0.0


def test_average_meter_state_sums_across_processes():
    a, b, whole = AverageMeter(), AverageMeter(), AverageMeter()
    for value, n in [(1.0, 10), (3.0, 2)]:
        a.update(value, n)
        whole.update(value, n)
    for value, n in [(5.0, 7)]:
        b.update(value, n)
        whole.update(value, n)
    for mine, theirs in zip(a.state(), b.state()):
        mine.add_(theirs)
    assert a.avg == pytest.approx(whole.avg)


def test_early_stopping_max_mode_with_patience():
    es = EarlyStopping(mode="max", patience=2)
    assert es.update(0.5) is True
    assert es.update(0.6) is True
    assert es.best == 0.6
    assert es.update(0.6) is False  # equal is no improvement
    assert not es.should_stop
    assert es.update(0.55) is False
    assert es.should_stop
    assert es.best == 0.6


def test_early_stopping_min_mode_and_improvement_resets_count():
    es = EarlyStopping(mode="min", patience=2)
    assert es.update(1.0)
    assert not es.update(1.5)
    assert es.bad_epochs == 1
    assert es.update(0.9)  # lower is better: resets the count
    assert es.bad_epochs == 0 and not es.should_stop
    assert not es.update(0.95)
    assert not es.update(2.0)
    assert es.should_stop
    assert es.best == 0.9


def test_early_stopping_min_delta():
    es = EarlyStopping(mode="max", patience=3, min_delta=0.1)
    es.update(0.5)
    assert not es.update(0.55)  # within min_delta: not an improvement
    assert not es.update(0.6)  # exactly min_delta: not more than it
    assert es.update(0.65)
    assert es.best == 0.65

    es = EarlyStopping(mode="min", patience=1, min_delta=-0.1)  # sign does not matter
    es.update(1.0)
    assert not es.update(0.95)
    assert es.should_stop
    assert es.update(0.85)


def test_early_stopping_patience_none_never_stops():
    es = EarlyStopping(mode="max", patience=None)
    es.update(1.0)
    for _ in range(100):
        assert not es.update(0.0)
    assert es.bad_epochs == 100
    assert not es.should_stop
    assert es.best == 1.0


def test_early_stopping_nan_never_becomes_best():
    es = EarlyStopping(mode="min", patience=5)
    assert not es.update(math.nan)
    assert es.best is None
    assert es.update(3.0)
    assert not es.update(math.nan)
    assert es.best == 3.0


def test_early_stopping_state_dict_round_trip():
    es = EarlyStopping(mode="min", patience=3, min_delta=0.01)
    for score in [1.0, 0.8, 0.85, 0.9]:
        es.update(score)
    state = es.state_dict()
    assert state == {"best": 0.8, "bad_epochs": 2}

    restored = EarlyStopping(mode="min", patience=3, min_delta=0.01)
    restored.load_state_dict(state)
    assert restored.best == 0.8 and restored.bad_epochs == 2
    assert not restored.should_stop
    assert not restored.update(0.795)  # the restored count goes on: third bad epoch
    assert restored.should_stop


def test_early_stopping_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="maximum")
