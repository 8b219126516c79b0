"""The full-batch and macro-batch CG phase: the exact objective, forward-only trials, caching, and convergence."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_twophase import LBFGS, ConjugateGradient, ConvexitySwapCallback, FallbackPolicy, Reason
from tests.conftest import TinyClassifier, blobs, fit, swap_at, trainer_kwargs


class LogisticRegression(pl.LightningModule):
    """L2-regularised logistic regression: strictly convex, with a unique optimum scipy can find exactly."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.linear = nn.Linear(20, 1)
        self.lr = lr
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(500, 20, generator=generator, dtype=torch.float64)
        weights = torch.randn(20, generator=generator, dtype=torch.float64)
        self.labels = (torch.sigmoid(self.inputs @ weights) > torch.rand(500, generator=generator)).double()

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.linear(inputs).squeeze(1)
        penalty = 1e-2 * self.linear.weight.pow(2).sum()
        return nn.functional.binary_cross_entropy_with_logits(logits, labels) + penalty

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss(*batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.inputs, self.labels), batch_size=64)  # the last batch is short: 52

    def full_loss(self) -> float:
        with torch.no_grad():
            return float(self.loss(self.inputs, self.labels))


class LogisticRegressionMLP(LogisticRegression):
    """The same data through two linear layers, so that the first can be frozen and unfrozen."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 1))
        del self.linear

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(self.net(inputs).squeeze(1), labels)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=self.lr)


def scipy_optimum() -> float:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    model = LogisticRegression().double()

    def fun(values):
        torch.nn.utils.vector_to_parameters(torch.tensor(values), model.parameters())
        model.zero_grad()
        loss = model.loss(model.inputs, model.labels)
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        return float(loss.detach()), grad.numpy()

    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    result = scipy_optimize.minimize(fun, start, jac=True, method="BFGS", options={"gtol": 1e-12})
    return float(result.fun)


def epochs_to_reach(model: LogisticRegression, callback: pl.Callback | None, target: float, epochs: int) -> int | None:
    reached: list[int] = []

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if not reached and pl_module.full_loss() <= target:
                reached.append(trainer.current_epoch + 1)

    callbacks = [Watch()] if callback is None else [callback, Watch()]
    pl.Trainer(callbacks=callbacks, **trainer_kwargs(max_epochs=epochs, precision="64-true")).fit(model)
    return reached[0] if reached else None


def test_full_batch_cg_reaches_the_optimum_in_far_fewer_epochs_than_adam():
    optimum = scipy_optimum()
    target = optimum * (1 + 1e-6)
    cg_epochs = epochs_to_reach(LogisticRegression(), swap_at(1), target, 40)
    adam_epochs = epochs_to_reach(LogisticRegression(), None, target, 400)
    assert cg_epochs is not None and cg_epochs <= 30
    assert adam_epochs is None or adam_epochs >= 10 * cg_epochs, (cg_epochs, adam_epochs)


class DriftingLogisticRegression(LogisticRegression):
    """The training loss drifts up by a constant every epoch, without changing its gradient."""

    def __init__(self, drift: float) -> None:
        super().__init__()
        self.drift = drift

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + self.drift * self.current_epoch


@pytest.mark.parametrize(
    ("drift", "phase"),
    [
        (1e-9, "second"),  # below float32 rounding of this loss: a converged CG phase must carry on
        (1e-2, "fallback"),  # a real, sustained rise
    ],
)
@pytest.mark.parametrize("second", ["lbfgs", "cg"])
def test_only_a_real_rise_of_the_loss_sends_the_cg_phase_back_to_the_first_optimizer(drift, phase, second):
    # The loss-window rule alone (the progress guard would see the drift first).
    callback = swap_at(1, optimizer=second, fallback=FallbackPolicy(loss_window=5, progress_window=None))
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=30, precision="64-true"))
    if phase == "fallback":
        with pytest.warns(UserWarning, match="the training loss rose over 5 CG checks"):
            trainer.fit(DriftingLogisticRegression(drift))
    else:
        trainer.fit(DriftingLogisticRegression(drift))
    assert callback.phase == phase
    if phase == "second":
        assert callback.fallback_decision is None
        assert isinstance(trainer.optimizers[0].optimizer, LBFGS if second == "lbfgs" else ConjugateGradient)
    else:
        assert callback.fallback_decision.reason is Reason.LOSS_ROSE
        assert isinstance(trainer.optimizers[0], torch.optim.Adam)


def test_any_closure_optimizer_can_be_the_second_phase():
    """optimizer=<factory>: full-batch L-BFGS through the same macro-batch machinery (no value closure needed)."""

    def lbfgs(groups):
        return torch.optim.LBFGS(groups, max_iter=1, history_size=10, line_search_fn="strong_wolfe")

    target = scipy_optimum() * (1 + 1e-6)
    callback = swap_at(1, optimizer=lbfgs)
    epochs = epochs_to_reach(LogisticRegression(), callback, target, 40)
    assert epochs is not None and epochs <= 30


class SpyConjugateGradient(ConjugateGradient):
    """Records what each step starts from: the closure's gradient norm and two value evaluations at the start."""

    records: ClassVar[list[dict[str, float]]] = []

    def step(self, closure=None, value_closure=None):  # type: ignore[override]
        start_loss = float(closure())
        grad = torch.cat([p.grad.reshape(-1) for group in self.param_groups for p in group["params"]])
        SpyConjugateGradient.records.append(
            {
                "start_loss": start_loss,
                "grad_norm": float(grad.norm()),
                "value_1": float(value_closure()),
                "value_2": float(value_closure()),
            }
        )
        return super().step(closure, value_closure)


