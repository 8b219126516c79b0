"""Convexity-dependent two-phase training for PyTorch Lightning: Adam first, conjugate gradient after the swap."""

from lightning_twophase.callback import ConvexitySwapCallback
from lightning_twophase.detection import (
    GradientNormPeakDetector,
    ProbeDetector,
    ProbeResult,
    SwapDecision,
    SwapDetector,
)
from lightning_twophase.fallback import FallbackDecision, FallbackPolicy
from lightning_twophase.objective import is_trial_evaluation
from lightning_twophase.optim import ConjugateGradient, NonFiniteObjectiveError, StepDiagnostics

__all__ = [
    "ConjugateGradient",
    "ConvexitySwapCallback",
    "FallbackDecision",
    "FallbackPolicy",
    "GradientNormPeakDetector",
    "NonFiniteObjectiveError",
    "ProbeDetector",
    "ProbeResult",
    "StepDiagnostics",
    "SwapDecision",
    "SwapDetector",
    "is_trial_evaluation",
]
__version__ = "0.1.0"
