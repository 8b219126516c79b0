"""When does the swap pay? The default rule against Adam, the paper's rule and a fixed split, side by side in one run.

Every case trains the same model from the same initial weights and batch order under six schedules:

* ``adam``: Adam alone for the case's epochs (lr 1e-3, constant);
* ``cosine``: Adam with cosine decay of the learning rate to 0 over the same epochs;
* ``default``: ``ConvexitySwapCallback()``, the default rule (probes, then the progress guard);
* ``paper``: ``ConvexitySwapCallback(detector="paper")``, the paper's Algorithm 1;
* ``fixed30``: Adam for 30 % of the epochs, then CG to the end (the paper's Table 1), without the progress guard;
* ``equal``: Adam alone for as many gradient passes as the ``default`` run used (its epochs rounded).

The table gives, per run, the final loss on the whole training set, the misclassified training images, the validation
accuracy, the epoch of the (last) swap, the phase at the end, the compute in gradient passes over the training set
and the wall time, with the ratio of Adam's final loss to the run's (``x lower`` > 1: better than Adam alone). The
acceptance checks of the default rule follow the table.

    python benchmarks/swap_study.py --data-dir data                      # the CPU suite, about an hour on 2 cores
    python benchmarks/swap_study.py --data-dir data --cases mlp-mse-s0 --schedules adam default
    python benchmarks/swap_study.py --data-dir data --device cuda --cases gpu   # vit-nomlp and vgg5 on 10,000 images
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fullbatch_vs_minibatch import TanhMLP, evaluate_per_image, load_mnist, quiet_trainer

from example_modules.classifier import ImageClassifier
from example_modules.data import DeviceTensorLoader, DigitsDataModule
from lightning_twophase import ConvexitySwapCallback

Data = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One model on one data set: ``data`` is ``"mnist"`` (the first ``samples`` training images) or ``"digits"``."""

    name: str
    data: str
    model: str
    epochs: int
    seed: int = 0
    samples: int = 10000
    loss: str = "mse"


CASES = {
    case.name: case
    for case in (
        Case("mlp-mse-s0", "mnist", "mlp", 300, seed=0),
        Case("mlp-mse-s1", "mnist", "mlp", 300, seed=1),
        Case("mlp-mse-s2", "mnist", "mlp", 300, seed=2),
        Case("mlp-ce-s0", "mnist", "mlp", 300, seed=0, loss="cross_entropy"),
        Case("digits-vit", "digits", "vit-nomlp-wkewq-wvwo", 300),
        Case("mnist2k-vit-nomlp", "mnist", "vit-nomlp", 300, samples=2000),
        Case("mnist2k-vgg5", "mnist", "vgg5", 100, samples=2000),
        # On a GPU: the paper's models on more data.
        Case("mnist10k-vit-nomlp", "mnist", "vit-nomlp", 300),
        Case("mnist10k-vgg5", "mnist", "vgg5", 300),
    )
}
CPU_SUITE = ["mlp-mse-s0", "mlp-mse-s1", "mlp-mse-s2", "mlp-ce-s0", "digits-vit", "mnist2k-vit-nomlp", "mnist2k-vgg5"]
GPU_EXTRA = ["mnist10k-vit-nomlp", "mnist10k-vgg5"]
SCHEDULES = ["adam", "cosine", "default", "paper", "fixed30", "equal"]


@dataclass
class Result:
    case: str
    schedule: str
    train_loss: float
    misclassified: int
    val_accuracy: float
    swap_epoch: int | None
    phase: str
    compute: float
    seconds: float
    epochs: int


def load(case: Case, data_dir: str, device: torch.device) -> tuple[Data, Data]:
    if case.data == "digits":
        module = DigitsDataModule(batch_size=512)
        module.setup("fit")
        train, val = module.train_data, module.val_data
    else:
        train, val = load_mnist(data_dir, case.samples)
    return tuple(t.to(device) for t in train), tuple(t.to(device) for t in val)  # type: ignore[return-value]


def make_model(case: Case, image_size: int) -> pl.LightningModule:
    pl.seed_everything(case.seed, verbose=False)
    if case.model == "mlp":
        return TanhMLP(case.loss)
    return ImageClassifier(model=case.model, num_classes=10, image_size=image_size, in_channels=1, loss=case.loss)


def callback_for(schedule: str) -> ConvexitySwapCallback | None:
    if schedule in ("adam", "cosine", "equal"):
        return None  # Adam alone
    if schedule == "default":
        return ConvexitySwapCallback(log_figures=False)
    if schedule == "paper":
        return ConvexitySwapCallback(detector="paper", log_figures=False)
    return ConvexitySwapCallback(fixed_swap_epoch=0.3, fallback_progress_window=None, log_figures=False)


