"""The line searches on one-dimensional functions: their stopping rules, bounds and failure handling."""

from __future__ import annotations

import math

import pytest

from lightning_twophase.optim import line_search as ls


class Counted:
    """A one-dimensional objective that counts its calls and can refuse (NaN) beyond a point."""

    def __init__(self, f, df, nan_beyond: float = math.inf) -> None:
        self.f, self.df, self.nan_beyond, self.calls = f, df, nan_beyond, 0

    def __call__(self, t: float, need_derivative: bool) -> ls.Trial:
        self.calls += 1
        if t > self.nan_beyond:
            return ls.Trial(math.nan, math.nan if need_derivative else None)
        return ls.Trial(self.f(t), self.df(t) if need_derivative else None)


def quartic() -> Counted:
    # phi(t) = (t - 2)^4 + (t - 2)^2, minimum at t = 2, slope at 0 is -36.
    return Counted(lambda t: (t - 2) ** 4 + (t - 2) ** 2, lambda t: 4 * (t - 2) ** 3 + 2 * (t - 2))


def test_cubic_minimizer_is_exact_for_a_cubic():
    f = lambda t: t**3 - 3 * t  # noqa: E731 - local minimum at t = 1
    df = lambda t: 3 * t**2 - 3  # noqa: E731
    assert ls.cubic_minimizer(0.0, f(0.0), df(0.0), 3.0, f(3.0), df(3.0), 0.0, 3.0) == pytest.approx(1.0)


def test_quadratic_minimizer():
    # f(t) = (t - 3)^2: f(0) = 9, f'(0) = -6, f(1) = 4 -> minimum at 3.
    assert ls.quadratic_minimizer(9.0, -6.0, 1.0, 4.0) == pytest.approx(3.0)
    assert ls.quadratic_minimizer(0.0, -1.0, 1.0, -5.0) == math.inf  # concave: no minimiser


@pytest.mark.parametrize("first_step", [1e-3, 0.5, 2.0, 50.0])
def test_strong_wolfe_result_satisfies_the_conditions(first_step):
    phi = quartic()
    c1, c2 = 1e-4, 0.1
    value0, slope0 = phi(0.0, True)
    result = ls.strong_wolfe(phi, value0, slope0, first_step, c1=c1, c2=c2, max_evals=30)
    assert result.status == ls.CONVERGED
    assert result.value <= value0 + c1 * result.step * slope0
    assert abs(result.derivative) <= c2 * abs(slope0)
    assert result.evaluations == phi.calls - 1  # the call above for value0 is not the search's


@pytest.mark.parametrize("search", [ls.golden_section, ls.brent, ls.interpolation])
@pytest.mark.parametrize("first_step", [1e-3, 0.5, 2.0, 50.0])
def test_value_only_searches_find_the_minimum_to_their_tolerance(search, first_step):
    phi = quartic()
    result = search(phi, phi.f(0.0), phi.df(0.0), first_step, tolerance=1e-4, max_evals=200)
    assert result.status == ls.CONVERGED
    assert result.step == pytest.approx(2.0, rel=1e-3)
    assert result.evaluations == phi.calls


def test_brent_needs_fewer_evaluations_than_golden_section():
    evaluations = {}
    for search in (ls.golden_section, ls.brent):
        phi = quartic()
        result = search(phi, phi.f(0.0), phi.df(0.0), 0.7, tolerance=1e-6, max_evals=200)
        assert result.step == pytest.approx(2.0, rel=1e-5)
        evaluations[search.__name__] = result.evaluations
    assert evaluations["brent"] < evaluations["golden_section"]


def quadratic(minimum: float = 3.0) -> Counted:
    return Counted(lambda t: (t - minimum) ** 2 + 1.0, lambda t: 2 * (t - minimum))


