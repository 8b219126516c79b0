"""The macro-batch adapter without a Trainer: the loop below plays Lightning's part (one ``step(closure)`` per batch,
the closure running forward and backward of that batch)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_twophase import ConjugateGradient
from lightning_twophase._macro_batch import MacroBatchStep, _MacroBatchOptimizer
from lightning_twophase.objective import TrainingObjective


class Harness:
    """A linear model, its CG optimizer inside the adapter, and a training loop that feeds it batches."""

    def __init__(self, batches_per_step: int | None, poison: bool = False, optimizer: Any = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1).double()
        self.poison = poison
        generator = torch.Generator().manual_seed(1)
        self.batches = [
            (torch.randn(n, 4, generator=generator, dtype=torch.float64), torch.randn(n, 1, dtype=torch.float64))
            for n in (8, 8, 8, 5)
        ]
        objective = TrainingObjective(self.loss, list(self.model.parameters()), self.model)
        self.cg = ConjugateGradient(self.model.parameters(), beta="pr+", line_search="brent")
        if optimizer is not None:
            self.cg = optimizer(self.model.parameters())
        self.results: list[MacroBatchStep] = []
        self.current: tuple[Any, int, bool] = (None, 0, False)
        self.adapter = _MacroBatchOptimizer(
            self.cg,
            objective,
            current_batch=lambda: self.current,
            on_step=self.results.append,
            batches_per_step=batches_per_step,
        )

    def loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.model(inputs), targets)
        return loss * math.nan if self.poison else loss

    def epoch(self, batches: int | None = None) -> None:
        count = len(self.batches) if batches is None else batches
        for index, batch in enumerate(self.batches[:count]):
            self.current = (batch, index, index + 1 == len(self.batches))

            def closure(batch: Any = batch, index: int = index) -> torch.Tensor:
                self.adapter.zero_grad()
                with torch.enable_grad():
                    loss = self.loss(batch, index)
                    loss.backward()
                return loss

            self.adapter.step(closure)

    def full_loss(self) -> float:
        inputs = torch.cat([b[0] for b in self.batches])
        targets = torch.cat([b[1] for b in self.batches])
        with torch.no_grad():
            return float(nn.functional.mse_loss(self.model(inputs), targets))


def test_full_batch_steps_once_per_epoch_from_the_exact_mean():
    harness = Harness(batches_per_step=None)
    start = harness.full_loss()
    harness.epoch()
    (result,) = harness.results
    assert result.diagnostics is not None and result.non_finite is None
    assert result.diagnostics.loss == pytest.approx(start, rel=1e-12)  # the size-weighted mean of the four batches
    assert harness.full_loss() < start
    evaluations = result.diagnostics.value_evaluations
    # The loop's own passes over 29 samples, forward and backward, plus one forward pass per trial point.
    assert (result.forward_samples, result.backward_samples) == (29 * (1 + evaluations), 29)
    assert harness.adapter.steps == 1


def test_macro_batches_of_two_step_twice_per_epoch():
    harness = Harness(batches_per_step=2)
    harness.epoch()
    assert len(harness.results) == 2
    assert harness.cg.totals["iterations"] == 2


def test_finish_steps_on_a_partial_macro_batch_and_does_nothing_without_one():
    harness = Harness(batches_per_step=None)
    harness.epoch(batches=2)  # the epoch ended early: no last batch was seen
    assert harness.results == []
    harness.adapter.finish()
    assert len(harness.results) == 1 and harness.results[0].forward_samples >= 16
    harness.adapter.finish()
    assert len(harness.results) == 1


def test_discard_drops_a_partial_macro_batch():
    harness = Harness(batches_per_step=None)
    harness.epoch(batches=3)
    harness.adapter.discard()
    harness.adapter.finish()
    assert harness.results == [] and len(harness.adapter.objective) == 0


def test_a_non_finite_start_is_reported_with_its_batches_and_the_parameters_untouched():
    harness = Harness(batches_per_step=None, poison=True)
    before = [p.detach().clone() for p in harness.model.parameters()]
    harness.epoch()
    (result,) = harness.results
    assert result.non_finite is not None and "not finite where the step starts" in result.non_finite
    assert result.non_finite_batches == [0, 1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(before, harness.model.parameters()))


def test_state_dict_carries_the_step_count_and_the_wrapped_state():
    harness = Harness(batches_per_step=2)
    harness.epoch()
    state = harness.adapter.state_dict()
    # The qualified class name: classes of the same name (the package's LBFGS, torch's) are told apart on resume.
    assert state["macro_batch"] == {
        "steps": 2,
        "optimizer": "lightning_twophase.optim.conjugate_gradient.ConjugateGradient",
    }
    other = Harness(batches_per_step=2)
    other.adapter.load_state_dict(state)
    assert other.adapter.steps == 2 and other.adapter.objective.iteration == 2
    assert other.cg.totals == harness.cg.totals
    assert other.adapter.param_groups is other.cg.param_groups  # still shared after torch replaced them


def test_step_needs_the_loops_closure():
    with pytest.raises(RuntimeError, match="closure"):
        Harness(batches_per_step=None).adapter.step()


def test_options_asked_for_now_win_over_the_checkpoints_and_are_announced():
    harness = Harness(batches_per_step=2)
    harness.epoch()
    state = harness.adapter.state_dict()
    other = Harness(batches_per_step=2)
    other.cg.param_groups[0]["line_search"] = other.cg.defaults["line_search"] = "golden"
    warnings: list[str] = []
    other.adapter._warn = warnings.append
    other.adapter.load_state_dict(state)
    assert other.cg.param_groups[0]["line_search"] == "golden"
    assert other.cg.totals == harness.cg.totals  # the state itself was loaded
    (warning,) = warnings
    assert "line_search 'brent' -> 'golden'" in warning


def test_a_checkpoint_of_another_optimizer_is_not_loaded_into_this_one():
    harness = Harness(batches_per_step=2)
    harness.epoch()
    state = harness.adapter.state_dict()
    state["macro_batch"]["optimizer"] = "LBFGS"
    other = Harness(batches_per_step=2)
    warnings: list[str] = []
    other.adapter._warn = warnings.append
    other.adapter.load_state_dict(state)
    assert other.cg.totals["iterations"] == 0 and "LBFGS" in warnings[0] and "afresh" in warnings[0]


def test_a_checkpoint_of_a_class_of_the_same_name_is_not_loaded_but_one_of_version_0_3_is():
    harness = Harness(batches_per_step=2)
    harness.epoch()
    state = harness.adapter.state_dict()
    state["macro_batch"]["optimizer"] = "somewhere.else.ConjugateGradient"
    other = Harness(batches_per_step=2)
    warnings: list[str] = []
    other.adapter._warn = warnings.append
    other.adapter.load_state_dict(state)
    assert other.cg.totals["iterations"] == 0 and "somewhere.else.ConjugateGradient" in warnings[0]
    # Version 0.3 wrote the class name alone: its own class's state still loads.
    state["macro_batch"]["optimizer"] = "ConjugateGradient"
    old = Harness(batches_per_step=2)
    old.adapter._warn = warnings.append
    old.adapter.load_state_dict(state)
    assert old.cg.totals == harness.cg.totals and len(warnings) == 1


def test_parameters_added_after_the_swap_join_the_macro_batch_gradient():
    harness = Harness(batches_per_step=None)
    extra = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    base_loss = harness.loss
    harness.loss = lambda batch, batch_idx: base_loss(batch, batch_idx) + (extra - 1.0).pow(2).sum()
    harness.adapter.objective.loss_fn = harness.loss
    told: list[list[torch.Tensor]] = []
    harness.adapter._on_params_added = told.append
    harness.adapter.add_param_group({"params": [extra], "lr": 0.123})
    assert told == [[extra]] and len(harness.cg.param_groups) == 2
    assert harness.cg.param_groups[1]["lr"] == harness.cg.defaults["lr"]  # CG's options are global
    harness.epoch()
    (result,) = harness.results
    # The start gradient of the new parameter is the exact one, 2 (extra - 1) = -2: its norm enters the step's.
    assert result.diagnostics is not None and result.diagnostics.grad_norm >= 2.0
    assert float(extra) > 0.0  # and CG moved it towards 1


class Overshooting(torch.optim.SGD):
    """A closure optimizer that steps into inf: the adapter must undo it, as ConjugateGradient never does it."""

    def step(self, closure=None):  # type: ignore[override]
        closure()
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(math.inf)


def test_any_optimizers_step_reports_the_start_and_a_step_into_inf_is_undone():
    harness = Harness(batches_per_step=None, optimizer=lambda params: Overshooting(params, lr=0.1))
    before = [p.detach().clone() for p in harness.model.parameters()]
    start = harness.full_loss()
    harness.epoch()
    (result,) = harness.results
    assert result.loss == pytest.approx(start, rel=1e-12) and result.grad_norm > 0
    assert result.failed and result.diagnostics is None and result.non_finite is None
    assert all(torch.equal(a, b) for a, b in zip(before, harness.model.parameters()))
