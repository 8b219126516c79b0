"""The swap detectors on synthetic curves of (loss, gradient norm): the plateau rule and the paper's rule."""

from __future__ import annotations

import math
import random

import pytest

from lightning_twophase import Decision, GradientNormPeakDetector, PlateauDetector, Reason, SwapDetector, tags
from lightning_twophase.schedule import SwapSchedule


def rise_then_fall(checks: int = 40, peak_at: int = 12) -> list[tuple[float, float]]:
    """A loss that falls steadily and a gradient norm that rises to a peak, then falls (the paper's picture)."""
    curve = []
    for i in range(checks):
        loss = 2.0 * math.exp(-0.1 * i)
        norm = (i + 1) / (peak_at + 1) if i <= peak_at else math.exp(-0.15 * (i - peak_at))
        curve.append((loss, norm))
    return curve


def first_swap(detector: SwapDetector, curve: list[tuple[float, float]]) -> int | None:
    for epoch, (loss, norm) in enumerate(curve, start=1):
        if detector.update(loss, norm, epoch=epoch, step=10 * epoch).act:
            return epoch
    return None


# ----------------------------------------------------------------------------------------------------------------------
# The plateau rule (the default)
# ----------------------------------------------------------------------------------------------------------------------


def power_law_then_flat(flat_from: int, checks: int = 300, noise: float = 0.0) -> list[tuple[float, float]]:
    """A loss falling as epoch^-2 (a gradient method past its fast start), flat from ``flat_from`` on, with
    multiplicative noise around the clean curve (mini-batch training near its floor)."""
    rng = random.Random(0)
    curve = []
    for epoch in range(1, checks + 1):
        clean = min(epoch, flat_from) ** -2.0
        curve.append((clean * (1 + rng.uniform(-noise, noise)), math.nan))
    return curve


def test_a_loss_that_keeps_falling_never_swaps():
    detector = PlateauDetector(window=60, min_improvement=0.2)
    # Over 60 epochs epoch^-2 falls by (t / (t - 60))^2 - 1 > 20 % up to epoch 300 and beyond.
    assert first_swap(detector, power_law_then_flat(flat_from=10**6)) is None


def test_a_plateau_swaps_once_the_best_loss_improved_by_less_than_the_threshold_over_the_window():
    curve = power_law_then_flat(flat_from=100)
    # The best loss at epoch e against epoch e - 60: improves by less than 20 % once (100 / (e - 60))^2 < 1.25, i.e.
    # e - 60 > 89.4: epoch 150.
    detector = PlateauDetector(window=60, min_improvement=0.2)
    assert first_swap(detector, curve) == 150
    decision = detector.update(*curve[150], epoch=151, step=0)
    assert decision.act and decision.reason is Reason.PLATEAU
    assert "over the last 60 epochs" in decision.message
    assert decision.scalars[tags.IMPROVEMENT] < 0.2


def test_noise_around_a_falling_loss_is_not_a_plateau_and_on_the_plateau_it_is_no_progress():
    # +-30 % noise: the epoch means go up and down, the best loss still falls where the clean curve falls.
    noisy = power_law_then_flat(flat_from=100, noise=0.3)
    epoch = first_swap(PlateauDetector(window=60, min_improvement=0.2), noisy)
    assert epoch is not None and 130 <= epoch <= 175


def test_the_window_cannot_fire_before_it_is_full():
    flat = [(4.0, math.nan)] + [(1.0, math.nan)] * 29  # a fall in the first epoch, then flat
    detector = PlateauDetector(window=20)
    decisions = [detector.update(loss, norm, epoch=e, step=0) for e, (loss, norm) in enumerate(flat, start=1)]
    assert [d.act for d in decisions].index(True) == 21  # epoch 22: the first whose window starts after the fall
    assert decisions[0].reason is Reason.WAITING and "fill the window" in decisions[0].message


def test_a_plateau_near_the_initial_weights_is_not_the_end_of_the_first_optimizers_progress():
    # Flat for 40 epochs near the initial loss (the non-convex start), then a fall to a second, real plateau.
    curve = [(1.0 - 0.001 * e, math.nan) for e in range(40)] + [(0.01, math.nan)] * 60
    detector = PlateauDetector(window=20)
    decisions = [detector.update(loss, norm, epoch=e, step=0) for e, (loss, norm) in enumerate(curve, start=1)]
    early = decisions[20]
    assert not early.act and "not yet fallen to half its first value" in early.message
    assert [d.act for d in decisions].index(True) == 60  # 20 epochs into the real plateau


