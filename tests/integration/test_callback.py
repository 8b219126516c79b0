"""ConvexitySwapCallback in a Trainer: the swap, what it changes, its refusals, the fallback and the CG phase's care."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import GradientAccumulationScheduler, LearningRateMonitor
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_twophase import (
    LBFGS,
    ConjugateGradient,
    ConvexitySwapCallback,
    Decision,
    FallbackPolicy,
    GradientNormPeakDetector,
    Phase,
    PlateauDetector,
    Reason,
    SwapDetector,
)
from lightning_twophase._lightning import unsupported_strategy
from tests.conftest import (
    PeakingClassifier,
    TinyClassifier,
    blobs,
    fit,
    needs_cpu_grad_scaler,
    scaler_plugin,
    swap_at,
    trainer_kwargs,
)


class CountingAdam(torch.optim.Adam):
    steps = 0

    def step(self, closure=None):  # type: ignore[override]
        CountingAdam.steps += 1
        return super().step(closure)


class CountingClassifier(TinyClassifier):
    def configure_optimizers(self) -> Any:
        return CountingAdam(self.parameters(), lr=self.lr)


#: The second phases by name (the callback's ``optimizer="lbfgs"``, the default, and ``optimizer="cg"``).
SECOND_PHASE_CLASSES = {"lbfgs": LBFGS, "cg": ConjugateGradient}
both_second_phases = pytest.mark.parametrize("second", ["lbfgs", "cg"])


def second_optimizer(trainer: pl.Trainer, second: str = "lbfgs") -> Any:
    """The second-phase optimizer that steps (inside the adapter Lightning sees), of the class ``second`` names."""
    optimizer = trainer.optimizers[0].optimizer
    assert isinstance(optimizer, SECOND_PHASE_CLASSES[second])
    return optimizer


class SecondPhaseSteps(pl.Callback):
    """The diagnostics of every ``step()`` of the second-phase optimizer (its public ``diagnostics``, a new object at
    each step), read after every batch."""

    def __init__(self) -> None:
        self.steps: list[Any] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        diagnostics = getattr(getattr(trainer.optimizers[0], "optimizer", None), "diagnostics", None)
        if diagnostics is not None and (not self.steps or diagnostics is not self.steps[-1]):
            self.steps.append(diagnostics)


def assert_steps(trainer: pl.Trainer, recorder: SecondPhaseSteps, second: str, steps: int) -> Any:
    """The second phase ``second`` stepped ``steps`` times, each step up to ``max_iter`` iterations (CG's default: 1,
    L-BFGS's: 20, fewer once it converges, none at a gradient below its tolerance), the first at least one, and its
    total counts exactly the iterations of those steps."""
    optimizer = second_optimizer(trainer, second)
    per_step = [diagnostics.iterations for diagnostics in recorder.steps]
    assert len(per_step) == steps
    assert per_step[0] >= 1 and all(0 <= n <= optimizer.defaults["max_iter"] for n in per_step)
    assert optimizer.totals["iterations"] == sum(per_step)
    if second == "cg":
        assert optimizer.totals["iterations"] == steps  # one CG iteration per step
    return optimizer


@both_second_phases
def test_swap_installs_conjugate_gradient_and_it_is_the_one_that_steps(second):
    CountingAdam.steps = 0
    callback, steps = swap_at(2, optimizer=second), SecondPhaseSteps()
    trainer = fit(CountingClassifier(), callback, steps, max_epochs=5)
    batches = trainer.num_training_batches
    assert (callback.phase, callback.swap_epoch, callback.swap_step) == (Phase.SECOND, 2, 2 * batches)
    assert callback.swap_decision.reason is Reason.SWAP_EPOCH
    assert CountingAdam.steps == 2 * batches  # Adam stopped stepping at the swap
    # One full-batch step per remaining epoch (CG: one iteration each; L-BFGS: up to 20).
    optimizer = assert_steps(trainer, steps, second, 3)
    assert (optimizer.preconditioner is not None) == (second == "cg")  # CG in Adam's geometry; L-BFGS plain
    assert trainer.global_step == 5 * batches  # the training loop still counts every mini-batch
    cg_losses = [r["loss"] for r in callback.history if r["phase"] == "second"]
    assert cg_losses == sorted(cg_losses, reverse=True)  # full-batch CG never increases the training loss


def test_old_schedulers_are_removed_at_the_swap():
    schedulers = []

    class KeepScheduler(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            schedulers.extend(config.scheduler for config in trainer.lr_scheduler_configs)

    trainer = fit(TinyClassifier(with_scheduler=True), swap_at(2), KeepScheduler(), max_epochs=5)
    assert trainer.lr_scheduler_configs == []
    # The first phase's StepLR stepped at the end of the two Adam epochs only.
    assert [scheduler.last_epoch for scheduler in schedulers] == [2]


def test_scheduler_factory_gives_the_cg_phase_its_own_scheduler():
    def factory(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    callback = swap_at(1, scheduler_factory=factory)
    trainer = fit(TinyClassifier(), callback, max_epochs=3)
    (config,) = trainer.lr_scheduler_configs
    assert config.scheduler.optimizer is trainer.optimizers[0]
    assert config.scheduler.last_epoch == 2


def test_the_papers_rule_swaps_after_the_peak():
    callback = ConvexitySwapCallback(detector=GradientNormPeakDetector(factor=0.9), swap_epoch=None)
    fit(PeakingClassifier(), callback, max_epochs=10)
    first_phase = [r["grad_norm"] for r in callback.history if r["phase"] == "first"]
    peak_epoch = first_phase.index(max(first_phase)) + 1
    assert callback.swap_epoch is not None and peak_epoch < callback.swap_epoch <= 10
    # The swap came at the first check below 0.9 x the peak, not before.
    assert first_phase[callback.swap_epoch - 1] < 0.9 * max(first_phase)
    assert all(norm >= 0.9 * max(first_phase[:i]) for i, norm in enumerate(first_phase[:-1], start=1) if i > 1)
    assert callback.swap_decision.reason is Reason.NORM_PEAK
    assert "stayed below 0.9 x its peak" in callback.swap_reason


def test_the_default_swaps_at_the_epoch_bound_while_the_loss_still_falls():
    callback = ConvexitySwapCallback()
    assert isinstance(callback.detector, PlateauDetector)
    fit(TinyClassifier(), callback, max_epochs=10)
    # 20 % of 10 epochs is a 2-epoch window; Adam's best loss falls faster than that: the bound, 30 % of 10 epochs.
    assert callback.swap_epoch == 3 and callback.swap_decision.reason is Reason.SWAP_EPOCH
    waiting = [r for r in callback.history if r["phase"] == "first" and "improvement" in r]
    assert waiting and all(r["improvement"] >= 0.2 for r in waiting)  # logged: the rule's measure at each check


def test_a_plateau_swaps_before_the_bound():
    # A rule that asks for a 90 % fall of the best loss over 2 epochs: every full window is a plateau by it, and the
    # first that counts is the one after the loss fell to half its first value (0.90 -> 0.39 by epoch 4).
    rule = PlateauDetector(window=2, min_improvement=0.9)
    callback, steps = ConvexitySwapCallback(detector=rule, swap_epoch=0.7), SecondPhaseSteps()
    trainer = fit(TinyClassifier(), callback, steps, max_epochs=10)
    assert callback.swap_epoch == 4 and callback.swap_decision.reason is Reason.PLATEAU
    assert "over the last 2 epochs" in callback.swap_reason
    waiting = callback.history[2]  # epoch 3: a full window, but the loss was still above half its first value
    assert waiting["improvement"] < 0.9 and waiting["loss"] > callback.history[0]["loss"] / 2
    # The default second phase took one step per remaining epoch, each checked.
    assert_steps(trainer, steps, "lbfgs", 6)
    assert [r["phase"] for r in callback.history] == ["first"] * 4 + ["second"] * 6


def test_detect_only_never_swaps_but_reports_the_point():
    CountingAdam.steps = 0
    callback = swap_at(2, detect_only=True)
    trainer = fit(CountingClassifier(), callback, max_epochs=4)
    assert callback.phase == Phase.FIRST and callback.swap_epoch == 2
    assert isinstance(trainer.optimizers[0], CountingAdam)
    assert CountingAdam.steps == 4 * trainer.num_training_batches


def test_detect_only_with_swap_epoch_zero_reports_the_start_and_never_swaps():
    CountingAdam.steps = 0
    callback = swap_at(0, detect_only=True)
    trainer = fit(CountingClassifier(), callback, max_epochs=2)
    assert callback.phase == Phase.FIRST and callback.swap_epoch == 0
    assert callback.swap_decision is not None and callback.swap_decision.reason is Reason.SWAP_EPOCH
    assert CountingAdam.steps == 2 * trainer.num_training_batches


def test_step_based_checks():
    callback, steps = swap_at(1, check_every_n_steps=4), SecondPhaseSteps()
    trainer = fit(TinyClassifier(), callback, steps, max_epochs=3)
    # The swap at step 8, with the first epoch's last batch; the second phase reports once per step (per epoch).
    assert [r["step"] for r in callback.history[:4]] == [4, 8, 16, 24]
    assert callback.swap_step is not None and callback.swap_step % 4 == 0
    assert_steps(trainer, steps, "lbfgs", 2)


@both_second_phases
def test_checked_by_steps_the_bound_swaps_at_its_epochs_end_and_every_cg_iteration_is_checked(second):
    # 8 batches per epoch, checks every 3 steps: the bound of 2 epochs falls at step 16, between two step checks.
    callback, steps = swap_at(2, check_every_n_steps=3, optimizer=second), SecondPhaseSteps()
    trainer = fit(TinyClassifier(), callback, steps, max_epochs=5)
    assert (callback.swap_epoch, callback.swap_step) == (2, 16)
    cg_checks = [(r["epoch"], r["step"]) for r in callback.history if r["phase"] == "second"]
    assert cg_checks == [(3, 24), (4, 32), (5, 40)]  # one per second-phase step, at its epoch's end
    assert_steps(trainer, steps, second, 3)


@both_second_phases
def test_swap_epoch_zero_runs_conjugate_gradient_from_the_start(second):
    CountingAdam.steps = 0
    callback, steps = swap_at(0, optimizer={"name": second, "preconditioner": "none"}), SecondPhaseSteps()
    trainer = fit(CountingClassifier(), callback, steps, max_epochs=3)
    assert (callback.swap_epoch, callback.swap_step, CountingAdam.steps) == (0, 0, 0)
    assert assert_steps(trainer, steps, second, 3).preconditioner is None
    assert [record["phase"] for record in callback.history] == ["second"] * 3


class LossBelow(SwapDetector):
    """A user's detector (the docs' example): swap once the mean loss of a check is below a threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.checks: list[tuple[float, int, int]] = []

    def update(self, loss: float, grad_norm: float, *, epoch: int, step: int) -> Decision:
        self.checks.append((loss, epoch, step))
        below = loss < self.threshold
        return Decision(below, Reason.RULE if below else Reason.WAITING, f"the loss {loss:.4g} vs {self.threshold}")

    def state_dict(self) -> dict[str, Any]:
        return {"checks": list(self.checks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checks = list(state["checks"])


def test_a_users_detector_decides_the_swap():
    watcher = swap_at(5, detect_only=True)
    fit(TinyClassifier(), watcher, max_epochs=6)
    losses = [r["loss"] for r in watcher.history]
    threshold = (losses[1] + losses[2]) / 2  # crossed at the third check
    detector = LossBelow(threshold)
    callback = ConvexitySwapCallback(detector=detector, swap_epoch=None)
    fit(TinyClassifier(), callback, max_epochs=6)
    # Tried once on a copy before training, then the callback's own copy is asked once per check until the swap; the
    # instance passed is left as it was made.
    assert [epoch for _, epoch, _ in callback.detector.checks] == [1, 2, 3] and detector.checks == []
    assert callback.swap_epoch == 3 and callback.swap_decision.reason is Reason.RULE
    assert callback.phase == Phase.SECOND


class WrongSignature(SwapDetector):
    def update(self, loss, grad_norm):  # type: ignore[override]
        return Decision(False, Reason.WAITING)


class AnswersWith(SwapDetector):
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def update(self, loss, grad_norm, *, epoch, step):  # type: ignore[override]
        return self.answer


@pytest.mark.parametrize(
    ("detector", "match"),
    [
        (WrongSignature(), r"cannot be called as update\(loss, grad_norm, \*, epoch, step\)"),
        (AnswersWith(None), "returned None of type NoneType; it must return a lightning_twophase.Decision"),
        (AnswersWith(True), "returned True of type bool"),
        (AnswersWith({"swap": True}), "returned {'swap': True} of type dict"),
    ],
    ids=["signature", "none", "bool", "dict"],
)
def test_a_users_detector_that_cannot_answer_is_refused_before_training(detector, match):
    trainer = pl.Trainer(callbacks=[ConvexitySwapCallback(detector=detector)], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(TinyClassifier())
    assert trainer.global_step == 0


class LastFifth(SwapDetector):
    """A user's detector that needs the training's length: swap in its last fifth."""

    def setup(self, max_epochs: int | None) -> None:
        self.start = int(0.8 * max_epochs)  # fails with None: the length must be the real one

    def update(self, loss: float, grad_norm: float, *, epoch: int, step: int) -> Decision:
        late = epoch >= self.start
        return Decision(late, Reason.RULE if late else Reason.WAITING, f"epoch {epoch}, last fifth from {self.start}")


def test_a_users_detector_is_tried_with_the_trainings_real_length():
    callback = ConvexitySwapCallback(detector=LastFifth(), swap_epoch=None)
    fit(TinyClassifier(), callback, max_epochs=5)
    assert callback.swap_epoch == 4 and callback.swap_decision.reason is Reason.RULE


def test_a_swap_epoch_as_a_fraction_of_max_epochs_or_of_max_steps():
    callback = swap_at(0.3)
    fit(TinyClassifier(), callback, max_epochs=10)
    assert callback.swap_epoch == 3
    # Bounded by steps only: max_steps=100 of 8 batches per epoch is 13 epochs; 30 % of them is 4.
    by_steps = swap_at(0.3)
    fit(TinyClassifier(), by_steps, max_epochs=-1, max_steps=100)
    assert by_steps.swap_epoch == 4
    # With accumulation Lightning also steps on an epoch's incomplete last group: 8 batches in threes are 3 steps per
    # epoch, so max_steps=30 is 10 epochs, and 70 % of them is epoch 7 (not 8, as 8 / 3 steps per epoch would give).
    # The CG phase steps on every batch: the 9 steps left after the swap hold one whole iteration of 8 batches.
    accumulated = swap_at(0.7)
    fit(TinyClassifier(), accumulated, max_epochs=-1, max_steps=30, accumulate_grad_batches=3)
    assert accumulated.swap_epoch == 7


# ----------------------------------------------------------------------------------------------------------------
# Refusals, each before any training
# ----------------------------------------------------------------------------------------------------------------


class ManualModule(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


class TwoOptimizers(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        return [torch.optim.Adam(self.net[0].parameters()), torch.optim.Adam(self.net[2].parameters())]


class NoOptimizer(TinyClassifier):
    def configure_optimizers(self) -> Any:
        return None


@pytest.mark.parametrize(
    ("model", "overrides", "match"),
    [
        (ManualModule(), {}, "manual optimization"),
        (TwoOptimizers(), {}, "manual optimization"),
        (TinyClassifier(), {"callbacks_extra": [GradientAccumulationScheduler({0: 2})]}, "GradientAccumulation"),
        (TinyClassifier(), {"max_epochs": -1, "fixed": 0.3}, "fraction of the training's length, but it is unknown"),
        (TinyClassifier(), {"precision": "bf16-true"}, "precision='bf16-true' keeps the weights in bfloat16, so"),
        (TinyClassifier(), {"precision": "16-true"}, "precision='16-true' keeps the weights in float16, so"),
    ],
)
def test_refusals_are_clear_and_come_before_training(model, overrides, match):
    extra = overrides.pop("callbacks_extra", [])
    callback = swap_at(overrides.pop("fixed", 1))
    trainer = pl.Trainer(callbacks=[callback, *extra], **trainer_kwargs(**overrides))
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(model)
    assert trainer.global_step == 0


def test_a_module_without_optimizer_is_refused_before_training():
    trainer = pl.Trainer(callbacks=[ConvexitySwapCallback()], **trainer_kwargs())
    with pytest.raises(MisconfigurationException, match="exactly one optimizer"):
        trainer.fit(NoOptimizer())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("module", "name", "match"),
    [
        ("lightning.pytorch.strategies.deepspeed", "DeepSpeedStrategy", "without a closure"),
        ("lightning.pytorch.strategies.fsdp", "FSDPStrategy", "shards the parameters"),
        ("lightning.pytorch.strategies.xla", "XLAStrategy", "lazily"),
        ("lightning.pytorch.strategies.model_parallel", "ModelParallelStrategy", "DTensors"),
    ],
)
def test_unsupported_strategies_are_named_with_the_reason(module, name, match):
    import importlib

    cls = getattr(importlib.import_module(module), name)
    strategy = object.__new__(cls)  # the real class; its set-up needs hardware this machine lacks
    assert match in unsupported_strategy(strategy)


def test_single_device_and_ddp_are_supported():
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    assert unsupported_strategy(SingleDeviceStrategy("cpu")) is None
    assert unsupported_strategy(DDPStrategy()) is None


def test_minibatch_phase_warns_loudly():
    with pytest.warns(UserWarning, match="numerically unsound"):
        fit(TinyClassifier(), swap_at(1, batches_per_iteration=1), max_epochs=2)


@both_second_phases
def test_gradient_clipping_is_turned_off_and_accumulation_set_to_one_at_the_swap(second):
    callback, steps = swap_at(1, optimizer=second), SecondPhaseSteps()
    with pytest.warns(UserWarning) as record:
        trainer = fit(TinyClassifier(), callback, steps, max_epochs=3, gradient_clip_val=0.5, accumulate_grad_batches=2)
    messages = " ".join(str(w.message) for w in record)
    assert "gradient clipping" in messages and "accumulate_grad_batches=2" in messages
    assert trainer.gradient_clip_val is None and trainer.accumulate_grad_batches == 1
    assert_steps(trainer, steps, second, 2)  # one step per epoch on all 8 batches, not one per 2 accumulated


# ----------------------------------------------------------------------------------------------------------------
# The CG phase keeps Lightning working: logging, metrics, monitors, precision
# ----------------------------------------------------------------------------------------------------------------


class MetricClassifier(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.accuracy = MulticlassAccuracy(num_classes=3)
        self.updates_per_epoch: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        logits = self(inputs)
        self.accuracy.update(logits, labels)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.updates_per_epoch.append(self.accuracy._update_count)
        self.accuracy.reset()


class RecordLoggedLoss(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


@both_second_phases
def test_trial_evaluations_do_not_pollute_logs_or_metrics(second):
    model = MetricClassifier()
    recorder = RecordLoggedLoss()
    callback = swap_at(1, optimizer=second)
    trainer = fit(model, callback, recorder, max_epochs=4)
    batches = trainer.num_training_batches
    # Line searches ran training_step many more times than the loop's 3 passes (CG: forward-only trial points;
    # L-BFGS: a gradient at every trial point), but neither the metric nor self.log saw them.
    totals = second_optimizer(trainer, second).totals
    assert totals["value_evaluations" if second == "cg" else "gradient_evaluations"] > 3
    assert model.updates_per_epoch == [batches] * 4
    cg_checks = [r for r in callback.history if r["phase"] == "second"]
    # The logged epoch mean equals the CG iteration's start loss: the same batches at the same point.
    for logged, check in zip(recorder.losses[1:], cg_checks):
        assert logged == pytest.approx(check["loss"], rel=1e-5)


@both_second_phases
def test_learning_rate_monitor_keeps_working(tmp_path, second):
    from lightning.pytorch.loggers import CSVLogger

    monitor = LearningRateMonitor(logging_interval="epoch")
    callback = swap_at(1, optimizer=second)
    fit(TinyClassifier(), callback, monitor, max_epochs=3, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    assert set(monitor.lrs) >= {"lr-Adam", f"lr-{SECOND_PHASE_CLASSES[second].__name__}"}


@both_second_phases
def test_bf16_mixed_on_cpu(second):
    callback, steps = swap_at(2, optimizer=second), SecondPhaseSteps()
    trainer = fit(TinyClassifier(), callback, steps, max_epochs=5, precision="bf16-mixed")
    assert assert_steps(trainer, steps, second, 3).totals["line_search_failures"] == 0
    losses = [r["loss"] for r in callback.history]
    assert losses[-1] < losses[1]


def test_without_a_swap_the_default_rule_costs_no_gradient_pass():
    # The plateau rule reads the epoch's mean loss; the sampled gradient norm reuses the step's own gradient. A run
    # that never swaps spends exactly the first optimizer's passes: forward + backward of 240 samples per epoch.
    callback = ConvexitySwapCallback(swap_epoch=None)
    fit(TinyClassifier(samples=240), callback, max_epochs=4)
    assert callback.phase == Phase.FIRST
    assert callback.compute == 4 * 3 * 240


@both_second_phases
def test_compute_counts_forward_and_backward_passes(second):
    callback = swap_at(1, optimizer=second)
    trainer = fit(TinyClassifier(samples=240), callback, max_epochs=2)
    totals = second_optimizer(trainer, second).totals
    # Epoch 1 (Adam): forward + backward of 240 samples = 3 x 240. Epoch 2 (one step of the second phase): the loop's
    # own pass (3 x 240) is the step's first gradient evaluation; 3 x 240 per further gradient evaluation.
    expected = 3 * 240 + 3 * 240 + 3 * 240 * (totals["gradient_evaluations"] - 1)
    if second == "cg":
        # One forward pass of 240 samples per value evaluation, and the one forward pass with which the first value
        # evaluation compared the batches joined in a chunk with batch by batch.
        assert totals["iterations"] == 1
        expected += 240 * (totals["value_evaluations"] + 1)
    else:
        # No value-only evaluation: the first trial gradient is preceded by the two forward passes (batch by batch,
        # and the batches joined in a chunk) that decide how trial points are evaluated.
        assert totals["value_evaluations"] == 0 and totals["gradient_evaluations"] > 1
        expected += 2 * 240
    assert callback.compute == expected
    assert callback.history[-1]["compute"] == expected


# ----------------------------------------------------------------------------------------------------------------
# Bad numbers and the fallback
# ----------------------------------------------------------------------------------------------------------------


class TurnsNaN(TinyClassifier):
    """The loss becomes NaN from a given epoch on (a diverged model, a corrupted batch...)."""

    def __init__(self, nan_from_epoch: int) -> None:
        super().__init__()
        self.nan_from_epoch = nan_from_epoch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.current_epoch >= self.nan_from_epoch else loss


def test_non_finite_loss_in_the_cg_phase_stops_with_weights_intact():
    # Never handed to the first optimizer (a gradient method would turn every weight into NaN): a clear error.
    model = TurnsNaN(nan_from_epoch=2)
    callback = swap_at(1)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=3))
    before: dict[str, torch.Tensor] = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer.callbacks.append(Snapshot())
    with pytest.raises(FloatingPointError, match="not finite on batches"):
        trainer.fit(model)
    assert callback.phase == Phase.SECOND and callback.fallback_decision is None
    # The CG step refused to move from its non-finite start: the weights are those the epoch began with.
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(value, before[name]), name


def test_without_fallback_a_non_finite_loss_is_a_clear_error():
    callback = swap_at(1, fallback=False)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=3))
    with pytest.raises(FloatingPointError, match="not finite where the step starts"):
        trainer.fit(TurnsNaN(nan_from_epoch=2))


#: A first trial step a million times too long with a single evaluation allowed: every line search fails.
FAILING_SEARCHES = {
    "lbfgs": {"name": "lbfgs", "lr": 1e6, "max_evals": 1},
    "cg": {"name": "cg", "lr": 1e6, "line_search": "armijo", "max_evals": 1},
}


@both_second_phases
def test_repeated_line_search_failures_fall_back_to_the_first_optimizer(second):
    callback = swap_at(1, optimizer=FAILING_SEARCHES[second], fallback=FallbackPolicy(after_failures=2))
    with pytest.warns(UserWarning, match="2 consecutive line searches"):
        trainer = fit(TinyClassifier(), callback, max_epochs=5)
    assert callback.phase == Phase.FALLBACK and callback.fallback_decision.reason is Reason.LINE_SEARCH_FAILURES
    adam = trainer.optimizers[0]
    assert isinstance(adam, torch.optim.Adam)
    # The fallback resumed the very same Adam with its moments, and it went on stepping.
    step = next(iter(adam.state.values()))["step"]
    assert float(step) == 3 * trainer.num_training_batches


# ----------------------------------------------------------------------------------------------------------------
# Second-phase settings and swap settings refused before the first phase, not at the swap
# ----------------------------------------------------------------------------------------------------------------


class TwoGroups(TinyClassifier):
    def configure_optimizers(self) -> Any:
        return torch.optim.Adam([{"params": self.net[0].parameters()}, {"params": self.net[2].parameters()}])


def lbfgs(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(groups, max_iter=1)


def plateau(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)


@pytest.mark.parametrize(
    ("model", "callback_kwargs", "trainer_overrides", "match"),
    [
        (TwoGroups(), {"optimizer": lbfgs}, {}, "second-phase optimizer cannot be built.*per-parameter options"),
        (TinyClassifier(), {"scheduler_factory": plateau}, {}, "scheduler_factory.*monitor"),
        (TinyClassifier(), {"swap_epoch": 0.1, "detector": None}, {"max_epochs": 4}, "rounds to no epoch"),
        (TinyClassifier(), {"swap_epoch": 3, "min_epochs": 5}, {"max_epochs": 10}, "min_epochs=5 comes after"),
        (
            TinyClassifier(),
            {"detector": PlateauDetector(window=0.2), "swap_epoch": None},
            {"max_epochs": -1},
            "pass the window as a number of epochs",
        ),
    ],
    ids=[
        "lbfgs-groups",
        "plateau-without-monitor",
        "fraction-rounds-to-0",
        "min-epochs-after-bound",
        "window-of-unknown-length",
    ],
)
def test_settings_that_would_fail_or_never_act_are_refused_before_training(
    model, callback_kwargs, trainer_overrides, match
):
    callback = ConvexitySwapCallback(**callback_kwargs)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(**trainer_overrides))
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(model)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "expected_reason"),
    [
        ({"detector": None, "swap_epoch": 2}, Reason.SWAP_EPOCH),
        # The paper's rule with patience no curve meets: the bound decides.
        ({"detector": GradientNormPeakDetector(patience=100), "swap_epoch": 2}, Reason.SWAP_EPOCH),
        # A rule that fires at the first check it may: held back by min_epochs, then it decides.
        (
            {
                "detector": GradientNormPeakDetector(factor=0.999, require_rise=False),
                "min_epochs": 2,
                "swap_epoch": 0.7,
            },
            Reason.NORM_PEAK,
        ),
    ],
    ids=["swap-epoch", "bound-with-a-rule", "min-epochs"],
)
def test_step_checks_count_the_epoch_that_just_ended(kwargs, expected_reason):
    CountingAdam.steps = 0
    callback = ConvexitySwapCallback(check_every_n_steps=8, **kwargs)
    trainer = fit(CountingClassifier(), callback, max_epochs=4)
    assert trainer.num_training_batches == 8
    assert callback.swap_epoch == 2 and callback.swap_decision.reason is expected_reason
    assert CountingAdam.steps == 2 * 8  # Adam trained exactly those epochs
    held_back = [r for r in callback.history if r["step"] < 16]
    assert all(r["phase"] == "first" for r in held_back)


def test_no_swap_on_a_non_finite_check_not_even_at_the_bound():
    # A first optimizer that diverged is no point to start conjugate gradient from: the swap waits for a finite check.
    callback = swap_at(1)
    with pytest.warns(UserWarning, match="the training loss nan is not finite"):
        fit(TurnsNaN(nan_from_epoch=0), callback, max_epochs=3)
    assert callback.phase == Phase.FIRST and callback.swap_decision is None
    assert callback.history[-1]["loss"] != callback.history[-1]["loss"]  # NaN, recorded as it was


def test_a_run_whose_every_check_is_non_finite_says_so(caplog):
    import logging

    callback = ConvexitySwapCallback(detector="paper", swap_epoch=None)
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(caplog.handler)  # Lightning's logger may not propagate to the root logger
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            fit(TurnsNaN(nan_from_epoch=0), callback, max_epochs=2)
    finally:
        lightning_logger.removeHandler(caplog.handler)
    assert "every check had a non-finite loss" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# The CG phase where it pays, and the progress guard where it does not
# ----------------------------------------------------------------------------------------------------------------


class RealizableRegression(TinyClassifier):
    """Least squares with an exact solution (the loss can reach 0): a quadratic, where CG is far ahead of Adam."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(240, 8, generator=generator, dtype=torch.float64)
        self.targets = self.inputs @ torch.randn(8, 1, generator=generator, dtype=torch.float64)
        self.net = nn.Linear(8, 1, bias=False).double()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.inputs, self.targets), batch_size=32)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.inputs[:32], self.targets[:32]), batch_size=32)


def test_on_a_quadratic_the_default_cg_phase_is_far_ahead_of_adam_and_the_guard_keeps_it():
    callback = ConvexitySwapCallback()  # the defaults: 30 % of 10 epochs at the latest
    fit(RealizableRegression(), callback, max_epochs=10, precision="64-true")
    adam = RealizableRegression()
    fit(adam, max_epochs=10, precision="64-true")
    assert callback.swap_epoch <= 3 and callback.phase == Phase.SECOND
    full = (adam.inputs, adam.targets)
    adam_loss = float(nn.functional.mse_loss(adam.net(full[0]), full[1]))
    assert callback.history[-1]["loss"] < 0.2 * adam_loss  # 0.28 against 2.9
    # The inputs are white noise, so the Hessian is close to the identity and plain CG needs no preconditioner: in the
    # same three iterations it falls by three orders of magnitude, where Adam's diagonal (gradient scales, not
    # curvature) slows it down.
    plain = ConvexitySwapCallback(optimizer={"preconditioner": "none"})
    fit(RealizableRegression(), plain, max_epochs=10, precision="64-true")
    assert plain.history[-1]["loss"] < 1e-3 * plain.history[plain.swap_epoch - 1]["loss"]
    assert plain.history[-1]["loss"] < 1e-2 * adam_loss  # 0.0033


@both_second_phases
def test_the_progress_guard_returns_to_the_first_optimizer_when_cg_falls_far_behind(second):
    # The second phase with a first trial step too short to matter and one trial per search: it barely moves, where
    # Adam's curve over its first three epochs projects a clear decrease.
    optimizer = {"name": second, "lr": 1e-12, "max_evals": 1}
    callback = swap_at(3, optimizer=optimizer, fallback=FallbackPolicy(progress_window=3))
    with pytest.warns(UserWarning, match="the first optimizer's curve"):
        trainer = fit(TinyClassifier(), callback, max_epochs=12)
    assert callback.phase == Phase.FALLBACK
    assert callback.fallback_decision.reason is Reason.BEHIND_FIRST_OPTIMIZER
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)
    # Judged every 3 checks, against the first optimizer's curve at the same compute. A CG epoch costs 720 here (one
    # iteration), so at the third check the first CG iteration's drop (its exact loss at the end of Adam's last epoch,
    # against that epoch's mean) is still a quarter of the projection, at the sixth no longer. An L-BFGS epoch costs
    # three gradient passes, 2160 (two iterations of one trial each, the second finding no change), so at its third
    # check it is already behind. The swap is made once: after the fallback the first optimizer trains to the end.
    second_checks = 6 if second == "cg" else 3
    expected = ["first"] * 3 + ["second"] * second_checks + ["fallback"] * (6 - second_checks + 3)
    assert [r["phase"] for r in callback.history] == expected


@both_second_phases
@pytest.mark.parametrize("same_trainer", [False, True], ids=["new-trainer", "same-trainer"])
def test_a_second_fit_with_the_same_callback_goes_on_in_the_phase_it_reports(same_trainer, second):
    callback, steps = swap_at(1, optimizer=second), SecondPhaseSteps()
    model = TinyClassifier()
    trainer = fit(model, callback, steps, max_epochs=2)
    assert callback.phase == Phase.SECOND and len(callback.history) == 2
    iterations = assert_steps(trainer, steps, second, 1).totals["iterations"]
    steps.steps.clear()
    if same_trainer:
        trainer.fit_loop.max_epochs = 4
        trainer.fit(model)
    else:
        trainer = fit(model, callback, steps, max_epochs=2)
    # The second phase trains the second fit, its state carried over (the counts go on from the first fit's); phase,
    # checks and compute go on.
    optimizer = second_optimizer(trainer, second)
    assert len(steps.steps) == 2
    assert optimizer.totals["iterations"] == iterations + sum(step.iterations for step in steps.steps)
    if second == "cg":
        assert optimizer.totals["iterations"] == iterations + 2  # one CG iteration per epoch
    assert callback.phase == Phase.SECOND and float(trainer.callback_metrics["twophase/phase"]) == 1.0
    assert [r["phase"] for r in callback.history] == ["first", "second", "second", "second"]
    computes = [r["compute"] for r in callback.history]
    assert computes == sorted(computes) and computes[-1] > computes[1]
    # The first optimizer of the new fit holds the old one's state, for a fallback.
    first = callback._cg.first.optimizers[0]  # type: ignore[union-attr]
    assert isinstance(first, torch.optim.Adam) and first.state[next(iter(model.parameters()))]["step"] == 8


def test_a_second_fit_before_the_swap_goes_on_detecting_on_the_new_fits_optimizer():
    callback = ConvexitySwapCallback(detector=GradientNormPeakDetector(patience=100), swap_epoch=None)
    fit(TinyClassifier(), callback, max_epochs=2)
    trainer = fit(TinyClassifier(seed=1), callback, max_epochs=2)  # another model object: its own parameters
    assert callback.phase == Phase.FIRST and isinstance(trainer.optimizers[0], torch.optim.Adam)
    assert len(callback.history) == 4
    assert all(math.isfinite(record["grad_norm"]) for record in callback.history)


@needs_cpu_grad_scaler
def test_a_crash_in_the_cg_phase_gives_the_precision_plugin_its_own_step_back():
    plugin = scaler_plugin()
    trainer = pl.Trainer(callbacks=[swap_at(1)], **trainer_kwargs(max_epochs=3, plugins=[plugin]))
    with pytest.raises(FloatingPointError):
        trainer.fit(TurnsNaN(nan_from_epoch=2))
    # The CG phase had the plugin hand it the loop's closure; after the crash the plugin steps as Lightning's does.
    assert "optimizer_step" not in vars(plugin)


# ----------------------------------------------------------------------------------------------------------------
# Issue 28: a detector reused over runs, a user's detector's own settings and answers, trainings of one epoch
# ----------------------------------------------------------------------------------------------------------------


def test_one_configured_detector_serves_a_loop_over_seeds():
    detector = PlateauDetector(window=2, min_improvement=0.2)
    runs = []
    for _ in range(2):  # the same run twice, as a loop over seeds would make it
        callback = ConvexitySwapCallback(detector=detector, swap_epoch=None)
        fit(TinyClassifier(), callback, max_epochs=12)
        runs.append(callback)
    first, second = runs
    assert first.swap_epoch is not None and second.swap_epoch == first.swap_epoch
    assert [r["loss"] for r in second.history] == pytest.approx([r["loss"] for r in first.history])
    # Each callback works on its own copy: the instance that configured both is as it was made.
    assert detector.points == [] and first.detector.points and first.detector is not second.detector


def test_a_detector_that_cannot_be_copied_is_used_as_it_is_with_a_warning():
    import threading

    detector = LossBelow(0.1)
    detector.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.warns(UserWarning, match="LossBelow cannot be copied.*pass a new instance to each callback"):
        callback = ConvexitySwapCallback(detector=detector)
    assert callback.detector is detector


class NormEvery(LossBelow):
    def __init__(self, every: Any) -> None:
        super().__init__(0.0)
        self.norm_every_n_steps = every


@pytest.mark.parametrize("every", [0, None, 2.5], ids=["zero", "none", "fraction"])
def test_a_users_norm_interval_that_cannot_work_is_refused_when_the_callback_is_made(every):
    with pytest.raises((TypeError, ValueError), match=r"NormEvery: `norm_every_n_steps` must be .*gradient norm"):
        ConvexitySwapCallback(detector=NormEvery(every))


class WithScalars(SwapDetector):
    """A user's detector that logs one measure of its own with every answer."""

    def __init__(self, scalars: Any) -> None:
        self.scalars = scalars

    def update(self, loss, grad_norm, *, epoch, step):  # type: ignore[override]
        return Decision(epoch >= 2, Reason.RULE if epoch >= 2 else Reason.WAITING, f"epoch {epoch}", self.scalars)


@pytest.mark.parametrize(
    ("scalars", "match"),
    [
        ({"twophase/mine": [1.0, 2.0]}, r"scalars\['twophase/mine'\]` must be a real number, got \[1.0, 2.0\]"),
        ({"twophase/loss": 0.5}, "may not use the name 'twophase/loss'"),
        ({"grad_norm": 0.5}, "may not use the name 'grad_norm'"),
        ({"twophase/second/beta": 0.5}, "may not use the name 'twophase/second/beta'"),
    ],
    ids=["list", "reserved-tag", "reserved-column", "reserved-cg-tag"],
)
def test_a_users_detector_answering_with_scalars_that_cannot_be_logged_is_refused_before_training(scalars, match):
    trainer = pl.Trainer(callbacks=[ConvexitySwapCallback(detector=WithScalars(scalars))], **trainer_kwargs())
    refused = f"WithScalars answers with a Decision that is refused.*{match}"
    with pytest.raises(MisconfigurationException, match=refused):
        trainer.fit(TinyClassifier())
    assert trainer.global_step == 0


def test_numpy_scalars_of_a_users_detector_leave_a_checkpoint_lightning_loads_by_default(tmp_path):
    import numpy as np
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path: str | None = None) -> ConvexitySwapCallback:
        callback = ConvexitySwapCallback(detector=WithScalars({"twophase/mine": np.float32(0.5)}), swap_epoch=None)
        checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
        kwargs = trainer_kwargs(max_epochs=4, enable_checkpointing=True)
        pl.Trainer(callbacks=[callback, checkpoints], **kwargs).fit(TinyClassifier(), ckpt_path=ckpt_path)
        return callback

    reference = run()
    resumed = run(str(tmp_path / "epoch=1.ckpt"))  # Lightning's own load
    assert resumed.history == reference.history and resumed.swap_decision == reference.swap_decision
    torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)  # plain numbers only
    assert type(reference.history[0]["mine"]) is float and reference.swap_decision.scalars == {"twophase/mine": 0.5}


