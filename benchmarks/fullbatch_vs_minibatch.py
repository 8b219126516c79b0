"""Adam, then each CG-phase mode, against Adam continued: real MNIST, measured side by side in one run.

The set-up of the measurements that shaped the design: the first 10,000 MNIST training images, a tanh MLP
784-128-128-10, the mean squared error between softmax outputs and one-hot targets, batch 512, Adam with lr 1e-3.
Every schedule trains the same number of epochs through a Lightning Trainer; the two-phase schedules use
ConvexitySwapCallback with a fixed swap epoch, so that every CG mode starts from the same Adam result. The table
gives the final training loss (on all 10,000 images), the validation loss and accuracy (the official test split),
the compute in gradient-pass equivalents over the training set (forward = 1/3, backward = 2/3 of a gradient pass)
and the CG phase's gradient evaluations per iteration (a forward-only trial point counts as 1/3).

    python benchmarks/fullbatch_vs_minibatch.py --data-dir data   # MNIST is downloaded to data/ if missing
    python benchmarks/fullbatch_vs_minibatch.py --model vit-nomlp --adam-epochs 30 --cg-epochs 70   # a small ViT
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from example_modules.classifier import ImageClassifier
from example_modules.data import DeviceTensorLoader
from lightning_twophase import ConvexitySwapCallback
from lightning_twophase.preconditioning import second_moment_preconditioner


class TanhMLP(pl.LightningModule):
    """The measurements' model: 784-128-128-10 with tanh, softmax-MSE loss (or cross-entropy), Adam lr 1e-3."""

    def __init__(self, loss: str = "mse") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
        self.loss = loss

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.flatten(1))

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.per_image_loss(logits, labels).mean()

    def per_image_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss == "cross_entropy":
            return F.cross_entropy(logits, labels, reduction="none")
        return (logits.softmax(dim=1) - F.one_hot(labels, 10).to(logits.dtype)).square().mean(dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return self.compute_loss(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def load_mnist(data_dir: str, train_samples: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    from torchvision.datasets import MNIST

    def split(train: bool, count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = MNIST(data_dir, train=train, download=True)
        images = dataset.data[:count].float().div(255.0).sub(0.1307).div(0.3081).unsqueeze(1)
        return images, dataset.targets[:count].long()

    return split(True, train_samples), split(False, None)


@dataclass
class Result:
    schedule: str
    train_loss: float
    val_loss: float
    val_accuracy: float
    compute: float
    cg_evaluations_per_iteration: tuple[float, float] | None  # median, mean per CG epoch
    seconds: float
    swap_epoch: int | None
    final_phase: str
    train_errors: int
    train_loss_correct: float


def quiet_trainer(
    max_epochs: int, callbacks: list[pl.Callback], device: str = "cpu", profiler: Any = None
) -> pl.Trainer:
    """A one-device Trainer without logging, checkpoints or progress bar (nothing but the training itself is timed)."""
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        profiler=profiler,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def make_model(name: str, seed: int) -> pl.LightningModule:
    torch.manual_seed(seed)
    if name in ("mlp", "mlp-ce"):
        return TanhMLP("cross_entropy" if name == "mlp-ce" else "mse")
    return ImageClassifier(model=name, num_classes=10, image_size=28, in_channels=1, loss="mse", lr=1e-3)


@torch.no_grad()
def evaluate(model: pl.LightningModule, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    loss, accuracy, _ = evaluate_per_image(model, data)
    return loss, accuracy


@torch.no_grad()
def evaluate_per_image(
    model: pl.LightningModule, data: tuple[torch.Tensor, torch.Tensor]
) -> tuple[float, float, float]:
    """Mean loss and accuracy, and the part of the mean loss that the correctly classified images contribute.

    The last figure separates two things the mean hides: an image classified wrongly with a saturated softmax sits on a
    plateau of the softmax-MSE loss (its gradient vanishes), so it stays wrong under every optimizer and adds up to
    2 / (10 N) to the mean, however well the rest is fitted.
    """
    model.eval()
    images, labels = data
    total, correct, total_correct_images = 0.0, 0, 0.0
    for start in range(0, len(labels), 2000):
        logits = model(images[start : start + 2000])
        chunk = labels[start : start + 2000]
        total += float(model.compute_loss(logits, chunk)) * len(logits)
        hits = logits.argmax(dim=1) == chunk
        correct += int(hits.sum())
        # Per image, the same softmax-MSE as compute_loss (every model here trains with it).
        if hasattr(model, "per_image_loss"):
            per_image = model.per_image_loss(logits, chunk)
        else:  # the example models train with softmax-MSE here
            per_image = (logits.float().softmax(dim=1) - F.one_hot(chunk, logits.shape[1]).float()).square().mean(1)
        total_correct_images += float(per_image[hits].sum())
    model.train()
    return total / len(labels), correct / len(labels), total_correct_images / len(labels)


def training_breakdown(model: pl.LightningModule, train: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, int, float]:
    """The training loss, the number of misclassified training images and the loss of the correctly classified."""
    loss, accuracy, loss_correct = evaluate_per_image(model, train)
    return loss, round((1 - accuracy) * len(train[1])), loss_correct


def run(
    schedule: str,
    model_name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    adam_epochs: int,
    cg_epochs: int,
    callback_kwargs: dict[str, Any] | None,
    seed: int,
) -> Result:
    model = make_model(model_name, seed)
    total_epochs = adam_epochs + cg_epochs
    if callback_kwargs is None:  # Adam all the way; the callback only watches, to report the detected point
        callback = ConvexitySwapCallback(detect_only=True, detector="paper", swap_epoch=None, log_figures=False)
    else:
        callback = ConvexitySwapCallback(detector=None, swap_epoch=adam_epochs, log_figures=False, **callback_kwargs)
    trainer = quiet_trainer(total_epochs, [callback])
    began = time.perf_counter()
    trainer.fit(model, train_dataloaders=DeviceTensorLoader(*train, batch_size=512, shuffle=True, seed=seed))
    seconds = time.perf_counter() - began
    train_loss, train_errors, train_loss_correct = training_breakdown(model, train)
    val_loss, val_accuracy = evaluate(model, val)
    compute = callback.compute / (3 * len(train[1]))
    per_iteration = cg_passes_per_epoch(callback.history, len(train[1]))
    return Result(
        schedule,
        train_loss,
        val_loss,
        val_accuracy,
        compute,
        per_iteration,
        seconds,
        callback.swap_epoch,
        callback.phase,
        train_errors,
        train_loss_correct,
    )


def cg_passes_per_epoch(history: list[dict[str, Any]], samples: int) -> tuple[float, float] | None:
    """Median and mean gradient-pass equivalents of the CG phase's epochs (one iteration each): the loop's own pass
    plus the line search's trials, from the compute the callback recorded at each check."""
    passes = []
    for previous, record in itertools.pairwise(history):
        if record["phase"] == "second":
            passes.append((record["compute"] - previous["compute"]) / (3 * samples))
    if not passes:
        return None
    return statistics.median(passes), statistics.fmean(passes)


def run_scipy_reference(
    model_name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    adam_epochs: int,
    cg_epochs: int,
    preconditioned: bool,
    seed: int,
) -> Result:
    """scipy's CG (Polak-Ribiere+, Wolfe line search) on the flattened model from the same Adam result.

    It runs in float64 (in float32 scipy's line search stops early with a precision-loss warning). With
    ``preconditioned``, it runs on the variables rescaled by the square root of the callback's second-moment
    preconditioner, ``x = sqrt(P) * y``: the measurements' method, and the same as preconditioned CG with ``P``.
    """
    import numpy as np
    import scipy.optimize

    model = make_model(model_name, seed)
    began = time.perf_counter()
    trainer = quiet_trainer(adam_epochs, [])
    trainer.fit(model, DeviceTensorLoader(*train, batch_size=512, shuffle=True, seed=seed))
    scale = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    if preconditioned:
        diagonal = second_moment_preconditioner(trainer.optimizers[0])
        assert diagonal is not None, "Adam keeps second moments"
        scale = torch.cat([d.reshape(-1) for d in diagonal]).double().sqrt()
    model.double()
    params = list(model.parameters())
    images, labels = train[0].double(), train[1]
    evaluations = 0

    def loss_and_grad(rescaled: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal evaluations
        evaluations += 1
        torch.nn.utils.vector_to_parameters(torch.from_numpy(rescaled) * scale, params)
        model.zero_grad()
        loss = model.compute_loss(model(images), labels)
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        return float(loss.detach()), (grad * scale).numpy()

    start = (torch.nn.utils.parameters_to_vector(params).detach() / scale).numpy()
    result = scipy.optimize.minimize(
        loss_and_grad, start, jac=True, method="CG", options={"maxiter": cg_epochs, "gtol": 0.0}
    )
    torch.nn.utils.vector_to_parameters(torch.from_numpy(result.x) * scale, params)
    model.float()
    seconds = time.perf_counter() - began
    train_loss, train_errors, train_loss_correct = training_breakdown(model, train)
    val_loss, val_accuracy = evaluate(model, val)
    kind = "Adam-preconditioned scipy CG" if preconditioned else "scipy CG"
    label = f"Adam {adam_epochs} + {kind} {result.nit} iterations (reference, float64)"
    return Result(
        label, train_loss, val_loss, val_accuracy, adam_epochs + evaluations, (evaluations / max(result.nit, 1),) * 2,
        seconds, adam_epochs, "scipy", train_errors, train_loss_correct,
    )  # fmt: skip


def compare(reference: float, value: float) -> str:
    """``reference / value`` as "N.NNx lower" or "N.NNx higher"."""
    if value <= 0:
        return "-"
    factor = reference / value
    return f"{factor:.2f}x lower" if factor >= 1 else f"{1 / factor:.2f}x higher"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", default="data", help="folder with MNIST in torchvision's layout (downloaded there if missing)"
    )
    parser.add_argument(
        "--model",
        default="mlp",
        help="'mlp' (the measurements' model), 'mlp-ce' (the same with cross-entropy) or an example model name",
    )
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--adam-epochs", type=int, default=90)
    parser.add_argument("--cg-epochs", type=int, default=210)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    parser.add_argument("--macro-batches", type=int, default=5, help="K for the macro-batch row")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="schedules to leave out: adam, full, full-precond, macro, minibatch, scipy, scipy-precond",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    train, val = load_mnist(args.data_dir, args.train_samples)
    a, c = args.adam_epochs, args.cg_epochs
    schedules: list[tuple[str, str, dict[str, Any] | None]] = [
        ("adam", f"Adam {a + c}", None),
        ("full", f"Adam {a} + full-batch CG {c}", {"optimizer": {"name": "cg", "preconditioner": "none"}}),
        ("full-precond", f"Adam {a} + full-batch CG {c}, Adam-preconditioned", {}),
        # The unsound modes run without the fallback, so that the table shows what they do to the Adam result.
        (
            "macro",
            f"Adam {a} + macro-batch CG {c} (K={args.macro_batches} batches)",
            {
                "batches_per_iteration": args.macro_batches,
                "optimizer": {"name": "cg", "preconditioner": "none"},
                "fallback": False,
            },
        ),
        (
            "minibatch",
            f"Adam {a} + per-mini-batch CG {c}",
            {"batches_per_iteration": 1, "optimizer": {"name": "cg", "preconditioner": "none"}, "fallback": False},
        ),
    ]
    results = []
    for short, label, kwargs in schedules:
        if short in args.skip:
            continue
        result = run(label, args.model, train, val, a, c, kwargs, args.seed)
        results.append((short, result))
        print(f"done: {label}: train loss {result.train_loss:.3e} ({result.seconds:.0f} s)", flush=True)
    for short, preconditioned in (("scipy", False), ("scipy-precond", True)):
        if short in args.skip:
            continue
        result = run_scipy_reference(args.model, train, val, a, c, preconditioned, args.seed)
        results.append((short, result))
        print(f"done: {result.schedule}: train loss {result.train_loss:.3e} ({result.seconds:.0f} s)", flush=True)

    batches = -(-len(train[1]) // 512)
    print(
        f"\nMNIST, first {len(train[1])} training images ({batches} batches of 512), model {args.model}, "
        f"seed {args.seed}, {torch.get_num_threads()} CPU threads\n"
    )
    print(
        "| schedule | train loss | vs Adam alone | misclassified training images | train loss of the rest "
        "| vs Adam alone | val loss | val acc | compute (gradient passes) "
        "| second-phase passes / iteration: median (mean) "
        "| phase at the end | wall time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    by_name = dict(results)
    baseline = by_name.get("adam")
    for _, r in results:
        ratio = ratio_rest = "-"
        if baseline is not None and r is not baseline:
            ratio = compare(baseline.train_loss, r.train_loss)
            ratio_rest = compare(baseline.train_loss_correct, r.train_loss_correct)
        per_iteration = "-"
        if r.cg_evaluations_per_iteration:
            median, mean = r.cg_evaluations_per_iteration
            per_iteration = f"{median:.2f} ({mean:.2f})"
        print(
            f"| {r.schedule} | {r.train_loss:.3e} | {ratio} | {r.train_errors} | {r.train_loss_correct:.3e} "
            f"| {ratio_rest} | {r.val_loss:.4f} | {100 * r.val_accuracy:.2f} % | {r.compute:.0f} | {per_iteration} "
            f"| {r.final_phase} | {r.seconds:.0f} s |"
        )
    print(
        "\n'train loss of the rest': the part of the mean training loss from the correctly classified images. "
        "A wrongly classified image with a saturated softmax adds up to 2 / (10 N) to the mean and has almost no "
        "gradient, so the first column can be dominated by a handful of images that the optimizers barely move."
    )
    if baseline is not None and baseline.swap_epoch is not None:
        print(f"\nThe callback, watching the Adam-only run, detected the swap point after epoch {baseline.swap_epoch}.")
    full = by_name.get("full")
    if baseline is not None and full is not None:
        ratio = baseline.train_loss / full.train_loss
        verdict = "met" if ratio >= 4 else "NOT met"
        print(f"Target (full-batch CG >= 4x lower training loss than Adam alone): {ratio:.2f}x, {verdict}.")
        rest = compare(baseline.train_loss_correct, full.train_loss_correct)
        print(f"  On the correctly classified images alone, full-batch CG ends {rest} than Adam alone.")
    precond = by_name.get("full-precond")
    if full is not None and precond is not None:
        ratio = full.train_loss / precond.train_loss
        verdict = "met" if ratio >= 100 else "NOT met"
        print(f"Target (preconditioned >= 100x lower than plain full-batch CG): {ratio:.2f}x, {verdict}.")
        rest = compare(full.train_loss_correct, precond.train_loss_correct)
        print(f"  On the correctly classified images alone, preconditioned CG ends {rest} than plain CG.")
        if baseline is not None:
            better = precond.val_accuracy >= baseline.val_accuracy
            print(
                f"Preconditioned validation accuracy {100 * precond.val_accuracy:.2f} % vs Adam alone "
                f"{100 * baseline.val_accuracy:.2f} %: {'not below' if better else 'BELOW'}."
            )
    scipy_plain, scipy_precond = by_name.get("scipy"), by_name.get("scipy-precond")
    if scipy_plain is not None and scipy_precond is not None:
        ratio = compare(scipy_plain.train_loss, scipy_precond.train_loss)
        rest = compare(scipy_plain.train_loss_correct, scipy_precond.train_loss_correct)
        print(
            f"The same check with scipy's CG on the rescaled variables: preconditioned ends {ratio} than plain "
            f"({rest} on the correctly classified images)."
        )


if __name__ == "__main__":
    main()
