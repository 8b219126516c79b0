"""Smooth nonlinear regression: an MLP on scikit-learn's Friedman #1 problem, with mini-batch Adam.

Friedman #1 (``sklearn.datasets.make_friedman1``): 10 inputs uniform in :math:`[0, 1]`, of which the first five
matter, :math:`y = 10 \\sin(\\pi x_1 x_2) + 20 (x_3 - 0.5)^2 + 10 x_4 + 5 x_5 + \\text{noise}`. Generated in memory, no
download. Inputs and target are standardised with the training split's mean and standard deviation.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import make_friedman1
from torch import Tensor, nn

from example_modules.tensor_data import Pair, TensorPairDataModule

__all__ = ["Friedman1DataModule", "MLPRegressor"]


class Friedman1DataModule(TensorPairDataModule):
    """Friedman #1: ``num_train`` training and ``num_val`` validation samples, inputs ``(N, 10)``, targets ``(N, 1)``.

    Args:
        num_train: training samples.
        num_val: validation samples.
        noise: standard deviation of the Gaussian noise on the target (before standardisation).
        batch_size: samples per training batch (128: 16 batches per epoch of 2048 samples).
        data_seed: ``random_state`` of ``make_friedman1`` (the same data for every training seed).
        seed: seed of the shuffling.

    """

    def __init__(
        self,
        num_train: int = 2048,
        num_val: int = 512,
        noise: float = 0.0,
        batch_size: int = 128,
        data_seed: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, shuffle=True, seed=seed)
        if num_train < 2 or num_val < 1:
            raise ValueError(f"need num_train >= 2 and num_val >= 1, got {num_train} and {num_val}.")
        if noise < 0:
            raise ValueError(f"noise is a standard deviation and must be >= 0, got {noise}.")
        self.save_hyperparameters()
        self.num_train = num_train
        self.num_val = num_val
        self.noise = noise
        self.data_seed = data_seed

    def make_splits(self) -> tuple[Pair, Pair]:
        """Standardised ``((x_train, y_train), (x_val, y_val))`` in float32."""
        inputs, target = make_friedman1(
            n_samples=self.num_train + self.num_val, n_features=10, noise=self.noise, random_state=self.data_seed
        )
        x = torch.as_tensor(inputs, dtype=torch.float64)
        y = torch.as_tensor(target, dtype=torch.float64).unsqueeze(1)
        train, val = slice(0, self.num_train), slice(self.num_train, None)
        # The training split's statistics for both splits: validation data must not inform the scaling.
        x = (x - x[train].mean(0)) / x[train].std(0)
        y = (y - y[train].mean()) / y[train].std()
        return (x[train].float(), y[train].float()), (x[val].float(), y[val].float())


class MLPRegressor(pl.LightningModule):
    """A tanh MLP ``in_features -> hidden -> ... -> 1`` trained with Adam on the mean squared error.

    The validation metric ``val_mse`` is the mean squared error on the validation split (standardised target: 1.0
    is predicting the mean).

    Args:
        in_features: number of inputs.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        lr: Adam's learning rate.

    """

    metric_name = "val_mse"
    higher_is_better = False

    def __init__(self, in_features: int = 10, hidden: int = 64, depth: int = 2, lr: float = 1e-3) -> None:
        super().__init__()
        if min(in_features, hidden, depth) < 1:
            raise ValueError(
                f"in_features, hidden and depth must be positive, got {in_features}, {hidden} and {depth}."
            )
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Predictions of shape ``(N, 1)``."""
        return self.net(x)

    def batch_loss(self, batch: Pair) -> Tensor:
        """The mean squared error on a batch ``(x, y)``."""
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch: Pair, batch_idx: int) -> Tensor:
        """The mean squared error of a batch; logs ``train_loss`` per epoch."""
        loss = self.batch_loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch[1]))
        return loss

    @torch.no_grad()
    def metric(self, batch: Pair) -> float:
        """The mean squared error on ``batch = (x, y)``."""
        return float(self.batch_loss(batch))

    def validation_step(self, batch: Pair, batch_idx: int) -> None:
        """Log ``val_mse``."""
        self.log(self.metric_name, self.metric(batch), batch_size=len(batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with the configured learning rate."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