def spy_factory(groups: list[dict[str, Any]]) -> ConjugateGradient:
    return SpyConjugateGradient(groups, line_search="brent")


def exact_gradient_norm(model: pl.LightningModule, dataset: TensorDataset) -> float:
    model.zero_grad()
    inputs, labels = dataset.tensors
    loss = model.training_step((inputs, labels), 0)
    loss.backward()
    return float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())


class FirstOptimizer(pl.Callback):
    """The optimizer of ``configure_optimizers``: the CG phase keeps it (for the fallback) after the swap."""

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None

    def on_train_start(self, trainer, pl_module):
        self.optimizer = trainer.optimizers[0]


class StartWeights(pl.Callback):
    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.by_epoch[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_the_start_gradient_is_the_exact_size_weighted_mean_over_the_epoch():
    SpyConjugateGradient.records = []
    model = LogisticRegression()
    starts = StartWeights()
    callback = swap_at(1, optimizer=spy_factory)
    pl.Trainer(callbacks=[callback, starts], **trainer_kwargs(max_epochs=3, precision="64-true")).fit(model)
    dataset = TensorDataset(model.inputs, model.labels)
    for epoch, record in zip((1, 2), SpyConjugateGradient.records):
        reference = LogisticRegression().double()
        reference.load_state_dict(starts.by_epoch[epoch])
        assert record["grad_norm"] == pytest.approx(exact_gradient_norm(reference, dataset), rel=1e-12)
        assert record["start_loss"] == pytest.approx(reference.full_loss(), rel=1e-12)


class NoisyClassifier(TinyClassifier):
    """Random input noise inside training_step, as augmentation or dropout would add."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        noisy = inputs + 0.3 * torch.randn_like(inputs)
        return nn.functional.cross_entropy(self(noisy), labels)


def test_randomness_repeats_at_every_trial_point_of_an_iteration():
    SpyConjugateGradient.records = []
    callback = swap_at(1, optimizer=spy_factory)
    pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=4)).fit(NoisyClassifier())
    assert len(SpyConjugateGradient.records) == 3
    for record in SpyConjugateGradient.records:
        # The training loop's own pass and two re-evaluations at the same point see the same noise.
        assert record["value_1"] == record["value_2"] == pytest.approx(record["start_loss"], rel=1e-6)


@pytest.mark.parametrize(("batches_per_iteration", "iterations_per_epoch"), [(2, 4), (3, 3), (1, 8), (None, 1)])
def test_macro_batches_of_k_batches(batches_per_iteration, iterations_per_epoch):
    # Conjugate gradient: one iteration per step, so its count is the number of macro-batches.
    callback = swap_at(1, batches_per_iteration=batches_per_iteration, optimizer="cg")
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=3))
    with pytest.warns(UserWarning, match="single mini-batches") if batches_per_iteration == 1 else _nothing():
        trainer.fit(TinyClassifier(samples=240, batch_size=30))  # 8 batches per epoch
    assert trainer.optimizers[0].optimizer.totals["iterations"] == 2 * iterations_per_epoch


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


def test_value_only_line_search_runs_no_extra_backward_pass():
    callback = swap_at(1, optimizer={"name": "cg", "line_search": "golden"})
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=4))
    trainer.fit(TinyClassifier())
    totals = trainer.optimizers[0].optimizer.totals
    # One gradient per iteration (the training loop's own pass); every trial point was forward-only.
    assert totals["gradient_evaluations"] == totals["iterations"] == 3
    assert totals["value_evaluations"] > totals["iterations"]


def test_batches_beyond_the_device_cache_bound_give_the_same_result():
    # A model whose trial evaluations go batch by batch (its noise differs in one chunk), so that both runs evaluate
    # the same batches the same way: only where the batches wait differs (with no cache they all wait on the host).
    weights, decided = [], []
    for max_cached_bytes in (0, 2**30):
        model = NoisyClassifier()
        callback = swap_at(1, max_cached_bytes=max_cached_bytes)
        fit(model, callback, max_epochs=3)
        weights.append([p.detach().clone() for p in model.parameters()])
        decided.append(callback.state_dict()["trial_batching"])
    assert decided[1] == "batches"
    for a, b in zip(*weights):
        assert torch.equal(a, b)


class ShowsProgress(pl.Callback):
    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.counts.append(trainer.progress_bar_callback.train_progress_bar.n)


def test_progress_bar_and_validation_keep_running_in_the_cg_phase():
    progress = ShowsProgress()
    callback = swap_at(1)
    trainer = pl.Trainer(callbacks=[callback, progress], **trainer_kwargs(max_epochs=3, enable_progress_bar=True))
    trainer.fit(TinyClassifier())
    assert progress.counts == [trainer.num_training_batches] * 3
    assert "val_loss" in trainer.callback_metrics


def test_training_set_of_unknown_length_needs_a_macro_batch():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(blobs())

    class StreamClassifier(TinyClassifier):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(Stream(), batch_size=32)

    trainer = pl.Trainer(callbacks=[ConvexitySwapCallback()], **trainer_kwargs(max_epochs=2))
    with pytest.raises(MisconfigurationException, match="known length"):
        trainer.fit(StreamClassifier())
    assert trainer.global_step == 0
    callback = swap_at(1, batches_per_iteration=4, optimizer="cg")  # one iteration per step
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=2))
    trainer.fit(StreamClassifier())
    assert trainer.optimizers[0].optimizer.totals["iterations"] == 2  # 8 batches in the second epoch, 4 per step


# ----------------------------------------------------------------------------------------------------------------
# Epochs that end earlier than num_training_batches says
# ----------------------------------------------------------------------------------------------------------------


class Stream(torch.utils.data.IterableDataset):
    """An iterable of the blobs, of unknown length to Lightning."""

    def __init__(self, samples: int) -> None:
        self.samples = samples

    def __iter__(self):
        return iter(blobs(self.samples))


class StreamClassifier(TinyClassifier):
    def __init__(self, samples: int) -> None:
        super().__init__()
        self.stream_samples = samples

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Stream(self.stream_samples), batch_size=30)


@pytest.mark.parametrize(
    ("samples", "batches_per_iteration", "iterations_per_epoch"),
    [
        (90, 4, 1),  # 3 batches per epoch, fewer than a macro-batch: one step on all three
        (240, 3, 3),  # 8 batches: 3 + 3 + the tail of 2
    ],
)
def test_an_iterable_steps_on_the_partial_macro_batch_at_the_epochs_real_end(
    samples, batches_per_iteration, iterations_per_epoch
):
    callback = swap_at(1, batches_per_iteration=batches_per_iteration, optimizer="cg")  # one iteration per step
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=3))
    trainer.fit(StreamClassifier(samples))
    assert trainer.optimizers[0].optimizer.totals["iterations"] == 2 * iterations_per_epoch


class StopsAtBatchSix(TinyClassifier):
    """``on_train_batch_start`` returning -1 ends every epoch after six of its eight batches."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return -1 if batch_idx == 6 else None


def test_an_epoch_cut_short_by_on_train_batch_start_still_steps_on_its_batches():
    SpyConjugateGradient.records = []
    model = StopsAtBatchSix(samples=240, batch_size=30)
    callback = swap_at(1, optimizer=spy_factory)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=3))
    trainer.fit(model)
    assert trainer.optimizers[0].optimizer.totals["iterations"] == 2
    assert callback.swap_epoch == 1 and [r["phase"] for r in callback.history] == ["first", "second", "second"]


