"""Decide the swap point (no Lightning in here). Feed a detector one point per check and it answers whether to swap,
and why.

* :class:`ProbeDetector`, the default: swap once a short, measured run of full-batch conjugate gradient (a probe,
  after which the weights are put back) decreases the training loss faster per unit of compute than the first
  optimizer does. Adam at a constant learning rate slows down as mini-batch noise comes to dominate its steps;
  full-batch CG has no such floor, and the probe tells when it is ahead.
* :class:`GradientNormPeakDetector`, the paper's Algorithm 1 as published: the paper's hypothesis is that in the
  non-convex region near the initial weights the gradient norm grows while the loss falls, and in the convex region
  around the minimum it shrinks; the rule keeps the running maximum ``gn_max`` of the gradient norm and swaps once
  the norm falls below ``factor * gn_max``.

Any object with the methods of :class:`SwapDetector` can take the place of the built-in detectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from lightning_twophase import tags
from lightning_twophase.rates import log_loss_rate, trailing_rate

__all__ = ["GradientNormPeakDetector", "ProbeDetector", "ProbeResult", "SwapDecision", "SwapDetector"]

#: A check whose loss is this many times the lowest of the window is in a jump of the loss (no probe, no judgment).
JUMP = 1.5


@dataclass(frozen=True)
class SwapDecision:
    """A detector's answer for one check.

    Attributes:
        swap: whether the swap should happen now.
        reason: why (or why not), in words.
        scalars: numbers the detector wants logged with the check, by tag (see :mod:`lightning_twophase.tags`).
        probe: ask for a probe over the next check interval: its batches are kept, and at the next check a few
            full-batch CG iterations run from the weights of that moment; what they did comes back as the
            ``probe`` of the next :meth:`SwapDetector.update`, and the weights are put back.

    """

    swap: bool
    reason: str
    scalars: Mapping[str, float] = field(default_factory=dict)
    probe: bool = False


@dataclass(frozen=True)
class ProbeResult:
    """What a probe did: a few full-batch CG iterations from the current weights (put back afterwards).

    Attributes:
        start_loss: the full-batch training loss where the probe started.
        losses: the loss after each iteration.
        computes: the compute spent up to the end of each iteration, in the callback's unit (samples forward
            + 2 x backward, all ranks).

    """

    start_loss: float
    losses: tuple[float, ...]
    computes: tuple[float, ...]

    @property
    def iterations(self) -> int:
        return len(self.losses)

    @property
    def compute(self) -> float:
        """What the whole probe cost."""
        return self.computes[-1] if self.computes else 0.0

    @property
    def rate(self) -> float:
        """The decrease of ``ln loss`` per unit of compute from the probe's start (see :meth:`rate_below`)."""
        return self.rate_below(self.start_loss)

    def rate_below(self, baseline: float) -> float:
        """The decrease of ``ln loss`` per unit of compute (see :mod:`lightning_twophase.rates`) from the lower of the
        start and ``baseline``, up to the iteration where it was highest (from the second on).

        With ``baseline`` the lowest loss training has already reached, regaining ground lost since does not count as
        progress. The best iteration counts because a CG phase that converges within the probe goes on almost for
        free (a converged step costs one gradient): the compute of the probe's idle last iterations does not count
        against it.
        """
        start = min(self.start_loss, baseline)
        pairs = list(zip(self.losses, self.computes))[min(1, len(self.losses) - 1) :]
        rates = [log_loss_rate(start, loss, compute) for loss, compute in pairs]
        finite = [rate for rate in rates if math.isfinite(rate)]
        return max(finite) if finite else math.nan


@runtime_checkable
class SwapDetector(Protocol):
    """What :class:`~lightning_twophase.ConvexitySwapCallback` needs from a detector.

    The callback calls :meth:`update` once per check, with numbers that are identical on every rank, and keeps the
    detector's state in its checkpoints.
    """

    def update(self, loss: float, grad_norm: float, *, epoch: int, step: int) -> SwapDecision:
        """Add one check: the mean training loss and gradient norm since the previous check, the number of epochs
        trained and the global step; answer whether to swap now, and why.

        A detector whose ``update`` also takes ``compute`` (the compute spent so far) and ``probe`` (a
        :class:`ProbeResult`, or ``None``) gets them too; only such a detector may ask for probes.
        """
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
        _check_swap_bounds("GradientNormPeakDetector", min_epochs, min_steps, fixed_swap_epoch, max_swap_epoch)
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


