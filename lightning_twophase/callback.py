r"""ConvexitySwapCallback: watch the gradient-norm-vs-loss curve, detect its peak, swap to conjugate gradient in place.

Monitor, decide, agree, act (as Lightning's ``EarlyStopping``):

* monitor: the global gradient norm of every optimizer step (after unscaling and DDP's all-reduce) and the training
  loss are added up on the device, without a host synchronisation;
* decide: once per check (per epoch by default) the means go to a
  :class:`~lightning_twophase.detection.GradientNormPeakDetector`;
* agree: the means are reduced across ranks and rank 0's decision is broadcast, so every rank swaps at the same step;
* act: the first-phase optimizer is replaced through ``trainer.strategy.optimizers`` by a
  :class:`~lightning_twophase.macro_batch.MacroBatchOptimizer` around
  :class:`~lightning_twophase.ConjugateGradient`, and its schedulers are removed.

State survives resume (as ``StochasticWeightAveraging``'s does): a checkpoint written after the swap re-installs the
CG optimizer in ``on_fit_start``, before Lightning restores the optimizer states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from torch.optim import Optimizer

from lightning_twophase import monitoring
from lightning_twophase._lightning import scheduler_configs, unsupported_strategy, uses_grad_scaler
from lightning_twophase.detection import GradientNormPeakDetector, SwapDecision
from lightning_twophase.macro_batch import MacroBatchOptimizer
from lightning_twophase.objective import TrainingObjective
from lightning_twophase.optim import ConjugateGradient
from lightning_twophase.optim.distributed import broadcast_
from lightning_twophase.preconditioning import second_moment_preconditioner

#: ``cg_phase`` values: the whole training set per CG iteration, or one mini-batch per iteration.
FULL_BATCH = "full"
MINI_BATCH = "minibatch"

#: ConjugateGradient options used unless ``optimizer_kwargs`` overrides them: chosen on real MNIST
#: (``benchmarks/fullbatch_vs_minibatch.py``), where Hager-Zhang reached a lower loss than Polak-Ribiere+ and Brent's
#: value-only search at a 10 % tolerance cost about 2.7 gradient-pass equivalents per iteration.
DEFAULT_CG_OPTIONS: dict[str, Any] = {"beta": "hager_zhang", "line_search": "brent", "line_search_tolerance": 0.1}

#: ``preconditioner`` values: none, or the first phase's second moments (Adam's ``exp_avg_sq``).
NO_PRECONDITIONER = "none"
SECOND_MOMENTS = "second_moments"

OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]
PreconditionerFactory = Callable[[Optimizer], Sequence[Tensor]]
SchedulerFactory = Callable[[Optimizer], Any]


class ConvexitySwapCallback(Callback):
    r"""Two-phase training: the optimizer of ``configure_optimizers`` first, conjugate gradient after the swap point.

    Add it to the Trainer and keep ``configure_optimizers`` as it is (Adam, say)::

        trainer = Trainer(callbacks=[ConvexitySwapCallback()])
        trainer.fit(model)

    Detection (the paper's Algorithm 1 by default) runs on the mean training loss and mean gradient norm of each
    check. The swap point, its reason and the CG diagnostics go to every logger under ``twophase/``; TensorBoard also
    gets a custom-scalars layout, a text event at the swap and the norm-vs-loss figure. After ``fit``, the callback's
    :attr:`swap_epoch`, :attr:`swap_step` and :attr:`swap_reason` tell where and why it swapped; the numbers are also
    in ``trainer.callback_metrics`` (``twophase/swap_epoch``, ``twophase/swap_step``, ``twophase/phase``), which is
    what reaches the launching process under ``strategy="ddp_spawn"``.

    Args:
        factor: swap when the gradient norm falls below this fraction of its running maximum (the paper's 0.9).
        smoothing: weight of the past in an exponential moving average of the norm (0: none).
        patience: consecutive checks below the threshold before the swap fires.
        check_every_n_steps: check every this many optimizer steps instead of once per epoch.
        min_epochs: no swap before this many epochs have been trained.
        min_steps: no swap before this many optimizer steps.
        fixed_swap_epoch: swap after exactly this many epochs, ignoring the curve; a float in (0, 1) is a fraction of
            ``max_epochs`` (the paper's table: 0.3).
        max_swap_epoch: swap after this many epochs at the latest (a float in (0, 1): a fraction of ``max_epochs``).
        require_rise: a peak counts only after the norm has risen at least once (see the detector).
        detect_only: detect and log the swap point, but never swap.
        cg_phase: what one CG iteration sees: ``"full"`` (the whole training set: one iteration per epoch, the
            paper's CG and the default), an integer ``K`` (a macro-batch of ``K`` mini-batches), or ``"minibatch"``
            (one iteration per mini-batch; numerically unsound unless one batch is the whole training set).
        optimizer_kwargs: options for :class:`~lightning_twophase.ConjugateGradient` (default: Hager-Zhang with
            Brent's value-only line search at a 10 % tolerance).
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
        fallback_after_failures: consecutive line-search failures that trigger the fallback.
        fallback_loss_window: fall back when the loss at a check is above the loss this many CG-phase checks before
            (``None``: never for this reason).
        fallback_loss_rtol: how far, relative to the earlier loss, the loss must rise to count for
            ``fallback_loss_window``. A CG phase that has converged repeats its loss up to rounding in the epoch's
            mean, which must not send training back to the first optimizer; raise it if the objective itself varies
            between epochs (random augmentation).
        max_cached_bytes: a macro-batch's batches stay on the training device up to this many bytes; the rest wait in
            host memory during the iteration.
        log_figures: draw the norm-vs-loss figure (needs matplotlib) at the swap and at the end of training.
        detector: a detector to use instead of the one built from the detection arguments above.

    Raises:
        MisconfigurationException: at ``setup``/``on_fit_start``, before any training, for settings the CG phase
            cannot serve: manual optimization, several optimizers, unsupported strategies (DeepSpeed, FSDP, XLA),
            16-bit mixed precision with a gradient scaler, a ``GradientAccumulationScheduler``.

    """

    def __init__(
        self,
        factor: float = 0.9,
        smoothing: float = 0.0,
        patience: int = 1,
        check_every_n_steps: int | None = None,
        min_epochs: int = 0,
        min_steps: int = 0,
        fixed_swap_epoch: int | float | None = None,
        max_swap_epoch: int | float | None = None,
        require_rise: bool = True,
        detect_only: bool = False,
        cg_phase: str | int = FULL_BATCH,
        optimizer_kwargs: dict[str, Any] | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        scheduler_factory: SchedulerFactory | None = None,
        preconditioner: str | PreconditionerFactory = NO_PRECONDITIONER,
        fallback: bool = True,
        fallback_after_failures: int = 3,
        fallback_loss_window: int | None = 5,
        fallback_loss_rtol: float = 1e-3,
        max_cached_bytes: int = 2 * 1024**3,
        log_figures: bool = True,
        detector: GradientNormPeakDetector | None = None,
    ) -> None:
        super().__init__()
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"ConvexitySwapCallback: `check_every_n_steps` must be >= 1, got {check_every_n_steps}.")
        if not (cg_phase in (FULL_BATCH, MINI_BATCH) or (isinstance(cg_phase, int) and cg_phase >= 1)):
            raise ValueError(
                f"ConvexitySwapCallback: `cg_phase` must be 'full', 'minibatch' or a number of batches >= 1, "
                f"got {cg_phase!r}."
            )
        if not (callable(preconditioner) or preconditioner in (SECOND_MOMENTS, NO_PRECONDITIONER)):
            raise ValueError(
                f"ConvexitySwapCallback: `preconditioner` must be '{SECOND_MOMENTS}', '{NO_PRECONDITIONER}' or a "
                f"callable, got {preconditioner!r}."
            )
        if optimizer_kwargs is not None and optimizer_factory is not None:
            raise ValueError("ConvexitySwapCallback: pass `optimizer_kwargs` or `optimizer_factory`, not both.")
        if fallback_after_failures < 1:
            raise ValueError("ConvexitySwapCallback: `fallback_after_failures` must be at least 1.")
        if fallback_loss_window is not None and fallback_loss_window < 1:
            raise ValueError("ConvexitySwapCallback: `fallback_loss_window` must be at least 1 or None.")
        if not (math.isfinite(fallback_loss_rtol) and fallback_loss_rtol >= 0):
            raise ValueError(
                f"ConvexitySwapCallback: `fallback_loss_rtol` must be a finite number >= 0, got {fallback_loss_rtol}."
            )
        self._swap_epochs = {
            "fixed_swap_epoch": _epoch_setting("fixed_swap_epoch", fixed_swap_epoch),
            "max_swap_epoch": _epoch_setting("max_swap_epoch", max_swap_epoch),
        }
        fixed_swap_epoch, max_swap_epoch = self._swap_epochs["fixed_swap_epoch"], self._swap_epochs["max_swap_epoch"]
        if detector is None:
            detector = GradientNormPeakDetector(
                factor=factor,
                smoothing=smoothing,
                patience=patience,
                min_epochs=min_epochs,
                min_steps=min_steps,
                fixed_swap_epoch=fixed_swap_epoch if isinstance(fixed_swap_epoch, int) else None,
                max_swap_epoch=max_swap_epoch if isinstance(max_swap_epoch, int) else None,
                require_rise=require_rise,
            )
        self.detector = detector
        self.check_every_n_steps = check_every_n_steps
        self.detect_only = detect_only
        self.cg_phase = cg_phase
        self.optimizer_kwargs = {**DEFAULT_CG_OPTIONS, **(optimizer_kwargs or {})}
        self.optimizer_factory = optimizer_factory
        self.scheduler_factory = scheduler_factory
        self.preconditioner = preconditioner
        self.fallback = fallback
        self.fallback_after_failures = fallback_after_failures
        self.fallback_loss_window = fallback_loss_window
        self.fallback_loss_rtol = fallback_loss_rtol
        self.max_cached_bytes = max_cached_bytes
        self.log_figures = log_figures

        #: ``"first"`` before the swap, ``"cg"`` after it, ``"fallback"`` after a fallback.
        self.phase = "first"
        #: The epoch from which the CG phase trains (0-based; equal to the number of first-phase epochs when the
        #: swap is made at an epoch's end), or ``None`` before the swap.
        self.swap_epoch: int | None = None
        #: The global step at the swap (the number of first-phase optimizer steps), or ``None``.
        self.swap_step: int | None = None
        #: Why the swap was made (or, with ``detect_only``, would have been made).
        self.swap_reason: str | None = None
        #: Why the CG phase fell back to the first-phase optimizer, if it did.
        self.fallback_reason: str | None = None
        #: One record per check: epoch, step, loss, gradient norm, peak, threshold, phase, compute.
        self.history: list[dict[str, Any]] = []
        #: Samples passed forward plus twice the samples passed backward, over all ranks (backward ~ 2 forward).
        self.compute = 0.0

        self._first_optimizer: Optimizer | None = None
        self._first_schedulers: list[LRSchedulerConfig] = []
        self._first_settings: dict[str, Any] = {}
        self._cg: MacroBatchOptimizer | None = None
        self._swap_check: int | None = None
        self._saved_first_state: dict[str, Any] | None = None
        self._consecutive_failures = 0
        self._warned_struggling = False
        self._last_check = 0
        self._objective_seed = int(torch.initial_seed()) % (2**31)
        self._reset_accumulators()

    # ------------------------------------------------------------------------------------------------------------
    # Set-up: refuse what the CG phase cannot serve before any training is lost
    # ------------------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        problems = []
        if not pl_module.automatic_optimization:
            problems.append(
                "the LightningModule uses manual optimization (as several optimizers require); the CG phase replaces "
                "a single optimizer stepped by Lightning's automatic optimization"
            )
        reason = unsupported_strategy(trainer.strategy)
        if reason is not None:
            problems.append(f"the strategy is not supported: {reason}; use a single device or strategy='ddp'")
        if uses_grad_scaler(trainer):
            problems.append(
                "precision='16-mixed' scales the loss with a GradScaler, which refuses the closures a line search "
                "needs; use precision='bf16-mixed' or '32-true'"
            )
        if any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks):
            problems.append(
                "a GradientAccumulationScheduler would re-enable gradient accumulation in the CG phase; use a fixed "
                "`accumulate_grad_batches` (the callback sets it to 1 at the swap)"
            )
        for name, value in self._swap_epochs.items():
            if isinstance(value, float):
                if trainer.max_epochs is None or trainer.max_epochs < 1:
                    problems.append(f"`{name}={value}` is a fraction of max_epochs, but the Trainer has no max_epochs")
                else:
                    setattr(self.detector, name, round(value * trainer.max_epochs))
        if problems:
            raise MisconfigurationException(
                "ConvexitySwapCallback cannot run this training: " + "; ".join(problems) + "."
            )
        if self.cg_phase == MINI_BATCH:
            rank_zero_warn(
                "ConvexitySwapCallback(cg_phase='minibatch'): conjugate gradient on a different mini-batch per "
                "iteration is numerically unsound unless one batch is the whole training set (measured on MNIST it "
                "raised the training loss from 1.4e-3 to 0.32). Use cg_phase='full' (the default) or a macro-batch.",
                category=UserWarning,
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1 or not any(group["params"] for group in optimizers[0].param_groups):
            raise MisconfigurationException(
                "ConvexitySwapCallback needs exactly one optimizer with parameters from `configure_optimizers`; the "
                "swap replaces that optimizer by conjugate gradient on the same parameters."
            )
        if self.phase == "cg":
            # Resuming after the swap: install CG now, before Lightning restores the optimizer states.
            self._install_cg(trainer, pl_module, resumed=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cg_phase == FULL_BATCH and not math.isfinite(trainer.num_training_batches):
            raise MisconfigurationException(
                "ConvexitySwapCallback(cg_phase='full') needs a training set of known length to form one CG iteration "
                "per epoch; this train dataloader has no length. Pass cg_phase=K for macro-batches of K batches."
            )
        monitoring.add_custom_scalars_layout(trainer)
        if self.phase == "first" and self.swap_reason is None and self.detector.fixed_swap_epoch == 0:
            # fixed_swap_epoch=0: conjugate gradient from the first step (the paper's "CG only" schedule).
            decision = SwapDecision(True, "the fixed swap epoch 0 asks for conjugate gradient from the start", 0, 0, 0)
            self._on_swap_point(trainer, pl_module, decision, epochs_done=0, at_epoch_end=True)

    # ------------------------------------------------------------------------------------------------------------
    # Monitor
    # ------------------------------------------------------------------------------------------------------------

    def _reset_accumulators(self) -> None:
        self._loss_sum: Tensor | None = None
        self._loss_batches = 0
        self._norm_sum: Tensor | None = None
        self._norm_steps = 0
        self._cg_points: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._cg is not None:
            self._cg.discard()  # a macro-batch left over by an epoch that ended early

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.phase == "cg" and self._cg is not None:
            self._cg.begin_batch(batch, batch_idx, last_in_epoch=batch_idx + 1 >= trainer.num_training_batches)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self.phase == "cg":
            return  # the CG phase reports the gradient norm of its whole macro-batch instead
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        # Global L2 norm, kept on the device: no synchronisation until the next check.
        device = grads[0].device
        norms = torch.stack([n.to(device=device, dtype=torch.float32) for n in torch._foreach_norm(grads)])
        norm = torch.linalg.vector_norm(norms)
        self._norm_sum = norm if self._norm_sum is None else self._norm_sum + norm
        self._norm_steps += 1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        world_size = trainer.world_size
        if self.phase == "cg" and self._cg is not None:
            self.compute += world_size * (self._cg.forward_samples + 2 * self._cg.backward_samples)
            self._cg.forward_samples = self._cg.backward_samples = 0
            if self._cg.stepped:
                self._after_cg_step(trainer)
        else:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, Tensor):
                # Lightning divides the loss by accumulate_grad_batches; undo it to get the batch loss.
                loss = loss.detach().float() * trainer.accumulate_grad_batches
                self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
                self._loss_batches += 1
                self.compute += world_size * 3 * extract_batch_size(batch)
        step = trainer.global_step
        if self.check_every_n_steps is not None and step % self.check_every_n_steps == 0 and step != self._last_check:
            # global_step only moves when the optimizer steps: under accumulation several batches share a step.
            self._last_check = step
            self._check(trainer, pl_module, epochs_done=trainer.current_epoch, at_epoch_end=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_every_n_steps is None:
            self._check(trainer, pl_module, epochs_done=trainer.current_epoch + 1, at_epoch_end=True)

    # ------------------------------------------------------------------------------------------------------------
    # Decide, agree, act
    # ------------------------------------------------------------------------------------------------------------

    def _check_means(self, trainer: pl.Trainer) -> tuple[float, float] | None:
        """Mean loss and gradient norm since the last check, identical on every rank; ``None`` if nothing ran."""
        if self.phase == "cg":
            if not self._cg_points:
                return None
            losses, norms = zip(*self._cg_points)
            return sum(losses) / len(losses), sum(norms) / len(norms)
        if self._loss_sum is None or self._norm_sum is None:
            return None
        local = torch.stack([self._loss_sum / self._loss_batches, self._norm_sum / self._norm_steps])
        reduced = trainer.strategy.reduce(local, reduce_op="mean")
        loss, norm = (float(v) for v in reduced.tolist())  # the one host synchronisation per check
        return loss, norm

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epochs_done: int, at_epoch_end: bool) -> None:
        means = self._check_means(trainer)
        self._reset_accumulators()
        if means is None:
            return
        loss, grad_norm = means
        step = trainer.global_step
        decision: SwapDecision | None = None
        if self.phase == "first":
            decision = self.detector.update(loss, grad_norm, epoch=epochs_done, step=step)
            # Every rank fed the detector the same reduced numbers; rank 0's answer settles any doubt.
            swap = bool(trainer.strategy.broadcast(decision.swap, src=0))
        else:
            swap = False
        record = {
            "epoch": epochs_done,
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "gn_max": self.detector.peak,
            "threshold": self.detector.factor * self.detector.peak,
            "phase": self.phase,
            "compute": self.compute,
        }
        self.history.append(record)
        monitoring.log_scalars(
            trainer,
            {
                f"{monitoring.PREFIX}/loss": loss,
                f"{monitoring.PREFIX}/grad_norm": grad_norm,
                f"{monitoring.PREFIX}/gn_max": record["gn_max"],
                f"{monitoring.PREFIX}/threshold": record["threshold"],
                f"{monitoring.PREFIX}/phase": monitoring.PHASE_VALUES[self.phase],
                f"{monitoring.PREFIX}/compute": self.compute,
            },
            step,
        )
        if swap and decision is not None and self.swap_reason is None:
            self._on_swap_point(trainer, pl_module, decision, epochs_done, at_epoch_end)
        elif self.phase == "cg":
            self._check_loss_window(trainer)

    def _on_swap_point(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        decision: SwapDecision,
        epochs_done: int,
        at_epoch_end: bool,
    ) -> None:
        self.swap_epoch = epochs_done if at_epoch_end else trainer.current_epoch
        self.swap_step = trainer.global_step
        self.swap_reason = decision.reason
        # Also as callback metrics: with strategy="ddp_spawn" only those travel back to the launching process.
        for name, value in (("swap_epoch", self.swap_epoch), ("swap_step", self.swap_step)):
            trainer.callback_metrics[f"{monitoring.PREFIX}/{name}"] = torch.tensor(float(value))
        self._swap_check = len(self.history) - 1 if self.history else None
        first_name = type(trainer.optimizers[0]).__name__
        if self.detect_only:
            message = (
                f"ConvexitySwapCallback (detect only): the swap point is at epoch {self.swap_epoch}, step "
                f"{self.swap_step}: {decision.reason}. Training continues with {first_name}."
            )
        else:
            self._install_cg(trainer, pl_module, resumed=False)
            message = (
                f"ConvexitySwapCallback: swapped {first_name} -> conjugate gradient at epoch {self.swap_epoch}, step "
                f"{self.swap_step}: {decision.reason}."
            )
        rank_zero_info(message)
        swap_scalars = {
            f"{monitoring.PREFIX}/swap_epoch": self.swap_epoch,
            f"{monitoring.PREFIX}/swap_step": self.swap_step,
        }
        monitoring.log_scalars(trainer, swap_scalars, trainer.global_step)
        monitoring.log_text(trainer, f"{monitoring.PREFIX}/swap", message, trainer.global_step)
        self._log_figure(trainer)

    def _build_second_optimizer(self, groups: list[dict[str, Any]]) -> Optimizer:
        if self.optimizer_factory is not None:
            return self.optimizer_factory(groups)
        return ConjugateGradient(groups, **self.optimizer_kwargs)

    def _install_cg(self, trainer: pl.Trainer, pl_module: pl.LightningModule, resumed: bool) -> None:
        first = trainer.optimizers[0]
        groups = parameter_groups(first)
        params = [p for group in groups for p in group["params"]]
        second = self._build_second_optimizer(groups)
        if not resumed and isinstance(second, ConjugateGradient):
            # On resume the preconditioner comes back with the optimizer state instead.
            self._precondition(trainer, first, second)
        batches_per_step = {FULL_BATCH: None, MINI_BATCH: 1}.get(self.cg_phase, self.cg_phase)  # type: ignore[arg-type]
        objective = TrainingObjective(
            trainer,
            pl_module,
            params,
            max_device_bytes=self.max_cached_bytes,
            seed=self._objective_seed,
        )
        self._cg = MacroBatchOptimizer(
            second, objective, batches_per_step=batches_per_step, raise_on_non_finite=not self.fallback
        )
        if self.fallback:
            self._first_optimizer = first
            self._first_schedulers = list(trainer.strategy.lr_scheduler_configs)
            if resumed and self._saved_first_state is not None:
                first.load_state_dict(self._saved_first_state["optimizer"])
                for config, state in zip(self._first_schedulers, self._saved_first_state["schedulers"]):
                    config.scheduler.load_state_dict(state)
        self._saved_first_state = None
        trainer.strategy.optimizers = [self._cg]
        trainer.strategy.lr_scheduler_configs = self._cg_schedulers()
        self._first_settings = {
            "gradient_clip_val": trainer.gradient_clip_val,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
        }
        if trainer.gradient_clip_val:
            rank_zero_warn(
                f"ConvexitySwapCallback: gradient clipping (gradient_clip_val={trainer.gradient_clip_val}) is turned "
                "off for the CG phase: clipping would corrupt the line search's gradients."
            )
            trainer.gradient_clip_val = None
        if trainer.accumulate_grad_batches != 1:
            rank_zero_warn(
                f"ConvexitySwapCallback: accumulate_grad_batches={trainer.accumulate_grad_batches} is set to 1 for "
                "the CG phase, which forms its own exact macro-batch gradient."
            )
            trainer.accumulate_grad_batches = 1
        self.phase = "cg"
        if not resumed and self.cg_phase == MINI_BATCH and trainer.num_training_batches > 1:
            rank_zero_warn(
                f"ConvexitySwapCallback: the CG phase steps on single mini-batches of a training set of "
                f"{trainer.num_training_batches} batches; expect the training loss to rise. Use cg_phase='full'.",
                category=UserWarning,
            )

    def _precondition(self, trainer: pl.Trainer, first: Optimizer, second: ConjugateGradient) -> None:
        if self.preconditioner == NO_PRECONDITIONER:
            return
        if callable(self.preconditioner):
            diagonal = list(self.preconditioner(first))
        else:
            diagonal = second_moment_preconditioner(first)
            if diagonal is None:
                rank_zero_warn(
                    f"ConvexitySwapCallback: {type(first).__name__} has no second moments to precondition the CG "
                    "phase with (it keeps none, or has not stepped yet); it runs plain conjugate gradient "
                    "(preconditioner='none' silences this)."
                )
                return
        # Rank 0's diagonal for every rank: the same geometry keeps the replicas identical.
        broadcast_(diagonal)
        second.set_preconditioner(diagonal)

    def _cg_schedulers(self) -> list[LRSchedulerConfig]:
        if self.scheduler_factory is None or self._cg is None:
            return []
        return scheduler_configs(self.scheduler_factory(self._cg))

    # ------------------------------------------------------------------------------------------------------------
    # The CG phase: diagnostics and the fallback
    # ------------------------------------------------------------------------------------------------------------

    def _after_cg_step(self, trainer: pl.Trainer) -> None:
        assert self._cg is not None
        cg = self._cg
        if cg.non_finite_error is not None:
            self._fall_back(trainer, f"the loss or gradient was not finite at the CG step: {cg.non_finite_error}")
            return
        diagnostics = cg.diagnostics
        if diagnostics is None:
            return
        self._cg_points.append((diagnostics.loss, diagnostics.grad_norm))
        totals = getattr(cg.optimizer, "totals", {})
        monitoring.log_scalars(
            trainer,
            {
                f"{monitoring.PREFIX}/cg/loss": diagnostics.loss,
                f"{monitoring.PREFIX}/cg/grad_norm": diagnostics.grad_norm,
                f"{monitoring.PREFIX}/cg/step_size": diagnostics.step_size,
                f"{monitoring.PREFIX}/cg/beta": diagnostics.beta,
                f"{monitoring.PREFIX}/cg/gradient_evaluations": float(diagnostics.gradient_evaluations),
                f"{monitoring.PREFIX}/cg/value_evaluations": float(diagnostics.value_evaluations),
                f"{monitoring.PREFIX}/cg/restarts": float(totals.get("restarts", 0)),
                f"{monitoring.PREFIX}/cg/line_search_failures": float(totals.get("line_search_failures", 0)),
                f"{monitoring.PREFIX}/compute": self.compute,
            },
            trainer.global_step,
        )
        self._consecutive_failures = self._consecutive_failures + 1 if diagnostics.failed else 0
        if self._consecutive_failures >= self.fallback_after_failures:
            self._fall_back(trainer, f"{self._consecutive_failures} consecutive line searches found no decrease")

    def _check_loss_window(self, trainer: pl.Trainer) -> None:
        window = self.fallback_loss_window
        cg_losses = [r["loss"] for r in self.history if r["phase"] == "cg"]
        if window is None or len(cg_losses) <= window:
            return
        earlier = cg_losses[-1 - window]
        if cg_losses[-1] > earlier + self.fallback_loss_rtol * abs(earlier):
            self._fall_back(
                trainer,
                f"the training loss rose over {window} CG checks ({earlier:.4g} -> {cg_losses[-1]:.4g})",
            )

    def _fall_back(self, trainer: pl.Trainer, reason: str) -> None:
        if not self.fallback:
            if not self._warned_struggling:
                rank_zero_warn(f"ConvexitySwapCallback: the CG phase is struggling ({reason}); fallback is disabled.")
                self._warned_struggling = True
            return
        assert self._cg is not None and self._first_optimizer is not None
        self._cg.discard()
        trainer.strategy.optimizers = [self._first_optimizer]
        trainer.strategy.lr_scheduler_configs = self._first_schedulers
        trainer.gradient_clip_val = self._first_settings.get("gradient_clip_val")
        trainer.accumulate_grad_batches = self._first_settings.get("accumulate_grad_batches", 1)
        self._cg = None
        self.phase = "fallback"
        self.fallback_reason = reason
        message = (
            f"ConvexitySwapCallback: falling back to {type(self._first_optimizer).__name__} at epoch "
            f"{trainer.current_epoch}, step {trainer.global_step}: {reason}."
        )
        rank_zero_warn(message)
        monitoring.log_text(trainer, f"{monitoring.PREFIX}/fallback", message, trainer.global_step)

    # ------------------------------------------------------------------------------------------------------------
    # End of training, figures
    # ------------------------------------------------------------------------------------------------------------

    def _peak_index(self) -> int | None:
        first = [(r["grad_norm"], i) for i, r in enumerate(self.history) if r["phase"] == "first"]
        return max(first)[1] if first else None

    def _log_figure(self, trainer: pl.Trainer, save_dir: str | None = None) -> None:
        if not self.log_figures or trainer.global_rank != 0 or not self.history:
            return
        figure = monitoring.norm_vs_loss_figure(self.history, self._swap_check, self._peak_index())
        if figure is None:
            return
        monitoring.log_figure(trainer, f"{monitoring.PREFIX}/norm_vs_loss", figure, trainer.global_step)
        if save_dir is not None:
            monitoring.save_figure(figure, Path(save_dir) / "norm_vs_loss.png")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._cg is not None:
            self._cg.discard()
        trainer.callback_metrics[f"{monitoring.PREFIX}/phase"] = torch.tensor(monitoring.PHASE_VALUES[self.phase])
        # `log_dir` is a collective (a broadcast): every rank must ask for it.
        log_dir = trainer.log_dir if trainer.loggers else None
        self._log_figure(trainer, log_dir)
        if log_dir is not None:
            monitoring.write_history_csv(self.history, Path(log_dir) / "twophase_history.csv")
        if self.swap_reason is None:
            rank_zero_info(
                f"ConvexitySwapCallback: no swap point was found in {trainer.current_epoch} epochs "
                f"(peak gradient norm {self.detector.peak:.4g})."
            )

    # ------------------------------------------------------------------------------------------------------------
    # State across resume
    # ------------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        first_state = None
        if self.phase == "cg" and self._first_optimizer is not None:
            # Kept for the fallback, so that it resumes the first phase exactly where it stopped.
            first_state = {
                "optimizer": self._first_optimizer.state_dict(),
                "schedulers": [config.scheduler.state_dict() for config in self._first_schedulers],
            }
        return {
            "phase": self.phase,
            "swap_epoch": self.swap_epoch,
            "swap_step": self.swap_step,
            "swap_reason": self.swap_reason,
            "swap_check": self._swap_check,
            "fallback_reason": self.fallback_reason,
            "detector": self.detector.state_dict(),
            "history": [dict(record) for record in self.history],
            "compute": self.compute,
            "consecutive_failures": self._consecutive_failures,
            "first_optimizer_state": first_state,
            "first_settings": dict(self._first_settings),
            "objective_seed": self._objective_seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = state_dict["phase"]
        self.swap_epoch = state_dict["swap_epoch"]
        self.swap_step = state_dict["swap_step"]
        self.swap_reason = state_dict["swap_reason"]
        self._swap_check = state_dict["swap_check"]
        self.fallback_reason = state_dict["fallback_reason"]
        self.detector.load_state_dict(state_dict["detector"])
        self.history = [dict(record) for record in state_dict["history"]]
        self.compute = state_dict["compute"]
        self._consecutive_failures = state_dict["consecutive_failures"]
        self._saved_first_state = state_dict["first_optimizer_state"]
        self._first_settings = dict(state_dict["first_settings"])
        self._objective_seed = state_dict["objective_seed"]


def _epoch_setting(name: str, value: float | None) -> int | float | None:
    """An epoch count (a whole number >= 0) or a fraction of ``max_epochs`` (in (0, 1)); config files may turn
    counts into floats, so 30.0 means 30 epochs."""
    if value is None:
        return None
    if 0 < value < 1:
        return float(value)
    if value >= 0 and float(value).is_integer():
        return int(value)
    raise ValueError(
        f"ConvexitySwapCallback: `{name}` must be an epoch count >= 0 or a fraction of max_epochs in (0, 1), "
        f"got {value!r}."
    )


def parameter_groups(optimizer: Optimizer) -> list[dict[str, Any]]:
    """The parameter groups of ``optimizer`` without their options (what a second-phase optimizer is built from)."""
    return [{"params": list(group["params"])} for group in optimizer.param_groups]