# ----------------------------------------------------------------------------------------------------------------
# A non-finite objective: never handed to a gradient method
# ----------------------------------------------------------------------------------------------------------------


class NaNFromEpoch(TinyClassifier):
    def __init__(self, nan_from_epoch: int) -> None:
        super().__init__()
        self.nan_from_epoch = nan_from_epoch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        nan = self.current_epoch >= self.nan_from_epoch and batch_idx in (2, 5)
        return loss * math.nan if nan else loss


def test_a_persistent_nan_stops_training_with_the_weights_intact_even_with_the_fallback_on():
    from lightning_twophase import NonFiniteObjectiveError

    model = NaNFromEpoch(nan_from_epoch=2)
    before: dict[str, torch.Tensor] = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    callback = swap_at(1, fallback=True)
    trainer = pl.Trainer(callbacks=[callback, Snapshot()], **trainer_kwargs(max_epochs=4))
    with pytest.raises(NonFiniteObjectiveError, match=r"batches \[2, 5\] of epoch 2"):
        trainer.fit(model)
    assert trainer.current_epoch == 2
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(value, before[name]), name


# ----------------------------------------------------------------------------------------------------------------
# Parameters added after the swap (BaseFinetuning)
# ----------------------------------------------------------------------------------------------------------------


class UnfreezeAtEpoch2(pl.callbacks.BaseFinetuning):
    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == 2:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer)


def test_parameters_unfrozen_after_the_swap_join_the_cg_phase_with_their_exact_gradient():
    SpyConjugateGradient.records = []
    model = LogisticRegressionMLP()
    starts, first = StartWeights(), FirstOptimizer()
    callback = swap_at(1, optimizer=spy_factory)
    trainer = pl.Trainer(
        callbacks=[UnfreezeAtEpoch2(), callback, starts, first], **trainer_kwargs(max_epochs=4, precision="64-true")
    )
    trainer.fit(model)
    cg = trainer.optimizers[0].optimizer
    assert len(cg.param_groups) == 2 and cg.totals["iterations"] == 3
    dataset = TensorDataset(model.inputs, model.labels)
    for epoch, record in zip((2, 3), SpyConjugateGradient.records[1:]):
        reference = LogisticRegressionMLP().double()
        reference.load_state_dict(starts.by_epoch[epoch])
        # The start gradient covers the unfrozen layer too: the exact full-batch gradient of every parameter.
        assert record["grad_norm"] == pytest.approx(exact_gradient_norm(reference, dataset), rel=1e-10)
    assert isinstance(first.optimizer, torch.optim.Adam)
    assert len(first.optimizer.param_groups) == 2  # the fallback's Adam knows the new group


# ----------------------------------------------------------------------------------------------------------------
# Randomness and side effects of training_step at trial points
# ----------------------------------------------------------------------------------------------------------------


class NumpyAndRandomNoise(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        import random

        import numpy as np

        inputs, labels = batch
        scale = float(np.random.uniform(0.5, 1.5)) * random.uniform(0.5, 1.5)
        return nn.functional.cross_entropy(self(inputs * scale), labels)


def test_numpy_and_python_random_repeat_at_every_trial_point():
    SpyConjugateGradient.records = []
    callback = swap_at(1, optimizer=spy_factory)
    pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=3)).fit(NumpyAndRandomNoise())
    assert len(SpyConjugateGradient.records) == 2
    for record in SpyConjugateGradient.records:
        assert record["value_1"] == record["value_2"] == pytest.approx(record["start_loss"], rel=1e-6)


