"""What the callback costs before the swap: the same Adam training with and without it (detection only).

Runs interleaved repeats (without, with, without, with, ...) of the same fit and prints steps per second for each,
their medians, the overhead and the run-to-run noise of the runs without the callback, measured in one run; then the
callback's per-step work (the gradient norm) timed alone, as a share of a training step, since on a shared CPU the
end-to-end difference is below the noise.

    python benchmarks/callback_overhead.py [--repeats 15] [--epochs 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_twophase import ConvexitySwapCallback


class MLP(pl.LightningModule):
    """The tanh MLP 784-128-128-10 of the MNIST measurements, on MNIST-shaped random data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        probabilities = nn.functional.softmax(self.net(inputs), dim=1)
        loss = nn.functional.mse_loss(probabilities, nn.functional.one_hot(labels, 10).float())
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fit_seconds(with_callback: bool, loader: DataLoader, epochs: int) -> tuple[float, int]:
    callbacks = [ConvexitySwapCallback(detect_only=True, log_figures=False)] if with_callback else []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    began = time.perf_counter()
    trainer.fit(MLP(), loader)
    return time.perf_counter() - began, trainer.global_step


def norm_hook_seconds(calls: int = 2000) -> float:
    """Seconds per call of the callback's per-step work before the swap (the gradient norm, kept on the device)."""
    model = MLP()
    optimizer = model.configure_optimizers()
    model.net(torch.randn(512, 784)).square().mean().backward()
    callback = ConvexitySwapCallback(detect_only=True, log_figures=False)
    began = time.perf_counter()
    for _ in range(calls):
        callback.on_before_optimizer_step(None, model, optimizer)  # type: ignore[arg-type]  # the trainer is unused
    return (time.perf_counter() - began) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(args.samples, 784, generator=generator), torch.randint(0, 10, (args.samples,)))
    loader = DataLoader(dataset, batch_size=512, shuffle=True)
    fit_seconds(False, loader, 1)  # warm-up: imports, allocator, thread pools
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for with_callback in (False, True):
            seconds, steps = fit_seconds(with_callback, loader, args.epochs)
            rates[with_callback].append(steps / seconds)
    print(
        f"{args.repeats} interleaved repeats of {args.epochs} epochs, {args.samples} samples, batch 512, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| run | steps/s (each repeat) | median |")
    print("|---|---|---|")
    for with_callback, label in ((False, "Adam alone"), (True, "Adam + ConvexitySwapCallback(detect_only)")):
        each = ", ".join(f"{rate:.1f}" for rate in rates[with_callback])
        print(f"| {label} | {each} | {statistics.median(rates[with_callback]):.1f} |")
    baseline, with_cb = statistics.median(rates[False]), statistics.median(rates[True])
    spread = (max(rates[False]) - min(rates[False])) / baseline
    # Paired ratios: each repeat's callback run against the baseline run just before it.
    paired = [b / a - 1 for a, b in zip(rates[True], rates[False])]
    print(f"\noverhead (median of paired repeats): {100 * statistics.median(paired):+.2f} %")
    print(f"overhead (ratio of medians): {100 * (baseline / with_cb - 1):+.2f} %")
    print(f"noise: spread of the runs without the callback, (max - min) / median: {100 * spread:.2f} %")
    # The end-to-end overhead is below the machine's noise on a small model; the hook timed alone bounds it.
    hook = norm_hook_seconds()
    print(
        f"the callback's per-step gradient norm timed alone: {1e6 * hook:.0f} us per step, "
        f"{100 * hook * baseline:.2f} % of a training step ({1e3 / baseline:.2f} ms)"
    )


if __name__ == "__main__":
    main()
