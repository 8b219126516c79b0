"""Reproduce the experiments of Hrycej et al. (KDIR 2025): a grid of data set x model under four schedules.

Every run is a normal Lightning fit (TensorBoard logs under ``--log-dir``) with the same total number of epochs:

* ``adam``: Adam all the way (the callback only watches, and reports where the paper's rule would have swapped);
* ``adam30+cg``: Adam for 30 % of the epochs, then full-batch conjugate gradient (the paper's Table 1);
* ``default``: the callback's defaults: Adam until its loss stops improving (at 70 % of the epochs at the latest), then
  conjugate gradient preconditioned by Adam's second moments, with the progress guard;
* ``cg``: conjugate gradient from the start.

The paper's schedules (``adam30+cg``, ``cg``) run the package's CG (Hager-Zhang directions, the interpolation line
search on the whole training set) without preconditioning and without the progress guard, to stay with the paper's
method. Results go to ``--out``: ``results.csv``,
``results.md`` (the paper's Table 1 format, plus the swap epoch and the compute) and the figures: gradient norm
against loss per run with the swap marked (the paper's Fig. 5) and training loss against compute per model (Fig. 6).

    python -m example_modules.reproduce --preset cpu --data-dir data --out docs/reproduction
    python -m example_modules.reproduce --preset paper --data-dir data --out reproduction-paper   # a GPU
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from example_modules.classifier import ImageClassifier
from example_modules.data import CIFAR10DataModule, CIFAR100DataModule, ImageDataModule, MNISTDataModule
from example_modules.vit import MODEL_NAMES
from lightning_twophase import ConvexitySwapCallback, FallbackPolicy
from lightning_twophase.monitoring import norm_vs_loss_figure, save_figure

DATA_MODULES: dict[str, type[ImageDataModule]] = {
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
}

#: The paper's CG phase: plain conjugate gradient to the end (the fallback only for failures, no progress guard).
PAPERS_CG: dict[str, Any] = {"optimizer": {"name": "cg", "preconditioner": "none"}}

#: Callback arguments of each schedule.
SCHEDULES: dict[str, dict[str, Any]] = {
    # Adam alone: the callback only watches, and reports where the paper's rule would have swapped.
    "adam": {"detect_only": True, "detector": "paper", "swap_epoch": None},
    "adam30+cg": {"detector": None, "swap_epoch": 0.3, **PAPERS_CG},  # the paper's Table 1
    "default": {},  # the callback's defaults
    "cg": {"detector": None, "swap_epoch": 0, **PAPERS_CG},
}


@dataclass(frozen=True)
class Preset:
    """A grid and its budget."""

    datasets: tuple[str, ...]
    models: tuple[str, ...]
    epochs: dict[str, int]
    train_subset: int | None
    accelerator: str
    description: str
    batch_size: int = 512
    default_epochs: int = 1000


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        datasets=("mnist", "cifar10", "cifar100"),
        models=MODEL_NAMES,
        epochs={"vit-mlp": 700},
        train_subset=None,
        accelerator="auto",
        description="the paper's grid: full data sets, 1000 epochs (700 with the MLP), batch 512; for a GPU",
    ),
    "cpu": Preset(
        datasets=("mnist",),
        models=MODEL_NAMES,
        epochs={"vgg5": 40},
        default_epochs=100,
        train_subset=2000,
        accelerator="cpu",
        description="MNIST, a seeded subset of 2000 training images, 100 epochs (vgg5: 40), batch 512; "
        "about 21 minutes on 2 CPU cores",
    ),
}


@dataclass
class RunResult:
    data: str
    model: str
    schedule: str
    epochs: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    swap_epoch: int | None
    compute: float
    seconds: float
    train_samples: int
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)


@torch.no_grad()
def evaluate(model: ImageClassifier, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split, in batches."""
    model.eval()
    images, labels = data
    total, correct = 0.0, 0
    for start in range(0, len(labels), 1000):
        logits = model(images[start : start + 1000].to(model.device))
        batch_labels = labels[start : start + 1000].to(model.device)
        total += float(model.compute_loss(logits, batch_labels)) * len(batch_labels)
        correct += int((logits.argmax(dim=1) == batch_labels).sum())
    model.train()
    return total / len(labels), correct / len(labels)


def run_one(preset: Preset, data: str, model_name: str, schedule: str, data_dir: str, log_dir: Path) -> RunResult:
    """One Lightning fit of ``model_name`` on ``data`` under ``schedule``."""
    epochs = preset.epochs.get(model_name, preset.default_epochs)
    pl.seed_everything(0, workers=True, verbose=False)
    datamodule = DATA_MODULES[data](
        data_dir=data_dir, batch_size=preset.batch_size, train_subset=preset.train_subset, on_device=True
    )
    model = ImageClassifier(
        model=model_name,
        num_classes=datamodule.num_classes,
        image_size=datamodule.image_size,
        in_channels=datamodule.in_channels,
    )
    kwargs = SCHEDULES[schedule]
    if "optimizer" in kwargs:  # the paper's method: no progress guard (a policy of the run's own)
        kwargs = {**kwargs, "fallback": FallbackPolicy(progress_window=None)}
    callback = ConvexitySwapCallback(**kwargs)
    trainer = pl.Trainer(
        accelerator=preset.accelerator,
        devices=1,
        max_epochs=epochs,
        callbacks=[callback],
        logger=TensorBoardLogger(log_dir, name=f"{data}-{model_name}", version=schedule),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,  # evaluated once, on the whole test split, after training
        deterministic=True,
    )
    began = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - began
    train_loss, train_acc = evaluate(model, datamodule.train_data)
    val_loss, val_acc = evaluate(model, datamodule.val_data)
    samples = len(datamodule.train_data[1])
    return RunResult(
        data, model_name, schedule, epochs, train_loss, train_acc, val_loss, val_acc,
        callback.swap_epoch, callback.compute / (3 * samples), seconds, samples, callback.history,
    )  # fmt: skip


