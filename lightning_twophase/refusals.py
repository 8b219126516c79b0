"""The Trainer settings the callback refuses before any training, each refusal naming the problem and the fix."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer

from lightning_twophase._lightning import scheduler_configs, unsupported_settings
from lightning_twophase.decision import Decision
from lightning_twophase.detection import SwapDetector

__all__ = [
    "DETECT_ONLY_AFTER_SWAP",
    "another_model",
    "detector_problems",
    "length_problems",
    "no_second_phase_iteration",
    "optimizer_problems",
    "refuse",
    "second_phase_problems",
    "training_epochs",
    "unsupported_settings",
    "warn_if_unsound",
]

DETECT_ONLY_AFTER_SWAP = (
    "detect_only=True cannot resume this checkpoint: it was written after the swap, and the optimizer state it holds "
    "is conjugate gradient's. Resume it without detect_only, or resume from a checkpoint written before the swap"
)


def refuse(problems: list[str]) -> None:
    """Raise one ``MisconfigurationException`` that names every problem, if there is any."""
    if problems:
        raise MisconfigurationException("ConvexitySwapCallback cannot run this training: " + "; ".join(problems) + ".")


def optimizer_problems(optimizers: Sequence[Optimizer]) -> list[str]:
    if len(optimizers) != 1 or not any(group["params"] for group in optimizers[0].param_groups):
        return [
            "it needs exactly one optimizer with parameters from `configure_optimizers`; the swap replaces that "
            "optimizer by conjugate gradient on the same parameters"
        ]
    return []


def second_phase_problems(first: Optimizer, config: Any) -> list[str]:
    """Build the second-phase optimizer and its scheduler (a ``CGPhaseConfig``'s) on the first optimizer's parameter
    groups once, before training, so that a factory that cannot serve them fails now and not at the swap."""
    groups = [{"params": list(group["params"])} for group in first.param_groups]
    scheduler_factory = config.scheduler_factory
    try:
        optimizer = config.build_optimizer(groups)
    except Exception as error:
        return [f"the second-phase optimizer cannot be built on {len(groups)} parameter group(s): {error}"]
    if scheduler_factory is not None:
        try:
            scheduler_configs(scheduler_factory(optimizer))
        except Exception as error:
            return [f"`scheduler_factory` cannot give the CG phase a scheduler: {error}"]
    return []


def length_problems(batches_per_iteration: int | None, num_training_batches: float) -> list[str]:
    if batches_per_iteration is None and not math.isfinite(num_training_batches):
        return [
            "one CG iteration per epoch needs a training set of known length; this train dataloader has no length. "
            "Pass batches_per_iteration=K for macro-batches of K batches"
        ]
    return []


def training_epochs(trainer: pl.Trainer) -> int | None:
    """How many epochs this training lasts: ``max_epochs``, or ``max_steps`` in epochs where that is sooner or the
    only bound; ``None`` if neither is known (no bound, or a dataloader of unknown length).

    ``max_steps`` is converted at the first optimizer's steps per epoch. The CG phase steps on every batch (its
    accumulation is its own), so with ``accumulate_grad_batches > 1`` a training bounded by ``max_steps`` ends sooner
    than this after a swap.
    """
    bounds = []
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0:
        bounds.append(max_epochs)
    batches = trainer.num_training_batches
    if trainer.max_steps > 0 and math.isfinite(batches) and batches > 0:
        # Lightning also steps on an epoch's last, incomplete accumulation.
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        bounds.append(math.ceil(trainer.max_steps / steps_per_epoch))
    return min(bounds) if bounds else None


def detector_problems(detector: SwapDetector | None, built_in: tuple[type, ...], epochs: int | None) -> list[str]:
    """A user's detector is tried once, on a copy, with made-up numbers, for a training of ``epochs`` epochs: a wrong
    signature or answer fails now, not after the first epoch (the built-in ones are known to answer)."""
    if detector is None or type(detector) in built_in:
        return []
    name = type(detector).__name__
    try:
        trial = copy.deepcopy(detector)
        trial.setup(epochs)
    except Exception:  # a detector that cannot be copied or set up is checked (and set up) for real
        return []
    try:
        inspect.signature(trial.update).bind(1.0, 1.0, epoch=1, step=1)
    except TypeError as error:
        return [f"the detector {name} cannot be called as update(loss, grad_norm, *, epoch, step): {error}"]
    except ValueError:  # no signature to read: calling it tells
        pass
    try:
        answer = trial.update(1.0, 1.0, epoch=1, step=1)
    except (TypeError, ValueError) as error:
        if str(error).startswith("Decision:"):  # the answer it makes is refused (its scalars, say)
            return [f"the detector {name} answers with a Decision that is refused: {error}"]
        return []  # anything else may depend on real numbers
    except Exception:
        return []
    if not isinstance(answer, Decision):
        return [
            f"the detector {name}.update returned {answer!r} of type {type(answer).__name__}; it must return a "
            "lightning_twophase.Decision"
        ]
    return []


def no_second_phase_iteration(
    trainer: pl.Trainer, batches_per_iteration: int | None, batches_left_in_epoch: float
) -> str | None:
    """Why a swap now would leave no complete second-phase iteration before the training ends (``max_epochs``,
    ``max_steps``); ``None`` if one fits. ``batches_left_in_epoch``: the batches of the current epoch still to come
    (0 at its end, all of them before its first).

    The CG phase steps on every batch. One iteration is a whole epoch (``batches_per_iteration=None``: from an
    epoch's first batch to its last) or a macro-batch of ``batches_per_iteration`` batches (fewer at an epoch's end).
    """
    batches = trainer.num_training_batches
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    epochs_after = max_epochs - trainer.current_epoch - 1 if max_epochs is not None and max_epochs >= 0 else math.inf
    steps_left = max_steps - trainer.global_step if max_steps > 0 else math.inf
    if batches_per_iteration is None:
        # A whole epoch: the rest of this one if none of it has run yet, else the next one.
        fresh = batches_left_in_epoch >= batches
        needed = batches if fresh else batches_left_in_epoch + batches
        if not fresh and epochs_after < 1:
            return (
                f"the training ends with this epoch (max_epochs={max_epochs}): no whole epoch is left for a "
                "conjugate-gradient iteration on the whole training set"
            )
    else:
        needed = min(batches_per_iteration, batches)
        in_epochs = batches_left_in_epoch + (epochs_after * batches if epochs_after > 0 else 0)
        if in_epochs < needed:
            return (
                f"the training ends within {in_epochs:g} batch(es) (max_epochs={max_epochs}), fewer than the "
                f"{needed} of one conjugate-gradient iteration (batches_per_iteration={batches_per_iteration})"
            )
    if steps_left < needed:
        return (
            f"max_steps={max_steps} leaves {steps_left} step(s), fewer than the {needed} batches (one step each) of "
            "one complete conjugate-gradient iteration"
        )
    return None


def another_model(error: Exception) -> str:
    """Why a second fit cannot go on in the CG phase: its state does not fit this fit's model."""
    return (
        f"its last fit ended in the CG phase, whose optimizer state does not fit this fit's model "
        f"({type(error).__name__}: {error}); a callback describes one run: pass a new ConvexitySwapCallback to train "
        "another model"
    )


def warn_if_unsound(batches_per_iteration: int | None) -> None:
    """One mini-batch per CG iteration is allowed, with a loud warning."""
    if batches_per_iteration == 1:
        rank_zero_warn(
            "ConvexitySwapCallback(batches_per_iteration=1): conjugate gradient on a different mini-batch per "
            "iteration is numerically unsound unless one batch is the whole training set (measured on MNIST it raised "
            "the training loss from 1.4e-3 to 0.32). Leave batches_per_iteration=None (the whole training set per "
            "iteration) or use a macro-batch of several batches.",
            category=UserWarning,
        )