def adam_trained_to_the_end(trainer: pl.Trainer, callback: ConvexitySwapCallback) -> None:
    assert callback.phase == Phase.FIRST and callback.swap_epoch is None and callback.swap_decision is None
    assert isinstance(trainer.optimizers[0], torch.optim.Adam) and trainer.global_step > 0


@pytest.mark.parametrize(
    ("callback_kwargs", "trainer_overrides"),
    [
        ({}, {"max_epochs": 1}),
        ({"detector": None, "swap_epoch": 0.7}, {"max_epochs": 1}),
        ({"detector": "paper"}, {"max_epochs": 1}),
        ({}, {"max_epochs": -1, "max_steps": 5}),
        ({"detector": None, "swap_epoch": 0.7}, {"max_epochs": -1, "max_steps": 5}),
        ({}, {"fast_dev_run": True}),
        ({"detector": None, "swap_epoch": 0.3}, {"fast_dev_run": True}),
        ({"detector": None, "swap_epoch": 0}, {"max_epochs": -1, "max_steps": 5}),
        ({"detector": None, "swap_epoch": 10}, {"max_epochs": 4}),
        ({"detector": None, "swap_epoch": 0.9}, {"max_epochs": 2}),
        ({"detector": AnswersWith(Decision(True, Reason.RULE, "now")), "swap_epoch": None}, {"max_epochs": 1}),
    ],
    ids=[
        "bound-of-1-epoch",
        "fixed-fraction-of-1-epoch",
        "paper-1-epoch",
        "bound-in-max-steps",
        "fixed-in-max-steps",
        "fast-dev-run",
        "fixed-fast-dev-run",
        "cg-from-start-in-max-steps",
        "fixed-beyond-max",
        "fixed-fraction-to-max",
        "rule-at-the-last-epoch",
    ],
)
def test_no_swap_that_would_leave_no_complete_second_phase_iteration(callback_kwargs, trainer_overrides):
    callback = ConvexitySwapCallback(**callback_kwargs)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(**trainer_overrides))
    with pytest.warns(UserWarning, match="first optimizer trains to the end") as warned:
        trainer.fit(TinyClassifier())
    adam_trained_to_the_end(trainer, callback)
    assert sum("first optimizer trains to the end" in str(w.message) for w in warned) == 1  # said once


