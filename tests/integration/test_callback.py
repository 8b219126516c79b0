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

from lightning_twophase import ConjugateGradient, ConvexitySwapCallback, ProbeDetector, SwapDecision
from lightning_twophase._lightning import unsupported_strategy
from lightning_twophase._macro_batch import _MacroBatchOptimizer as MacroBatchOptimizer
from tests.conftest import PeakingClassifier, TinyClassifier, trainer_kwargs


class CountingAdam(torch.optim.Adam):
    steps = 0

    def step(self, closure=None):  # type: ignore[override]
        CountingAdam.steps += 1
        return super().step(closure)


class CountingClassifier(TinyClassifier):
    def configure_optimizers(self) -> Any:
        return CountingAdam(self.parameters(), lr=self.lr)


def fit(model: pl.LightningModule, callback: ConvexitySwapCallback, **overrides: Any) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(**overrides))
    trainer.fit(model)
    return trainer


def test_swap_installs_conjugate_gradient_and_it_is_the_one_that_steps():
    CountingAdam.steps = 0
    callback = ConvexitySwapCallback(fixed_swap_epoch=2)
    trainer = fit(CountingClassifier(), callback, max_epochs=5)
    batches = trainer.num_training_batches
    assert (callback.phase, callback.swap_epoch, callback.swap_step) == ("cg", 2, 2 * batches)
    assert CountingAdam.steps == 2 * batches  # Adam stopped stepping at the swap
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, MacroBatchOptimizer) and isinstance(optimizer.optimizer, ConjugateGradient)
    assert optimizer.optimizer.totals["iterations"] == 3  # one full-batch CG iteration per remaining epoch
    assert trainer.global_step == 5 * batches  # the training loop still counts every mini-batch
    cg_losses = [r["loss"] for r in callback.history if r["phase"] == "cg"]
    assert cg_losses == sorted(cg_losses, reverse=True)  # full-batch CG never increases the training loss


def test_old_schedulers_are_removed_at_the_swap():
    callback = ConvexitySwapCallback(fixed_swap_epoch=2)
    model = TinyClassifier(with_scheduler=True)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=5))
    trainer.fit(model)
    assert trainer.lr_scheduler_configs == []
    # The first phase's StepLR stepped at the end of the two Adam epochs only.
    assert callback._phase.first.lr_scheduler_configs[0].scheduler.last_epoch == 2


