"""What each phase costs: the callback before the swap, and a CG iteration against an Adam epoch, side by side.

For each model (``vit-nomlp`` and ``vgg5`` by default) on the first MNIST training images:

1. **Before the swap**, the callback's host time per training step, from Lightning's ``SimpleProfiler`` (the sum of
   the hooks it runs during training, the checks included, over the fit, divided by the steps), with the default
   rule (the plateau rule: the gradient norm sampled one step in 32) and with the paper's rule (the norm of
   every step);
2. **steps per second** with and without the callback (its defaults, no swap in a few epochs), in interleaved pairs of
   fits (without, with, without, with, ...), with the paired median and the run-to-run spread of the fits without;
3. **the CG phase**: Adam for a few epochs, then CG (``detector=None, swap_epoch=N``), timing every epoch: gradient-pass
   equivalents per CG epoch (a forward pass counts a third, a backward two thirds: the callback's compute) and the
   wall time of a CG epoch over an Adam epoch.

    python benchmarks/phase_cost.py --data-dir data                 # CPU, about ten minutes on 2 cores
    python benchmarks/phase_cost.py --data-dir data --device cuda   # a GPU
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.profilers import SimpleProfiler

sys.path.insert(0, str(Path(__file__).parent))
from fullbatch_vs_minibatch import load_mnist, quiet_trainer

from example_modules.classifier import ImageClassifier
from example_modules.data import DeviceTensorLoader
from lightning_twophase import ConvexitySwapCallback, FallbackPolicy, GradientNormPeakDetector


class EpochTimes(pl.Callback):
    """Wall time of every training epoch (the GPU synchronised at both ends)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._began = 0.0

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer)
        self._began = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer)
        self.seconds.append(time.perf_counter() - self._began)


def model_for(name: str) -> pl.LightningModule:
    torch.manual_seed(0)
    return ImageClassifier(model=name, num_classes=10, image_size=28, in_channels=1, loss="mse", lr=1e-3)


def loader(train: tuple[torch.Tensor, torch.Tensor]) -> DeviceTensorLoader:
    return DeviceTensorLoader(*train, batch_size=512, shuffle=True, seed=0)


TRAINING_HOOKS = (
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
)


def hook_time_per_step(name: str, train: Any, device: str, epochs: int, detector: Any) -> tuple[float, int, int]:
    """Microseconds of the callback's hooks per training step, the steps, and the model's parameter tensors."""
    profiler = SimpleProfiler()
    model = model_for(name)
    callback = ConvexitySwapCallback(detector=detector, swap_epoch=None, log_figures=False)
    fit = quiet_trainer(epochs, [callback], device, profiler)
    fit.fit(model, train_dataloaders=loader(train))
    # The hooks the callback runs during training (the checks included); the profiler also times every hook the
    # callback does not override (a few microseconds each of its own overhead, as for an empty callback), and the
    # once-per-fit hooks (setup, on_fit_start, on_train_start, on_train_end) are not a cost per step.
    total = sum(
        sum(durations)
        for action, durations in profiler.recorded_durations.items()
        if action.startswith("[Callback]ConvexitySwapCallback.") and action.rsplit(".", 1)[1] in TRAINING_HOOKS
    )
    return 1e6 * total / fit.global_step, fit.global_step, sum(1 for _ in model.parameters())


def steps_per_second(name: str, train: Any, device: str, epochs: int, pairs: int) -> tuple[list[float], list[float]]:
    """Interleaved fits without and with the callback (its default rule, which does not fire in a few epochs): steps
    per second of each."""
    without, with_callback = [], []
    for _ in range(pairs):
        for runs, callbacks in ((without, []), (with_callback, None)):
            callbacks = callbacks if callbacks is not None else [ConvexitySwapCallback(log_figures=False)]
            fit = quiet_trainer(epochs, callbacks, device)
            began = time.perf_counter()
            fit.fit(model_for(name), train_dataloaders=loader(train))
            if device == "cuda":
                torch.cuda.synchronize()
            runs.append(fit.global_step / (time.perf_counter() - began))
    return without, with_callback