def test_a_swap_with_an_iteration_after_it_still_comes_in_a_short_training():
    # Two epochs: the bound at the first epoch's end leaves one whole CG iteration; checked by steps in one epoch, a
    # rule's swap that leaves whole macro-batches swaps too.
    callback, steps = swap_at(1), SecondPhaseSteps()
    trainer = fit(TinyClassifier(), callback, steps, max_epochs=2)
    assert callback.swap_epoch == 1
    assert_steps(trainer, steps, "lbfgs", 1)
    rule = ConvexitySwapCallback(
        detector=AnswersWith(Decision(True, Reason.RULE, "now")), check_every_n_steps=4, batches_per_iteration=4
    )
    steps = SecondPhaseSteps()
    trainer = fit(TinyClassifier(), rule, steps, max_epochs=1)
    assert rule.swap_step == 4
    assert_steps(trainer, steps, "lbfgs", 1)


# ----------------------------------------------------------------------------------------------------------------
# A swap decided within an epoch (issue 28)
# ----------------------------------------------------------------------------------------------------------------


class SwapFromStep(SwapDetector):
    """A user's detector that swaps at the first check at or after a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def update(self, loss: float, grad_norm: float, *, epoch: int, step: int) -> Decision:
        due = step >= self.step
        return Decision(due, Reason.RULE if due else Reason.WAITING, f"step {step} vs {self.step}")


class EpochStartLoss(pl.Callback):
    """The training set's mean loss at the start of every epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, float] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        inputs, labels = blobs(pl_module.samples, pl_module.features, pl_module.classes).tensors
        with torch.no_grad():
            self.by_epoch[trainer.current_epoch] = float(nn.functional.cross_entropy(pl_module(inputs), labels))


