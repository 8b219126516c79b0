"""FallbackPolicy on its own: line-search failures, a rising loss, non-finite starts, state across resume."""

from __future__ import annotations

import math

import pytest

from lightning_twophase import FallbackPolicy


def test_consecutive_failures_fall_back_and_a_success_resets_the_count():
    policy = FallbackPolicy(after_failures=3, loss_window=None)
    assert [policy.iteration(failed=True).fall_back for _ in range(2)] == [False, False]
    assert not policy.iteration(failed=False).fall_back  # the count starts again
    decisions = [policy.iteration(failed=True) for _ in range(3)]
    assert [d.fall_back for d in decisions] == [False, False, True]
    assert decisions[-1].reason == "3 consecutive line searches found no decrease"


def test_a_loss_that_rose_over_the_window_falls_back():
    policy = FallbackPolicy(loss_window=2, loss_rtol=1e-3)
    assert not any(policy.check(loss).fall_back for loss in (1.0, 0.9))  # fewer checks than the window + 1
    decision = policy.check(1.01)  # above 1.0, two checks before, by 1 %
    assert decision.fall_back and "rose over 2 CG checks (1 -> 1.01)" in decision.reason


def test_a_falling_loss_and_rounding_at_convergence_go_on():
    policy = FallbackPolicy(loss_window=2, loss_rtol=1e-3)
    assert not any(policy.check(loss).fall_back for loss in (1.0, 0.5, 0.25, 0.125))
    converged = FallbackPolicy(loss_window=2, loss_rtol=1e-3)
    # A converged CG phase repeats its loss up to rounding in the last digits: not a rise.
    assert not any(converged.check(1e-5 * (1 + 1e-7 * i)).fall_back for i in range(10))


def test_without_a_window_the_loss_never_triggers_a_fallback():
    policy = FallbackPolicy(loss_window=None)
    assert not any(policy.check(float(loss)).fall_back for loss in range(1, 20))


def test_state_dict_continues_exactly():
    reference = FallbackPolicy(after_failures=2, loss_window=3)
    resumed = FallbackPolicy(after_failures=2, loss_window=3)
    for loss in (1.0, 0.8, 0.7):
        reference.check(loss)
        resumed.check(loss)
    reference.iteration(failed=True)
    resumed.iteration(failed=True)
    restored = FallbackPolicy(after_failures=2, loss_window=3)
    restored.load_state_dict(resumed.state_dict())
    assert restored.check(1.2) == reference.check(1.2)
    assert restored.iteration(failed=True) == reference.iteration(failed=True)
    assert reference.iteration(failed=True).fall_back


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"after_failures": 0}, "after_failures"),
        ({"loss_window": 0}, "loss_window"),
        ({"loss_rtol": -1.0}, "loss_rtol"),
        ({"loss_rtol": math.inf}, "loss_rtol"),
        ({"loss_rtol": math.nan}, "loss_rtol"),
        ({"progress_window": 1}, "progress_window"),
        ({"progress_margin": 0.0}, "progress_margin"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FallbackPolicy(**kwargs)


def cg_checks(policy: FallbackPolicy, rate: float, checks: int, compute_per_check: float = 3.0) -> list:
    """Feed checks of a CG phase that decreases ln(loss) by `rate` per unit of compute."""
    return [
        policy.check(1e-3 * math.exp(-rate * compute_per_check * k), compute_per_check * (k + 1)) for k in range(checks)
    ]


def test_the_progress_guard_falls_back_from_a_cg_phase_slower_than_the_first_optimizer():
    policy = FallbackPolicy(loss_window=None, progress_window=5)
    policy.begin(reference_rate=0.1)
    decisions = cg_checks(policy, rate=0.02, checks=5)
    assert [d.fall_back for d in decisions] == [False] * 4 + [True]
    assert (
        "decreased ln(loss) by 0.02 per unit of compute, slower than the first optimizer's 0.1" in decisions[-1].reason
    )


def test_the_progress_guard_keeps_a_faster_cg_phase_that_then_converges():
    policy = FallbackPolicy(loss_window=None, progress_window=5)
    policy.begin(reference_rate=0.1)
    assert not any(d.fall_back for d in cg_checks(policy, rate=0.3, checks=5))
    # Later the phase converges and slows down: that is its result, not a reason to go back.
    assert not any(policy.check(1e-9, 100.0 + k).fall_back for k in range(10))


def test_the_progress_guard_falls_back_once_a_stalled_cg_phase_is_behind_the_first_optimizers_projection():
    # A fast start, then a stall: the CG phase keeps its lead until the first optimizer, its rate of 0.01 falling off in
    # proportion to the compute trained (30 units before the swap), would have gained as much: 0.3 * ln(c / 30) = 0.75
    # at c = 365, check 112.
    policy = FallbackPolicy(loss_window=None, progress_window=5)
    policy.begin(reference_rate=0.01, start=(1e-3, 30.0))
    losses = [1e-3 * math.exp(-0.15 * min(k, 5)) for k in range(1, 131)]
    decisions = [policy.check(loss, 30.0 + 3.0 * k) for k, loss in enumerate(losses, 1)]
    first = next(k for k, d in enumerate(decisions, 1) if d.fall_back)
    assert first == 115  # the first judgement (every 5 checks) past check 112
    assert "not ahead of where the first optimizer would be" in decisions[first - 1].reason


def test_the_progress_guard_counts_only_progress_below_the_first_optimizers_recent_low():
    # The swap came at a rise of the first optimizer's loss: CG's fast start from 1e-3 only regains the ground down to
    # the 5e-4 it had already reached, which is no progress.
    regaining = FallbackPolicy(loss_window=None, progress_window=5)
    regaining.begin(reference_rate=0.01, start=(5e-4, 0.0))
    decisions = cg_checks(regaining, rate=0.05, checks=5)  # 1e-3 -> 5.5e-4: fast, but never below 5e-4
    assert decisions[-1].fall_back
    # The same CG phase from a swap at the low itself is well ahead.
    from_the_low = FallbackPolicy(loss_window=None, progress_window=5)
    from_the_low.begin(reference_rate=0.01, start=(1e-3, 0.0))
    assert not any(d.fall_back for d in cg_checks(from_the_low, rate=0.05, checks=5))


def test_the_progress_guard_stays_quiet_without_a_reference_or_when_turned_off():
    unknown = FallbackPolicy(loss_window=None, progress_window=5)
    unknown.begin(reference_rate=math.nan)
    assert not any(d.fall_back for d in cg_checks(unknown, rate=0.0, checks=6))
    off = FallbackPolicy(loss_window=None, progress_window=None)
    off.begin(reference_rate=0.1)
    assert not any(d.fall_back for d in cg_checks(off, rate=0.0, checks=6))


def test_the_progress_guard_state_survives_resume():
    policy = FallbackPolicy(loss_window=None, progress_window=5)
    policy.begin(reference_rate=0.1, start=(2e-3, 0.0))
    cg_checks(policy, rate=0.02, checks=3)
    resumed = FallbackPolicy(loss_window=None, progress_window=5)
    resumed.load_state_dict(policy.state_dict())
    assert resumed.state_dict() == policy.state_dict() and resumed.start == (2e-3, 0.0)
    last = [resumed.check(1e-3 * math.exp(-0.02 * 3.0 * k), 3.0 * (k + 1)) for k in (3, 4)]
    assert [d.fall_back for d in last] == [False, True]