@pytest.mark.parametrize(("first_step", "evaluations"), [(0.5, 3), (1.0, 3), (2.0, 3), (2.9, 2), (6.0, 2), (20.0, 2)])
def test_interpolation_takes_two_or_three_evaluations_on_a_quadratic(first_step, evaluations):
    # The parabola through phi(0), phi'(0) and the first trial is exact, so the second trial is the minimum; a
    # first trial short of it needs a third beside the minimum to bracket it, one beyond it brackets it already.
    phi = quadratic()
    result = ls.interpolation(phi, phi.f(0.0), phi.df(0.0), first_step, tolerance=0.1)
    assert (result.status, result.evaluations, phi.calls) == (ls.CONVERGED, evaluations, evaluations)
    assert result.step == pytest.approx(3.0, rel=0.1)


@pytest.mark.parametrize("first_step", [1e-4, 300.0])
def test_interpolation_does_not_accept_a_step_it_had_to_clip(first_step):
    # The parabola's minimiser lies beyond the tenth-to-ten-times window of the first trial: the clipped second trial
    # agrees with the (exact) parabola but is no minimum; the search goes on to it.
    phi = quadratic()
    result = ls.interpolation(phi, phi.f(0.0), phi.df(0.0), first_step, tolerance=0.1)
    assert result.status == ls.CONVERGED
    assert result.step == pytest.approx(3.0, rel=0.1)
    assert result.evaluations > 2


def test_interpolation_needs_fewer_evaluations_than_brent_near_a_minimum():
    # cosh(t - 1) is nearly quadratic on [0, 2]: the regime of the CG phase, close to a minimum.
    evaluations = {}
    for search in (ls.brent, ls.interpolation):
        total = 0
        for first_step in (0.3, 0.6, 0.9, 1.3, 1.8):
            phi = Counted(lambda t: math.cosh(t - 1.0), lambda t: math.sinh(t - 1.0))
            result = search(phi, phi.f(0.0), phi.df(0.0), first_step, tolerance=0.1)
            assert result.step == pytest.approx(1.0, rel=0.1)
            total += result.evaluations
        evaluations[search.__name__] = total
    assert evaluations["interpolation"] < 0.7 * evaluations["brent"], evaluations


def test_armijo_accepts_the_first_step_with_sufficient_decrease_and_backtracks_otherwise():
    phi = quartic()
    result = ls.armijo(phi, phi.f(0.0), phi.df(0.0), 1.0)
    assert (result.step, result.evaluations, result.status) == (1.0, 1, ls.CONVERGED)
    phi = quartic()
    result = ls.armijo(phi, phi.f(0.0), phi.df(0.0), 10.0)
    assert result.step < 10.0
    assert result.value <= phi.f(0.0) + 1e-4 * result.step * phi.df(0.0)


@pytest.mark.parametrize(
    ("search", "need_derivative"),
    [
        (ls.strong_wolfe, True),
        (ls.armijo, False),
        (ls.golden_section, False),
        (ls.brent, False),
        (ls.interpolation, False),
    ],
)
def test_non_finite_trials_shrink_the_step(search, need_derivative):
    # The function is NaN beyond t = 1, so the true minimum at t = 2 is out of reach; every accepted point is finite.
    phi = quartic()
    phi.nan_beyond = 1.0
    result = search(phi, phi.f(0.0), phi.df(0.0), 5.0)
    assert result.status in (ls.CONVERGED, ls.MAX_EVALS)
    assert 0.0 < result.step <= 1.0
    assert math.isfinite(result.value)
    assert result.value < phi.f(0.0)


@pytest.mark.parametrize("search", [ls.strong_wolfe, ls.armijo, ls.golden_section, ls.brent, ls.interpolation])
def test_every_search_respects_its_evaluation_bound_and_reports_failure(search):
    # Nothing but the start is finite: the search must give up within max_evals and report step 0.
    phi = Counted(lambda t: 1.0, lambda t: -1.0, nan_beyond=0.0)
    result = search(phi, 1.0, -1.0, 1.0, max_evals=7)
    assert phi.calls <= 7
    assert result.status == ls.FAILED
    assert result.step == 0.0
    assert result.value == 1.0


def test_searches_refuse_an_ascent_direction():
    with pytest.raises(ValueError, match="not a descent direction"):
        ls.golden_section(quartic(), 1.0, 0.5, 1.0)
