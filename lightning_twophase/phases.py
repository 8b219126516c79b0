"""The two phases of training. Each owns what it needs; the callback routes Lightning's hooks to the current one.

* :class:`FirstPhase` trains with the optimizer of ``configure_optimizers``: it adds up the loss and the gradient norm
  of its steps on the device and, at each check, hands the callback their means (reduced across ranks).
* :class:`CGPhase` installs conjugate gradient in place of it: it owns the CG optimizer, the objective, the private
  macro-batch adapter and the Trainer settings of the first phase (one ``TrainerSettings`` type installs the CG phase
  at the swap and puts the first phase back on a fallback), and asks the fallback policy after every iteration and
  at every check.

Which phase is current, and the moves between them, are the callback's (:class:`Phase`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_twophase import monitoring, tags
from lightning_twophase._lightning import (
    TrainerSettings,
    backward_sync_blocked,
    batches_left_in_epoch,
    grad_scaler,
    is_last_batch,
    scheduler_configs,
    set_callback_metric,
    set_closure_steps,
    step_loss,
    undo_accumulation,
)
from lightning_twophase._macro_batch import MacroBatchStep, _MacroBatchOptimizer
from lightning_twophase.arguments import check_count, check_instance
from lightning_twophase.decision import Decision
from lightning_twophase.fallback import FallbackPolicy
from lightning_twophase.objective import TrainingObjective, lightning_objective
from lightning_twophase.optim import LBFGS, ConjugateGradient, NonFiniteObjectiveError
from lightning_twophase.preconditioning import NO_PRECONDITIONER, SECOND_MOMENTS, apply_preconditioner
from lightning_twophase.record import RunRecord
from lightning_twophase.refusals import another_model, refuse

__all__ = [
    "DEFAULT_CG_OPTIONS",
    "DEFAULT_LBFGS_OPTIONS",
    "SECOND_PHASES",
    "CGPhase",
    "CGPhaseConfig",
    "FirstPhase",
    "ObjectiveFactory",
    "OptimizerFactory",
    "Phase",
    "PreconditionerFactory",
    "SchedulerFactory",
    "second_phase_terms",
]

OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]
PreconditionerFactory = Callable[[Optimizer], Sequence[Tensor]]
SchedulerFactory = Callable[[Optimizer], Any]
#: Builds the objective of the kept batches: ``(trainer, pl_module, params, seed) -> TrainingObjective``.
ObjectiveFactory = Callable[[pl.Trainer, pl.LightningModule, list[Tensor], int], TrainingObjective]

#: The paper's conjugate gradient (``optimizer="cg"``), with the options measured for it: Hager-Zhang directions
#: reached a lower loss than Polak-Ribiere+ on real MNIST (``benchmarks/fullbatch_vs_minibatch.py``); the value-only
#: interpolation search at a 10 % tolerance reached the loss of Brent's for fewer evaluations
#: (``benchmarks/phase_cost.py``); the first optimizer's second moments made CG competitive on the transformers.
DEFAULT_CG_OPTIONS: dict[str, Any] = {
    "beta": "hager_zhang",
    "line_search": "interpolation",
    "line_search_tolerance": 0.1,
    "preconditioner": SECOND_MOMENTS,
}
#: The default second phase (``optimizer="lbfgs"``): L-BFGS with up to 20 iterations per epoch on the kept batches, its
#: initial inverse Hessian scaled by the latest pair alone. Adam's second moments as its diagonal
#: (``"preconditioner": "second_moments"``) paid 1.7x on the regression case but held the README's digits ViT at its
#: 8.4e-5 plateau where plain L-BFGS went on to 7.4e-11 (from the same Adam weights; ``docs/benchmarks.md``).
DEFAULT_LBFGS_OPTIONS: dict[str, Any] = {"max_iter": 20, "history_size": 20, "preconditioner": NO_PRECONDITIONER}
#: The second phases by name: the optimizer class and its default options.
SECOND_PHASES: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
    "lbfgs": (LBFGS, DEFAULT_LBFGS_OPTIONS),
    "cg": (ConjugateGradient, DEFAULT_CG_OPTIONS),
}


class Phase(str, Enum):
    """Which optimizer trains: the first one, the second phase's after the swap (L-BFGS by default), or the first one
    again after a fallback (for the rest of the fit)."""

    FIRST = "first"
    SECOND = "second"
    FALLBACK = "fallback"

    @classmethod
    def _missing_(cls, value: object) -> Phase | None:
        return cls.SECOND if value == "cg" else None  # the second phase's name in checkpoints of version 0.3

    def __str__(self) -> str:
        return self.value


class FirstPhase:
    """Measure the first optimizer's training: the loss of every step and the gradient norm of some.

    The measuring runs at every step, so it is kept cheap: the batch losses stay device tensors until the check, and
    the gradient norm is measured on the first step of a check and then every ``norm_every_n_steps``-th step.

    Args:
        record: the run's record (the compute is counted there).
        norm_every_n_steps: how often to measure the gradient norm (1 for a rule that reads it).

    """

    def __init__(self, record: RunRecord, norm_every_n_steps: int = 1) -> None:
        self.record = record
        self.norm_every_n_steps = norm_every_n_steps
        self._params: list[Tensor] = []
        self._groups = (0, -1)
        self._reset()

    def _reset(self) -> None:
        self._losses: list[Tensor] = []
        self._norms: list[Tensor] = []
        self._samples = 0
        self._steps = 0

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        self._steps += 1
        if self._norms and self._steps % self.norm_every_n_steps:
            return
        # The parameters are read again when the optimizer or its groups change (another fit, an unfrozen layer).
        if (id(optimizer), len(optimizer.param_groups)) != self._groups:
            self._params = [p for group in optimizer.param_groups for p in group["params"]]
            self._groups = (id(optimizer), len(optimizer.param_groups))
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            # The global L2 norm, kept on the device: no synchronisation until the check.
            norms = torch._foreach_norm(grads)
            try:
                self._norms.append(torch.linalg.vector_norm(torch.stack(norms)))
            except RuntimeError:  # gradients of several dtypes or devices
                device = grads[0].device
                self._norms.append(torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms])))

    def on_train_batch_end(self, outputs: Any, batch: Any) -> None:
        loss = step_loss(outputs)
        if loss is not None:
            self._losses.append(loss)
            self._samples += _batch_size(batch)

    def measure(self, trainer: pl.Trainer) -> tuple[float, float] | None:
        """The mean loss and gradient norm since the previous check, identical on every rank (one collective and one
        host synchronisation); ``None`` if no step was taken. The compute of the interval's samples, over all ranks,
        is added to the record."""
        if not self._losses:
            self._reset()
            return None
        loss = torch.stack([value.to(self._losses[-1].device, torch.float32) for value in self._losses]).mean()
        loss = undo_accumulation(loss, trainer)
        norms = [value.to(loss.device, torch.float32) for value in self._norms]  # restored sums live on the CPU
        if not norms:
            norm = torch.full_like(loss, math.nan)
        elif grad_scaler(trainer) is not None:
            # The GradScaler skipped the steps whose gradient overflowed: their norms are not the training's.
            stacked = torch.stack(norms)
            norm = torch.where(torch.isfinite(stacked), stacked, math.nan).nanmean()
        else:
            norm = torch.stack(norms).mean()
        # Float64 keeps sample counts exact (MPS has no float64; its counts stay below float32's 2**24 per check).
        dtype = torch.float32 if loss.device.type == "mps" else torch.float64
        samples = loss.new_tensor(float(self._samples), dtype=dtype)
        self._reset()
        values = torch.stack([loss.to(dtype), norm.to(loss.device, dtype), samples])
        reduced = trainer.strategy.reduce(values, reduce_op="mean")
        mean_loss, mean_norm, mean_samples = (float(v) for v in reduced.tolist())  # one host sync per check
        # Each rank's own samples, added up over the ranks: the same compute on every rank, whatever the shards.
        self.record.compute += 3 * round(mean_samples * trainer.world_size)
        return mean_loss, mean_norm

    def state_dict(self) -> dict[str, Any]:
        # A checkpoint written between two checks (at a mid-epoch validation, say) carries what was added up so far.
        if not self._losses:
            return {"pending": None}
        norms = [float(sum(self._norms)), len(self._norms)] if self._norms else [None, 0]
        return {"pending": [float(sum(self._losses)), len(self._losses), *norms, self._samples]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the sums of a checkpoint written between two checks."""
        if state.get("pending") is None:
            return
        loss_sum, losses, norm_sum, norms, samples = state["pending"]
        # The sums stand for their steps: the mean of the check is the same.
        self._losses = [torch.tensor(loss_sum / losses)] * losses
        self._norms = [torch.tensor(norm_sum / norms)] * norms if norms else []
        self._samples = samples


