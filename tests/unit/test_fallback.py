"""FallbackPolicy on its own: line-search failures, a rising loss, the progress guard, state across resume."""

from __future__ import annotations

import math

import pytest

from lightning_twophase import FallbackPolicy, Reason


def test_consecutive_failures_fall_back_and_a_success_resets_the_count():
    policy = FallbackPolicy(after_failures=3, loss_window=None)
    assert [policy.iteration(failed=True).act for _ in range(2)] == [False, False]
    assert not policy.iteration(failed=False).act  # the count starts again
    decisions = [policy.iteration(failed=True) for _ in range(3)]
    assert [d.act for d in decisions] == [False, False, True]
    assert decisions[-1].reason is Reason.LINE_SEARCH_FAILURES
    assert decisions[-1].message == "3 consecutive line searches found no decrease"


def test_a_loss_that_rose_over_the_window_falls_back():
    policy = FallbackPolicy(loss_window=2, loss_rtol=1e-3)
    assert not any(policy.check(loss, math.nan).act for loss in (1.0, 0.9))  # fewer checks than the window + 1
    decision = policy.check(1.01, math.nan)  # above 1.0, two checks before, by 1 %
    assert decision.act and decision.reason is Reason.LOSS_ROSE
    assert "rose over 2 CG checks (1 -> 1.01)" in decision.message


def test_a_falling_loss_and_rounding_at_convergence_go_on():
    policy = FallbackPolicy(loss_window=2, loss_rtol=1e-3)
    assert not any(policy.check(loss, math.nan).act for loss in (1.0, 0.5, 0.25, 0.125))
    converged = FallbackPolicy(loss_window=2, loss_rtol=1e-3)
    # A converged CG phase repeats its loss up to rounding in the last digits: not a rise.
    assert not any(converged.check(1e-5 * (1 + 1e-7 * i), math.nan).act for i in range(10))


def test_without_a_window_the_loss_never_triggers_a_fallback():
    policy = FallbackPolicy(loss_window=None)
    assert not any(policy.check(float(loss), math.nan).act for loss in range(1, 20))


# ----------------------------------------------------------------------------------------------------------------------
# The progress guard: the first optimizer's curve L ~ c^-alpha projected over the CG phase's compute
# ----------------------------------------------------------------------------------------------------------------------


def first_phase(alpha: float, epochs: int = 100) -> list[tuple[float, float]]:
    """A first phase whose loss falls as compute^-alpha (compute in epochs)."""
    return [(float(epoch) ** -alpha, float(epoch)) for epoch in range(1, epochs + 1)]


def run_cg(policy: FallbackPolicy, losses: list[float], cost: float = 1.8, start: float = 100.0):
    """Feed the CG phase's checks (one iteration of ``cost`` epochs each); the first decision to fall back, if any."""
    for check, loss in enumerate(losses, start=1):
        decision = policy.check(loss, start + cost * check)
        if decision.act:
            return check, decision
    return None, None


def test_the_progress_guard_is_off_by_default():
    policy = FallbackPolicy()
    policy.begin(first_phase(alpha=2.0))
    assert policy.progress_window is None
    assert run_cg(policy, [1e-4] * 200) == (None, None)  # stalled at the swap's loss: no progress fallback


def test_the_exponent_is_read_off_the_first_phases_second_half():
    policy = FallbackPolicy()
    policy.begin(first_phase(alpha=2.0))
    assert policy.exponent == pytest.approx(2.0)
    assert policy.start_loss == pytest.approx(1e-4) and policy.start_compute == 100.0


def test_a_stalled_cg_phase_far_behind_the_projection_falls_back_at_the_window():
    policy = FallbackPolicy(progress_window=30, progress_margin=0.25)
    policy.begin(first_phase(alpha=2.0))
    # CG barely moves: ln(loss) down 0.01 in 30 checks, where the first optimizer's curve projects 2 ln(154 / 100).
    check, decision = run_cg(policy, [1e-4 * math.exp(-0.01 * i / 30) for i in range(1, 91)])
    assert check == 30 and decision.reason is Reason.BEHIND_FIRST_OPTIMIZER
    assert "the first optimizer's curve (loss ~ compute^-2)" in decision.message


