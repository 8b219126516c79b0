"""TrainingObjective without a Trainer: the exact size-weighted mean and its gradient, offloaded batches, repeated
randomness, and trial evaluations that leave no trace."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from lightning_twophase.objective import TrainingObjective, batch_nbytes, training_step_loss


def regression_batches(sizes: tuple[int, ...] = (16, 16, 7)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 5, generator=generator), torch.randn(n, 1, generator=generator)) for n in sizes]


def objective_for(model: nn.Module, **kwargs) -> TrainingObjective:
    def loss_fn(batch, batch_idx):
        inputs, targets = batch
        return nn.functional.mse_loss(model(inputs), targets)

    return TrainingObjective(loss_fn, list(model.parameters()), model, **kwargs)


def full_batch_loss_and_grad(model: nn.Module, batches) -> tuple[float, list[torch.Tensor]]:
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    model.zero_grad()
    loss = nn.functional.mse_loss(model(inputs), targets)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def test_value_and_gradient_are_those_of_the_whole_set_despite_a_short_last_batch():
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    batches = [(x.double(), y.double()) for x, y in regression_batches()]
    objective = objective_for(model)
    for index, batch in enumerate(batches):
        assert objective.add(batch, index) == len(batch[0])
    assert (len(objective), objective.num_samples) == (3, 39)
    expected_loss, expected_grads = full_batch_loss_and_grad(model, batches)
    assert float(objective.value()) == pytest.approx(expected_loss, rel=1e-12)
    assert float(objective.value_and_gradient()) == pytest.approx(expected_loss, rel=1e-12)
    for p, expected in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0)
    assert (objective.forward_samples, objective.backward_samples) == (78, 39)


def test_the_first_closure_call_returns_the_known_start_without_evaluating():
    model = nn.Linear(5, 1)
    objective = objective_for(model)
    objective.add(regression_batches()[0], 0)
    objective.set_start(0.25)
    assert float(objective.closure()) == 0.25 and objective.forward_samples == 0
    objective.closure()  # the second call evaluates
    assert objective.forward_samples == 16


def test_batches_beyond_the_device_bound_wait_on_the_host_and_give_the_same_value():
    model = nn.Linear(5, 1)
    batches = regression_batches()
    moved = []

    def to_device(batch):
        moved.append(batch)
        return batch

    kept = objective_for(model)
    offloaded = objective_for(model, max_device_bytes=batch_nbytes(batches[0]), to_device=to_device)
    for index, batch in enumerate(batches):
        kept.add(batch, index)
        offloaded.add(batch, index)
    assert float(kept.value()) == float(offloaded.value())
    assert len(moved) == 2  # the first batch fits the bound, the other two are copied back for the evaluation


def test_randomness_in_the_loss_repeats_at_every_evaluation_of_an_iteration():
    model = nn.Linear(5, 1)

    def noisy(batch, batch_idx):
        inputs, targets = batch
        return nn.functional.mse_loss(model(inputs + torch.randn_like(inputs)), targets)

    objective = TrainingObjective(noisy, list(model.parameters()), model, seed=3)
    for index, batch in enumerate(regression_batches()):
        objective.add(batch, index)
    first, second = float(objective.value()), float(objective.value())
    assert first == second
    objective.iteration += 1  # a new iteration draws new noise
    assert float(objective.value()) != first
    state = torch.get_rng_state()
    objective.value()
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left as it was


def test_trial_evaluations_leave_buffers_as_they_were_and_run_quietly():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    quiet_calls = []

    @contextmanager
    def quiet():
        quiet_calls.append("enter")
        yield

    objective = objective_for(model, quiet=quiet)
    for index, batch in enumerate(regression_batches()):
        objective.add(batch, index)
    before = [b.clone() for b in model.buffers()]
    with objective.side_effects_suspended():
        objective.value_and_gradient()
        assert any(not torch.equal(a, b) for a, b in zip(before, model.buffers()))  # BatchNorm moved its statistics
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert quiet_calls == ["enter"]


def test_clear_drops_the_batches():
    objective = objective_for(nn.Linear(5, 1))
    objective.add(regression_batches()[0], 0)
    objective.clear()
    assert (len(objective), objective.num_samples) == (0, 0)


def test_the_loss_in_what_a_training_step_returns():
    loss = torch.tensor(1.5)
    assert training_step_loss(loss) is loss
    assert training_step_loss({"loss": loss, "extra": 1}) is loss
    assert training_step_loss(None) is None
    with pytest.raises(TypeError, match="must return a loss tensor"):
        training_step_loss((loss,))


def counting_objective(model: nn.Module, trial_batching: str, messages: list[str]) -> tuple[TrainingObjective, list]:
    calls: list[int] = []

    def loss_fn(batch, batch_idx):
        inputs, targets = batch
        calls.append(len(inputs))
        return nn.functional.mse_loss(model(inputs), targets)

    objective = TrainingObjective(
        loss_fn, list(model.parameters()), model, trial_batching=trial_batching, inform=messages.append
    )
    for index, batch in enumerate(regression_batches()):
        objective.add(batch, index)
    return objective, calls


def test_auto_trial_batching_takes_one_chunk_where_it_gives_the_same_loss():
    torch.manual_seed(0)
    messages: list[str] = []
    objective, calls = counting_objective(nn.Linear(5, 1), "auto", messages)
    first = float(objective.value())  # decides: batch by batch, then as one chunk
    assert calls == [16, 16, 7, 39] and objective.trial_batching == "chunks"
    assert "in one chunk" in messages[0]
    calls.clear()
    assert float(objective.value()) == pytest.approx(first, rel=1e-6)
    assert calls == [39]  # one call for the 39 kept samples


def test_auto_trial_batching_keeps_batches_where_the_loss_depends_on_the_batch():
    torch.manual_seed(0)
    messages: list[str] = []
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))  # batch statistics in training mode
    objective, calls = counting_objective(model, "auto", messages)
    objective.value()
    assert objective.trial_batching == "batches" and "batch by batch" in messages[0]
    calls.clear()
    objective.value()
    assert calls == [16, 16, 7]


def test_batches_that_cannot_be_joined_are_evaluated_one_by_one():
    model = nn.Linear(5, 1)

    def loss_fn(batch, batch_idx):
        (inputs, targets), _names = batch
        return nn.functional.mse_loss(model(inputs), targets)

    messages: list[str] = []
    objective = TrainingObjective(
        loss_fn, list(model.parameters()), model, trial_batching="auto", inform=messages.append
    )
    for index, batch in enumerate(regression_batches()):
        objective.add((batch, "names of a batch"), index)
    assert math.isfinite(float(objective.value()))
    assert objective.trial_batching == "batches"


class CarriesState(nn.Module):
    """A loss that depends on a state carried from batch to batch, in a child module, with a buffer and a counter; it
    cannot take batches larger than the ones it was trained on (as an RNN whose hidden state has the batch's size)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 1)
        self.child = nn.Module()
        self.child.calls = 0
        self.child.carried = torch.zeros(1)
        self.register_buffer("seen", torch.zeros(()))

    def loss(self, batch, batch_idx):
        inputs, targets = batch
        self.child.calls += 1
        self.seen += len(inputs)
        if len(inputs) > 16:
            raise RuntimeError("Expected hidden size (1, 39, 16), got [1, 16, 16]")
        loss = nn.functional.mse_loss(self.linear(inputs) + self.child.carried, targets)
        self.child.carried = self.child.carried + 0.1
        return loss


def carried_state_objective(trial_batching: str, messages: list[str]) -> tuple[TrainingObjective, CarriesState]:
    torch.manual_seed(0)
    model = CarriesState()
    objective = TrainingObjective(
        model.loss, list(model.parameters()), model, trial_batching=trial_batching, inform=messages.append
    )
    for index, batch in enumerate(regression_batches()):
        state = objective.snapshot_state()
        with torch.no_grad():
            model.loss(batch, index)  # the training loop's pass, which moves the carried state on
        objective.add(batch, index, state)
    return objective, model


def test_a_chunk_that_fails_means_batch_by_batch_and_leaves_no_trace():
    messages: list[str] = []
    auto, auto_model = carried_state_objective("auto", messages)
    batches, batches_model = carried_state_objective("batches", [])
    with auto.side_effects_suspended():
        auto_values = [float(auto.value()) for _ in range(3)]
        auto_state = (auto_model.child.calls, float(auto_model.child.carried), float(auto_model.seen))
    with batches.side_effects_suspended():
        batch_values = [float(batches.value()) for _ in range(3)]
        batch_state = (batches_model.child.calls, float(batches_model.child.carried), float(batches_model.seen))
    assert auto.trial_batching == "batches" and "failed: RuntimeError: Expected hidden size" in messages[0]
    # The same numbers as batch by batch, and the failed chunk changed neither the counter, the state nor the buffer.
    assert auto_values == batch_values and auto_state == batch_state
    assert (auto_model.child.calls, float(auto_model.child.carried)) == (3, pytest.approx(0.3))


def test_each_batch_is_evaluated_from_the_state_its_loop_pass_saw():
    objective, model = carried_state_objective("batches", [])
    model.child.carried = torch.full((1,), 5.0)  # where the loop left it: not what the batches saw
    inputs = torch.cat([b[0] for b in regression_batches()])
    targets = torch.cat([b[1] for b in regression_batches()])
    offsets = torch.cat([torch.full((len(b[0]), 1), 0.1 * i) for i, b in enumerate(regression_batches())])
    with torch.no_grad():
        expected = nn.functional.mse_loss(model.linear(inputs) + offsets, targets)
    assert float(objective.value()) == pytest.approx(float(expected), rel=1e-6)


class Checkpointed(nn.Module):
    """A block under reentrant activation checkpointing, which supports backward() but not torch.autograd.grad."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.last = nn.Linear(8, 1)
        self.unused_by_optimizer = nn.Linear(5, 1)
        self.reentrant = reentrant

    def loss(self, batch, batch_idx):
        inputs, targets = batch
        hidden = torch.tanh(self.first(inputs))
        hidden = torch.utils.checkpoint.checkpoint(self.block, hidden, use_reentrant=self.reentrant)
        return nn.functional.mse_loss(self.last(hidden) + self.unused_by_optimizer(inputs), targets)

    def forward(self, batch):
        return self.loss(batch, 0)


def checkpointed_objective(reentrant: bool, messages: list[str] | None = None):
    model = Checkpointed(reentrant)
    trained = [p for name, p in model.named_parameters() if not name.startswith("unused")]
    inform = messages.append if messages is not None else (lambda message: None)
    objective = TrainingObjective(model.loss, trained, model, inform=inform)
    for index, batch in enumerate(regression_batches()):
        objective.add(batch, index)
    return objective, model, trained


def test_reentrant_checkpointing_takes_gradients_with_backward_and_gets_the_same_numbers():
    messages: list[str] = []
    reentrant, model, trained = checkpointed_objective(True, messages)
    plain, _, plain_trained = checkpointed_objective(False)
    marker = torch.full_like(model.unused_by_optimizer.weight, 7.0)
    model.unused_by_optimizer.weight.grad = marker
    assert float(reentrant.value_and_gradient()) == float(plain.value_and_gradient())
    assert reentrant.gradient_mode == "backward" and "backward()" in messages[0]
    for p, q in zip(trained, plain_trained):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert model.unused_by_optimizer.weight.grad is marker and model.unused_by_optimizer.bias.grad is None
    assert (reentrant.forward_samples, reentrant.backward_samples) == (39, 39)  # the failed attempt is not counted
    reentrant.value_and_gradient()  # the choice is remembered: no second attempt
    assert len(messages) == 1


def _reentrant_rank(rank: int, world_size: int) -> dict:
    from tests.conftest import init_gloo

    init_gloo(rank, world_size)
    model = Checkpointed(True)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    reductions: list[int] = []

    def counting_hook(state, bucket):
        reductions.append(1)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_hook)
    batches = regression_batches()
    shard = batches[:2] if rank == 0 else batches[2:]  # 32 and 7 samples: shards of different sizes
    # An ordinary DDP step first, so that the reducer is armed as in training.
    ddp(shard[0]).backward()
    model.zero_grad(set_to_none=True)
    reductions_of_the_step = len(reductions)
    trained = [p for name, p in model.named_parameters() if not name.startswith("unused")]
    objective = TrainingObjective(model.loss, trained, model)
    for index, batch in enumerate(shard):
        objective.add(batch, index)
    loss = float(objective.value_and_gradient())
    return {
        "loss": loss,
        "grads": [p.grad.clone() for p in trained],
        "mode": objective.gradient_mode,
        "ddp_reductions": (reductions_of_the_step, len(reductions)),
    }


def test_backward_gradients_under_ddp_are_the_global_mean_without_ddps_reduction():
    from tests.conftest import run_on_ranks

    rank0, rank1 = run_on_ranks(_reentrant_rank)
    reference, _, reference_trained = checkpointed_objective(False)
    expected_loss = float(reference.value_and_gradient())  # all 39 samples in one process
    for result in (rank0, rank1):
        assert result["mode"] == "backward"
        step, total = result["ddp_reductions"]
        assert step > 0 and total == step  # DDP reduced the ordinary step's gradients, none of the objective's
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
        for grad, expected in zip(result["grads"], reference_trained):
            torch.testing.assert_close(grad, expected.grad, rtol=1e-5, atol=1e-7)


def test_the_module_data_kept_per_batch_counts_against_the_device_bound():
    model = nn.Linear(5, 1)
    model.table = list(range(200_000))  # 1.6 MB of references, never changed
    batches = regression_batches((16,) * 64)
    objective = objective_for(model)
    for index, batch in enumerate(batches):
        objective.add(batch, index, objective.snapshot_state())
    # Shared from batch to batch: one copy for the iteration, not 64.
    assert 8 * 200_000 <= objective._state_bytes < 2 * 8 * 200_000
    # Within a bound that the data takes up, the batches wait on the host.
    bounded = objective_for(model, max_device_bytes=8 * 200_000 + 3 * batch_nbytes(batches[0]))
    for index, batch in enumerate(batches):
        bounded.add(batch, index, bounded.snapshot_state())
    assert sum(entry[3] for entry in bounded._batches) <= 3


def test_module_data_beyond_the_bound_is_not_kept_per_batch_and_that_is_said():
    model = nn.Linear(5, 1)
    model.outputs = []
    warnings: list[str] = []
    objective = objective_for(model, max_device_bytes=20_000, warn=warnings.append)
    for index, batch in enumerate(regression_batches((4,) * 40)):
        state = objective.snapshot_state()
        model.outputs.extend(range(100))  # grows at every step: nothing to share
        objective.add(batch, index, state)
    states = [entry[4] for entry in objective._batches]
    assert states[0].nbytes > 0 and states[-1].nbytes == 0  # the first batch always has the module's data saved
    assert len(warnings) == 1 and "max_cached_bytes=20000" in warnings[0]