def test_scheduler_factory_gives_the_cg_phase_its_own_scheduler():
    def factory(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    callback = ConvexitySwapCallback(fixed_swap_epoch=1, scheduler_factory=factory)
    trainer = fit(TinyClassifier(), callback, max_epochs=3)
    (config,) = trainer.lr_scheduler_configs
    assert config.scheduler.optimizer is trainer.optimizers[0]
    assert config.scheduler.last_epoch == 2


def test_detection_from_the_curve_swaps_after_the_peak():
    callback = ConvexitySwapCallback(detector="paper", factor=0.9)
    fit(PeakingClassifier(), callback, max_epochs=10)
    first_phase = [r["grad_norm"] for r in callback.history if r["phase"] == "first"]
    peak_epoch = first_phase.index(max(first_phase)) + 1
    assert callback.swap_epoch is not None and peak_epoch < callback.swap_epoch <= 10
    # The swap came at the first check below 0.9 x the peak, not before.
    assert first_phase[callback.swap_epoch - 1] < 0.9 * max(first_phase)
    assert all(norm >= 0.9 * max(first_phase[:i]) for i, norm in enumerate(first_phase[:-1], start=1) if i > 1)
    assert "stayed below 0.9 x its peak" in callback.swap_reason


def test_detect_only_never_swaps_but_reports_the_point():
    CountingAdam.steps = 0
    callback = ConvexitySwapCallback(fixed_swap_epoch=2, detect_only=True)
    trainer = fit(CountingClassifier(), callback, max_epochs=4)
    assert callback.phase == "first" and callback.swap_epoch == 2
    assert isinstance(trainer.optimizers[0], CountingAdam)
    assert CountingAdam.steps == 4 * trainer.num_training_batches


def test_step_based_checks():
    callback = ConvexitySwapCallback(check_every_n_steps=4, fixed_swap_epoch=1)
    trainer = fit(TinyClassifier(), callback, max_epochs=3)
    # The swap at step 8, with the first epoch's last batch; the CG phase reports once per iteration (per epoch).
    assert [r["step"] for r in callback.history[:4]] == [4, 8, 16, 24]
    assert callback.swap_step is not None and callback.swap_step % 4 == 0
    assert trainer.optimizers[0].optimizer.totals["iterations"] >= 2


def test_fixed_swap_epoch_zero_runs_conjugate_gradient_from_the_start():
    CountingAdam.steps = 0
    callback = ConvexitySwapCallback(fixed_swap_epoch=0, preconditioner="none")
    trainer = fit(CountingClassifier(), callback, max_epochs=3)
    assert (callback.swap_epoch, callback.swap_step, CountingAdam.steps) == (0, 0, 0)
    assert trainer.optimizers[0].optimizer.totals["iterations"] == 3
    assert [record["phase"] for record in callback.history] == ["cg"] * 3


class LossBelow:
    """A user's detector (the docs' example): swap once the mean loss of a check is below a threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.checks: list[tuple[float, int, int]] = []

    def update(self, loss: float, grad_norm: float, *, epoch: int, step: int) -> SwapDecision:
        self.checks.append((loss, epoch, step))
        return SwapDecision(loss < self.threshold, f"the loss {loss:.4g} is below {self.threshold}")

    def state_dict(self) -> dict[str, Any]:
        return {"checks": list(self.checks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checks = list(state["checks"])


def test_a_users_detector_decides_the_swap():
    losses = [
        r["loss"]
        for r in fit(TinyClassifier(), ConvexitySwapCallback(detect_only=True), max_epochs=6).callbacks[0].history
    ]
    threshold = (losses[1] + losses[2]) / 2  # crossed at the third check
    detector = LossBelow(threshold)
    callback = ConvexitySwapCallback(detector=detector)
    fit(TinyClassifier(), callback, max_epochs=6)
    assert [epoch for _, epoch, _ in detector.checks] == [1, 2, 3]  # asked once per check until the swap
    assert callback.swap_epoch == 3 and callback.swap_reason.startswith("the loss")
    assert callback.phase == "cg"


def test_fraction_of_max_epochs():
    callback = ConvexitySwapCallback(fixed_swap_epoch=0.3)
    fit(TinyClassifier(), callback, max_epochs=10)
    assert callback.swap_epoch == 3


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
        (TinyClassifier(), {"max_epochs": -1, "max_steps": 100, "fixed": 0.3}, "no max_epochs"),
        (TinyClassifier(), {"precision": "bf16-true"}, "precision='bf16-true' keeps the weights in bfloat16, so"),
        (TinyClassifier(), {"precision": "16-true"}, "precision='16-true' keeps the weights in float16, so"),
    ],
)
def test_refusals_are_clear_and_come_before_training(model, overrides, match):
    extra = overrides.pop("callbacks_extra", [])
    callback = ConvexitySwapCallback(fixed_swap_epoch=overrides.pop("fixed", 1))
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
        fit(TinyClassifier(), ConvexitySwapCallback(fixed_swap_epoch=1, cg_phase="minibatch"), max_epochs=2)


def test_gradient_clipping_is_turned_off_and_accumulation_set_to_one_at_the_swap():
    callback = ConvexitySwapCallback(fixed_swap_epoch=1)
    with pytest.warns(UserWarning) as record:
        trainer = fit(TinyClassifier(), callback, max_epochs=3, gradient_clip_val=0.5, accumulate_grad_batches=2)
    messages = " ".join(str(w.message) for w in record)
    assert "gradient clipping" in messages and "accumulate_grad_batches=2" in messages
    assert trainer.gradient_clip_val is None and trainer.accumulate_grad_batches == 1
    assert trainer.optimizers[0].optimizer.totals["iterations"] == 2


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


def test_trial_evaluations_do_not_pollute_logs_or_metrics():
    model = MetricClassifier()
    recorder = RecordLoggedLoss()
    callback = ConvexitySwapCallback(fixed_swap_epoch=1)
    trainer = pl.Trainer(callbacks=[callback, recorder], **trainer_kwargs(max_epochs=4))
    trainer.fit(model)
    batches = trainer.num_training_batches
    # Line searches ran training_step many more times, but neither the metric nor self.log saw them.
    assert trainer.optimizers[0].optimizer.totals["value_evaluations"] > 3
    assert model.updates_per_epoch == [batches] * 4
    cg_checks = [r for r in callback.history if r["phase"] == "cg"]
    # The logged epoch mean equals the CG iteration's start loss: the same batches at the same point.
    for logged, check in zip(recorder.losses[1:], cg_checks):
        assert logged == pytest.approx(check["loss"], rel=1e-5)


def test_learning_rate_monitor_keeps_working(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    callback = ConvexitySwapCallback(fixed_swap_epoch=1)
    monitor = LearningRateMonitor(logging_interval="epoch")
    trainer = pl.Trainer(
        callbacks=[callback, monitor],
        **trainer_kwargs(max_epochs=3, logger=CSVLogger(tmp_path), log_every_n_steps=1),
    )
    trainer.fit(TinyClassifier())
    assert set(monitor.lrs) >= {"lr-Adam", "lr-ConjugateGradient"}


def test_bf16_mixed_on_cpu():
    callback = ConvexitySwapCallback(fixed_swap_epoch=2)
    trainer = fit(TinyClassifier(), callback, max_epochs=5, precision="bf16-mixed")
    cg = trainer.optimizers[0].optimizer
    assert cg.totals["iterations"] == 3 and cg.totals["line_search_failures"] == 0
    losses = [r["loss"] for r in callback.history]
    assert losses[-1] < losses[1]


def test_compute_counts_forward_and_backward_passes():
    callback = ConvexitySwapCallback(fixed_swap_epoch=1, trial_batching="batches")
    trainer = fit(TinyClassifier(samples=240), callback, max_epochs=2)
    cg = trainer.optimizers[0].optimizer
    # Epoch 1 (Adam): forward + backward of 240 samples = 3 x 240. Epoch 2 (CG): the loop's own pass (3 x 240),
    # one forward pass of 240 samples per value evaluation and 3 x 240 per extra gradient evaluation.
    extra_gradients = cg.totals["gradient_evaluations"] - cg.totals["iterations"]
    expected = 3 * 240 + 3 * 240 + 240 * cg.totals["value_evaluations"] + 3 * 240 * extra_gradients
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
    callback = ConvexitySwapCallback(fixed_swap_epoch=1)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=3))
    before: dict[str, torch.Tensor] = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer.callbacks.append(Snapshot())
    with pytest.raises(FloatingPointError, match="not finite on batches"):
        trainer.fit(model)
    assert callback.phase == "cg" and callback.fallback_reason is None
    # The CG step refused to move from its non-finite start: the weights are those the epoch began with.
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(value, before[name]), name


def test_without_fallback_a_non_finite_loss_is_a_clear_error():
    callback = ConvexitySwapCallback(fixed_swap_epoch=1, fallback=False)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=3))
    with pytest.raises(FloatingPointError, match="not finite where the step starts"):
        trainer.fit(TurnsNaN(nan_from_epoch=2))


def test_repeated_line_search_failures_fall_back_to_the_first_optimizer():
    # A first trial step a million times too long with a single evaluation allowed: every line search fails.
    callback = ConvexitySwapCallback(
        fixed_swap_epoch=1,
        optimizer_kwargs={"lr": 1e6, "line_search": "armijo", "max_evals": 1},
        fallback_after_failures=2,
    )
    with pytest.warns(UserWarning, match="2 consecutive line searches"):
        trainer = fit(TinyClassifier(), callback, max_epochs=5)
    assert callback.phase == "fallback"
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
        (TwoGroups(), {"optimizer_factory": lbfgs}, {}, "optimizer_factory.*per-parameter options"),
        (TinyClassifier(), {"scheduler_factory": plateau}, {}, "scheduler_factory.*monitor"),
        (TinyClassifier(), {"fixed_swap_epoch": 10}, {"max_epochs": 4}, "fixed_swap_epoch=10.*never"),
        (TinyClassifier(), {"fixed_swap_epoch": 0.1}, {"max_epochs": 4}, "rounds to 0 epochs"),
        (TinyClassifier(), {"fixed_swap_epoch": 0.9}, {"max_epochs": 2}, "never"),
    ],
    ids=["lbfgs-groups", "plateau-without-monitor", "fixed-beyond-max", "fraction-rounds-to-0", "fraction-to-max"],
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
    ("option", "fixed", "expected_swap_epoch"),
    [("fixed_swap_epoch", 2, 2), ("max_swap_epoch", 2, 2), ("min_epochs", 2, 2)],
)
def test_step_checks_count_the_epoch_that_just_ended(option, fixed, expected_swap_epoch):
    CountingAdam.steps = 0
    kwargs = {option: fixed}
    if option == "min_epochs":
        kwargs.update(detector="paper", factor=0.999, require_rise=False)  # fires at the first check it may
    callback = ConvexitySwapCallback(check_every_n_steps=8, **kwargs)
    trainer = fit(CountingClassifier(), callback, max_epochs=4)
    assert trainer.num_training_batches == 8
    assert callback.swap_epoch == expected_swap_epoch
    assert CountingAdam.steps == expected_swap_epoch * 8  # Adam trained exactly those epochs


def test_a_run_whose_every_check_is_non_finite_says_so(caplog):
    import logging

    callback = ConvexitySwapCallback()
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(caplog.handler)  # Lightning's logger may not propagate to the root logger
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            fit(TurnsNaN(nan_from_epoch=0), callback, max_epochs=2)
    finally:
        lightning_logger.removeHandler(caplog.handler)
    assert "every check had a non-finite loss or gradient norm" in caplog.text
    assert "peak gradient norm 0" not in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# The default rule: probes, the swap where CG is measured ahead, the progress guard
# ----------------------------------------------------------------------------------------------------------------


def test_probes_that_find_cg_behind_leave_training_exactly_as_the_first_optimizer_alone():
    plain = TinyClassifier()
    pl.Trainer(**trainer_kwargs(max_epochs=8)).fit(plain)
    probed = TinyClassifier()
    detector = ProbeDetector(first_probe_epoch=2, margin=1e9, spacing=(1.25, 1.5))  # never ahead by that margin
    callback = ConvexitySwapCallback(detector=detector)
    fit(probed, callback, max_epochs=8)
    assert callback.swap_epoch is None and callback.phase == "first"
    assert callback._record.probe_compute > 0  # probes ran (at epochs 3, 5 and 8) and were counted
    for a, b in zip(plain.parameters(), probed.parameters()):
        assert torch.equal(a, b)


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


def test_the_default_rule_swaps_once_a_probe_finds_cg_ahead():
    callback = ConvexitySwapCallback(detector=ProbeDetector(first_probe_epoch=3))
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=8, precision="64-true"))
    trainer.fit(RealizableRegression())
    # A quadratic: the first probe is far ahead of Adam, and the swap follows the probe run over epoch 4.
    assert callback.swap_epoch == 4 and callback.phase == "cg"
    assert "CG probe decreased ln(loss)" in callback.swap_reason
    assert [r["probe_ratio"] > 1 for r in callback.history if "probe_ratio" in r] == [True]
    at_swap = callback.history[callback.swap_epoch - 1]["loss"]
    assert callback.history[-1]["loss"] < 1e-3 * at_swap  # four CG iterations


def test_the_progress_guard_returns_to_the_first_optimizer_when_cg_is_slower():
    # CG with a first trial step too short to matter and one trial per search: it barely moves.
    callback = ConvexitySwapCallback(
        fixed_swap_epoch=3, optimizer_kwargs={"lr": 1e-12, "max_evals": 1}, fallback_progress_window=3
    )
    with pytest.warns(UserWarning, match="slower than the first optimizer's"):
        trainer = fit(TinyClassifier(), callback, max_epochs=9)
    assert callback.phase == "fallback" and "over its last 3 checks" in callback.fallback_reason
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)
    # The fixed swap is made once: after the fallback the first optimizer trains to the end.
    assert [r["phase"] for r in callback.history] == ["first"] * 3 + ["cg"] * 3 + ["fallback"] * 3


@pytest.mark.parametrize("same_trainer", [False, True], ids=["new-trainer", "same-trainer"])
def test_a_second_fit_with_the_same_callback_goes_on_in_the_phase_it_reports(same_trainer):
    callback = ConvexitySwapCallback(fixed_swap_epoch=1)
    model = TinyClassifier()
    trainer = fit(model, callback, max_epochs=2)
    assert callback.phase == "cg" and len(callback.history) == 2
    iterations = trainer.optimizers[0].optimizer.totals["iterations"]
    if same_trainer:
        trainer.fit_loop.max_epochs = 4
        trainer.fit(model)
    else:
        trainer = fit(model, callback, max_epochs=2)
    # Conjugate gradient trains the second fit, its state carried over; phase, checks and compute go on.
    assert isinstance(trainer.optimizers[0], MacroBatchOptimizer)
    assert trainer.optimizers[0].optimizer.totals["iterations"] == iterations + 2
    assert callback.phase == "cg" and float(trainer.callback_metrics["twophase/phase"]) == 1.0
    assert [r["phase"] for r in callback.history] == ["first", "cg", "cg", "cg"]
    computes = [r["compute"] for r in callback.history]
    assert computes == sorted(computes) and computes[-1] > computes[1]
    # The first optimizer of the new fit holds the old one's state, for a fallback.
    first = callback._phase.first.optimizers[0]
    assert isinstance(first, torch.optim.Adam) and first.state[next(iter(model.parameters()))]["step"] == 8


def test_a_second_fit_before_the_swap_goes_on_detecting_on_the_new_fits_optimizer():
    callback = ConvexitySwapCallback(detector="paper", patience=100)
    fit(TinyClassifier(), callback, max_epochs=2)
    trainer = fit(TinyClassifier(seed=1), callback, max_epochs=2)  # another model object: its own parameters
    assert callback.phase == "first" and isinstance(trainer.optimizers[0], torch.optim.Adam)
    assert len(callback.history) == 4
    assert all(math.isfinite(record["grad_norm"]) for record in callback.history)
