"""LightningDataModules for MNIST, Fashion-MNIST, CIFAR-10/100 and scikit-learn's digits, optionally on the device.

Every data module loads its data set once into memory as normalised float tensors (``(N, C, H, W)`` images,
``int64`` labels): pixel values scaled to ``[0, 1]`` then normalised with the data set's channel means and standard
deviations. Batches are ``(images, labels)`` tuples. The official test split serves as the validation set (and as the
test set), as in the papers. Two ways to batch:

- ``on_device=False``: a standard :class:`~torch.utils.data.DataLoader` over a ``TensorDataset`` (under DDP
  Lightning replaces its sampler with a ``DistributedSampler``, which shuffles with Lightning's own seed).
- ``on_device=True``: :class:`DeviceTensorLoader`, which keeps the whole data set on the training device and slices
  batches out of it with index permutations; for MNIST-sized data on a GPU this removes the input pipeline from the
  step time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets
from torchvision.datasets import VisionDataset

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DeviceTensorLoader",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "TorchvisionDataModule",
]


class DeviceTensorLoader:
    """Batches sliced from tensors that live on one device, shuffled from a seeded generator.

    Iterating yields ``(images[idx], labels[idx])`` for consecutive chunks ``idx`` of this rank's share of an index
    order; the last partial batch is kept. With ``shuffle=True`` every iteration (epoch) draws a new permutation from a
    seeded generator, so the sequence of epochs is reproducible and, with the same seed on every rank, all ranks agree
    on the permutation. Under DDP the order is padded cyclically to a multiple of ``world_size`` and rank ``r`` takes
    positions ``r, r + world_size, ...``, as ``DistributedSampler`` does: the ranks get disjoint shards of equal size
    and run the same number of steps (the padding repeats ``world_size - 1`` samples at most, as there).

    Lightning accepts it as a train, validation or test dataloader (any iterable with ``__len__``); the batches are
    already on the device, so the transfer to the device is a no-op.

    Args:
        images: all images, ``(N, ...)``.
        labels: all labels, ``(N,)``.
        batch_size: samples per batch.
        shuffle: draw a new permutation every epoch (``False``: the stored order).
        seed: seed of a new permutation generator (when ``generator`` is not given).
        generator: the CPU generator to draw the permutations from; pass one that outlives the loader to continue its
            stream when the loader is re-created (Lightning's ``reload_dataloaders_every_n_epochs``).
        rank: this process's rank.
        world_size: number of processes sharing the data.
        device: where the tensors (and so the batches) live; ``None`` keeps them where they are.

    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} and {len(labels)}.")
        if len(labels) == 0:
            raise ValueError("DeviceTensorLoader needs at least one sample.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}.")
        self.images = images.to(device) if device is not None else images
        self.labels = labels.to(self.images.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    @property
    def num_samples(self) -> int:
        """Samples this rank visits per epoch (padded like ``DistributedSampler`` under DDP)."""
        return math.ceil(len(self.labels) / self.world_size)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_indices(self) -> Tensor:
        """This rank's sample indices for the next epoch, in visiting order (draws a permutation when shuffling)."""
        n = len(self.labels)
        # Drawn on the CPU so the order does not depend on the device.
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:
            order = order.repeat(math.ceil(total / n))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the batches of one epoch."""
        indices = self.epoch_indices().to(self.images.device)
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            yield self.images[batch], self.labels[batch]


def seeded_subset(size: int, count: int | None, seed: int) -> Tensor:
    """Indices of a random subset of ``count`` out of ``size`` samples (all of them, in order, for ``None``).

    Args:
        size: number of samples.
        count: subset size, or ``None`` for every sample.
        seed: seed of the draw; the same seed gives the same subset.

    """
    if count is None:
        return torch.arange(size)
    if not 1 <= count <= size:
        raise ValueError(f"train_subset must lie between 1 and the training set size {size}, got {count}.")
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count]


def normalise(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Per-channel ``(images - mean) / std`` for float images ``(N, C, H, W)`` scaled to ``[0, 1]``."""
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


class ImageDataModule(pl.LightningDataModule):
    """Base of the data modules: subset, normalisation, and batching from memory or from the device.

    Subclasses set the class attributes ``num_classes``, ``image_size``, ``in_channels``, ``mean``, ``std`` (so they
    are known right after construction, before ``setup``) and implement :meth:`load_split`.

    Args:
        data_dir: folder holding (or receiving) the data set in torchvision's layout.
        batch_size: samples per batch (512 in the papers).
        train_subset: train on a random subset of this many training samples, drawn with ``seed``; ``None`` for all.
        seed: seed of the subset and of the shuffling.
        num_workers: DataLoader worker processes (ignored with ``on_device``).
        download: download the data set if it is missing.
        on_device: hold the whole data set on the training device and batch from there (:class:`DeviceTensorLoader`).

    """

    num_classes: int
    image_size: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 512,
        train_subset: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        download: bool = True,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.train_subset = train_subset
        self.seed = seed
        self.num_workers = num_workers
        self.download = download
        self.on_device = on_device
        # One generator for the training shuffles of the module's life: re-created loaders continue its stream, and
        # its state travels with checkpoints (state_dict), so a resumed run does not replay the first epochs' order.
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.train_data: tuple[Tensor, Tensor] | None = None
        self.val_data: tuple[Tensor, Tensor] | None = None
        self._device = torch.device("cpu")
        self._rank = 0
        self._world_size = 1

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """The training (``train=True``) or official test split: float images in ``[0, 1]``, ``(N, C, H, W)``, and
        ``int64`` labels ``(N,)``."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Nothing to do by default (data sets that can be downloaded fetch them here, on one process)."""

    def setup(self, stage: str | None = None) -> None:
        """Load the splits the stage needs and note the device, rank and world size from the trainer."""
        if self.trainer is not None:
            self._device = self.trainer.strategy.root_device
            self._rank = self.trainer.global_rank
            self._world_size = self.trainer.world_size
        if stage in (None, "fit") and self.train_data is None:
            images, labels = self.load_split(train=True)
            subset = seeded_subset(len(labels), self.train_subset, self.seed)
            self.train_data = (normalise(images[subset], self.mean, self.std), labels[subset])
        if self.val_data is None:
            images, labels = self.load_split(train=False)
            self.val_data = (normalise(images, self.mean, self.std), labels)
        if self.on_device:
            # Copied once here, so that every loader built later shares the device tensors.
            if self.train_data is not None:
                self.train_data = (self.train_data[0].to(self._device), self.train_data[1].to(self._device))
            self.val_data = (self.val_data[0].to(self._device), self.val_data[1].to(self._device))

    def _loader(self, data: tuple[Tensor, Tensor] | None, shuffle: bool) -> DataLoader | DeviceTensorLoader:
        if data is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader.")
        if self.on_device:
            return DeviceTensorLoader(
                *data,
                batch_size=self.batch_size,
                shuffle=shuffle,
                generator=self.shuffle_generator,
                rank=self._rank,
                world_size=self._world_size,
                device=self._device,
            )
        return DataLoader(
            TensorDataset(*data),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._device.type == "cuda",
            generator=self.shuffle_generator if shuffle else None,
        )

    def state_dict(self) -> dict[str, Any]:
        """The state of the shuffle generator (saved in checkpoints)."""
        return {"shuffle_generator": self.shuffle_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the shuffle generator's state from a checkpoint."""
        self.shuffle_generator.set_state(state_dict["shuffle_generator"])

    def train_dataloader(self) -> DataLoader | DeviceTensorLoader:
        """Shuffled training batches (the last partial batch kept)."""
        return self._loader(self.train_data, shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceTensorLoader:
        """The official test split, in order."""
        return self._loader(self.val_data, shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceTensorLoader:
        """The official test split, in order (the same data as validation)."""
        return self._loader(self.val_data, shuffle=False)


class TorchvisionDataModule(ImageDataModule):
    """A data set read through a ``torchvision.datasets`` class (``dataset_class``) from ``data_dir``.

    Subclasses set ``dataset_class``, ``dataset_name`` and the attributes of :class:`ImageDataModule`.
    """

    dataset_class: type[VisionDataset]
    dataset_name: str

    def searched_path(self) -> str:
        """The folder torchvision reads the data set's files from."""
        if issubclass(self.dataset_class, datasets.MNIST):
            return os.path.join(self.data_dir, self.dataset_class.__name__, "raw")
        return os.path.join(self.data_dir, self.dataset_class.base_folder)  # type: ignore[attr-defined]

    def _dataset(self, train: bool, download: bool) -> VisionDataset:
        try:
            return self.dataset_class(self.data_dir, train=train, download=download)
        except RuntimeError as err:
            if download:
                raise
            # torchvision's RuntimeError names neither the data set nor the folder it searched.
            raise FileNotFoundError(
                f"{self.dataset_name} was not found (or is incomplete) in {os.path.abspath(self.searched_path())}. "
                "Pass download=True to fetch it, or point data_dir at the folder that already holds it "
                f"(the folder containing {os.path.relpath(self.searched_path(), self.data_dir)})."
            ) from err

    def prepare_data(self) -> None:
        """Download both splits when ``download`` is set (Lightning calls this on one process only)."""
        if self.download:
            for train in (True, False):
                self._dataset(train, download=True)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Read a split with torchvision and convert it to float images in ``[0, 1]`` and ``int64`` labels."""
        dataset = self._dataset(train, download=self.download)
        images = torch.as_tensor(dataset.data)  # type: ignore[attr-defined]
        # MNIST-like sets store (N, H, W) tensors, CIFAR (N, H, W, C) arrays.
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        labels = torch.as_tensor(dataset.targets, dtype=torch.int64)  # type: ignore[attr-defined]
        return images.float().div_(255.0).contiguous(), labels


class MNISTDataModule(TorchvisionDataModule):
    """MNIST: 60000 training and 10000 test images, 1x28x28, 10 classes, read from ``<data_dir>/MNIST/raw``."""

    dataset_class = datasets.MNIST
    dataset_name = "MNIST"
    num_classes = 10
    image_size = 28
    in_channels = 1
    mean = (0.1307,)
    std = (0.3081,)


class FashionMNISTDataModule(TorchvisionDataModule):
    """Fashion-MNIST: 60000 training and 10000 test images, 1x28x28, 10 classes, read from
    ``<data_dir>/FashionMNIST/raw``."""

    dataset_class = datasets.FashionMNIST
    dataset_name = "Fashion-MNIST"
    num_classes = 10
    image_size = 28
    in_channels = 1
    mean = (0.2860,)
    std = (0.3530,)


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10: 50000 training and 10000 test images, 3x32x32, 10 classes, read from
    ``<data_dir>/cifar-10-batches-py``."""

    dataset_class = datasets.CIFAR10
    dataset_name = "CIFAR-10"
    num_classes = 10
    image_size = 32
    in_channels = 3
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(TorchvisionDataModule):
    """CIFAR-100: 50000 training and 10000 test images, 3x32x32, 100 classes, read from
    ``<data_dir>/cifar-100-python``."""

    dataset_class = datasets.CIFAR100
    dataset_name = "CIFAR-100"
    num_classes = 100
    image_size = 32
    in_channels = 3
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)


class DigitsDataModule(ImageDataModule):
    """Scikit-learn's 8x8 digits: 1797 images, 1x8x8, 10 classes; ships with scikit-learn (no download).

    There is no official split: a fixed permutation (seed :attr:`SPLIT_SEED`, independent of ``seed``) puts 1437
    images in the training set and 360 in the validation set. Pixel values 0..16 are scaled to ``[0, 1]``.

    Args:
        batch_size: samples per batch.
        train_subset: train on a random subset of this many of the 1437 training samples; ``None`` for all.
        seed: seed of the subset and of the shuffling.
        num_workers: DataLoader worker processes (ignored with ``on_device``).
        on_device: hold the data set on the training device and batch from there.

    """

    num_classes = 10
    image_size = 8
    in_channels = 1
    mean = (0.3053,)
    std = (0.3760,)
    SPLIT_SEED = 0
    NUM_VAL = 360

    def __init__(
        self,
        batch_size: int = 512,
        train_subset: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        on_device: bool = False,
    ) -> None:
        super().__init__(
            data_dir="",
            batch_size=batch_size,
            train_subset=train_subset,
            seed=seed,
            num_workers=num_workers,
            download=False,
            on_device=on_device,
        )
        # Drop the base class's data_dir and download from the recorded hyperparameters: digits have no files.
        self.save_hyperparameters(ignore=["data_dir", "download"])

    @classmethod
    def split_indices(cls) -> tuple[Tensor, Tensor]:
        """Indices into ``sklearn.datasets.load_digits()`` of the training and the validation samples."""
        order = torch.randperm(1797, generator=torch.Generator().manual_seed(cls.SPLIT_SEED))
        return order[cls.NUM_VAL :], order[: cls.NUM_VAL]

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """The training or validation part of the digits, as float images in ``[0, 1]`` and ``int64`` labels."""
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        indices = self.split_indices()[0 if train else 1]
        return images[indices].contiguous(), labels[indices]
