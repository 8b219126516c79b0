"""Swap detectors: rules that watch the first phase's curve and say when to swap (no Lightning in here).

Feed a detector one point per check (the mean training loss and gradient norm since the previous check) and it answers
with a :class:`~lightning_twophase.Decision`. Detectors judge only the curve: the bounds every rule shares (no swap
before ``min_epochs``, a swap at ``swap_epoch`` at the latest) belong to the callback.

* :class:`PlateauDetector`, the default: swap once the first optimizer has stopped improving. Constant-rate Adam
  slows down as it nears its noise floor, while full-batch conjugate gradient, which has no such floor, converges
  fast in the convex region around the minimum: measured on the project's study (``benchmarks/swap_study.py``).
* :class:`GradientNormPeakDetector`, the paper's Algorithm 1 as published: in the non-convex region near the initial
  weights the gradient norm grows while the loss falls, in the convex region around the minimum it shrinks; swap once
  the norm falls below ``factor`` times its running peak.

A rule of one's own subclasses :class:`SwapDetector`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

from lightning_twophase import tags
from lightning_twophase.arguments import check_count, check_epoch, check_flag, check_number, epochs_of
from lightning_twophase.decision import Decision, Reason

__all__ = ["GradientNormPeakDetector", "PlateauDetector", "SwapDetector"]


class SwapDetector(ABC):
    """What :class:`~lightning_twophase.ConvexitySwapCallback` needs from a swap rule: subclass it for your own.

    The callback calls :meth:`setup` once before training, :meth:`update` once per check with numbers that are
    identical on every rank, and keeps :meth:`state_dict` in its checkpoints. Only :meth:`update` must be written.
    The callback works on its own copy of the instance it is given, so one instance can configure any number of runs.

    Example::

        class LossBelow(SwapDetector):
            def __init__(self, threshold: float) -> None:
                self.threshold = threshold

            def update(self, loss, grad_norm, *, epoch, step):
                if loss < self.threshold:
                    return Decision(True, Reason.RULE, f"the loss {loss:.3g} fell below {self.threshold}")
                return Decision(False, Reason.WAITING, "the loss is still above the threshold")

    """

    #: How often the first phase measures the gradient norm, in optimizer steps (at least once per check): 1 for a
    #: rule that reads the norm, more for one that only logs it (each measure costs a pass over the gradients). A
    #: whole number >= 1, checked when the callback is made.
    norm_every_n_steps: int = 1

    def setup(self, max_epochs: int | None) -> None:
        """Training is about to start and lasts ``max_epochs`` epochs (``None``: unknown; ``max_steps`` is converted
        to epochs).
        Resolve options given as fractions of it here."""
        return None

    @abstractmethod
    def update(self, loss: float, grad_norm: float, *, epoch: int, step: int) -> Decision:
        """Add one check and decide whether to swap now.

        Args:
            loss: the mean training loss since the previous check.
            grad_norm: the mean gradient norm since the previous check (``nan`` where it was not measured).
            epoch: the epochs trained so far.
            step: the global step (optimizer steps so far).

        """

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue where the detector was."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict`."""
        return None


