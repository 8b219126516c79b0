"""The LightningModule of the examples: an image classifier trained with Adam on the papers' loss."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from example_modules.vit import build_model

LOSSES = ("mse", "cross_entropy")


class ImageClassifier(pl.LightningModule):
    """Classify images with one of the papers' models (see :data:`example_modules.vit.MODEL_NAMES`).

    ``training_step`` has no side effects other than ``self.log`` and the update of the training accuracy, so that
    the conjugate-gradient phase can re-evaluate it at line-search trial points.

    Args:
        model: model name, one of ``vit-mlp``, ``vit-nomlp``, ``vit-nomlp-wkewq``, ``vit-nomlp-wkewq-wvwo``,
            ``vgg5``.
        num_classes: number of classes.
        image_size: side of the square input images.
        in_channels: number of input channels.
        loss: ``"mse"``, the papers' loss: the mean squared error between the softmax of the logits and the one-hot
            targets, averaged over all elements; or ``"cross_entropy"``.
        lr: Adam's learning rate.
        patch_size: ViT patch size; ``None`` for the default of the image size.
        width: embedding width of a ViT, or the first convolution's channels of ``vgg5``; ``None`` keeps the
            model's default.
        depth: number of ViT encoder blocks; ``None`` keeps the default.
        heads: number of ViT attention heads; ``None`` keeps the default.
        similarity: ViT similarity (``"asymmetric"``, ``"symmetric"``, ``"collapsed"``, ``"collapsed-symmetric"``);
            ``None`` keeps the preset's.

    """

    def __init__(
        self,
        model: str = "vit-nomlp",
        num_classes: int = 10,
        image_size: int = 28,
        in_channels: int = 1,
        loss: str = "mse",
        lr: float = 1e-3,
        patch_size: int | None = None,
        width: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        similarity: str | None = None,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"Unknown loss {loss!r}; choose one of {LOSSES}.")
        self.save_hyperparameters()
        overrides: dict[str, Any] = {
            key: value
            for key, value in {
                "patch_size": patch_size,
                "width": width,
                "depth": depth,
                "heads": heads,
                "similarity": similarity,
            }.items()
            if value is not None
        }
        self.model = build_model(
            model, image_size=image_size, in_channels=in_channels, num_classes=num_classes, **overrides
        )
        # Micro averaging: the fraction of correctly classified samples (torchmetrics' default is macro).
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        # Top-5 only where it says something beyond top-1 (CIFAR-100).
        self.top5 = num_classes > 10
        if self.top5:
            self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            self.test_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        """Logits of shape ``(batch, num_classes)``."""
        return self.model(images)

    def compute_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The configured loss, averaged over the batch (and over the classes for ``"mse"``).

        Args:
            logits: model outputs of shape ``(batch, num_classes)``.
            labels: class indices of shape ``(batch,)``.

        """
        if self.hparams.loss == "mse":
            # In float32 even under mixed precision: the squared errors of probabilities are small numbers.
            probabilities = logits.float().softmax(dim=-1)
            targets = F.one_hot(labels, num_classes=self.hparams.num_classes).to(probabilities.dtype)
            return F.mse_loss(probabilities, targets)
        return F.cross_entropy(logits.float(), labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The training loss of one batch; logs ``train_loss`` and ``train_acc`` per epoch."""
        images, labels = batch
        logits = self(images)
        loss = self.compute_loss(logits, labels)
        self.train_acc.update(logits.detach(), labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        """Log the loss and accuracies of an evaluation batch under ``{stage}_loss``, ``{stage}_acc`` etc."""
        images, labels = batch
        logits = self(images)
        loss = self.compute_loss(logits, labels)
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=True)
        accuracy: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        accuracy.update(logits, labels)
        self.log(f"{stage}_acc", accuracy, prog_bar=True)
        if self.top5:
            top5: MulticlassAccuracy = getattr(self, f"{stage}_acc_top5")
            top5.update(logits, labels)
            self.log(f"{stage}_acc_top5", top5)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Log ``val_loss``, ``val_acc`` (and ``val_acc_top5`` for more than ten classes) per epoch."""
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Log ``test_loss``, ``test_acc`` (and ``test_acc_top5`` for more than ten classes) per epoch."""
        return self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with the configured learning rate; no scheduler."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
