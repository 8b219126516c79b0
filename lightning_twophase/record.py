"""What happened in a run, and where it is written: the checks, the swap, the fallback and the compute.

Every phase writes to the :class:`RunRecord`; checkpoints carry it; at the end of training it goes to the logs as the
norm-vs-loss figure (TensorBoard and a PNG) and ``twophase_history.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_twophase import monitoring, tags
from lightning_twophase._lightning import set_callback_metric
from lightning_twophase.decision import Decision, Reason

__all__ = ["RunRecord", "announce_swap", "log_figure", "write_run_outputs"]


@dataclass
class RunRecord:
    """What happened so far: what users read after ``fit`` and what checkpoints carry."""

    #: One record per check: epoch, step, loss, gradient norm, phase, compute and the rule's numbers.
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Samples passed forward plus twice the samples passed backward, over all ranks (backward ~ 2 forward).
    compute: float = 0.0
    swap_epoch: int | None = None
    swap_step: int | None = None
    #: Why the swap was made (or, detecting only, would have been).
    swap_decision: Decision | None = None
    #: The index in :attr:`history` of the check at which the swap was made.
    swap_check: int | None = None
    #: Why the CG phase fell back to the first optimizer, if it did.
    fallback_decision: Decision | None = None
    #: The last answer of the swap rule (why there was no swap, if there was none).
    last_decision: Decision | None = None

    def add_check(
        self, epoch: int, step: int, loss: float, grad_norm: float, phase: str, scalars: Mapping[str, float]
    ) -> dict[str, float]:
        """Add one check to :attr:`history`; return what to log for it, by tag (``scalars``: the rule's)."""
        record: dict[str, Any] = {"epoch": epoch, "step": step, "loss": loss, "grad_norm": grad_norm}
        record.update({tags.column(tag): value for tag, value in scalars.items()})
        record.update(phase=phase, compute=self.compute)
        self.history.append(record)
        logged = {tags.LOSS: loss, tags.GRAD_NORM: grad_norm, **scalars}
        logged.update({tags.PHASE: tags.PHASE_VALUES[phase], tags.COMPUTE: self.compute})
        return logged

    def note_rule_answer(self, decision: Decision) -> None:
        """Keep the swap rule's answer to the last check; say when the loss turned non-finite (no swap on it)."""
        self.last_decision = decision
        losses = [record["loss"] for record in self.history[-2:]]
        if not math.isfinite(losses[-1]) and (len(losses) == 1 or math.isfinite(losses[0])):
            rank_zero_warn(f"ConvexitySwapCallback: no swap on this check: {decision.message}.")

    def first_phase_points(self) -> list[tuple[float, float]]:
        """``(loss, compute)`` of the first phase's checks (the progress guard projects the first optimizer from
        them)."""
        return [(r["loss"], r["compute"]) for r in self.history if r["phase"] == "first"]

    def peak_check(self) -> int | None:
        """The check of the first phase with the largest gradient norm."""
        first = [(r["grad_norm"], i) for i, r in enumerate(self.history) if r["phase"] == "first"]
        first = [(norm, i) for norm, i in first if math.isfinite(norm)]
        return max(first)[1] if first else None

    def state_dict(self) -> dict[str, Any]:
        decisions = ("swap_decision", "fallback_decision", "last_decision")
        state = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in decisions}
        state["history"] = [dict(record) for record in self.history]
        for name in decisions:
            decision = getattr(self, name)
            state[name] = None if decision is None else [decision.act, decision.reason.value, decision.message]
            if decision is not None:
                state[name].append(dict(decision.scalars))  # plain floats (Decision made them so)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.__dataclass_fields__:
            value = state[name]
            if name.endswith("_decision") and value is not None:
                # Checkpoints of 0.3.0 kept no scalars: [act, reason, message].
                act, reason, message, *scalars = value
                value = Decision(bool(act), Reason(reason), message, scalars[0] if scalars else {})
            setattr(self, name, value)
        self.history = [dict(record) for record in self.history]


def announce_swap(
    trainer: pl.Trainer,
    record: RunRecord,
    decision: Decision,
    epoch: int,
    swapped: bool,
    first_name: str = "",
    second_name: str = "the second phase",
) -> None:
    """Record the swap (or, detecting only, the swap point) and say it: the console, every logger, TensorBoard's text
    tab and ``trainer.callback_metrics``. ``first_name``: the first optimizer's class, when it is no longer the
    Trainer's; ``second_name``: the second phase's optimizer class."""
    step = trainer.global_step
    record.swap_epoch, record.swap_step, record.swap_decision = epoch, step, decision
    record.swap_check = len(record.history) - 1 if record.history else None
    set_callback_metric(trainer, tags.SWAP_EPOCH, epoch)
    set_callback_metric(trainer, tags.SWAP_STEP, step)
    first_name = first_name or type(trainer.optimizers[0]).__name__
    if swapped:
        message = (
            f"ConvexitySwapCallback: swapped {first_name} -> {second_name} at epoch {epoch}, step {step}: "
            f"{decision.message}."
        )
    else:
        message = (
            f"ConvexitySwapCallback (detect only): the swap point is at epoch {epoch}, step {step}: "
            f"{decision.message}. Training continues with {first_name}."
        )
    rank_zero_info(message)
    monitoring.log_scalars(trainer, {tags.SWAP_EPOCH: float(epoch), tags.SWAP_STEP: float(step)}, step)
    monitoring.log_text(trainer, tags.SWAP_TEXT, message, step)


def log_figure(trainer: pl.Trainer, record: RunRecord, save_dir: str | None = None) -> None:
    """Draw the norm-vs-loss figure of the checks so far for TensorBoard (and as a PNG in ``save_dir``)."""
    if trainer.global_rank != 0 or not record.history:
        return
    figure = monitoring.norm_vs_loss_figure(record.history, record.swap_check, record.peak_check())
    if figure is None:
        return
    monitoring.log_figure(trainer, tags.NORM_VS_LOSS_FIGURE, figure, trainer.global_step)
    if save_dir is not None:
        monitoring.save_figure(figure, Path(save_dir) / "norm_vs_loss.png")


def write_run_outputs(trainer: pl.Trainer, record: RunRecord, figures: bool) -> None:
    """At the end of training: the figure (TensorBoard and PNG), the history as CSV next to the logs, and, without
    a swap, why."""
    # `log_dir` is a collective (a broadcast): every rank must ask for it.
    log_dir = trainer.log_dir if trainer.loggers else None
    if figures:
        log_figure(trainer, record, log_dir)
    if log_dir is not None:
        monitoring.write_history_csv(record.history, Path(log_dir) / "twophase_history.csv")
    if record.swap_decision is None:
        rank_zero_info(monitoring.no_swap_message(record.history, trainer.current_epoch, record.last_decision))