def run(case: Case, schedule: str, train: Data, val: Data, device: torch.device, epochs: int) -> Result:
    model = make_model(case, image_size=train[0].shape[-1])
    if schedule == "cosine":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0)
        model.configure_optimizers = lambda: {"optimizer": optimizer, "lr_scheduler": cosine}  # type: ignore[method-assign]
    callback = callback_for(schedule)
    trainer = quiet_trainer(epochs, [] if callback is None else [callback], device.type)
    loader = DeviceTensorLoader(*train, batch_size=512, shuffle=True, seed=case.seed)
    began = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    seconds = time.perf_counter() - began
    model.to(device)
    train_loss, train_accuracy, _ = evaluate_per_image(model, train)
    _, val_accuracy, _ = evaluate_per_image(model, val)
    return Result(
        case.name,
        schedule,
        train_loss,
        round((1 - train_accuracy) * len(train[1])),
        val_accuracy,
        None if callback is None else callback.swap_epoch,
        "first" if callback is None else callback.phase,
        float(epochs) if callback is None else callback.compute / (3 * len(train[1])),
        seconds,
        epochs,
    )


def ratio(reference: float, value: float) -> float:
    return reference / value if value > 0 else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", default="data", help="MNIST in torchvision's layout (downloaded there if missing)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cases", nargs="*", default=None, help=f"of {list(CASES)}, or 'gpu' (default: the CPU suite)")
    parser.add_argument("--schedules", nargs="*", default=SCHEDULES, choices=SCHEDULES)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.cases or CPU_SUITE
    names = [n for name in names for n in ((CPU_SUITE + GPU_EXTRA) if name == "gpu" else [name])]
    schedules = [s for s in SCHEDULES if s in args.schedules]
    results: list[Result] = []
    began = time.perf_counter()
    for name in names:
        case = CASES[name]
        train, val = load(case, args.data_dir, device)
        default: Result | None = None
        for schedule in schedules:
            epochs = case.epochs
            if schedule == "equal":
                if default is None:
                    continue
                epochs = max(case.epochs, round(default.compute))
            result = run(case, schedule, train, val, device, epochs)
            default = result if schedule == "default" else default
            results.append(result)
            print(
                f"done: {name} {schedule}: train loss {result.train_loss:.3e}, swap {result.swap_epoch}, "
                f"phase {result.phase}, {result.compute:.0f} passes, {result.seconds:.0f} s",
                flush=True,
            )
    report(results, time.perf_counter() - began, args.device)


def report(results: list[Result], seconds: float, device: str) -> None:
    threads = torch.get_num_threads()
    print(
        f"\n{device}, {threads} CPU threads, torch {torch.__version__}, lightning {pl.__version__}; "
        f"{seconds / 60:.1f} minutes in all\n"
    )
    print(
        "| case | schedule | epochs | train loss | vs Adam | misclassified | val acc | swap epoch | phase at the end "
        "| compute (passes) | wall time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    adam = {r.case: r for r in results if r.schedule == "adam"}
    for r in results:
        reference = adam.get(r.case)
        versus = "-" if reference is None or r is reference else f"{ratio(reference.train_loss, r.train_loss):.2f}x"
        swap = "-" if r.swap_epoch is None else str(r.swap_epoch)
        print(
            f"| {r.case} | {r.schedule} | {r.epochs} | {r.train_loss:.3e} | {versus} | {r.misclassified} "
            f"| {100 * r.val_accuracy:.2f} % | {swap} | {r.phase} | {r.compute:.0f} | {r.seconds:.0f} s |"
        )
    print("\n'vs Adam': Adam alone's final training loss over the run's, at the case's epochs (> 1: lower than Adam).")
    defaults = [r for r in results if r.schedule == "default" and r.case in adam]
    if not defaults:
        return
    ratios = [ratio(adam[r.case].train_loss, r.train_loss) for r in defaults]
    print("\nAcceptance of the default rule:")
    for r, value in zip(defaults, ratios):
        accuracy_gap = 100 * (adam[r.case].val_accuracy - r.val_accuracy)
        loss_ok, accuracy_ok = value >= 1 / 1.05, accuracy_gap <= 0.5
        verdict = "met" if loss_ok and accuracy_ok else "NOT met"
        print(
            f"- {r.case}: training loss {1 / value:.3f}x Adam's (at most 1.05x), validation accuracy "
            f"{-accuracy_gap:+.2f} points (at least -0.5): {verdict}"
        )
    median = statistics.median(ratios)
    verdict = "met" if median >= 1.3 else "NOT met"
    print(f"- median over the cases: {median:.2f}x lower than Adam (at least 1.3x): {verdict}")
    equal = {r.case: r for r in results if r.schedule == "equal"}
    pairs = [(r, equal[r.case]) for r in defaults if r.case in equal]
    if pairs:
        described = ", ".join(f"{r.case} {ratio(e.train_loss, r.train_loss):.2f}x" for r, e in pairs)
        print(f"- at equal compute (Adam given the default run's gradient passes), default vs Adam: {described}")


if __name__ == "__main__":
    main()
