"""Mixed precision through a swap: 16-mixed (with a GradScaler) and bf16-mixed against 32-true, on a GPU or the CPU.

A tanh MLP 64-64-10 on scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn), cross-entropy plus an L2
penalty (so that the training loss has a minimum above 0 to converge to), batch 256, Adam with lr 1e-2 for ``--swap``
epochs, then full-batch conjugate gradient (``ConvexitySwapCallback(detector=None, swap_epoch=...)``) to
``--epochs``. Every precision starts from the same weights. For each it prints the CG phase's last check loss and the
training loss of the final weights (evaluated in float32 on the whole set), against the same run in 32-true, with the
GradScaler's final scale; it exits with 1 if a run fails: no swap, a fallback, a weight that is not finite, or a final
loss above ``--tolerance`` times the 32-true run's.

    python benchmarks/gpu_precision_check.py                        # CUDA: 16-mixed (Lightning's scaler), bf16-mixed
    python benchmarks/gpu_precision_check.py --device cpu --scaler  # the CPU: 16-mixed with an explicit GradScaler
    python benchmarks/gpu_precision_check.py --device cpu --scaler --init-scale 1e12  # overflows to recover from

On the CPU, Lightning runs ``precision="16-mixed"`` as bfloat16 without a scaler; ``--scaler`` passes
``MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))`` instead, the set-up Lightning builds on a GPU.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_twophase import ConvexitySwapCallback, FallbackPolicy


class DigitsMLP(pl.LightningModule):
    """64-64-10 with tanh, cross-entropy plus ``l2 / 2`` times the squared weights, Adam."""

    def __init__(self, lr: float = 1e-2, l2: float = 1e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        self.lr = lr
        self.l2 = l2

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        return self.loss(self(inputs), labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        penalty = sum(p.float().square().sum() for p in self.parameters())
        return F.cross_entropy(logits, labels) + 0.5 * self.l2 * penalty

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits() -> TensorDataset:
    """The 1,797 digits, standardised per pixel (pixels that never vary stay 0)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = torch.as_tensor(data.data, dtype=torch.float32)
    inputs = (inputs - inputs.mean(0)) / inputs.std(0).clamp_min(1e-6)
    return TensorDataset(inputs, torch.as_tensor(data.target, dtype=torch.int64))


@dataclass
class Result:
    precision: str
    swapped: bool
    fallback: str | None
    finite: bool
    cg_loss: float  # the CG phase's last check: the mean loss where its last iteration started
    final_loss: float  # the final weights' training loss, evaluated in float32
    scale: float | None  # the GradScaler's final scale


def run(
    precision: str, device: str, scaler: bool, epochs: int, swap: int, init_scale: float = 2.0**16, seed: int = 0
) -> Result:
    """Train ``DigitsMLP`` in ``precision`` through a swap at epoch ``swap``; with ``scaler`` on the CPU, 16-mixed
    gets an explicit GradScaler."""
    torch.manual_seed(seed)
    model = DigitsMLP()
    # The progress guard off: the CG phase runs to the end in every precision, and its result is what is compared.
    no_guard = FallbackPolicy(progress_window=None)
    callback = ConvexitySwapCallback(detector=None, swap_epoch=swap, fallback=no_guard, log_figures=False)
    plugins: list[Any] = []
    grad_scaler = None
    if precision == "16-mixed" and (scaler or device == "cuda"):
        grad_scaler = torch.amp.GradScaler(device, init_scale=init_scale)
        plugins = [MixedPrecision("16-mixed", device, scaler=grad_scaler)]
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **({"plugins": plugins} if plugins else {"precision": precision}),
    )
    trainer.fit(
        model, DataLoader(digits(), batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(seed))
    )
    weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    inputs, labels = digits().tensors
    with torch.no_grad():
        model = model.float().cpu()
        final = float(model.loss(model(inputs), labels))
    cg_checks = [record["loss"] for record in callback.history if record["phase"] == "second"]
    return Result(
        precision=precision + (" + GradScaler" if grad_scaler is not None else ""),
        swapped=callback.swap_epoch is not None,
        fallback=callback.fallback_reason,
        finite=weights_finite,
        cg_loss=cg_checks[-1] if cg_checks else math.nan,
        final_loss=final,
        scale=grad_scaler.get_scale() if grad_scaler is not None else None,
    )


def failures(result: Result, reference: Result, tolerance: float) -> list[str]:
    """What is wrong with ``result`` against the 32-true ``reference``."""
    problems = []
    if not result.swapped:
        problems.append("no swap")
    if result.fallback is not None:
        problems.append(f"fell back: {result.fallback}")
    if not result.finite:
        problems.append("a weight is not finite")
    if not result.final_loss <= tolerance * reference.final_loss:
        problems.append(f"final loss {result.final_loss:.4g} above {tolerance} x 32-true's {reference.final_loss:.4g}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--scaler", action="store_true", help="on the CPU: 16-mixed with an explicit GradScaler")
    parser.add_argument("--precisions", nargs="+", default=["16-mixed", "bf16-mixed"])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--swap", type=int, default=5)
    parser.add_argument("--init-scale", type=float, default=2.0**16, help="the GradScaler's initial scale")
    parser.add_argument("--tolerance", type=float, default=1.5, help="allowed ratio of final losses to 32-true's")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: run with --device cpu --scaler for the CPU set-up.", file=sys.stderr)
        return 2
    if args.device == "cpu" and "16-mixed" in args.precisions and not args.scaler:
        print("Note: without --scaler Lightning runs 16-mixed on the CPU as bfloat16, without a GradScaler.")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    reference = run("32-true", args.device, False, args.epochs, args.swap)
    results = [run(p, args.device, args.scaler, args.epochs, args.swap, args.init_scale) for p in args.precisions]
    print(f"\nDigits MLP on {args.device}, Adam for {args.swap} epochs, then CG to epoch {args.epochs}:")
    print(f"{'precision':<26} {'CG last check':>14} {'final loss':>11} {'vs 32-true':>10} {'scale':>10}  verdict")
    failed = False
    for result in [reference, *results]:
        problems = failures(result, reference, args.tolerance) if result is not reference else []
        failed = failed or bool(problems)
        scale = f"{result.scale:.4g}" if result.scale is not None else "-"
        ratio = result.final_loss / reference.final_loss
        verdict = "; ".join(problems) or "ok"
        print(
            f"{result.precision:<26} {result.cg_loss:>14.4g} {result.final_loss:>11.4g} {ratio:>10.3f} {scale:>10}  "
            f"{verdict}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
