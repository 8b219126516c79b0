"""Loss scaling in the CG phase without a Trainer: a GradScaler on the CPU with float16 autocast, the objective's
gradients from the scaled loss, and overflows evaluated again at a lower scale (never a step, never a NaN)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_twophase import ConjugateGradient
from lightning_twophase._macro_batch import MacroBatchStep, _MacroBatchOptimizer
from lightning_twophase._scaling import MIN_SCALE, LossScaling
from lightning_twophase.objective import TrainingObjective
from tests.conftest import needs_cpu_grad_scaler

pytestmark = needs_cpu_grad_scaler


def scaler(init_scale: float) -> Any:
    return torch.amp.GradScaler("cpu", init_scale=init_scale)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 6, generator=generator), torch.randn(n, 2, generator=generator)) for n in (16, 16, 9)]


class Half:
    """A linear model whose loss is computed under float16 autocast, as 16-mixed computes it."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(6, 2)

    def loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.functional.mse_loss(self.model(inputs), targets)

    def reference(self) -> tuple[float, list[torch.Tensor]]:
        """The loss and gradient over all batches, computed under the same autocast without a scaler."""
        objective = TrainingObjective(self.loss, list(self.model.parameters()), self.model)
        for index, batch in enumerate(batches()):
            objective.add(batch, index)
        loss = float(objective.value_and_gradient())
        grads = [p.grad.clone() for p in self.model.parameters()]
        self.model.zero_grad()
        return loss, grads

    def objective(self, grad_scaler: Any) -> TrainingObjective:
        objective = TrainingObjective(
            self.loss, list(self.model.parameters()), self.model, scaling=LossScaling(grad_scaler)
        )
        for index, batch in enumerate(batches()):
            objective.add(batch, index)
        return objective


def test_the_gradient_is_unscaled_and_each_clean_one_counts_toward_growth():
    half = Half()
    expected_loss, expected_grads = half.reference()
    grad_scaler = scaler(2.0**10)
    objective = half.objective(grad_scaler)
    loss = objective.value_and_gradient()
    assert float(loss) == pytest.approx(expected_loss, rel=1e-3)
    for p, expected in zip(half.model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-3, atol=1e-6)
    assert grad_scaler.state_dict()["scale"] == 2.0**10 and grad_scaler.state_dict()["_growth_tracker"] == 1
    assert objective.backward_samples == 41  # one evaluation


def test_an_overflow_lowers_the_scale_and_the_gradient_is_evaluated_again():
    half = Half()
    expected_loss, expected_grads = half.reference()
    grad_scaler = scaler(2.0**40)  # float16 gradients overflow for a scale this large
    objective = half.objective(grad_scaler)
    loss = objective.value_and_gradient()
    scale = grad_scaler.get_scale()
    assert scale < 2.0**40 and grad_scaler.state_dict()["_growth_tracker"] == 1  # backed off, then one clean
    evaluations = round(math.log2(2.0**40 / scale)) + 1
    assert objective.backward_samples == 41 * evaluations and evaluations > 10
    assert float(loss) == pytest.approx(expected_loss, rel=1e-3)
    for p, expected in zip(half.model.parameters(), expected_grads):
        assert bool(torch.isfinite(p.grad).all())
        torch.testing.assert_close(p.grad, expected, rtol=1e-3, atol=1e-6)
    # One scale lower than the last evaluation's: that one no longer overflowed.
    objective.value_and_gradient()
    assert grad_scaler.get_scale() == scale and objective.backward_samples == 41 * (evaluations + 1)


def test_a_gradient_that_overflows_at_every_scale_stops_at_the_smallest_one():
    model = nn.Linear(1, 1)

    def loss_fn(batch: Any, batch_idx: int) -> torch.Tensor:
        # sqrt at 0: a finite loss with an infinite gradient, whatever the scale.
        return (model.weight - model.weight.detach()).abs().sqrt().sum() + model.bias.square().sum()

    grad_scaler = scaler(1.0)
    objective = TrainingObjective(loss_fn, list(model.parameters()), model, scaling=LossScaling(grad_scaler))
    objective.add((torch.zeros(4, 1),), 0)
    loss = objective.value_and_gradient()
    assert math.isfinite(float(loss)) and not bool(torch.isfinite(model.weight.grad).all())
    # Scales 1, 1/2, ..., MIN_SCALE were tried, and no more.
    assert objective.backward_samples == 4 * (round(-math.log2(MIN_SCALE)) + 1)
    assert grad_scaler.get_scale() < MIN_SCALE


def test_a_non_finite_loss_leaves_the_scale_alone():
    grad_scaler = scaler(2.0**10)
    scaling = LossScaling(grad_scaler)
    scaling.scale(torch.ones(()))  # a gradient to unscale comes from a scaled loss
    param = nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), math.nan)
    assert scaling.unscale_([param], math.inf) is False
    assert grad_scaler.get_scale() == 2.0**10 and grad_scaler.state_dict()["_growth_tracker"] == 0
    param.grad = torch.full((3,), 2.0**10)
    assert scaling.unscale_([param], 1.0) is False and torch.equal(param.grad, torch.ones(3))
    param.grad = torch.tensor([1.0, math.inf, 0.0])
    assert scaling.unscale_([param], 1.0) is True and grad_scaler.get_scale() == 2.0**9


def test_an_overflow_in_the_loops_pass_is_evaluated_again_with_every_batch_of_the_macro_batch():
    """The loop's backward scales the loss (Lightning's ``pre_backward``); a scale that overflows it must neither
    drop a batch nor become the step's start: the start is evaluated again at a lower scale, then CG steps."""
    half = Half()
    expected_loss, expected_grads = half.reference()
    expected_norm = float(torch.cat([g.reshape(-1) for g in expected_grads]).norm())
    grad_scaler = scaler(2.0**40)
    objective = half.objective(grad_scaler)
    objective.clear()
    cg = ConjugateGradient(half.model.parameters(), beta="pr+", line_search="brent")
    results: list[MacroBatchStep] = []
    current: list[Any] = [None]
    adapter = _MacroBatchOptimizer(cg, objective, current_batch=lambda: current[0], on_step=results.append)
    data = batches()
    for index, batch in enumerate(data):
        current[0] = (batch, index, index + 1 == len(data))

        def closure(batch: Any = batch, index: int = index) -> torch.Tensor:
            adapter.zero_grad()
            with torch.enable_grad():
                loss = half.loss(batch, index)
                grad_scaler.scale(loss).backward()
            return loss

        adapter.step(closure)
    (step,) = results
    assert step.non_finite is None and grad_scaler.get_scale() < 2.0**40
    # The step started from the whole macro-batch's loss and gradient: no batch left out, no overflow in it.
    assert step.diagnostics.loss == pytest.approx(expected_loss, rel=1e-3)
    assert step.diagnostics.grad_norm == pytest.approx(expected_norm, rel=2e-3)
    assert step.diagnostics.line_search_status != "failed"
    assert all(bool(torch.isfinite(p).all()) for p in half.model.parameters())
    assert half.reference()[0] < expected_loss
