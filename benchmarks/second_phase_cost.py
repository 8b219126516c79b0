"""What a gradient pass of the callback's second phase costs against one of a plain-torch full-batch loop.

The regression case of ``benchmarks/practice.py`` (Friedman #1, 2,048 samples in 16 batches of 128, a 10-64-64-1 tanh
MLP): the plain loop is what practitioners write after Adam, ``torch.optim.LBFGS`` (strong Wolfe, ``max_iter=20``) on
the whole training set as one tensor, a gradient pass per closure call; the callback swaps after ``--adam-epochs``
epochs of Adam to its default second phase (the package's ``LBFGS``, up to 20 iterations per epoch on the kept
batches) and its passes are ``callback.compute / (3 * samples)`` over the second phase's epochs, the training loop's own
pass of each epoch included. Both run in this process with one thread, in turns (plain, callback, plain, ...), and the
ratio of each pair is printed with the median: the per-pass target of issue "second phase" is 1.3x.

    python benchmarks/second_phase_cost.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from example_modules.regression import Friedman1DataModule, MLPRegressor
from lightning_twophase import ConvexitySwapCallback


class SecondPhaseTimer(Callback):
    """Seconds and compute from the first epoch of the second phase to the end of training."""

    def __init__(self, swap: ConvexitySwapCallback) -> None:
        self.swap = swap
        self.began: float | None = None
        self.compute = 0.0
        self.seconds = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.began is None and self.swap.phase == "second":
            self.began, self.compute = time.perf_counter(), self.swap.compute

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.began is not None, "the callback never swapped"
        self.seconds = time.perf_counter() - self.began
        self.compute = self.swap.compute - self.compute


def plain_loop(model: MLPRegressor, inputs: torch.Tensor, targets: torch.Tensor, steps: int) -> tuple[float, int]:
    """Seconds per closure call of torch's L-BFGS on the whole training set, and the calls made."""
    optimizer = torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe", history_size=20)
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    began = time.perf_counter()
    for _ in range(steps):
        optimizer.step(closure)
    return (time.perf_counter() - began) / calls, calls


def callback_run(adam_epochs: int, epochs: int) -> tuple[float, float, MLPRegressor]:
    """Seconds per gradient pass of the callback's second phase, the passes, and the model after Adam's epochs."""
    pl.seed_everything(0, verbose=False)
    model, data = MLPRegressor(), Friedman1DataModule()
    swap = ConvexitySwapCallback(detector=None, swap_epoch=adam_epochs, log_figures=False)
    timer = SecondPhaseTimer(swap)
    trainer = pl.Trainer(
        max_epochs=adam_epochs + epochs, callbacks=[swap, timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, data)
    passes = timer.compute / (3 * data.num_train)
    return timer.seconds / passes, passes, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adam-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10, help="second-phase epochs of the callback")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    data = Friedman1DataModule()
    data.setup("fit")
    inputs, targets = data.training_set()
    ratios = []
    for repeat in range(args.repeats):
        callback_seconds, callback_passes, _ = callback_run(args.adam_epochs, args.epochs)
        pl.seed_everything(0, verbose=False)
        plain_seconds, calls = plain_loop(MLPRegressor(), inputs, targets, args.epochs)
        ratios.append(callback_seconds / plain_seconds)
        print(
            f"repeat {repeat}: plain loop {1e3 * plain_seconds:.2f} ms per pass ({calls} calls), callback's second "
            f"phase {1e3 * callback_seconds:.2f} ms per pass ({callback_passes:.0f} passes): {ratios[-1]:.2f}x"
        )
    print(f"median ratio, callback over plain loop, per gradient pass: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
