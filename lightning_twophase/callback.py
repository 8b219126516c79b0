r"""ConvexitySwapCallback: train with your optimizer, swap in place to conjugate gradient where it pays.

Monitor, decide, agree, act (as Lightning's ``EarlyStopping``), with the state machine in plain sight: the phase is
:class:`~lightning_twophase.phases.Phase` ``FIRST`` until the swap, ``CG`` after it, and ``FALLBACK`` if the CG phase
hands training back to the first optimizer (for the rest of the fit). The work of each phase is done by its object
(:mod:`lightning_twophase.phases`):

* monitor: the first phase adds up the loss of every step and the gradient norm of some (after unscaling and DDP's
  all-reduce) on the device, without a host synchronisation; the CG phase keeps what each iteration did;
* decide: once per check (per epoch by default, made once with the epoch's last batch) the means, reduced across
  ranks, go to the swap rule (the detector within the bounds ``min_epochs`` and ``swap_epoch``) or to the fallback
  policy;
* agree: rank 0's decision is broadcast, so every rank acts at the same step;
* act: the swap installs conjugate gradient through ``trainer.strategy``, the fallback puts the first phase's settings
  back.

State survives resume (as ``StochasticWeightAveraging``'s does): a checkpoint written after the swap re-installs the
CG phase in ``on_fit_start``, before Lightning restores the optimizer states.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_twophase import monitoring, refusals, tags
from lightning_twophase._lightning import is_last_batch, set_callback_metric
from lightning_twophase.arguments import check_count, check_flag, check_instance
from lightning_twophase.decision import Decision, Reason
from lightning_twophase.detection import GradientNormPeakDetector, PlateauDetector, SwapDetector
from lightning_twophase.fallback import FallbackPolicy
from lightning_twophase.phases import (
    CGPhase,
    CGPhaseConfig,
    FirstPhase,
    OptimizerFactory,
    Phase,
    SchedulerFactory,
)
from lightning_twophase.record import RunRecord, announce_swap, log_figure, write_run_outputs
from lightning_twophase.schedule import SwapSchedule

__all__ = ["ConvexitySwapCallback"]

_OWNER = "ConvexitySwapCallback"

#: ``detector`` names.
DETECTORS = {"plateau": PlateauDetector, "paper": GradientNormPeakDetector}

#: After a fallback no rule reads the gradient norm: it is measured on one step in this many, for the logs.
FALLBACK_NORM_EVERY_N_STEPS = 32

#: Arguments of earlier versions, and how to say the same now.
RENAMED = {
    "fixed_swap_epoch": "swap_epoch=<epoch> with detector=None (a swap at exactly that epoch)",
    "max_swap_epoch": "swap_epoch=<epoch> (the latest swap; the detector may swap earlier)",
    "factor": "detector=GradientNormPeakDetector(factor=...)",
    "smoothing": "detector=GradientNormPeakDetector(smoothing=...)",
    "patience": "detector=GradientNormPeakDetector(patience=...)",
    "require_rise": "detector=GradientNormPeakDetector(require_rise=...)",
    "min_steps": "min_epochs (no swap before this many epochs), with check_every_n_steps for checks within epochs",
    "cg_phase": "batches_per_iteration (None for 'full', 1 for 'minibatch', K for K)",
    "optimizer_kwargs": "optimizer={...} (the keyword arguments of ConjugateGradient)",
    "optimizer_factory": "optimizer=<the factory>",
    "preconditioner": "optimizer={'preconditioner': ...}",
    "fallback_after_failures": "fallback=FallbackPolicy(after_failures=...)",
    "fallback_loss_window": "fallback=FallbackPolicy(loss_window=...)",
    "fallback_loss_rtol": "fallback=FallbackPolicy(loss_rtol=...)",
    "fallback_progress_window": "fallback=FallbackPolicy(progress_window=...)",
    "trial_batching": "nothing: it was removed (trial evaluations run in one chunk where that gives the same loss)",
}


class ConvexitySwapCallback(Callback):
    r"""Two-phase training: the optimizer of ``configure_optimizers`` first, a full-batch second phase after the swap.

    Add it to the Trainer and keep ``configure_optimizers`` as it is (Adam, say)::

        trainer = Trainer(max_epochs=300, callbacks=[ConvexitySwapCallback()])

    By default the swap comes once the best epoch loss fell by less than 20 % over the last 20 % of ``max_epochs``
    (:class:`~lightning_twophase.PlateauDetector`), at 30 % at the latest (where practitioners switch to L-BFGS); then
    each epoch is one step of L-BFGS (up to 20 iterations) on the whole training set, and the fallback hands training
    back to the first optimizer if its line searches keep failing or its loss rises. The loggers get it all under
    ``twophase/``. Passed to another ``fit``, the callback goes on.

    Args:
        detector: the swap rule: ``"plateau"`` (:class:`~lightning_twophase.PlateauDetector`), ``"paper"`` (the
            paper's :class:`~lightning_twophase.GradientNormPeakDetector`), a :class:`~lightning_twophase.SwapDetector`
            of your own, or ``None`` (swap at ``swap_epoch``). The callback works on a copy of an instance (read it
            as :attr:`detector`): one configured instance serves any number of runs, each starting afresh.
        swap_epoch: swap after this many epochs at the latest; a float in (0, 1) is that fraction of ``max_epochs``
            (or of ``max_steps`` in epochs); ``0``: CG from the start; ``None``: no bound.
        min_epochs: no swap by the detector before this many epochs.
        check_every_n_steps: check every this many optimizer steps instead of once per epoch.
        detect_only: decide and log the swap point, but never swap.
        optimizer: the second phase: ``"lbfgs"`` (:class:`~lightning_twophase.LBFGS`, the default: up to 20
            iterations per epoch on the kept batches), ``"cg"`` (the paper's
            :class:`~lightning_twophase.ConjugateGradient`, one iteration per epoch), a dict of its options with
            its ``"name"`` (``"lbfgs"`` unless given), among them ``"preconditioner"`` (``"second_moments"``, the
            default: the first optimizer's ``1 / sqrt(v_hat)``; ``"none"``; or a callable of the first optimizer),
            or a factory of a closure optimizer from the parameter groups (``torch.optim.LBFGS``, say).
        batches_per_iteration: ``None``: one CG iteration per epoch on the whole training set (the paper's); ``K``:
            per macro-batch of ``K`` mini-batches (``1`` is unsound unless one batch is the whole set).
        scheduler_factory: builds the CG phase's learning-rate scheduler from its optimizer (default: none).
        fallback: ``True`` (:class:`~lightning_twophase.FallbackPolicy` with its defaults), a policy of your own, or
            ``False`` (never fall back; warn where the default policy would).
        max_cached_bytes: a CG iteration's kept batches stay on the device up to this many bytes, the rest on the host.
        log_figures: draw the norm-vs-loss figure (needs matplotlib).

    Raises:
        TypeError, ValueError: when made, for arguments of a wrong type or value, or of an earlier version.
        MisconfigurationException: before any training, for settings the CG phase cannot serve (the support matrix
            in the docs lists them), each named with its fix.

    """

    def __init__(
        self,
        detector: str | SwapDetector | None = "plateau",
        swap_epoch: int | float | None = 0.3,
        min_epochs: int = 0,
        check_every_n_steps: int | None = None,
        detect_only: bool = False,
        optimizer: str | dict[str, Any] | OptimizerFactory | None = None,
        batches_per_iteration: int | None = None,
        scheduler_factory: SchedulerFactory | None = None,
        fallback: bool | FallbackPolicy = True,
        max_cached_bytes: int = 2 * 1024**3,
        log_figures: bool = True,
        **removed: Any,
    ) -> None:
        super().__init__()
        _refuse_removed(removed)
        self._schedule = SwapSchedule(_detector(detector), swap_epoch, min_epochs)
        self.check_every_n_steps = check_count(_OWNER, "check_every_n_steps", check_every_n_steps, 1, optional=True)
        self.detect_only = check_flag(_OWNER, "detect_only", detect_only)
        self.log_figures = check_flag(_OWNER, "log_figures", log_figures)
        self._config = CGPhaseConfig.from_arguments(
            optimizer, batches_per_iteration, scheduler_factory, fallback, max_cached_bytes
        )
        self._record = RunRecord()
        self._phase = Phase.FIRST
        self._first = FirstPhase(self._record, self._schedule.norm_every_n_steps)
        self._cg: CGPhase | None = None
        self._resumed: dict[str, Any] | None = None
        self._seed = int(torch.initial_seed()) % (2**31)
        self._last_check_step, self._epoch_checked = 0, False
        self._warned_training_ends = False

    @property
    def detector(self) -> SwapDetector | None:
        """The swap rule (``None``: the swap comes at ``swap_epoch``)."""
        return self._schedule.detector

    @property
    def phase(self) -> Phase:
        """``FIRST`` before the swap, ``SECOND`` after it, ``FALLBACK`` after a fallback (``phase == "second"``
        works)."""
        return self._phase

    @property
    def swap_epoch(self) -> int | None:
        """The epoch from which the CG phase trains (the first phase's epochs), or ``None`` before the swap."""
        return self._record.swap_epoch

    @property
    def swap_step(self) -> int | None:
        """The global step at the swap (the first phase's optimizer steps), or ``None``."""
        return self._record.swap_step

    @property
    def swap_decision(self) -> Decision | None:
        """Why the swap was made (or, detecting only, would have been): a reason code and a message."""
        return self._record.swap_decision

    @property
    def swap_reason(self) -> str | None:
        """:attr:`swap_decision`'s message."""
        return getattr(self._record.swap_decision, "message", None)

    @property
    def fallback_decision(self) -> Decision | None:
        """Why the CG phase fell back to the first optimizer, if it did."""
        return self._record.fallback_decision

    @property
    def fallback_reason(self) -> str | None:
        """:attr:`fallback_decision`'s message."""
        return getattr(self._record.fallback_decision, "message", None)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per check: epoch, step, loss, gradient norm, phase, compute and the rule's numbers."""
        return self._record.history

    @property
    def compute(self) -> float:
        """Samples passed forward plus twice the samples passed backward, over all ranks (backward ~ 2 forward)."""
        return self._record.compute

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refusals.refuse(refusals.unsupported_settings(trainer, pl_module))
        refusals.warn_if_unsound(self._config.batches_per_step)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refusals.refuse(refusals.optimizer_problems(trainer.optimizers))
        if not self.detect_only:
            refusals.refuse(refusals.second_phase_problems(trainer.optimizers[0], self._config))
        if self._resumed is not None:
            state, self._resumed = self._resumed, None
            self._restore_phase(state, trainer, pl_module)
        elif self._cg is not None:  # another fit after a swap: CG goes on on this fit's Trainer
            self._cg = self._cg.carried_to(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = refusals.training_epochs(trainer)
        problems = refusals.length_problems(self._config.batches_per_step, trainer.num_training_batches)
        problems += refusals.detector_problems(self.detector, tuple(DETECTORS.values()), epochs)
        refusals.refuse(problems + self._schedule.setup(epochs))
        monitoring.add_custom_scalars_layout(trainer)
        fresh = self._phase is Phase.FIRST and self._record.swap_decision is None
        self._warned_training_ends = False
        if self._schedule.note is not None and fresh:  # no swap in this training: said once, training goes on
            rank_zero_warn(self._schedule.note + ".")
            self._warned_training_ends = True
        if self._schedule.swap_at == 0 and fresh:
            # swap_epoch=0: conjugate gradient from the first step (the paper's "CG only" schedule).
            decision = Decision(True, Reason.SWAP_EPOCH, "swap_epoch=0 asks for conjugate gradient from the start")
            if self._room_for_second_phase(trainer, decision, 0, trainer.num_training_batches):
                self._swap(trainer, pl_module, decision, epoch=0)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_checked = False
        if self._cg is not None:
            self._cg.on_train_epoch_start()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._cg is not None:
            self._cg.on_train_batch_start(batch, batch_idx)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._cg is None:
            self._first.on_before_optimizer_step(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._cg is None:
            self._first.on_train_batch_end(outputs, batch)
        else:
            decision = self._cg.on_train_batch_end()  # identical on every rank: made on reduced numbers only
            if decision is not None:
                self._fall_back(trainer, decision, epoch=trainer.current_epoch)
        # The epoch's check comes with its last batch: before validation and the checkpoints it may trigger. Checked by
        # steps, a CG iteration (an epoch) and the epoch where the swap bound falls are still checked at their end.
        last, step, every = is_last_batch(trainer), trainer.global_step, self.check_every_n_steps or 1
        by_epoch = self.check_every_n_steps is None or self._cg is not None  # steps move only when the optimizer does
        bound = last and self._phase is Phase.FIRST and self._schedule.swap_at == trainer.current_epoch + 1
        if (last and by_epoch) or bound or (not by_epoch and step % every == 0 and step != self._last_check_step):
            self._last_check_step = step
            left = 0 if last else trainer.num_training_batches - batch_idx - 1
            self._check(trainer, pl_module, trainer.current_epoch + int(last), at_epoch_end=last, batches_left=left)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch that ended before its last batch (on_train_batch_start returned -1) is stepped and checked here.
        if self._cg is not None:
            decision = self._cg.on_train_epoch_end()
            if decision is not None:
                self._fall_back(trainer, decision, epoch=trainer.current_epoch + 1)
        if (self.check_every_n_steps is None or self._cg is not None) and not self._epoch_checked:
            self._check(trainer, pl_module, trainer.current_epoch + 1, at_epoch_end=True)

    def _check(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        epochs_done: int,
        at_epoch_end: bool,
        batches_left: float = 0,
    ) -> None:
        self._epoch_checked = self._epoch_checked or at_epoch_end
        means = self._first.measure(trainer) if self._cg is None else self._cg.measure()
        if means is None:
            return
        (loss, grad_norm), step = means, trainer.global_step
        decision = None
        if self._phase is Phase.FIRST:
            decision = self._schedule.decide(loss, grad_norm, epochs_done, step)
        elif self._cg is not None:
            decision = self._cg.check(loss)
        scalars = {} if decision is None else decision.scalars
        logged = self._record.add_check(epochs_done, step, loss, grad_norm, self._phase.value, scalars)
        monitoring.log_scalars(trainer, logged, step)
        if decision is None:
            return
        # Every rank decided on the same reduced numbers; rank 0's decision settles it (a rule of one's own need not be
        # deterministic), so that every rank acts, records and announces alike.
        decision = trainer.strategy.broadcast(decision, src=0)
        if self._phase is Phase.FIRST:
            self._record.note_rule_answer(decision)
        if not decision.act:
            return
        epoch = epochs_done if at_epoch_end else trainer.current_epoch
        if self._cg is not None:
            self._fall_back(trainer, decision, epoch)
        elif self._record.swap_decision is not None or self._room_for_second_phase(
            trainer, decision, epoch, batches_left
        ):  # detecting only, the swap point is found (and judged) once
            self._swap(trainer, pl_module, decision, epoch)

    def _room_for_second_phase(self, trainer: pl.Trainer, decision: Decision, epoch: int, batches_left: float) -> bool:
        """Whether a swap now leaves a complete second-phase iteration before the training ends; if not, the rule's
        answer becomes ``TRAINING_ENDS`` and the first optimizer trains on (said once per fit)."""
        why = refusals.no_second_phase_iteration(trainer, self._config.batches_per_step, batches_left)
        if why is None:
            return True
        held = Decision(False, Reason.TRAINING_ENDS, f"{decision.message}, but {why}", decision.scalars)
        self._record.last_decision = held
        if not self._warned_training_ends:
            rank_zero_warn(
                f"ConvexitySwapCallback: no swap at epoch {epoch}, step {trainer.global_step}: "
                f"{held.message}. The first optimizer trains to the end."
            )
            self._warned_training_ends = True
        return False

    def _swap(self, trainer: pl.Trainer, pl_module: pl.LightningModule, decision: Decision, epoch: int) -> None:
        if self.detect_only:
            if self._record.swap_decision is None:  # the swap point is announced once
                announce_swap(trainer, self._record, decision, epoch, swapped=False)
            return
        first_name = type(trainer.optimizers[0]).__name__
        self._cg = CGPhase(trainer, pl_module, self._config, self._record, self._seed)  # may refuse: announce after
        second_name = self._config.optimizer_name
        announce_swap(
            trainer, self._record, decision, epoch, swapped=True, first_name=first_name, second_name=second_name
        )
        self._enter(Phase.SECOND, trainer)

    def _fall_back(self, trainer: pl.Trainer, decision: Decision, epoch: int) -> None:
        assert self._cg is not None
        self._cg.fall_back(decision, epoch)
        self._cg = None
        self._record.fallback_decision = decision
        self._first = FirstPhase(self._record, FALLBACK_NORM_EVERY_N_STEPS)  # no rule reads the norm any more
        self._enter(Phase.FALLBACK, trainer)

    def _enter(self, phase: Phase, trainer: pl.Trainer) -> None:
        self._phase = phase
        set_callback_metric(trainer, tags.PHASE, tags.PHASE_VALUES[phase])
        # At the step of the change itself: the jump of the chart is the swap (or the fallback), not the next check.
        monitoring.log_scalars(trainer, {tags.PHASE: tags.PHASE_VALUES[phase]}, trainer.global_step)
        if self.log_figures:
            log_figure(trainer, self._record)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._cg is not None:
            self._cg.close()
        else:
            self._first.measure(trainer)  # the compute of steps after the last check
        set_callback_metric(trainer, tags.PHASE, tags.PHASE_VALUES[self._phase])
        write_run_outputs(trainer, self._record, self.log_figures)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._cg is not None:  # the precision plugin steps as Lightning does again
            self._cg.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        phase_state = self._first.state_dict() if self._cg is None else self._cg.state_dict()
        return {
            "phase": self._phase.value,
            **phase_state,
            "record": self._record.state_dict(),
            **self._schedule.state_dict(),
            "objective_seed": self._seed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._record.load_state_dict(state_dict["record"])
        mismatch = self._schedule.load_state_dict(state_dict)
        if mismatch is not None:
            rank_zero_warn(mismatch)
        self._seed = state_dict["objective_seed"]
        # The phase itself is rebuilt in `on_fit_start`, once the Trainer's optimizers exist.
        self._resumed = state_dict

    def _restore_phase(self, state: dict[str, Any], trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase = Phase(state["phase"])
        if self._phase is not Phase.SECOND:
            # Measured as the uninterrupted run does: after a fallback, a sample of the norm for the logs.
            every = FALLBACK_NORM_EVERY_N_STEPS if self._phase is Phase.FALLBACK else self._schedule.norm_every_n_steps
            self._first = FirstPhase(self._record, every)
            self._first.load_state_dict(state)
            return
        if self.detect_only:
            refusals.refuse([refusals.DETECT_ONLY_AFTER_SWAP])
        # Installed now, before Lightning restores the optimizer states.
        self._cg = CGPhase(trainer, pl_module, self._config, self._record, self._seed, state)


def _refuse_removed(removed: dict[str, Any]) -> None:
    """Arguments of earlier versions are refused with their new spelling; unknown ones as Python would."""
    unknown = [name for name in removed if name not in RENAMED]
    if unknown:
        raise TypeError(f"ConvexitySwapCallback: unexpected argument(s) {', '.join(map(repr, unknown))}.")
    if removed:
        spelled = "; ".join(f"instead of `{name}`, pass {RENAMED[name]}" for name in removed)
        raise TypeError(f"ConvexitySwapCallback: these arguments were renamed or removed in version 0.3: {spelled}.")


def _detector(detector: Any) -> SwapDetector | None:
    owner = _OWNER
    if detector is None:
        return None
    if isinstance(detector, str):
        if detector not in DETECTORS:
            removed = " (the probe rule was removed in version 0.3)" if detector == "probe" else ""
            raise ValueError(
                f"{owner}: `detector` must be one of {tuple(DETECTORS)}, a SwapDetector or None, got "
                f"{detector!r}{removed}."
            )
        return DETECTORS[detector]()
    hint = "Subclass lightning_twophase.SwapDetector for a rule of your own."
    check_instance(owner, "detector", detector, SwapDetector, hint)
    # The callback's own copy: an instance that configured another run (a loop over seeds) starts afresh here.
    try:
        return copy.deepcopy(detector)
    except Exception as error:  # a rule holding what cannot be copied is used as it is
        rank_zero_warn(
            f"{owner}: the detector {type(detector).__name__} cannot be copied ({type(error).__name__}: {error}), so "
            "this callback uses the instance itself and its state carries over to any other callback given it: pass "
            "a new instance to each callback."
        )
        return detector
