"""What the callback accepts: its arguments, checked when it is made, and the Trainer settings it refuses before any
training, each refusal naming the problem and the fix."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer

from lightning_twophase._lightning import scheduler_configs
from lightning_twophase.detection import GradientNormPeakDetector, ProbeDetector, SwapDetector
from lightning_twophase.objective import TRIAL_BATCHING
from lightning_twophase.optim import ConjugateGradient
from lightning_twophase.phases import PreconditionerFactory
from lightning_twophase.preconditioning import NO_PRECONDITIONER, SECOND_MOMENTS

__all__ = [
    "DEFAULT_CG_OPTIONS",
    "DETECTION_DEFAULTS",
    "DETECTORS",
    "FULL_BATCH",
    "MINI_BATCH",
    "PAPER_OPTIONS",
    "SWAP_BOUNDS",
    "build_detector",
    "check_arguments",
    "check_fallback_arguments",
    "detection_settings",
    "epoch_setting",
    "has_fraction",
    "length_problems",
    "optimizer_problems",
    "refuse",
    "resolve_fractions",
    "restore_detector",
    "warn_single_batches",
]

#: ``cg_phase`` values: the whole training set per CG iteration, or one mini-batch per iteration.
FULL_BATCH = "full"
MINI_BATCH = "minibatch"

#: ConjugateGradient options used unless ``optimizer_kwargs`` overrides them: chosen on real MNIST
#: (``benchmarks/fullbatch_vs_minibatch.py``), where Hager-Zhang reached a lower loss than Polak-Ribiere+, and the
#: value-only interpolation search at a 10 % tolerance reached the loss of Brent's at that tolerance for fewer
#: evaluations (``benchmarks/phase_cost.py``).
DEFAULT_CG_OPTIONS: dict[str, Any] = {
    "beta": "hager_zhang",
    "line_search": "interpolation",
    "line_search_tolerance": 0.1,
}

#: ``detector`` names: the default, measured rule, and the paper's Algorithm 1.
DETECTORS = ("probe", "paper")

#: Options of the paper's rule (:class:`GradientNormPeakDetector`) and their defaults: only with ``detector="paper"``.
PAPER_OPTIONS: dict[str, Any] = {"factor": 0.9, "smoothing": 0.0, "patience": 1, "require_rise": True}

#: Options that bound the swap whatever the rule, with their defaults.
SWAP_BOUNDS: dict[str, Any] = {"min_epochs": 0, "min_steps": 0, "fixed_swap_epoch": None, "max_swap_epoch": None}

#: Every detection argument of the callback.
DETECTION_DEFAULTS: dict[str, Any] = {**PAPER_OPTIONS, **SWAP_BOUNDS}


def check_arguments(
    detection: dict[str, Any],
    detector: str | SwapDetector,
    check_every_n_steps: int | None,
    cg_phase: str | int,
    preconditioner: str | PreconditionerFactory,
) -> None:
    given = [name for name, value in detection.items() if value is not None]
    if isinstance(detector, str):
        if detector not in DETECTORS:
            raise ValueError(
                f"ConvexitySwapCallback: `detector` must be one of {DETECTORS} or a detector instance, "
                f"got {detector!r}."
            )
        paper_options = [name for name in given if name in PAPER_OPTIONS]
        if detector != "paper" and paper_options:
            raise ValueError(
                f"ConvexitySwapCallback: {', '.join(paper_options)} configure the paper's rule; pass "
                "detector='paper' with them (the default, detector='probe', does not use them)."
            )
    elif given:
        raise ValueError(
            f"ConvexitySwapCallback: pass the detection arguments ({', '.join(given)}) or `detector`, not both: "
            "a detector instance is used as it is. Set them on the detector instead."
        )
    if not isinstance(detector, str) and not isinstance(detector, SwapDetector):
        raise TypeError(
            f"ConvexitySwapCallback: `detector` must have the methods update(loss, grad_norm, *, epoch, step), "
            f"state_dict() and load_state_dict(state) (see SwapDetector); got {type(detector).__name__}."
        )
    if check_every_n_steps is not None and check_every_n_steps < 1:
        raise ValueError(f"ConvexitySwapCallback: `check_every_n_steps` must be >= 1, got {check_every_n_steps}.")
    is_count = isinstance(cg_phase, int) and not isinstance(cg_phase, bool) and cg_phase >= 1
    if not (cg_phase in (FULL_BATCH, MINI_BATCH) or is_count):
        raise ValueError(
            f"ConvexitySwapCallback: `cg_phase` must be 'full', 'minibatch' or a number of batches >= 1, "
            f"got {cg_phase!r}."
        )
    if not (callable(preconditioner) or preconditioner in (SECOND_MOMENTS, NO_PRECONDITIONER)):
        raise ValueError(
            f"ConvexitySwapCallback: `preconditioner` must be '{SECOND_MOMENTS}', '{NO_PRECONDITIONER}' or a "
            f"callable, got {preconditioner!r}."
        )


def check_second_phase_arguments(
    optimizer_kwargs: dict[str, Any] | None, optimizer_factory: Any, max_cached_bytes: int, trial_batching: str
) -> None:
    """The CG options, checked by building a ConjugateGradient with them now rather than at the swap."""
    if optimizer_kwargs is not None and optimizer_factory is not None:
        raise ValueError("ConvexitySwapCallback: pass `optimizer_kwargs` or `optimizer_factory`, not both.")
    if trial_batching not in TRIAL_BATCHING:
        raise ValueError(
            f"ConvexitySwapCallback: `trial_batching` must be one of {TRIAL_BATCHING}, got {trial_batching!r}."
        )
    if not (isinstance(max_cached_bytes, int) and not isinstance(max_cached_bytes, bool) and max_cached_bytes >= 0):
        raise ValueError(
            f"ConvexitySwapCallback: `max_cached_bytes` must be a number of bytes >= 0, got {max_cached_bytes!r}."
        )
    if optimizer_kwargs is None:
        return
    try:
        ConjugateGradient([torch.zeros(1, requires_grad=True)], **{**DEFAULT_CG_OPTIONS, **optimizer_kwargs})
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"ConvexitySwapCallback: `optimizer_kwargs` are not options of ConjugateGradient: {error}"
        ) from error


def second_phase_problems(
    first: Optimizer, build_optimizer: Callable[[list[dict[str, Any]]], Optimizer], scheduler_factory: Any
) -> list[str]:
    """Build the second-phase optimizer and its scheduler on the first optimizer's parameter groups once, before
    training, so that a factory that cannot serve them fails now and not at the swap."""
    groups = [{"params": list(group["params"])} for group in first.param_groups]
    try:
        optimizer = build_optimizer(groups)
    except Exception as error:
        return [
            f"`optimizer_factory` cannot build the second-phase optimizer on {len(groups)} parameter group(s): {error}"
        ]
    if scheduler_factory is not None:
        try:
            scheduler_configs(scheduler_factory(optimizer))
        except Exception as error:
            return [f"`scheduler_factory` cannot give the CG phase a scheduler: {error}"]
    return []


def swap_epoch_problems(fixed_swap_epoch: int | None, fraction: float | None, max_epochs: int | None) -> list[str]:
    """A fixed swap epoch that leaves no epoch to one of the phases (the swap would never come, or come first)."""
    if fixed_swap_epoch is None or max_epochs is None or max_epochs < 1:
        return []
    given = f"fixed_swap_epoch={fraction if fraction is not None else fixed_swap_epoch}"
    if fixed_swap_epoch >= max_epochs:
        return [
            f"`{given}` is not below max_epochs={max_epochs}: the swap would never happen. Pass a smaller epoch or a "
            "fraction of max_epochs"
        ]
    if fraction is not None and fixed_swap_epoch == 0:
        return [
            f"`{given}` of max_epochs={max_epochs} rounds to 0 epochs of the first optimizer; pass "
            "fixed_swap_epoch=0 if conjugate gradient from the start is meant, or a larger fraction"
        ]
    return []


def check_fallback_arguments(
    after_failures: int, loss_window: int | None, loss_rtol: float, progress_window: int | None
) -> None:
    if after_failures < 1:
        raise ValueError("ConvexitySwapCallback: `fallback_after_failures` must be at least 1.")
    if loss_window is not None and loss_window < 1:
        raise ValueError("ConvexitySwapCallback: `fallback_loss_window` must be at least 1 or None.")
    if not (math.isfinite(loss_rtol) and loss_rtol >= 0):
        raise ValueError(f"ConvexitySwapCallback: `fallback_loss_rtol` must be a finite number >= 0, got {loss_rtol}.")
    if progress_window is not None and progress_window < 2:
        raise ValueError("ConvexitySwapCallback: `fallback_progress_window` must be at least 2 or None.")


def resolve_fractions(detection: dict[str, Any], max_epochs: int | None) -> list[str]:
    """Turn the epoch options given as fractions of ``max_epochs`` into epochs; the problems if that cannot be done,
    or if the fixed swap epoch leaves no epoch to one of the phases."""
    given_fixed = detection["fixed_swap_epoch"]
    problems = []
    for name in ("fixed_swap_epoch", "max_swap_epoch"):
        value = detection[name]
        if isinstance(value, float):
            if max_epochs is None or max_epochs < 1:
                problems.append(f"`{name}={value}` is a fraction of max_epochs, but the Trainer has no max_epochs")
            else:
                detection[name] = round(value * max_epochs)
    fraction = given_fixed if isinstance(given_fixed, float) else None
    return problems or swap_epoch_problems(detection["fixed_swap_epoch"], fraction, max_epochs)


def has_fraction(detection: dict[str, Any]) -> bool:
    return any(isinstance(detection[name], float) for name in ("fixed_swap_epoch", "max_swap_epoch"))


def epoch_setting(name: str, value: float | None) -> int | float | None:
    """An epoch count (a whole number >= 0) or a fraction of ``max_epochs`` (in (0, 1)); config files may turn
    counts into floats, so 30.0 means 30 epochs."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"ConvexitySwapCallback: `{name}` must be a number (an epoch count >= 0 or a fraction of max_epochs in "
            f"(0, 1)), got {value!r} of type {type(value).__name__}."
        )
    if 0 < value < 1:
        return float(value)
    if value >= 0 and float(value).is_integer():
        return int(value)
    raise ValueError(
        f"ConvexitySwapCallback: `{name}` must be an epoch count >= 0 or a fraction of max_epochs in (0, 1), "
        f"got {value!r}."
    )


