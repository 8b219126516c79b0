"""GradientNormPeakDetector on synthetic curves of (loss, gradient norm)."""

from __future__ import annotations

import math
import random

import pytest

from lightning_twophase import GradientNormPeakDetector, ProbeDetector, ProbeResult, tags


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


# ----------------------------------------------------------------------------------------------------------------
# ProbeDetector: probes on a schedule, a swap when CG is measured ahead
# ----------------------------------------------------------------------------------------------------------------


def adam_curve(epochs: int, rate: float, start: float = 1.0) -> list[tuple[float, float]]:
    """(loss, compute) of a first optimizer that decreases ln(loss) by `rate` per unit of compute (1 per epoch)."""
    return [(start * math.exp(-rate * epoch), float(epoch)) for epoch in range(1, epochs + 1)]


def probe_with_rate(rate: float, start: float = 1e-2, compute: float = 10.0) -> ProbeResult:
    computes = tuple(compute * (k + 1) / 5 for k in range(5))
    return ProbeResult(start, tuple(start * math.exp(-rate * c) for c in computes), computes)


def run_probe_detector(detector: ProbeDetector, curve, probe_rate) -> tuple[int | None, list[int]]:
    """Feed the curve; answer every probe request with a probe of rate probe_rate(epoch). The swap epoch and the
    epochs at which probes ran."""
    probes, pending = [], False
    for epoch, (loss, compute) in enumerate(curve, start=1):
        probe = None
        if pending:
            probe = probe_with_rate(probe_rate(epoch), start=loss)
            probes.append(epoch)
        decision = detector.update(loss, 1.0, epoch=epoch, step=epoch, compute=compute, probe=probe)
        if decision.swap:
            return epoch, probes
        pending = decision.probe
    return None, probes


def test_a_probe_that_is_slower_than_the_first_optimizer_does_not_swap_and_the_next_waits_in_proportion():
    detector = ProbeDetector(first_probe_epoch=10)
    swap, probes = run_probe_detector(detector, adam_curve(100, rate=0.1), probe_rate=lambda epoch: 0.01)
    # Ten times slower: each next probe is twice as late (the most the spacing allows).
    assert swap is None and probes == [11, 23, 47, 95]  # asked for at epochs 10, 22, 46 and 94, run over the next
    assert detector.last_ratio == pytest.approx(0.1, rel=1e-6)


def test_the_swap_fires_once_a_probe_is_ahead():
    # The first optimizer slows down (its rate falls as 1 / epoch); CG's probes keep a rate of 0.01.
    curve, loss = [], 1.0
    for epoch in range(1, 301):
        loss *= math.exp(-0.5 / epoch)
        curve.append((loss, float(epoch)))
    detector = ProbeDetector(first_probe_epoch=10)
    swap, probes = run_probe_detector(detector, curve, probe_rate=lambda epoch: 0.01)
    # Adam's rate is about 0.5 / epoch: CG's 0.01 catches up near epoch 50.
    assert swap is not None and 40 <= swap <= 80 and swap == probes[-1]
    assert "faster" not in detector.fired.reason and "x the first optimizer's" in detector.fired.reason
    assert detector.fired.scalars[tags.PROBE_RATIO] >= 1.0


def test_when_the_first_optimizer_reaches_no_new_low_any_progress_of_cg_swaps():
    # Adam's loss rises over the window: it made no progress at all, so a probe that goes below Adam's low is ahead,
    # and one that does not waits twice as long.
    curve = [(1.0 + 0.01 * epoch, float(epoch)) for epoch in range(1, 30)]
    stuck = ProbeDetector(first_probe_epoch=10, window=10)
    swap, probes = run_probe_detector(stuck, curve, probe_rate=lambda epoch: 1e-4)
    assert swap is None and probes == [11, 23]
    detector = ProbeDetector(first_probe_epoch=10, window=10)
    rising = [*curve[:10], (1.02, 11.0)]  # the probe's interval ends back at the window's low, no lower
    swap, probes = run_probe_detector(detector, rising, probe_rate=lambda epoch: 1e-3)
    assert swap == 11 and probes == [11] and detector.last_ratio == math.inf