def test_a_bursty_cg_phase_that_ends_ahead_is_kept():
    # CG's progress comes in steps (a plateau, then a drop as images are fitted): 30 % of the projection by check 30,
    # then far ahead. A guard that asked for the whole projection at every window would end it.
    policy = FallbackPolicy(progress_window=30, progress_margin=0.25)
    policy.begin(first_phase(alpha=2.0))
    projected_30 = 2.0 * math.log((100 + 1.8 * 30) / 100)
    losses = [1e-4 * math.exp(-0.3 * projected_30)] * 40 + [1e-6] * 50
    assert run_cg(policy, losses) == (None, None)
    strict = FallbackPolicy(progress_window=30, progress_margin=0.5)
    strict.begin(first_phase(alpha=2.0))
    assert run_cg(strict, losses)[0] == 30


def test_a_converged_cg_phase_far_below_the_first_optimizer_is_kept():
    policy = FallbackPolicy(progress_window=30)
    policy.begin(first_phase(alpha=1.0))
    assert run_cg(policy, [1e-9] * 200) == (None, None)  # no progress after the first check, but far ahead


def test_a_second_phase_that_reached_a_loss_of_zero_is_kept():
    # A perfect fit (L-BFGS on separable data reaches a float loss of 0.0) is all the progress there is, not none.
    policy = FallbackPolicy(progress_window=1)
    policy.begin(first_phase(alpha=1.0))
    assert run_cg(policy, [5e-3, 1e-6, 0.0, 0.0], cost=50.0) == (None, None)


def test_the_guard_is_quiet_without_a_usable_first_phase_or_when_turned_off():
    for points in ([], [(1.0, 1.0), (0.5, 2.0)], [(1.0, float(e)) for e in range(1, 50)]):  # too few; flat: alpha 0
        policy = FallbackPolicy()
        policy.begin(points)
        assert run_cg(policy, [1.0] * 100) == (None, None)
    off = FallbackPolicy(progress_window=None)
    off.begin(first_phase(alpha=2.0))
    assert run_cg(off, [1e-4] * 100) == (None, None)


def test_the_projection_starts_from_the_first_optimizers_best_loss():
    # The first phase's last epochs rose (a bump near its floor): regaining that ground is no progress.
    points = first_phase(alpha=2.0)
    points[-5:] = [(1e-3, compute) for _, compute in points[-5:]]
    policy = FallbackPolicy(progress_window=30)  # the guard is off by default
    policy.begin(points)
    assert policy.start_loss == pytest.approx(95.0**-2)
    check, _ = run_cg(policy, [5e-4, 2e-4] + [95.0**-2] * 60)
    assert check == 30


def test_state_dict_continues_exactly():
    reference, resumed = (
        FallbackPolicy(after_failures=2, loss_window=3),
        FallbackPolicy(after_failures=2, loss_window=3),
    )
    for policy in (reference, resumed):
        policy.begin(first_phase(alpha=1.5))
        for i, loss in enumerate((1e-2, 8e-3, 7e-3)):
            policy.check(loss, 101.0 + i)
        policy.iteration(failed=True)
    restored = FallbackPolicy(after_failures=2, loss_window=3)
    restored.load_state_dict(resumed.state_dict())
    assert restored.check(1.2e-2, 104.0) == reference.check(1.2e-2, 104.0)
    assert restored.iteration(failed=True) == reference.iteration(failed=True)
    assert (restored.exponent, restored.start_loss) == (reference.exponent, reference.start_loss)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"after_failures": 0}, ValueError, "after_failures"),
        ({"after_failures": 2.5}, ValueError, "after_failures.*whole number"),
        ({"after_failures": math.nan}, ValueError, "after_failures"),
        ({"loss_window": 0}, ValueError, "loss_window"),
        ({"loss_window": 1.5}, ValueError, "loss_window.*whole number"),
        ({"loss_rtol": -0.1}, ValueError, "loss_rtol"),
        ({"loss_rtol": math.nan}, ValueError, "loss_rtol.*finite"),
        ({"progress_window": 2.5}, ValueError, "progress_window.*whole number"),
        ({"progress_window": math.nan}, ValueError, "progress_window"),
        ({"progress_margin": 0.0}, ValueError, "progress_margin"),
        ({"progress_margin": "1"}, TypeError, "progress_margin"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        FallbackPolicy(**kwargs)
