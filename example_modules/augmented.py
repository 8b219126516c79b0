"""A training objective that changes between epochs: a CNN with dropout on randomly shifted, noisy digits.

Every epoch sees a new random draw of the augmentation (a shift by up to one pixel in each direction and a little
Gaussian noise, drawn in the Dataset's ``__getitem__``), and dropout draws new masks at every step. An optimizer that
treats one epoch's loss as a fixed function (a line search over the epoch's batches) meets a different function in the
next epoch.

The model is :class:`~example_modules.vgg.VGG5` (narrow, ``width=8``) with dropout before its last layer, trained by
:class:`~example_modules.classifier.ImageClassifier` under cross-entropy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from example_modules.classifier import ImageClassifier
from example_modules.data import DigitsDataModule

__all__ = ["AugmentedDigitsClassifier", "AugmentedDigitsDataModule", "RandomShiftDataset"]

Pair = tuple[Tensor, Tensor]


class RandomShiftDataset(Dataset):
    """Images shifted by a random whole number of pixels in ``[-max_shift, max_shift]`` along each axis (the pixels
    shifted in take the value ``background``), plus Gaussian noise of standard deviation ``noise``; a new draw at every
    access, from ``generator``.

    Args:
        images: ``(N, C, H, W)`` images.
        labels: ``(N,)`` labels.
        generator: the source of the random draws (a CPU generator).
        max_shift: the largest shift in pixels.
        noise: standard deviation of the added noise, in the images' units.
        background: the value of the pixels shifted in.

    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator,
        max_shift: int = 1,
        noise: float = 0.0,
        background: float = 0.0,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} and {len(labels)}.")
        if max_shift < 0 or noise < 0:
            raise ValueError(f"max_shift and noise must be >= 0, got {max_shift} and {noise}.")
        self.images, self.labels = images, labels
        self.generator = generator
        self.max_shift, self.noise, self.background = max_shift, noise, background

    def __len__(self) -> int:
        return len(self.labels)

    def augment(self, image: Tensor) -> Tensor:
        """One random draw of the augmentation of a ``(C, H, W)`` image."""
        s = self.max_shift
        if s:
            dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=self.generator))
            height, width = image.shape[-2:]
            padded = F.pad(image, (s, s, s, s), value=self.background)
            image = padded[..., s - dy : s - dy + height, s - dx : s - dx + width]
        if self.noise:
            image = image + self.noise * torch.randn(image.shape, generator=self.generator, dtype=image.dtype)
        return image

    def __getitem__(self, index: int) -> Pair:
        return self.augment(self.images[index]), self.labels[index]


class AugmentedDigitsDataModule(DigitsDataModule):
    """Scikit-learn's digits (the split of :class:`~example_modules.data.DigitsDataModule`) with the training images
    randomly shifted and noised anew every epoch; validation images are left as they are.

    The augmentation draws come from a generator of the module's own (seeded with ``seed``, saved in checkpoints), in
    the main process: two runs from the same seed see the same draws. ``train_data`` holds the unaugmented training
    images (what a model is measured on after training).

    Args:
        batch_size: samples per batch.
        max_shift: the largest shift in pixels along each axis.
        noise: standard deviation of the added noise, in units of the raw pixel range ``[0, 1]``.
        train_subset: train on a random subset of this many training samples; ``None`` for all 1437.
        seed: seed of the subset, the shuffling and the augmentation.

    """

    def __init__(
        self,
        batch_size: int = 64,
        max_shift: int = 1,
        noise: float = 0.05,
        train_subset: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, train_subset=train_subset, seed=seed)
        self.save_hyperparameters(ignore=["data_dir", "download", "num_workers", "on_device"])
        self.max_shift = max_shift
        self.noise = noise
        self.augment_generator = torch.Generator().manual_seed(seed + 1)

    def _augmented(self) -> RandomShiftDataset:
        if self.train_data is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader.")
        images, labels = self.train_data
        # The stored images are normalised: express the blank background and the noise in those units.
        return RandomShiftDataset(
            images,
            labels,
            self.augment_generator,
            max_shift=self.max_shift,
            noise=self.noise / self.std[0],
            background=-self.mean[0] / self.std[0],
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of freshly augmented training images."""
        return DataLoader(self._augmented(), batch_size=self.batch_size, shuffle=True, generator=self.shuffle_generator)

    def training_set(self) -> Pair:
        """The whole training set, freshly augmented, as one batch (one epoch of full-batch training)."""
        dataset = self._augmented()
        images = torch.stack([dataset.augment(image) for image in dataset.images])
        return images, dataset.labels

    def state_dict(self) -> dict[str, Any]:
        """The states of the shuffle and the augmentation generators."""
        return {**super().state_dict(), "augment_generator": self.augment_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both generators."""
        super().load_state_dict(state_dict)
        self.augment_generator.set_state(state_dict["augment_generator"])


class AugmentedDigitsClassifier(ImageClassifier):
    """:class:`~example_modules.classifier.ImageClassifier` with a narrow ``vgg5`` on 1x8x8 digits, cross-entropy,
    and dropout of probability ``dropout`` before the last linear layer.

    Args:
        dropout: the dropout probability.
        width: channels of the first convolution (``vgg5``'s ``width``).
        lr: Adam's learning rate.

    """

    metric_name = "val_acc"
    higher_is_better = True

    def __init__(self, dropout: float = 0.25, width: int = 8, lr: float = 1e-3) -> None:
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
        super().__init__(
            model="vgg5", num_classes=10, image_size=8, in_channels=1, loss="cross_entropy", lr=lr, width=width
        )
        # No parameters in dropout: the initial weights are the plain model's.
        self.model.classifier.insert(len(self.model.classifier) - 1, nn.Dropout(dropout))

    def compute_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The cross-entropy, averaged over the batch.

        Fixed here rather than read from ``hparams.loss``: LightningCLI saves only the arguments it gave this class as
        hyperparameters, not the base class's.
        """
        return F.cross_entropy(logits.float(), labels)

    def batch_loss(self, batch: Pair) -> Tensor:
        """The cross-entropy of a batch ``(images, labels)``, without logging or metrics."""
        images, labels = batch
        return self.compute_loss(self(images), labels)

    @torch.no_grad()
    def metric(self, batch: Pair) -> float:
        """The accuracy on ``batch = (images, labels)``, in eval mode (without dropout) whatever the module's mode."""
        images, labels = batch
        was_training = self.training
        self.eval()
        try:
            return float((self(images).argmax(dim=1) == labels).float().mean())
        finally:
            self.train(was_training)
