"""When does the swap pay? The default against Adam alone, at equal epochs and at equal compute, on real cases.

Every case trains one model from the same initial weights and batch order under these schedules:

* ``adam``: Adam alone (lr 1e-3, constant), measured at the case's epochs and on, until it has spent as many gradient
  passes as each two-phase schedule did (Adam at equal compute);
* ``cosine``: Adam with cosine decay of the learning rate to 0 over the case's epochs;
* ``default``: ``ConvexitySwapCallback()``, the callback's defaults;
* ``paper``: ``ConvexitySwapCallback(detector="paper", swap_epoch=None)``, the paper's Algorithm 1 (with the default
  progress guard);
* ``fixed30``: Adam for 30 % of the epochs, then plain CG to the end without the guard (the paper's Table 1);
* ``fixed30-pre``: the same, with CG preconditioned by Adam's second moments;
* ``default-noguard``: the defaults without the progress guard (what the guard changes; run on request).

A user pays in compute, and a CG epoch costs more than an Adam epoch (the line search evaluates the training set
again), so every two-phase run is compared with Adam twice: at the case's epochs, and at equal compute, the lower of
Adam's final loss at the case's epochs and Adam's loss after as many gradient passes as the run spent (constant-rate
Adam is not monotone). Losses are on the whole training set; "misclassified" counts training images; the weight norm
shows where a cross-entropy loss falls by growing the logits rather than by fitting better.

Cases with few batches per epoch (batch 512 on 1,437 to 2,000 images: Adam nearly full-batch) and many (batch 64:
Adam limited by mini-batch noise, the paper's regime) behave differently; the suite has both. Results are written
per case to ``--out`` (JSON), so cases can run in separate processes; ``--report`` prints the table of all of them.

    python benchmarks/swap_study.py --data-dir data --out study          # the CPU suite (hours on 2 cores)
    python benchmarks/swap_study.py --data-dir data --out study --cases mlp-mse-s0 --schedules adam default
    python benchmarks/swap_study.py --out study --report                 # the table of what is in study/
    python benchmarks/swap_study.py --data-dir data --out study --device cuda --cases gpu
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fullbatch_vs_minibatch import TanhMLP, evaluate_per_image, load_mnist, quiet_trainer

from example_modules.classifier import ImageClassifier
from example_modules.data import DeviceTensorLoader, DigitsDataModule
from lightning_twophase import ConvexitySwapCallback, FallbackPolicy

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
    batch_size: int = 512


CASES = {
    case.name: case
    for case in (
        # Batch 512: a few to twenty batches per epoch.
        Case("mlp-mse-s0", "mnist", "mlp", 300, seed=0),
        Case("mlp-mse-s1", "mnist", "mlp", 300, seed=1),
        Case("mlp-mse-s2", "mnist", "mlp", 300, seed=2),
        Case("mlp-ce-s0", "mnist", "mlp", 300, seed=0, loss="cross_entropy"),
        Case("digits-vit", "digits", "vit-nomlp-wkewq-wvwo", 300),
        Case("mnist2k-vit-nomlp", "mnist", "vit-nomlp", 300, samples=2000),
        Case("mnist2k-vgg5", "mnist", "vgg5", 100, samples=2000),
        # Batch 64: 23 to 32 batches per epoch, Adam limited by mini-batch noise (the paper's regime).
        Case("digits-vit-b64", "digits", "vit-nomlp-wkewq-wvwo", 300, batch_size=64),
        Case("mnist2k-mlp-b64", "mnist", "mlp", 300, samples=2000, batch_size=64),
        Case("mnist2k-vit-nomlp-b64", "mnist", "vit-nomlp", 300, samples=2000, batch_size=64),
        Case("mnist2k-vgg5-b64", "mnist", "vgg5", 100, samples=2000, batch_size=64),
        # On a GPU: the paper's models on more data.
        Case("mnist10k-vit-nomlp", "mnist", "vit-nomlp", 300),
        Case("mnist10k-vgg5", "mnist", "vgg5", 300),
    )
}
CPU_SUITE = [
    "mlp-mse-s0", "mlp-mse-s1", "mlp-mse-s2", "mlp-ce-s0", "digits-vit", "mnist2k-vit-nomlp", "mnist2k-vgg5",
    "digits-vit-b64", "mnist2k-mlp-b64", "mnist2k-vit-nomlp-b64", "mnist2k-vgg5-b64",
]  # fmt: skip
GPU_EXTRA = ["mnist10k-vit-nomlp", "mnist10k-vgg5"]
#: Callback arguments of each two-phase schedule; ``"no guard"``: a fallback policy without the progress guard (the
#: paper's method: CG to the end).
TWO_PHASE: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"detector": "paper", "swap_epoch": None},
    "fixed30": {
        "detector": None,
        "swap_epoch": 0.3,
        "optimizer": {"name": "cg", "preconditioner": "none"},
        "fallback": "no guard",
    },
    "fixed30-pre": {"detector": None, "swap_epoch": 0.3, "optimizer": "cg", "fallback": "no guard"},
    "lbfgs30": {"detector": None, "swap_epoch": 0.3},  # the default second phase at the practice's swap point
    "default-noguard": {"fallback": "no guard"},  # what the progress guard changes (not in the default suite run)
}
SCHEDULES = ["adam", "cosine", *TWO_PHASE]
#: The schedules of a plain run (``--schedules`` not given).
DEFAULT_SCHEDULES = [s for s in SCHEDULES if s != "default-noguard"]


@dataclass
class Result:
    """One run, measured on the whole training set at the end (Adam alone: at each epoch asked for)."""

    case: str
    schedule: str
    epochs: int
    train_loss: float
    misclassified: int
    val_accuracy: float
    weight_norm: float
    passes: float
    seconds: float
    swap_epoch: int | None = None
    phase: str = "first"
    fallback: str | None = None


def load(case: Case, data_dir: str, device: torch.device) -> tuple[Data, Data]:
    if case.data == "digits":
        module = DigitsDataModule(batch_size=case.batch_size)
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


class Measure(pl.Callback):
    """Measure the model on the whole training set at the end of the chosen epochs (counted from 1)."""

    def __init__(self, case: Case, schedule: str, epochs: set[int], train: Data, val: Data) -> None:
        self.case, self.schedule, self.epochs, self.train, self.val = case, schedule, epochs, train, val
        self.results: dict[int, Result] = {}
        self._began = 0.0
        self._measuring = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._began = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.epochs:
            began = time.perf_counter()
            self.results[epoch] = measure(self.case, self.schedule, pl_module, self.train, self.val, epoch)
            self.results[epoch].seconds = began - self._began - self._measuring
            self.results[epoch].passes = float(epoch)
            self._measuring += time.perf_counter() - began


def measure(case: Case, schedule: str, model: pl.LightningModule, train: Data, val: Data, epochs: int) -> Result:
    train_loss, train_accuracy, _ = evaluate_per_image(model, train)
    _, val_accuracy, _ = evaluate_per_image(model, val)
    norm = math.sqrt(sum(float(p.detach().double().square().sum()) for p in model.parameters()))
    misclassified = round((1 - train_accuracy) * len(train[1]))
    return Result(case.name, schedule, epochs, train_loss, misclassified, val_accuracy, norm, math.nan, math.nan)


def fit(case: Case, model: pl.LightningModule, train: Data, epochs: int, callbacks: list[pl.Callback], device: str):
    trainer = quiet_trainer(epochs, callbacks, device)
    loader = DeviceTensorLoader(*train, batch_size=case.batch_size, shuffle=True, seed=case.seed)
    began = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    return trainer, time.perf_counter() - began


def run_two_phase(case: Case, schedule: str, train: Data, val: Data, device: str) -> Result:
    model = make_model(case, image_size=train[0].shape[-1])
    kwargs = dict(TWO_PHASE[schedule])
    if kwargs.get("fallback") == "no guard":
        kwargs["fallback"] = FallbackPolicy(progress_window=None)
    callback = ConvexitySwapCallback(log_figures=False, **kwargs)
    _, seconds = fit(case, model, train, case.epochs, [callback], device)
    result = measure(case, schedule, model.to(train[0].device), train, val, case.epochs)
    result.passes = callback.compute / (3 * len(train[1]))
    result.seconds = seconds
    result.swap_epoch, result.phase = callback.swap_epoch, str(callback.phase)
    result.fallback = callback.fallback_reason
    return result


def run_adam(case: Case, train: Data, val: Data, device: str, computes: list[float]) -> list[Result]:
    """Adam alone, measured at the case's epochs and at each of ``computes`` (gradient passes, rounded up)."""
    epochs = {case.epochs} | {max(case.epochs, math.ceil(c - 1e-9)) for c in computes if math.isfinite(c)}
    model = make_model(case, image_size=train[0].shape[-1])
    monitor = Measure(case, "adam", epochs, train, val)
    fit(case, model, train, max(epochs), [monitor], device)
    return [monitor.results[epoch] for epoch in sorted(epochs)]