def cg_phase(name: str, train: Any, device: str, adam_epochs: int, cg_epochs: int) -> dict[str, float]:
    """Adam, then CG: passes per CG epoch (median, mean) and the median CG epoch over the median Adam epoch."""
    times = EpochTimes()
    no_guard = FallbackPolicy(progress_window=None)
    callback = ConvexitySwapCallback(detector=None, swap_epoch=adam_epochs, fallback=no_guard, log_figures=False)
    fit = quiet_trainer(adam_epochs + cg_epochs, [callback, times], device)
    fit.fit(model_for(name), train_dataloaders=loader(train))
    samples = len(train[1])
    history = callback.history
    passes = [
        (record["compute"] - previous["compute"]) / (3 * samples)
        for previous, record in itertools.pairwise(history)
        if record["phase"] == "second"
    ]
    # The first Adam epoch and the swap epoch carry one-off costs (warm-up, the chunking decision): left out.
    adam = statistics.median(times.seconds[1:adam_epochs] or times.seconds[:adam_epochs])
    cg = statistics.median(times.seconds[adam_epochs + 1 :] or times.seconds[adam_epochs:])
    return {
        "passes_median": statistics.median(passes),
        "passes_mean": statistics.fmean(passes),
        "adam_epoch": adam,
        "cg_epoch": cg,
        "ratio": cg / adam,
        "trial_batching": fit.optimizers[0].objective.trial_batching if callback.phase == "second" else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", default="data", help="MNIST in torchvision's layout (downloaded there if missing)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="*", default=["vit-nomlp", "vgg5"])
    parser.add_argument("--samples", type=int, default=10000, help="training images")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved pairs of fits for the steps per second")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per timed fit (default: 2 on CPU, 10 on GPU)")
    parser.add_argument("--cg-epochs", type=int, default=None, help="CG epochs (default: 3 on CPU, 10 on GPU)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    cuda = args.device == "cuda"
    samples = args.samples
    epochs = args.epochs or (10 if cuda else 2)
    cg_epochs = args.cg_epochs or (10 if cuda else 3)
    train, _ = load_mnist(args.data_dir, samples)
    train = (train[0].to(args.device), train[1].to(args.device))
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}, lightning {pl.__version__}; first {samples} MNIST images, batch 512\n")
    rows = []
    for name in args.models:
        default_us, steps, tensors = hook_time_per_step(name, train, args.device, epochs, "plateau")
        # The paper's rule measures the norm at every step (a patience no run meets keeps it measuring).
        paper_us, _, _ = hook_time_per_step(name, train, args.device, epochs, GradientNormPeakDetector(patience=10**6))
        without, with_callback = steps_per_second(name, train, args.device, epochs, args.pairs)
        paired = [w / o - 1 for w, o in zip(with_callback, without)]
        spread = (max(without) - min(without)) / statistics.median(without)
        cost = cg_phase(name, train, args.device, max(3, epochs), cg_epochs)
        rows.append((name, tensors, steps, default_us, paper_us, without, with_callback, paired, spread, cost))
        print(f"done: {name}", flush=True)
    print("\n## Before the swap: the callback's host time per training step (SimpleProfiler)\n")
    print("| model | parameter tensors | steps | default rule (norm sampled) | paper's rule (norm every step) |")
    print("|---|---|---|---|---|")
    for name, tensors, steps, default_us, paper_us, *_ in rows:
        print(f"| {name} | {tensors} | {steps} | {default_us:.1f} us | {paper_us:.1f} us |")
    print(f"\n## Steps per second without and with the callback ({args.pairs} interleaved pairs)\n")
    print("| model | without (median) | with (median) | paired median change | spread of the runs without |")
    print("|---|---|---|---|---|")
    for name, _, _, _, _, without, with_callback, paired, spread, _ in rows:
        print(
            f"| {name} | {statistics.median(without):.1f} | {statistics.median(with_callback):.1f} "
            f"| {100 * statistics.median(paired):+.1f} % | {100 * spread:.1f} % |"
        )
    print("\n## The CG phase: gradient-pass equivalents per CG epoch and a CG epoch against an Adam epoch\n")
    print("| model | passes per CG epoch: median (mean) | Adam epoch | CG epoch | CG / Adam | trial evaluations |")
    print("|---|---|---|---|---|---|")
    for name, *_, cost in rows:
        print(
            f"| {name} | {cost['passes_median']:.2f} ({cost['passes_mean']:.2f}) | {1000 * cost['adam_epoch']:.0f} ms "
            f"| {1000 * cost['cg_epoch']:.0f} ms | {cost['ratio']:.2f}x | {cost['trial_batching']} |"
        )


if __name__ == "__main__":
    main()
