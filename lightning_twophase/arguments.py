"""Argument checks: every constructor of the package validates its arguments once, when it is made, with these.

Each check names the owner and the argument, says what was given and what is expected, and refuses what Python would
otherwise take silently: ``nan`` (every comparison with it is false), a float where a count is meant (``2.5``
iterations), a ``bool`` where a number is meant (``True`` is 1), a string where a flag is meant (``"no"`` is true),
a class where an instance is meant. Any real number type is taken (``numpy.float32(0.5)``, ``Fraction(1, 2)``) and
converted to a Python ``int`` or ``float``, so that checkpoints hold plain numbers. No Lightning in here.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

__all__ = ["check_count", "check_epoch", "check_flag", "check_instance", "check_number", "epochs_of"]


def check_flag(owner: str, name: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: `{name}` must be True or False, got {value!r} of type {type(value).__name__}.")
    return value


def check_count(owner: str, name: str, value: Any, minimum: int = 0, optional: bool = False) -> int | None:
    """``value`` must be a whole number (an ``int``, or a float with an integral value, as config files write them)
    of at least ``minimum``; ``None`` too if ``optional``."""
    if value is None and optional:
        return None
    given = f"got {value!r} of type {type(value).__name__}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{owner}: `{name}` must be a whole number{' or None' if optional else ''}, {given}.")
    if not isinstance(value, Integral) and not (math.isfinite(float(value)) and float(value).is_integer()):
        raise ValueError(f"{owner}: `{name}` must be a whole number{' or None' if optional else ''}, {given}.")
    if value < minimum:
        raise ValueError(f"{owner}: `{name}` must be at least {minimum}, got {value!r}.")
    return int(value)


def check_number(
    owner: str,
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    strict: bool = False,
    optional: bool = False,
) -> float | None:
    """``value`` must be a finite real number within ``[minimum, maximum]`` (an open interval with ``strict``)."""
    if value is None and optional:
        return None
    given = f"got {value!r} of type {type(value).__name__}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{owner}: `{name}` must be a number{' or None' if optional else ''}, {given}.")
    value = float(value)  # numpy scalars, fractions: a Python float from here on
    if not math.isfinite(value):
        raise ValueError(f"{owner}: `{name}` must be a finite number, {given}.")
    low = minimum is None or (value > minimum if strict else value >= minimum)
    high = maximum is None or (value < maximum if strict else value <= maximum)
    if not (low and high):
        left, right = ("(", ")") if strict else ("[", "]")
        interval = f"{left}{'-inf' if minimum is None else minimum}, {'inf' if maximum is None else maximum}{right}"
        raise ValueError(f"{owner}: `{name}` must lie in {interval}, got {value!r}.")
    return value


def check_epoch(owner: str, name: str, value: Any, optional: bool = True) -> int | float | None:
    """An epoch count (a whole number >= 0) or a fraction of ``max_epochs`` (a float in (0, 1)); config files may
    write counts as floats, so ``30.0`` means 30 epochs."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{owner}: `{name}` must be an epoch count >= 0 or a fraction of max_epochs in (0, 1), got {value!r} of "
            f"type {type(value).__name__}."
        )
    # numpy scalars and fractions become a Python float (or int); a fraction stays a fraction, whatever its type.
    number = value if isinstance(value, Integral) else float(value)
    if isinstance(number, float) and 0 < number < 1:
        return number
    if not (math.isfinite(number) and float(number).is_integer()) or number < 0:
        raise ValueError(
            f"{owner}: `{name}` must be an epoch count >= 0 or a fraction of max_epochs in (0, 1), got {value!r}."
        )
    return int(number)


def epochs_of(fraction: float, epochs: int) -> int:
    """``fraction`` of a training of ``epochs`` epochs, in whole epochs (halves round up: 0.5 of 5 is 3)."""
    return math.floor(fraction * epochs + 0.5)


def check_instance(owner: str, name: str, value: Any, expected: type, hint: str = "") -> Any:
    """``value`` must be an instance of ``expected``; a class (``PlateauDetector`` instead of ``PlateauDetector()``) is
    named as such."""
    if isinstance(value, type):
        raise TypeError(
            f"{owner}: `{name}` must be an instance, got the class {value.__name__}: pass {value.__name__}(...)."
            f"{' ' + hint if hint else ''}"
        )
    if not isinstance(value, expected):
        raise TypeError(
            f"{owner}: `{name}` must be a {expected.__name__}, got {type(value).__name__}.{' ' + hint if hint else ''}"
        )
    return value