def test_a_probe_that_only_regains_the_ground_of_a_rise_does_not_swap():
    # Adam slowly reached 1e-2, then its loss rose by a fifth. A probe from there that falls fast but stays above
    # 1e-2 is no progress; the same probe from the low is.
    curve = adam_curve(29, rate=0.001, start=1e-2 / math.exp(-0.029))
    computes = (2.0, 4.0, 6.0, 8.0, 10.0)
    regaining = ProbeResult(1.2e-2, tuple(1.2e-2 - 3e-4 * k for k in range(1, 6)), computes)
    from_the_low = ProbeResult(1e-2, tuple(1e-2 - 2.5e-4 * k for k in range(1, 6)), computes)
    assert regaining.rate > 10 * 0.001  # from its own start, ten times Adam's pace
    verdicts = []
    for last, probe in (((1.2e-2, 30.0), regaining), ((1e-2, 30.0), from_the_low)):
        detector = ProbeDetector(first_probe_epoch=10)
        for epoch, (loss, compute) in enumerate([*curve, last], start=1):
            detector.update(loss, 1.0, epoch=epoch, step=epoch, compute=compute)
        verdicts.append(detector.update(1.1e-2, 1.0, epoch=31, step=31, compute=31.0, probe=probe).swap)
    assert verdicts == [False, True]


def test_after_a_fallback_the_probes_start_again_later_from_a_fresh_rate():
    detector = ProbeDetector(first_probe_epoch=10)
    swap, _ = run_probe_detector(detector, adam_curve(40, rate=0.001), probe_rate=lambda epoch: 0.01)
    assert swap == 11
    detector.on_fallback(epoch=16)
    assert not detector.update(0.5, 1.0, epoch=17, step=17, compute=17.0).swap  # no swap without a new probe
    assert detector.next_probe_epoch == 26  # a window (10 checks) later: a new rate to compare with
    assert not detector.retired


def test_a_fixed_swap_is_made_once():
    detector = ProbeDetector(fixed_swap_epoch=3)
    decisions = [detector.update(1.0, 1.0, epoch=epoch, step=epoch, compute=float(epoch)) for epoch in (1, 2, 3)]
    assert [d.swap for d in decisions] == [False, False, True] and not any(d.probe for d in decisions)
    detector.on_fallback(epoch=8)
    assert detector.retired and not detector.update(1.0, 1.0, epoch=9, step=9, compute=9.0).swap


def test_probe_detector_state_continues_exactly():
    # Resumed from its state after epoch 30, the detector asks for the same probes and swaps at the same epoch as
    # the detector that ran through.
    curve, loss = [], 1.0
    for epoch in range(1, 301):
        loss *= math.exp(-0.5 / epoch)
        curve.append((loss, float(epoch)))

    def drive(detector, epochs, pending=False):
        probes = []
        for epoch in epochs:
            loss, compute = curve[epoch - 1]
            probe = probe_with_rate(0.01, start=loss) if pending else None
            probes += [epoch] if pending else []
            decision = detector.update(loss, 1.0, epoch=epoch, step=epoch, compute=compute, probe=probe)
            if decision.swap:
                return epoch, probes, False
            pending = decision.probe
        return None, probes, pending

    expected = drive(ProbeDetector(first_probe_epoch=10), range(1, 301))
    first = ProbeDetector(first_probe_epoch=10)
    _, before, pending = drive(first, range(1, 31))
    resumed = ProbeDetector(first_probe_epoch=10)
    resumed.load_state_dict(first.state_dict())
    swap, after, _ = drive(resumed, range(31, 301), pending)
    assert expected[0] is not None and expected[0] > 30
    assert (swap, before + after) == expected[:2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"first_probe_epoch": 0}, "first_probe_epoch"), ({"window": 2}, "window"), ({"margin": 0}, "margin")],
)
def test_bad_probe_detector_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProbeDetector(**kwargs)


def test_a_probe_that_converges_counts_its_rate_up_to_its_best_iteration():
    # The loss falls tenfold in two iterations, then stays: the idle iterations do not dilute the rate.
    probe = ProbeResult(1.0, (0.3, 0.1, 0.1, 0.1, 0.1), (2.0, 4.0, 6.0, 8.0, 10.0))
    assert probe.rate == pytest.approx(math.log(10.0) / 4.0)
    assert (probe.iterations, probe.compute) == (5, 10.0)
    assert math.isnan(ProbeResult(1.0, (math.nan,), (2.0,)).rate)


def test_no_probe_before_min_epochs_could_let_a_swap_follow():
    detector = ProbeDetector(first_probe_epoch=10, min_epochs=40)
    swap, probes = run_probe_detector(detector, adam_curve(60, rate=0.001), probe_rate=lambda epoch: 0.01)
    assert probes[0] == 40 and swap == 40  # asked for at epoch 39, judged at 40, the first epoch a swap may follow


def test_a_loss_that_is_not_positive_is_said_and_asks_for_no_probe():
    detector = ProbeDetector(first_probe_epoch=1)
    decisions = [detector.update(-0.5, 1.0, epoch=epoch, step=epoch, compute=float(epoch)) for epoch in range(1, 20)]
    assert not any(d.swap or d.probe for d in decisions)
    assert "is not positive" in decisions[-1].reason