@dataclass(frozen=True)
class CGPhaseConfig:
    """How to build the CG phase (from the callback's arguments).

    Attributes:
        batches_per_step: mini-batches per CG iteration; ``None``: the whole epoch.
        build_optimizer: the second-phase optimizer from the first one's parameter groups.
        preconditioner: ``"none"``, ``"second_moments"`` or a callable returning one positive tensor per parameter
            (for the built-in ConjugateGradient).
        scheduler_factory: the CG phase's learning-rate scheduler, if any.
        fallback: the policy that judges the CG phase.
        fall_back: whether to act on the policy (without: warn once).
        build_objective: the objective of the kept batches.

    """

    batches_per_step: int | None
    build_optimizer: OptimizerFactory
    preconditioner: str | PreconditionerFactory
    scheduler_factory: SchedulerFactory | None
    fallback: FallbackPolicy
    fall_back: bool
    build_objective: ObjectiveFactory

    @property
    def optimizer_name(self) -> str:
        """The second phase's optimizer, as the swap message names it (the class, or the factory's name)."""
        built = getattr(self.build_optimizer, "func", self.build_optimizer)  # a partial of a class
        if isinstance(built, type):
            return built.__name__
        return f"the optimizer of {getattr(built, '__qualname__', type(built).__name__)}"

    @classmethod
    def from_arguments(
        cls,
        optimizer: str | dict[str, Any] | OptimizerFactory | None,
        batches_per_iteration: int | None,
        scheduler_factory: SchedulerFactory | None,
        fallback: bool | FallbackPolicy,
        max_cached_bytes: int,
    ) -> CGPhaseConfig:
        """The configuration of the callback's arguments, checked (see ``ConvexitySwapCallback``)."""
        owner = "ConvexitySwapCallback"
        if isinstance(optimizer, str):
            optimizer = {"name": optimizer}
        if isinstance(optimizer, dict) or optimizer is None:
            build_optimizer, preconditioner = _named_second_phase(owner, dict(optimizer or {}))
        elif callable(optimizer):  # an optimizer class taking parameter groups is a factory too
            build_optimizer, preconditioner = optimizer, NO_PRECONDITIONER
        else:
            raise TypeError(
                f"{owner}: `optimizer` must be a second phase's name {tuple(SECOND_PHASES)}, a dict of its options "
                f'(with "name"), or a factory building an optimizer from parameter groups, got {optimizer!r}.'
            )
        if scheduler_factory is not None and not callable(scheduler_factory):
            raise TypeError(f"{owner}: `scheduler_factory` must be callable, got {type(scheduler_factory).__name__}.")
        if isinstance(fallback, bool):
            policy = FallbackPolicy()
        else:
            policy = check_instance(owner, "fallback", fallback, FallbackPolicy, "Or pass True or False.")
        return cls(
            batches_per_step=check_count(owner, "batches_per_iteration", batches_per_iteration, 1, optional=True),
            build_optimizer=build_optimizer,
            preconditioner=preconditioner,
            scheduler_factory=scheduler_factory,
            fallback=policy,
            fall_back=fallback is not False,
            build_objective=partial(
                lightning_objective, max_device_bytes=check_count(owner, "max_cached_bytes", max_cached_bytes)
            ),
        )


