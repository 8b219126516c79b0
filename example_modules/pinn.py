r"""A physics-informed neural network (PINN) for the 1D Poisson problem, the way scientific ML trains them.

The problem: :math:`-u''(x) = \pi^2 \sin(\pi x)` on :math:`[0, 1]` with :math:`u(0) = u(1) = 0`; the exact solution is
:math:`u(x) = \sin(\pi x)`. A tanh MLP :math:`u_\theta` is trained on collocation points, with the loss

.. math:: L(\theta) = \operatorname{mean}_{x \in \text{interior}} (-u_\theta''(x) - \pi^2 \sin(\pi x))^2
    + \operatorname{mean}_{x \in \{0, 1\}} u_\theta(x)^2 ,

where :math:`u_\theta''` comes from ``torch.autograd.grad(..., create_graph=True)`` inside ``training_step`` (the
loss depends on derivatives of the network with respect to its inputs). ``training_step`` does not enable gradients
itself: Lightning's training loop runs it with gradients on, and an optimizer that re-evaluates it must do the same.

Everything is in float64 (the module calls ``self.double()``, the data module makes float64 tensors), as PINN
practitioners do before switching to L-BFGS: it works with any Trainer precision that leaves the weights alone
(``"32-true"``, the default, or ``"64-true"``).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from example_modules.tensor_data import Pair, TensorPairDataModule

__all__ = ["PoissonCollocationDataModule", "PoissonPINN", "exact_solution", "source"]


def exact_solution(x: Tensor) -> Tensor:
    """:math:`u(x) = \\sin(\\pi x)`."""
    return torch.sin(math.pi * x)


def source(x: Tensor) -> Tensor:
    """The right-hand side :math:`f(x) = \\pi^2 \\sin(\\pi x)` of :math:`-u'' = f`."""
    return math.pi**2 * torch.sin(math.pi * x)


class PoissonCollocationDataModule(TensorPairDataModule):
    """Collocation points of the Poisson problem on :math:`[0, 1]`, float64.

    The training set is ``num_interior`` points drawn uniformly in :math:`(0, 1)` (seed ``data_seed``, sorted) and
    the two boundary points; each sample is ``(x, is_boundary)`` with ``x`` of shape ``(1,)``. The validation set is
    ``num_val`` evenly spaced points of :math:`[0, 1]` with the exact solution as the target.

    Args:
        num_interior: interior collocation points.
        num_val: points of the validation grid.
        batch_size: points per training batch; ``None`` (the default): all of them, one batch per epoch.
        data_seed: seed of the collocation points (the same points for every training seed).
        seed: seed of the shuffling (irrelevant with one batch per epoch).

    """

    def __init__(
        self,
        num_interior: int = 256,
        num_val: int = 1001,
        batch_size: int | None = None,
        data_seed: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, shuffle=batch_size is not None, seed=seed)
        if num_interior < 1 or num_val < 2:
            raise ValueError(f"need num_interior >= 1 and num_val >= 2, got {num_interior} and {num_val}.")
        self.save_hyperparameters()
        self.num_interior = num_interior
        self.num_val = num_val
        self.data_seed = data_seed

    def make_splits(self) -> tuple[Pair, Pair]:
        """``((x, is_boundary), (x_grid, u_exact))``."""
        generator = torch.Generator().manual_seed(self.data_seed)
        interior = torch.rand(self.num_interior, generator=generator, dtype=torch.float64).sort().values
        x = torch.cat([interior, torch.tensor([0.0, 1.0], dtype=torch.float64)]).unsqueeze(1)
        is_boundary = torch.zeros(len(x), dtype=torch.bool)
        is_boundary[-2:] = True
        grid = torch.linspace(0.0, 1.0, self.num_val, dtype=torch.float64).unsqueeze(1)
        return (x, is_boundary), (grid, exact_solution(grid))


class PoissonPINN(pl.LightningModule):
    """A tanh MLP ``1 -> hidden -> ... -> 1`` in float64 trained on the Poisson residual and the boundary values.

    The loss of a batch of collocation points is the mean squared residual over its interior points plus the mean
    squared boundary value over its boundary points (a term is 0 where the batch has no such point). The validation
    metric ``val_rel_l2`` is the relative L2 error :math:`\\|u_\\theta - u\\| / \\|u\\|` on the validation grid.

    Args:
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        lr: Adam's learning rate.

    """

    metric_name = "val_rel_l2"
    higher_is_better = False

    def __init__(self, hidden: int = 32, depth: int = 2, lr: float = 1e-3) -> None:
        super().__init__()
        if hidden < 1 or depth < 1:
            raise ValueError(f"hidden and depth must be positive, got hidden={hidden}, depth={depth}.")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 1
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        """:math:`u_\\theta(x)` for ``x`` of shape ``(N, 1)``."""
        return self.net(x)

    def batch_loss(self, batch: Pair) -> Tensor:
        """Mean squared residual over the batch's interior points plus mean squared boundary value.

        Needs gradients enabled (the residual differentiates the network twice with respect to its input).
        """
        x, is_boundary = batch
        # A leaf of its own: the batch may be a view of the data module's tensor.
        x = x.detach().clone().requires_grad_(True)
        u = self(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
        residual = (-d2u - source(x)).squeeze(1)
        interior = ~is_boundary
        loss = u.new_zeros(())
        if interior.any():
            loss = loss + residual[interior].pow(2).mean()
        if is_boundary.any():
            loss = loss + u.squeeze(1)[is_boundary].pow(2).mean()
        return loss

    def training_step(self, batch: Pair, batch_idx: int) -> Tensor:
        """The loss of a batch of collocation points; logs ``train_loss`` per epoch."""
        loss = self.batch_loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch[1]))
        return loss

    @torch.no_grad()
    def metric(self, batch: Pair) -> float:
        """The relative L2 error of :math:`u_\\theta` against the exact values of ``batch = (x, u)``."""
        x, exact = batch
        return float(torch.linalg.vector_norm(self(x) - exact) / torch.linalg.vector_norm(exact))

    def validation_step(self, batch: Pair, batch_idx: int) -> None:
        """Log ``val_rel_l2``."""
        self.log(self.metric_name, self.metric(batch), batch_size=len(batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with the configured learning rate."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
