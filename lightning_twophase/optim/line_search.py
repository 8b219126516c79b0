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
    "quadratic_minimizer",
    "strong_wolfe",
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
