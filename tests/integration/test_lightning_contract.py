"""The Lightning behaviour lightning-twophase relies on beyond the documented API (see ``_lightning.py``).

If a Lightning upgrade changes one of these, this file fails first and names what changed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch

from lightning_twophase._lightning import (
    TrainerSettings,
    global_step_counter,
    grad_scaler,
    logging_suppressed,
    scheduler_configs,
    set_callback_metric,
    set_closure_steps,
    set_optimizers,
    step_loss,
    undo_accumulation,
)
from tests.conftest import TinyClassifier, needs_cpu_grad_scaler, scaler_plugin, trainer_kwargs


def test_the_optimizers_setter_rewraps_what_the_training_loop_steps():
    trainer = pl.Trainer(**trainer_kwargs())
    trainer.strategy._lightning_optimizers = []
    first, second = (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1) for _ in range(2))
    set_optimizers(trainer, [first])
    set_optimizers(trainer, [second])
    # The automatic loop steps `strategy._lightning_optimizers[0]`: it must wrap the new optimizer.
    assert trainer.strategy._lightning_optimizers[0].optimizer is second


class CountingSGD(torch.optim.SGD):
    """Counts its steps and records the gradient norm each step saw (after any clipping)."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=0.01)
        self.norms: list[float] = []

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = super().step(closure)
        self.norms.append(float(torch.cat([p.grad.reshape(-1) for p in self.param_groups[0]["params"]]).norm()))
        return loss


