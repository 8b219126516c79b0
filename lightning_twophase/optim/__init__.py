"""Optimizers for the second (convex) phase."""

from lightning_twophase.optim.conjugate_gradient import (
    BETA_FORMULAS,
    LINE_SEARCHES,
    ConjugateGradient,
    NonFiniteObjectiveError,
    StepDiagnostics,
)

__all__ = ["BETA_FORMULAS", "LINE_SEARCHES", "ConjugateGradient", "NonFiniteObjectiveError", "StepDiagnostics"]
