"""TrialState without a Trainer: the batch, the module's buffers, attributes, metric states and random generators, and
the step, put back as a training loop's pass found them; unchanged data shared from batch to batch and never copied
deeply; what cannot be put back is said."""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_twophase._trial_state import COPY_LIMIT_BYTES, TrialState, kept


class AverageMeter:
    """Updated in place, as the ones of many training scripts."""

    def __init__(self) -> None:
        self.sum = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += value * n
        self.count += n


@dataclass
class Window:
    values: list[float] = field(default_factory=list)


class Child(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("running", torch.zeros(2))
        self.count = 0
        self.summary = torch.zeros(2)


class Parent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.child = Child()
        self.outputs: list[torch.Tensor] = []
        self.by_key: dict[str, list[float]] = {"loss": [], "size": []}
        self.meter = AverageMeter()
        self.window = Window()
        self.histogram = np.zeros(3)
        self.recent: deque[int] = deque(maxlen=3)
        self.hidden = (torch.zeros(1, 2), torch.zeros(1, 2))  # an LSTM's (h, c)
        self.rng = random.Random(0)
        self.torch_rng = torch.Generator().manual_seed(0)
        self.numpy_rng = np.random.default_rng(0)


def change_everything(module: Parent) -> None:
    module.child.count += 1
    module.child.summary.mul_(0.5).add_(1.0)  # in place
    module.child.running.add_(1.0)  # a buffer, in place
    module.outputs.append(torch.ones(1))
    module.by_key["loss"].append(0.5)
    module.by_key["size"].append(32)
    module.meter.update(0.5, 32)
    module.window.values.append(1.0)
    module.histogram[1] += 1
    module.recent.append(7)
    module.hidden = (module.hidden[0] + 1, module.hidden[1] + 1)
    module.rng.random()
    torch.rand(1, generator=module.torch_rng)
    module.numpy_rng.random()
    module.added_later = 3


def assert_as_before(module: Parent, references: dict) -> None:
    assert module.child.count == 0 and torch.equal(module.child.summary, torch.zeros(2))
    assert torch.equal(module.child.running, torch.zeros(2))
    assert module.outputs == [] and module.outputs is references["outputs"]
    assert module.by_key == {"loss": [], "size": []}
    assert module.by_key is references["by_key"] and module.by_key["loss"] is references["loss_list"]
    assert (module.meter.sum, module.meter.count) == (0.0, 0) and module.meter is references["meter"]
    assert module.window.values == []
    assert np.array_equal(module.histogram, np.zeros(3)) and module.histogram is references["histogram"]
    assert list(module.recent) == [] and module.recent.maxlen == 3 and module.recent is references["recent"]
    assert torch.equal(module.hidden[0], torch.zeros(1, 2)) and module.hidden is references["hidden"]
    assert module.rng.random() == random.Random(0).random()
    assert torch.equal(
        torch.rand(1, generator=module.torch_rng), torch.rand(1, generator=torch.Generator().manual_seed(0))
    )
    assert module.numpy_rng.random() == np.random.default_rng(0).random()
    assert not hasattr(module, "added_later")


def test_nested_and_in_place_changes_are_put_back_into_the_same_objects():
    module = Parent()
    references = {
        "outputs": module.outputs,
        "by_key": module.by_key,
        "loss_list": module.by_key["loss"],
        "meter": module.meter,
        "histogram": module.histogram,
        "recent": module.recent,
        "hidden": module.hidden,
    }
    state = TrialState.capture(module)
    for _ in range(2):  # a state serves many restores
        change_everything(module)
        assert state.restore() == []
        assert_as_before(module, references)


def test_parameters_follow_the_optimizer_and_buffers_are_put_back_even_when_reassigned():
    module = Parent()
    running = module.child.running
    state = TrialState.capture(module)
    with torch.no_grad():
        module.child.linear.weight.add_(1.0)
    module.child.running = running + 5  # a buffer reassigned, as `self.state = f(self.state)` does
    weight = module.child.linear.weight.detach().clone()
    state.restore()
    assert torch.equal(module.child.linear.weight, weight)  # the optimizer's business, not the state's
    assert module.child.running is running and torch.equal(running, torch.zeros(2))
    assert dict(module.named_buffers())["child.running"] is running


def test_a_tensor_that_views_a_weight_follows_the_weight():
    module = Parent()
    module.view = module.child.linear.weight[0]
    state = TrialState.capture(module)
    with torch.no_grad():
        module.child.linear.weight.add_(1.0)
    state.restore()
    assert torch.equal(module.view, module.child.linear.weight[0])


def test_states_share_what_did_not_change():
    module = Parent()
    module.table = list(range(200_000))  # large and never changed
    module.positions = torch.zeros(100_000)  # a large tensor never changed
    reuse: dict[int, Any] = {}
    first = TrialState.capture(module, reuse=reuse)
    assert first.nbytes >= 8 * 200_000 + 4 * 100_000
    module.outputs.append(torch.ones(1))  # small and changed
    second = TrialState.capture(module, reuse=reuse)
    assert second.nbytes < 10_000  # the table and the tensor are shared, only what changed is copied
    module.table[0] = -1
    module.positions.add_(1.0)
    third = TrialState.capture(module, reuse=reuse)
    assert third.nbytes >= 8 * 200_000 + 4 * 100_000
    second.restore()
    assert module.table[0] == 0 and len(module.outputs) == 1 and float(module.positions.sum()) == 0
    third.restore()
    assert module.table[0] == -1 and float(module.positions.sum()) == 100_000
    first.restore()
    assert module.outputs == []


class ReadOnlyTable:
    """With its own copy protocol: kept by reference, never copied."""

    def __init__(self) -> None:
        self.entries = {index: float(index) for index in range(1000)}

    def __getstate__(self) -> dict[str, Any]:
        raise AssertionError("copied")

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def test_objects_with_their_own_copy_protocol_or_without_a_dict_are_kept_by_reference():
    module = Parent()
    lock, table = threading.Lock(), ReadOnlyTable()
    module.lock_holder = [lock]
    module.table = table
    state = TrialState.capture(module)
    module.table = None
    assert state.restore() == []
    assert module.lock_holder[0] is lock and module.table is table


def test_a_large_tensor_is_kept_by_reference_and_a_change_in_place_is_reported_once():
    module = Parent()
    module.big = torch.zeros(COPY_LIMIT_BYTES // 4 + 1)
    state = TrialState.capture(module)
    assert state.nbytes < COPY_LIMIT_BYTES  # not copied
    assert state.passed() == []  # unchanged: nothing to say
    module.big.add_(1.0)
    problems = state.restore()
    assert len(problems) == 1 and "`big`" in problems[0] and "changed in place" in problems[0]
    assert state.restore() == []


def test_a_tensor_reassigned_or_changed_in_place_is_put_back():
    module = Parent()
    module.carried = torch.arange(3.0)
    original = module.carried
    state = TrialState.capture(module)
    module.carried = module.carried * 2
    state.restore()
    assert module.carried is original
    original.mul_(5.0)
    state.restore()
    assert torch.equal(module.carried, torch.arange(3.0))


def test_metric_states_are_put_back_whole():
    torchmetrics = pytest.importorskip("torchmetrics")
    module = Parent()
    module.running = torchmetrics.aggregation.RunningMean(window=3)
    module.collection = torchmetrics.MetricCollection(
        {"mean": torchmetrics.MeanMetric(), "sum": torchmetrics.SumMetric()}
    )
    for value in (1.0, 2.0):
        module.running.update(torch.tensor(value))
        module.collection.update(torch.tensor(value))
    module.running.custom = [1]
    state = TrialState.capture(module)
    for value in (10.0, 20.0):
        module.running.update(torch.tensor(value))
        module.collection.update(torch.tensor(value))
    module.running.custom.append(2)
    state.restore()
    module.running.update(torch.tensor(3.0))  # the window's position and count were put back: 1, 2, 3
    module.collection.update(torch.tensor(3.0))
    assert float(module.running.compute()) == pytest.approx(2.0) and module.running.custom == [1]
    values = module.collection.compute()
    assert (float(values["mean"]), float(values["sum"])) == (pytest.approx(2.0), pytest.approx(6.0))


def test_a_growing_list_of_tensors_shares_the_elements_it_already_had():
    module = Parent()
    reuse: dict[int, Any] = {}
    state = TrialState.capture(module, reuse=reuse)
    unchanged = TrialState.capture(module, reuse=reuse).nbytes  # what is copied every time (small tensors, buffers)
    sizes = []
    for step in range(50):
        module.outputs.append(torch.full((256,), float(step)))  # as training_step_outputs.append(loss) does
        state = TrialState.capture(module, reuse=reuse)
        sizes.append(state.nbytes)
    # Each state copies the new tensor (1 KiB), the list's references and, as every time, the small tensors.
    assert max(sizes) - unchanged < 2 * 1024 + 8 * 50 + 64
    module.outputs.clear()
    state.restore()
    assert [float(t[0]) for t in module.outputs] == [float(step) for step in range(50)]


def test_the_batch_is_kept_as_the_loop_saw_it_and_each_evaluation_gets_one_it_may_change():
    inputs, labels = torch.ones(4, 2), torch.zeros(4)
    in_place = TrialState(None, batch=(inputs, labels))
    inputs.div_(2)  # the loop's pass, in place
    assert in_place.passed() == []
    for _ in range(2):
        batch = in_place.evaluation_batch(in_place.batch)
        assert torch.equal(batch[0], torch.ones(4, 2))
        batch[0].div_(2)  # the evaluation, as the loop's pass did
    loop_batch = {"x": torch.ones(4, 2)}
    entry = TrialState(None, batch=loop_batch)
    loop_batch["x"] = loop_batch["x"] / 2
    entry.passed()
    for _ in range(2):
        batch = entry.evaluation_batch(entry.batch)
        assert torch.equal(batch["x"], torch.ones(4, 2))
        batch["x"] = batch["x"] / 2


def test_the_step_is_put_back_and_kept_restores_everything_on_leaving():
    steps = [7]
    counter = (lambda: steps[0], lambda step: steps.__setitem__(0, step))
    module = Parent()
    at_seven = TrialState.capture(module, counter)
    steps[0] = 9
    reported: list[str] = []
    with kept(module, counter, reported.append):
        at_seven.restore()
        assert steps[0] == 7
        change_everything(module)
    assert steps[0] == 9 and module.child.count == 0 and not reported


def test_private_attributes_are_not_saved_and_a_pass_that_changes_them_is_told():
    module = Parent()
    module._calls = 0
    state = TrialState.capture(module)
    module._calls += 1  # rebound
    module.child._cache = {}  # added
    problems = state.passed()
    assert len(problems) == 2 and "`_calls`" in problems[0] and "`child._cache`" in problems[1]
    state.restore()
    assert module._calls == 1  # not put back
