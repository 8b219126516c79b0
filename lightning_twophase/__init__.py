"""Convexity-dependent two-phase training for PyTorch Lightning: Adam first, conjugate gradient after the swap."""

from lightning_twophase.optim import ConjugateGradient, NonFiniteObjectiveError, StepDiagnostics

__all__ = ["ConjugateGradient", "NonFiniteObjectiveError", "StepDiagnostics"]
__version__ = "0.1.0"
