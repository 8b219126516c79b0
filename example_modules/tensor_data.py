"""A data module for data sets that fit in two tensors, and what the non-image examples share with the benchmark.

The examples outside image classification (:mod:`example_modules.pinn`, :mod:`example_modules.regression`,
:mod:`example_modules.augmented`) follow one small protocol, so that ``benchmarks/practice.py`` can train them in
Lightning and in a plain full-batch torch loop alike:

* the LightningModule has ``batch_loss(batch) -> Tensor`` (what ``training_step`` returns, without logging),
  ``metric(batch) -> float`` (the validation metric on a batch) and the class attributes ``metric_name`` and
  ``higher_is_better``;
* the data module has ``train_data`` and ``val_data`` (each a tuple of two tensors, the whole split) after ``setup``,
  and ``training_set()``: the whole training set as one batch for one epoch of full-batch training.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from example_modules.data import DeviceTensorLoader

__all__ = ["TensorPairDataModule"]

Pair = tuple[Tensor, Tensor]


class TensorPairDataModule(pl.LightningDataModule):
    """Training and validation splits held as two tensors each, batched from memory.

    Subclasses implement :meth:`make_splits`. The training batches are shuffled by a generator of the module's own,
    seeded with ``seed`` and saved in checkpoints, so two runs from the same seed see the same batches in the same
    order whatever else draws random numbers.

    Args:
        batch_size: samples per training batch; ``None`` for the whole training set in one batch.
        shuffle: shuffle the training samples every epoch.
        seed: seed of the shuffling.

    """

    def __init__(self, batch_size: int | None = None, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive or None (the whole training set), got {batch_size}.")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.train_data: Pair | None = None
        self.val_data: Pair | None = None

    def make_splits(self) -> tuple[Pair, Pair]:
        """The training and the validation split, each as ``(inputs, targets)``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Make the splits once (later calls keep them)."""
        if self.train_data is None:
            self.train_data, self.val_data = self.make_splits()

    def _split(self, data: Pair | None) -> Pair:
        if data is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for data.")
        return data

    def training_set(self) -> Pair:
        """The whole training set as one batch (the same tensors every epoch)."""
        return self._split(self.train_data)

    def train_dataloader(self) -> DeviceTensorLoader:
        """Training batches of ``batch_size`` (shuffled unless ``shuffle=False``; the last partial batch kept)."""
        data = self._split(self.train_data)
        size = self.batch_size or len(data[1])
        return DeviceTensorLoader(*data, batch_size=size, shuffle=self.shuffle, generator=self.shuffle_generator)

    def val_dataloader(self) -> DeviceTensorLoader:
        """The validation split in one batch, in order."""
        data = self._split(self.val_data)
        return DeviceTensorLoader(*data, batch_size=len(data[1]), shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        """The state of the shuffle generator (saved in checkpoints)."""
        return {"shuffle_generator": self.shuffle_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the shuffle generator's state from a checkpoint."""
        self.shuffle_generator.set_state(state_dict["shuffle_generator"])