def _cell(result: RunResult) -> str:
    def short(value: float) -> str:
        return f"{value:.4f}".lstrip("0") if value < 1 else f"{value:.3f}"

    return "/".join(short(v) for v in (result.train_loss, result.train_acc, result.val_loss, result.val_acc))


def write_table(results: list[RunResult], preset_name: str, preset: Preset, path: Path) -> None:
    """The paper's Table 1 format: train loss / train acc / val loss / val acc per schedule."""
    by_key = {(r.data, r.model, r.schedule): r for r in results}
    lines = [
        f"Preset `{preset_name}`: {preset.description}. Cells: train loss / train acc / val loss / val acc "
        "(MSE on one-hot targets; validation = the official test split). Swap: the epoch from which the run "
        "with the callback's defaults trained CG, and where the paper's rule would have swapped in the Adam run "
        "(detect only). Compute: gradient passes over the training set (forward 1/3, backward 2/3).",
        "",
        "| data | model | Adam | Adam 30 % + CG | Adam + CG, the defaults | CG only | swap: defaults / paper's rule | "
        "compute (Adam / 30 % / defaults / CG only) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for data in preset.datasets:
        for model in preset.models:
            row = [by_key.get((data, model, s)) for s in SCHEDULES]
            if not all(row):
                continue
            adam, fixed, default, cg_only = row
            swap = " / ".join("none" if r.swap_epoch is None else str(r.swap_epoch) for r in (default, adam))
            compute = " / ".join(f"{r.compute:.0f}" for r in row)
            lines.append(
                f"| {data} | {model} | {_cell(adam)} | {_cell(fixed)} | {_cell(default)} | {_cell(cg_only)} | "
                f"{swap} | {compute} |"
            )
    path.write_text("\n".join(lines) + "\n")


def write_csv(results: list[RunResult], path: Path) -> None:
    fields = [name for name in RunResult.__dataclass_fields__ if name != "history"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for result in results:
            writer.writerow({key: value for key, value in asdict(result).items() if key != "history"})


def loss_vs_compute_figure(runs: list[RunResult], title: str) -> Any:
    """Training loss against compute for the schedules of one data set and model (the paper's Fig. 6)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    for run in runs:
        points = [(r["compute"] / (3 * run.train_samples), r["loss"]) for r in run.history if r["loss"] > 0]
        if points:
            axes.plot(*zip(*points), label=run.schedule)
    axes.set_yscale("log")
    axes.set_xlabel("compute (gradient passes over the training set)")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def write_figures(results: list[RunResult], out: Path) -> None:
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.data, result.model), []).append(result)
        if result.schedule in ("adam30+cg", "default") and result.history:
            swap = next((i for i, r in enumerate(result.history) if r["phase"] == "second"), None)
            first = [(r["grad_norm"], i) for i, r in enumerate(result.history) if r["phase"] == "first"]
            figure = norm_vs_loss_figure(
                result.history,
                swap_index=None if swap is None else max(swap - 1, 0),
                peak_index=max(first)[1] if first else None,
                title=f"{result.data} {result.model}, {result.schedule}",
            )
            if figure is not None:
                save_figure(figure, figures / f"{result.data}-{result.model}-{result.schedule}-norm_vs_loss.png")
    for (data, model), runs in groups.items():
        save_figure(loss_vs_compute_figure(runs, f"{data} {model}"), figures / f"{data}-{model}-loss_vs_compute.png")


def main(argv: list[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--data-dir", default="data", help="where the data sets are (or are downloaded to)")
    parser.add_argument("--out", default="reproduction", help="results.csv, results.md and figures/ go here")
    parser.add_argument("--log-dir", default="runs/reproduction", help="TensorBoard logs of every run")
    parser.add_argument("--models", nargs="*", help="a subset of the preset's models")
    parser.add_argument("--schedules", nargs="*", choices=sorted(SCHEDULES), help="a subset of the schedules")
    parser.add_argument("--epochs", type=int, help="override the preset's number of epochs (for quick checks)")
    parser.add_argument("--train-subset", type=int, help="override the preset's training subset size")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    preset = PRESETS[args.preset]
    if args.models:
        preset = Preset(**{**asdict(preset), "models": tuple(args.models)})
    if args.epochs:
        preset = Preset(**{**asdict(preset), "epochs": {}, "default_epochs": args.epochs})
    if args.train_subset:
        preset = Preset(**{**asdict(preset), "train_subset": args.train_subset})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    began = time.perf_counter()
    for data in preset.datasets:
        for model in preset.models:
            for schedule in args.schedules or SCHEDULES:
                result = run_one(preset, data, model, schedule, args.data_dir, Path(args.log_dir))
                results.append(result)
                print(
                    f"{data} {model} {schedule}: {_cell(result)} swap {result.swap_epoch} "
                    f"({result.seconds:.0f} s, total {time.perf_counter() - began:.0f} s)",
                    flush=True,
                )
    write_csv(results, out / "results.csv")
    write_table(results, args.preset, preset, out / "results.md")
    write_figures(results, out)
    print(f"\nwrote {out / 'results.csv'}, {out / 'results.md'} and {out / 'figures'}")
    return results


if __name__ == "__main__":
    main()