def run_cosine(case: Case, train: Data, val: Data, device: str) -> Result:
    model = make_model(case, image_size=train[0].shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=case.epochs, eta_min=0.0)
    model.configure_optimizers = lambda: {"optimizer": optimizer, "lr_scheduler": cosine}  # type: ignore[method-assign]
    _, seconds = fit(case, model, train, case.epochs, [], device)
    result = measure(case, "cosine", model.to(train[0].device), train, val, case.epochs)
    result.passes, result.seconds = float(case.epochs), seconds
    return result


def run_case(case: Case, schedules: list[str], data_dir: str, device: torch.device, out: Path) -> None:
    train, val = load(case, data_dir, device)
    path = out / f"{case.name}.json"
    results: list[Result] = []
    for schedule in [s for s in schedules if s in TWO_PHASE]:
        results.append(run_two_phase(case, schedule, train, val, device.type))
        announce(results[-1])
    if "cosine" in schedules:
        results.append(run_cosine(case, train, val, device.type))
        announce(results[-1])
    if "adam" in schedules:
        for result in run_adam(case, train, val, device.type, [r.passes for r in results]):
            results.append(result)
            announce(result)
    path.write_text(json.dumps([asdict(r) for r in results], indent=1))


def announce(r: Result) -> None:
    print(
        f"done: {r.case} {r.schedule} ({r.epochs} epochs): train loss {r.train_loss:.3e}, swap {r.swap_epoch}, "
        f"phase {r.phase}, {r.passes:.0f} passes, {r.seconds:.0f} s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="MNIST in torchvision's layout (downloaded if missing)")
    parser.add_argument("--out", default="swap_study", help="folder for the per-case results (JSON)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cases", nargs="*", default=None, help=f"of {list(CASES)}, or 'gpu' (default: the CPU suite)")
    parser.add_argument("--schedules", nargs="*", default=DEFAULT_SCHEDULES, choices=SCHEDULES)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--report", action="store_true", help="only print the table of the results in --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        warnings.filterwarnings("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        torch.set_num_threads(args.threads)
        names = args.cases or CPU_SUITE
        names = [n for name in names for n in ((CPU_SUITE + GPU_EXTRA) if name == "gpu" else [name])]
        for name in names:
            run_case(CASES[name], args.schedules, args.data_dir, torch.device(args.device), out)
    results = [Result(**r) for path in sorted(out.glob("*.json")) for r in json.loads(path.read_text())]
    report(results, args.device, args.threads)


def adam_at_equal_compute(adam: list[Result], run: Result, case: Case) -> Result | None:
    """The better of Adam at the case's epochs and Adam after as many passes as ``run`` spent."""
    at_epochs = next((r for r in adam if r.epochs == case.epochs), None)
    target = max(case.epochs, math.ceil(run.passes - 1e-9))
    at_compute = next((r for r in adam if r.epochs == target), None)
    candidates = [r for r in (at_epochs, at_compute) if r is not None]
    return min(candidates, key=lambda r: r.train_loss) if candidates else None


def ratio(reference: float, value: float) -> float:
    return reference / value if value > 0 else math.inf


def report(results: list[Result], device: str, threads: int) -> None:
    print(f"\n{device}, {threads} CPU thread(s) per process, torch {torch.__version__}, lightning {pl.__version__}\n")
    print(
        "| case | schedule | train loss | vs Adam, equal epochs | vs Adam, equal compute | misclassified | val acc "
        "| Δ val acc | weight norm | swap epoch | phase at the end | passes | wall time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases = list(dict.fromkeys(r.case for r in results))
    summary: list[tuple[str, float, float, float, Result]] = []
    for name in cases:
        case = CASES[name]
        adam = [r for r in results if r.case == name and r.schedule == "adam"]
        reference = next((r for r in adam if r.epochs == case.epochs), None)
        for r in results:
            if r.case != name or (r.schedule == "adam" and r is not reference):
                continue
            epochs_ratio = compute_ratio = math.nan
            if reference is not None and r is not reference:
                epochs_ratio = ratio(reference.train_loss, r.train_loss)
                equal = adam_at_equal_compute(adam, r, case)
                compute_ratio = ratio(equal.train_loss, r.train_loss) if equal is not None else math.nan
            accuracy = 100 * (r.val_accuracy - reference.val_accuracy) if reference is not None else math.nan
            print(
                f"| {name} | {r.schedule} | {r.train_loss:.3e} | {_x(epochs_ratio)} | {_x(compute_ratio)} "
                f"| {r.misclassified} | {100 * r.val_accuracy:.2f} % | {_signed(accuracy)} | {r.weight_norm:.1f} "
                f"| {'-' if r.swap_epoch is None else r.swap_epoch} | {r.phase} | {r.passes:.0f} | {r.seconds:.0f} s |"
            )
            if r.schedule == "default":
                summary.append((name, epochs_ratio, compute_ratio, accuracy, r))
    print(
        "\n'vs Adam': Adam alone's final training loss over the run's (> 1: the run ends lower). Equal compute: the "
        "lower of Adam's loss at the case's epochs and after as many gradient passes as the run spent. Δ val acc: "
        "points against Adam alone at the case's epochs."
    )
    if summary:
        acceptance(summary)


def acceptance(summary: list[tuple[str, float, float, float, Result]]) -> None:
    print("\nAcceptance of the default:")
    for name, epochs_ratio, compute_ratio, accuracy, _ in summary:
        met = epochs_ratio >= 1 / 1.05 and compute_ratio >= 1 / 1.10 and accuracy >= -1.0
        print(
            f"- {name}: {1 / epochs_ratio:.3f}x Adam's loss at equal epochs (at most 1.05x), {1 / compute_ratio:.3f}x "
            f"at equal compute (at most 1.10x), validation accuracy {_signed(accuracy)} points (at least -1): "
            f"{'met' if met else 'NOT met'}"
        )
    epochs_median = statistics.median(s[1] for s in summary)
    compute_median = statistics.median(s[2] for s in summary)
    accuracy_median = statistics.median(s[3] for s in summary)
    print(f"- median: {_x(epochs_median)} lower at equal epochs (at least 2x): {_met(epochs_median >= 2)}")
    print(f"- median: {_x(compute_median)} lower at equal compute (at least 1.3x): {_met(compute_median >= 1.3)}")
    print(f"- median change of validation accuracy: {_signed(accuracy_median)} points: {_met(accuracy_median >= 0)}")
    idle = [(name, r) for name, *_, r in summary if r.swap_epoch is None]
    for name, r in idle:
        extra = r.passes / r.epochs - 1
        print(f"- {name} did not swap: {100 * extra:+.1f} % gradient passes (at most +10 %): {_met(extra <= 0.10)}")


def _x(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.3g}x" if value < 1000 else f"{value:.2e}x"


def _signed(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:+.2f}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    main()