def test_a_fractional_window_is_resolved_from_max_epochs_and_needs_it():
    detector = PlateauDetector(window=0.2)
    with pytest.raises(RuntimeError, match="call setup"):
        _ = detector.window_epochs
    detector.setup(300)
    assert detector.window_epochs == 60
    with pytest.raises(ValueError, match="fraction of max_epochs, but the Trainer has no max_epochs"):
        PlateauDetector(window=0.2).setup(None)


def test_a_loss_that_reached_zero_is_a_plateau():
    # A loss that stays at exactly 0 (a realisable problem solved) has stopped improving: no improvement, not infinite.
    curve = [(1.0 - 0.1 * epoch, 0.0) for epoch in range(10)] + [(0.0, 0.0)] * 30
    detector = PlateauDetector(window=5)
    assert first_swap(detector, curve) == 16  # the best loss is 0 from epoch 11 on; the window reaches back to it at 16


def test_non_finite_losses_are_ignored():
    detector = PlateauDetector(window=2)
    for epoch, loss in enumerate([1.0, 0.5, math.nan, math.inf, 0.25], start=1):
        decision = detector.update(loss, 0.0, epoch=epoch, step=0)
    assert not decision.act and detector.best == 0.25


def test_plateau_state_continues_exactly():
    curve = power_law_then_flat(flat_from=80, noise=0.2)
    expected = first_swap(PlateauDetector(window=40), curve)
    first = PlateauDetector(window=40)
    for epoch, (loss, norm) in enumerate(curve[:100], start=1):
        first.update(loss, norm, epoch=epoch, step=0)
    resumed = PlateauDetector(window=40)
    resumed.load_state_dict(first.state_dict())
    rest = next(
        e for e, (loss, norm) in enumerate(curve[100:], start=101) if resumed.update(loss, norm, epoch=e, step=0).act
    )
    assert rest == expected
    assert len(first.points) <= 41  # only what the window reaches back to is kept


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window": 0}, ValueError, "window"),
        ({"window": 2.5}, ValueError, r"window.*fraction of max_epochs in \(0, 1\)"),
        ({"window": "10"}, TypeError, "window"),
        ({"min_improvement": 1.0}, ValueError, "min_improvement"),
        ({"min_improvement": math.nan}, ValueError, "min_improvement.*finite"),
    ],
)
def test_bad_plateau_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        PlateauDetector(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# The paper's rule
# ----------------------------------------------------------------------------------------------------------------------


def test_rise_then_fall_swaps_when_the_norm_falls_below_the_threshold():
    curve = rise_then_fall(peak_at=12)
    # Peak at check 13 (norm 1.0); exp(-0.15 k) < 0.9 first for k = 1, i.e. check 14.
    assert first_swap(GradientNormPeakDetector(factor=0.9), curve) == 14


def test_the_reason_names_the_norm_the_peak_and_the_factor():
    detector = GradientNormPeakDetector(factor=0.9)
    curve = rise_then_fall(peak_at=5)
    fired = next(
        decision
        for epoch, (loss, norm) in enumerate(curve, start=1)
        if (decision := detector.update(loss, norm, epoch=epoch, step=0)).act
    )
    assert fired.reason is Reason.NORM_PEAK
    assert "below 0.9 x its peak 1" in fired.message and "epoch 6" in fired.message
    assert fired.scalars == {tags.GN_MAX: 1.0, tags.THRESHOLD: 0.9}


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


def test_paper_state_continues_detection_exactly():
    curve = rise_then_fall(peak_at=12)
    expected = first_swap(GradientNormPeakDetector(smoothing=0.5, patience=2), curve)
    first = GradientNormPeakDetector(smoothing=0.5, patience=2)
    for epoch, (loss, norm) in enumerate(curve[:10], start=1):
        first.update(loss, norm, epoch=epoch, step=0)
    resumed = GradientNormPeakDetector(smoothing=0.5, patience=2)
    resumed.load_state_dict(first.state_dict())
    rest = next(
        e for e, (loss, norm) in enumerate(curve[10:], start=11) if resumed.update(loss, norm, epoch=e, step=0).act
    )
    assert rest == expected
    fired = GradientNormPeakDetector()
    swap = first_swap(fired, curve)
    restored = GradientNormPeakDetector()
    restored.load_state_dict(fired.state_dict())
    loss, norm = curve[swap]  # the check after the swap point: both answer it alike
    assert restored.update(loss, norm, epoch=swap + 1, step=0) == fired.update(loss, norm, epoch=swap + 1, step=0)


def test_an_early_false_peak_held_back_by_min_epochs_does_not_swap_on_a_later_rise():
    # A bump at check 2, then the real rise: with min_epochs=10 the rule's early answer is held back, and at epoch 10
    # the norm is rising to a new peak, so no swap comes until it falls below 0.9 x that peak.
    bump = [(1.0, 1.0), (0.9, 1.2), (0.8, 0.5), (0.7, 0.6)]
    rise = [(0.6 - 0.01 * k, 0.7 + 0.2 * k) for k in range(8)]
    fall = [(0.5 - 0.01 * k, 2.1 * 0.8**k) for k in range(1, 6)]
    schedule = SwapSchedule(GradientNormPeakDetector(), swap_epoch=None, min_epochs=10)
    schedule.setup(30)
    decisions = [schedule.decide(loss, norm, epoch, 0) for epoch, (loss, norm) in enumerate(bump + rise + fall, 1)]
    assert decisions[2].reason is Reason.BEFORE_MIN_EPOCHS  # the bump's answer, held back
    swaps = [epoch for epoch, decision in enumerate(decisions, 1) if decision.act]
    assert swaps[0] == len(bump + rise) + 1 and "peak 2.1" in decisions[swaps[0] - 1].message


def test_non_finite_checks_are_ignored():
    detector = GradientNormPeakDetector()
    detector.update(1.0, 1.0, epoch=1, step=0)
    decision = detector.update(math.nan, 0.1, epoch=2, step=0)
    assert not decision.act and decision.reason is Reason.NON_FINITE
    assert detector.checks == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"factor": 1.5}, ValueError, "factor"),
        ({"factor": math.nan}, ValueError, "factor.*finite"),
        ({"smoothing": 1.0}, ValueError, "smoothing"),
        ({"patience": 0}, ValueError, "patience"),
        ({"patience": 2.5}, ValueError, "patience.*whole number"),
        ({"require_rise": "no"}, TypeError, "require_rise.*True or False"),
    ],
)
def test_bad_paper_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientNormPeakDetector(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# A rule of one's own, and the decision
# ----------------------------------------------------------------------------------------------------------------------


def test_a_subclass_needs_only_update():
    class LossBelow(SwapDetector):
        def update(self, loss, grad_norm, *, epoch, step):
            return Decision(loss < 0.5, Reason.RULE if loss < 0.5 else Reason.WAITING, "loss below 0.5")

    detector = LossBelow()
    detector.setup(100)
    assert detector.state_dict() == {} and detector.norm_every_n_steps == 1
    assert first_swap(detector, [(1.0, 0.0), (0.4, 0.0)]) == 2
    with pytest.raises(TypeError, match="abstract"):
        SwapDetector()  # type: ignore[abstract]


@pytest.mark.parametrize("act", ["no", 1, None])
def test_a_decision_refuses_anything_but_a_bool(act):
    with pytest.raises(TypeError, match="`act` must be a bool"):
        Decision(act, Reason.RULE)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`reason` must be a lightning_twophase\.Reason"):
        Decision(True, "rule")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scalars": [1, 2]}, TypeError, r"`scalars` must be a mapping of tag to number.*got \[1, 2\] of type list"),
        ({"scalars": {"twophase/m": [1, 2]}}, TypeError, r"`scalars\['twophase/m'\]` must be a real number"),
        ({"scalars": {"twophase/m": "0.5"}}, TypeError, "must be a real number"),
        ({"scalars": {"twophase/m": True}}, TypeError, "must be a real number"),
        ({"scalars": {3: 0.5}}, TypeError, "names in `scalars` must be strings"),
        ({"scalars": {tags.LOSS: 0.5}}, ValueError, "may not use the name 'twophase/loss'"),
        ({"scalars": {tags.PHASE: 0.5}}, ValueError, "may not use the name 'twophase/phase'"),
        ({"scalars": {"epoch": 3}}, ValueError, "may not use the name 'epoch'"),
        ({"message": None}, TypeError, "`message` must be a string"),
    ],
    ids=["list", "list-value", "string-value", "bool-value", "int-key", "loss", "phase", "epoch-column", "no-message"],
)
def test_a_decision_refuses_what_cannot_be_logged_or_read(kwargs, error, match):
    with pytest.raises(error, match=match):
        Decision(False, Reason.WAITING, **kwargs)


def test_a_decisions_scalars_are_plain_floats_and_may_be_non_finite():
    import fractions

    import numpy as np

    decision = Decision(
        True, Reason.RULE, "", {"twophase/a": np.float32(0.5), "twophase/b": fractions.Fraction(1, 4), tags.GN_MAX: 2}
    )
    assert decision.scalars == {"twophase/a": 0.5, "twophase/b": 0.25, tags.GN_MAX: 2.0}
    assert all(type(value) is float for value in decision.scalars.values())
    assert math.isnan(Decision(False, Reason.WAITING, "", {"twophase/a": math.nan}).scalars["twophase/a"])
