"""Convexity-dependent two-phase training for PyTorch Lightning: Adam first, conjugate gradient after the swap."""

from lightning_twophase.callback import ConvexitySwapCallback
from lightning_twophase.detection import GradientNormPeakDetector, SwapDecision
from lightning_twophase.macro_batch import MacroBatchOptimizer
from lightning_twophase.optim import ConjugateGradient, NonFiniteObjectiveError, StepDiagnostics

__all__ = [
    "ConjugateGradient",
    "ConvexitySwapCallback",
    "GradientNormPeakDetector",
    "MacroBatchOptimizer",
    "NonFiniteObjectiveError",
    "StepDiagnostics",
    "SwapDecision",
]
__version__ = "0.1.0"
