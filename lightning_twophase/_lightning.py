"""Every place where lightning-twophase relies on Lightning behaviour beyond its documented API, in one module.

``tests/integration/test_lightning_contract.py`` checks each of these against the installed Lightning, so an upgrade
that changes one fails loudly there instead of silently elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from types import MethodType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.core.optimizer import _configure_schedulers_automatic_opt
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "TrainerSettings",
    "backward_sync_blocked",
    "batches_left_in_epoch",
    "global_step_counter",
    "grad_scaler",
    "is_last_batch",
    "logging_suppressed",
    "scheduler_configs",
    "set_callback_metric",
    "set_optimizers",
    "set_scheduler_configs",
    "step_loss",
    "undo_accumulation",
    "unsupported_settings",
    "unsupported_strategy",
]

# Strategies that run the automatic optimization loop with a closure on replicated parameters. Subclasses that step
# the optimizer themselves (DeepSpeed) or compile steps lazily (XLA) are refused by name in `unsupported_strategy`.
_SUPPORTED_STRATEGIES: tuple[type[Strategy], ...] = (SingleDeviceStrategy, DDPStrategy)
_REFUSED_STRATEGY_REASONS = {
    "DeepSpeedStrategy": (
        "DeepSpeed owns the optimizer and steps it without a closure, so it cannot be swapped in place"
    ),
    "XLAStrategy": "XLA compiles steps lazily, and every line-search decision would force a graph execution",
    "SingleDeviceXLAStrategy": (
        "XLA compiles steps lazily, and every line-search decision would force a graph execution"
    ),
    "FSDPStrategy": (
        "FSDP shards the parameters; sharded conjugate gradient is supported by the optimizer (sharded=True) but the "
        "swap is not tested under FSDP"
    ),
    "ModelParallelStrategy": "the parameters are sharded as DTensors, which the swap does not handle",
}


def unsupported_strategy(strategy: Strategy) -> str | None:
    """Why ``strategy`` cannot run the two-phase training, or ``None`` if it can."""
    name = type(strategy).__name__
    for cls in type(strategy).__mro__:
        if cls.__name__ in _REFUSED_STRATEGY_REASONS:
            return f"{name}: {_REFUSED_STRATEGY_REASONS[cls.__name__]}"
    if isinstance(strategy, _SUPPORTED_STRATEGIES):
        return None
    return f"{name} is not one of the supported strategies (single device, DDP and its variants)"


def grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The GradScaler with which the precision plugin scales the loss (``precision="16-mixed"`` on a GPU, or a
    ``MixedPrecision`` plugin given one), or ``None`` if the loss is not scaled (a disabled scaler does not scale)."""
    plugin = trainer.precision_plugin
    scaler = plugin.scaler if isinstance(plugin, MixedPrecision) else None
    return scaler if scaler is not None and scaler.is_enabled() else None


def set_closure_steps(trainer: pl.Trainer, enabled: bool) -> None:
    """Under a GradScaler, make the precision plugin hand the training loop's closure to the optimizer's ``step``
    (``enabled``), or step as Lightning does (not ``enabled``); without a scaler it does the former anyway.

    With a scaler, ``MixedPrecision.optimizer_step`` runs the closure itself, unscales, and calls
    ``scaler.step(optimizer)`` without the closure (torch refuses closures there) and ``scaler.update()``. The CG
    phase needs the closure inside its own step, and unscales and updates the scaler itself (``_scaling.py``). The
    plugin's base-class step is the one it uses without a scaler; shadowing the bound method on the instance (as
    :func:`logging_suppressed` does for ``self.log``) changes nothing else: ``pre_backward`` still scales the loss,
    and the scaler's state is still the plugin's checkpoint state.
    """
    plugin = trainer.precision_plugin
    if enabled and grad_scaler(trainer) is not None:
        plugin.optimizer_step = MethodType(Precision.optimizer_step, plugin)  # type: ignore[method-assign]
    else:
        plugin.__dict__.pop("optimizer_step", None)


