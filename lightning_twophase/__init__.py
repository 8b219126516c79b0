"""Convexity-dependent two-phase training for PyTorch Lightning: Adam first, conjugate gradient after the swap."""

from lightning_twophase.callback import ConvexitySwapCallback
from lightning_twophase.decision import Decision, Reason
from lightning_twophase.detection import GradientNormPeakDetector, PlateauDetector, SwapDetector
from lightning_twophase.fallback import FallbackPolicy
from lightning_twophase.objective import is_trial_evaluation
from lightning_twophase.optim import LBFGS, ConjugateGradient, NonFiniteObjectiveError, StepDiagnostics
from lightning_twophase.phases import Phase

__all__ = [
    "LBFGS",
    "ConjugateGradient",
    "ConvexitySwapCallback",
    "Decision",
    "FallbackPolicy",
    "GradientNormPeakDetector",
    "NonFiniteObjectiveError",
    "Phase",
    "PlateauDetector",
    "Reason",
    "StepDiagnostics",
    "SwapDetector",
    "is_trial_evaluation",
]
__version__ = "0.4.0"
