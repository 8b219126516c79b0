"""Detect the swap point: the peak of the gradient norm along the training path (no Lightning in here).

The paper's hypothesis: in the non-convex region near the initial weights the gradient norm grows while the loss
falls; in the convex region around the minimum it shrinks. Its Algorithm 1 therefore keeps the running maximum
``gn_max`` of the gradient norm and swaps once the norm falls below ``factor * gn_max``. Feed the detector one
``(loss, grad_norm)`` point per check and it answers whether to swap, and why.

Any object with the methods of :class:`SwapDetector` can take the place of the built-in detectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from lightning_twophase import tags

__all__ = ["GradientNormPeakDetector", "SwapDecision", "SwapDetector"]


@dataclass(frozen=True)
class SwapDecision:
    """A detector's answer for one check.

    Attributes:
        swap: whether the swap should happen now.
        reason: why (or why not), in words.
        scalars: numbers the detector wants logged with the check, by tag (see :mod:`lightning_twophase.tags`).

    """

    swap: bool
    reason: str
    scalars: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class SwapDetector(Protocol):
    """What :class:`~lightning_twophase.ConvexitySwapCallback` needs from a detector.

    The callback calls :meth:`update` once per check, with numbers that are identical on every rank, and keeps the
    detector's state in its checkpoints.
    """

    def update(self, loss: float, grad_norm: float, *, epoch: int, step: int) -> SwapDecision:
        """Add one check: the mean training loss and gradient norm since the previous check, the number of epochs
        trained and the global step; answer whether to swap now, and why."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue where the detector was."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict`."""
        ...


class GradientNormPeakDetector:
    r"""The paper's Algorithm 1, with the options a long run needs.

    Each call of :meth:`update` adds one check: the mean training loss and gradient norm since the previous check.
    The swap fires when the norm has stayed below ``factor * gn_max`` for ``patience`` consecutive checks, where
    ``gn_max`` is the running maximum. Once fired, the detector keeps answering ``swap=True``.

    Args:
        factor: the fraction of the peak below which the norm must fall (the paper's 0.9). Because mini-batch
            gradients fluctuate, the swap waits for a clear fall rather than the first decrease.
        smoothing: weight of the past in an exponential moving average of the norm (``0`` = none, the paper's
            rule). The average is bias-corrected, so early checks are not pulled towards zero.
        patience: how many consecutive checks must be below the threshold.
        min_epochs: no swap before this epoch (counted from 0, as Lightning's ``current_epoch``).
        min_steps: no swap before this global step.
        fixed_swap_epoch: swap at this epoch whatever the curve does (the paper's table used a fixed 30 % split).
        max_swap_epoch: swap at this epoch at the latest, if the rule has not fired before.
        require_rise: count a peak only after the norm has risen at least once. A norm that only falls from the
            first check has no peak to find (the paper: fall back to a non-convex method when there is no single
            peak). Turn off if the peak may lie inside the first check interval.

    Example::

        detector = GradientNormPeakDetector(factor=0.9, patience=2)
        for epoch, (loss, grad_norm) in enumerate(curve):
            decision = detector.update(loss, grad_norm, epoch=epoch)
            if decision.swap:
                print(decision.reason)
                break

    """

    def __init__(
        self,
        factor: float = 0.9,
        smoothing: float = 0.0,
        patience: int = 1,
        min_epochs: int = 0,
        min_steps: int = 0,
        fixed_swap_epoch: int | None = None,
        max_swap_epoch: int | None = None,
        require_rise: bool = True,
    ) -> None:
        if not 0 < factor < 1:
            raise ValueError(f"GradientNormPeakDetector: `factor` must lie in (0, 1), got {factor}.")
        if not 0 <= smoothing < 1:
            raise ValueError(f"GradientNormPeakDetector: `smoothing` must lie in [0, 1), got {smoothing}.")
        if patience < 1:
            raise ValueError(f"GradientNormPeakDetector: `patience` must be at least 1, got {patience}.")
        if min_epochs < 0 or min_steps < 0:
            raise ValueError("GradientNormPeakDetector: `min_epochs` and `min_steps` must not be negative.")
        for name, value in (("fixed_swap_epoch", fixed_swap_epoch), ("max_swap_epoch", max_swap_epoch)):
            if value is not None and value < 0:
                raise ValueError(f"GradientNormPeakDetector: `{name}` must not be negative, got {value}.")
        self.factor = factor
        self.smoothing = smoothing
        self.patience = patience
        self.min_epochs = min_epochs
        self.min_steps = min_steps
        self.fixed_swap_epoch = fixed_swap_epoch
        self.max_swap_epoch = max_swap_epoch
        self.require_rise = require_rise
        self.reset()

    def reset(self) -> None:
        """Forget every check."""
        self.checks = 0
        self.peak = 0.0
        self.peak_loss = math.nan
        self.peak_epoch: int | None = None
        self.risen = False
        self.below_count = 0
        self.fired: SwapDecision | None = None
        self._average = 0.0
        self._average_weight = 0.0

    def _smooth(self, grad_norm: float) -> float:
        if self.smoothing == 0.0:
            return grad_norm
        self._average = self.smoothing * self._average + (1.0 - self.smoothing) * grad_norm
        self._average_weight = self.smoothing * self._average_weight + (1.0 - self.smoothing)
        return self._average / self._average_weight

    def update(self, loss: float, grad_norm: float, *, epoch: int = 0, step: int = 0) -> SwapDecision:
        """Add one check and decide.

        Args:
            loss: the mean training loss since the previous check.
            grad_norm: the mean gradient norm since the previous check.
            epoch: the epoch the check belongs to (for the epoch-based rules).
            step: the global step of the check (for ``min_steps``).

        Returns:
            The decision, with the reason in words.

        """
        if self.fired is not None:
            return self.fired
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # A non-finite check says nothing about the curve; keep the state and let the run's own guards act.
            return self._decide(False, f"non-finite check (loss {loss}, gradient norm {grad_norm}) ignored")
        smoothed = self._smooth(grad_norm)
        self.checks += 1
        if smoothed > self.peak:
            if self.checks > 1:
                self.risen = True
            self.peak, self.peak_loss, self.peak_epoch = smoothed, loss, epoch
            self.below_count = 0
        elif smoothed < self.factor * self.peak:
            self.below_count += 1
        else:
            self.below_count = 0

        if self.fixed_swap_epoch is not None:
            if epoch >= self.fixed_swap_epoch:
                return self._decide(True, f"the fixed swap epoch {self.fixed_swap_epoch} was reached")
            return self._decide(False, f"waiting for the fixed swap epoch {self.fixed_swap_epoch}")
        has_peak = self.risen or not self.require_rise
        if has_peak and self.below_count >= self.patience and epoch >= self.min_epochs and step >= self.min_steps:
            return self._decide(
                True,
                f"the gradient norm {smoothed:.4g} stayed below {self.factor} x its peak {self.peak:.4g} "
                f"(epoch {self.peak_epoch}, loss {self.peak_loss:.4g}) for {self.below_count} check(s)",
            )
        if self.max_swap_epoch is not None and epoch >= self.max_swap_epoch:
            return self._decide(True, f"no peak was detected by the maximum swap epoch {self.max_swap_epoch}")
        return self._decide(False, self._waiting_reason(smoothed, epoch, step))

    def _waiting_reason(self, smoothed: float, epoch: int, step: int) -> str:
        if smoothed >= self.peak:
            return f"the gradient norm is at a new peak {smoothed:.4g}"
        if self.below_count == 0:
            return f"the gradient norm {smoothed:.4g} is within {self.factor} of its peak {self.peak:.4g}"
        if self.below_count < self.patience:
            return f"below the threshold for {self.below_count} of {self.patience} check(s)"
        if not (self.risen or not self.require_rise):
            return "the gradient norm has only fallen since the first check: no peak yet"
        if epoch < self.min_epochs:
            return f"below the threshold, but before min_epochs={self.min_epochs}"
        return f"below the threshold, but before min_steps={self.min_steps}"

    def _decide(self, swap: bool, reason: str) -> SwapDecision:
        decision = SwapDecision(swap, reason, {tags.GN_MAX: self.peak, tags.THRESHOLD: self.factor * self.peak})
        if swap:
            self.fired = decision
        return decision

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue where the detector was."""
        return {
            "checks": self.checks,
            "peak": self.peak,
            "peak_loss": self.peak_loss,
            "peak_epoch": self.peak_epoch,
            "risen": self.risen,
            "below_count": self.below_count,
            "fired": None if self.fired is None else {"reason": self.fired.reason, "scalars": dict(self.fired.scalars)},
            "average": self._average,
            "average_weight": self._average_weight,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict`."""
        self.checks = state["checks"]
        self.peak = state["peak"]
        self.peak_loss = state["peak_loss"]
        self.peak_epoch = state["peak_epoch"]
        self.risen = state["risen"]
        self.below_count = state["below_count"]
        self.fired = None if state["fired"] is None else SwapDecision(True, **state["fired"])
        self._average = state["average"]
        self._average_weight = state["average_weight"]