TRIAL_FLAGS: list[bool] = []


class KeepsOutputsAndState(TinyClassifier):
    """Keeps its outputs as Lightning recommends, and carries a state from one step to the next (an RNN's hidden)."""

    def __init__(self) -> None:
        super().__init__()
        self.training_step_outputs: list[torch.Tensor] = []
        self.carried = torch.zeros(3)
        self.outputs_per_epoch: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from lightning_twophase import is_trial_evaluation

        TRIAL_FLAGS.append(is_trial_evaluation())  # outside the module: its own lists are restored after trials
        inputs, labels = batch
        logits = self(inputs) + self.carried
        self.carried = logits.detach().mean(dim=0)
        loss = nn.functional.cross_entropy(logits, labels)
        self.training_step_outputs.append(loss.detach())
        return loss

    def on_train_epoch_end(self) -> None:
        self.outputs_per_epoch.append(len(self.training_step_outputs))
        self.training_step_outputs.clear()


def test_trial_evaluations_leave_the_modules_attributes_as_the_loop_left_them():
    SpyConjugateGradient.records = []
    TRIAL_FLAGS.clear()
    model = KeepsOutputsAndState()
    callback = swap_at(1, optimizer=spy_factory)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=3))
    trainer.fit(model)
    batches = trainer.num_training_batches
    assert model.outputs_per_epoch == [batches] * 3
    # Each trial evaluation of a batch sees the carried state the loop's pass of that batch saw: a fixed function.
    for record in SpyConjugateGradient.records:
        assert record["value_1"] == record["value_2"] == pytest.approx(record["start_loss"], rel=1e-6)
    # The loop's own passes are training steps; the line search's evaluations are trial evaluations.
    assert TRIAL_FLAGS[: 2 * batches].count(True) == 0 and TRIAL_FLAGS.count(True) > 0


# ----------------------------------------------------------------------------------------------------------------
# Models that do more than compute a loss, through the default callback's first phase and its CG phase
# ----------------------------------------------------------------------------------------------------------------


