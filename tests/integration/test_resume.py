"""Checkpoint and resume: fit-to-end equals fit-to-checkpoint plus resume, before and after the swap."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_twophase import ConvexitySwapCallback
from lightning_twophase._macro_batch import _MacroBatchOptimizer as MacroBatchOptimizer
from tests.conftest import PeakingClassifier, trainer_kwargs

MAX_EPOCHS = 10


def run(directory: Path, ckpt_path: str | None = None, **callback_kwargs) -> tuple[PeakingClassifier, pl.Trainer]:
    model = PeakingClassifier()
    # Preconditioned, so that resume after the swap must also bring the diagonal back with the optimizer state.
    callback = ConvexitySwapCallback(preconditioner="second_moments", **callback_kwargs)
    checkpoints = ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        callbacks=[callback, checkpoints], **trainer_kwargs(max_epochs=MAX_EPOCHS, enable_checkpointing=True)
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def swap_callback(trainer: pl.Trainer) -> ConvexitySwapCallback:
    return next(cb for cb in trainer.callbacks if isinstance(cb, ConvexitySwapCallback))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    model, trainer = run(directory)
    callback = swap_callback(trainer)
    assert 3 < callback.swap_epoch < MAX_EPOCHS - 2, callback.history  # detected, not fixed: a real peak
    return model, trainer, directory


@pytest.mark.parametrize("when", ["before the swap", "after the swap"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(uninterrupted, tmp_path, when):
    reference_model, reference_trainer, directory = uninterrupted
    reference = swap_callback(reference_trainer)
    # Checkpoint names count epochs from 0: "epoch=k" was written at the end of epoch k, after k + 1 epochs.
    epochs_done = reference.swap_epoch - 2 if when == "before the swap" else reference.swap_epoch + 1
    checkpoint = directory / f"epoch={epochs_done - 1}.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    (state,) = (v for k, v in saved["callbacks"].items() if "ConvexitySwapCallback" in k)
    assert state["phase"] == ("first" if when == "before the swap" else "cg")

    model, trainer = run(tmp_path, ckpt_path=str(checkpoint))
    resumed = swap_callback(trainer)
    assert (resumed.swap_epoch, resumed.swap_step, resumed.swap_reason) == (
        reference.swap_epoch,
        reference.swap_step,
        reference.swap_reason,
    )
    assert isinstance(trainer.optimizers[0], MacroBatchOptimizer)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference_model.state_dict()[name], rtol=0, atol=1e-6, msg=name)
    assert resumed.history == reference.history
    assert trainer.optimizers[0].optimizer.totals == reference_trainer.optimizers[0].optimizer.totals
    for restored, original in zip(
        trainer.optimizers[0].optimizer.preconditioner, reference_trainer.optimizers[0].optimizer.preconditioner
    ):
        assert torch.equal(restored, original)


def test_a_checkpoint_after_the_swap_holds_the_cg_state_and_the_first_phase_for_the_fallback(uninterrupted):
    _, reference_trainer, directory = uninterrupted
    reference = swap_callback(reference_trainer)
    saved = torch.load(directory / f"epoch={reference.swap_epoch}.ckpt", weights_only=False)
    (optimizer_state,) = saved["optimizer_states"]
    assert "macro_batch" in optimizer_state and optimizer_state["param_groups"][0]["line_search"] == "brent"
    (state,) = (v for k, v in saved["callbacks"].items() if "ConvexitySwapCallback" in k)
    adam_state = state["first_optimizer_state"]["optimizer"]
    assert "betas" in adam_state["param_groups"][0]  # the Adam the fallback would resume
