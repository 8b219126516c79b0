r"""ConvexitySwapCallback: watch the gradient-norm-vs-loss curve, detect its peak, swap to conjugate gradient in place.

Monitor, decide, agree, act (as Lightning's ``EarlyStopping``); the work itself is done by the current phase
(:mod:`lightning_twophase.phases`):

* monitor: the first phase adds up the global gradient norm of every optimizer step (after unscaling and DDP's
  all-reduce) and the training loss on the device, without a host synchronisation;
* decide: once per check (per epoch by default) the means, reduced across ranks, go to the detector (first phase)
  or to the fallback policy (CG phase);
* agree: rank 0's decision is broadcast, so every rank acts at the same step;
* act: the phase is left for the next one: the swap installs conjugate gradient through ``trainer.strategy``, the
  fallback puts the first phase's settings back.

State survives resume (as ``StochasticWeightAveraging``'s does): a checkpoint written after the swap re-installs the
CG phase in ``on_fit_start``, before Lightning restores the optimizer states.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer
from typing_extensions import override

from lightning_twophase import monitoring, settings, tags
from lightning_twophase._lightning import is_last_batch, set_callback_metric, unsupported_settings
from lightning_twophase.detection import SwapDetector
from lightning_twophase.fallback import FallbackPolicy
from lightning_twophase.optim import ConjugateGradient
from lightning_twophase.phases import (
    CGPhaseConfig,
    OptimizerFactory,
    Phase,
    PhaseDecision,
    PhaseFactory,
    PreconditionerFactory,
    RunRecord,
    SchedulerFactory,
    log_figure,
    write_run_outputs,
)

__all__ = ["ConvexitySwapCallback"]


class ConvexitySwapCallback(Callback):
    r"""Two-phase training: the optimizer of ``configure_optimizers`` first, conjugate gradient after the swap point.

    Add it to the Trainer and keep ``configure_optimizers`` as it is (Adam, say)::

        trainer = Trainer(callbacks=[ConvexitySwapCallback()])
        trainer.fit(model)

    At each check (each epoch by default) a detector decides: by default a :class:`~lightning_twophase.ProbeDetector`,
    which swaps once a short, measured run of conjugate gradient (undone afterwards) decreases the loss faster per
    unit of compute than the first optimizer; ``detector="paper"`` gives the paper's Algorithm 1. After the swap a
    progress guard keeps comparing the CG phase with the first optimizer, and falls back once it is both slower and
    behind where the first optimizer would be. The
    swap point, its reason and the CG diagnostics go to every logger under ``twophase/``; TensorBoard also
    gets a custom-scalars layout, a text event at the swap and the norm-vs-loss figure. After ``fit``, the callback's
    :attr:`swap_epoch`, :attr:`swap_step` and :attr:`swap_reason` tell where and why it swapped; the numbers are also
    in ``trainer.callback_metrics`` (``twophase/swap_epoch``, ``twophase/swap_step``, ``twophase/phase``), which is
    what reaches the launching process under ``strategy="ddp_spawn"``.

    Like Lightning's own stateful callbacks (``EarlyStopping``, ``StochasticWeightAveraging``), the callback describes
    one run: passed to another ``fit`` (the same Trainer with more epochs, or a new Trainer on the trained model), it
    goes on where the last fit left it, as if resumed from a checkpoint written at its end. After a swap the new fit
    trains with conjugate gradient (its optimizer state carried over), the first optimizer of the new
    ``configure_optimizers`` getting the old one's state for a fallback; the history and the compute go on. For a
    fresh start, make a new callback.

    Args:
        detector: ``"probe"`` (the default rule), ``"paper"`` (Algorithm 1 as published), or any object with the
            methods of :class:`~lightning_twophase.SwapDetector`, used as it is.
        factor, smoothing, patience, require_rise: options of the paper's rule, only with ``detector="paper"`` (see
            :class:`~lightning_twophase.GradientNormPeakDetector`): swap when the gradient norm (smoothed by an
            exponential moving average with this weight of the past) stays below ``factor`` times its running peak
            for ``patience`` checks, the peak counting only after the norm has risen once.
        check_every_n_steps: check every this many optimizer steps instead of once per epoch.
        min_epochs, min_steps: no swap before this many epochs have been trained, or optimizer steps taken.
        fixed_swap_epoch: swap after exactly this many epochs, ignoring the curve; a float in (0, 1) is a fraction of
            ``max_epochs`` (the paper's table: 0.3).
        max_swap_epoch: swap after this many epochs at the latest (a float in (0, 1): a fraction of ``max_epochs``).
        detect_only: detect and log the swap point, but never swap.
        cg_phase: what one CG iteration sees: ``"full"`` (the whole training set: one iteration per epoch, the
            paper's CG and the default), an integer ``K`` (a macro-batch of ``K`` mini-batches), or ``"minibatch"``
            (one iteration per mini-batch; numerically unsound unless one batch is the whole training set).
        optimizer_kwargs: options for :class:`~lightning_twophase.ConjugateGradient` (default: Hager-Zhang with the
            value-only interpolation line search at a 10 % tolerance).
        optimizer_factory: builds the second-phase optimizer instead, from the first one's parameter groups (a list
            of dicts with ``"params"``). Any closure optimizer works, ``torch.optim.LBFGS`` for instance.
        scheduler_factory: builds the CG phase's learning-rate scheduler (a scheduler, or a Lightning scheduler
            config dict) from the CG optimizer; by default the CG phase has none.
        preconditioner: the fixed diagonal preconditioner of the CG phase: ``"none"`` (plain CG, the paper's),
            ``"second_moments"`` (``1 / (sqrt(v_hat) + eps)`` from the first phase's Adam-like state, normalised to
            mean 1; plain CG with a warning if the first optimizer keeps no second moments), or a callable that
            returns one positive tensor per parameter from the first-phase optimizer. Applies to the built-in
            ConjugateGradient.
        fallback: go back to the first-phase optimizer if the CG phase fails (the paper's "safe resort"). Keeps the
            first-phase optimizer and its state in memory and in checkpoints.
        fallback_after_failures, fallback_loss_window, fallback_loss_rtol, fallback_progress_window: the fallback
            policy (see :class:`~lightning_twophase.FallbackPolicy`): fall back after this many consecutive
            line-search failures; when the loss at a check is more than ``fallback_loss_rtol`` (relative) above its
            value ``fallback_loss_window`` CG checks before; or when, judged every ``fallback_progress_window``
            checks, the CG phase decreases the loss more slowly per unit of compute than the first optimizer did
            before the swap and is not ahead of where the first optimizer would be (``None``: never for these
            reasons).
        max_cached_bytes: a macro-batch's batches stay on the training device up to this many bytes, the module's data
            saved for each of them (:mod:`~lightning_twophase.module_state`) included; the rest wait in host memory
            during the iteration.
        trial_batching: how line-search trials evaluate the kept batches: ``"auto"`` (in one concatenated chunk if
            that gives the same loss as batch by batch, checked once; a chunk that raises means batch by batch, and
            the attempt leaves no trace), ``"chunks"`` or ``"batches"``.
        log_figures: draw the norm-vs-loss figure (needs matplotlib) at the swap and at the end of training.

    Raises:
        ValueError: at construction, for settings out of range.
        MisconfigurationException: at ``setup``/``on_fit_start``, before any training, for settings the CG phase
            cannot serve: manual optimization, several optimizers, unsupported strategies (DeepSpeed, FSDP, XLA),
            half-precision weights (``precision="16-true"`` or ``"bf16-true"``), a ``GradientAccumulationScheduler``.

    """

    def __init__(
        self,
        factor: float | None = None,
        smoothing: float | None = None,
        patience: int | None = None,
        check_every_n_steps: int | None = None,
        min_epochs: int | None = None,
        min_steps: int | None = None,
        fixed_swap_epoch: int | float | None = None,
        max_swap_epoch: int | float | None = None,
        require_rise: bool | None = None,
        detect_only: bool = False,
        cg_phase: str | int = settings.FULL_BATCH,
        optimizer_kwargs: dict[str, Any] | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        scheduler_factory: SchedulerFactory | None = None,
        preconditioner: str | PreconditionerFactory = "none",
        fallback: bool = True,
        fallback_after_failures: int = 3,
        fallback_loss_window: int | None = 5,
        fallback_loss_rtol: float = 1e-3,
        fallback_progress_window: int | None = 10,
        max_cached_bytes: int = 2 * 1024**3,
        trial_batching: str = "auto",
        log_figures: bool = True,
        detector: str | SwapDetector = "probe",
    ) -> None:
        super().__init__()
        detection = {name: value for name, value in locals().items() if name in settings.DETECTION_DEFAULTS}
        settings.check_arguments(detection, detector, check_every_n_steps, cg_phase, preconditioner)
        policy = (fallback_after_failures, fallback_loss_window, fallback_loss_rtol, fallback_progress_window)
        settings.check_fallback_arguments(*policy)
        settings.check_second_phase_arguments(optimizer_kwargs, optimizer_factory, max_cached_bytes, trial_batching)
        self._detection = settings.detection_settings(detection)
        self.check_every_n_steps = check_every_n_steps
        self.detect_only = detect_only
        self.cg_phase = cg_phase
        self.optimizer_kwargs = {**settings.DEFAULT_CG_OPTIONS, **(optimizer_kwargs or {})}
        self.log_figures = log_figures
        cg_config = CGPhaseConfig(
            batches_per_step={settings.FULL_BATCH: None, settings.MINI_BATCH: 1}.get(cg_phase, cg_phase),  # type: ignore[arg-type]
            build_optimizer=optimizer_factory or partial(ConjugateGradient, **self.optimizer_kwargs),
            scheduler_factory=scheduler_factory,
            preconditioner=preconditioner,
            fallback=fallback,
            policy=partial(FallbackPolicy, *policy),
            max_cached_bytes=max_cached_bytes,
            trial_batching=trial_batching,
            warn_single_batches=cg_phase == settings.MINI_BATCH,
        )
        self._record = RunRecord()
        self._phases = PhaseFactory(self._record, cg_config, detect_only, seed=int(torch.initial_seed()) % (2**31))
        self._phases.detector = None if isinstance(detector, str) else detector
        self._detector_name = detector if isinstance(detector, str) else None
        if self._detector_name is not None and not settings.has_fraction(self._detection):
            self._phases.detector = settings.build_detector(self._detector_name, self._detection)
        self._phase: Phase = self._phases.first()
        self._resumed_phase: dict[str, Any] | None = None
        self._fitted = False
        self._last_check = 0

    @property
    def detector(self) -> SwapDetector | None:
        """The swap detector (built at ``setup`` when an epoch option is a fraction of ``max_epochs``)."""
        return self._phases.detector

    @property
    def phase(self) -> str:
        """``"first"`` before the swap, ``"cg"`` after it, ``"fallback"`` after a fallback."""
        return self._phase.name

    @property
    def swap_epoch(self) -> int | None:
        """The epoch from which the CG phase trains (0-based; the number of first-phase epochs when the swap is made
        at an epoch's end), or ``None`` before the swap."""
        return self._record.swap_epoch

    @property
    def swap_step(self) -> int | None:
        """The global step at the swap (the number of first-phase optimizer steps), or ``None``."""
        return self._record.swap_step

    @property
    def swap_reason(self) -> str | None:
        """Why the swap was made (or, with ``detect_only``, would have been made)."""
        return self._record.swap_reason

    @property
    def fallback_reason(self) -> str | None:
        """Why the CG phase last fell back to the first-phase optimizer, if it did (kept after a later swap; the swap
        attributes describe the last swap)."""
        return self._record.fallback_reason

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per check: epoch, step, loss, gradient norm, phase, compute and the detector's numbers."""
        return self._record.history

    @property
    def compute(self) -> float:
        """Samples passed forward plus twice the samples passed backward, over all ranks (backward ~ 2 forward)."""
        return self._record.compute

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        problems = unsupported_settings(trainer, pl_module)
        problems += settings.resolve_fractions(self._detection, trainer.max_epochs)
        settings.refuse(problems)
        if self.detector is None and self._detector_name is not None:
            self._phases.detector = settings.build_detector(self._detector_name, self._detection)
            self._phase = self._phases.first()
        if self.cg_phase == settings.MINI_BATCH:
            settings.warn_single_batches()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        settings.refuse(settings.optimizer_problems(trainer.optimizers))
        config = self._phases.cg_config
        if not self.detect_only:
            settings.refuse(
                settings.second_phase_problems(trainer.optimizers[0], config.build_optimizer, config.scheduler_factory)
            )
        if self._resumed_phase is not None:
            # After the swap this installs CG now, before Lightning restores the optimizer states.
            state, self._resumed_phase = self._resumed_phase, None
            self._phase = self._phases.restore(state["phase"], state, trainer, pl_module)
        elif self._fitted:
            self._continue(trainer, pl_module)
        self._fitted = True

    def _continue(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Another fit with this callback: rebuild the phase the last fit ended in on this fit's Trainer and optimizer,
        from what a checkpoint written at the end of the last fit would hold, so that what trains, ``phase`` and the
        checks agree."""
        previous = self._phase
        state = {"phase": previous.name, **previous.state_dict()}
        previous.close()
        try:
            self._phase = self._phases.restore(previous.name, state, trainer, pl_module)
            self._phase.continue_from(previous)
        except (ValueError, KeyError, RuntimeError) as error:
            raise MisconfigurationException(
                f"ConvexitySwapCallback: this callback's last fit ended in its {previous.name!r} phase, and the "
                f"optimizer state of that phase does not fit this fit's model ({type(error).__name__}: {error}). "
                "A callback describes one run: pass a new ConvexitySwapCallback to train another model."
            ) from error

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        settings.refuse(settings.length_problems(self.cg_phase, trainer.num_training_batches))
        monitoring.add_custom_scalars_layout(trainer)
        if self.swap_reason is None and self._detection["fixed_swap_epoch"] == 0:
            # fixed_swap_epoch=0: conjugate gradient from the first step (the paper's "CG only" schedule).
            decision = PhaseDecision(True, "the fixed swap epoch 0 asks for conjugate gradient from the start")
            self._leave_phase(trainer, pl_module, decision, epoch=0)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase.on_train_epoch_start(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._phase.on_train_batch_start(trainer, batch, batch_idx)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._phase.on_before_optimizer_step(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        decision = self._phase.on_train_batch_end(trainer, outputs, batch)
        if decision is not None:  # identical on every rank: the CG phase decides on reduced numbers only
            self._leave_phase(trainer, pl_module, decision, epoch=trainer.current_epoch)
        # The epoch's check comes with its last batch: before validation and the checkpoints it may trigger.
        last = is_last_batch(trainer)
        if self.check_every_n_steps is None:
            if last:
                self._check(trainer, pl_module, trainer.current_epoch + 1, at_epoch_end=True)
            return
        step = trainer.global_step  # it only moves when the optimizer steps: with accumulation, batches share one
        if step % self.check_every_n_steps == 0 and step != self._last_check:
            self._last_check = step
            self._check(trainer, pl_module, trainer.current_epoch + int(last), at_epoch_end=last)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch that ended before its last batch (on_train_batch_start returned -1) is checked here.
        decision = self._phase.on_train_epoch_end(trainer)
        if decision is not None:
            self._leave_phase(trainer, pl_module, decision, epoch=trainer.current_epoch + 1)
        if self.check_every_n_steps is None:
            self._check(trainer, pl_module, epochs_done=trainer.current_epoch + 1, at_epoch_end=True)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epochs_done: int, at_epoch_end: bool) -> None:
        means = self._phase.measure(trainer)
        if means is None:
            return
        loss, grad_norm = means
        step = trainer.global_step
        decision = self._phase.decide(trainer, loss, grad_norm, epoch=epochs_done, step=step)
        scalars = self._record.add_check(epochs_done, step, loss, grad_norm, self.phase, decision.scalars)
        monitoring.log_scalars(trainer, scalars, step)
        # Every rank reached the decision from the same reduced numbers, but the compute it counts is its own (shards
        # may differ in size): rank 0's answer settles it, so that every rank swaps, or runs a probe, together.
        leave, probe = (bool(value) for value in trainer.strategy.broadcast((decision.leave, decision.probe), src=0))
        if leave:
            self._leave_phase(
                trainer, pl_module, decision, epoch=epochs_done if at_epoch_end else trainer.current_epoch
            )
        elif probe:
            self._phase.begin_probe(trainer)

    def _leave_phase(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, decision: PhaseDecision, epoch: int
    ) -> None:
        self._phase = self._phase.leave(trainer, pl_module, decision, epoch)
        if self.log_figures:
            log_figure(trainer, self._record)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase.count_compute(trainer)
        self._phase.close()
        set_callback_metric(trainer, tags.PHASE, tags.PHASE_VALUES[self.phase])
        write_run_outputs(trainer, self._record, self.detector, self.log_figures)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            **self._phase.state_dict(),
            "record": self._record.state_dict(),
            "detector": None if self.detector is None else self.detector.state_dict(),
            "detector_type": type(self.detector).__name__,
            "objective_seed": self._phases.seed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._record.load_state_dict(state_dict["record"])
        settings.restore_detector(self.detector, state_dict["detector"], state_dict.get("detector_type"))
        self._phases.seed = state_dict["objective_seed"]
        # The phase itself is rebuilt in `on_fit_start`, once the Trainer's optimizers exist.
        self._resumed_phase = state_dict
