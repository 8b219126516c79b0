"""A diagonal preconditioner for the CG phase, built from what the first phase learned about gradient scales.

Adam estimates, per weight, the second moment ``v`` of the gradient. At the swap ``P = 1 / (sqrt(v_hat) + eps)``, with
``v_hat`` bias-corrected, is a diagonal approximation of the inverse curvature scale that plain CG ignores. It stays
fixed during the CG phase (conjugacy needs a fixed geometry) and is normalised to mean 1, so that step lengths keep
their scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_twophase.optim.conjugate_gradient import ConjugateGradient
from lightning_twophase.optim.distributed import broadcast_

__all__ = ["NO_PRECONDITIONER", "SECOND_MOMENTS", "apply_preconditioner", "second_moment_preconditioner"]

#: ``preconditioner`` values: none, or the first phase's second moments (Adam's ``exp_avg_sq``).
NO_PRECONDITIONER = "none"
SECOND_MOMENTS = "second_moments"


def second_moment_preconditioner(optimizer: Optimizer) -> list[Tensor] | None:
    """``P = 1 / (sqrt(v_hat) + eps)`` per parameter, normalised to mean 1, from an Adam-like optimizer's state.

    Works for optimizers that keep ``exp_avg_sq`` and ``step`` per parameter and ``betas`` and ``eps`` per group
    (``Adam``, ``AdamW``, ``NAdam``, ``RAdam``...). Parameters without state (never updated) get the mean of the others.

    Args:
        optimizer: the first-phase optimizer, after training.

    Returns:
        One tensor per parameter, in the order of the parameter groups, or ``None`` if the optimizer keeps no second
        moments (SGD, say) or has not stepped yet.

    """
    diagonals: list[Tensor | None] = []
    for group in optimizer.param_groups:
        betas, eps = group.get("betas"), group.get("eps")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if betas is None or eps is None or "exp_avg_sq" not in state or "step" not in state:
                diagonals.append(None)
                continue
            step = float(state["step"])
            v_hat = state["exp_avg_sq"].detach().to(torch.float64) / (1.0 - betas[1] ** step)
            diagonals.append(1.0 / (v_hat.sqrt() + eps))
    known = [d for d in diagonals if d is not None]
    if not known:
        return None
    total = sum(float(d.sum()) for d in known)
    count = sum(d.numel() for d in known)
    mean = total / count
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [
        (torch.ones_like(p, dtype=torch.float64) if d is None else d / mean).to(dtype=p.dtype)
        for p, d in zip(params, diagonals)
    ]


def apply_preconditioner(
    choice: str | Callable[[Optimizer], Sequence[Tensor]],
    first: Optimizer,
    second: Optimizer,
    warn: Callable[[str], None],
) -> None:
    """Give ``second`` (a :class:`~lightning_twophase.ConjugateGradient`) the preconditioner ``choice`` asks for.

    ``choice`` is ``"none"``, ``"second_moments"`` (from ``first``'s state; plain CG and a warning if it keeps
    none) or a callable returning one positive tensor per parameter from ``first``. Rank 0's diagonal goes to every
    rank: the same geometry keeps the replicas identical.
    """
    if choice == NO_PRECONDITIONER or not isinstance(second, ConjugateGradient):
        return
    if callable(choice):
        diagonal = list(choice(first))
    else:
        found = second_moment_preconditioner(first)
        if found is None:
            warn(
                f"ConvexitySwapCallback: {type(first).__name__} has no second moments to precondition the CG phase "
                "with (it keeps none, or has not stepped yet); it runs plain conjugate gradient "
                "(preconditioner='none' silences this)."
            )
            return
        diagonal = found
    broadcast_(diagonal)
    second.set_preconditioner(diagonal)
