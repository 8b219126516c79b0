"""The callback under DDP on two CPU processes (gloo): the same swap step on both ranks, identical weights."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_twophase import ConvexitySwapCallback, FallbackPolicy, PlateauDetector, Reason
from tests.conftest import PeakingClassifier, blobs, run_on_ranks, swap_at, trainer_kwargs
from tests.integration.test_cg_phase import SpyConjugateGradient, StartWeights, spy_factory


def _fit_rank(rank: int, world_size: int, batches_per_iteration: int | None, optimizer: Any) -> dict[str, Any]:
    model = PeakingClassifier()  # the same initial weights on both ranks; DistributedSampler splits the data
    # The paper's rule alone; the second phase preconditioned by Adam's second moments (the default).
    callback = ConvexitySwapCallback(
        detector="paper", swap_epoch=None, batches_per_iteration=batches_per_iteration, optimizer=optimizer
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
    ("batches_per_iteration", "optimizer"),
    [
        (None, "lbfgs"),
        (2, {"name": "lbfgs", "preconditioner": "second_moments"}),
        (None, {"name": "cg", "line_search": "brent"}),
        (2, {"name": "cg", "line_search": "strong_wolfe"}),
    ],
    ids=["full-lbfgs", "macro2-lbfgs", "full-brent", "macro2-wolfe"],
)
def test_ranks_swap_at_the_same_step_and_keep_identical_weights(batches_per_iteration, optimizer):
    rank0, rank1 = run_on_ranks(_fit_rank, batches_per_iteration, optimizer)
    assert rank0["batches"] == rank1["batches"] == 4  # 240 samples / 2 ranks / batches of 32
    assert rank0["swap_step"] is not None and rank0["swap_step"] == rank1["swap_step"]
    assert rank0["swap_epoch"] == rank1["swap_epoch"] < 10
    assert rank0["history"] == rank1["history"]  # reduced means: the same curve on every rank
    assert rank0["totals"] == rank1["totals"] and rank0["totals"]["iterations"] > 0
    assert rank0["totals"]["line_search_failures"] == 0
    for a, b in zip(rank0["weights"], rank1["weights"]):
        assert torch.equal(a, b)
    # Preconditioned by Adam's second moments (CG's default, L-BFGS's on request): rank 0's diagonal on both ranks.
    assert (rank0["preconditioner"] is None) == (optimizer == "lbfgs")
    for a, b in zip(rank0["preconditioner"] or [], rank1["preconditioner"] or []):
        assert torch.equal(a, b)


def test_ddp_spawn_runs_the_swap_and_reports_it_to_the_launching_process():
    model = PeakingClassifier()
    callback = swap_at(2)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=4, strategy="ddp_spawn", devices=2))
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model)
    # The workers' callback objects do not come back, their callback metrics and the trained weights do.
    assert float(trainer.callback_metrics["twophase/swap_epoch"]) == 2
    assert float(trainer.callback_metrics["twophase/phase"]) == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


class UnequalShards(PeakingClassifier):
    """Rank 0 holds 120 samples, rank 1 holds 100: batches of 32 give 4 batches each, of different sizes."""

    def train_dataloader(self) -> DataLoader:
        dataset = blobs(220)
        rank = self.trainer.global_rank
        indices = range(0, 120) if rank == 0 else range(120, 220)
        return DataLoader(Subset(dataset, list(indices)), batch_size=32)


def _fit_unequal_rank(rank: int, world_size: int) -> dict[str, Any]:
    SpyConjugateGradient.records = []
    model = UnequalShards()
    starts = StartWeights()
    callback = swap_at(2, optimizer=spy_factory)
    trainer = pl.Trainer(
        callbacks=[callback, starts],
        **trainer_kwargs(max_epochs=5, strategy="ddp", devices=world_size, use_distributed_sampler=False),
    )
    trainer.fit(model)
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "records": SpyConjugateGradient.records,
        "starts": starts.by_epoch,
        "history": callback.history,
        "compute": callback.compute,
    }


def test_unequal_shards_give_the_global_sample_weighted_objective_on_every_rank():
    rank0, rank1 = run_on_ranks(_fit_unequal_rank)
    for a, b in zip(rank0["weights"], rank1["weights"]):
        assert torch.equal(a, b)
    assert rank0["records"] == rank1["records"] and len(rank0["records"]) == 3
    inputs, labels = blobs(220).tensors
    for epoch, record in zip((2, 3, 4), rank0["records"]):
        reference = PeakingClassifier()
        reference.load_state_dict(rank0["starts"][epoch])
        reference.zero_grad()
        loss = nn.functional.cross_entropy(reference(inputs), labels)  # the mean over all 220 samples
        loss.backward()
        exact = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).norm()
        assert record["start_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
        assert record["grad_norm"] == pytest.approx(float(exact), rel=1e-5)
        # A trial evaluation at the start point gives the same global loss.
        assert record["value_1"] == pytest.approx(record["start_loss"], rel=1e-5)
    # The compute is the total over both ranks' 220 samples, on every rank (not each rank's own samples x 2).
    assert rank0["compute"] == rank1["compute"] and rank0["history"] == rank1["history"]
    first_phase = [record["compute"] for record in rank0["history"] if record["phase"] == "first"]
    assert first_phase == [3 * 220, 2 * 3 * 220]


def _fit_plateau_rank(rank: int, world_size: int, policy: FallbackPolicy, second: str) -> dict[str, Any]:
    model = UnequalShards()  # shards of different sizes: each rank counts a different compute
    # A plateau rule this short run reaches (the default's needs a longer one); no swap_epoch bound.
    detector = PlateauDetector(window=2, min_improvement=0.5)
    callback = ConvexitySwapCallback(
        detector=detector, swap_epoch=None, fallback=policy, log_figures=False, optimizer=second
    )
    trainer = pl.Trainer(
        callbacks=[callback],
        **trainer_kwargs(max_epochs=9, strategy="ddp", devices=world_size, use_distributed_sampler=False),
    )
    trainer.fit(model)
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "history": callback.history,
        "compute": callback.compute,
        "swap_step": callback.swap_step,
        "swap_decision": callback.swap_decision,
        "fallback_decision": callback.fallback_decision,
        "phase": callback.phase,
        "optimizer": type(trainer.optimizers[0]).__name__,
    }


@pytest.mark.parametrize(
    ("second", "margin", "phase"),
    [("lbfgs", 0.25, "second"), ("cg", 0.25, "second"), ("cg", 0.99, "fallback")],
    ids=["lbfgs-ahead", "cg-ahead", "cg-behind"],
)
def test_the_plateau_rule_and_the_progress_guard_decide_together_on_every_rank(second, margin, phase):
    # The guard judges at every check of the second phase; 0.99 of the first optimizer's projected progress is more
    # than CG makes here (L-BFGS's 20 iterations per epoch fit this data exactly: it is never behind).
    policy = FallbackPolicy(progress_window=1, progress_margin=margin)
    rank0, rank1 = run_on_ranks(_fit_plateau_rank, policy, second)
    # Decided on reduced numbers, the compute added up over the ranks: the same everywhere.
    assert rank0["history"] == rank1["history"] and rank0["compute"] == rank1["compute"]
    first_phase = [record["compute"] for record in rank0["history"] if record["phase"] == "first"]
    assert first_phase == [3 * 220 * (k + 1) for k in range(len(first_phase))]
    assert rank0["swap_step"] is not None and rank0["swap_step"] == rank1["swap_step"]
    assert rank0["swap_decision"] == rank1["swap_decision"] and rank0["swap_decision"].reason is Reason.PLATEAU
    assert rank0["phase"] == rank1["phase"] == phase
    assert rank0["fallback_decision"] == rank1["fallback_decision"]
    if phase == "fallback":
        assert rank0["fallback_decision"].reason is Reason.BEHIND_FIRST_OPTIMIZER
        assert rank0["optimizer"] == rank1["optimizer"] == "Adam"
    else:
        assert rank0["fallback_decision"] is None and len(rank0["history"]) > len(first_phase) + 1
    for a, b in zip(rank0["weights"], rank1["weights"]):
        assert torch.equal(a, b)
