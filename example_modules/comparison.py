"""The two-phase run beside the first optimizer alone, from the same initial weights: what the README's job prints.

A claim of "better than Adam" has to hold the way a user pays for training, in compute as well as in epochs: a CG
epoch costs more than an Adam epoch (its line search evaluates the training set again). So the first optimizer alone
trains from the same initial weights, in the same batch order, for the run's epochs and on until it has spent as many
gradient passes as the two-phase run did; both are measured on the whole training set. The table compares the
two-phase run with Adam at equal epochs and at equal compute, and a figure plots both losses against compute with the
swap marked.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from lightning_twophase import ConvexitySwapCallback, Decision, Reason, SwapDetector

__all__ = [
    "Measurement",
    "ModelAtEpoch",
    "NeverSwaps",
    "TrainingSetMonitor",
    "comparison_table",
    "full_batch_lbfgs",
    "loss_vs_compute_figure",
    "snapshot",
]


@dataclass(frozen=True)
class Measurement:
    """A model measured on the whole training set after ``epochs`` epochs, with what it cost so far."""

    epochs: int
    passes: float
    train_loss: float
    val_accuracy: float
    seconds: float


class NeverSwaps(SwapDetector):
    """A detector that never asks for a swap: with ``detect_only=True`` the callback only counts the first optimizer's
    compute and records its curve, for the run of the first optimizer alone."""

    norm_every_n_steps = 32  # the figure needs no norm at every step

    def update(self, loss: float, grad_norm: float, *, epoch: int, step: int) -> Decision:
        return Decision(False, Reason.WAITING, "the first optimizer alone, for the comparison")


@torch.no_grad()
def measure(model: pl.LightningModule, datamodule: pl.LightningDataModule) -> tuple[float, float]:
    """The mean loss over the whole training set and the accuracy on the validation set (``model.compute_loss``)."""
    was_training = model.training
    model.eval()
    device = model.device

    def mean_loss_and_accuracy(batches: Iterable[Any]) -> tuple[float, float]:
        total, correct, count = 0.0, 0, 0
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            total += float(model.compute_loss(logits, labels)) * len(labels)
            correct += int((logits.argmax(dim=1) == labels).sum())
            count += len(labels)
        return total / count, correct / count

    train_loss, _ = mean_loss_and_accuracy(datamodule.train_dataloader())
    _, val_accuracy = mean_loss_and_accuracy(datamodule.val_dataloader())
    model.train(was_training)
    return train_loss, val_accuracy


def passes(callback: ConvexitySwapCallback, datamodule: Any) -> float:
    """The compute the callback counted, in gradient passes over the training set (forward 1/3, backward 2/3)."""
    return callback.compute / (3 * len(datamodule.train_data[1]))


class TrainingSetMonitor(Callback):
    """Measure the model on the whole training set at the end of chosen epochs (counted from 1).

    Args:
        epochs: after which epochs to measure.
        counter: the callback that counts the compute (a ``ConvexitySwapCallback``, detecting only for the first
            optimizer alone).

    """

    def __init__(self, epochs: Iterable[int], counter: ConvexitySwapCallback) -> None:
        self.epochs = set(epochs)
        self.counter = counter
        self.measurements: dict[int, Measurement] = {}
        self._began = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._began = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch not in self.epochs:
            return
        seconds = time.perf_counter() - self._began  # the measuring itself is not training time
        datamodule = trainer.datamodule
        train_loss, val_accuracy = measure(pl_module, datamodule)
        self.measurements[epoch] = Measurement(
            epoch, passes(self.counter, datamodule), train_loss, val_accuracy, seconds
        )


class ModelAtEpoch(Callback):
    """Keep a copy of the model at the end of epoch ``epoch`` (counted from 1), with the compute spent so far."""

    def __init__(self, epoch: int, counter: ConvexitySwapCallback) -> None:
        self.epoch = epoch
        self.counter = counter
        self.model: pl.LightningModule | None = None
        self.passes = 0.0
        self.seconds = 0.0
        self._began = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._began = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            self.model = copy.deepcopy(pl_module)
            self.passes = passes(self.counter, trainer.datamodule)
            self.seconds = time.perf_counter() - self._began


def full_batch_lbfgs(
    start: ModelAtEpoch, datamodule: Any, epochs: int, history_size: int = 50
) -> tuple[Measurement, pl.LightningModule]:
    """What practitioners do after Adam: torch's L-BFGS on the whole training set, as a plain loop.

    From ``start`` (Adam's model at its epoch), one ``torch.optim.LBFGS.step`` (strong Wolfe, torch's ``max_iter=20``)
    per remaining epoch up to ``epochs``, on the training set as one batch; its gradient passes are its closure calls.
    """
    assert start.model is not None
    model = copy.deepcopy(start.model)
    images, labels = (tensor.to(model.device) for tensor in datamodule.train_data)
    optimizer = torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe", history_size=history_size)
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = model.compute_loss(model(images), labels)
        loss.backward()
        return loss

    model.train()
    began = time.perf_counter()
    for _ in range(epochs - start.epoch):
        optimizer.step(closure)
    seconds = start.seconds + time.perf_counter() - began
    return Measurement(epochs, start.passes + calls, *measure(model, datamodule), seconds), model


@dataclass(frozen=True)
class Snapshot:
    """What a second run needs to start where the first one did: the initial model and every random state."""

    model: pl.LightningModule
    datamodule_state: dict[str, Any]
    torch_state: torch.Tensor
    python_state: Any
    numpy_state: Any

    def restore(self, datamodule: pl.LightningDataModule) -> pl.LightningModule:
        """Put the random states and the data module's state back; return a fresh copy of the initial model."""
        datamodule.load_state_dict(self.datamodule_state)
        torch.set_rng_state(self.torch_state)
        random.setstate(self.python_state)
        np.random.set_state(self.numpy_state)
        return copy.deepcopy(self.model)