class ProbeDetector:
    r"""Swap once conjugate gradient, measured, decreases the loss faster per unit of compute than the first optimizer.

    At chosen checks the detector asks for a probe: the batches of the next check interval are kept, and at its end a
    few full-batch CG iterations run from the weights of that moment; the weights are then put back, so a probe
    changes nothing about training but its compute. The probe's rate, the decrease of ``ln loss`` per unit of compute
    below the lowest loss of the last ``window`` checks, is compared with the first optimizer's over those checks
    (:func:`~lightning_twophase.rates.trailing_rate`: on the running minimum of the epoch-mean loss, so that the ups and
    downs near the noise floor count for neither). The swap fires if CG's rate is at least ``margin`` times the first
    optimizer's.

    Otherwise the next probe waits in proportion to the gap: Adam's rate falls off roughly in proportion to the time
    trained, so a probe at ``ratio`` of Adam's rate is repeated ``1 / ratio`` times later, within ``spacing``. A run
    where CG never catches up (a few large batches per epoch, where Adam is nearly full-batch already) costs a handful
    of probes and trains exactly as Adam alone would.

    The loss must be positive, as the rates are of ``ln loss``: for a loss that reaches 0 or below (a log-likelihood
    with an offset, say) the rule cannot judge and never swaps; use ``fixed_swap_epoch`` or the paper's rule there.

    Args:
        first_probe_epoch: the epoch of the first probe (counted as epochs trained).
        probe_iterations: CG iterations per probe.
        window: checks over which the first optimizer's rate is measured.
        margin: how much faster than the first optimizer CG must be, per unit of compute.
        spacing: ``(least, most)`` factor by which the epoch of the next probe exceeds the last one's.
        min_epochs: no swap (and no probe that could only be judged) before this epoch.
        min_steps: no swap before this global step.
        fixed_swap_epoch: swap at this epoch whatever the probes say.
        max_swap_epoch: swap at this epoch at the latest.

    Example::

        detector = ProbeDetector(first_probe_epoch=20, margin=1.2)
        trainer = Trainer(callbacks=[ConvexitySwapCallback(detector=detector)])

    """

    #: The gradient norm is only logged: measuring it on the first step of each check and then one step in 32 keeps
    #: the first phase's cost down.
    norm_every_n_steps = 32

    def __init__(
        self,
        first_probe_epoch: int = 10,
        probe_iterations: int = 10,
        window: int = 10,
        margin: float = 1.0,
        spacing: tuple[float, float] = (1.25, 2.0),
        min_epochs: int = 0,
        min_steps: int = 0,
        fixed_swap_epoch: int | None = None,
        max_swap_epoch: int | None = None,
    ) -> None:
        if first_probe_epoch < 1 or probe_iterations < 1 or window < 3:
            raise ValueError(
                "ProbeDetector: `first_probe_epoch` and `probe_iterations` must be at least 1 and `window` at least 3, "
                f"got {first_probe_epoch}, {probe_iterations} and {window}."
            )
        if not (margin > 0 and 1.0 < spacing[0] <= spacing[1]):
            raise ValueError(
                f"ProbeDetector: need margin > 0 and 1 < spacing[0] <= spacing[1], got {margin}, {spacing}."
            )
        _check_swap_bounds("ProbeDetector", min_epochs, min_steps, fixed_swap_epoch, max_swap_epoch)
        self.first_probe_epoch = first_probe_epoch
        self.probe_iterations = probe_iterations
        self.window = window
        self.margin = margin
        self.spacing = (float(spacing[0]), float(spacing[1]))
        self.min_epochs = min_epochs
        self.min_steps = min_steps
        self.fixed_swap_epoch = fixed_swap_epoch
        self.max_swap_epoch = max_swap_epoch
        self.reset()

    def reset(self) -> None:
        """Forget every check."""
        self.points: list[tuple[float, float]] = []  # (loss, compute) of the first optimizer's checks
        self.next_probe_epoch: float = self.first_probe_epoch
        self.last_ratio = math.nan
        self.fired: SwapDecision | None = None
        #: After a fallback from a swap the bounds forced (fixed or maximum swap epoch), no second swap.
        self.retired = False

    def update(
        self,
        loss: float,
        grad_norm: float,
        *,
        epoch: int,
        step: int,
        compute: float = math.nan,
        probe: ProbeResult | None = None,
    ) -> SwapDecision:
        """Add one check (see :class:`SwapDetector`); ``probe`` is the probe run over the interval it asked for."""
        if self.fired is not None:
            return self.fired
        if self.retired:
            return self._decide(False, "the swap the epoch bounds asked for was made; the fallback ended it")
        if math.isfinite(loss) and math.isfinite(compute):
            self.points = [*self.points[1 - self.window :], (loss, compute)]
        if self.fixed_swap_epoch is not None:
            reached = epoch >= self.fixed_swap_epoch
            return self._decide(
                reached, f"the fixed swap epoch {self.fixed_swap_epoch} {'was reached' if reached else 'is ahead'}"
            )
        verdict = (
            None if probe is None else self._judge(probe, epoch, epoch >= self.min_epochs and step >= self.min_steps)
        )
        if verdict is not None and verdict.swap:
            return verdict
        if self.max_swap_epoch is not None and epoch >= self.max_swap_epoch:
            return self._decide(True, f"no probe showed CG ahead by the maximum swap epoch {self.max_swap_epoch}")
        if verdict is not None:
            return verdict
        if math.isfinite(loss) and loss <= 0:
            return self._decide(
                False, f"the loss {loss:.4g} is not positive: the rule compares rates of ln(loss) and cannot judge it"
            )
        # A probe is judged a check later; none before the bounds could let a swap follow it.
        due = epoch >= self.next_probe_epoch and epoch + 1 >= self.min_epochs
        if due and len(self.points) >= 3 and not self._jumped():
            return self._decide(False, f"probing conjugate gradient over the next check (epoch {epoch})", probe=True)
        return self._decide(False, f"the next probe is at epoch {math.ceil(self.next_probe_epoch)}")

    def _jumped(self) -> bool:
        """Whether the last check's loss is well above the lowest of the window: a jump the first optimizer is
        recovering from. A probe from such a point would first regain ground, which is no progress."""
        lowest = min(loss for loss, _ in self.points)
        return self.points[-1][0] > JUMP * lowest

    def _judge(self, probe: ProbeResult, epoch: int, allowed: bool) -> SwapDecision:
        first_rate = trailing_rate(self.points, self.window)
        # CG is credited only with what it gains below the lowest loss of the window: recovering from a rise of the
        # first optimizer's loss (it comes and goes near the noise floor) is not progress.
        cg_rate = probe.rate_below(min(loss for loss, _ in self.points))
        if not math.isfinite(cg_rate):
            self.next_probe_epoch = epoch * self.spacing[1]
            return self._decide(False, f"the probe made no measurable progress from the loss {probe.start_loss:.4g}")
        if not first_rate >= 0 or self._jumped():
            # The first optimizer's loss jumped and it is recovering: no fair comparison now.
            self.next_probe_epoch = epoch + max(2, self.window // 2)
            return self._decide(
                False,
                f"the first optimizer's loss jumped over its last {len(self.points)} checks; the next "
                f"probe is at epoch {math.ceil(self.next_probe_epoch)}",
            )
        # Where the first optimizer reached no new low over the window, any progress of CG's is ahead.
        ratio = cg_rate / first_rate if first_rate > 0 else (math.inf if cg_rate > 0 else 0.0)
        self.last_ratio = ratio
        described = (
            f"a {probe.iterations}-iteration CG probe decreased ln(loss) by {cg_rate:.3g} per unit of compute, "
            f"{ratio:.3g} x the first optimizer's {first_rate:.3g} over its last {len(self.points)} checks"
        )
        if ratio >= self.margin and cg_rate > 0 and allowed:
            return self._decide(True, described)
        self.next_probe_epoch = epoch * min(max(1.0 / max(ratio, 1e-12), self.spacing[0]), self.spacing[1])
        return self._decide(False, f"{described}; the next probe is at epoch {math.ceil(self.next_probe_epoch)}")

    def on_fallback(self, epoch: int) -> None:
        """Training went back to the first optimizer: probe again later, with a fresh measure of its rate (unless the
        swap was forced by ``fixed_swap_epoch`` or ``max_swap_epoch``: those are made once)."""
        forced = self.fixed_swap_epoch is not None or (self.max_swap_epoch is not None and epoch >= self.max_swap_epoch)
        self.retired = forced
        self.fired = None
        self.points.clear()
        self.next_probe_epoch = max(epoch * self.spacing[0], epoch + self.window)

    def _decide(self, swap: bool, reason: str, probe: bool = False) -> SwapDecision:
        ratio = {tags.PROBE_RATIO: self.last_ratio} if math.isfinite(self.last_ratio) else {}
        decision = SwapDecision(swap, reason, ratio, probe)
        if swap:
            self.fired = decision
        return decision

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue where the detector was."""
        fired = None if self.fired is None else {"reason": self.fired.reason, "scalars": dict(self.fired.scalars)}
        return {
            "points": [list(point) for point in self.points],
            "next_probe_epoch": self.next_probe_epoch,
            "last_ratio": self.last_ratio,
            "fired": fired,
            "retired": self.retired,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict`."""
        self.points = [(loss, compute) for loss, compute in state["points"]]
        self.next_probe_epoch = state["next_probe_epoch"]
        self.last_ratio = state["last_ratio"]
        self.fired = None if state["fired"] is None else SwapDecision(True, **state["fired"])
        self.retired = state["retired"]


def _check_swap_bounds(
    owner: str, min_epochs: int, min_steps: int, fixed_swap_epoch: int | None, max_swap_epoch: int | None
) -> None:
    """The epoch and step bounds every built-in detector takes: none may be negative."""
    if min_epochs < 0 or min_steps < 0:
        raise ValueError(f"{owner}: `min_epochs` and `min_steps` must not be negative.")
    for name, value in (("fixed_swap_epoch", fixed_swap_epoch), ("max_swap_epoch", max_swap_epoch)):
        if value is not None and value < 0:
            raise ValueError(f"{owner}: `{name}` must not be negative, got {value}.")
