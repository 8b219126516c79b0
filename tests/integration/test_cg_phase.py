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
