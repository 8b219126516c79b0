"""SwapSchedule: the bounds every swap rule shares, resolved before training, and a rule's decisions within them."""

from __future__ import annotations

import pytest

from lightning_twophase import Decision, GradientNormPeakDetector, PlateauDetector, Reason, SwapDetector
from lightning_twophase.record import RunRecord
from lightning_twophase.schedule import SwapSchedule


class Always(SwapDetector):
    """A rule that wants to swap at every check (and counts them)."""

    def __init__(self) -> None:
        self.checks = 0

    def update(self, loss, grad_norm, *, epoch, step):  # type: ignore[override]
        self.checks += 1
        return Decision(True, Reason.RULE, "now")

    def state_dict(self):  # type: ignore[override]
        return {"checks": self.checks}

    def load_state_dict(self, state):  # type: ignore[override]
        self.checks = state["checks"]


def decisions(schedule: SwapSchedule, epochs: int) -> list[Decision]:
    return [schedule.decide(1.0 / epoch, 1.0, epoch, 10 * epoch) for epoch in range(1, epochs + 1)]


def test_a_fraction_is_resolved_from_the_trainings_length_and_the_bound_swaps():
    schedule = SwapSchedule(None, 0.7, 0)
    assert schedule.setup(10) == [] and schedule.swap_at == 7
    answers = decisions(schedule, 8)
    assert [d.act for d in answers].index(True) == 6  # epoch 7
    assert answers[6].reason is Reason.SWAP_EPOCH and answers[0].reason is Reason.WAITING


def test_a_users_rule_gets_min_epochs_for_free_and_the_bound_is_a_latest_swap():
    held = SwapSchedule(Always(), 0.9, min_epochs=3)
    held.setup(10)
    answers = decisions(held, 4)
    assert [d.reason for d in answers] == [Reason.BEFORE_MIN_EPOCHS] * 2 + [Reason.RULE] * 2
    assert "before min_epochs=3: now" in answers[0].message and held.detector.checks == 4  # asked at every check
    never = SwapSchedule(GradientNormPeakDetector(patience=100), 5, 0)
    never.setup(10)
    assert decisions(never, 5)[-1].reason is Reason.SWAP_EPOCH  # the rule never fired: the bound did


@pytest.mark.parametrize(
    ("detector", "swap_epoch", "min_epochs", "epochs", "match"),
    [
        (None, 0.3, 0, None, "fraction of the training's length, but it is unknown"),
        (None, 0.01, 0, 10, "rounds to no epoch of the first optimizer"),
        (Always(), 3, 5, 10, "min_epochs=5 comes after"),
        (PlateauDetector(window=0.2), None, 0, None, "pass the window as a number of epochs"),
    ],
)
def test_bounds_that_cannot_work_are_named_before_training(detector, swap_epoch, min_epochs, epochs, match):
    problems = SwapSchedule(detector, swap_epoch, min_epochs).setup(epochs)
    assert any(match in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("swap_epoch", "epochs", "match"),
    [
        (10, 10, "`swap_epoch=10` is not below the training's 10 epoch(s): no second-phase iteration could follow"),
        (0.95, 10, "`swap_epoch=0.95` (epoch 10) is not below the training's 10 epoch(s)"),
        (0.3, 1, "`swap_epoch=0.3` (epoch 1) is not below the training's 1 epoch(s)"),  # fast_dev_run
    ],
)
def test_a_fixed_swap_at_or_beyond_the_trainings_end_is_no_problem_but_a_note(swap_epoch, epochs, match):
    schedule = SwapSchedule(None, swap_epoch, 0)
    assert schedule.setup(epochs) == [] and match in schedule.note
    assert "the first optimizer trains to the end" in schedule.note
    assert SwapSchedule(None, 0.7, 0).setup(10) == [] and SwapSchedule(None, 0.7, 0).note is None


def test_a_bound_beyond_training_is_harmless_with_a_rule_and_none_means_the_rule_alone():
    assert SwapSchedule(Always(), 20, 0).setup(10) == []
    unbounded = SwapSchedule(Always(), None, 0)
    assert unbounded.setup(None) == [] and unbounded.swap_at is None
    with pytest.raises(ValueError, match="with detector=None the swap comes at `swap_epoch`"):
        SwapSchedule(None, None, 0)


def test_a_rule_that_answers_anything_but_a_decision_is_named():
    class Broken(SwapDetector):
        def update(self, loss, grad_norm, *, epoch, step):  # type: ignore[override]
            return {"swap": True}

    with pytest.raises(TypeError, match=r"Broken.update must return a lightning_twophase.Decision, it returned \{"):
        SwapSchedule(Broken(), None, 0).decide(1.0, 1.0, 1, 1)


def test_the_detectors_state_travels_and_another_detectors_is_not_loaded():
    schedule = SwapSchedule(Always(), None, 0)
    decisions(schedule, 3)
    restored = SwapSchedule(Always(), None, 0)
    assert restored.load_state_dict(schedule.state_dict()) is None and restored.detector.checks == 3
    other = SwapSchedule(GradientNormPeakDetector(), None, 0)
    assert "was a Always, this run's is a GradientNormPeakDetector" in other.load_state_dict(schedule.state_dict())


def test_the_norm_is_sampled_unless_the_rule_reads_it():
    assert SwapSchedule(None, 5, 0).norm_every_n_steps == 32
    assert SwapSchedule(PlateauDetector(), 5, 0).norm_every_n_steps == 32
    assert SwapSchedule(GradientNormPeakDetector(), 5, 0).norm_every_n_steps == 1


def test_the_run_record_keeps_decisions_with_their_reason_codes_across_checkpoints():
    record = RunRecord()
    record.add_check(1, 8, 0.5, 1.0, "first", {})
    record.swap_decision = Decision(True, Reason.PLATEAU, "flat")
    restored = RunRecord()
    restored.load_state_dict(record.state_dict())
    assert restored.swap_decision == Decision(True, Reason.PLATEAU, "flat") and restored.history == record.history
