"""ModuleState without a Trainer: the data in a module's attributes, nested and changed in place, put back exactly;
snapshots taken one after the other share what did not change; what cannot be put back is said."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from lightning_twophase.module_state import COPY_LIMIT_BYTES, ModuleState


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


def change_everything(module: Parent) -> None:
    module.child.count += 1
    module.child.summary.mul_(0.5).add_(1.0)  # in place
    module.outputs.append(torch.ones(1))
    module.by_key["loss"].append(0.5)
    module.by_key["size"].append(32)
    module.meter.update(0.5, 32)
    module.window.values.append(1.0)
    module.histogram[1] += 1
    module.recent.append(7)
    module.hidden = (module.hidden[0] + 1, module.hidden[1] + 1)
    module.rng.random()
    module.added_later = 3


def assert_as_before(module: Parent, references: dict) -> None:
    assert module.child.count == 0 and torch.equal(module.child.summary, torch.zeros(2))
    assert module.outputs == [] and module.outputs is references["outputs"]
    assert module.by_key == {"loss": [], "size": []}
    assert module.by_key is references["by_key"] and module.by_key["loss"] is references["loss_list"]
    assert (module.meter.sum, module.meter.count) == (0.0, 0) and module.meter is references["meter"]
    assert module.window.values == []
    assert np.array_equal(module.histogram, np.zeros(3)) and module.histogram is references["histogram"]
    assert list(module.recent) == [] and module.recent.maxlen == 3 and module.recent is references["recent"]
    assert torch.equal(module.hidden[0], torch.zeros(1, 2)) and module.hidden is references["hidden"]
    assert module.rng.random() == random.Random(0).random()
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
    state = ModuleState.capture(module)
    for _ in range(2):  # a snapshot serves many restores
        change_everything(module)
        state.restore()
        assert_as_before(module, references)
    assert not state.notes


def test_parameters_buffers_and_submodules_are_not_part_of_it():
    module = Parent()
    state = ModuleState.capture(module)
    with torch.no_grad():
        module.child.linear.weight.add_(1.0)
        module.child.running.add_(1.0)
    weight = module.child.linear.weight.detach().clone()
    state.restore()
    assert torch.equal(module.child.linear.weight, weight)  # the optimizer's business, not the snapshot's
    assert torch.equal(module.child.running, torch.ones(2))  # buffers are saved by the objective


def test_a_tensor_that_views_a_weight_follows_the_weight():
    module = Parent()
    module.view = module.child.linear.weight[0]
    state = ModuleState.capture(module)
    with torch.no_grad():
        module.child.linear.weight.add_(1.0)
    state.restore()
    assert torch.equal(module.view, module.child.linear.weight[0])


def test_snapshots_share_what_did_not_change():
    module = Parent()
    module.table = list(range(200_000))  # large and never changed
    first = ModuleState.capture(module)
    assert first.nbytes >= 8 * 200_000
    module.outputs.append(torch.ones(1))  # small and changed
    second = ModuleState.capture(module, previous=first)
    assert second.nbytes < 10_000  # the table is shared, only what changed is copied
    module.table[0] = -1
    third = ModuleState.capture(module, previous=second)
    assert third.nbytes >= 8 * 200_000
    second.restore()
    assert module.table[0] == 0 and len(module.outputs) == 1
    first.restore()
    assert module.outputs == []


def test_what_cannot_be_copied_is_named_and_kept_as_it_is():
    import threading

    module = Parent()
    lock = threading.Lock()
    module.lock_holder = [lock]
    state = ModuleState.capture(module)
    assert any("lock_holder" in note for note in state.notes)
    state.restore()
    assert module.lock_holder[0] is lock


def test_a_large_tensor_is_kept_by_reference_and_a_change_in_place_is_reported():
    module = Parent()
    module.big = torch.zeros(COPY_LIMIT_BYTES // 4 + 1)
    state = ModuleState.capture(module)
    assert state.nbytes < COPY_LIMIT_BYTES  # not copied
    state.restore()  # unchanged: nothing to say
    module.big.add_(1.0)
    reports: list[str] = []
    state.restore(reports.append)
    assert len(reports) == 1 and "`big`" in reports[0]


def test_a_tensor_reassigned_or_changed_in_place_is_put_back():
    module = Parent()
    module.carried = torch.arange(3.0)
    original = module.carried
    state = ModuleState.capture(module)
    module.carried = module.carried * 2
    state.restore()
    assert module.carried is original
    original.mul_(5.0)
    state.restore()
    assert torch.equal(module.carried, torch.arange(3.0))


def test_torchmetrics_are_left_to_their_own_state_handling():
    torchmetrics = pytest.importorskip("torchmetrics")
    module = Parent()
    module.metric = torchmetrics.MeanMetric()
    module.metric.custom = [1]
    state = ModuleState.capture(module)
    module.metric.custom.append(2)
    state.restore()
    assert module.metric.custom == [1, 2]


def test_a_growing_list_of_tensors_shares_the_elements_it_already_had():
    module = Parent()
    state = ModuleState.capture(module)
    unchanged = ModuleState.capture(module, previous=state).nbytes  # what is copied every time (the random.Random)
    sizes = []
    for step in range(50):
        module.outputs.append(torch.full((256,), float(step)))  # as training_step_outputs.append(loss) does
        state = ModuleState.capture(module, previous=state)
        sizes.append(state.nbytes)
    # Each snapshot copies the one new tensor (1 KiB) and the list's references, not every tensor again.
    assert max(sizes) - unchanged < 1024 + 1024
    module.outputs.clear()
    state.restore()
    assert [float(t[0]) for t in module.outputs] == [float(step) for step in range(50)]
