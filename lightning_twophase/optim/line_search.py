"""Line searches along a fixed direction, as functions of a one-dimensional objective.

Each search receives ``phi(step, need_derivative) -> Trial``: the objective at ``x0 + step * d`` and, when asked
for, its derivative along ``d``. A trial whose value or derivative is NaN or infinite counts as a failed trial: the
search treats it as a point above every finite value, so the step shrinks. Every search is bounded by
``max_evals`` calls of ``phi`` and returns the best point it found; ``step == 0`` with status ``"failed"`` means no
point below the starting value was found.

The searches:

* :func:`strong_wolfe`: bracketing and zoom with cubic interpolation until the strong Wolfe conditions hold
  (Nocedal and Wright, Algorithms 3.5 and 3.6; the safeguards follow ``torch.optim.LBFGS``). Needs a gradient at
  every trial point.
* :func:`armijo`: backtracking with safeguarded quadratic interpolation until the sufficient decrease (Armijo)
  condition holds. Values only.
* :func:`golden_section`: the paper's choice (Press et al., Numerical Recipes): bracket the minimum, then shrink
  the bracket by the golden ratio until it is narrower than a relative tolerance. Values only.
* :func:`brent`: the same bracket, shrunk by Brent's method (parabolic steps, golden-section steps where they
  are unsafe), as Numerical Recipes' ``linmin`` does. Values only; usually far fewer evaluations than golden.
* :func:`interpolation`: the minimiser of a model through ``phi(0)``, ``phi'(0)`` (known without an evaluation) and
  the trial values proposes each next trial; a trial the model puts within the tolerance of its minimiser is
  accepted. Values only; on smooth objectives usually one or two evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "CONVERGED",
    "FAILED",
    "MAX_EVALS",
    "PRECISION_LIMIT",
    "LineSearchResult",
    "Phi",
    "Trial",
    "armijo",
    "brent",
    "cubic_minimizer",
    "golden_section",
    "interpolation",
    "model_minimizer",
    "parabola_minimizer",
    "quadratic_minimizer",
    "strong_wolfe",
    "value_resolution",
]

#: Status of a search that met its stopping rule.
CONVERGED = "converged"
#: Status of a search that used up ``max_evals`` but found a point below the starting value.
MAX_EVALS = "max_evals"
#: Status of a search that found no point below the starting value (``step == 0``).
FAILED = "failed"
#: A failed search whose smallest trial step could lower the value by no more than the value's rounding noise
#: (first-order estimate): the start is a minimum to the precision the loss can resolve, not a failure.
PRECISION_LIMIT = "precision_limit"

_GOLDEN = (1.0 + math.sqrt(5.0)) / 2.0  # 1.618...
_GOLDEN_FRACTION = 2.0 - _GOLDEN  # 0.381966..., the golden-section step as a fraction of the interval
# Two values closer than this (relative) share fewer than three significant digits in double precision.
_UNRELIABLE_DIFFERENCE = 1000.0 * 2.0**-52


class Trial(NamedTuple):
    """One evaluation of the one-dimensional objective."""

    value: float
    derivative: float | None = None


#: ``phi(step, need_derivative)``: the objective along the search direction.
Phi = Callable[[float, bool], Trial]


@dataclass(frozen=True)
class LineSearchResult:
    """The outcome of a line search.

    Attributes:
        step: the accepted step length (``0.0`` when the search failed).
        value: the objective at ``step``.
        derivative: the directional derivative at ``step`` when it was evaluated, else ``None``.
        evaluations: how many times ``phi`` was called.
        status: :data:`CONVERGED`, :data:`MAX_EVALS` or :data:`FAILED`.

    """

    step: float
    value: float
    derivative: float | None
    evaluations: int
    status: str


def _is_finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _check_descent(value0: float, slope0: float, step: float) -> None:
    if not _is_finite(value0, slope0):
        raise ValueError(f"The line search needs a finite start, got value {value0} and slope {slope0}.")
    if slope0 >= 0:
        raise ValueError(f"The search direction is not a descent direction (slope {slope0} >= 0).")
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"The initial step must be a positive finite number, got {step}.")


def cubic_minimizer(
    t1: float, f1: float, d1: float, t2: float, f2: float, d2: float, lower: float, upper: float
) -> float:
    """Minimiser of the cubic that interpolates two points with values and slopes, clipped to ``[lower, upper]``.

    Where the two values agree to fewer than three significant digits their difference is mostly rounding error,
    so the minimiser comes from the slopes alone (the secant step, exact for a quadratic). Where the cubic has no
    minimiser, the middle of the bounds is returned (as ``torch.optim.LBFGS`` does).
    """
    if t1 == t2:
        return 0.5 * (lower + upper)
    t = math.nan
    if abs(f1 - f2) <= _UNRELIABLE_DIFFERENCE * max(abs(f1), abs(f2)):
        if d1 != d2:
            t = t2 - d2 * (t2 - t1) / (d2 - d1)
    else:
        a = d1 + d2 - 3.0 * (f1 - f2) / (t1 - t2)
        discriminant = a * a - d1 * d2
        if discriminant >= 0:
            b = math.sqrt(discriminant)
            if t1 <= t2:
                denominator = d2 - d1 + 2.0 * b
                t = t2 - (t2 - t1) * ((d2 + b - a) / denominator) if denominator != 0 else math.nan
            else:
                denominator = d1 - d2 + 2.0 * b
                t = t1 - (t1 - t2) * ((d1 + b - a) / denominator) if denominator != 0 else math.nan
    if math.isfinite(t):
        return min(max(t, lower), upper)
    return 0.5 * (lower + upper)


def quadratic_minimizer(value0: float, slope0: float, step: float, value: float) -> float:
    """Minimiser of the parabola through ``(0, value0)`` with slope ``slope0`` and through ``(step, value)``.

    Returns ``inf`` when the parabola opens downwards (no minimiser).
    """
    curvature = value - value0 - slope0 * step
    if curvature <= 0:
        return math.inf
    return -slope0 * step * step / (2.0 * curvature)


def strong_wolfe(
    phi: Phi,
    value0: float,
    slope0: float,
    step: float,
    *,
    c1: float = 1e-4,
    c2: float = 0.1,
    max_evals: int = 25,
    tolerance_change: float = 1e-9,
    value_noise: float = 0.0,
) -> LineSearchResult:
    """Find a step that satisfies the strong Wolfe conditions.

    ``phi(t) <= phi(0) + c1 t phi'(0)`` (sufficient decrease) and ``|phi'(t)| <= c2 |phi'(0)|`` (curvature).
    A small ``c2`` (0.1, the usual choice for conjugate gradient) makes the search close to exact.

    Args:
        phi: the objective along the direction; called with ``need_derivative=True``.
        value0: ``phi(0)``.
        slope0: ``phi'(0)``, negative.
        step: the first trial step.
        c1: sufficient-decrease constant.
        c2: curvature constant, ``c1 < c2 < 1``.
        max_evals: bound on the number of ``phi`` calls.
        tolerance_change: stop when the bracket is narrower than this fraction of the step.
        value_noise: the rounding error of a value (a few units in the last place of ``value0``). Near a minimum,
            where decreases drown in it, a point whose value is within it of ``value0`` is accepted if the slopes
            show a sufficient decrease (Hager and Zhang's approximate Wolfe conditions).

    """
    _check_descent(value0, slope0, step)
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"The strong Wolfe constants need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}.")

    def sufficient_decrease(t: float, f: float, d: float) -> bool:
        if f <= value0 + c1 * t * slope0:
            return True
        # Close to a minimum the decrease c1 t phi'(0) drowns in the rounding error of the values, while the
        # slopes still show it: the mean slope over [0, t] must show the decrease (approximate Wolfe condition).
        return f <= value0 + value_noise and d <= (2.0 * c1 - 1.0) * slope0

    evals = 0
    prev = (0.0, value0, slope0)
    t = step
    bracket: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    while evals < max_evals:
        trial = phi(t, True)
        evals += 1
        f, d = trial.value, trial.derivative
        if not _is_finite(f, d):
            # A failed trial lies beyond the region where the objective is defined: zoom between it and `prev`.
            bracket = (prev, (t, math.inf, math.nan))
            break
        assert d is not None
        if not sufficient_decrease(t, f, d) or (evals > 1 and f >= prev[1]):
            bracket = (prev, (t, f, d))
            break
        if abs(d) <= -c2 * slope0:
            return LineSearchResult(t, f, d, evals, CONVERGED)
        if d >= 0:
            bracket = ((t, f, d), prev)
            break
        # Still descending: extrapolate with a cubic step, at least 1 % further and at most 10x.
        next_t = cubic_minimizer(prev[0], prev[1], prev[2], t, f, d, t + 0.01 * (t - prev[0]), 10.0 * t)
        prev = (t, f, d)
        t = next_t
    if bracket is None:
        # Out of evaluations while extrapolating: the last point satisfied sufficient decrease.
        t, f, d = prev
        return LineSearchResult(t, f, d, evals, MAX_EVALS if t > 0 else FAILED)

    # Zoom: `lo` is the best point that satisfies sufficient decrease, the minimum lies between `lo` and `hi`.
    lo, hi = bracket
    insufficient_progress = False
    while evals < max_evals:
        width = abs(hi[0] - lo[0])
        if width <= tolerance_change * max(abs(lo[0]), abs(hi[0])):
            break
        low_bound, high_bound = min(lo[0], hi[0]), max(lo[0], hi[0])
        if _is_finite(hi[1], hi[2]):
            t = cubic_minimizer(lo[0], lo[1], lo[2], hi[0], hi[1], hi[2], low_bound, high_bound)
        else:
            t = 0.5 * (lo[0] + hi[0])
        # Keep trials away from the bracket ends, or the bracket shrinks too slowly (torch.optim.LBFGS's rule).
        margin = 0.1 * width
        if min(high_bound - t, t - low_bound) < margin:
            if insufficient_progress or t >= high_bound or t <= low_bound:
                t = high_bound - margin if abs(t - high_bound) < abs(t - low_bound) else low_bound + margin
                insufficient_progress = False
            else:
                insufficient_progress = True
        else:
            insufficient_progress = False
        trial = phi(t, True)
        evals += 1
        f, d = trial.value, trial.derivative
        if not _is_finite(f, d):
            hi = (t, math.inf, math.nan)
            continue
        assert d is not None
        if not sufficient_decrease(t, f, d) or f > lo[1] + value_noise:
            hi = (t, f, d)
        else:
            if abs(d) <= -c2 * slope0:
                return LineSearchResult(t, f, d, evals, CONVERGED)
            if d * (hi[0] - lo[0]) >= 0:
                hi = lo
            lo = (t, f, d)
    if lo[0] == 0.0:
        return LineSearchResult(0.0, value0, slope0, evals, FAILED)
    return LineSearchResult(lo[0], lo[1], lo[2], evals, MAX_EVALS)


def armijo(
    phi: Phi,
    value0: float,
    slope0: float,
    step: float,
    *,
    c1: float = 1e-4,
    max_evals: int = 20,
) -> LineSearchResult:
    """Backtrack from ``step`` until the sufficient decrease (Armijo) condition holds.

    Each rejected step is replaced by the minimiser of the parabola through ``phi(0)``, ``phi'(0)`` and the
    rejected value, kept within ``[0.1, 0.5]`` of the rejected step; a non-finite trial shrinks the step tenfold.

    Args:
        phi: the objective along the direction; called with ``need_derivative=False``.
        value0: ``phi(0)``.
        slope0: ``phi'(0)``, negative.
        step: the first trial step.
        c1: sufficient-decrease constant.
        max_evals: bound on the number of ``phi`` calls.

    """
    _check_descent(value0, slope0, step)
    t = step
    for evals in range(1, max_evals + 1):
        f = phi(t, False).value
        if _is_finite(f) and f <= value0 + c1 * t * slope0:
            return LineSearchResult(t, f, None, evals, CONVERGED)
        if _is_finite(f):
            t = min(max(quadratic_minimizer(value0, slope0, t, f), 0.1 * t), 0.5 * t)
        else:
            t *= 0.1
    return LineSearchResult(0.0, value0, slope0, max_evals, FAILED)


class _Bracket(NamedTuple):
    """Three steps ``a < b < c`` with ``f(b) < f(a)`` and ``f(b) <= f(c)``: a minimum lies in ``(a, c)``."""

    a: float
    fa: float
    b: float
    fb: float
    c: float
    fc: float


def _value(phi: Phi, t: float) -> float:
    f = phi(t, False).value
    return f if _is_finite(f) else math.inf


def _bracket_minimum(
    phi: Phi, value0: float, slope0: float, step: float, max_evals: int
) -> tuple[_Bracket | None, tuple[float, float], int]:
    """Bracket a minimum of ``phi`` on ``t > 0``, starting from ``step``.

    Returns the bracket (``None`` if none was found within ``max_evals``), the best ``(step, value)`` seen and the
    number of evaluations.
    """
    a, fa = 0.0, value0
    b, fb = step, _value(phi, step)
    evals = 1
    if not fb < fa:
        # Overshot: the minimum lies before `b`. Shrink towards 0 (the slope there is negative) until a point
        # below the start is found; the parabola through phi(0), phi'(0) and phi(b) proposes the next trial.
        c, fc = b, fb
        while evals < max_evals:
            b = min(max(quadratic_minimizer(value0, slope0, c, fc), 0.1 * c), 0.5 * c) if fc < math.inf else 0.1 * c
            fb = _value(phi, b)
            evals += 1
            if fb < fa:
                return _Bracket(a, fa, b, fb, c, fc), (b, fb), evals
            c, fc = b, fb
        return None, (0.0, value0), evals
    # Still descending at `b`: expand by the golden ratio until the value rises.
    while evals < max_evals:
        c = b + _GOLDEN * (b - a)
        fc = _value(phi, c)
        evals += 1
        if not fc < fb:
            return _Bracket(a, fa, b, fb, c, fc), (b, fb), evals
        a, fa, b, fb = b, fb, c, fc
    return None, (b, fb), evals


def _unbracketed_result(best: tuple[float, float], value0: float, evals: int) -> LineSearchResult:
    step, value = best
    if step == 0.0 or not value < value0:
        return LineSearchResult(0.0, value0, None, evals, FAILED)
    return LineSearchResult(step, value, None, evals, MAX_EVALS)


def golden_section(
    phi: Phi,
    value0: float,
    slope0: float,
    step: float,
    *,
    tolerance: float = 1e-2,
    max_evals: int = 40,
) -> LineSearchResult:
    """Bracket the minimum along the direction, then shrink the bracket by golden-section steps.

    Stops when the bracket is narrower than ``tolerance`` times the best step (a relative tolerance).

    Args:
        phi: the objective along the direction; called with ``need_derivative=False``.
        value0: ``phi(0)``.
        slope0: ``phi'(0)``, negative.
        step: the first trial step.
        tolerance: relative width of the final bracket.
        max_evals: bound on the number of ``phi`` calls.

    """
    _check_descent(value0, slope0, step)
    bracket, best, evals = _bracket_minimum(phi, value0, slope0, step, max_evals)
    if bracket is None:
        return _unbracketed_result(best, value0, evals)
    a, _, b, fb, c, _ = bracket
    while c - a > tolerance * b:
        if evals >= max_evals:
            return LineSearchResult(b, fb, None, evals, MAX_EVALS)
        # Probe the larger of the two sub-intervals at the golden-section point.
        x = b + _GOLDEN_FRACTION * (c - b) if c - b > b - a else b - _GOLDEN_FRACTION * (b - a)
        fx = _value(phi, x)
        evals += 1
        if fx < fb:
            if x > b:
                a = b
            else:
                c = b
            b, fb = x, fx
        elif x > b:
            c = x
        else:
            a = x
    return LineSearchResult(b, fb, None, evals, CONVERGED)


def brent(
    phi: Phi,
    value0: float,
    slope0: float,
    step: float,
    *,
    tolerance: float = 1e-2,
    max_evals: int = 20,
) -> LineSearchResult:
    """Bracket the minimum along the direction, then locate it with Brent's method.

    Brent's method takes parabolic steps through the three best points and falls back to golden-section steps
    where a parabolic step is unsafe (Numerical Recipes, ``brent``). It stops when the best step is known to within
    ``tolerance`` (relative).

    Args:
        phi: the objective along the direction; called with ``need_derivative=False``.
        value0: ``phi(0)``.
        slope0: ``phi'(0)``, negative.
        step: the first trial step.
        tolerance: relative accuracy of the step.
        max_evals: bound on the number of ``phi`` calls.

    """
    _check_descent(value0, slope0, step)
    bracket, best, evals = _bracket_minimum(phi, value0, slope0, step, max_evals)
    if bracket is None:
        return _unbracketed_result(best, value0, evals)
    return _brent_on_bracket(phi, bracket, evals, tolerance, max_evals)


def _brent_on_bracket(phi: Phi, bracket: _Bracket, evals: int, tolerance: float, max_evals: int) -> LineSearchResult:
    """Brent's method inside ``bracket``, after ``evals`` evaluations so far."""
    lo, _, x, fx, hi, fc = bracket
    # Seed the parabola with the bracket's ends so that the first step is already parabolic.
    w, fw = (hi, fc) if fc <= bracket.fa else (lo, bracket.fa)
    v, fv = (lo, bracket.fa) if w == hi else (hi, fc)
    # The last two steps, set to the bracket's width so that the first two steps may be parabolic.
    e = d = hi - lo
    while evals < max_evals:
        middle = 0.5 * (lo + hi)
        tol1 = tolerance * abs(x) + 1e-12
        tol2 = 2.0 * tol1
        if abs(x - middle) <= tol2 - 0.5 * (hi - lo):
            return LineSearchResult(x, fx, None, evals, CONVERGED)
        golden_step = True
        if abs(e) > tol1 and math.isfinite(fv) and math.isfinite(fw):
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = 2.0 * (q - r)
            if q > 0:
                p = -p
            q = abs(q)
            previous_e = e
            e = d
            # Accept the parabolic step only if it falls inside the bracket and shrinks faster than bisection.
            if abs(p) < abs(0.5 * q * previous_e) and q * (lo - x) < p < q * (hi - x):
                d = p / q
                u = x + d
                if u - lo < tol2 or hi - u < tol2:
                    d = math.copysign(tol1, middle - x)
                golden_step = False
        if golden_step:
            e = (lo - x) if x >= middle else (hi - x)
            d = _GOLDEN_FRACTION * e
        u = x + d if abs(d) >= tol1 else x + math.copysign(tol1, d)
        fu = _value(phi, u)
        evals += 1
        if fu <= fx:
            if u >= x:
                lo = x
            else:
                hi = x
            v, fv, w, fw, x, fx = w, fw, x, fx, u, fu
        else:
            if u < x:
                lo = u
            else:
                hi = u
            if fu <= fw or w == x:
                v, fv, w, fw = w, fw, u, fu
            elif fu <= fv or v in (x, w):
                v, fv = u, fu
    return LineSearchResult(x, fx, None, evals, MAX_EVALS)


def parabola_minimizer(points: list[tuple[float, float]]) -> float | None:
    """Minimiser of the parabola through three ``(t, phi(t))`` points; ``None`` if it opens downwards or is flat."""
    (t1, f1), (t2, f2), (t3, f3) = points
    denominator = (t1 - t2) * (t1 - t3) * (t2 - t3)
    if denominator == 0 or not math.isfinite(f1 + f2 + f3):
        return None
    a = (t3 * (f2 - f1) + t2 * (f1 - f3) + t1 * (f3 - f2)) / denominator
    b = (t3 * t3 * (f1 - f2) + t2 * t2 * (f3 - f1) + t1 * t1 * (f2 - f3)) / denominator
    return -b / (2.0 * a) if a > 0 else None


def model_minimizer(
    value0: float, slope0: float, points: list[tuple[float, float]]
) -> tuple[float, Callable[[float], float]]:
    """The minimiser of a model through ``phi(0) = value0`` with slope ``slope0`` and trial ``points`` ``(t, phi(t))``,
    and the model itself.

    With one point the model is the parabola of :func:`quadratic_minimizer`; with two, the cubic that meets all four
    conditions (the parabola through the later point where the cubic has no minimiser ahead). The minimiser is
    ``inf`` when the model opens downwards.
    """
    t1, f1 = points[-1]
    a = (f1 - value0 - slope0 * t1) / t1**2
    b = 0.0
    if len(points) >= 2:
        t0, f0 = points[-2]
        r0 = (f0 - value0 - slope0 * t0) / t0**2
        if t1 != t0:
            b = (a - r0) / (t1 - t0)
            a = a - b * t1
    minimizer = math.inf
    if b != 0.0 and math.isfinite(b):
        discriminant = a * a - 3.0 * b * slope0
        if discriminant >= 0:
            root = math.sqrt(discriminant)
            # The root of slope0 + 2 a t + 3 b t^2 where the cubic curves upwards, free of cancellation.
            candidate = -slope0 / (a + root) if a + root > 0 else (-a + root) / (3.0 * b)
            if candidate > 0 and math.isfinite(candidate) and 2.0 * a + 6.0 * b * candidate > 0:
                minimizer = candidate
    if minimizer == math.inf:
        b, a = 0.0, (f1 - value0 - slope0 * t1) / t1**2
        minimizer = -slope0 / (2.0 * a) if a > 0 else math.inf

    def model(t: float) -> float:
        return value0 + slope0 * t + a * t * t + b * t * t * t

    return minimizer, model


def interpolation(
    phi: Phi,
    value0: float,
    slope0: float,
    step: float,
    *,
    tolerance: float = 1e-1,
    c1: float = 1e-4,
    max_evals: int = 20,
    model_evals: int = 5,
) -> LineSearchResult:
    """Step to the minimiser of a model of ``phi``; accept once a bracket confirms it, else finish with Brent's method.

    ``phi(0)`` and ``phi'(0)`` are known without an evaluation. With the first trial's value they fix a parabola
    (exact if ``phi`` is quadratic along the direction, as it nearly is close to a minimum), whose minimiser is the
    next trial; later trials come from the cubic through ``phi(0)``, ``phi'(0)`` and the two trials nearest the best
    (:func:`model_minimizer`), or, when a model would only repeat a trial, from a probe beside the best trial. The best
    trial ``t`` is accepted once it is bracketed (a higher value on each side, ``phi(0)`` on the left counting),
    decreases the value sufficiently (``phi(t) <= phi(0) + c1 t phi'(0)``) and the parabola through the bracket puts
    the minimum within ``tolerance * t`` of it, the accuracy of :func:`brent` at that tolerance. Close to a minimum that
    takes two or three evaluations, where Brent's method takes four to six. After ``model_evals`` evaluations
    without an accepted trial, Brent's method finishes the search from the trials made.

    Args:
        phi: the objective along the direction; called with ``need_derivative=False``.
        value0: ``phi(0)``.
        slope0: ``phi'(0)``, negative.
        step: the first trial step.
        tolerance: relative accuracy of the step.
        c1: sufficient-decrease constant.
        max_evals: bound on the number of ``phi`` calls.
        model_evals: evaluations proposed by the models before Brent's method takes over.

    """
    _check_descent(value0, slope0, step)
    trials: list[tuple[float, float]] = []  # every trial, inf for values that are not finite
    t = step
    for _ in range(min(model_evals, max_evals)):
        trials.append((t, _value(phi, t)))
        points = sorted([(0.0, value0), *trials])
        index = min(range(len(points)), key=lambda i: points[i][1])
        best = points[index]
        if 0 < index < len(points) - 1 and best[1] <= value0 + c1 * best[0] * slope0:
            centre = parabola_minimizer(points[index - 1 : index + 2])
            if centre is not None and abs(centre - best[0]) <= tolerance * best[0]:
                return LineSearchResult(best[0], best[1], None, len(trials), CONVERGED)
        if index == 0 and _unresolvable(value0, slope0, points):
            break
        t = _next_trial(value0, slope0, points, index, tolerance)
    bracket, best, evals = _extend_to_bracket(phi, value0, slope0, trials, max_evals)
    if bracket is None:
        return _unbracketed_result(best, value0, evals)
    return _brent_on_bracket(phi, bracket, evals, tolerance, max_evals)


def _next_trial(value0: float, slope0: float, points: list[tuple[float, float]], index: int, tolerance: float) -> float:
    """The next trial of :func:`interpolation`: the model's minimiser, kept inside what the trials say."""
    best_t = points[index][0]
    lower = points[index - 1][0] if index > 0 else 0.0
    upper = points[index + 1][0] if index + 1 < len(points) else math.inf
    if best_t == 0.0:
        # No trial below phi(0): the parabola through the shortest trial, a tenth to a half of it.
        t, f = points[1]
        guess = quadratic_minimizer(value0, slope0, t, f) if f < math.inf else 0.1 * t
        return min(max(guess, 0.1 * t), 0.5 * t)
    finite = [p for p in points[1:] if p[1] < math.inf]
    nearest = sorted(finite, key=lambda p: abs(p[0] - best_t))[:2][::-1]  # the best trial last
    proposal, _ = model_minimizer(value0, slope0, nearest)
    proposal = min(max(proposal, 0.1 * best_t), 10.0 * best_t)
    if not lower < proposal < upper:
        proposal = 0.5 * (best_t + (upper if proposal >= upper else lower))
    if abs(proposal - best_t) <= tolerance * best_t:
        # The model puts the minimum at the best trial: probe beside it, on the side without a higher value yet.
        beside = best_t * (1.0 + 2.0 * tolerance) if upper == math.inf or proposal >= best_t else best_t
        if beside == best_t:
            beside = best_t / (1.0 + 2.0 * tolerance)
        proposal = min(max(beside, lower + 0.5 * (best_t - lower)), upper - 0.5 * (upper - best_t))
    return proposal


def value_resolution(value0: float, trials: list[tuple[float, float]]) -> float:
    """The smallest change of the value the trials could show, if one of them showed none at all (``0`` otherwise).

    A smooth objective changes between any two nearby points; a trial whose value equals ``phi(0)`` exactly says the
    objective is computed too coarsely to show the change, and the smallest change any trial did show measures how
    coarsely.
    """
    changes = [abs(f - value0) for _, f in trials if math.isfinite(f)]
    if 0.0 not in changes:
        return 0.0
    return min((change for change in changes if change > 0), default=abs(value0) * 2.0**-23)


def _unresolvable(value0: float, slope0: float, points: list[tuple[float, float]]) -> bool:
    """Whether the shortest trial, without a decrease, predicts one the objective cannot resolve: shrinking on only
    repeats phi(0)."""
    t, f = points[1]
    resolution = value_resolution(value0, points[1:])
    return f == value0 and -slope0 * t <= resolution


def _extend_to_bracket(
    phi: Phi, value0: float, slope0: float, trials: list[tuple[float, float]], max_evals: int
) -> tuple[_Bracket | None, tuple[float, float], int]:
    """A bracket from the trials made so far (``phi(0)`` counts as a point), with more trials where needed."""
    evals = len(trials)
    while True:
        points = sorted([(0.0, value0), *trials])
        index = min(range(len(points)), key=lambda i: points[i][1])
        best = points[index]
        if 0 < index < len(points) - 1:
            (a, fa), (b, fb), (c, fc) = points[index - 1 : index + 2]
            return _Bracket(a, fa, b, fb, c, fc), best, evals
        if evals >= max_evals or (index == 0 and _unresolvable(value0, slope0, points)):
            return None, best, evals
        if index == 0:
            # No trial below phi(0): shrink towards 0 from the shortest trial (the slope there is negative).
            nearest_t, nearest_f = points[1]
            guess = quadratic_minimizer(value0, slope0, nearest_t, nearest_f) if nearest_f < math.inf else 0.0
            t = min(max(guess, 0.1 * nearest_t), 0.5 * nearest_t)
        else:
            # Still descending at the furthest trial: expand by the golden ratio.
            t = best[0] + _GOLDEN * (best[0] - points[index - 1][0])
        trials.append((t, _value(phi, t)))
        evals += 1