def snapshot(model: pl.LightningModule, datamodule: pl.LightningDataModule) -> Snapshot:
    """A copy of the model before training, the data module's state (its shuffle generator) and the global random
    states."""
    return Snapshot(
        copy.deepcopy(model),
        copy.deepcopy(datamodule.state_dict()),
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state(),
    )


def comparison_table(
    two_phase: Measurement, equal_epochs: Measurement, equal_compute: Measurement, practice: Measurement | None = None
) -> str:
    """The two-phase run beside the first optimizer alone at equal epochs and at equal compute (and beside Adam, then
    torch's L-BFGS on the whole training set, the ``practice``), as text.

    "Equal compute" is the better of Adam at the run's epochs and Adam after as many gradient passes as the run spent
    (constant-rate Adam is not monotone), so the two-phase run is never credited with a bump of Adam's loss.
    """
    reference = min(equal_epochs, equal_compute, key=lambda m: m.train_loss)
    runs = [two_phase, equal_epochs, equal_compute] + ([practice] if practice is not None else [])
    header = ("", "two-phase", "Adam, same epochs", "Adam, same compute", "Adam 30 % -> L-BFGS")
    rows = [
        header[: len(runs) + 1],
        ("epochs", *(str(m.epochs) for m in runs)),
        ("gradient passes", *(f"{m.passes:.0f}" for m in runs)),
        ("training loss", *(f"{m.train_loss:.3e}" for m in runs)),
        ("validation accuracy", *(f"{100 * m.val_accuracy:.2f} %" for m in runs)),
        ("wall time", *(f"{m.seconds:.0f} s" for m in runs)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append(
        f"training loss, Adam's over the two-phase run's: {_ratio(equal_epochs, two_phase):.2f}x at equal epochs, "
        f"{_ratio(reference, two_phase):.2f}x at equal compute (> 1: the two-phase run ends lower)"
    )
    if practice is not None:
        lines.append(
            f"training loss, Adam 30 % -> L-BFGS's over the two-phase run's: {_ratio(practice, two_phase):.2f}x at "
            "equal epochs"
        )
    return "\n".join(lines)


def _ratio(reference: Measurement, run: Measurement) -> float:
    return reference.train_loss / run.train_loss if run.train_loss > 0 else math.inf


def loss_vs_compute_figure(
    two_phase: list[dict[str, Any]], first_only: list[dict[str, Any]], samples: int, path: Path
) -> bool:
    """Save the epoch-mean training loss of both runs against compute (gradient passes), the swap marked; ``False``
    without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    axes = figure.add_subplot(1, 1, 1)

    def curve(history: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
        kept = [r for r in history if r["loss"] > 0 and math.isfinite(r["loss"])]
        return [r["compute"] / (3 * samples) for r in kept], [r["loss"] for r in kept]

    axes.plot(*curve(first_only), color="tab:blue", label="Adam alone")
    axes.plot(*curve(two_phase), color="tab:orange", label="two-phase")
    # The check before the first CG one is where the swap was made.
    swaps = [before for before, after in itertools.pairwise(two_phase) if after["phase"] == "second" != before["phase"]]
    for record in swaps:
        axes.axvline(record["compute"] / (3 * samples), color="0.5", linestyle="--", linewidth=0.8)
    if swaps:
        axes.plot([], [], color="0.5", linestyle="--", linewidth=0.8, label="swap")
    axes.set_yscale("log")
    axes.set_xlabel("compute (gradient passes over the training set)")
    axes.set_ylabel("training loss (epoch mean)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return True
