"""Example models, a LightningModule and data modules for reproducing Hrycej et al. (KDIR 2025).

- :mod:`example_modules.vit`: the Vision Transformer variants of Bermeitinger et al. (KDIR 2024), the model registry
  (:func:`build_model`, :data:`MODEL_NAMES`) and the closed-form parameter counts.
- :mod:`example_modules.vgg`: the VGG5 baseline.
- :mod:`example_modules.classifier`: :class:`ImageClassifier`, trained with Adam on the papers' MSE loss.
- :mod:`example_modules.data`: data modules for MNIST, Fashion-MNIST, CIFAR-10/100 and scikit-learn's digits.
- Cases beyond the papers, for ``benchmarks/practice.py``: :mod:`example_modules.pinn` (a physics-informed network for
  the 1D Poisson problem, float64, derivatives in ``training_step``), :mod:`example_modules.regression` (an MLP on
  Friedman #1) and :mod:`example_modules.augmented` (a CNN with dropout on digits augmented anew every epoch); the
  data modules of the first two build on :mod:`example_modules.tensor_data`.
"""

from example_modules.augmented import AugmentedDigitsClassifier, AugmentedDigitsDataModule, RandomShiftDataset
from example_modules.classifier import ImageClassifier
from example_modules.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DeviceTensorLoader,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    MNISTDataModule,
    TorchvisionDataModule,
)
from example_modules.pinn import PoissonCollocationDataModule, PoissonPINN
from example_modules.regression import Friedman1DataModule, MLPRegressor
from example_modules.tensor_data import TensorPairDataModule
from example_modules.vgg import VGG5
from example_modules.vit import MODEL_NAMES, VIT_PRESETS, VisionTransformer, build_model, expected_parameter_count

__all__ = [
    "MODEL_NAMES",
    "VGG5",
    "VIT_PRESETS",
    "AugmentedDigitsClassifier",
    "AugmentedDigitsDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DeviceTensorLoader",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "Friedman1DataModule",
    "ImageClassifier",
    "ImageDataModule",
    "MLPRegressor",
    "MNISTDataModule",
    "PoissonCollocationDataModule",
    "PoissonPINN",
    "RandomShiftDataset",
    "TensorPairDataModule",
    "TorchvisionDataModule",
    "VisionTransformer",
    "build_model",
    "expected_parameter_count",
]
