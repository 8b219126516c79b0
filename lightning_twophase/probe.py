"""A probe: a few full-batch conjugate-gradient iterations from the current weights, measured, then undone.

:class:`~lightning_twophase.ProbeDetector` decides when to probe; this is the mechanism. Over the check interval
that precedes a probe the training loop's batches are kept (as the CG phase keeps them); at the check, the second-phase
optimizer takes ``iterations`` steps on the full-batch objective of those batches, with every trial evaluation free
of side effects. Then the weights are put back exactly, so that training goes on as if the probe had not happened:
the first optimizer's state, the random generators, module buffers and metrics are untouched. What the probe cost is
counted in the run's compute.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_twophase.detection import ProbeResult
from lightning_twophase.objective import TrainingObjective, lightning_objective
from lightning_twophase.optim import NonFiniteObjectiveError
from lightning_twophase.preconditioning import apply_preconditioner

__all__ = ["CGProbe"]


class CGProbe:
    """Keep the batches of one check interval, then measure a few CG iterations on them and undo them.

    Args:
        pl_module: the LightningModule whose ``training_step`` is the objective.
        config: how the CG phase is built (optimizer, preconditioner, device cache, trial batching); a
            :class:`~lightning_twophase.phases.CGPhaseConfig`.
        seed: base of the per-batch random seeds of the objective.
        iterations: CG iterations to measure.
        trial_batching: how trial evaluations go through the kept batches (see
            :class:`~lightning_twophase.objective.TrainingObjective`).
        on_decided: told what ``trial_batching="auto"`` decided.

    """

    def __init__(
        self,
        pl_module: pl.LightningModule,
        config: Any,
        seed: int,
        iterations: int,
        trial_batching: str,
        on_decided: Callable[[str], None] = lambda batching: None,
    ) -> None:
        self.pl_module = pl_module
        self.config = config
        self.seed = seed
        self.iterations = iterations
        self.trial_batching = trial_batching
        self.on_decided = on_decided
        self._objective: TrainingObjective | None = None
        self._params: list[torch.Tensor] = []

    def keep(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        """Keep a batch of the interval, with the module's data as the loop's pass of it finds them. Batches
        stay on the device up to ``max_cached_bytes``, as the CG phase's do; the rest wait in host memory."""
        if self._objective is None:
            self._params = self._trainable(trainer)
            self._objective = lightning_objective(
                trainer, self.pl_module, self._params, self.config.max_cached_bytes, self.seed, self.trial_batching
            )
        self._objective.add(batch, batch_idx, self._objective.snapshot_state())

    @staticmethod
    def _trainable(trainer: pl.Trainer) -> list[torch.Tensor]:
        return [p for group in trainer.optimizers[0].param_groups for p in group["params"] if p.requires_grad]

    def run(self, trainer: pl.Trainer) -> ProbeResult | None:
        """Measure the CG iterations from the current weights and put the weights back; ``None`` without batches, or
        if parameters were added to the first optimizer during the interval (the kept batches' objective would not
        cover them)."""
        objective, params = self._objective, self._params
        self._objective = None
        if objective is None or not len(objective):
            return None
        if [id(p) for p in self._trainable(trainer)] != [id(p) for p in params]:
            objective.clear()
            return None
        first = trainer.optimizers[0]
        groups = [{"params": list(group["params"])} for group in first.param_groups]
        optimizer = self.config.build_optimizer(groups)
        apply_preconditioner(self.config.preconditioner, first, optimizer, rank_zero_warn)
        accepts_value_closure = "value_closure" in inspect.signature(optimizer.step).parameters
        weights = [p.detach().clone() for p in params]
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        scaler_state = objective.scaling.state_dict() if objective.scaling is not None else None
        start_loss = math.nan
        losses: list[float] = []
        computes: list[float] = []
        try:
            with torch.no_grad(), objective.side_effects_suspended():
                for iteration in range(self.iterations):
                    objective.iteration = iteration
                    kwargs = {"value_closure": objective.value} if accepts_value_closure else {}
                    loss = optimizer.step(objective.closure, **kwargs)
                    if iteration == 0:
                        start_loss = float(loss)
                    diagnostics = getattr(optimizer, "diagnostics", None)
                    losses.append(float(diagnostics.new_loss) if diagnostics is not None else float(objective.value()))
                    computes.append(objective.forward_samples + 2 * objective.backward_samples)  # over all ranks
        except NonFiniteObjectiveError:
            pass  # no progress to measure; the weights go back below
        finally:
            self.on_decided(objective.trial_batching)  # "auto" is decided by the first probe, for good
            torch._foreach_copy_([p.data for p in params], weights)
            for p, grad in zip(params, grads):
                p.grad = grad
            if scaler_state is not None:  # the GradScaler's scale too: training goes on as if there was no probe
                objective.scaling.load_state_dict(scaler_state)  # type: ignore[union-attr]
            objective.clear()
        compute = float(objective.forward_samples + 2 * objective.backward_samples)
        if not computes or computes[-1] != compute:  # an iteration that raised still cost its compute
            losses.append(math.nan)
            computes.append(compute)
        return ProbeResult(start_loss, tuple(losses), tuple(computes))