class CarriedGRU(pl.LightningModule):
    """A GRU whose hidden state is carried from one step to the next, sized for the batches of 32 it trains on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gru = nn.GRU(4, 16, batch_first=True)
        self.head = nn.Linear(16, 1)
        self.hidden = torch.zeros(1, 32, 16)
        generator = torch.Generator().manual_seed(0)
        self.sequences = torch.randn(128, 3, 4, generator=generator)
        self.targets = 0.1 * self.sequences.sum(dim=(1, 2)).unsqueeze(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        output, hidden = self.gru(inputs, self.hidden)
        self.hidden = hidden.detach()
        return nn.functional.mse_loss(self.head(output[:, -1]), targets)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.sequences, self.targets), batch_size=32)


class CheckpointedClassifier(TinyClassifier):
    """A block under activation checkpointing; the reentrant kind supports backward() but not torch.autograd.grad."""

    def __init__(self, reentrant: bool = True) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.reentrant = reentrant

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.net[1](self.net[0](inputs))
        hidden = torch.utils.checkpoint.checkpoint(self.block, hidden, use_reentrant=self.reentrant)
        return self.net[2](hidden)


class AverageMeter:
    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def update(self, value: float, n: int) -> None:
        self.sum += value * n
        self.count += n


class Tracker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.summary = torch.zeros(3)


class KeepsNestedState(TinyClassifier):
    """State beyond the module's top-level attributes: a child module's counter and carried summary (both part of the
    loss), a dict of lists, an average meter, a numpy array and a deque, all changed in place. ``guarded`` skips the
    changes at trial points (``is_trial_evaluation``): what the callback must give without being told."""

    def __init__(self, guarded: bool = False) -> None:
        super().__init__()
        self.guarded = guarded
        self.tracker = Tracker()
        self.by_key: dict[str, list[float]] = {"loss": [], "size": []}
        self.meter = AverageMeter()
        self.histogram = np.zeros(3)
        self.recent: deque[int] = deque(maxlen=4)
        self.per_epoch: list[tuple] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from lightning_twophase import is_trial_evaluation

        inputs, labels = batch
        logits = self(inputs) + self.tracker.summary * (1 + 0.1 * (self.tracker.count % 3))
        loss = nn.functional.cross_entropy(logits, labels)
        if not (self.guarded and is_trial_evaluation()):
            self.tracker.count += 1
            self.tracker.summary.mul_(0.9).add_(0.1 * logits.detach().mean(dim=0))
            self.by_key["loss"].append(float(loss))
            self.by_key["size"].append(len(inputs))
            self.meter.update(float(loss), len(inputs))
            self.histogram += np.bincount(labels.numpy(), minlength=3)
            self.recent.append(batch_idx)
        return loss

    def on_train_epoch_end(self) -> None:
        mean = self.meter.sum / self.meter.count
        self.per_epoch.append((mean, len(self.by_key["loss"]), self.histogram.tolist(), list(self.recent)))
        self.meter.sum, self.meter.count = 0.0, 0
        for values in self.by_key.values():
            values.clear()

    def state(self) -> tuple:
        return self.per_epoch, self.tracker.count, self.tracker.summary.tolist()


def lbfgs(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(groups, max_iter=1, history_size=10, line_search_fn="strong_wolfe")


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        (CarriedGRU, {}),
        (CheckpointedClassifier, {}),
        (KeepsNestedState, {}),
        (TinyClassifier, {"optimizer": lbfgs}),
    ],
    ids=["carried-rnn-state", "reentrant-checkpointing", "nested-module-state", "lbfgs-factory"],
)
def test_the_default_callback_swaps_and_runs_the_cg_phase_on_models_that_do_more(model, kwargs):
    # The default rule (the plateau detector) watches the first phase; swap_epoch=4 bounds it: two CG epochs.
    callback = ConvexitySwapCallback(swap_epoch=4, **kwargs)
    fit(model(), callback, max_epochs=6)
    assert callback.swap_epoch == 4 and callback.phase == "second"
    cg_checks = [record for record in callback.history if record["phase"] == "second"]
    assert len(cg_checks) == 2 and all(math.isfinite(record["loss"]) for record in cg_checks)


def test_a_carried_rnn_state_evaluates_batch_by_batch_with_the_loops_numbers():
    SpyConjugateGradient.records = []
    model = CarriedGRU()
    callback = swap_at(1, optimizer=spy_factory)
    fit(model, callback, max_epochs=3)
    assert callback.phase == "second"
    # The one chunk failed (a hidden state for 32 sequences, a chunk of 128): batch by batch, decided once.
    assert callback.state_dict()["trial_batching"] == "batches"
    assert len(SpyConjugateGradient.records) == 2
    for record in SpyConjugateGradient.records:
        # The failed chunk left no trace: every evaluation at the start is the loop's own loss.
        assert record["value_1"] == record["value_2"] == pytest.approx(record["start_loss"], rel=1e-6)


@pytest.mark.parametrize(
    "optimizer",
    # L-BFGS (the default) and CG with a search that takes a gradient at every trial point, as L-BFGS's does.
    ["lbfgs", {"name": "cg", "line_search": "strong_wolfe"}],
    ids=["lbfgs", "cg-strong-wolfe"],
)
def test_reentrant_checkpointing_in_the_cg_phase_gets_the_numbers_of_the_non_reentrant_kind(optimizer):
    results = []
    for reentrant in (True, False):
        model = CheckpointedClassifier(reentrant)
        callback = swap_at(1, optimizer=optimizer)
        pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=3)).fit(model)
        results.append((weights(model), callback.history))
        assert callback.phase == "second"
    (reentrant, history), (plain, plain_history) = results
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in plain_history], rel=1e-6)
    for a, b in zip(reentrant, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nested_module_state_changed_at_trial_points_is_put_back():
    epochs = 3
    results = []
    for guarded in (False, True):
        model = KeepsNestedState(guarded)
        callback = swap_at(1)
        fit(model, callback, max_epochs=epochs)
        assert callback.phase == "second"
        results.append((weights(model), model.state()))
    (unguarded, state), (guarded, guarded_state) = results
    # Without being told, the run is the one of a model that skips its changes at trial points.
    assert state == guarded_state
    assert all(torch.equal(a, b) for a, b in zip(unguarded, guarded))
    batches = 8  # 240 samples in batches of 32
    assert [entry[1] for entry in state[0]] == [batches] * epochs


def test_an_optimizer_factorys_steps_are_checked_and_fall_back_on_a_rising_loss():
    """optimizer=<factory> (L-BFGS): history, the loss and the fallback rules work as for conjugate gradient."""
    callback = swap_at(1, optimizer=lbfgs, fallback=FallbackPolicy(loss_window=5, progress_window=None))
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=12, precision="64-true"))
    with pytest.warns(UserWarning, match="the training loss rose over 5 CG checks"):
        trainer.fit(DriftingLogisticRegression(1e-2))
    phases = [record["phase"] for record in callback.history]
    assert phases[0] == "first" and phases.count("second") > 5 and callback.phase == "fallback"
    assert callback.fallback_decision.reason is Reason.LOSS_ROSE
    cg = [record for record in callback.history if record["phase"] == "second"]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in cg)
    assert [r["compute"] for r in cg] == sorted(r["compute"] for r in cg) and cg[0]["compute"] > 0
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)


def test_an_optimizer_factory_never_steps_from_a_non_finite_start():
    from lightning_twophase import NonFiniteObjectiveError

    model = NaNFromEpoch(nan_from_epoch=2)
    before: dict[str, torch.Tensor] = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    callback = swap_at(1, optimizer=lbfgs)
    trainer = pl.Trainer(callbacks=[callback, Snapshot()], **trainer_kwargs(max_epochs=4))
    with pytest.raises(NonFiniteObjectiveError, match=r"batches \[2, 5\] of epoch 2"):
        trainer.fit(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


# ----------------------------------------------------------------------------------------------------------------
# What the second phase trains, and from which gradient (issue 28): for the default CG phase and for any optimizer
# ----------------------------------------------------------------------------------------------------------------

#: The second phases these tests run: the default, CG with its strong Wolfe search, and a factory's L-BFGS.
SECOND_PHASES = {
    "default": None,
    "strong-wolfe": {"name": "cg", "line_search": "strong_wolfe"},
    "lbfgs": lambda groups: torch.optim.LBFGS(groups, line_search_fn="strong_wolfe"),
}


def exact_gradient_norm_over(model: pl.LightningModule, dataset: TensorDataset, names: set[str]) -> float:
    """The norm of the full training set's mean gradient with respect to the parameters ``names``."""
    params = [p for name, p in model.named_parameters() if name in names]
    inputs, labels = dataset.tensors
    loss = model.training_step((inputs, labels), 0)
    return float(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).norm())


