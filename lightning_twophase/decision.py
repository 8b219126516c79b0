"""The one answer every rule gives: act or not, a reason code, and the reason in words (no Lightning in here).

A swap detector answers whether to swap now; the fallback policy answers whether to hand training back to the first
optimizer. Both answer with a :class:`Decision`, whose :class:`Reason` a program can test and whose message a person
can read (as Lightning's ``EarlyStopping`` pairs ``EarlyStoppingReason`` with its message).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from numbers import Real
from typing import Any

from lightning_twophase import tags

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
    #: No swap: the rule or the bound asked for one, but the training ends before one complete second-phase
    #: iteration could follow it (a training of one epoch, say); the first optimizer trains to the end.
    TRAINING_ENDS = "training_ends"
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
        scalars: numbers to log with the check, by tag (see :mod:`lightning_twophase.tags`): real numbers (``nan``
            and ``inf`` included; numpy scalars are turned into Python floats) named by strings, none of them a tag
            the callback logs itself (:data:`~lightning_twophase.tags.RESERVED`, such as ``twophase/loss``) or a
            column every check has (``epoch``, ``step``, ``loss``, ``grad_norm``, ``phase``, ``compute``).

    Raises:
        TypeError, ValueError: when made, for an ``act`` that is not a ``bool``, a ``reason`` that is not a
            :class:`Reason`, a ``message`` that is not a string, or ``scalars`` as above that are not.

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
        if not isinstance(self.message, str):
            raise TypeError(
                f"Decision: `message` must be a string (the reason in words), got {self.message!r} of type "
                f"{type(self.message).__name__}."
            )
        # Plain floats: they are logged, kept in `history` and in checkpoints that Lightning loads with weights_only.
        object.__setattr__(self, "scalars", _checked_scalars(self.scalars))


def _checked_scalars(scalars: Any) -> dict[str, float]:
    if not isinstance(scalars, Mapping):
        raise TypeError(
            f"Decision: `scalars` must be a mapping of tag to number, such as {{'twophase/my_measure': 0.5}}, got "
            f"{scalars!r} of type {type(scalars).__name__}."
        )
    checked = {}
    for name, value in scalars.items():
        if not isinstance(name, str):
            raise TypeError(f"Decision: the names in `scalars` must be strings (tags), got {name!r}.")
        if name in tags.RESERVED or tags.column(name) in tags.RESERVED_COLUMNS:
            raise ValueError(
                f"Decision: `scalars` may not use the name {name!r}: the callback logs that tag (or keeps that column "
                f"of every check) itself, and yours would overwrite it. Give your measure a name of its own, such as "
                f"'{tags.PREFIX}/my_measure'."
            )
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(
                f"Decision: `scalars[{name!r}]` must be a real number, got {value!r} of type {type(value).__name__}; "
                "log one number per tag."
            )
        checked[name] = float(value)
    return checked
