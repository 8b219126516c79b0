"""GradientNormPeakDetector on synthetic curves of (loss, gradient norm)."""

from __future__ import annotations

import math
import random

import pytest

from lightning_twophase import GradientNormPeakDetector


def rise_then_fall(checks: int = 40, peak_at: int = 12) -> list[tuple[float, float]]:
    """A loss that falls steadily and a gradient norm that rises to a peak, then falls (the paper's picture)."""
    curve = []
    for i in range(checks):
        loss = 2.0 * math.exp(-0.1 * i)
        norm = (i + 1) / (peak_at + 1) if i <= peak_at else math.exp(-0.15 * (i - peak_at))
        curve.append((loss, norm))
    return curve


def first_swap(detector: GradientNormPeakDetector, curve: list[tuple[float, float]]) -> int | None:
    for epoch, (loss, norm) in enumerate(curve, start=1):
        if detector.update(loss, norm, epoch=epoch, step=10 * epoch).swap:
            return epoch
    return None


def test_rise_then_fall_swaps_when_the_norm_falls_below_the_threshold():
    curve = rise_then_fall(peak_at=12)
    epoch = first_swap(GradientNormPeakDetector(factor=0.9), curve)
    # Peak at check 13 (norm 1.0); exp(-0.15 k) < 0.9 first for k = 1, i.e. check 14.
    assert epoch == 14


def test_the_reason_names_the_norm_the_peak_and_the_factor():
    detector = GradientNormPeakDetector(factor=0.9)
    first_swap(detector, rise_then_fall(peak_at=5))
    reason = detector.fired.reason
    assert "below 0.9 x its peak 1" in reason and "epoch 6" in reason


def test_patience_waits_for_consecutive_checks():
    curve = rise_then_fall(peak_at=12)
    assert first_swap(GradientNormPeakDetector(factor=0.9, patience=3), curve) == 16


def test_a_single_dip_does_not_fire_with_patience():
    curve = [(1.0, 0.1 * i) for i in range(1, 11)] + [(1.0, 0.5)] + [(1.0, 1.0 + 0.01 * i) for i in range(10)]
    assert first_swap(GradientNormPeakDetector(factor=0.9, patience=2), curve) is None
    assert first_swap(GradientNormPeakDetector(factor=0.9, patience=1), curve) == 11


def test_noisy_curve_with_smoothing_swaps_near_the_true_fall_and_without_it_too_early():
    rng = random.Random(0)
    clean = rise_then_fall(checks=80, peak_at=30)
    # Mini-batch noise of +-25 % around the clean norm.
    noisy = [(loss, norm * (1 + rng.uniform(-0.25, 0.25))) for loss, norm in clean]
    unsmoothed = first_swap(GradientNormPeakDetector(factor=0.9), noisy)
    smoothed = first_swap(GradientNormPeakDetector(factor=0.9, smoothing=0.8, patience=2), noisy)
    assert unsmoothed is not None and unsmoothed < 25  # noise alone makes the raw rule fire during the rise
    assert smoothed is not None and 31 <= smoothed <= 40


@pytest.mark.parametrize("direction", ["increasing", "decreasing"])
def test_monotone_curves_never_swap(direction):
    sign = 1 if direction == "increasing" else -1
    curve = [(1.0 / i, math.exp(sign * 0.05 * i)) for i in range(1, 60)]
    assert first_swap(GradientNormPeakDetector(factor=0.9), curve) is None


def test_without_require_rise_a_falling_curve_swaps():
    curve = [(1.0 / i, math.exp(-0.05 * i)) for i in range(1, 60)]
    assert first_swap(GradientNormPeakDetector(factor=0.9, require_rise=False), curve) == 4


def test_min_epochs_delays_and_max_swap_epoch_forces():
    curve = rise_then_fall(peak_at=3)
    assert first_swap(GradientNormPeakDetector(min_epochs=10), curve) == 10
    increasing = [(1.0, float(i)) for i in range(1, 30)]
    detector = GradientNormPeakDetector(max_swap_epoch=7)
    assert first_swap(detector, increasing) == 7
    assert "maximum swap epoch 7" in detector.fired.reason


def test_fixed_swap_epoch_ignores_the_curve():
    detector = GradientNormPeakDetector(fixed_swap_epoch=5)
    assert first_swap(detector, rise_then_fall(peak_at=1)) == 5
    assert "fixed swap epoch 5" in detector.fired.reason


def test_state_dict_continues_detection_exactly():
    curve = rise_then_fall(peak_at=12)
    reference = GradientNormPeakDetector(smoothing=0.5, patience=2)
    expected = first_swap(reference, curve)
    first = GradientNormPeakDetector(smoothing=0.5, patience=2)
    for epoch, (loss, norm) in enumerate(curve[:10], start=1):
        first.update(loss, norm, epoch=epoch)
    resumed = GradientNormPeakDetector(smoothing=0.5, patience=2)
    resumed.load_state_dict(first.state_dict())
    swapped_at = None
    for epoch, (loss, norm) in enumerate(curve[10:], start=11):
        if resumed.update(loss, norm, epoch=epoch).swap:
            swapped_at = epoch
            break
    assert swapped_at == expected


def test_non_finite_checks_are_ignored():
    detector = GradientNormPeakDetector()
    detector.update(1.0, 1.0, epoch=1)
    decision = detector.update(math.nan, 0.1, epoch=2)
    assert not decision.swap and "non-finite" in decision.reason
    assert detector.checks == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"factor": 1.5}, "factor"), ({"smoothing": 1.0}, "smoothing"), ({"patience": 0}, "patience")],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientNormPeakDetector(**kwargs)
