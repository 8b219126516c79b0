"""Tests of the example data modules on small data sets fabricated in torchvision's on-disk layout (no downloads)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

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
from tests.conftest import run_on_ranks
from tests.examples.conftest import NUM_TEST, NUM_TRAIN, fabricate_mnist

MNIST_LIKE = [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")]


def sample_ids(images: torch.Tensor, mean: float, std: float) -> list[int]:
    """Recover the fabricated indices from normalised images."""
    pixels = torch.round((images[:, 0, 0, :2] * std + mean) * 255).long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def fake_trainer(rank: int = 0, world_size: int = 1) -> SimpleNamespace:
    """What ``setup`` reads from a Trainer: the root device, the global rank and the world size."""
    return SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu")), global_rank=rank, world_size=world_size
    )


@pytest.fixture
def mnist_root(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, fabricate_mnist(tmp_path, "MNIST")


# ---------------------------------------------------------------------------------------------------- attributes


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (MNISTDataModule, (10, 28, 1)),
        (FashionMNISTDataModule, (10, 28, 1)),
        (CIFAR10DataModule, (10, 32, 3)),
        (CIFAR100DataModule, (100, 32, 3)),
        (DigitsDataModule, (10, 8, 1)),
    ],
)
def test_shape_attributes_are_known_before_setup(cls: type[ImageDataModule], expected: tuple, tmp_path: Path) -> None:
    kwargs = {} if cls is DigitsDataModule else {"data_dir": str(tmp_path), "download": False}
    module = cls(**kwargs)
    assert (module.num_classes, module.image_size, module.in_channels) == expected
    assert len(module.mean) == len(module.std) == module.in_channels
    assert module.batch_size == 512
    assert list(tmp_path.iterdir()) == []  # construction touches nothing


# ---------------------------------------------------------------------------------------------------- MNIST-like


@pytest.mark.parametrize(("cls", "folder"), MNIST_LIKE)
def test_mnist_like_reads_fabricated_raw_files(cls: type[TorchvisionDataModule], folder: str, tmp_path: Path) -> None:
    splits = fabricate_mnist(tmp_path, folder)
    module = cls(data_dir=str(tmp_path), download=False, batch_size=16)
    module.prepare_data()
    module.setup("fit")
    train_images, train_labels = module.train_data
    val_images, val_labels = module.val_data
    assert train_images.shape == (NUM_TRAIN, 1, 28, 28) and train_images.dtype == torch.float32
    assert val_images.shape == (NUM_TEST, 1, 28, 28)
    assert train_labels.dtype == torch.int64
    # The official test split is the validation set, normalised with the data set's constants.
    raw_images, raw_labels = splits["t10k"]
    expected = (raw_images.float().unsqueeze(1) / 255 - module.mean[0]) / module.std[0]
    torch.testing.assert_close(val_images, expected)
    assert torch.equal(val_labels, raw_labels.long())

    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (16, 1, 28, 28) and labels.shape == (16,)
    batches = list(module.val_dataloader())
    assert isinstance(batches[0], (tuple, list)) and len(batches[0]) == 2
    assert sum(len(labels) for _, labels in batches) == NUM_TEST  # last partial batch kept
    assert torch.equal(torch.cat([images for images, _ in module.test_dataloader()]), val_images)


def test_mnist_and_fashion_use_their_own_folders_and_constants(tmp_path: Path) -> None:
    fabricate_mnist(tmp_path, "MNIST")
    mnist = MNISTDataModule(data_dir=str(tmp_path), download=False)
    fashion = FashionMNISTDataModule(data_dir=str(tmp_path), download=False)
    assert mnist.mean != fashion.mean
    mnist.setup("validate")
    with pytest.raises(FileNotFoundError, match="FashionMNIST"):
        fashion.setup("validate")


def test_train_subset_is_seeded_and_deterministic(mnist_root: tuple[Path, dict]) -> None:
    root, _ = mnist_root

    def subset(count: int | None, seed: int) -> list[int]:
        module = MNISTDataModule(data_dir=str(root), download=False, train_subset=count, seed=seed)
        module.setup("fit")
        assert len(module.val_data[1]) == NUM_TEST  # the subset only thins the training set
        return sample_ids(module.train_data[0], module.mean[0], module.std[0])

    full = subset(None, 0)
    assert full == list(range(NUM_TRAIN))
    first = subset(20, seed=1)
    assert len(first) == len(set(first)) == 20
    assert set(first) <= set(full)
    assert subset(20, seed=1) == first
    assert set(subset(20, seed=2)) != set(first)
    with pytest.raises(ValueError, match="train_subset"):
        subset(NUM_TRAIN + 1, seed=0)


def test_dataloader_shuffle_is_seeded(mnist_root: tuple[Path, dict]) -> None:
    root, _ = mnist_root

    def first_epoch(seed: int) -> list[int]:
        module = MNISTDataModule(data_dir=str(root), download=False, batch_size=32, seed=seed)
        module.setup("fit")
        loader = module.train_dataloader()
        assert isinstance(loader, DataLoader)
        images = torch.cat([images for images, _ in loader])
        return sample_ids(images, module.mean[0], module.std[0])

    order = first_epoch(3)
    assert sorted(order) == list(range(NUM_TRAIN))
    assert order != list(range(NUM_TRAIN))
    assert first_epoch(3) == order


# ---------------------------------------------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    ("cls", "folder"),
    [
        (MNISTDataModule, "MNIST/raw"),
        (FashionMNISTDataModule, "FashionMNIST/raw"),
        (CIFAR10DataModule, "cifar-10-batches-py"),
        (CIFAR100DataModule, "cifar-100-python"),
    ],
)
def test_missing_data_without_download_names_the_path(
    cls: type[TorchvisionDataModule], folder: str, tmp_path: Path
) -> None:
    module = cls(data_dir=str(tmp_path / "nowhere"), download=False)
    module.prepare_data()  # nothing to download, nothing to fail
    with pytest.raises(FileNotFoundError) as info:
        module.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / folder) in message
    assert "download=True" in message and "data_dir" in message
    assert not (tmp_path / "nowhere").exists()  # and nothing was downloaded


# ---------------------------------------------------------------------------------------------------- digits


def test_digits_split_sizes_determinism_and_disjointness() -> None:
    train_idx, val_idx = DigitsDataModule.split_indices()
    assert (len(train_idx), len(val_idx)) == (1437, 360)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(1797))
    again_train, again_val = DigitsDataModule(seed=5).split_indices()
    assert torch.equal(again_train, train_idx) and torch.equal(again_val, val_idx)

    module = DigitsDataModule(seed=7)
    module.setup("fit")
    digits = load_digits()
    images, labels = module.train_data
    assert images.shape == (1437, 1, 8, 8) and module.val_data[0].shape == (360, 1, 8, 8)
    raw = torch.as_tensor(digits.images, dtype=torch.float32)[train_idx].unsqueeze(1) / 16
    torch.testing.assert_close(images, (raw - module.mean[0]) / module.std[0])
    assert torch.equal(labels, torch.as_tensor(digits.target)[train_idx])
    assert torch.equal(module.val_data[1], torch.as_tensor(digits.target)[val_idx])
    # Normalised: roughly zero mean and unit spread over the training set.
    assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1


def test_digits_subset_and_hyperparameters() -> None:
    module = DigitsDataModule(train_subset=100, seed=3)
    module.setup("fit")
    assert len(module.train_data[1]) == 100 and len(module.val_data[1]) == 360
    assert dict(module.hparams) == {
        "batch_size": 512,
        "train_subset": 100,
        "seed": 3,
        "num_workers": 0,
        "on_device": False,
    }


@pytest.mark.parametrize("on_device", [False, True])
def test_recreated_train_loaders_continue_the_shuffle_and_state_dict_replays_it(on_device: bool) -> None:
    def order(loader: DataLoader | DeviceTensorLoader) -> list[int]:
        return torch.cat([labels for _, labels in loader]).tolist()

    module = DigitsDataModule(batch_size=64, on_device=on_device, seed=1)
    module.setup("fit")
    # Labels as sample indices make the visiting order visible.
    module.train_data = (module.train_data[0], torch.arange(len(module.train_data[1])))
    state = module.state_dict()
    first = order(module.train_dataloader())
    second = order(module.train_dataloader())  # a re-created loader (reload_dataloaders_every_n_epochs)
    assert sorted(first) == sorted(second) == list(range(1437))
    assert first != second
    module.load_state_dict(state)
    assert order(module.train_dataloader()) == first


# ---------------------------------------------------------------------------------------------------- on-device loader


def index_loader(n: int, batch_size: int, **kwargs: object) -> DeviceTensorLoader:
    """A loader whose labels are the sample indices, so batches show which samples they hold."""
    return DeviceTensorLoader(torch.randn(n, 1, 2, 2), torch.arange(n), batch_size=batch_size, **kwargs)


def epoch(loader: DeviceTensorLoader) -> list[int]:
    return torch.cat([labels for _, labels in loader]).tolist()


def test_device_loader_covers_every_sample_once_and_reshuffles() -> None:
    loader = index_loader(103, 10, shuffle=True, seed=0)
    assert len(loader) == 11
    batches = list(loader)
    assert len(batches) == 11 and len(batches[-1][1]) == 3  # last partial batch kept
    images, labels = batches[0]
    torch.testing.assert_close(images, loader.images[labels])  # images travel with their labels
    first, second = epoch(loader), epoch(loader)
    assert sorted(first) == sorted(second) == list(range(103))
    assert first != second
    assert first != list(range(103))
    # The same seed replays the same sequence of epochs; another seed does not.
    replay = index_loader(103, 10, shuffle=True, seed=0)
    epoch(replay)  # the first epoch of `loader` above was consumed by list(loader)
    assert epoch(replay) == first and epoch(replay) == second
    assert epoch(index_loader(103, 10, shuffle=True, seed=1)) != epoch(index_loader(103, 10, shuffle=True, seed=0))
    assert epoch(index_loader(103, 10)) == list(range(103))  # no shuffling: stored order


@pytest.mark.parametrize(("n", "world_size"), [(96, 4), (103, 4), (5, 3), (2, 3)])
def test_device_loader_ddp_shards_are_disjoint_and_equal(n: int, world_size: int) -> None:
    loaders = [index_loader(n, 8, shuffle=True, seed=11, rank=r, world_size=world_size) for r in range(world_size)]
    lengths = {len(loader) for loader in loaders}
    assert len(lengths) == 1  # every rank runs the same number of steps
    for _ in range(2):
        shards = [epoch(loader) for loader in loaders]
        sizes = {len(shard) for shard in shards}
        assert sizes == {-(-n // world_size)}
        everything = [i for shard in shards for i in shard]
        assert set(everything) == set(range(n))
        # Only the padding (to a multiple of world_size) may repeat samples.
        assert len(everything) - len(set(everything)) == len(everything) - n
        if n % world_size == 0:
            for a in range(world_size):
                for b in range(a + 1, world_size):
                    assert set(shards[a]).isdisjoint(shards[b])


def test_device_loader_validates_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        index_loader(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        index_loader(10, 0)


def test_on_device_data_module_matches_dataloader_and_shards(mnist_root: tuple[Path, dict]) -> None:
    root, _ = mnist_root
    plain = MNISTDataModule(data_dir=str(root), download=False, batch_size=16)
    plain.setup("fit")
    on_device = MNISTDataModule(data_dir=str(root), download=False, batch_size=16, on_device=True)
    on_device.trainer = fake_trainer()
    on_device.setup("fit")
    loader = on_device.train_dataloader()
    assert isinstance(loader, DeviceTensorLoader) and loader.images.device.type == "cpu"
    assert len(loader) == len(plain.train_dataloader()) == 7
    # Validation batches are the same tensors either way.
    for (a, la), (b, lb) in zip(plain.val_dataloader(), on_device.val_dataloader(), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)

    shards = []
    for rank in range(2):
        module = MNISTDataModule(data_dir=str(root), download=False, batch_size=16, on_device=True, seed=4)
        module.trainer = fake_trainer(rank=rank, world_size=2)
        module.setup("fit")
        train = module.train_dataloader()
        assert (train.rank, train.world_size, len(train)) == (rank, 2, 4)
        images = torch.cat([images for images, _ in train])
        shards.append(sample_ids(images, module.mean[0], module.std[0]))
        assert module.val_dataloader().world_size == 2
    assert len(shards[0]) == len(shards[1]) == NUM_TRAIN // 2
    assert set(shards[0]).isdisjoint(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(NUM_TRAIN))


# ---------------------------------------------------------------------------------------------------- with a Trainer


@pytest.mark.parametrize("on_device", [False, True])
def test_trainer_fits_digits(on_device: bool) -> None:
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=128, train_subset=300, on_device=on_device)
    model = ImageClassifier(
        model="vit-nomlp-wkewq-wvwo",
        num_classes=data.num_classes,
        image_size=data.image_size,
        in_channels=data.in_channels,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    assert trainer.num_training_batches == 3  # ceil(300 / 128)
    assert trainer.num_val_batches == [3]  # ceil(360 / 128)
    assert trainer.global_step == 6
    assert isinstance(trainer.train_dataloader, DeviceTensorLoader) == on_device
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(trainer.callback_metrics)


def test_trainer_fits_fabricated_mnist_on_device(mnist_root: tuple[Path, dict]) -> None:
    root, _ = mnist_root
    data = MNISTDataModule(data_dir=str(root), download=False, batch_size=32, on_device=True)
    model = ImageClassifier(model="vgg5")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 4  # ceil(100 / 32)
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


class RecordSamples(pl.Callback):
    """Collect the fabricated indices of the training samples each epoch visits."""

    def __init__(self) -> None:
        self.epochs: list[list[int]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        mean, std = MNISTDataModule.mean[0], MNISTDataModule.std[0]
        self.epochs[-1].extend(sample_ids(batch[0], mean, std))


def _fit_on_device_rank(rank: int, world_size: int, data_dir: str) -> dict:
    torch.manual_seed(0)
    data = MNISTDataModule(data_dir=data_dir, download=False, batch_size=16, on_device=True, seed=2)
    model = ImageClassifier(model="vit-nomlp-wkewq-wvwo")
    recorder = RecordSamples()
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=world_size,
        max_epochs=2,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    return {
        "batches": trainer.num_training_batches,
        "val_batches": trainer.num_val_batches,
        "steps": trainer.global_step,
        "epochs": recorder.epochs,
        "weights": [p.detach().clone() for p in model.parameters()],
    }


@pytest.mark.slow
def test_on_device_loader_under_ddp_gives_each_rank_its_own_shard(mnist_root: tuple[Path, dict]) -> None:
    root, _ = mnist_root
    rank0, rank1 = run_on_ranks(_fit_on_device_rank, str(root))
    assert rank0["batches"] == rank1["batches"] == 4  # 100 samples / 2 ranks / batches of 16
    assert rank0["val_batches"] == rank1["val_batches"] == [1]
    assert rank0["steps"] == rank1["steps"] == 8
    assert len(rank0["epochs"]) == len(rank1["epochs"]) == 2
    for first, second in zip(rank0["epochs"], rank1["epochs"]):
        assert len(first) == len(second) == 50
        assert set(first).isdisjoint(second) and set(first) | set(second) == set(range(NUM_TRAIN))
    assert rank0["epochs"][0] != rank0["epochs"][1]  # reshuffled
    for a, b in zip(rank0["weights"], rank1["weights"]):
        assert torch.equal(a, b)  # DDP averaged the gradients of the two shards
