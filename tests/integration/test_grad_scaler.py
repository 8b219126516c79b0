"""``precision="16-mixed"`` with a GradScaler through the whole two-phase run, on the CPU: Lightning's
``MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))`` is the set-up it builds for 16-mixed on a GPU.

The first phase is Lightning's (the scaler skips the steps that overflow); the CG phase scales its gradients with the
same scaler, evaluate them again after an overflow, and give the first phase its scale back on a
fallback; the scale travels in checkpoints and is the same on every DDP rank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Subset

from lightning_twophase import ConvexitySwapCallback, FallbackPolicy, Reason
from tests.conftest import (
    PeakingClassifier,
    TinyClassifier,
    blobs,
    fit,
    needs_cpu_grad_scaler,
    run_on_ranks,
    scaler_plugin,
    swap_at,
    trainer_kwargs,
)
from tests.integration.test_callback import FAILING_SEARCHES, SecondPhaseSteps, assert_steps

pytestmark = needs_cpu_grad_scaler


def fit_scaled(
    model: pl.LightningModule, *callbacks: pl.Callback, init_scale: float | None = 2.0**16, **overrides: Any
) -> pl.Trainer:
    """:func:`~tests.conftest.fit` under 16-mixed with a GradScaler of ``init_scale`` (``None``: in 32-true)."""
    plugins = {"plugins": [scaler_plugin(init_scale)]} if init_scale is not None else {}
    return fit(model, *callbacks, **plugins, **overrides)


def finite(model: pl.LightningModule) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("second", ["lbfgs", "cg"])
def test_the_cg_phase_runs_under_the_grad_scaler_and_ends_where_32_true_does(second):
    # Unpreconditioned: a preconditioner from each run's own Adam state would differ by float16 rounding and steer the
    # two runs apart; this compares the same iterations in two precisions.
    plain = {"name": second, "preconditioner": "none"}
    callback, steps = swap_at(2, optimizer=plain), SecondPhaseSteps()
    model = TinyClassifier()
    trainer = fit_scaled(model, callback, steps, max_epochs=6)
    reference = swap_at(2, optimizer=plain)
    fit_scaled(TinyClassifier(), reference, init_scale=None, max_epochs=6)
    assert callback.phase == "second" and callback.fallback_reason is None
    totals = assert_steps(trainer, steps, second, 4).totals
    assert totals["line_search_failures"] == 0
    losses = [r["loss"] for r in callback.history if r["phase"] == "second"]
    assert losses == sorted(losses, reverse=True) and finite(model)
    expected = [r["loss"] for r in reference.history if r["phase"] == "second"]
    # float16 compute, the same iterations. L-BFGS's 20 iterations per epoch take this separable problem's loss from
    # 0.57 to 5e-6 in one epoch and to 0 in three, where float16 logits (rounding of 1e-3 on margins of 10 and more)
    # no longer resolve 1e-3 of the loss: there the two runs agree within 1e-5 (2e-5 of the loss at the swap).
    tiny = 1e-5 if second == "lbfgs" else 0.0
    assert losses == pytest.approx(expected, rel=1e-3, abs=tiny)
    # One scaler iteration per gradient: the first phase's 16 steps and every gradient the second phase used.
    state = trainer.scaler.state_dict()
    assert state["scale"] == 2.0**16 and state["_growth_tracker"] == 16 + totals["gradient_evaluations"]
    # The plugin steps as Lightning does again once training is over.
    assert "optimizer_step" not in vars(trainer.precision_plugin)


@pytest.mark.parametrize("second", ["lbfgs", "cg"])
def test_an_overflow_lowers_the_scale_and_never_becomes_a_step_a_nan_or_a_fallback(second):
    # A huge initial scale: the first phase's steps all overflow (the scaler skips them, halving the scale each
    # time), and the second phase starts with a scale its float16 gradients overflow at.
    callback, steps = swap_at(1, optimizer=second), SecondPhaseSteps()
    model = TinyClassifier()
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = fit_scaled(model, callback, steps, init_scale=2.0**40, max_epochs=5)
    batches = trainer.num_training_batches
    # The weights at the swap were the initial ones: every first-phase step was skipped.
    assert callback.history[0]["phase"] == "first" and math.isnan(callback.history[0]["grad_norm"])
    assert callback.phase == "second" and callback.fallback_reason is None
    assert assert_steps(trainer, steps, second, 4).totals["line_search_failures"] == 0
    assert trainer.scaler.get_scale() < 2.0 ** (40 - batches)  # the CG phase backed off further
    losses = [r["loss"] for r in callback.history if r["phase"] == "second"]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0] and finite(model)
    # The first CG iteration started from the whole epoch at the initial weights: no batch was left out.
    reference = TinyClassifier()
    assert all(torch.equal(a, b) for a, b in zip(initial, reference.parameters()))
    inputs, labels = blobs(240).tensors
    with torch.no_grad():
        full = float(torch.nn.functional.cross_entropy(reference(inputs), labels))
    assert losses[0] == pytest.approx(full, rel=1e-3)


def test_the_first_phases_gradient_norm_leaves_out_the_steps_the_scaler_skipped():
    # At this initial scale the first few steps overflow and are skipped; the rest of the epoch's steps count.
    callback = ConvexitySwapCallback(detector="paper", detect_only=True)
    trainer = fit_scaled(TinyClassifier(), callback, init_scale=2.0**24, max_epochs=2)
    assert trainer.scaler.get_scale() < 2.0**24  # some steps overflowed
    assert all(math.isfinite(record["grad_norm"]) for record in callback.history)


class RecordScale(pl.Callback):
    """The GradScaler's state and the callback's phase at the start of every batch; with ``inject``, a scale the
    float16 gradients overflow at is set at the swap, before the CG phase's first batch (``at_swap``: the state
    before that)."""

    def __init__(self, swap: ConvexitySwapCallback, inject: float | None = None) -> None:
        self.swap = swap
        self.inject = inject
        self.states: list[tuple[str, dict[str, Any]]] = []
        self.at_swap: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self.states and self.states[-1][0] == "first" and self.swap.phase == "second":
            self.at_swap = trainer.scaler.state_dict()
            if self.inject is not None:
                trainer.scaler.update(new_scale=self.inject)
        self.states.append((self.swap.phase, trainer.scaler.state_dict()))


@pytest.mark.parametrize("second", ["lbfgs", "cg"])
def test_a_fallback_gives_the_first_optimizer_the_scale_it_had_at_the_swap(second):
    # A first trial step a million times too long with a single evaluation allowed: every line search fails.
    callback = swap_at(1, optimizer=FAILING_SEARCHES[second], fallback=FallbackPolicy(after_failures=2))
    recorder = RecordScale(callback, inject=2.0**40)
    with pytest.warns(UserWarning, match="2 consecutive line searches"):
        trainer = fit_scaled(TinyClassifier(), callback, recorder, max_epochs=4)
    assert callback.phase == "fallback" and callback.fallback_decision.reason is Reason.LINE_SEARCH_FAILURES
    phases = [phase for phase, _ in recorder.states]
    before_fallback = recorder.states[phases.index("fallback") - 1][1]
    assert recorder.at_swap is not None and recorder.at_swap["scale"] == 2.0**16
    assert before_fallback["scale"] < 2.0**40 and before_fallback != recorder.at_swap  # the CG phase's own scale
    # The first batch after the fallback starts with the scale and growth tracker the first phase had at the swap.
    assert recorder.states[phases.index("fallback")][1] == recorder.at_swap
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)
    assert "optimizer_step" not in vars(trainer.precision_plugin)  # Lightning's scaler step is back


def run_with_checkpoints(directory: Path, ckpt_path: str | None = None) -> tuple[pl.Trainer, ConvexitySwapCallback]:
    callback = swap_at(2)  # preconditioned by Adam's second moments (the default)
    checkpoints = ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    recorder = RecordScale(callback, inject=2.0**40)  # the CG phase's scale differs from the first phase's
    trainer = pl.Trainer(
        callbacks=[callback, checkpoints, recorder],
        **trainer_kwargs(max_epochs=7, enable_checkpointing=True, plugins=[scaler_plugin()]),
    )
    trainer.fit(PeakingClassifier(), ckpt_path=ckpt_path)
    return trainer, callback


def test_resume_in_the_cg_phase_restores_its_scale_and_the_first_phases(tmp_path):
    reference_trainer, reference = run_with_checkpoints(tmp_path / "uninterrupted")
    saved = torch.load(tmp_path / "uninterrupted" / "epoch=3.ckpt", weights_only=False)  # after 2 CG epochs
    (state,) = (v for k, v in saved["callbacks"].items() if "ConvexitySwapCallback" in k)
    assert state["phase"] == "second"
    first_scaler = state["first_optimizer"]["scaler"]
    assert first_scaler["scale"] == 2.0**16 and saved["MixedPrecision"]["scale"] < 2.0**30  # CG's, after the injection

    trainer, resumed = run_with_checkpoints(
        tmp_path / "resumed", ckpt_path=str(tmp_path / "uninterrupted" / "epoch=3.ckpt")
    )
    assert trainer.scaler.state_dict() == reference_trainer.scaler.state_dict()
    assert resumed._cg.first.scaler_state == first_scaler  # for a fallback
    assert resumed.history == reference.history
    for a, b in zip(trainer.lightning_module.parameters(), reference_trainer.lightning_module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


class ScaledShards(TinyClassifier):
    """Rank 1's inputs are 30 times larger: its float16 gradients overflow at scales rank 0's do not."""

    def train_dataloader(self) -> DataLoader:
        dataset = blobs(240)
        rank = self.trainer.global_rank
        if rank == 1:
            dataset.tensors = (dataset.tensors[0] * 30, dataset.tensors[1])
        return DataLoader(Subset(dataset, list(range(rank, 240, 2))), batch_size=32)


def _fit_scaled_rank(rank: int, world_size: int) -> dict[str, Any]:
    model = ScaledShards()
    callback = swap_at(1)
    trainer = pl.Trainer(
        callbacks=[callback],
        **trainer_kwargs(
            max_epochs=4,
            strategy="ddp",
            devices=world_size,
            use_distributed_sampler=False,
            plugins=[scaler_plugin(2.0**40)],
        ),
    )
    trainer.fit(model)
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "scaler": trainer.scaler.state_dict(),
        "history": callback.history,
        "phase": callback.phase,
        "totals": trainer.optimizers[0].optimizer.totals,
    }


def test_ddp_ranks_share_the_scale_and_every_overflow_decision():
    rank0, rank1 = run_on_ranks(_fit_scaled_rank)
    assert rank0["phase"] == rank1["phase"] == "second"
    assert rank0["scaler"] == rank1["scaler"] and rank0["scaler"]["scale"] < 2.0**30
    assert rank0["totals"] == rank1["totals"] and rank0["totals"]["line_search_failures"] == 0
    # The same checks on both ranks (the first phase's gradient norm is NaN: the scaler skipped all its steps).
    assert [(r["step"], r["loss"]) for r in rank0["history"]] == [(r["step"], r["loss"]) for r in rank1["history"]]
    losses = [r["loss"] for r in rank0["history"] if r["phase"] == "second"]
    assert losses == sorted(losses, reverse=True)
    for a, b in zip(rank0["weights"], rank1["weights"]):
        assert torch.equal(a, b) and bool(torch.isfinite(a).all())


@pytest.mark.slow
def test_the_gpu_precision_check_passes_on_the_cpu_with_the_scaler(capsys):
    """``benchmarks/gpu_precision_check.py`` in its CPU mode: a digits MLP through a swap under 16-mixed with the
    GradScaler ends within 1.5 times the 32-true run's training loss, without a fallback or a non-finite weight."""
    from benchmarks.gpu_precision_check import main

    assert main(["--device", "cpu", "--scaler", "--precisions", "16-mixed", "--epochs", "8", "--swap", "2"]) == 0
    report = capsys.readouterr().out
    assert "16-mixed + GradScaler" in report and report.rstrip().endswith("ok")
