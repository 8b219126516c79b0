"""When the CG phase should hand training back to the first optimizer (no Lightning in here).

The paper's "safe resort": conjugate gradient assumes a convex neighbourhood, and if the assumption fails the CG
phase stops making progress. :class:`FallbackPolicy` is fed what each CG iteration did and the loss of each check,
and answers with a :class:`~lightning_twophase.Decision`, as the detectors do.

Beyond failure, an optional guard (``progress_window``, off by default since 0.4) judges progress at equal compute:
the second phase must not fall far behind where the first optimizer would have been had it gone on. That projection
is the first optimizer's own curve continued: a gradient method's loss past its fast start falls roughly as a power of
the compute spent, ``L(c) ~ c^(-alpha)``, with ``alpha`` read off the first phase's second half. Second-phase progress
comes in bursts (a plateau, then a drop as training images are fitted), which the projection does not foresee: on the
study of 0.3 the guard ended two CG phases that would have ended 6x lower, hence off by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_twophase.arguments import check_count, check_number
from lightning_twophase.decision import Decision, Reason

__all__ = ["FallbackPolicy"]

CONTINUE = Decision(False, Reason.WAITING)


class FallbackPolicy:
    """Fall back after repeated line-search failures, when the loss rose over a window of checks, or when the CG
    phase fell far behind the first optimizer at equal compute.

    Args:
        after_failures: consecutive CG iterations whose line search failed (found no decrease it could resolve).
        loss_window: fall back when the loss at a check is above the loss this many CG checks before (``None``:
            never for this reason).
        loss_rtol: how far, relative to the earlier loss, the loss must rise to count for ``loss_window``. A CG phase
            that has converged repeats its loss up to rounding, which must not count as a rise.
        progress_window: the progress guard judges every this many second-phase checks (``None``, the default, turns
            it off): it falls back if the second phase's decrease of ``ln loss`` since the swap is less than
            ``progress_margin`` times the first optimizer's projected decrease over the same compute (see the module's
            docstring). Off by default since version 0.4: with L-BFGS as the second phase it could only end phases
            that pay (CG's and L-BFGS's progress comes in bursts the projection does not foresee; measured in
            ``docs/benchmarks.md``), while a second phase that fails or makes the loss rise is caught by the other
            two rules.
        progress_margin: the fraction of the first optimizer's projected progress the CG phase must reach.

    Example::

        callback = ConvexitySwapCallback(fallback=FallbackPolicy(after_failures=5, progress_window=None))

    """

    def __init__(
        self,
        after_failures: int = 3,
        loss_window: int | None = 5,
        loss_rtol: float = 1e-3,
        progress_window: int | None = None,
        progress_margin: float = 0.25,
    ) -> None:
        owner = "FallbackPolicy"
        self.after_failures = check_count(owner, "after_failures", after_failures, minimum=1)
        self.loss_window = check_count(owner, "loss_window", loss_window, minimum=1, optional=True)
        self.loss_rtol = check_number(owner, "loss_rtol", loss_rtol, minimum=0.0)
        self.progress_window = check_count(owner, "progress_window", progress_window, minimum=1, optional=True)
        self.progress_margin = check_number(owner, "progress_margin", progress_margin, 0.0, 1.0, strict=True)
        self.begin([])

    def begin(self, first_phase: Sequence[tuple[float, float]]) -> None:
        """A CG phase begins: forget the last one. ``first_phase`` holds the ``(loss, compute)`` of the first
        optimizer's checks, from which the guard projects where it would be (too few points: the guard stays quiet)."""
        self.consecutive_failures = 0
        self.check_losses: list[float] = []
        self.lowest = math.inf
        self.start_loss, self.start_compute, self.exponent = _power_law(first_phase)

    def iteration(self, failed: bool) -> Decision:
        """One CG iteration is done; ``failed`` if its line search found no decrease."""
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0
        if self.consecutive_failures >= self.after_failures:
            message = f"{self.consecutive_failures} consecutive line searches found no decrease"
            return Decision(True, Reason.LINE_SEARCH_FAILURES, message)
        return CONTINUE

    def check(self, loss: float, compute: float) -> Decision:
        """A check of the CG phase: the mean loss of its iterations since the previous check, and the compute spent
        since training began (in the unit of ``begin``'s points)."""
        self.check_losses.append(loss)
        if math.isfinite(loss):
            self.lowest = min(self.lowest, loss)
        window = self.progress_window
        if window is not None and len(self.check_losses) % window == 0:
            decision = self._progress(compute)
            if decision.act:
                return decision
        window = self.loss_window
        if window is None or len(self.check_losses) <= window:
            return CONTINUE
        earlier = self.check_losses[-1 - window]
        if loss > earlier + self.loss_rtol * abs(earlier):
            message = f"the training loss rose over {window} CG checks ({earlier:.4g} -> {loss:.4g})"
            return Decision(True, Reason.LOSS_ROSE, message)
        return CONTINUE

    def _progress(self, compute: float) -> Decision:
        start, spent_before = self.start_loss, self.start_compute
        if not (math.isfinite(self.exponent) and self.exponent > 0 and compute > spent_before > 0):
            return CONTINUE
        # A loss of exactly zero (a perfect fit, L-BFGS's end on separable data) is ahead of any projection.
        gained = math.inf if self.lowest == 0 else math.log(start / self.lowest) if 0 < self.lowest < math.inf else 0.0
        expected = self.exponent * math.log(compute / spent_before)
        if gained >= self.progress_margin * expected:
            return CONTINUE
        return Decision(
            True,
            Reason.BEHIND_FIRST_OPTIMIZER,
            f"after {len(self.check_losses)} CG checks ln(loss) is down {gained:.3g} since the swap, less than "
            f"{self.progress_margin} x the {expected:.3g} the first optimizer's curve (loss ~ compute^-"
            f"{self.exponent:.3g}) projects for the same compute",
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue where the policy was."""
        names = ("consecutive_failures", "check_losses", "lowest", "start_loss", "start_compute", "exponent")
        return {name: getattr(self, name) for name in names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict`."""
        for name, value in state.items():
            setattr(self, name, list(value) if name == "check_losses" else value)


def _power_law(points: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """``(start loss, start compute, exponent)`` of the first phase's curve: the lowest loss it reached, the compute
    at its end, and ``alpha`` of ``L ~ c^-alpha`` over its second half, on the running minimum of the loss (the ups and
    downs near the noise floor are not progress); ``nan`` where there are fewer than three usable points."""
    lowest, running = math.inf, []
    for loss, compute in points:
        if 0 < loss < math.inf and math.isfinite(compute) and compute > 0:
            lowest = min(lowest, loss)
            running.append((lowest, compute))
    if len(running) < 3:
        return (running[-1] if running else (math.nan, math.nan)) + (math.nan,)
    end_loss, end_compute = running[-1]
    half_loss, half_compute = next(point for point in running if point[1] >= end_compute / 2)
    if half_compute >= end_compute:
        return end_loss, end_compute, math.nan
    exponent = math.log(half_loss / end_loss) / math.log(end_compute / half_compute)
    return end_loss, end_compute, exponent
