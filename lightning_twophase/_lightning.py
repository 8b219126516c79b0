"""Every place where lightning-twophase relies on Lightning behaviour beyond its documented API, in one module.

``tests/test_lightning_contract.py`` checks each of these against the installed Lightning, so an upgrade that changes
one fails loudly there instead of silently elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import _configure_schedulers_automatic_opt
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.types import LRSchedulerConfig

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


def uses_grad_scaler(trainer: pl.Trainer) -> bool:
    """Whether the precision plugin scales the loss (16-mixed on a GPU); torch refuses closures then."""
    plugin = trainer.precision_plugin
    return isinstance(plugin, MixedPrecision) and plugin.scaler is not None


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


def scheduler_configs(scheduler: Any) -> list[LRSchedulerConfig]:
    """Turn what a ``configure_optimizers`` could return for a scheduler (a scheduler or a config dict) into configs,
    as Lightning does for ``configure_optimizers``."""
    return _configure_schedulers_automatic_opt([scheduler], None)
