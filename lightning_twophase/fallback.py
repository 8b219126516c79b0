"""When the CG phase should hand training back to the first-phase optimizer (no Lightning in here).

The paper's "safe resort": conjugate gradient assumes a convex neighbourhood, and if the assumption fails the CG
phase stops making progress. :class:`FallbackPolicy` is fed what each CG iteration did and the loss of each check,
and answers whether to go on or to fall back, with the reason in words, as the detectors answer whether to swap.

Beyond failure, the policy guards progress: every few checks, the CG phase must be decreasing the loss at least as
fast per unit of compute as the first optimizer did before the swap, or be ahead of where the first optimizer would
be by now; otherwise training returns to the first optimizer (from the CG phase's weights, which are no worse) and the
swap rule may try again later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_twophase.rates import trailing_rate

__all__ = ["FallbackDecision", "FallbackPolicy"]


@dataclass(frozen=True)
class FallbackDecision:
    """The policy's answer.

    Attributes:
        fall_back: whether to hand training back to the first-phase optimizer now.
        reason: why, in words (empty when going on).

    """

    fall_back: bool
    reason: str = ""


CONTINUE = FallbackDecision(False)


class FallbackPolicy:
    """Fall back after repeated line-search failures, when the loss rose over a window of checks, or when the CG
    phase is slower than the first optimizer and behind it.

    Args:
        after_failures: consecutive CG iterations whose line search failed (found no decrease it could resolve).
        loss_window: fall back when the loss at a check is above the loss this many CG-phase checks before
            (``None``: never for this reason).
        loss_rtol: how far, relative to the earlier loss, the loss must rise to count for ``loss_window``. A CG phase
            that has converged repeats its loss up to rounding, which must not count as a rise.
        progress_window: the progress guard: every this many CG checks, compare the CG phase's rate over them (the
            decrease of ``ln loss`` per unit of compute, below its lowest loss before them) with the first optimizer's
            before the swap, given to :meth:`begin`. If it is slower, and the CG phase's whole decrease since the swap
            is no more than the first optimizer's would have been (its rate falling off in proportion to the compute
            trained), fall back. A CG phase that is ahead keeps its result when it slows down on converging.
            ``None`` turns the guard off.
        progress_margin: the CG phase must reach this fraction of the first optimizer's rate.

    Example::

        policy = FallbackPolicy(after_failures=3, loss_window=5)
        decision = policy.iteration(failed=diagnostics.failed)
        if decision.fall_back:
            print(decision.reason)

    """

    def __init__(
        self,
        after_failures: int = 3,
        loss_window: int | None = 5,
        loss_rtol: float = 1e-3,
        progress_window: int | None = 10,
        progress_margin: float = 1.0,
    ) -> None:
        if after_failures < 1:
            raise ValueError("FallbackPolicy: `after_failures` must be at least 1.")
        if loss_window is not None and loss_window < 1:
            raise ValueError("FallbackPolicy: `loss_window` must be at least 1 or None.")
        if not (math.isfinite(loss_rtol) and loss_rtol >= 0):
            raise ValueError(f"FallbackPolicy: `loss_rtol` must be a finite number >= 0, got {loss_rtol}.")
        if progress_window is not None and progress_window < 2:
            raise ValueError("FallbackPolicy: `progress_window` must be at least 2 or None.")
        if not progress_margin > 0:
            raise ValueError(f"FallbackPolicy: `progress_margin` must be positive, got {progress_margin}.")
        self.after_failures = after_failures
        self.loss_window = loss_window
        self.loss_rtol = loss_rtol
        self.progress_window = progress_window
        self.progress_margin = progress_margin
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new CG phase begins)."""
        self.consecutive_failures = 0
        self.check_losses: list[float] = []
        self.check_points: list[tuple[float, float]] = []  # (loss, compute) of the CG phase's checks
        self.reference_rate = math.nan
        self.start: tuple[float, float] | None = None

    def begin(self, reference_rate: float, start: tuple[float, float] | None = None) -> None:
        """A CG phase begins; ``reference_rate`` is the first optimizer's rate just before the swap (``nan``: none
        known, the progress guard stays quiet) and ``start`` the ``(loss, compute)`` the CG phase's progress is
        measured from: the lowest loss the first optimizer reached recently, so that regaining ground it had already
        won does not count."""
        self.reset()
        self.reference_rate = reference_rate
        self.start = start

    def iteration(self, failed: bool) -> FallbackDecision:
        """One CG iteration is done; ``failed`` if its line search found no decrease."""
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0
        if self.consecutive_failures >= self.after_failures:
            return FallbackDecision(True, f"{self.consecutive_failures} consecutive line searches found no decrease")
        return CONTINUE

    def check(self, loss: float, compute: float = math.nan) -> FallbackDecision:
        """A check of the CG phase: the mean loss of its iterations since the previous check, and the compute spent
        so far (for the progress guard)."""
        self.check_losses.append(loss)
        self.check_points.append((loss, compute))
        if self.progress_window is not None and len(self.check_points) % self.progress_window == 0:
            decision = self._progress()
            if decision.fall_back:
                return decision
        window = self.loss_window
        if window is None or len(self.check_losses) <= window:
            return CONTINUE
        earlier = self.check_losses[-1 - window]
        if loss > earlier + self.loss_rtol * abs(earlier):
            return FallbackDecision(
                True, f"the training loss rose over {window} CG checks ({earlier:.4g} -> {loss:.4g})"
            )
        return CONTINUE

    def _progress(self) -> FallbackDecision:
        reference = self.reference_rate
        points = self.check_points if self.start is None else [self.start, *self.check_points]
        window = self.progress_window + 1
        cg_rate = trailing_rate(points, window)  # over the last window only: how fast the CG phase goes now
        if not (math.isfinite(cg_rate) and reference > 0) or cg_rate >= self.progress_margin * reference:
            return CONTINUE
        (first_loss, first_compute), (_, compute) = points[0], points[-1]
        lowest = min(loss for loss, _ in points)
        gained = math.log(first_loss / lowest) if lowest > 0 and first_loss < math.inf else math.nan
        expected = self.progress_margin * reference * _elapsed(first_compute, compute)
        if math.isfinite(gained) and gained > expected:
            return CONTINUE  # slower now, but still ahead of where the first optimizer would be: it keeps its result
        return FallbackDecision(
            True,
            f"over its last {min(window, len(points)) - 1} checks the CG phase decreased ln(loss) by {cg_rate:.3g} per "
            f"unit of compute, slower than the first optimizer's {reference:.3g} before the swap, and it is not ahead "
            f"of where the first optimizer would be (ln(loss) down {gained:.3g} against {expected:.3g})",
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue where the policy was."""
        return {
            "consecutive_failures": self.consecutive_failures,
            "check_losses": list(self.check_losses),
            "check_points": [list(point) for point in self.check_points],
            "reference_rate": self.reference_rate,
            "start": None if self.start is None else list(self.start),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict`."""
        self.consecutive_failures = state["consecutive_failures"]
        self.check_losses = list(state["check_losses"])
        self.check_points = [(loss, compute) for loss, compute in state.get("check_points", [])]
        self.reference_rate = state.get("reference_rate", math.nan)
        start = state.get("start")
        self.start = None if start is None else (start[0], start[1])


def _elapsed(start: float, now: float) -> float:
    """The compute the first optimizer's rate is projected over, from ``start`` to ``now``: with its rate falling off in
    proportion to the compute trained (as it does for a gradient method past its fast start), ``start * ln(now /
    start)``; ``now - start`` where the start is unknown."""
    if start > 0 and now > start:
        return start * math.log(now / start)
    return max(now - start, 0.0) if math.isfinite(now - start) else math.nan
