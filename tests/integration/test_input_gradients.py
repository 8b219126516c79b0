"""Losses that take gradients inside ``training_step`` (a physics-informed network's u'') train in the second phase."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import fit, swap_at


class Poisson1D(pl.LightningModule):
    """-u'' = pi^2 sin(pi x) on [0, 1] with u(0) = u(1) = 0, written the usual way: no ``torch.enable_grad()``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        self.start_losses: list[float] = []  # the loop's own loss of each batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        x = x.clone().requires_grad_(True)
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        d2u = torch.autograd.grad(du.sum(), x, create_graph=True)[0]
        residual = d2u + math.pi**2 * torch.sin(math.pi * x)
        boundary = self.net(torch.tensor([[0.0], [1.0]], dtype=torch.float64))
        loss = (residual**2).mean() + (boundary**2).mean()
        from lightning_twophase import is_trial_evaluation

        if not is_trial_evaluation():
            self.start_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        points = torch.linspace(0, 1, 64, dtype=torch.float64).unsqueeze(1)
        return DataLoader(TensorDataset(points), batch_size=64)

    def full_loss(self) -> float:
        (x,) = next(iter(self.train_dataloader()))
        with torch.enable_grad():
            return float(self.training_step((x,), 0))


@pytest.mark.parametrize("optimizer", ["lbfgs", "cg"])
def test_a_pinn_without_enable_grad_trains_in_the_second_phase(optimizer):
    model = Poisson1D()
    swap = swap_at(5, optimizer=optimizer)
    fit(model, swap, max_epochs=15, precision="64-true")
    assert swap.phase != "first" and swap.fallback_decision is None
    after_swap = [point["loss"] for point in swap.history if point["epoch"] > 5]
    # Each second-phase check reports the loop's start loss of its iteration: it falls from one to the next.
    assert after_swap[-1] < 0.5 * after_swap[0]
    assert model.full_loss() < after_swap[0]


def test_the_second_phase_optimizes_the_loops_function_of_a_pinn():
    # The start loss the second phase reports is the one the loop's own pass computed.
    model = Poisson1D()
    swap = swap_at(3)
    fit(model, swap, max_epochs=6, precision="64-true")
    second = [point for point in swap.history if point["epoch"] > 3]
    assert second
    for point in second:
        assert point["loss"] == pytest.approx(model.start_losses[point["epoch"] - 1], rel=1e-12)
