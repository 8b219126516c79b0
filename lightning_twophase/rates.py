"""How fast the training loss falls per unit of compute: what the swap rule and the progress guard compare.

A rate is the decrease of the logarithm of the loss per unit of compute (the callback's unit: samples passed forward
plus twice the samples passed backward). On the log scale a rate does not depend on the loss's scale, and per unit of
compute it does not depend on how the work is split into epochs: a first-phase epoch and a CG iteration of a
different cost compare fairly. No Lightning in here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["log_loss_rate", "trailing_rate"]


def log_loss_rate(start_loss: float, end_loss: float, compute: float) -> float:
    """``(ln start_loss - ln end_loss) / compute``; ``nan`` where the losses are not positive and finite or nothing
    was computed."""
    if not (compute > 0 and 0 < start_loss < math.inf and 0 < end_loss < math.inf):
        return math.nan
    return (math.log(start_loss) - math.log(end_loss)) / compute


def trailing_rate(points: Sequence[tuple[float, float]], window: int) -> float:
    """The rate over the last ``window`` of the ``(loss, compute)`` points, measured on the running minimum of the loss:
    the decrease of its logarithm from the window's first point to its last, per unit of compute.

    Progress counts only where the loss reached a new low. Mini-batch training near its noise floor goes up and down
    from epoch to epoch, and now and then jumps up and falls back: neither the noise, nor a jump, nor the recovery
    from one is progress, and the running minimum sees none of them. ``nan`` with fewer than three usable points.
    """
    usable = [(loss, compute) for loss, compute in points if 0 < loss < math.inf and math.isfinite(compute)]
    if len(usable) < 3:
        return math.nan
    lowest, running = math.inf, []
    for loss, compute in usable:
        lowest = min(lowest, loss)
        running.append((lowest, compute))
    (start, start_compute), (end, end_compute) = running[-min(window, len(running))], running[-1]
    return log_loss_rate(start, end, end_compute - start_compute)
