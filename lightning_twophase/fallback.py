"""When the CG phase should hand training back to the first-phase optimizer (no Lightning in here).

The paper's "safe resort": conjugate gradient assumes a convex neighbourhood, and if the assumption fails the CG
phase stops making progress. :class:`FallbackPolicy` is fed what each CG iteration did and the loss of each check,
and answers whether to go on or to fall back, with the reason in words, as the detectors answer whether to swap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
    """Fall back after repeated line-search failures, or when the loss rose over a window of checks.

    Args:
        after_failures: consecutive CG iterations whose line search failed (found no decrease it could resolve).
        loss_window: fall back when the loss at a check is above the loss this many CG-phase checks before
            (``None``: never for this reason).
        loss_rtol: how far, relative to the earlier loss, the loss must rise to count for ``loss_window``. A CG phase
            that has converged repeats its loss up to rounding, which must not count as a rise.

    Example::

        policy = FallbackPolicy(after_failures=3, loss_window=5)
        decision = policy.iteration(failed=diagnostics.failed)
        if decision.fall_back:
            print(decision.reason)

    """

    def __init__(self, after_failures: int = 3, loss_window: int | None = 5, loss_rtol: float = 1e-3) -> None:
        if after_failures < 1:
            raise ValueError("FallbackPolicy: `after_failures` must be at least 1.")
        if loss_window is not None and loss_window < 1:
            raise ValueError("FallbackPolicy: `loss_window` must be at least 1 or None.")
        if not (math.isfinite(loss_rtol) and loss_rtol >= 0):
            raise ValueError(f"FallbackPolicy: `loss_rtol` must be a finite number >= 0, got {loss_rtol}.")
        self.after_failures = after_failures
        self.loss_window = loss_window
        self.loss_rtol = loss_rtol
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new CG phase begins)."""
        self.consecutive_failures = 0
        self.check_losses: list[float] = []

    def iteration(self, failed: bool) -> FallbackDecision:
        """One CG iteration is done; ``failed`` if its line search found no decrease."""
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0
        if self.consecutive_failures >= self.after_failures:
            return FallbackDecision(True, f"{self.consecutive_failures} consecutive line searches found no decrease")
        return CONTINUE

    def check(self, loss: float) -> FallbackDecision:
        """A check of the CG phase: the mean loss of its iterations since the previous check."""
        self.check_losses.append(loss)
        window = self.loss_window
        if window is None or len(self.check_losses) <= window:
            return CONTINUE
        earlier = self.check_losses[-1 - window]
        if loss > earlier + self.loss_rtol * abs(earlier):
            return FallbackDecision(
                True, f"the training loss rose over {window} CG checks ({earlier:.4g} -> {loss:.4g})"
            )
        return CONTINUE

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue where the policy was."""
        return {"consecutive_failures": self.consecutive_failures, "check_losses": list(self.check_losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict`."""
        self.consecutive_failures = state["consecutive_failures"]
        self.check_losses = list(state["check_losses"])