class AllParametersMLP(LogisticRegressionMLP):
    """Every parameter is in the optimizer from the start, whether it requires grad or not."""

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class SwitchRequiresGrad(pl.Callback):
    """``net.0`` requires grad from epoch 2 on, ``net.2`` until epoch 2: switched after the swap (at epoch 1)."""

    @staticmethod
    def trainable(epoch: int) -> set[str]:
        return {f"net.{layer}.{kind}" for layer in ((2,) if epoch < 2 else (0,) if epoch > 2 else (0, 2))
                for kind in ("weight", "bias")}  # fmt: skip

    def setup(self, trainer, pl_module, stage):
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        names = self.trainable(trainer.current_epoch)
        for name, p in pl_module.named_parameters():
            p.requires_grad_(name in names)


@pytest.mark.parametrize("second_phase", list(SECOND_PHASES))
def test_the_second_phase_trains_exactly_the_parameters_that_require_grad_at_each_iteration(second_phase):
    model = AllParametersMLP()
    starts = StartWeights()
    callback = swap_at(1, optimizer=SECOND_PHASES[second_phase])
    trainer = pl.Trainer(
        callbacks=[SwitchRequiresGrad(), callback, starts], **trainer_kwargs(max_epochs=5, precision="64-true")
    )
    trainer.fit(model)  # with the strong Wolfe search this crashed once net.0 required grad
    final = {k: v.clone() for k, v in model.state_dict().items()}
    cg_checks = [record for record in callback.history if record["phase"] == "second"]
    assert len(cg_checks) == 4
    dataset = TensorDataset(model.inputs, model.labels)
    for epoch, record in zip(range(1, 5), cg_checks):
        reference = AllParametersMLP().double()
        reference.load_state_dict(starts.by_epoch[epoch])
        # Each iteration starts from the exact gradient of the parameters that require grad then (net.0's included
        # from epoch 2, although it was frozen when the phase was built).
        expected = exact_gradient_norm_over(reference, dataset, SwitchRequiresGrad.trainable(epoch))
        assert record["grad_norm"] == pytest.approx(expected, rel=1e-8), epoch
    ends = {**{epoch - 1: weights for epoch, weights in starts.by_epoch.items() if epoch > 0}, 4: final}
    for epoch in range(1, 5):
        for name, value in starts.by_epoch[epoch].items():
            moved = not torch.equal(ends[epoch][name], value)
            # A frozen parameter does not move (net.2 from epoch 3, though the direction had trained it); others do.
            assert moved == (name in SwitchRequiresGrad.trainable(epoch)), (epoch, name)


