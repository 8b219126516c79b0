"""A diagonal preconditioner for the CG phase, built from what the first phase learned about gradient scales.

Adam estimates, per weight, the second moment ``v`` of the gradient and steps by ``1 / sqrt(v_hat)``. At the swap
``P = 1 / sqrt(v_hat)`` (bias-corrected) becomes the CG phase's diagonal preconditioner: conjugate gradient then runs in
Adam's geometry, which transformers need (their blocks differ in curvature by orders of magnitude; measured in
``benchmarks/swap_study.py``). It stays fixed during the CG phase (conjugacy needs a fixed geometry). Weights whose
gradient was (nearly) always zero would get enormous steps: ``sqrt(v_hat)`` is floored at :data:`FLOOR` times its
median. ``P`` is scaled to median 1; a constant scale changes nothing but the CG phase's first trial step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_twophase.optim.conjugate_gradient import ConjugateGradient
from lightning_twophase.optim.distributed import broadcast_
from lightning_twophase.optim.lbfgs import LBFGS

__all__ = ["FLOOR", "NO_PRECONDITIONER", "SECOND_MOMENTS", "apply_preconditioner", "second_moment_preconditioner"]

#: ``preconditioner`` values: none, or the first phase's second moments (Adam's ``exp_avg_sq``).
NO_PRECONDITIONER = "none"
SECOND_MOMENTS = "second_moments"


#: The floor of ``sqrt(v_hat)``, relative to its median: no weight's scale exceeds the median's by more than 1 / FLOOR.
FLOOR = 1e-2
#: The median is taken over at most this many entries (every k-th), so that large models need no full copy.
MEDIAN_SAMPLE = 2**20


def second_moment_preconditioner(optimizer: Optimizer) -> list[Tensor] | None:
    """``P = 1 / max(sqrt(v_hat), FLOOR * median)`` per parameter, scaled to median 1, from an Adam-like optimizer.

    Works for optimizers that keep ``exp_avg_sq`` and ``step`` per parameter and ``betas`` per group (``Adam``,
    ``AdamW``, ``NAdam``, ``RAdam``...). Parameters without state (never updated) get 1, the median.

    Args:
        optimizer: the first-phase optimizer, after training.

    Returns:
        One tensor per parameter, in the order of the parameter groups, or ``None`` if the optimizer keeps no second
        moments (SGD, say) or has not stepped yet.

    Raises:
        ValueError: if the second moments are not all finite.

    """
    scales: list[Tensor | None] = []
    for group in optimizer.param_groups:
        betas = group.get("betas")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if betas is None or "exp_avg_sq" not in state or "step" not in state:
                scales.append(None)
                continue
            step = float(state["step"])
            scales.append((state["exp_avg_sq"].detach().to(torch.float64) / (1.0 - betas[1] ** step)).sqrt())
    known = [scale.reshape(-1) for scale in scales if scale is not None]
    if not known:
        return None
    if not all(bool(torch.isfinite(scale).all()) for scale in known):
        raise ValueError(f"{type(optimizer).__name__}'s second moments are not all finite (has it diverged?)")
    stride = max(1, sum(scale.numel() for scale in known) // MEDIAN_SAMPLE)
    median = float(torch.cat([scale[::stride].cpu() for scale in known]).median())
    if not median > 0:  # more than half the weights never had a gradient: floor at the largest scale's share
        median = max(float(scale.max()) for scale in known) or 1.0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [
        (torch.ones_like(p, dtype=torch.float64) if s is None else median / s.clamp_min(FLOOR * median)).to(p.dtype)
        for p, s in zip(params, scales)
    ]


def apply_preconditioner(
    choice: str | Callable[[Optimizer], Sequence[Tensor]],
    first: Optimizer,
    second: Optimizer,
    warn: Callable[[str], None],
) -> None:
    """Give ``second`` (:class:`~lightning_twophase.LBFGS` or :class:`~lightning_twophase.ConjugateGradient`) the
    preconditioner ``choice`` asks for.

    ``choice`` is ``"none"``, ``"second_moments"`` (from ``first``'s state; plain CG and a warning if it keeps
    none) or a callable returning one positive tensor per parameter from ``first``. Rank 0's diagonal goes to every
    rank: the same geometry keeps the replicas identical.
    """
    if choice == NO_PRECONDITIONER or not isinstance(second, (ConjugateGradient, LBFGS)):
        return
    if callable(choice):
        try:
            diagonal = list(choice(first))
            second.set_preconditioner(diagonal)  # checks count, shapes and values; set again below, after broadcast
        except Exception as error:  # hours of training are not lost to it: the CG phase runs plain, and says why
            warn(
                "ConvexitySwapCallback: the `preconditioner` callable gave no usable diagonal "
                f"({type(error).__name__}: {error}); the CG phase runs plain conjugate gradient. It must return one "
                "positive, finite tensor per parameter, shaped like it, from the first optimizer."
            )
            second.set_preconditioner(None)
            return
    else:
        try:
            found = second_moment_preconditioner(first)
        except ValueError as error:
            warn(f"ConvexitySwapCallback: {error}; the CG phase runs plain conjugate gradient.")
            return
        if found is None:
            warn(
                f"ConvexitySwapCallback: {type(first).__name__} has no Adam-style second moments (`exp_avg_sq` with "
                "`betas`) to precondition the CG phase with, or has not stepped yet; it runs plain conjugate gradient "
                "(preconditioner='none' silences this, a callable gives a diagonal of your own)."
            )
            return
        diagonal = found
    broadcast_(diagonal)
    second.set_preconditioner(diagonal)
