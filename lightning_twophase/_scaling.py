"""Loss scaling in the CG phase under ``precision="16-mixed"`` with a GradScaler (private).

In float16 a gradient underflows unless the loss is scaled up before the backward pass, and a scale that is too large
overflows it. Lightning's ``MixedPrecision`` steps an optimizer as ``closure(); scaler.unscale_(optimizer);
scaler.step(optimizer); scaler.update()``: the closure runs before the optimizer's step, and ``GradScaler.step``
refuses closures and skips the step after an overflow. Neither suits the CG phase: its macro-batch runs the loop's
pass of each batch inside its own step (under DDP's ``no_sync``, with the batch's random seed), and its line search
evaluates many more gradients than the loop's, each of which may overflow, and none of which may be skipped.

So the CG phase does the scaler's work itself, with the trainer's own scaler:

* While the CG phase is installed, the precision plugin hands the loop's closure to the optimizer, as it does without
  a scaler (``_lightning.set_closure_steps``); ``pre_backward`` still scales the loop's loss.
* Every gradient the CG phase uses is a mean of scaled gradients: the loop pass's sums of a macro-batch, or a trial
  evaluation's backward pass of ``scaler.scale(loss)``. Under DDP it is added up across ranks before anything is
  decided, so every rank decides on the same numbers, and every rank's scale stays the same.
* :meth:`LossScaling.unscale_` divides it by the scale; an overflow is a finite loss with a non-finite gradient. The
  scaler's own ``unscale_`` and ``update`` record each gradient, as ``scaler.step`` does for the first optimizer: the
  scale backs off after an overflow and grows after ``growth_interval`` clean gradients.
* After an overflow the gradient is evaluated again at the lowered scale
  (:meth:`~lightning_twophase.objective.TrainingObjective.value_and_gradient`), down to :data:`MIN_SCALE`: an
  overflow never becomes a step, a NaN weight, a failed line search or a fallback. A gradient that is not finite even
  there is a non-finite objective, as in any precision.
* An evaluation whose loss is not finite leaves the scale alone: the line search rejects the trial point whatever its
  gradient, and backing off for it would only lower the scale for the gradients that count.

Value-only trial evaluations run forward under autocast and need no scaling; losses are added up in float64. The
scaler's state is the plugin's checkpoint state, so it travels with every checkpoint; the first phase's state is
captured at the swap and put back on a fallback (``_lightning.TrainerSettings``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["MIN_SCALE", "LossScaling"]

#: The scale below which an overflowing gradient is not evaluated again: the smallest float16 subnormal. A gradient
#: that overflows even scaled down this far cannot be computed in float16 at all.
MIN_SCALE = 2.0**-24


class _ParamGroups:
    """What ``GradScaler.unscale_`` reads of an optimizer: its parameter groups."""

    def __init__(self, params: list[Tensor]) -> None:
        self.param_groups = [{"params": params}]


class LossScaling:
    """The scaling of the CG phase's gradients with ``scaler``, a ``torch.amp.GradScaler`` (enabled)."""

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler

    def scale(self, loss: Tensor) -> Tensor:
        """The loss to pass backward: ``loss`` times the current scale."""
        return self.scaler.scale(loss)

    def unscale_(self, params: list[Tensor], loss: float) -> bool:
        """Divide the scaled gradient in ``p.grad`` by the scale and record it with the scaler; whether it overflowed.

        Args:
            params: the parameters whose ``.grad`` holds the scaled gradient (identical on every rank).
            loss: the loss of the evaluation (identical on every rank).

        Returns:
            ``True`` if the loss is finite and the gradient is not: the scaler has lowered the scale.

        """
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        if not math.isfinite(loss):
            torch._foreach_mul_(grads, 1.0 / self.scaler.get_scale())
            return False
        self.scaler.unscale_(_ParamGroups(params))
        overflow = not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        self.scaler.update()
        return overflow

    @property
    def can_back_off(self) -> bool:
        """Whether the scale is still at least :data:`MIN_SCALE`."""
        return self.scaler.get_scale() >= MIN_SCALE

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (scale and growth tracker)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put the scaler's state back."""
        self.scaler.load_state_dict(state)