@contextmanager
def logging_suppressed(pl_module: pl.LightningModule) -> Iterator[None]:
    """Make ``self.log`` and ``self.log_dict`` no-ops while ``training_step`` runs at line-search trial points.

    Lightning has no public switch for this; shadowing the bound methods on the instance is the least invasive way,
    and also avoids the collectives that ``self.log(..., sync_dist=True)`` would start on only some evaluations.
    """
    saved = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}

    def no_log(*args: Any, **kwargs: Any) -> None:
        return None

    object.__setattr__(pl_module, "log", no_log)
    object.__setattr__(pl_module, "log_dict", no_log)
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                object.__setattr__(pl_module, name, saved[name])
            else:
                object.__delattr__(pl_module, name)


def global_step_counter(trainer: pl.Trainer) -> tuple[Callable[[], int], Callable[[int], None]]:
    """Read and write the ``global_step`` that ``training_step`` reads (``trainer.global_step``, ``self.global_step``).

    Under automatic optimization Lightning keeps it nowhere else than in the training loop's progress tracking: the
    count of completed optimizer steps (``optim_progress.optimizer.step.total.completed``), which it increments after
    each optimizer step. Written while a step runs (the CG phase's line search runs inside the last batch's step), the
    value is read by ``training_step`` until it is written back before the step ends.
    """

    def write(step: int) -> None:
        trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step

    return (lambda: trainer.global_step), write


def scheduler_configs(scheduler: Any) -> list[LRSchedulerConfig]:
    """Turn what a ``configure_optimizers`` could return for a scheduler (a scheduler or a config dict) into configs,
    as Lightning does for ``configure_optimizers``."""
    return _configure_schedulers_automatic_opt([scheduler], None)


def set_optimizers(trainer: pl.Trainer, optimizers: list[Optimizer]) -> None:
    """Make ``optimizers`` the ones the training loop steps.

    Only the strategy's setter re-wraps them in ``LightningOptimizer``; writing into ``trainer.optimizers`` would leave
    the loop stepping the old optimizer through its old wrapper (a silent no-op swap).
    """
    trainer.strategy.optimizers = optimizers


def set_scheduler_configs(trainer: pl.Trainer, configs: list[LRSchedulerConfig]) -> None:
    """Replace the learning-rate schedulers the loop steps and checkpoints (a plain list on the strategy)."""
    trainer.strategy.lr_scheduler_configs = configs


def set_callback_metric(trainer: pl.Trainer, name: str, value: float) -> None:
    """Put a number in ``trainer.callback_metrics``: with ``strategy="ddp_spawn"`` only those travel back to the
    launching process."""
    trainer.callback_metrics[name] = torch.tensor(float(value))


def step_loss(outputs: Any) -> Tensor | None:
    """The loss in ``on_train_batch_end``'s ``outputs``, detached, as Lightning hands it over: divided by
    ``accumulate_grad_batches`` (:func:`undo_accumulation` undoes that, once for a mean of many)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss.detach() if isinstance(loss, Tensor) else None


def undo_accumulation(loss: Tensor, trainer: pl.Trainer) -> Tensor:
    """The batch loss from what :func:`step_loss` returned (or a mean of such values)."""
    return loss * trainer.accumulate_grad_batches


def is_last_batch(trainer: pl.Trainer) -> bool:
    """Whether the batch the training loop is on is the epoch's last.

    Lightning knows it before ``on_train_batch_start`` (its data fetcher looks one batch ahead), also for data of
    unknown length; ``on_train_batch_start`` returning -1 ends the epoch after the hook, which this cannot foresee.
    """
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def batches_left_in_epoch(trainer: pl.Trainer) -> bool:
    """Whether the training loop is within an epoch and more of its batches are to come (asked after a batch).

    Lightning counts the batches fetched in the epoch (``batch_progress.current.ready``, reset when an epoch starts)
    and knows whether the one in hand is the last (see :func:`is_last_batch`).
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.current.ready > 0 and not progress.is_last_batch


