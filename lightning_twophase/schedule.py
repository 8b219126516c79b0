"""When the swap comes: a swap rule within the bounds every rule shares (no Lightning in here).

The detector judges the curve; :class:`SwapSchedule` owns the bounds (as ``StochasticWeightAveraging`` owns
``swa_epoch_start``): no swap by the detector before ``min_epochs``, a swap at ``swap_epoch`` at the latest, a
fraction of the training's length resolved before training. A rule of one's own gets the bounds for free.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_twophase.arguments import check_count, check_epoch, epochs_of
from lightning_twophase.decision import Decision, Reason
from lightning_twophase.detection import SwapDetector

__all__ = ["SwapSchedule"]


class SwapSchedule:
    """The detector's decisions within the bounds.

    Args:
        detector: the swap rule, or ``None`` (the swap comes at ``swap_epoch``).
        swap_epoch: the latest swap, in epochs, or a fraction of the training's length in (0, 1); ``None``: no bound.
        min_epochs: no swap by the detector before this many epochs.

    """

    def __init__(self, detector: SwapDetector | None, swap_epoch: int | float | None, min_epochs: int) -> None:
        owner = "ConvexitySwapCallback"
        self.detector = detector
        self.swap_epoch = check_epoch(owner, "swap_epoch", swap_epoch)
        if detector is None and self.swap_epoch is None:
            raise ValueError(f"{owner}: with detector=None the swap comes at `swap_epoch`, which must not be None.")
        self.min_epochs = check_count(owner, "min_epochs", min_epochs)
        if detector is not None:  # a rule's own attribute: 0 or None would fail at the first measure, not here
            name = type(detector).__name__
            hint = "how often the first phase measures the gradient norm, in optimizer steps: 1 for a rule that reads"
            try:
                check_count(name, "norm_every_n_steps", detector.norm_every_n_steps, minimum=1)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{error} It is {hint} the norm, more if it does not.") from None
        #: ``swap_epoch`` in epochs, once :meth:`setup` resolved it.
        self.swap_at: int | None = None if isinstance(self.swap_epoch, float) else self.swap_epoch
        #: Set by :meth:`setup` when the bound leaves no swap in the training (say it, train on): why.
        self.note: str | None = None

    @property
    def norm_every_n_steps(self) -> int:
        """How often the first phase measures the gradient norm: the detector's need, or a sample for the logs."""
        return 32 if self.detector is None else int(self.detector.norm_every_n_steps)

    def setup(self, epochs: int | None) -> list[str]:
        """Resolve the bounds for a training of ``epochs`` epochs (``None``: unknown); the problems, if any.

        A bound that leaves no swap in the training (``detector=None`` with ``swap_epoch`` at or beyond its end, a
        training of one epoch such as ``fast_dev_run``) is no problem: :attr:`note` says why, and the first optimizer
        trains to the end."""
        setting, given = self.swap_epoch, f"swap_epoch={self.swap_epoch}"
        problems = []
        self.note = None
        if isinstance(setting, float):
            self.swap_at = None if epochs is None else epochs_of(setting, epochs)
            if epochs is None:
                problems.append(
                    f"`{given}` is a fraction of the training's length, but it is unknown (no max_epochs, and no "
                    "max_steps with a dataloader of known length); pass swap_epoch as a number of epochs"
                )
            elif self.swap_at == 0 and epochs <= 1:
                self.swap_at = 1  # a fraction of one epoch: after it at the earliest, which leaves no CG iteration
            elif self.swap_at == 0:
                problems.append(
                    f"`{given}` of {epochs} epochs rounds to no epoch of the first optimizer; pass swap_epoch=0 if "
                    "conjugate gradient from the start is meant, or a larger fraction"
                )
        swap_at = self.swap_at
        if swap_at is not None and self.detector is None and epochs is not None and swap_at >= epochs:
            resolved = f" (epoch {swap_at})" if isinstance(setting, float) else ""
            smaller = "fraction" if isinstance(setting, float) else "epoch, or a fraction of max_epochs"
            self.note = (
                f"ConvexitySwapCallback: `{given}`{resolved} is not below the training's {epochs} epoch(s): no "
                "second-phase iteration could follow the swap, so this training has none and the first optimizer "
                f"trains to the end; pass a smaller {smaller} for a swap"
            )
        if swap_at is not None and self.detector is not None and self.min_epochs > swap_at:
            problems.append(f"min_epochs={self.min_epochs} comes after `{given}` ({swap_at} epochs): lower one of them")
        if self.detector is not None:
            try:
                self.detector.setup(epochs)
            except ValueError as error:
                problems.append(str(error))
        return problems

    def decide(self, loss: float, grad_norm: float, epoch: int, step: int) -> Decision:
        """The detector's decision for this check, within the bounds."""
        if not math.isfinite(loss):
            # A diverged first optimizer is no point to swap at, not even at the bound: the next finite check is.
            message = f"the training loss {loss} is not finite (has the first optimizer diverged?)"
            return Decision(False, Reason.NON_FINITE, message)
        decision: Decision | None = None
        if self.detector is not None:
            decision = self.detector.update(loss, grad_norm, epoch=epoch, step=step)
            if not isinstance(decision, Decision):
                raise TypeError(
                    f"ConvexitySwapCallback: {type(self.detector).__name__}.update must return a "
                    f"lightning_twophase.Decision, it returned {decision!r} of type {type(decision).__name__}."
                )
            if decision.act and epoch >= self.min_epochs:
                return decision
        scalars = {} if decision is None else decision.scalars
        if self.swap_at is not None and epoch >= self.swap_at:
            return Decision(True, Reason.SWAP_EPOCH, f"the swap epoch {self.swap_at} was reached", scalars)
        if decision is not None and decision.act:
            message = f"before min_epochs={self.min_epochs}: {decision.message}"
            return Decision(False, Reason.BEFORE_MIN_EPOCHS, message, scalars)
        return decision or Decision(False, Reason.WAITING, f"waiting for the swap epoch {self.swap_at}")

    def state_dict(self) -> dict[str, Any]:
        """The detector's state, and its type (a checkpoint of another detector is not loaded into this one)."""
        detector = self.detector
        return {
            "detector": None if detector is None else detector.state_dict(),
            "detector_type": type(detector).__name__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Restore the detector's state; a message if the checkpoint's detector was of another type (not loaded)."""
        saved, own = state["detector_type"], type(self.detector).__name__
        if self.detector is None or state["detector"] is None:
            return None
        if saved != own:
            return (
                f"ConvexitySwapCallback: the checkpoint's swap detector was a {saved}, this run's is a {own}: it "
                "starts afresh from this point."
            )
        self.detector.load_state_dict(state["detector"])
        return None
