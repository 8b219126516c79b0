"""The Lightning behaviour lightning-twophase relies on beyond the documented API (see ``_lightning.py``).

If a Lightning upgrade changes one of these, this file fails first and names what changed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from _models import TinyClassifier, trainer_kwargs
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_twophase._lightning import logging_suppressed, scheduler_configs


def test_the_optimizers_setter_rewraps_what_the_training_loop_steps():
    strategy = SingleDeviceStrategy("cpu")
    first, second = (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1) for _ in range(2))
    strategy.optimizers = [first]
    strategy.optimizers = [second]
    # The automatic loop steps `strategy._lightning_optimizers[0]`: it must wrap the new optimizer.
    assert strategy._lightning_optimizers[0].optimizer is second


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


class RecordsOutputs(pl.Callback):
    def __init__(self) -> None:
        self.pairs: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.pairs.append((float(outputs["loss"]), trainer.accumulate_grad_batches))


class ReturnsKnownLoss(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * 0 + 3.0


def test_outputs_loss_is_divided_by_accumulate_grad_batches():
    recorder = RecordsOutputs()
    trainer = pl.Trainer(callbacks=[recorder], **trainer_kwargs(max_epochs=1, accumulate_grad_batches=3))
    trainer.fit(ReturnsKnownLoss())
    assert {loss * accumulate for loss, accumulate in recorder.pairs} == {3.0}


def test_precision_plugins_expose_the_context_and_scaler_the_callback_reads():
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    assert callable(Precision().train_step_context)
    assert MixedPrecision("bf16-mixed", "cpu").scaler is None
