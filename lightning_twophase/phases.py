"""The two phases of training. Each owns what it needs; the callback routes Lightning's hooks to the current one.

* :class:`FirstPhase` trains with the optimizer of ``configure_optimizers``: it measures the loss and the gradient
  norm of every step on the device and, at each check, asks the detector whether to swap.
* :class:`CGPhase` installs conjugate gradient in place of it: it owns the CG optimizer, the objective, the private
  macro-batch adapter and the Trainer settings of the first phase (one ``TrainerSettings`` type installs the CG
  phase at the swap and puts the first phase back on a fallback).

A phase leaves through :meth:`Phase.leave`, which returns the phase that follows it (:class:`PhaseFactory` builds
them). What happened (the checks, the swap, the fallback, the compute) is kept in a :class:`RunRecord` that every
phase writes to and checkpoints carry.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_twophase import monitoring, tags
from lightning_twophase._lightning import (
    TrainerSettings,
    backward_sync_blocked,
    grad_scaler,
    is_last_batch,
    scheduler_configs,
    set_callback_metric,
    set_closure_steps,
    step_loss,
    undo_accumulation,
)
from lightning_twophase._macro_batch import MacroBatchStep, _MacroBatchOptimizer
from lightning_twophase.detection import SwapDetector
from lightning_twophase.fallback import FallbackDecision, FallbackPolicy
from lightning_twophase.objective import lightning_objective
from lightning_twophase.optim import NonFiniteObjectiveError
from lightning_twophase.preconditioning import apply_preconditioner
from lightning_twophase.probe import CGProbe
from lightning_twophase.rates import trailing_rate

__all__ = [
    "CGPhase",
    "CGPhaseConfig",
    "FirstPhase",
    "Phase",
    "PhaseDecision",
    "PhaseFactory",
    "RunRecord",
    "log_figure",
    "write_run_outputs",
]

OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]
#: Checks over which the first optimizer's rate is measured for the progress guard (as the default detector does).
RATE_WINDOW = 10
PreconditionerFactory = Callable[[Optimizer], Sequence[Tensor]]
SchedulerFactory = Callable[[Optimizer], Any]


@dataclass(frozen=True)
class PhaseDecision:
    """A phase's answer at a check: whether to leave it for the next phase, why, what to log with the check, and
    whether the detector asks for a probe over the next check interval."""

    leave: bool
    reason: str
    scalars: dict[str, float] = field(default_factory=dict)
    probe: bool = False


@dataclass
class RunRecord:
    """What happened so far: what users read after ``fit`` and what checkpoints carry."""

    #: One record per check: epoch, step, loss, gradient norm, phase, compute and the detector's numbers.
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Samples passed forward plus twice the samples passed backward, over all ranks (backward ~ 2 forward).
    compute: float = 0.0
    #: The part of :attr:`compute` that probes spent (not training: their steps are undone).
    probe_compute: float = 0.0
    swap_epoch: int | None = None
    swap_step: int | None = None
    swap_reason: str | None = None
    #: The index in :attr:`history` of the check at which the swap was made.
    swap_check: int | None = None
    fallback_reason: str | None = None

    def add_check(
        self, epoch: int, step: int, loss: float, grad_norm: float, phase: str, scalars: Mapping[str, float]
    ) -> dict[str, float]:
        """Add one check to :attr:`history`; return what to log for it, by tag (``scalars``: the detector's)."""
        record: dict[str, Any] = {"epoch": epoch, "step": step, "loss": loss, "grad_norm": grad_norm}
        record.update({tags.column(tag): value for tag, value in scalars.items()})
        record.update(phase=phase, compute=self.compute, probe_compute=self.probe_compute)
        self.history.append(record)
        logged = {tags.LOSS: loss, tags.GRAD_NORM: grad_norm, **scalars}
        logged.update({tags.PHASE: tags.PHASE_VALUES[phase], tags.COMPUTE: self.compute})
        return logged

    @property
    def training_compute(self) -> float:
        """The compute that moved the weights: :attr:`compute` without the probes'."""
        return self.compute - self.probe_compute

    def first_phase_points(self) -> list[tuple[float, float]]:
        """``(loss, training compute)`` of the checks of the first-phase stint that ends the history."""
        points: list[tuple[float, float]] = []
        for record in reversed(self.history):
            if record["phase"] == "cg":
                break
            points.append((record["loss"], record["compute"] - record.get("probe_compute", 0.0)))
        return points[::-1]

    def peak_check(self) -> int | None:
        """The check of the first phase with the largest gradient norm."""
        first = [(r["grad_norm"], i) for i, r in enumerate(self.history) if r["phase"] == "first"]
        return max(first)[1] if first else None

    def state_dict(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self.__dataclass_fields__}
        state["history"] = [dict(record) for record in self.history]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fresh = RunRecord()  # a checkpoint of an earlier version lacks the newer fields
        for name in self.__dataclass_fields__:
            setattr(self, name, state.get(name, getattr(fresh, name)))
        self.history = [dict(record) for record in self.history]


class Phase:
    """The interface the callback routes Lightning's hooks through; every hook does nothing unless overridden."""

    #: ``"first"``, ``"cg"`` or ``"fallback"`` (the first optimizer again, after a fallback).
    name: str

    def on_train_epoch_start(self, trainer: pl.Trainer) -> None:
        """An epoch begins."""

    def on_train_batch_start(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        """A training batch begins."""

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """The gradients of a step are final (unscaled, all-reduced)."""

    def on_train_batch_end(self, trainer: pl.Trainer, outputs: Any, batch: Any) -> PhaseDecision | None:
        """A training batch is done; a decision to leave the phase at once, if any."""
        return None

    def on_train_epoch_end(self, trainer: pl.Trainer) -> PhaseDecision | None:
        """The epoch is over (possibly before its last batch); a decision to leave the phase at once, if any."""
        return None

    def measure(self, trainer: pl.Trainer) -> tuple[float, float] | None:
        """The mean loss and gradient norm since the previous check, identical on every rank; ``None`` if nothing."""
        raise NotImplementedError

    def decide(self, trainer: pl.Trainer, loss: float, grad_norm: float, epoch: int, step: int) -> PhaseDecision:
        """Whether to leave this phase, given the check's numbers (the same on every rank)."""
        raise NotImplementedError

    def leave(self, trainer: pl.Trainer, pl_module: pl.LightningModule, decision: PhaseDecision, epoch: int) -> Phase:
        """Act on ``decision`` and return the phase that follows."""
        raise NotImplementedError

    def begin_probe(self, trainer: pl.Trainer) -> None:
        """Keep the batches of the next check interval for a probe (asked for by the detector, agreed across ranks)."""

    def count_compute(self, trainer: pl.Trainer) -> None:
        """Training ends: add the compute not counted yet to the record (a collective: every rank calls it)."""

    def close(self) -> None:
        """Training ends: release what the phase keeps (kept batches)."""

    def state_dict(self) -> dict[str, Any]:
        """What the phase needs to be rebuilt on resume (besides the run record and the detector)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what :meth:`state_dict` wrote."""

    def continue_from(self, previous: Phase) -> None:
        """Another fit goes on with this phase, rebuilt from ``previous`` (the phase the last fit ended in): take over
        what a checkpoint would have restored after ``on_fit_start``."""


class FirstPhase(Phase):
    """Train with the first-phase optimizer; measure the loss and gradient norm, and ask the detector at each check.

    The measuring is kept cheap, since it runs at every step: the batch losses are kept as device tensors and added up
    at the check, and the gradient norm is measured at the steps the detector asks for (every step for the paper's
    rule, which compares norms; a sample for the probes, which only log them).

    Args:
        record: the run's record.
        detector: the swap detector; ``None``: no swap (after a fallback, the swap is not tried again).
        successor: builds the CG phase at the swap; ``None`` only detects and logs the swap point.
        name: ``"first"``, or ``"fallback"`` for the first optimizer after a fallback.
        probe: builds a :class:`~lightning_twophase.probe.CGProbe` when the detector asks for one.

    """

    def __init__(
        self,
        record: RunRecord,
        detector: SwapDetector | None,
        successor: Callable[[pl.Trainer, pl.LightningModule], CGPhase] | None,
        name: str = "first",
        probe: Callable[[pl.Trainer], CGProbe] | None = None,
    ) -> None:
        self.name = name
        self.record = record
        self.detector = detector
        self.successor = successor
        self._new_probe = probe
        self._probe: CGProbe | None = None
        self._probe_on_resume = False
        self._norm_every = int(getattr(detector, "norm_every_n_steps", 1))
        accepted = inspect.signature(detector.update).parameters if detector is not None else {}
        self._extra = {name for name in ("compute", "probe") if name in accepted}
        self._params: list[Tensor] = []
        self._groups = -1
        self._reset()

    def _reset(self) -> None:
        self._losses: list[Tensor] = []
        self._norms: list[Tensor] = []
        self._steps = 0
        self._samples = 0  # this rank's, since the last check: added up over the ranks at the check

    def state_dict(self) -> dict[str, Any]:
        # A checkpoint written between two checks (at a mid-epoch validation, say) carries what was added up so far,
        # and whether the detector asked for a probe over the interval.
        return {
            "pending": [float(sum(self._losses)), len(self._losses), float(sum(self._norms)), len(self._norms)]
            if self._losses
            else [None, 0, None, 0],
            "probe_pending": self._probe is not None or self._probe_on_resume,
            "pending_samples": self._samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the sums of a checkpoint written between two checks."""
        loss_sum, losses, norm_sum, norms = state.get("pending", [None, 0, None, 0])
        # The sums stand for their batches: the mean of the check is the same.
        self._losses = [torch.tensor(loss_sum / losses)] * losses if losses else []
        self._norms = [torch.tensor(norm_sum / norms)] * norms if norms else []
        # The probe goes on over the rest of its interval (the batches it kept before the checkpoint are not in it).
        self._probe_on_resume = bool(state.get("probe_pending", False))
        self._samples = int(state.get("pending_samples", 0))

    def begin_probe(self, trainer: pl.Trainer) -> None:
        if self._new_probe is not None:
            self._probe = self._new_probe(trainer)

    def close(self) -> None:
        self._probe = None

    def on_train_batch_start(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        if self._probe_on_resume:
            self._probe_on_resume = False
            self.begin_probe(trainer)
        if self._probe is not None:
            self._probe.keep(trainer, batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        self._steps += 1
        if self._norms and self._steps % self._norm_every:
            return  # at least one measure per check, then every norm_every-th step
        if len(optimizer.param_groups) != self._groups:
            self._params = [p for group in optimizer.param_groups for p in group["params"]]
            self._groups = len(optimizer.param_groups)
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            # The global L2 norm, kept on the device: no synchronisation until the check.
            norms = torch._foreach_norm(grads)
            try:
                self._norms.append(torch.linalg.vector_norm(torch.stack(norms)))
            except RuntimeError:  # gradients of several dtypes or devices
                device = grads[0].device
                self._norms.append(torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms])))

    def on_train_batch_end(self, trainer: pl.Trainer, outputs: Any, batch: Any) -> PhaseDecision | None:
        loss = step_loss(outputs)
        if loss is not None:
            self._losses.append(loss)
            self._samples += _batch_size(batch)
        return None

    def measure(self, trainer: pl.Trainer) -> tuple[float, float] | None:
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

    def count_compute(self, trainer: pl.Trainer) -> None:
        # Training ends between two checks: the samples since the last one, added up over the ranks.
        samples = torch.tensor(float(self._samples), dtype=torch.float64)
        total = trainer.strategy.reduce(samples.to(trainer.strategy.root_device), reduce_op="sum")
        self.record.compute += 3 * round(float(total))
        self._samples = 0

    def decide(self, trainer: pl.Trainer, loss: float, grad_norm: float, epoch: int, step: int) -> PhaseDecision:
        if self.detector is None:
            return PhaseDecision(False, "no detector")
        extra: dict[str, Any] = {}
        if "probe" in self._extra:
            extra["probe"] = None if self._probe is None else self._probe.run(trainer)
            self._probe = None
            if extra["probe"] is not None:
                self.record.compute += extra["probe"].compute
                self.record.probe_compute += extra["probe"].compute
        if "compute" in self._extra:
            extra["compute"] = self.record.training_compute
        decision = self.detector.update(loss, grad_norm, epoch=epoch, step=step, **extra)
        # Detecting only, the swap point is announced once.
        leave = decision.swap and (self.successor is not None or self.record.swap_reason is None)
        probe = decision.probe and "probe" in self._extra and self._new_probe is not None
        return PhaseDecision(leave, decision.reason, dict(decision.scalars), probe)

    def leave(self, trainer: pl.Trainer, pl_module: pl.LightningModule, decision: PhaseDecision, epoch: int) -> Phase:
        record = self.record
        record.swap_epoch, record.swap_step, record.swap_reason = epoch, trainer.global_step, decision.reason
        record.swap_check = len(record.history) - 1 if record.history else None
        set_callback_metric(trainer, tags.SWAP_EPOCH, epoch)
        set_callback_metric(trainer, tags.SWAP_STEP, trainer.global_step)
        first_name = type(trainer.optimizers[0]).__name__
        successor: Phase = self
        if self.successor is None:
            message = (
                f"ConvexitySwapCallback (detect only): the swap point is at epoch {epoch}, step "
                f"{trainer.global_step}: {decision.reason}. Training continues with {first_name}."
            )
        else:
            successor = self.successor(trainer, pl_module)
            message = (
                f"ConvexitySwapCallback: swapped {first_name} -> conjugate gradient at epoch {epoch}, step "
                f"{trainer.global_step}: {decision.reason}."
            )
        rank_zero_info(message)
        monitoring.log_scalars(
            trainer, {tags.SWAP_EPOCH: float(epoch), tags.SWAP_STEP: float(trainer.global_step)}, trainer.global_step
        )
        monitoring.log_text(trainer, tags.SWAP_TEXT, message, trainer.global_step)
        return successor


@dataclass(frozen=True)
class CGPhaseConfig:
    """How to build the CG phase (from the callback's arguments).

    Attributes:
        batches_per_step: mini-batches per CG iteration; ``None``: the whole epoch.
        build_optimizer: the second-phase optimizer from the first one's parameter groups.
        scheduler_factory: the CG phase's learning-rate scheduler, if any.
        preconditioner: ``"none"``, ``"second_moments"`` or a callable returning one positive tensor per parameter.
        fallback: whether to go back to the first optimizer when the policy says so.
        policy: builds the fallback policy of a new CG phase.
        max_cached_bytes: device memory for the kept batches of an iteration.
        trial_batching: ``"auto"``, ``"chunks"`` or ``"batches"`` (see
            :class:`~lightning_twophase.objective.TrainingObjective`).
        warn_single_batches: warn that one mini-batch per iteration is unsound (``cg_phase="minibatch"``).

    """

    batches_per_step: int | None
    build_optimizer: OptimizerFactory
    scheduler_factory: SchedulerFactory | None
    preconditioner: str | PreconditionerFactory
    fallback: bool
    policy: Callable[[], FallbackPolicy]
    max_cached_bytes: int
    trial_batching: str
    warn_single_batches: bool


class CGPhase(Phase):
    """Conjugate gradient in place of the first-phase optimizer, installed through ``trainer.strategy``.

    Args:
        trainer: the running Trainer; the CG phase is installed on it at once.
        pl_module: the LightningModule whose ``training_step`` is the objective.
        config: how to build the phase.
        record: the run's record.
        seed: base of the per-batch random seeds of the objective.
        successor: builds the phase that follows a fallback.
        first_state: the first-phase optimizer's and schedulers' states from a checkpoint written in the CG phase
            (resume); ``None`` at the swap itself.
        policy_state: the fallback policy's state from that checkpoint.
        trial_batching: the trial batching decided before that checkpoint.

    """

    name = "cg"

    def __init__(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        config: CGPhaseConfig,
        record: RunRecord,
        seed: int,
        successor: Callable[[int], Phase],
        first_state: dict[str, Any] | None = None,
        policy_state: dict[str, Any] | None = None,
        trial_batching: str | None = None,
    ) -> None:
        self.config = config
        self.record = record
        self.successor = successor
        self._trainer = trainer
        self._current: tuple[Any, int, bool] = (None, 0, False)
        # Steps happen inside Lightning's optimizer step, where changing optimizers is unsafe: their results wait
        # here for `on_train_batch_end`.
        self._results: list[MacroBatchStep] = []
        self._points: list[tuple[float, float]] = []  # (loss, gradient norm) of each iteration since the last check
        self._warned_struggling = False
        first = TrainerSettings.capture(trainer)
        first_optimizer = first.optimizers[0]
        # Without the fallback the first optimizer is never used again: keep only the settings, not its state.
        self.first = first if config.fallback else replace(first, optimizers=[], lr_scheduler_configs=[])
        groups = [{"params": list(group["params"])} for group in first_optimizer.param_groups]
        self.optimizer = config.build_optimizer(groups)
        resumed = first_state is not None
        if first_state is not None and config.fallback:
            first_optimizer.load_state_dict(first_state["optimizer"])
            for scheduler_config, state in zip(first.lr_scheduler_configs, first_state["schedulers"]):
                scheduler_config.scheduler.load_state_dict(state)
            if first_state.get("scaler") is not None:
                # The GradScaler's state at the swap (the Trainer restores the CG phase's own after this).
                self.first = replace(self.first, scaler_state=first_state["scaler"])
        else:
            # On resume the preconditioner comes back with the optimizer state instead.
            apply_preconditioner(config.preconditioner, first_optimizer, self.optimizer, rank_zero_warn)
        params = [p for group in groups for p in group["params"]]
        objective = lightning_objective(
            trainer, pl_module, params, config.max_cached_bytes, seed, trial_batching or config.trial_batching
        )
        self.adapter = _MacroBatchOptimizer(
            self.optimizer,
            objective,
            current_batch=lambda: self._current,
            on_step=self._results.append,
            batches_per_step=config.batches_per_step,
            loop_pass=lambda: backward_sync_blocked(trainer),
            on_params_added=self._add_to_first_optimizer,
            warn=rank_zero_warn,
        )
        self.policy = config.policy()
        if policy_state is not None:
            self.policy.load_state_dict(policy_state)
        else:
            # The progress guard measures the CG phase against the first optimizer's rate just before the swap, from
            # the lowest loss the first optimizer reached over that window.
            recent = [(loss, c) for loss, c in record.first_phase_points()[-RATE_WINDOW:] if math.isfinite(loss)]
            start = (min(loss for loss, _ in recent), recent[-1][1]) if recent else None
            self.policy.begin(trailing_rate(recent, RATE_WINDOW), start)
        self._install(trainer, announce=not resumed)

    def _install(self, trainer: pl.Trainer, announce: bool) -> None:
        if trainer.gradient_clip_val:
            rank_zero_warn(
                f"ConvexitySwapCallback: gradient clipping (gradient_clip_val={trainer.gradient_clip_val}) is turned "
                "off for the CG phase: clipping would corrupt the line search's gradients."
            )
        if trainer.accumulate_grad_batches != 1:
            rank_zero_warn(
                f"ConvexitySwapCallback: accumulate_grad_batches={trainer.accumulate_grad_batches} is set to 1 for "
                "the CG phase, which forms its own exact macro-batch gradient."
            )
        schedulers = (
            []
            if self.config.scheduler_factory is None
            else scheduler_configs(self.config.scheduler_factory(self.adapter))
        )
        # Under a GradScaler the adapter gets the loop's closure and scales with the same scaler (_scaling.py).
        TrainerSettings([self.adapter], schedulers, None, 1, closure_steps=True).apply(trainer)
        if announce and self.config.warn_single_batches and trainer.num_training_batches > 1:
            rank_zero_warn(
                f"ConvexitySwapCallback: the CG phase steps on single mini-batches of a training set of "
                f"{trainer.num_training_batches} batches; expect the training loss to rise. Use cg_phase='full'.",
                category=UserWarning,
            )

    # ------------------------------------------------------------------------------------------------------------
    # Hooks
    # ------------------------------------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer) -> None:
        self.adapter.discard()  # a macro-batch left over by an epoch that ended early

    def on_train_batch_start(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        self._current = (batch, batch_idx, is_last_batch(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, outputs: Any, batch: Any) -> PhaseDecision | None:
        self._current = (None, 0, False)  # the batch is not kept beyond its step
        return self._after_steps(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer) -> PhaseDecision | None:
        # An epoch that ended before its last batch (on_train_batch_start returned -1): step on what it kept.
        self.adapter.finish()
        return self._after_steps(trainer)

    def _after_steps(self, trainer: pl.Trainer) -> PhaseDecision | None:
        decision = None
        while self._results and decision is None:
            decision = self._after_step(trainer, self._results.pop(0))
        return decision

    def _after_step(self, trainer: pl.Trainer, step: MacroBatchStep) -> PhaseDecision | None:
        # Sample counts over all ranks (the objective reduced them): the same compute on every rank.
        self.record.compute += step.forward_samples + 2 * step.backward_samples
        if step.non_finite is not None:
            # Never hand a non-finite objective to a gradient method (the fallback): stop, weights intact.
            where = f" on batches {step.non_finite_batches} of epoch {trainer.current_epoch}"
            raise NonFiniteObjectiveError(
                f"ConvexitySwapCallback: the CG phase stopped training at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}, with the weights as they were before the step. The training loss was not "
                f"finite{where if step.non_finite_batches else ''}. {step.non_finite}"
            )
        # Every second-phase optimizer goes through the same checks: the step's start loss and gradient norm.
        self._points.append((step.loss, step.grad_norm))
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
        return self._fallback_decision(self.policy.iteration(step.failed))

    def _fallback_decision(self, decision: FallbackDecision) -> PhaseDecision | None:
        if not decision.fall_back:
            return None
        if not self.config.fallback:
            if not self._warned_struggling:
                rank_zero_warn(
                    f"ConvexitySwapCallback: the CG phase is struggling ({decision.reason}); fallback is disabled."
                )
                self._warned_struggling = True
            return None
        return PhaseDecision(True, decision.reason)

    # ------------------------------------------------------------------------------------------------------------
    # Checks and the fallback
    # ------------------------------------------------------------------------------------------------------------

    def measure(self, trainer: pl.Trainer) -> tuple[float, float] | None:
        if not self._points:
            return None
        losses, norms = zip(*self._points)
        self._points.clear()
        return sum(losses) / len(losses), sum(norms) / len(norms)

    def decide(self, trainer: pl.Trainer, loss: float, grad_norm: float, epoch: int, step: int) -> PhaseDecision:
        decision = self.policy.check(loss, self.record.training_compute)
        return self._fallback_decision(decision) or PhaseDecision(False, "")

    def leave(self, trainer: pl.Trainer, pl_module: pl.LightningModule, decision: PhaseDecision, epoch: int) -> Phase:
        self.adapter.discard()
        self.first.apply(trainer)
        self.record.fallback_reason = decision.reason
        first_name = type(self.first.optimizers[0]).__name__
        message = (
            f"ConvexitySwapCallback: falling back to {first_name} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}: {decision.reason}."
        )
        rank_zero_warn(message)
        monitoring.log_text(trainer, tags.FALLBACK_TEXT, message, trainer.global_step)
        return self.successor(epoch)

    def continue_from(self, previous: Phase) -> None:
        # What Lightning restores from a checkpoint after on_fit_start: the CG optimizer's state (direction,
        # preconditioner, counts).
        if isinstance(previous, CGPhase):
            self.adapter.load_state_dict(previous.adapter.state_dict())

    def _add_to_first_optimizer(self, params: list[Tensor]) -> None:
        # The fallback's optimizer trains them too, with its own defaults.
        if self.first.optimizers:
            self.first.optimizers[0].add_param_group({"params": params})

    def close(self) -> None:
        self.adapter.discard()
        set_closure_steps(self._trainer, False)  # training is over: the plugin steps as Lightning does

    def state_dict(self) -> dict[str, Any]:
        # The first optimizer's state is kept for the fallback, so that it resumes where the first phase stopped.
        first_state = None
        if self.first.optimizers:
            first_state = {
                "optimizer": self.first.optimizers[0].state_dict(),
                "schedulers": [config.scheduler.state_dict() for config in self.first.lr_scheduler_configs],
                "scaler": self.first.scaler_state,
            }
        trial_batching = self.adapter.objective.trial_batching  # "auto" decided once, not again on resume
        return {
            "first_optimizer_state": first_state,
            "policy": self.policy.state_dict(),
            "trial_batching": trial_batching,
        }


class PhaseFactory:
    """Builds the phases of one run, so that each phase can hand over to the next and a checkpoint can rebuild the
    current one.

    Args:
        record: the run's record, shared by every phase.
        cg_config: how to build the CG phase.
        detect_only: the first phase only detects and logs the swap point.
        seed: base of the per-batch random seeds of the CG phase's objective.

    """

    def __init__(self, record: RunRecord, cg_config: CGPhaseConfig, detect_only: bool, seed: int) -> None:
        self.record = record
        self.cg_config = cg_config
        self.detect_only = detect_only
        self.seed = seed
        #: The swap detector of the first phase (set by the callback once it can be built).
        self.detector: SwapDetector | None = None
        #: How trial evaluations go through the kept batches; ``"auto"`` until the first probe or CG step decides.
        self.trial_batching = cg_config.trial_batching

    def first(self) -> FirstPhase:
        """The first phase, asking the detector at each check."""
        return FirstPhase(self.record, self.detector, None if self.detect_only else self.cg, probe=self.probe)

    def probe(self, trainer: pl.Trainer) -> CGProbe:
        """A probe of the CG phase, for the detector that asked for one."""
        iterations = int(getattr(self.detector, "probe_iterations", 5))
        return CGProbe(
            trainer.lightning_module, self.cg_config, self.seed, iterations, self.trial_batching, self._decided
        )

    def _decided(self, trial_batching: str) -> None:
        self.trial_batching = trial_batching

    def cg(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any] | None = None) -> CGPhase:
        """The CG phase, installed on ``trainer`` at once (``state``: from a checkpoint written in the CG phase)."""
        state = state or {}
        return CGPhase(
            trainer, pl_module, self.cg_config, self.record, self.seed, self.fallback,
            first_state=state.get("first_optimizer_state"), policy_state=state.get("policy"),
            trial_batching=state.get("trial_batching") or self.trial_batching,
        )  # fmt: skip

    def fallback(self, epoch: int | None = None) -> FirstPhase:
        """The first optimizer again, after a fallback at ``epoch`` (``None``: restored from a checkpoint). A detector
        that can try again (one with ``on_fallback``, as :class:`~lightning_twophase.ProbeDetector`) goes on; the
        others have had their swap."""
        retry = self.detector is not None and hasattr(self.detector, "on_fallback") and not self.detect_only
        if retry and epoch is not None:
            self.detector.on_fallback(epoch)  # type: ignore[union-attr]
        detector = self.detector if retry else None
        return FirstPhase(self.record, detector, self.cg if retry else None, name="fallback", probe=self.probe)

    def restore(self, name: str, state: dict[str, Any], trainer: pl.Trainer, pl_module: pl.LightningModule) -> Phase:
        """The phase a checkpoint was written in."""
        if name == CGPhase.name:
            if self.detect_only:
                raise MisconfigurationException(
                    "ConvexitySwapCallback(detect_only=True) cannot resume this checkpoint: it was written after the "
                    "swap, and the optimizer state it holds is conjugate gradient's. Resume it without detect_only, "
                    "or resume from a checkpoint written before the swap."
                )
            return self.cg(trainer, pl_module, state)
        phase = self.fallback(None) if name == "fallback" else self.first()
        phase.load_state_dict(state)
        return phase


def log_figure(trainer: pl.Trainer, record: RunRecord, save_dir: str | None = None) -> None:
    """Draw the norm-vs-loss figure of the checks so far for TensorBoard (and as a PNG in ``save_dir``)."""
    if trainer.global_rank != 0 or not record.history:
        return
    figure = monitoring.norm_vs_loss_figure(record.history, record.swap_check, record.peak_check())
    if figure is None:
        return
    monitoring.log_figure(trainer, tags.NORM_VS_LOSS_FIGURE, figure, trainer.global_step)
    if save_dir is not None:
        monitoring.save_figure(figure, Path(save_dir) / "norm_vs_loss.png")


def write_run_outputs(trainer: pl.Trainer, record: RunRecord, detector: Any, figures: bool) -> None:
    """At the end of training: the figure (TensorBoard and PNG), the history as CSV next to the logs, and, without
    a swap, why."""
    # `log_dir` is a collective (a broadcast): every rank must ask for it.
    log_dir = trainer.log_dir if trainer.loggers else None
    if figures:
        log_figure(trainer, record, log_dir)
    if log_dir is not None:
        monitoring.write_history_csv(record.history, Path(log_dir) / "twophase_history.csv")
    if record.swap_reason is None:
        rank_zero_info(monitoring.no_swap_message(record.history, trainer.current_epoch, detector))


def _batch_size(batch: Any) -> int:
    """The number of samples in a batch; quick for the usual tuple of tensors, Lightning's rule otherwise."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor) and batch[0].dim() > 0:
        return batch[0].shape[0]
    return extract_batch_size(batch)
