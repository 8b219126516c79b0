"""The one answer every rule gives: act or not, a reason code, and the reason in words (no Lightning in here).

A swap detector answers whether to swap now; the fallback policy answers whether to hand training back to the first
optimizer. Both answer with a :class:`Decision`, whose :class:`Reason` a program can test and whose message a person
can read (as Lightning's ``EarlyStopping`` pairs ``EarlyStoppingReason`` with its message).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Decision", "Reason"]


class Reason(str, Enum):
    """Why a decision was made."""

    #: No change: the rule is still watching (or, in the CG phase, it is making progress).
    WAITING = "waiting"
    #: No change: the check's loss or gradient norm was not finite, which says nothing about the curve.
    NON_FINITE = "non_finite"
    #: No swap before ``min_epochs`` (the detector would have swapped).
    BEFORE_MIN_EPOCHS = "before_min_epochs"
    #: Swap: the epoch bound ``swap_epoch`` was reached.
    SWAP_EPOCH = "swap_epoch"
    #: Swap: the first optimizer's best loss stopped improving (:class:`~lightning_twophase.PlateauDetector`).
    PLATEAU = "plateau"
    #: Swap: the gradient norm fell below a fraction of its peak (the paper's rule).
    NORM_PEAK = "norm_peak"
    #: Swap: a user's detector decided (its message says why).
    RULE = "rule"
    #: Fall back: consecutive line searches found no decrease.
    LINE_SEARCH_FAILURES = "line_search_failures"
    #: Fall back: the training loss rose over a window of CG checks.
    LOSS_ROSE = "loss_rose"
    #: Fall back: the CG phase fell far behind where the first optimizer would be at the same compute.
    BEHIND_FIRST_OPTIMIZER = "behind_first_optimizer"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Decision:
    """A rule's answer for one check.

    Attributes:
        act: whether to act now: swap (a detector), or fall back (the fallback policy).
        reason: why, as a code.
        message: why, in words.
        scalars: numbers to log with the check, by tag (see :mod:`lightning_twophase.tags`).

    """

    act: bool
    reason: Reason
    message: str = ""
    scalars: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A truthy string ("no") must not swap: refuse anything but a bool.
        if not isinstance(self.act, bool):
            raise TypeError(f"Decision: `act` must be a bool, got {self.act!r} of type {type(self.act).__name__}.")
        if not isinstance(self.reason, Reason):
            raise TypeError(f"Decision: `reason` must be a lightning_twophase.Reason, got {self.reason!r}.")