def backward_sync_blocked(trainer: pl.Trainer) -> AbstractContextManager[Any]:
    """A context in which the training loop's backward pass leaves the gradients rank-local (DDP's ``no_sync``, as
    Lightning's own gradient accumulation uses it); a null context for strategies that do not synchronise."""
    strategy = trainer.strategy
    if isinstance(strategy, ParallelStrategy):
        return strategy.block_backward_sync()  # type: ignore[return-value]
    return nullcontext()


def unsupported_settings(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
    """What in this Trainer and module the CG phase cannot serve, each with the fix; empty if nothing."""
    problems = []
    if not pl_module.automatic_optimization:
        problems.append(
            "the LightningModule uses manual optimization (as several optimizers require); the CG phase replaces "
            "a single optimizer stepped by Lightning's automatic optimization"
        )
    reason = unsupported_strategy(trainer.strategy)
    if reason is not None:
        problems.append(f"the strategy is not supported: {reason}; use a single device or strategy='ddp'")
    plugin = trainer.precision_plugin
    if isinstance(plugin, HalfPrecision):
        dtype = "bfloat16" if plugin.precision == "bf16-true" else "float16"
        problems.append(
            f"precision={plugin.precision!r} keeps the weights in {dtype}, so the CG phase's gradient sums and "
            f"search direction would be {dtype} too, and its line search would compare losses computed in {dtype} "
            "(a few significant digits) at trial points rounded to the weights' precision; use precision="
            "'bf16-mixed' or '16-mixed' (float32 weights, half-precision compute)"
        )
    if any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks):  # type: ignore[attr-defined]
        problems.append(
            "a GradientAccumulationScheduler would re-enable gradient accumulation in the CG phase; use a fixed "
            "`accumulate_grad_batches` (the callback sets it to 1 at the swap)"
        )
    return problems


@dataclass
class TrainerSettings:
    """The Trainer settings the CG phase changes: ``capture`` them before the swap, ``apply`` them to install a phase.

    The training loop reads them afresh at every step, so setting them between two steps changes how the next one is
    taken: which optimizer and schedulers step, whether gradients are clipped, how many batches are accumulated, and,
    under a GradScaler, whether the optimizer gets the loop's closure. The scaler's state (its scale and growth
    tracker) is captured with the first phase's settings and put back with them.

    Attributes:
        optimizers: the optimizers the loop steps.
        lr_scheduler_configs: the learning-rate schedulers it steps.
        gradient_clip_val: the clipping value.
        accumulate_grad_batches: batches per optimizer step.
        scaler_state: the GradScaler's state to put back (``None``: leave the scaler as it is).
        closure_steps: under a GradScaler, hand the loop's closure to the optimizer (see :func:`set_closure_steps`).

    """

    optimizers: list[Optimizer]
    lr_scheduler_configs: list[LRSchedulerConfig]
    gradient_clip_val: float | int | None
    accumulate_grad_batches: int
    scaler_state: dict[str, Any] | None = None
    closure_steps: bool = False

    @classmethod
    def capture(cls, trainer: pl.Trainer) -> TrainerSettings:
        """The settings the Trainer trains with now."""
        scaler = grad_scaler(trainer)
        return cls(
            list(trainer.optimizers),
            list(trainer.strategy.lr_scheduler_configs),
            trainer.gradient_clip_val,
            trainer.accumulate_grad_batches,
            scaler.state_dict() if scaler is not None else None,
            "optimizer_step" in vars(trainer.precision_plugin),
        )

    def apply(self, trainer: pl.Trainer) -> None:
        """Make the Trainer train with these settings from its next step on."""
        set_optimizers(trainer, self.optimizers)
        set_scheduler_configs(trainer, self.lr_scheduler_configs)
        trainer.gradient_clip_val = self.gradient_clip_val
        trainer.accumulate_grad_batches = self.accumulate_grad_batches
        scaler = grad_scaler(trainer)
        if scaler is not None and self.scaler_state is not None:
            scaler.load_state_dict(self.scaler_state)
        set_closure_steps(trainer, self.closure_steps)
