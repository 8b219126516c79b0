"""The callback under DDP on two CPU processes (gloo): the same swap step on both ranks, identical weights."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_twophase import ConvexitySwapCallback
from tests.conftest import PeakingClassifier, run_on_ranks, trainer_kwargs


def _fit_rank(rank: int, world_size: int, cg_phase: Any, line_search: str) -> dict[str, Any]:
    model = PeakingClassifier()  # the same initial weights on both ranks; DistributedSampler splits the data
    callback = ConvexitySwapCallback(
        cg_phase=cg_phase, optimizer_kwargs={"line_search": line_search}, preconditioner="second_moments"
    )
    trainer = pl.Trainer(
        callbacks=[callback],
        **trainer_kwargs(max_epochs=10, strategy="ddp", devices=world_size, use_distributed_sampler=True),
    )
    trainer.fit(model)
    cg = trainer.optimizers[0]
    return {
        "swap_step": callback.swap_step,
        "swap_epoch": callback.swap_epoch,
        "history": callback.history,
        "weights": [p.detach().clone() for p in model.parameters()],
        "totals": getattr(getattr(cg, "optimizer", None), "totals", None),
        "preconditioner": getattr(getattr(cg, "optimizer", None), "preconditioner", None),
        "batches": trainer.num_training_batches,
    }


@pytest.mark.parametrize(
    ("cg_phase", "line_search"), [("full", "brent"), (2, "strong_wolfe")], ids=["full-brent", "macro2-wolfe"]
)
def test_ranks_swap_at_the_same_step_and_keep_identical_weights(cg_phase, line_search):
    rank0, rank1 = run_on_ranks(_fit_rank, cg_phase, line_search)
    assert rank0["batches"] == rank1["batches"] == 4  # 240 samples / 2 ranks / batches of 32
    assert rank0["swap_step"] is not None and rank0["swap_step"] == rank1["swap_step"]
    assert rank0["swap_epoch"] == rank1["swap_epoch"] < 10
    assert rank0["history"] == rank1["history"]  # reduced means: the same curve on every rank
    assert rank0["totals"] == rank1["totals"] and rank0["totals"]["iterations"] > 0
    assert rank0["totals"]["line_search_failures"] == 0
    for a, b in zip(rank0["weights"], rank1["weights"]):
        assert torch.equal(a, b)
    # Preconditioned by Adam's second moments: rank 0's diagonal on both ranks.
    assert rank0["preconditioner"] is not None
    for a, b in zip(rank0["preconditioner"], rank1["preconditioner"]):
        assert torch.equal(a, b)


def test_ddp_spawn_runs_the_swap_and_reports_it_to_the_launching_process():
    model = PeakingClassifier()
    callback = ConvexitySwapCallback(fixed_swap_epoch=2)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=4, strategy="ddp_spawn", devices=2))
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model)
    # The workers' callback objects do not come back, their callback metrics and the trained weights do.
    assert float(trainer.callback_metrics["twophase/swap_epoch"]) == 2
    assert float(trainer.callback_metrics["twophase/phase"]) == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
