"""Small deterministic LightningModules and data for the callback tests (importable by spawned DDP ranks)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def blobs(samples: int = 240, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    """A classification problem a small MLP can fit: labels from a random linear map of Gaussian inputs."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    labels = (inputs @ torch.randn(features, classes, generator=generator)).argmax(dim=1)
    return TensorDataset(inputs, labels)


class TinyClassifier(pl.LightningModule):
    """An MLP classifier with Adam (optionally with a StepLR scheduler), logging its loss every epoch."""

    def __init__(
        self,
        features: int = 8,
        classes: int = 3,
        hidden: int = 16,
        lr: float = 0.01,
        batch_size: int = 32,
        samples: int = 240,
        with_scheduler: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))
        self.lr = lr
        self.batch_size = batch_size
        self.samples = samples
        self.with_scheduler = with_scheduler
        self.features, self.classes = features, classes
        self.logged_batches = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self(inputs), labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self(inputs), labels))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.with_scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(blobs(self.samples, self.features, self.classes), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(blobs(60, self.features, self.classes, seed=1), batch_size=60)


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Quiet, CPU-only Trainer settings for tests."""
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 4,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    kwargs.update(overrides)
    return kwargs


class PeakingClassifier(TinyClassifier):
    """Deeper, with small initial weights: its gradient norm rises for a few epochs, peaks and falls (the paper's
    non-convex-then-convex picture), so the detector has a real peak to find."""

    def __init__(self, init_scale: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(
            nn.Linear(self.features, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, self.classes)
        )
        with torch.no_grad():
            for parameter in self.net.parameters():
                parameter.mul_(init_scale)