class LargeGradients(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * 1000.0


class SwapSettings(pl.Callback):
    """Epoch 1 trains with other settings, applied from a callback; epoch 2 with the captured ones again."""

    def __init__(self) -> None:
        self.captured: TrainerSettings | None = None
        self.sgd: CountingSGD | None = None
        self.steps_per_epoch: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps_per_epoch.append(trainer.global_step)
        if trainer.current_epoch == 1:
            self.captured = TrainerSettings.capture(trainer)
            self.sgd = CountingSGD(pl_module.parameters())
            configs = scheduler_configs(torch.optim.lr_scheduler.StepLR(self.sgd, step_size=1, gamma=0.5))
            TrainerSettings([self.sgd], configs, None, 1).apply(trainer)
        elif trainer.current_epoch == 2:
            assert self.captured is not None
            self.captured.apply(trainer)


def test_trainer_settings_applied_between_steps_change_the_next_steps():
    swap = SwapSettings()
    trainer = pl.Trainer(
        callbacks=[swap], **trainer_kwargs(max_epochs=3, gradient_clip_val=1.0, accumulate_grad_batches=2)
    )
    trainer.fit(LargeGradients(with_scheduler=True))
    batches = trainer.num_training_batches  # 8
    steps = [b - a for a, b in zip(swap.steps_per_epoch, [*swap.steps_per_epoch[1:], trainer.global_step])]
    assert steps == [batches // 2, batches, batches // 2]  # accumulation off in epoch 1 only
    assert swap.sgd is not None and len(swap.sgd.norms) == batches  # the new optimizer stepped, every batch
    assert min(swap.sgd.norms) > 1.0  # unclipped gradients in epoch 1
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2  # the first StepLR, stepped after epochs 0, 2
    assert swap.sgd.param_groups[0]["lr"] == pytest.approx(0.005)  # its own StepLR stepped once, after epoch 1
    assert isinstance(trainer.optimizers[0], torch.optim.Adam) and trainer.gradient_clip_val == 1.0


class SetsMetric(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_callback_metric(trainer, "twophase/test", 2.0)


def test_callback_metrics_set_at_train_end_survive_the_fit():
    trainer = pl.Trainer(callbacks=[SetsMetric()], **trainer_kwargs(max_epochs=1))
    trainer.fit(TinyClassifier())
    assert float(trainer.callback_metrics["twophase/test"]) == 2.0


def test_scheduler_configs_follow_configure_optimizers_rules():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    (plain,) = scheduler_configs(scheduler)
    assert plain.scheduler is scheduler and plain.interval == "epoch"
    (as_dict,) = scheduler_configs({"scheduler": scheduler, "interval": "step"})
    assert as_dict.interval == "step"


class Events(pl.Callback):
    """Records the order of the hooks the resume path depends on."""

    def __init__(self, log: list[str]) -> None:
        self.events = log

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events.append("callback.load_state_dict")

    def state_dict(self) -> dict[str, Any]:
        return {"present": True}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.events.append("on_fit_start")


class RecordingAdam(torch.optim.Adam):
    log: ClassVar[list[str]] = []

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        RecordingAdam.log.append("optimizer.load_state_dict")
        super().load_state_dict(state_dict)


class RecordingModule(TinyClassifier):
    def configure_optimizers(self) -> Any:
        return RecordingAdam(self.parameters(), lr=self.lr)


def test_resume_order_callback_state_then_on_fit_start_then_optimizer_states(tmp_path):
    log: ClassVar[list[str]] = []
    RecordingAdam.log = log
    trainer = pl.Trainer(callbacks=[Events(log)], **trainer_kwargs(max_epochs=1, default_root_dir=tmp_path))
    trainer.fit(RecordingModule())
    path = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(path)
    log.clear()
    trainer = pl.Trainer(callbacks=[Events(log)], **trainer_kwargs(max_epochs=2, default_root_dir=tmp_path))
    trainer.fit(RecordingModule(), ckpt_path=path)
    assert log[:3] == ["callback.load_state_dict", "on_fit_start", "optimizer.load_state_dict"]


class LogsInTrainingStep(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.calls_under_suppression = 0

    def on_train_epoch_end(self) -> None:
        batch = next(iter(self.trainer.train_dataloader))
        with logging_suppressed(self):
            self.training_step(batch, 0)  # would log "train_loss" a second time this epoch
            self.calls_under_suppression += 1


def test_logging_suppressed_silences_self_log_and_restores_it():
    model = LogsInTrainingStep()
    trainer = pl.Trainer(**trainer_kwargs(max_epochs=1))
    trainer.fit(model)
    assert model.calls_under_suppression == 1
    assert "log" not in model.__dict__ and "log_dict" not in model.__dict__
    assert type(model).log is pl.LightningModule.log


class StepInsideTheStep(torch.optim.SGD):
    """An optimizer whose step, after running the closure, sets the global step to 1000 and reads it back through
    the Trainer and the module (as the CG phase's trial evaluations do inside the last batch's step)."""

    def __init__(self, params: Any, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        super().__init__(params, lr=0.01)
        self.trainer, self.module = trainer, module
        self.seen: list[tuple[int, int, int, int]] = []

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = super().step(closure)
        read, write = global_step_counter(self.trainer)
        before = read()
        write(1000)
        self.seen.append((before, self.trainer.global_step, self.module.global_step, read()))
        write(before)
        return loss


class StepReader(TinyClassifier):
    def configure_optimizers(self) -> Any:
        self.optimizer = StepInsideTheStep(self.parameters(), self.trainer, self)
        return self.optimizer


def test_the_global_step_can_be_set_within_an_optimizer_step_and_the_loop_counts_on():
    model = StepReader()
    trainer = pl.Trainer(**trainer_kwargs(max_epochs=2))
    trainer.fit(model)
    batches = trainer.num_training_batches
    # During step n (0-based), the loop has completed n steps; written, the value is what both read.
    assert model.optimizer.seen == [(n, 1000, 1000, 1000) for n in range(2 * batches)]
    assert trainer.global_step == 2 * batches  # written back, the loop's own count goes on


class RecordsOutputs(pl.Callback):
    def __init__(self) -> None:
        self.pairs: list[tuple[float, int]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.pairs.append((float(outputs["loss"]), trainer.accumulate_grad_batches))
        self.losses.append(float(undo_accumulation(step_loss(outputs), trainer)))


class ReturnsKnownLoss(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * 0 + 3.0


def test_outputs_loss_is_divided_by_accumulate_grad_batches():
    recorder = RecordsOutputs()
    trainer = pl.Trainer(callbacks=[recorder], **trainer_kwargs(max_epochs=1, accumulate_grad_batches=3))
    trainer.fit(ReturnsKnownLoss())
    assert {loss * accumulate for loss, accumulate in recorder.pairs} == {3.0}
    assert set(recorder.losses) == {3.0}  # undo_accumulation undoes the division


def test_precision_plugins_expose_the_context_and_scaler_the_callback_reads():
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    assert callable(Precision().train_step_context)
    assert MixedPrecision("bf16-mixed", "cpu").scaler is None


class SpySGD(torch.optim.SGD):
    """Records how the precision plugin steps it: with a closure or not, and the gradient the closure left."""

    calls: ClassVar[list[tuple[bool, list[torch.Tensor] | None]]] = []

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        grads = None
        if closure is not None:
            closure()
            grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        SpySGD.calls.append((closure is not None, grads))
        return None  # the weights stay: the next batch's gradient is at the same point


class SpyModule(TinyClassifier):
    def configure_optimizers(self) -> Any:
        return SpySGD(self.parameters(), lr=0.1)


class ClosureSteps(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_closure_steps(trainer, True)


@needs_cpu_grad_scaler
def test_with_a_grad_scaler_closure_steps_hand_the_closure_over_and_backward_still_scales_the_loss():
    # Lightning's own 16-mixed step with a scaler runs the closure itself and steps without it (torch refuses one).
    SpySGD.calls = []
    plugin = scaler_plugin(init_scale=2.0**10)
    trainer = pl.Trainer(**trainer_kwargs(max_epochs=1, limit_train_batches=1, plugins=[plugin]))
    trainer.fit(SpyModule())
    assert grad_scaler(trainer) is plugin.scaler
    assert [with_closure for with_closure, _ in SpySGD.calls] == [False]
    # With closure steps the optimizer gets the closure; the gradient it leaves is scaled, as the loss in backward.
    SpySGD.calls = []
    trainer = pl.Trainer(
        callbacks=[ClosureSteps()],
        **trainer_kwargs(max_epochs=1, limit_train_batches=1, plugins=[scaler_plugin(init_scale=2.0**10)]),
    )
    model = SpyModule()
    trainer.fit(model)
    ((with_closure, grads),) = SpySGD.calls
    assert with_closure
    inputs, labels = next(iter(model.train_dataloader()))
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
    loss.backward()
    for grad, p in zip(grads, model.parameters()):
        torch.testing.assert_close(grad, 2.0**10 * p.grad, rtol=1e-3, atol=1e-3)
    set_closure_steps(trainer, False)
    assert "optimizer_step" not in vars(trainer.precision_plugin)


def test_closure_steps_change_nothing_without_a_grad_scaler():
    trainer = pl.Trainer(**trainer_kwargs(precision="bf16-mixed"))
    assert grad_scaler(trainer) is None
    set_closure_steps(trainer, True)
    assert "optimizer_step" not in vars(trainer.precision_plugin)