class CGPhase:
    """Conjugate gradient in place of the first-phase optimizer, installed through ``trainer.strategy``.

    A swap decided with an epoch's last batch (or before any) installs it at once. A swap decided within an epoch
    (``check_every_n_steps``) waits for the next epoch to start, the first optimizer finishing the epoch: every CG
    iteration then covers a whole epoch (the first would otherwise see the rest of the epoch only), and
    ``swap_epoch`` and ``swap_step`` say where it started.

    The first optimizer's parameter groups carry over: a group with ``lr=0`` is held (not trained), and weight decay
    becomes part of the objective (:func:`second_phase_terms`). The parameters trained are those that require grad
    at each iteration.

    Args:
        trainer: the running Trainer.
        pl_module: the LightningModule whose ``training_step`` is the objective.
        config: how to build the phase.
        record: the run's record.
        seed: base of the per-batch random seeds of the objective.
        state: what :meth:`state_dict` wrote, when resuming from a checkpoint written in the CG phase; ``None`` at the
            swap itself.

    """

    def __init__(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        config: CGPhaseConfig,
        record: RunRecord,
        seed: int,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.record = record
        self.seed = seed
        self.policy = config.fallback
        self._trainer = trainer
        self._pl_module = pl_module
        self._current: tuple[Any, int, bool] = (None, 0, False)
        # Steps happen inside Lightning's optimizer step, where changing optimizers is unsafe: their results wait
        # here for `on_train_batch_end`.
        self._results: list[MacroBatchStep] = []
        self._points: list[tuple[float, float]] = []  # (loss, gradient norm) of each iteration since the last check
        # The objective the optimizer minimised (the loss plus the first optimizer's weight decay) at each iteration
        # since the last check, and its mean at the last check: what the fallback policy judges.
        self._objectives: list[float] = []
        self._checked_objective: float | None = None
        self._policy_begun = True
        # The compute spent when the latest of those losses was measured: the loop's pass at the step's start, before
        # the step's own evaluations (20 L-BFGS iterations cost many passes; their progress shows at the next step).
        self._measured_compute = 0.0
        self._warned_struggling = False
        #: ``(epoch, step)`` of a swap decided within an epoch, until the next epoch starts the phase; else ``None``.
        self.pending: tuple[int, int] | None = None
        self._pending_samples = 0
        # A whole-epoch iteration needs a whole epoch: a swap decided within one waits for the next (macro-batches
        # start at once: the decision comes between batches, where a macro-batch may begin).
        if state is None and config.batches_per_step is None and batches_left_in_epoch(trainer):
            self.pending = (trainer.current_epoch, trainer.global_step)
            return
        if state is not None and state.get("swap_decided_at") is not None:  # a checkpoint written while the swap waited
            self.pending = tuple(state["swap_decided_at"])  # type: ignore[assignment]
            return
        self._start(trainer, pl_module, state)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any] | None) -> None:
        """Build the optimizer, the objective and the adapter, and install them."""
        config = self.config
        first_optimizer = trainer.optimizers[0]
        if state is not None and state.get("param_groups") is not None:
            # Groups added after the swap (a layer BaseFinetuning unfroze) are the checkpoint's: the first optimizer
            # that configure_optimizers built lacks them.
            _match_groups(first_optimizer, state["param_groups"], pl_module)
        first = TrainerSettings.capture(trainer)
        # Without the fallback the first optimizer is never used again: keep only the settings, not its state.
        self.first = first if config.fall_back else replace(first, optimizers=[], lr_scheduler_configs=[])
        groups = [{"params": list(group["params"])} for group in first_optimizer.param_groups]
        self.optimizer = config.build_optimizer(groups)
        if state is None:
            apply_preconditioner(config.preconditioner, first_optimizer, self.optimizer, rank_zero_warn)
            self._policy_begun = False  # at the first step, which tells the weight decay's term at the swap
        else:  # the preconditioner comes back with the optimizer state
            self._restore(state, first_optimizer)
        params = [p for group in groups for p in group["params"]]
        if state is not None and state.get("second_phase_terms") is not None:
            excluded, weight_decay = _terms_from_state(state["second_phase_terms"], params)
        else:
            excluded, weight_decay, notes = second_phase_terms(first_optimizer)
            if state is None:
                for note in notes:
                    rank_zero_warn(f"ConvexitySwapCallback: {note}")
        objective = config.build_objective(trainer, pl_module, params, self.seed)
        if state is not None and state.get("trial_batching"):
            objective.trial_batching = state["trial_batching"]  # decided once, not again on resume
        self.adapter = _MacroBatchOptimizer(
            self.optimizer,
            objective,
            current_batch=lambda: self._current,
            on_step=self._results.append,
            batches_per_step=config.batches_per_step,
            loop_pass=lambda: backward_sync_blocked(trainer),
            on_params_added=self._add_to_first_optimizer,
            warn=rank_zero_warn,
            excluded=excluded,
            weight_decay=weight_decay,
        )
        self._install(trainer, announce=state is None)

    def _begin_pending(self) -> None:
        """The epoch after a swap decided within an epoch starts: install the CG phase, and say where it started."""
        assert self.pending is not None
        trainer = self._trainer
        (decided_epoch, decided_step), self.pending = self.pending, None
        # The first optimizer's steps since the decision were not measured by any check: count their compute.
        samples = trainer.strategy.reduce(
            torch.tensor(float(self._pending_samples), device=trainer.strategy.root_device), reduce_op="sum"
        )
        self.record.compute += 3 * round(float(samples))
        self._start(trainer, self._pl_module, None)
        epoch, step = trainer.current_epoch, trainer.global_step
        self.record.swap_epoch, self.record.swap_step = epoch, step
        set_callback_metric(trainer, tags.SWAP_EPOCH, epoch)
        set_callback_metric(trainer, tags.SWAP_STEP, step)
        monitoring.log_scalars(trainer, {tags.SWAP_EPOCH: float(epoch), tags.SWAP_STEP: float(step)}, step)
        name = type(self.first.optimizers[0]).__name__ if self.first.optimizers else "the first optimizer"
        rank_zero_info(
            f"ConvexitySwapCallback: the CG phase starts at epoch {epoch}, step {step}: the swap decided at epoch "
            f"{decided_epoch}, step {decided_step}, waited for that epoch's end ({name} took its last "
            f"{step - decided_step} steps), so that every CG iteration covers a whole epoch."
        )

    def _restore(self, state: dict[str, Any], first_optimizer: Optimizer) -> None:
        self.policy.load_state_dict(state["policy"])
        first_state = state["first_optimizer"]
        if first_state is None or not self.config.fall_back:
            return
        first_optimizer.load_state_dict(first_state["optimizer"])
        for scheduler_config, scheduler_state in zip(self.first.lr_scheduler_configs, first_state["schedulers"]):
            scheduler_config.scheduler.load_state_dict(scheduler_state)
        if first_state.get("scaler") is not None:
            # The GradScaler's state at the swap (the Trainer restores the CG phase's own after this).
            self.first = replace(self.first, scaler_state=first_state["scaler"])

    def _install(self, trainer: pl.Trainer, announce: bool) -> None:
        if trainer.gradient_clip_val:
            rank_zero_warn(
                f"ConvexitySwapCallback: gradient clipping (gradient_clip_val={trainer.gradient_clip_val}) is turned "
                "off for the CG phase: clipping would corrupt the line search's gradients."
            )
        if trainer.accumulate_grad_batches != 1:
            # Lightning then counts every batch as a step: a training bounded by max_steps ends that much sooner.
            sooner = (
                f" Every batch is then a step: the training's max_steps={trainer.max_steps} comes "
                f"{trainer.accumulate_grad_batches}x sooner per epoch; bound it by max_epochs instead."
                if trainer.max_steps > 0
                else ""
            )
            rank_zero_warn(
                f"ConvexitySwapCallback: accumulate_grad_batches={trainer.accumulate_grad_batches} is set to 1 for "
                f"the CG phase, which forms its own exact macro-batch gradient.{sooner}"
            )
        factory = self.config.scheduler_factory
        schedulers = [] if factory is None else scheduler_configs(factory(self.adapter))
        # Under a GradScaler the adapter gets the loop's closure and scales with the same scaler (_scaling.py).
        TrainerSettings([self.adapter], schedulers, None, 1, closure_steps=True).apply(trainer)
        if announce and self.config.batches_per_step == 1 and trainer.num_training_batches > 1:
            rank_zero_warn(
                f"ConvexitySwapCallback: the CG phase steps on single mini-batches of a training set of "
                f"{trainer.num_training_batches} batches; expect the training loss to rise. Leave "
                "batches_per_iteration=None (the whole training set per iteration).",
                category=UserWarning,
            )

    # ------------------------------------------------------------------------------------------------------------
    # Hooks
    # ------------------------------------------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        if self.pending is not None:
            self._begin_pending()
        self.adapter.discard()  # a macro-batch left over by an epoch that ended early

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.pending is not None:  # the first optimizer finishes the epoch
            self._pending_samples += _batch_size(batch)
            return
        self._current = (batch, batch_idx, is_last_batch(self._trainer))

    def on_train_batch_end(self) -> Decision | None:
        """The batch's step is done; a decision to fall back at once, if the policy makes one."""
        if self.pending is not None:
            return None
        self._current = (None, 0, False)  # the batch is not kept beyond its step
        return self._after_steps()

    def on_train_epoch_end(self) -> Decision | None:
        if self.pending is not None:
            return None
        # An epoch that ended before its last batch (on_train_batch_start returned -1): step on what it kept.
        self.adapter.finish()
        return self._after_steps()

    def _after_steps(self) -> Decision | None:
        decision = None
        while self._results and decision is None:
            decision = self._after_step(self._results.pop(0))
        return decision

    def _after_step(self, step: MacroBatchStep) -> Decision | None:
        trainer = self._trainer
        # Sample counts over all ranks (the objective reduced them): the same compute on every rank.
        self._measured_compute = self.record.compute + 3 * step.start_samples
        self.record.compute += step.forward_samples + 2 * step.backward_samples
        if step.non_finite is not None:
            # Never hand a non-finite objective to a gradient method (the fallback): stop, weights intact.
            where = f" on batches {step.non_finite_batches} of epoch {trainer.current_epoch}"
            raise NonFiniteObjectiveError(
                f"ConvexitySwapCallback: the CG phase stopped training at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}, with the weights as they were before the step. The training loss was not "
                f"finite{where if step.non_finite_batches else ''}. {step.non_finite}"
            )
        if not self._policy_begun:
            # The policy judges the objective the optimizer minimises; the first optimizer's losses are shifted by
            # the weight decay's term at the swap, so that both curves are in the same units.
            self.policy.begin([(loss + step.decay, compute) for loss, compute in self.record.first_phase_points()])
            self._policy_begun = True
        # Every second-phase optimizer goes through the same checks: the step's start loss and gradient norm.
        self._points.append((step.loss, step.grad_norm))
        self._objectives.append(step.loss + step.decay)
        scalars = {tags.CG_LOSS: step.loss, tags.CG_GRAD_NORM: step.grad_norm, tags.COMPUTE: self.record.compute}
        diagnostics = step.diagnostics
        if diagnostics is not None:  # ConjugateGradient's extras
            totals = getattr(self.optimizer, "totals", {})
            scalars.update(
                {
                    tags.CG_STEP_SIZE: diagnostics.step_size,
                    tags.CG_BETA: diagnostics.beta,
                    tags.CG_GRADIENT_EVALUATIONS: float(diagnostics.gradient_evaluations),
                    tags.CG_VALUE_EVALUATIONS: float(diagnostics.value_evaluations),
                    tags.CG_RESTARTS: float(totals.get("restarts", 0)),
                    tags.CG_LINE_SEARCH_FAILURES: float(totals.get("line_search_failures", 0)),
                }
            )
        monitoring.log_scalars(trainer, scalars, trainer.global_step)
        return self._acted_on(self.policy.iteration(step.failed))

    def _acted_on(self, decision: Decision) -> Decision | None:
        """The policy's decision if the callback is to fall back now; ``None`` to go on."""
        if not decision.act:
            return None
        if not self.config.fall_back:
            if not self._warned_struggling:
                rank_zero_warn(
                    f"ConvexitySwapCallback: the CG phase is struggling ({decision.message}); fallback is disabled."
                )
                self._warned_struggling = True
            return None
        return decision

    # ------------------------------------------------------------------------------------------------------------
    # Checks and the fallback
    # ------------------------------------------------------------------------------------------------------------

    def measure(self) -> tuple[float, float] | None:
        """The mean loss and gradient norm of the iterations since the previous check (identical on every rank: they
        are of the global objective); ``None`` if no iteration ended."""
        if not self._points:
            return None
        losses, norms = zip(*self._points)
        self._points.clear()
        self._checked_objective = sum(self._objectives) / len(self._objectives)
        self._objectives.clear()
        return sum(losses) / len(losses), sum(norms) / len(norms)

    def check(self, loss: float) -> Decision | None:
        """A check of the CG phase, whose mean loss :meth:`measure` gave: a decision to fall back, if the policy makes
        one. The policy judges the objective the optimizer minimised (with the first optimizer's weight decay), at the
        compute spent to measure it: the loop's pass at the step's start, not the step's own iterations, whose progress
        the next check shows."""
        objective, self._checked_objective = self._checked_objective, None
        return self._acted_on(self.policy.check(loss if objective is None else objective, self._measured_compute))

    def carried_to(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CGPhase:
        """This phase on another fit's Trainer, as from a checkpoint written at the end of the last fit: installed
        there, with the CG optimizer's state (direction, preconditioner, counts) carried over."""
        self.close()
        try:
            carried = CGPhase(trainer, pl_module, self.config, self.record, self.seed, self.state_dict())
            if self.pending is None:
                carried.adapter.load_state_dict(self.adapter.state_dict())
        except (ValueError, KeyError, RuntimeError) as error:
            refuse([another_model(error)])
        return carried

    def fall_back(self, decision: Decision, epoch: int) -> None:
        """Put the first phase's Trainer settings back, and say why."""
        trainer = self._trainer
        name = type(self.first.optimizers[0]).__name__ if self.first.optimizers else "the first optimizer"
        self.adapter.close()
        self.first.apply(trainer)
        message = (
            f"ConvexitySwapCallback: falling back to {name} at epoch {epoch}, step {trainer.global_step}: "
            f"{decision.message}."
        )
        rank_zero_warn(message)
        monitoring.log_text(trainer, tags.FALLBACK_TEXT, message, trainer.global_step)

    def _add_to_first_optimizer(self, params: list[Tensor]) -> None:
        # The fallback's optimizer trains them too, with its own defaults.
        if self.first.optimizers:
            self.first.optimizers[0].add_param_group({"params": params})

    def close(self) -> None:
        """Training ends (or failed): drop kept batches; the precision plugin steps as Lightning does again."""
        if self.pending is not None:
            return
        self.adapter.close()
        set_closure_steps(self._trainer, False)

    def state_dict(self) -> dict[str, Any]:
        if self.pending is not None:
            # The first optimizer still trains: Lightning's checkpoint holds its state.
            return {"first_optimizer": None, "policy": self.policy.state_dict(), "swap_decided_at": list(self.pending)}
        # The first optimizer's state is kept for the fallback, so that it resumes where the first phase stopped.
        first_state = None
        if self.first.optimizers:
            first_state = {
                "optimizer": self.first.optimizers[0].state_dict(),
                "schedulers": [config.scheduler.state_dict() for config in self.first.lr_scheduler_configs],
                "scaler": self.first.scaler_state,
            }
        return {
            "first_optimizer": first_state,
            "policy": self.policy.state_dict(),
            "trial_batching": self.adapter.objective.trial_batching,
            # Which parameters each group holds (a layer unfrozen after the swap adds one), by name, and what the
            # phase took over from the first optimizer's groups: resume rebuilds the same optimizer and objective.
            "param_groups": _group_names(self.optimizer, self._pl_module),
            "second_phase_terms": _terms_to_state(self.adapter, self.optimizer),
            "swap_decided_at": None,
        }


def _batch_size(batch: Any) -> int:
    """The number of samples in a batch; quick for the usual tuple of tensors, Lightning's rule otherwise."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor) and batch[0].dim() > 0:
        return batch[0].shape[0]
    return extract_batch_size(batch)


def _named_second_phase(owner: str, options: dict[str, Any]) -> tuple[OptimizerFactory, str | PreconditionerFactory]:
    """The factory and preconditioner of ``{"name": ..., **options}`` (``"lbfgs"`` unless named), checked now, not at
    the swap."""
    name = options.pop("name", "lbfgs")
    if name not in SECOND_PHASES:
        raise ValueError(f"{owner}: the second phase {name!r} is unknown; choose one of {tuple(SECOND_PHASES)}.")
    optimizer_class, defaults = SECOND_PHASES[name]
    options = {**defaults, **options}
    preconditioner = options.pop("preconditioner")
    if not (callable(preconditioner) or preconditioner in (SECOND_MOMENTS, NO_PRECONDITIONER)):
        raise ValueError(
            f"{owner}: the optimizer's `preconditioner` must be {SECOND_MOMENTS!r}, {NO_PRECONDITIONER!r} or a "
            f"callable, got {preconditioner!r}."
        )
    try:
        optimizer_class([torch.zeros(1, requires_grad=True)], **options)
    except (TypeError, ValueError) as error:
        other = [other for other, (cls, _) in SECOND_PHASES.items() if other != name]
        raise ValueError(
            f"{owner}: `optimizer` holds options {optimizer_class.__name__} ({name!r}) refuses: {error}. Options of "
            f"another second phase go with its name, e.g. {{'name': {other[0]!r}, ...}}."
        ) from error
    return partial(optimizer_class, **options), preconditioner


#: First optimizers whose ``weight_decay`` adds ``weight_decay * p`` to the gradient (L2 regularisation) unless a group
#: asks for ``decoupled_weight_decay=True``; ``AdamW``'s is decoupled.
COUPLED_DECAY: tuple[type[Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.RMSprop,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.ASGD,
    torch.optim.Adadelta,
)


def second_phase_terms(first: Optimizer) -> tuple[list[Tensor], dict[Tensor, float | Tensor], list[str]]:
    """What the second phase takes over from the first optimizer's parameter groups, and what it cannot.

    * A group with ``lr == 0`` is held: the second phase does not train its parameters (nor would the first).
    * Coupled weight decay (L2: ``SGD``, ``Adam`` and the others of :data:`COUPLED_DECAY`) adds ``wd * p`` to the
      gradient, so the first optimizer's fixed points are the stationary points of ``loss + 0.5 * wd * |p|^2``: that
      term joins the second phase's objective.
    * Decoupled weight decay (``AdamW``, or ``decoupled_weight_decay=True``) steps ``-lr * (m_hat / (sqrt(v_hat) +
      eps) + wd * p)``; at its fixed points ``g = -wd * (sqrt(v_hat) + eps) * p``: they are the stationary points of
      ``loss + 0.5 * wd * sum((sqrt(v_hat) + eps) * p^2)``, with ``v_hat`` as at the swap (the decay is an L2 term in
      Adam's own geometry, the one the default preconditioner keeps). That term joins the objective; a parameter
      without second moments (never updated) gets none, as AdamW never decayed it.

    Per-group learning rates other than 0, momenta and betas shape the first optimizer's path, not the function it
    minimises: the second phase has its own.

    Args:
        first: the first optimizer, at the swap.

    Returns:
        The parameters to hold, each decayed parameter's coefficient ``c`` of ``0.5 * sum(c * p**2)`` (a number or a
        tensor shaped like the parameter), and a note for each group whose decay is left out, naming the option.

    """
    excluded: list[Tensor] = []
    decay: dict[Tensor, float | Tensor] = {}
    notes: list[str] = []
    name = type(first).__name__
    for index, group in enumerate(first.param_groups):
        params = list(group["params"])
        if float(group.get("lr", 1.0)) == 0.0:
            excluded.extend(params)
            continue
        strength = float(group.get("weight_decay") or 0.0)
        if strength == 0.0:
            continue
        if isinstance(first, torch.optim.AdamW) or group.get("decoupled_weight_decay"):
            scales = [_adam_scale(first, group, p) for p in params]
            if all(scale is None for scale in scales):
                notes.append(
                    f"{name}'s decoupled weight decay (weight_decay={strength}) of parameter group {index} is left out "
                    "of the CG phase's objective: the group has no second moments to express it in (it never "
                    "stepped). Add the decay to training_step's loss to keep it."
                )
            decay.update({p: strength * scale for p, scale in zip(params, scales) if scale is not None})
        elif isinstance(first, COUPLED_DECAY):
            decay.update({p: strength for p in params})
        else:
            notes.append(
                f"{name}'s weight_decay={strength} of parameter group {index} is left out of the CG phase's "
                f"objective: it is not known whether {name} decays coupled (L2) or decoupled. Add the decay to "
                "training_step's loss to keep it in both phases."
            )
    return excluded, decay, notes


def _adam_scale(first: Optimizer, group: dict[str, Any], p: Tensor) -> Tensor | None:
    """``sqrt(v_hat) + eps`` of an Adam-like optimizer for ``p``, or ``None`` if it keeps none for it."""
    state = first.state.get(p, {})
    moments = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
    betas = group.get("betas")
    if moments is None or "step" not in state or betas is None:
        return None
    correction = 1.0 - betas[1] ** float(state["step"])
    return ((moments.detach() / correction).sqrt() + group.get("eps", 0.0)).to(p.dtype)


def _terms_to_state(adapter: _MacroBatchOptimizer, optimizer: Optimizer) -> dict[str, Any]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "excluded": [index for index, p in enumerate(params) if p in adapter.excluded],
        "weight_decay": [
            (index, adapter.weight_decay[p]) for index, p in enumerate(params) if p in adapter.weight_decay
        ],
    }


def _terms_from_state(terms: dict[str, Any], params: list[Tensor]) -> tuple[list[Tensor], dict[Tensor, float | Tensor]]:
    excluded = [params[index] for index in terms["excluded"] if index < len(params)]
    decay: dict[Tensor, float | Tensor] = {}
    for index, coefficient in terms["weight_decay"]:
        if index < len(params):
            p = params[index]
            decay[p] = coefficient.to(p.device, p.dtype) if isinstance(coefficient, Tensor) else coefficient
    return excluded, decay


def _group_names(optimizer: Optimizer, pl_module: pl.LightningModule) -> list[list[str]] | None:
    """The names of each group's parameters; ``None`` if one is not the module's."""
    names = {p: name for name, p in pl_module.named_parameters()}
    if any(p not in names for group in optimizer.param_groups for p in group["params"]):
        return None
    return [[names[p] for p in group["params"]] for group in optimizer.param_groups]


def _match_groups(first: Optimizer, layout: list[list[str]], pl_module: pl.LightningModule) -> None:
    """Give ``first`` the groups of ``layout`` (the checkpoint's CG phase) that it lacks: those added after the
    swap, which ``configure_optimizers`` does not return."""
    named = dict(pl_module.named_parameters())
    names = {p: name for name, p in named.items()}
    current = [[names.get(p, "?") for p in group["params"]] for group in first.param_groups]
    if current == layout:
        return
    count = len(current)
    if count < len(layout) and current == layout[:count] and all(n in named for g in layout[count:] for n in g):
        for group in layout[count:]:
            first.add_param_group({"params": [named[n] for n in group]})
        return
    refuse(
        [
            f"the CG phase it resumes trained {len(layout)} parameter group(s) ({_describe(layout)}), and the "
            f"optimizer of configure_optimizers has {count} ({_describe(current)}), which are not the first of them. "
            "Return the optimizer the run was trained with (the groups added during training, by BaseFinetuning "
            "say, are added back), or pass a new ConvexitySwapCallback to train another model"
        ]
    )


def _describe(layout: list[list[str]]) -> str:
    return "; ".join("[" + ", ".join(group[:3]) + (", ..." if len(group) > 3 else "") + "]" for group in layout)