@pytest.mark.parametrize(
    "optimizer",
    ["cg", "lbfgs", lambda groups: torch.optim.LBFGS(groups, line_search_fn="strong_wolfe")],
    ids=["cg", "lbfgs", "torch-lbfgs"],
)
def test_a_swap_decided_within_an_epoch_starts_the_second_phase_with_the_next_epoch(optimizer):
    CountingAdam.steps = 0
    # 8 batches per epoch, checks every 4 steps: the swap is decided at step 12, halfway through epoch 1.
    callback = ConvexitySwapCallback(
        detector=SwapFromStep(12), swap_epoch=None, check_every_n_steps=4, optimizer=optimizer
    )
    losses = EpochStartLoss()
    fit(CountingClassifier(), callback, losses, max_epochs=4)
    # The first optimizer finished epoch 1; the second phase started with epoch 2, and says so.
    assert CountingAdam.steps == 16
    assert (callback.swap_epoch, callback.swap_step) == (2, 16)
    assert callback.swap_decision.reason is Reason.RULE
    cg_checks = [record for record in callback.history if record["phase"] == "second"]
    assert [record["epoch"] for record in cg_checks] == [3, 4]
    # Each iteration, the first included, starts from the loss over the whole training set.
    for record, epoch in zip(cg_checks, (2, 3)):
        assert record["loss"] == pytest.approx(losses.by_epoch[epoch], rel=1e-5)