class ClipsInItsHook(LogisticRegression):
    """Clips its gradients itself, in configure_gradient_clipping (Lightning calls it whatever gradient_clip_val)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1e-3)


class ClipsBeforeTheStep(LogisticRegression):
    """Clips its gradients itself, in on_before_optimizer_step."""

    def on_before_optimizer_step(self, optimizer):
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1e-3)


@pytest.mark.parametrize("second_phase", ["default", "lbfgs"])
@pytest.mark.parametrize("module", [ClipsInItsHook, ClipsBeforeTheStep])
def test_the_modules_own_clipping_does_not_change_the_gradient_the_second_phase_starts_from(module, second_phase):
    model = module()
    starts = StartWeights()
    callback = swap_at(1, optimizer=SECOND_PHASES[second_phase])
    pl.Trainer(callbacks=[callback, starts], **trainer_kwargs(max_epochs=3, precision="64-true")).fit(model)
    cg_checks = [record for record in callback.history if record["phase"] == "second"]
    dataset = TensorDataset(model.inputs, model.labels)
    for epoch, record in zip((1, 2), cg_checks):
        reference = LogisticRegression().double()
        reference.load_state_dict(starts.by_epoch[epoch])
        # The exact, unclipped full-batch gradient (each batch's was clipped to norm 1e-3 by the module).
        assert record["grad_norm"] == pytest.approx(exact_gradient_norm(reference, dataset), rel=1e-10)
    assert cg_checks[0]["grad_norm"] > 1e-2  # far above what clipping each batch to 1e-3 leaves


# ----------------------------------------------------------------------------------------------------------------
# The first optimizer's parameter-group options at the swap (issue 28)
# ----------------------------------------------------------------------------------------------------------------


class FrozenByLearningRate(TinyClassifier):
    """The first layer is in its own group with lr=0: trained by nothing."""

    def configure_optimizers(self) -> Any:
        groups = [{"params": self.net[0].parameters(), "lr": 0.0}, {"params": self.net[2].parameters()}]
        return torch.optim.Adam(groups, lr=self.lr)


def test_a_group_with_learning_rate_zero_does_not_move_in_the_second_phase():
    model = FrozenByLearningRate()
    starts = StartWeights()
    fit(model, swap_at(1), starts, max_epochs=3)
    for name, value in model.state_dict().items():
        assert torch.equal(value, starts.by_epoch[0][name]) == name.startswith("net.0"), name


class DecayedLogisticRegression(LogisticRegression):
    """Logistic regression without its own penalty, regularised by the first optimizer's weight decay instead."""

    def __init__(self, optimizer: type[torch.optim.Optimizer], weight_decay: float) -> None:
        super().__init__(lr=0.05)
        self.optimizer_class, self.weight_decay = optimizer, weight_decay

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(self.linear(inputs).squeeze(1), labels)

    def configure_optimizers(self) -> Any:
        return self.optimizer_class(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@pytest.mark.parametrize(
    ("optimizer", "second_phase"),
    [(torch.optim.Adam, "default"), (torch.optim.AdamW, "default"), (torch.optim.AdamW, "lbfgs")],
)
def test_the_first_optimizers_weight_decay_is_part_of_the_second_phases_objective(optimizer, second_phase):
    """Adam's (coupled, L2) decay: the second phase ends where ``g + wd w = 0``; AdamW's (decoupled): where AdamW's
    steps would stop, ``g + wd (sqrt(v_hat) + eps) w = 0`` with AdamW's second moments at the swap."""
    weight_decay = 0.05 if optimizer is torch.optim.Adam else 1.0
    model = DecayedLogisticRegression(optimizer, weight_decay)
    first = FirstOptimizer()
    # The progress guard would call a converged run slow.
    callback = swap_at(3, optimizer=SECOND_PHASES[second_phase], fallback=FallbackPolicy(progress_window=None))
    pl.Trainer(callbacks=[callback, first], **trainer_kwargs(max_epochs=25, precision="64-true")).fit(model)
    assert callback.phase == "second"
    model.zero_grad()
    model.loss(model.inputs, model.labels).backward()
    residuals, decays = [], []
    for group in first.optimizer.param_groups:
        for p in group["params"]:
            coefficient = torch.full_like(p, weight_decay)
            if optimizer is torch.optim.AdamW:
                state = first.optimizer.state[p]  # as at the swap: the first optimizer has not stepped since
                v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
                coefficient = weight_decay * (v_hat.sqrt() + group["eps"])
            decays.append((coefficient * p.detach()).reshape(-1))
            residuals.append((p.grad + coefficient * p.detach()).reshape(-1))
    residual, decay = float(torch.cat(residuals).norm()), float(torch.cat(decays).norm())
    assert decay > 1e-3  # the decay is no rounding error at this point
    assert residual < 1e-3 * decay, (residual, decay)  # and the second phase reached the decayed problem's optimum


class UnknownDecay(torch.optim.Optimizer):
    """A first optimizer with a weight_decay option of unknown kind (plain gradient descent underneath)."""

    def __init__(self, params: Any, lr: float = 0.05, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad + group["weight_decay"] * p, alpha=-group["lr"])
        return loss


def test_a_weight_decay_the_second_phase_cannot_express_is_named_at_the_swap():
    model = DecayedLogisticRegression(UnknownDecay, 0.01)
    with pytest.warns(UserWarning, match=r"UnknownDecay's weight_decay=0.01 of parameter group 0 is left out"):
        fit(model, swap_at(1, optimizer={"preconditioner": "none"}), max_epochs=2, precision="64-true")


# The contract of trial evaluations: each kept batch as the loop's pass of that batch saw it
# ----------------------------------------------------------------------------------------------------------------


class ChangesItsBatch(TinyClassifier):
    """Rescales its inputs in the batch it is given: in place (a tensor batch), or by replacing an entry of a dict
    batch."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def train_dataloader(self) -> DataLoader:
        data = blobs(self.samples, self.features, self.classes)
        if self.how == "in-place":
            return DataLoader(data, batch_size=self.batch_size)
        pairs = [{"x": x, "y": y} for x, y in data]
        return DataLoader(pairs, batch_size=self.batch_size)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.how == "in-place":
            inputs, labels = batch
            inputs.div_(2)
        else:
            batch["x"] = batch["x"] / 2
            inputs, labels = batch["x"], batch["y"]
        return nn.functional.cross_entropy(self(inputs), labels)


@pytest.mark.parametrize("how", ["in-place", "dict-entry"])
def test_trial_evaluations_see_the_batch_as_the_loops_pass_saw_it(how):
    SpyConjugateGradient.records = []
    callback = swap_at(1, optimizer=spy_factory)
    trainer = fit(ChangesItsBatch(how), callback, max_epochs=4)
    assert len(SpyConjugateGradient.records) == 3
    for record in SpyConjugateGradient.records:
        # Every evaluation at the start point is the loop's own loss: the batch was not halved again.
        assert record["value_1"] == pytest.approx(record["start_loss"], rel=1e-6)
        assert record["value_2"] == pytest.approx(record["start_loss"], rel=1e-6)
    assert callback.phase == "second"
    assert trainer.optimizers[0].optimizer.totals["line_search_failures"] == 0


class CarriesAState(TinyClassifier):
    """Carries a state from one step to the next that is part of the loss: in a plain attribute, or in a registered
    buffer (reassigned, or updated in place); and keeps an average of its loss in a buffer it only logs."""

    def __init__(self, where: str, guarded: bool = False) -> None:
        super().__init__()
        self.where, self.guarded = where, guarded
        if where == "attribute":
            self.carried = torch.zeros(3)
        else:
            self.register_buffer("carried", torch.zeros(3))
        self.register_buffer("average", torch.zeros(()))
        self.averages: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from lightning_twophase import is_trial_evaluation

        inputs, labels = batch
        logits = self(inputs) + self.carried
        loss = nn.functional.cross_entropy(logits, labels)
        if not (self.guarded and is_trial_evaluation()):
            if self.where == "buffer, in place":
                self.carried.mul_(0.5).add_(0.5 * logits.detach().mean(dim=0))
            else:
                self.carried = 0.5 * self.carried + 0.5 * logits.detach().mean(dim=0)
            self.average = 0.9 * self.average + 0.1 * loss.detach()
        return loss

    def on_train_epoch_end(self) -> None:
        self.averages.append(float(self.average))


@pytest.mark.parametrize("where", ["buffer", "buffer, in place"])
def test_a_state_carried_in_a_buffer_is_put_back_for_each_batch_as_in_an_attribute(where):
    results = []
    for model in (CarriesAState(where), CarriesAState("attribute"), CarriesAState(where, guarded=True)):
        SpyConjugateGradient.records = []
        fit(model, swap_at(1, optimizer=spy_factory), max_epochs=4)
        for record in SpyConjugateGradient.records:
            assert record["value_1"] == pytest.approx(record["start_loss"], rel=1e-6)
            assert record["value_2"] == pytest.approx(record["start_loss"], rel=1e-6)
        results.append((weights(model), model.averages, model.carried.clone()))
    (buffer, averages, carried), (attribute, _, attribute_carried), (guarded, guarded_averages, _) = results
    # The same run as with the state in an attribute, and as a model that skips its changes at trial points.
    for a, b, c in zip(buffer, attribute, guarded):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(carried, attribute_carried)
    assert averages == guarded_averages


class ReadOnlyTable:
    """A large read-only lookup table with its own copy protocol, which counts how often it is copied."""

    copies = 0

    def __init__(self) -> None:
        self.entries = {index: float(index) for index in range(100_000)}

    def __getstate__(self) -> dict[str, Any]:
        ReadOnlyTable.copies += 1
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def test_an_unchanged_attribute_with_its_own_copy_protocol_is_never_copied():
    ReadOnlyTable.copies = 0
    model = TinyClassifier()
    model.table = table = ReadOnlyTable()
    callback = swap_at(1)
    fit(model, callback, max_epochs=3)
    assert callback.phase == "second"
    assert ReadOnlyTable.copies == 0 and model.table is table and len(table.entries) == 100_000


class KeepsMetrics(TinyClassifier):
    """Updates torchmetrics in training_step: a running mean over a window of 12 steps (a wrapper around a mean
    metric) and a collection of two metrics sharing their states (a compute group)."""

    def __init__(self, guarded: bool = False) -> None:
        super().__init__()
        torchmetrics = pytest.importorskip("torchmetrics")
        self.guarded = guarded
        self.running = torchmetrics.aggregation.RunningMean(window=12)
        self.collection = torchmetrics.MetricCollection(
            {"mean": torchmetrics.MeanMetric(), "sum": torchmetrics.SumMetric()}
        )
        self.values: list[tuple[float, ...]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from lightning_twophase import is_trial_evaluation

        loss = super().training_step(batch, batch_idx)
        if not (self.guarded and is_trial_evaluation()):
            self.running.update(loss.detach())
            self.collection.update(loss.detach())
        return loss

    def on_train_epoch_end(self) -> None:
        collection = self.collection.compute()
        self.values.append((float(self.running.compute()), float(collection["mean"]), float(collection["sum"])))
        self.collection.reset()


def test_metric_states_are_put_back_whole_wrappers_and_counters_included():
    results = []
    for guarded in (False, True):
        model = KeepsMetrics(guarded)
        fit(model, swap_at(1), max_epochs=4)
        results.append((model.values, weights(model)))
    (values, unguarded), (guarded_values, guarded) = results
    assert values == guarded_values
    assert all(torch.equal(a, b) for a, b in zip(unguarded, guarded))


STEPS_SEEN: list[tuple[int, int, int, bool]] = []


class WarmsUpByStep(TinyClassifier):
    """A loss term weighted by a warm-up over the global step (as a KL warm-up), recording the step each evaluation
    of each batch sees."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from lightning_twophase import is_trial_evaluation

        STEPS_SEEN.append((self.current_epoch, batch_idx, self.global_step, is_trial_evaluation()))
        inputs, labels = batch
        logits = self(inputs)
        warm_up = 10 * min(1.0, self.global_step / 40)
        return nn.functional.cross_entropy(logits, labels) + warm_up * logits.pow(2).mean()


def test_trial_evaluations_see_the_global_step_of_the_batchs_loop_pass():
    SpyConjugateGradient.records = []
    STEPS_SEEN.clear()
    trainer = fit(WarmsUpByStep(), swap_at(1, optimizer=spy_factory), max_epochs=4)
    for record in SpyConjugateGradient.records:
        assert record["value_1"] == pytest.approx(record["start_loss"], rel=1e-6)
        assert record["value_2"] == pytest.approx(record["start_loss"], rel=1e-6)
    loop = {(epoch, index): step for epoch, index, step, trial in STEPS_SEEN if not trial}
    trials = [(epoch, index, step) for epoch, index, step, trial in STEPS_SEEN if trial]
    assert trials and all(step == loop[epoch, index] for epoch, index, step in trials)
    assert trainer.global_step == 4 * 8  # the loop's count goes on as it was


class CountsPrivately(TinyClassifier):
    """Changes what trial evaluations cannot put back: a private counter, and a large tensor changed in place."""

    def __init__(self) -> None:
        super().__init__()
        self._calls = 0
        self.histogram = torch.zeros(5 * 1024**2)  # 20 MiB: kept by reference

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._calls += 1
        self.histogram[batch_idx] += 1
        return super().training_step(batch, batch_idx)


def test_what_trial_evaluations_cannot_put_back_is_named_with_the_way_to_skip_it(recwarn):
    model = CountsPrivately()
    fit(model, swap_at(1), max_epochs=3)
    said = [str(w.message) for w in recwarn if "cannot put back" in str(w.message)]
    assert len(said) == 2  # once each
    assert all("is_trial_evaluation()" in message for message in said)
    assert "`_calls`" in said[0] and "`histogram`" in said[1] and "changed in place" in said[1]


def test_a_model_whose_data_is_all_put_back_gets_no_such_warning(recwarn):
    fit(KeepsMetrics(), swap_at(1), max_epochs=3)
    fit(KeepsNestedState(), swap_at(1), max_epochs=3)
    assert not [w for w in recwarn if "cannot put back" in str(w.message)]
