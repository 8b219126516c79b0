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
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FallbackPolicy(**kwargs)