class PlateauDetector(SwapDetector):
    r"""Swap once the first optimizer has stopped improving: its best training loss fell by less than
    ``min_improvement`` (relative) over the last ``window`` epochs.

    The best (lowest) epoch-mean loss is what counts, so the ups and downs of mini-batch training near its noise floor
    are neither progress nor a plateau. The rule compares the best loss now with the best loss ``window`` epochs ago;
    it cannot fire before ``window`` epochs have been trained, nor before the best loss has fallen to half its first
    value: a plateau near the initial weights, before training took off, is the non-convex region the paper warns of,
    not the end of the first optimizer's progress. Losses are assumed positive (for a loss that can be negative the
    relative improvement is taken against its magnitude; prefer ``swap_epoch`` there).

    Args:
        window: epochs over which the improvement is measured; a float in (0, 1) is that fraction of ``max_epochs``.
        min_improvement: the relative decrease of the best loss over the window below which training counts as
            stalled: ``0.2`` swaps once the best loss fell by less than 20 % over the window.

    Example::

        detector = PlateauDetector(window=0.1, min_improvement=0.1)
        trainer = Trainer(max_epochs=300, callbacks=[ConvexitySwapCallback(detector=detector)])

    """

    #: The rule reads only the loss: the norm is measured on one step in 32, for the logs.
    norm_every_n_steps = 32

    def __init__(self, window: int | float = 0.2, min_improvement: float = 0.2) -> None:
        owner = "PlateauDetector"
        window = check_epoch(owner, "window", window, optional=False)
        if window == 0:
            raise ValueError(f"{owner}: `window` must be at least 1 epoch or a fraction of max_epochs in (0, 1).")
        self.window = window
        self.min_improvement = check_number(owner, "min_improvement", min_improvement, 0.0, 1.0, strict=True)
        self._epochs: int | None = None if isinstance(window, float) else int(window)
        self.best = self.first = math.inf
        #: ``(epoch, best loss so far)`` of the checks that the window still reaches back to.
        self.points: list[tuple[int, float]] = []

    def setup(self, max_epochs: int | None) -> None:
        if isinstance(self.window, float):
            if max_epochs is None:
                raise ValueError(
                    f"PlateauDetector: `window={self.window}` is a fraction of max_epochs, but the Trainer has no "
                    "max_epochs; pass the window as a number of epochs."
                )
            self._epochs = max(1, epochs_of(self.window, max_epochs))

    @property
    def window_epochs(self) -> int:
        """The window in epochs (known after :meth:`setup` when given as a fraction)."""
        if self._epochs is None:
            raise RuntimeError("PlateauDetector: the window is a fraction of max_epochs; call setup(max_epochs) first.")
        return self._epochs

    def update(self, loss: float, grad_norm: float, *, epoch: int, step: int) -> Decision:
        if not math.isfinite(loss):
            return Decision(False, Reason.NON_FINITE, f"non-finite loss {loss} ignored")
        self.first = loss if math.isinf(self.first) else self.first
        self.best = min(self.best, loss)
        self.points.append((epoch, self.best))
        start = epoch - self.window_epochs
        earlier = [point for point in self.points if point[0] <= start]
        if not earlier:
            return Decision(False, Reason.WAITING, f"the first {self.window_epochs} epochs fill the window")
        # Keep the last point at or before the window's start: the window never reaches further back.
        self.points = self.points[len(earlier) - 1 :]
        then = earlier[-1][1]
        improvement = (then - self.best) / abs(then) if then != 0 else 0.0  # a loss stuck at 0 is a plateau
        described = (
            f"the best training loss fell by {100 * improvement:.3g} % over the last {self.window_epochs} epochs "
            f"({then:.4g} -> {self.best:.4g})"
        )
        scalars = {tags.IMPROVEMENT: improvement}
        if improvement >= self.min_improvement:
            return Decision(False, Reason.WAITING, described, scalars)
        if self.best > self.first / 2:
            message = f"{described}, but the loss has not yet fallen to half its first value {self.first:.4g}"
            return Decision(False, Reason.WAITING, message, scalars)
        message = f"{described}, less than {100 * self.min_improvement:.3g} %"
        return Decision(True, Reason.PLATEAU, message, scalars)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "first": self.first, "points": [list(point) for point in self.points]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.first = state["best"], state["first"]
        self.points = [(int(epoch), float(best)) for epoch, best in state["points"]]