def detection_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The detection arguments that were given (not ``None``) over their defaults, epoch options checked."""
    detection = {**DETECTION_DEFAULTS, **{name: value for name, value in given.items() if value is not None}}
    for name in ("fixed_swap_epoch", "max_swap_epoch"):
        detection[name] = epoch_setting(name, detection[name])
    return detection


def build_detector(name: str, detection: dict[str, Any]) -> SwapDetector:
    """The built-in detector ``name`` with the callback's detection arguments (fractions already resolved)."""
    bounds = {option: detection[option] for option in SWAP_BOUNDS}
    if name == "paper":
        return GradientNormPeakDetector(**{option: detection[option] for option in PAPER_OPTIONS}, **bounds)
    return ProbeDetector(**bounds)


def restore_detector(detector: SwapDetector | None, state: dict[str, Any] | None, saved_type: str | None) -> None:
    """Load a checkpoint's detector state into ``detector``; a checkpoint of another detector is not loaded (said)."""
    if detector is None or state is None:
        return
    if saved_type is None and "peak" in state:
        saved_type = "GradientNormPeakDetector"  # a checkpoint of version 0.1, whose default it was
    if saved_type is not None and saved_type != type(detector).__name__:
        rank_zero_warn(
            f"ConvexitySwapCallback: the checkpoint's swap detector was a {saved_type}, this run's is a "
            f"{type(detector).__name__}: it starts afresh from this point."
        )
        return
    detector.load_state_dict(state)


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


def length_problems(cg_phase: str | int, num_training_batches: float) -> list[str]:
    if cg_phase == FULL_BATCH and not math.isfinite(num_training_batches):
        return [
            "cg_phase='full' needs a training set of known length to form one CG iteration per epoch; this train "
            "dataloader has no length. Pass cg_phase=K for macro-batches of K batches"
        ]
    return []


def warn_single_batches() -> None:
    rank_zero_warn(
        "ConvexitySwapCallback(cg_phase='minibatch'): conjugate gradient on a different mini-batch per "
        "iteration is numerically unsound unless one batch is the whole training set (measured on MNIST it "
        "raised the training loss from 1.4e-3 to 0.32). Use cg_phase='full' (the default) or a macro-batch.",
        category=UserWarning,
    )
