"""Tests of the example cases beyond image classification: the Poisson PINN, Friedman #1 regression and the CNN on
digits augmented anew every epoch (``example_modules.pinn``, ``.regression``, ``.augmented``)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import Tensor

from example_modules.augmented import AugmentedDigitsClassifier, AugmentedDigitsDataModule, RandomShiftDataset
from example_modules.pinn import PoissonCollocationDataModule, PoissonPINN, exact_solution
from example_modules.regression import Friedman1DataModule, MLPRegressor


def cpu_trainer(max_epochs: int, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def whole_set_loss(module: pl.LightningModule, data: tuple[Tensor, Tensor]) -> float:
    was_training = module.training
    module.eval()
    with torch.enable_grad():
        loss = float(module.batch_loss(data).detach())
    module.train(was_training)
    return loss


# ------------------------------------------------------------------------------------------------------------ PINN


def test_collocation_points_are_interior_points_and_both_ends() -> None:
    datamodule = PoissonCollocationDataModule(num_interior=256, num_val=101)
    datamodule.setup("fit")
    (x, is_boundary), (grid, exact) = datamodule.train_data, datamodule.val_data
    assert x.shape == (258, 1) and x.dtype == torch.float64
    assert is_boundary.sum() == 2 and sorted(x[is_boundary, 0].tolist()) == [0.0, 1.0]
    assert ((x[~is_boundary] > 0) & (x[~is_boundary] < 1)).all()
    assert torch.equal(grid[:, 0], torch.linspace(0, 1, 101, dtype=torch.float64))
    torch.testing.assert_close(exact, torch.sin(math.pi * grid))
    # The points are the problem, not the training seed's.
    other = PoissonCollocationDataModule(num_interior=256, num_val=101, seed=5)
    other.setup("fit")
    assert torch.equal(other.train_data[0], x)
    # One batch per epoch by default.
    assert len(datamodule.train_dataloader()) == 1


class _Quadratic(PoissonPINN):
    """u(x) = x (1 - x): -u'' = 2, zero on the boundary."""

    def forward(self, x: Tensor) -> Tensor:
        return x * (1 - x)


class _Exact(PoissonPINN):
    def forward(self, x: Tensor) -> Tensor:
        return exact_solution(x)


def test_pinn_loss_is_the_mean_squared_residual_plus_the_boundary_error() -> None:
    datamodule = PoissonCollocationDataModule(num_interior=64)
    datamodule.setup("fit")
    x, is_boundary = datamodule.train_data
    interior = x[~is_boundary]
    expected = float((2 - math.pi**2 * torch.sin(math.pi * interior)).pow(2).mean())
    assert _Quadratic().batch_loss(datamodule.train_data).item() == pytest.approx(expected, rel=1e-10)
    # The exact solution: no residual, no boundary error, no validation error.
    assert _Exact().batch_loss(datamodule.train_data).item() < 1e-20
    # A boundary value of 1 at both ends adds exactly 1.
    shifted = PoissonPINN()
    shifted.forward = lambda x: exact_solution(x) + 1  # type: ignore[method-assign]
    assert shifted.batch_loss(datamodule.train_data).item() == pytest.approx(1.0, abs=1e-12)
    assert _Exact().metric(datamodule.val_data) < 1e-12


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_pinn_training_step_uses_the_callers_gradient_mode() -> None:
    """The case exists to check that an optimizer re-evaluating ``training_step`` enables gradients itself."""
    datamodule = PoissonCollocationDataModule(num_interior=16)
    datamodule.setup("fit")
    model = PoissonPINN()
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not require grad"):
        model.training_step(datamodule.train_data, 0)
    assert torch.isfinite(model.training_step(datamodule.train_data, 0))


@pytest.mark.parametrize("precision", ["32-true", "64-true"])
def test_pinn_trains_in_float64_under_lightning(precision: str) -> None:
    torch.manual_seed(0)
    model, datamodule = PoissonPINN(lr=1e-2), PoissonCollocationDataModule(num_interior=64, num_val=101)
    datamodule.setup("fit")
    before_loss, before_error = whole_set_loss(model, datamodule.train_data), model.metric(datamodule.val_data)
    trainer = cpu_trainer(150, precision=precision)
    trainer.fit(model, datamodule=datamodule)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert whole_set_loss(model, datamodule.train_data) < 0.5 * before_loss
    assert "val_rel_l2" in trainer.callback_metrics
    assert model.metric(datamodule.val_data) < 0.2 * before_error


# ------------------------------------------------------------------------------------------------------ regression


def test_friedman_splits_are_standardised_by_the_training_split() -> None:
    datamodule = Friedman1DataModule(num_train=512, num_val=128, batch_size=128)
    datamodule.setup("fit")
    (x, y), (x_val, y_val) = datamodule.train_data, datamodule.val_data
    assert x.shape == (512, 10) and y.shape == (512, 1) and x_val.shape == (128, 10) and y_val.shape == (128, 1)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert abs(float(y_val.mean())) > 1e-4  # scaled by the training statistics, not its own
    assert len(datamodule.train_dataloader()) == 4
    again = Friedman1DataModule(num_train=512, num_val=128)
    again.setup("fit")
    assert torch.equal(again.train_data[1], y)
    other = Friedman1DataModule(num_train=512, num_val=128, data_seed=1)
    other.setup("fit")
    assert not torch.equal(other.train_data[1], y)


def test_friedman_batches_follow_the_seed_and_resume_from_the_state() -> None:
    def first_targets(datamodule: Friedman1DataModule) -> Tensor:
        return next(iter(datamodule.train_dataloader()))[1]

    a, b = (
        Friedman1DataModule(num_train=256, num_val=32, seed=3),
        Friedman1DataModule(num_train=256, num_val=32, seed=3),
    )
    a.setup("fit")
    b.setup("fit")
    first = first_targets(a)
    assert torch.equal(first, first_targets(b))
    state = a.state_dict()
    following = first_targets(a)
    assert not torch.equal(following, first)  # a new order every epoch
    b.load_state_dict(state)
    assert torch.equal(first_targets(b), following)


def test_mlp_regressor_learns_friedman_in_a_few_epochs() -> None:
    torch.manual_seed(0)
    model, datamodule = MLPRegressor(), Friedman1DataModule(num_train=1024, num_val=256)
    trainer = cpu_trainer(8)
    trainer.fit(model, datamodule=datamodule)
    # 1.0 is predicting the mean of the standardised target.
    assert float(trainer.callback_metrics["val_mse"]) < 0.5
    assert model.metric(datamodule.val_data) == pytest.approx(float(trainer.callback_metrics["val_mse"]), rel=1e-5)


# ---------------------------------------------------------------------------------------------- augmented digits


def test_random_shift_moves_an_image_by_at_most_one_pixel() -> None:
    image = torch.arange(64, dtype=torch.float32).view(1, 8, 8) + 1
    dataset = RandomShiftDataset(
        image.unsqueeze(0), torch.zeros(1), torch.Generator().manual_seed(0), max_shift=1, background=-5.0
    )
    shifts = set()
    padded = F.pad(image, (1, 1, 1, 1), value=-5.0)
    candidates = {(dy, dx): padded[:, 1 - dy : 9 - dy, 1 - dx : 9 - dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    for _ in range(60):
        augmented, _ = dataset[0]
        match = [shift for shift, shifted in candidates.items() if torch.equal(shifted, augmented)]
        assert len(match) == 1, "not a shift of the image by at most one pixel"
        shifts.add(match[0])
    assert len(shifts) == 9  # every shift is drawn
    # The shift moves content: (1, 0) puts the first row one row down.
    assert torch.equal(candidates[(1, 0)][0, 1], image[0, 0])


def test_augmented_digits_draw_anew_every_epoch_and_repeat_from_the_seed() -> None:
    def first_epoch_images(datamodule: AugmentedDigitsDataModule) -> Tensor:
        return torch.cat([images for images, _ in datamodule.train_dataloader()])

    a, b = AugmentedDigitsDataModule(train_subset=128, seed=0), AugmentedDigitsDataModule(train_subset=128, seed=0)
    a.setup("fit")
    b.setup("fit")
    epoch_a, epoch_b = first_epoch_images(a), first_epoch_images(b)
    assert torch.equal(epoch_a, epoch_b)  # the same seed, the same draws and order
    state = a.state_dict()
    whole = a.training_set()
    assert torch.equal(whole[1], a.train_data[1])
    assert not torch.equal(whole[0], a.train_data[0])  # augmented
    assert not torch.equal(a.training_set()[0], whole[0])  # and a new draw each time
    b.load_state_dict(state)
    assert torch.equal(b.training_set()[0], whole[0])
    # Validation images are left as they are.
    images, _ = next(iter(a.val_dataloader()))
    assert torch.equal(images, a.val_data[0][: len(images)])


def test_augmented_classifier_has_dropout_and_learns() -> None:
    torch.manual_seed(0)
    model = AugmentedDigitsClassifier(dropout=0.5)
    images = torch.randn(32, 1, 8, 8)
    model.train()
    assert not torch.equal(model(images), model(images))  # dropout draws new masks
    model.eval()
    assert torch.equal(model(images), model(images))
    model.train()
    datamodule = AugmentedDigitsDataModule(batch_size=64, train_subset=640)
    trainer = cpu_trainer(4)
    trainer.fit(model, datamodule=datamodule)
    assert model.hparams.dropout == 0.5 and model.hparams.lr == 1e-3
    assert model.metric(datamodule.val_data) > 0.3  # chance is 0.1
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(model.metric(datamodule.val_data), abs=1e-6)


# ---------------------------------------------------------------------------------------------- command line


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize(
    ("model", "data"),
    [
        ("example_modules.pinn.PoissonPINN", "example_modules.pinn.PoissonCollocationDataModule"),
        ("example_modules.regression.MLPRegressor", "example_modules.regression.Friedman1DataModule"),
        ("example_modules.augmented.AugmentedDigitsClassifier", "example_modules.augmented.AugmentedDigitsDataModule"),
    ],
)
def test_every_case_trains_from_a_lightning_cli(model: str, data: str) -> None:
    """LightningCLI saves only the arguments it was given as hyperparameters; the modules must not need others."""
    cli = LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        args=[
            "fit",
            f"--model={model}",
            f"--data={data}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ],
    )
    metric = cli.model.metric_name
    assert math.isfinite(float(cli.trainer.callback_metrics[metric]))
