"""Example models, a LightningModule and data modules for reproducing Hrycej et al. (KDIR 2025).

- :mod:`example_modules.vit`: the Vision Transformer variants of Bermeitinger et al. (KDIR 2024), the model registry
  (:func:`build_model`, :data:`MODEL_NAMES`) and the closed-form parameter counts.
- :mod:`example_modules.vgg`: the VGG5 baseline.
- :mod:`example_modules.classifier`: :class:`ImageClassifier`, trained with Adam on the papers' MSE loss.
- :mod:`example_modules.data`: data modules for MNIST, Fashion-MNIST, CIFAR-10/100 and scikit-learn's digits.
"""

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
from example_modules.vgg import VGG5
from example_modules.vit import MODEL_NAMES, VIT_PRESETS, VisionTransformer, build_model, expected_parameter_count

__all__ = [
    "MODEL_NAMES",
    "VGG5",
    "VIT_PRESETS",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DeviceTensorLoader",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageClassifier",
    "ImageDataModule",
    "MNISTDataModule",
    "TorchvisionDataModule",
    "VisionTransformer",
    "build_model",
    "expected_parameter_count",
]
