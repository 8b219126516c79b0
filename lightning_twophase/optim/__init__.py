"""Optimizers for the second (convex) phase."""

from lightning_twophase.optim.conjugate_gradient import (
    BETA_FORMULAS,
    LINE_SEARCHES,
    ConjugateGradient,
    NonFiniteObjectiveError,
    StepDiagnostics,
)
from lightning_twophase.optim.lbfgs import LBFGS

__all__ = ["BETA_FORMULAS", "LBFGS", "LINE_SEARCHES", "ConjugateGradient", "NonFiniteObjectiveError", "StepDiagnostics"]