class GradientNormPeakDetector(SwapDetector):
    r"""The paper's Algorithm 1, with the options a long run needs.

    Each call of :meth:`update` adds one check. The swap fires when the norm has stayed below ``factor * gn_max`` for
    ``patience`` consecutive checks, where ``gn_max`` is the running maximum. Every check is judged afresh: an answer
    held back by ``min_epochs`` swaps later only if the norm is still below the threshold then (a rise to a new peak
    in between starts the count again).

    Args:
        factor: the fraction of the peak below which the norm must fall (the paper's 0.9). Because mini-batch
            gradients fluctuate, the swap waits for a clear fall rather than the first decrease.
        smoothing: weight of the past in an exponential moving average of the norm (``0`` = none, the paper's
            rule). The average is bias-corrected, so early checks are not pulled towards zero.
        patience: how many consecutive checks must be below the threshold.
        require_rise: count a peak only after the norm has risen at least once. A norm that only falls from the
            first check has no peak to find (the paper: fall back to a non-convex method when there is no single
            peak). Turn off if the peak may lie inside the first check interval.

    Example::

        detector = GradientNormPeakDetector(factor=0.9, patience=2)
        for epoch, (loss, grad_norm) in enumerate(curve, start=1):
            decision = detector.update(loss, grad_norm, epoch=epoch, step=0)
            if decision.act:
                print(decision.message)
                break

    """

    def __init__(
        self, factor: float = 0.9, smoothing: float = 0.0, patience: int = 1, require_rise: bool = True
    ) -> None:
        owner = "GradientNormPeakDetector"
        self.factor = check_number(owner, "factor", factor, 0.0, 1.0, strict=True)
        self.smoothing = check_number(owner, "smoothing", smoothing, 0.0, 1.0)
        if self.smoothing == 1.0:
            raise ValueError(f"{owner}: `smoothing` must lie in [0, 1), got {smoothing!r}.")
        self.patience = check_count(owner, "patience", patience, minimum=1)
        self.require_rise = check_flag(owner, "require_rise", require_rise)
        self.checks = 0
        self.peak = 0.0
        self.peak_loss = math.nan
        self.peak_epoch: int | None = None
        self.risen = False
        self.below_count = 0
        self._average = 0.0
        self._average_weight = 0.0

    def _smooth(self, grad_norm: float) -> float:
        if self.smoothing == 0.0:
            return grad_norm
        self._average = self.smoothing * self._average + (1.0 - self.smoothing) * grad_norm
        self._average_weight = self.smoothing * self._average_weight + (1.0 - self.smoothing)
        return self._average / self._average_weight

    def update(self, loss: float, grad_norm: float, *, epoch: int, step: int) -> Decision:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # A non-finite check says nothing about the curve; keep the state and let the run's own guards act.
            return self._decide(Reason.NON_FINITE, f"non-finite check (loss {loss}, gradient norm {grad_norm}) ignored")
        smoothed = self._smooth(grad_norm)
        self.checks += 1
        if smoothed > self.peak:
            self.risen = self.risen or self.checks > 1
            self.peak, self.peak_loss, self.peak_epoch = smoothed, loss, epoch
            self.below_count = 0
        elif smoothed < self.factor * self.peak:
            self.below_count += 1
        else:
            self.below_count = 0
        has_peak = self.risen or not self.require_rise
        if has_peak and self.below_count >= self.patience:
            return self._decide(
                Reason.NORM_PEAK,
                f"the gradient norm {smoothed:.4g} stayed below {self.factor} x its peak {self.peak:.4g} "
                f"(epoch {self.peak_epoch}, loss {self.peak_loss:.4g}) for {self.below_count} check(s)",
            )
        return self._decide(Reason.WAITING, self._waiting_reason(smoothed))

    def _waiting_reason(self, smoothed: float) -> str:
        if smoothed >= self.peak:
            return f"the gradient norm is at a new peak {smoothed:.4g}"
        if self.below_count == 0:
            return f"the gradient norm {smoothed:.4g} is within {self.factor} of its peak {self.peak:.4g}"
        if self.below_count < self.patience:
            return f"below the threshold for {self.below_count} of {self.patience} check(s)"
        return "the gradient norm has only fallen since the first check: no peak yet"

    def _scalars(self) -> dict[str, float]:
        return {tags.GN_MAX: self.peak, tags.THRESHOLD: self.factor * self.peak}

    def _decide(self, reason: Reason, message: str) -> Decision:
        return Decision(reason is Reason.NORM_PEAK, reason, message, self._scalars())

    def state_dict(self) -> dict[str, Any]:
        names = ("checks", "peak", "peak_loss", "peak_epoch", "risen", "below_count", "_average", "_average_weight")
        return {name.lstrip("_"): getattr(self, name) for name in names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = ("checks", "peak", "peak_loss", "peak_epoch", "risen", "below_count", "_average", "_average_weight")
        for name in names:
            setattr(self, name, state[name.lstrip("_")])
