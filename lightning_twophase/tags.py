"""Every name the callback logs under, defined once: the scalars, the text events, the figure and the TensorBoard
layout built from them. Renaming a tag here renames it everywhere, the layout included.

No Lightning in here: detectors use these names for the scalars they report.
"""

from __future__ import annotations

__all__ = [
    "CG_BETA",
    "CG_GRADIENT_EVALUATIONS",
    "CG_GRAD_NORM",
    "CG_LINE_SEARCH_FAILURES",
    "CG_LOSS",
    "CG_RESTARTS",
    "CG_STEP_SIZE",
    "CG_VALUE_EVALUATIONS",
    "COMPUTE",
    "CUSTOM_SCALARS_LAYOUT",
    "FALLBACK_TEXT",
    "GN_MAX",
    "GRAD_NORM",
    "IMPROVEMENT",
    "LOSS",
    "NORM_VS_LOSS_FIGURE",
    "PHASE",
    "PHASE_VALUES",
    "PREFIX",
    "RESERVED",
    "RESERVED_COLUMNS",
    "SWAP_EPOCH",
    "SWAP_STEP",
    "SWAP_TEXT",
    "THRESHOLD",
    "column",
]

#: Prefix of every tag.
PREFIX = "twophase"


def _tag(name: str) -> str:
    return f"{PREFIX}/{name}"


def column(tag: str) -> str:
    """The tag without its prefix: the column name in ``history`` and ``twophase_history.csv``."""
    return tag.removeprefix(f"{PREFIX}/")


# Every check (per epoch by default): the means since the previous check.
LOSS = _tag("loss")
GRAD_NORM = _tag("grad_norm")
PHASE = _tag("phase")
COMPUTE = _tag("compute")
# The paper's detector: the running peak of the norm and the threshold below which it swaps.
GN_MAX = _tag("gn_max")
THRESHOLD = _tag("threshold")
# The plateau rule: the relative decrease of the best loss over its window.
IMPROVEMENT = _tag("improvement")
# The swap, once.
SWAP_EPOCH = _tag("swap_epoch")
SWAP_STEP = _tag("swap_step")
# Text events and the figure.
SWAP_TEXT = _tag("swap")
FALLBACK_TEXT = _tag("fallback")
NORM_VS_LOSS_FIGURE = _tag("norm_vs_loss")
# Every CG iteration.
CG_LOSS = _tag("second/loss")
CG_GRAD_NORM = _tag("second/grad_norm")
CG_STEP_SIZE = _tag("second/step_size")
CG_BETA = _tag("second/beta")
CG_GRADIENT_EVALUATIONS = _tag("second/gradient_evaluations")
CG_VALUE_EVALUATIONS = _tag("second/value_evaluations")
CG_RESTARTS = _tag("second/restarts")
CG_LINE_SEARCH_FAILURES = _tag("second/line_search_failures")

#: The scalars the callback logs itself: a rule's :class:`~lightning_twophase.Decision` may not name one of them (its
#: value would overwrite the callback's in the logs).
RESERVED = frozenset(
    {LOSS, GRAD_NORM, PHASE, COMPUTE, SWAP_EPOCH, SWAP_STEP}
    | {CG_LOSS, CG_GRAD_NORM, CG_STEP_SIZE, CG_BETA, CG_GRADIENT_EVALUATIONS, CG_VALUE_EVALUATIONS, CG_RESTARTS}
    | {CG_LINE_SEARCH_FAILURES}
)
#: The columns every check of ``history`` (and ``twophase_history.csv``) has: no rule's scalar may take one over.
RESERVED_COLUMNS = frozenset({"epoch", "step", "loss", "grad_norm", "phase", "compute"})

#: The value of :data:`PHASE` for each phase.
PHASE_VALUES = {"first": 0.0, "second": 1.0, "fallback": 2.0}

#: TensorBoard's Custom Scalars tab.
CUSTOM_SCALARS_LAYOUT = {
    "two-phase training": {
        "gradient norm and loss": ["Multiline", [GRAD_NORM, LOSS]],
        "paper's rule: norm, peak and threshold": ["Multiline", [GRAD_NORM, GN_MAX, THRESHOLD]],
        "plateau rule: improvement of the best loss over its window": ["Multiline", [IMPROVEMENT]],
        "phase (0 first, 1 second, 2 fallback)": ["Multiline", [PHASE]],
        "compute (samples forward + 2 x backward)": ["Multiline", [COMPUTE]],
    },
    "second phase": {
        "step size and beta": ["Multiline", [CG_STEP_SIZE, CG_BETA]],
        "evaluations per iteration": ["Multiline", [CG_GRADIENT_EVALUATIONS, CG_VALUE_EVALUATIONS]],
        "restarts and line-search failures": ["Multiline", [CG_RESTARTS, CG_LINE_SEARCH_FAILURES]],
    },
}
