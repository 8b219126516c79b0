"""The practice of scientific ML beside the callback: Adam, then torch's L-BFGS on the whole data set.

PINN practitioners train with Adam and then switch to ``torch.optim.LBFGS`` on the whole data set in a plain loop. This
benchmark runs, per case and seed, from the same initial weights and the same data order:

* ``adam``: Adam alone for the case's ``E`` epochs, and on until it has spent as many gradient passes as the most
  expensive other run (at most ``--adam-cap`` x ``E`` epochs), its loss on the whole training set recorded after every
  epoch it needs;
* ``practice``: Adam for 30 % of ``E`` epochs in Lightning, then ``torch.optim.LBFGS(params, line_search_fn=
  "strong_wolfe", history_size=50)`` (``max_iter=20``, torch's default) in a plain full-batch torch loop: one
  ``optimizer.step(closure)`` per remaining epoch on the whole training set in one tensor (a fresh augmentation draw
  per epoch where the case augments; the closure re-seeds dropout, so all calls of one step see one function);
* one run of :class:`lightning_twophase.ConvexitySwapCallback` per ``--callback`` in a Lightning Trainer for ``E``
  epochs: ``default`` (its defaults), ``cg30`` (``detector=None, swap_epoch=0.3, optimizer="cg"``: the paper's CG),
  ``lbfgs30`` (the same with the package's L-BFGS), ``torch-lbfgs30`` (the same with ``optimizer=`` a factory of
  that L-BFGS), or ``NAME={...}``: keyword arguments as a Python literal dict
  (``ast.literal_eval``; a dict under ``fallback`` becomes ``FallbackPolicy(**dict)``).

Costs are in gradient passes: a forward and backward pass over the whole training set is 1; an Adam epoch is 1; a
closure call of the plain loop is 1; the callback's are ``callback.compute / (3 * n_train)`` (forward samples plus
twice the backward samples). Losses are measured after training on the whole training set in eval mode (dropout off,
the augmented case on its unaugmented images), with gradients enabled (the PINN's loss differentiates the network).
No validation runs during training; the metric is measured at the end. Ratios: Adam's loss over the run's at equal
epochs and at equal compute (Adam's loss after ``ceil(passes)`` epochs), and the practice's loss over the run's
(> 1: the run ends lower).

    python benchmarks/practice.py --cases pinn regression augmented-cnn --out practice.json
    python benchmarks/practice.py --cases pinn --seeds 0 1 2 --callback default --callback torch-lbfgs30 \\
        --callback "lbfgs={'optimizer': 'lbfgs'}" --out pinn.json
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from example_modules.augmented import AugmentedDigitsClassifier, AugmentedDigitsDataModule
from example_modules.comparison import snapshot
from example_modules.pinn import PoissonCollocationDataModule, PoissonPINN
from example_modules.regression import Friedman1DataModule, MLPRegressor
from lightning_twophase import ConvexitySwapCallback, FallbackPolicy
from lightning_twophase.arguments import epochs_of

#: The first phase's share of the epochs in the practice (and in ``cg30`` and ``torch-lbfgs30``).
FIRST_SHARE = 0.3


@dataclass(frozen=True)
class Case:
    """A module and a data module built by their classes' defaults, trained for ``epochs`` epochs."""

    name: str
    module: Callable[[], pl.LightningModule]
    datamodule: Callable[[int], pl.LightningDataModule]
    epochs: int


CASES = {
    case.name: case
    for case in (
        Case("pinn", PoissonPINN, lambda seed: PoissonCollocationDataModule(seed=seed), 1000),
        Case("regression", MLPRegressor, lambda seed: Friedman1DataModule(seed=seed), 300),
        Case("augmented-cnn", AugmentedDigitsClassifier, lambda seed: AugmentedDigitsDataModule(seed=seed), 40),
    )
}


def torch_lbfgs(groups: Any) -> torch.optim.Optimizer:
    """The practice's L-BFGS: strong Wolfe line search, history 50, torch's other defaults (``max_iter=20``)."""
    return torch.optim.LBFGS(groups, line_search_fn="strong_wolfe", history_size=50)


#: The callbacks named without arguments.
NAMED_CALLBACKS: dict[str, dict[str, Any]] = {
    "default": {},
    "cg30": {"detector": None, "swap_epoch": FIRST_SHARE, "optimizer": "cg"},
    "lbfgs30": {"detector": None, "swap_epoch": FIRST_SHARE, "optimizer": "lbfgs"},
    "torch-lbfgs30": {"detector": None, "swap_epoch": FIRST_SHARE, "optimizer": torch_lbfgs},
}


def parse_callback(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` (one of :data:`NAMED_CALLBACKS`) or ``NAME={...}`` (keyword arguments as a Python literal dict).

    Raises:
        argparse.ArgumentTypeError: for an unknown name or a right-hand side that is not a literal dict.

    """
    name, sep, literal = text.partition("=")
    name = name.strip()
    if not sep:
        if name not in NAMED_CALLBACKS:
            raise argparse.ArgumentTypeError(
                f"unknown callback {name!r}: use one of {sorted(NAMED_CALLBACKS)} or NAME={{'option': value, ...}}"
            )
        return name, dict(NAMED_CALLBACKS[name])
    try:
        kwargs = ast.literal_eval(literal.strip())
    except (ValueError, SyntaxError) as error:
        raise argparse.ArgumentTypeError(f"{name}: {literal!r} is not a Python literal ({error})") from error
    if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        raise argparse.ArgumentTypeError(f"{name}: the right-hand side must be a dict of keyword arguments")
    if not name or name in ("adam", "practice"):
        raise argparse.ArgumentTypeError(f"{text!r}: give the run a name of its own, other than 'adam' or 'practice'")
    return name, kwargs


def make_callback(kwargs: dict[str, Any]) -> ConvexitySwapCallback:
    """The callback with ``kwargs`` (no figures unless asked; a dict under ``fallback`` as a FallbackPolicy)."""
    kwargs = {"log_figures": False, **kwargs}
    if isinstance(kwargs.get("fallback"), dict):
        kwargs["fallback"] = FallbackPolicy(**kwargs["fallback"])
    return ConvexitySwapCallback(**kwargs)


@dataclass
class Run:
    """One run of one case and seed, measured after training."""

    case: str
    seed: int
    run: str
    epochs: int
    train_loss: float = math.nan
    metric: float = math.nan
    passes: float = math.nan
    seconds: float = math.nan
    second_phase_seconds: float = math.nan
    second_phase_passes: float = math.nan
    swap_epoch: int | None = None
    phase: str = ""
    kwargs: str = ""
    error: str | None = None
    ratio_adam_equal_epochs: float = math.nan
    ratio_adam_equal_compute: float = math.nan
    ratio_practice: float = math.nan
    curve: dict[int, float] = field(default_factory=dict)

    @property
    def seconds_per_pass(self) -> float:
        """Wall time per gradient pass of the second phase."""
        if self.second_phase_passes and self.second_phase_passes > 0:
            return self.second_phase_seconds / self.second_phase_passes
        return math.nan


def quiet_trainer(max_epochs: int, callbacks: list[Callback]) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or validation: only the training is timed."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def training_loss(module: Any, datamodule: Any) -> float:
    """The loss on the whole training set, in eval mode, with gradients enabled (a PINN's loss needs them)."""
    was_training = module.training
    module.eval()
    try:
        with torch.enable_grad():
            return float(module.batch_loss(datamodule.train_data).detach())
    finally:
        module.train(was_training)


def validation_metric(module: Any, datamodule: Any) -> float:
    """The module's validation metric on the whole validation split, in eval mode."""
    was_training = module.training
    module.eval()
    try:
        return module.metric(datamodule.val_data)
    finally:
        module.train(was_training)


class TrainingSetCurve(Callback):
    """Adam alone's loss on the whole training set after chosen epochs, and its training time (without measuring)."""

    def __init__(self, epochs: Iterable[int]) -> None:
        self.epochs = set(epochs)
        self.losses: dict[int, float] = {}
        self.seconds: dict[int, float] = {}
        self.began = 0.0
        self._measuring = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.began = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch not in self.epochs:
            return
        start = time.perf_counter()
        self.seconds[epoch] = start - self.began - self._measuring
        self.losses[epoch] = training_loss(pl_module, trainer.datamodule)
        self._measuring += time.perf_counter() - start


class SecondPhaseClock(Callback):
    """The wall time and the compute from the swap (the callback's phase leaves ``"first"``) to the end of training.

    Put it after the swap callback in the Trainer's list, so that it sees the swap in the hook that made it.
    """

    def __init__(self, swap: ConvexitySwapCallback) -> None:
        self.swap = swap
        self.began = self.ended = self.swapped_at = math.nan
        self.compute_at_swap = self.compute_at_end = math.nan

    def _look(self) -> None:
        if math.isnan(self.swapped_at) and self.swap.phase != "first":
            self.swapped_at, self.compute_at_swap = time.perf_counter(), self.swap.compute

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.began = time.perf_counter()
        self._look()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._look()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self._look()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._look()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._look()
        self.ended, self.compute_at_end = time.perf_counter(), self.swap.compute


def n_train(datamodule: Any) -> int:
    return len(datamodule.train_data[1])


def run_callback(case: Case, seed: int, name: str, kwargs: dict[str, Any], initial: Any, datamodule: Any) -> Run:
    """``E`` epochs in Lightning with the callback made from ``kwargs``."""
    run = Run(case.name, seed, name, case.epochs, kwargs=_describe(kwargs))
    module = initial.restore(datamodule)
    swap = make_callback(kwargs)
    clock = SecondPhaseClock(swap)
    quiet_trainer(case.epochs, [swap, clock]).fit(module, datamodule=datamodule)
    samples = 3 * n_train(datamodule)
    run.seconds = clock.ended - clock.began
    run.passes = swap.compute / samples
    if not math.isnan(clock.swapped_at):
        run.second_phase_seconds = clock.ended - clock.swapped_at
        run.second_phase_passes = (clock.compute_at_end - clock.compute_at_swap) / samples
    run.swap_epoch, run.phase = swap.swap_epoch, str(getattr(swap.phase, "value", swap.phase))
    run.train_loss, run.metric = training_loss(module, datamodule), validation_metric(module, datamodule)
    return run


def run_practice(case: Case, seed: int, initial: Any, datamodule: Any) -> Run:
    """Adam for 30 % of the epochs in Lightning, then torch's L-BFGS in a plain full-batch loop."""
    run = Run(case.name, seed, "practice", case.epochs, kwargs="Adam 30 %, then LBFGS(strong_wolfe, history 50)")
    module = initial.restore(datamodule)
    first = epochs_of(FIRST_SHARE, case.epochs)
    timer = TrainingSetCurve([])  # times Adam's epochs from the start of training, as in the other runs
    quiet_trainer(first, [timer]).fit(module, datamodule=datamodule)
    adam_seconds = time.perf_counter() - timer.began
    module.train()
    optimizer = torch_lbfgs(module.parameters())
    calls = 0
    lbfgs_began = time.perf_counter()
    for epoch in range(first, case.epochs):
        batch = datamodule.training_set()
        dropout_seed = seed * 1_000_003 + epoch

        def closure(batch: Any = batch, dropout_seed: int = dropout_seed) -> torch.Tensor:
            nonlocal calls
            calls += 1
            optimizer.zero_grad()
            # One dropout draw per step: every call of the line search evaluates the same function.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(dropout_seed)
                loss = module.batch_loss(batch)
            loss.backward()
            return loss

        optimizer.step(closure)
    ended = time.perf_counter()
    run.seconds = adam_seconds + (ended - lbfgs_began)
    run.passes = first + calls
    run.second_phase_seconds, run.second_phase_passes = ended - lbfgs_began, calls
    run.swap_epoch, run.phase = first, "lbfgs"
    run.train_loss, run.metric = training_loss(module, datamodule), validation_metric(module, datamodule)
    return run


def run_adam(case: Case, seed: int, initial: Any, datamodule: Any, others: list[Run], cap: int) -> Run:
    """Adam alone to ``E`` epochs and on to the compute of the most expensive other run (at most ``cap`` epochs)."""
    needed = {math.ceil(r.passes - 1e-9) for r in others if math.isfinite(r.passes)}
    wanted = set(range(1, case.epochs + 1)) | {e for e in needed if e <= cap}
    last = max(wanted)
    run = Run(case.name, seed, "adam", case.epochs, kwargs=f"lr {initial.model.hparams.lr}, trained to epoch {last}")
    module = initial.restore(datamodule)
    curve, probe = TrainingSetCurve(wanted), _MetricAt(case.epochs)
    quiet_trainer(last, [curve, probe]).fit(module, datamodule=datamodule)
    run.metric = probe.value
    run.curve = curve.losses
    run.train_loss, run.seconds, run.passes = curve.losses[case.epochs], curve.seconds[case.epochs], case.epochs
    run.phase = "adam"
    return run


class _MetricAt(Callback):
    """The validation metric after one chosen epoch."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.value = epoch, math.nan

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            self.value = validation_metric(pl_module, trainer.datamodule)


def run_case(case: Case, seed: int, callbacks: list[tuple[str, dict[str, Any]]], cap_factor: int) -> list[Run]:
    """Every run of one case and seed, from one initial model and data module state; Adam alone last."""
    pl.seed_everything(seed, verbose=False)
    datamodule = case.datamodule(seed)
    datamodule.setup("fit")
    initial = snapshot(case.module(), datamodule)
    runs: list[Run] = []
    jobs: list[tuple[str, Callable[[], Run]]] = [("practice", lambda: run_practice(case, seed, initial, datamodule))]
    for name, kwargs in callbacks:
        jobs.append((name, lambda n=name, k=kwargs: run_callback(case, seed, n, k, initial, datamodule)))
    for name, job in jobs:
        try:
            run = job()
        except Exception as error:  # one failing run must not lose the others
            run = Run(case.name, seed, name, case.epochs, error=f"{type(error).__name__}: {error}")
            traceback.print_exc()
        runs.append(run)
        _progress(run)
    adam = run_adam(case, seed, initial, datamodule, runs, cap_factor * case.epochs)
    _progress(adam)
    practice = runs[0]
    for run in [adam, *runs]:
        if run.error is not None or not run.train_loss > 0:
            continue
        run.ratio_adam_equal_epochs = adam.train_loss / run.train_loss
        at = adam.curve.get(max(case.epochs, math.ceil(run.passes - 1e-9)))
        if at is not None:
            run.ratio_adam_equal_compute = at / run.train_loss
        if practice.error is None:
            run.ratio_practice = practice.train_loss / run.train_loss
    return [adam, *runs]


def _describe(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={getattr(v, '__name__', repr(v))}" for k, v in kwargs.items()) or "defaults"


def _progress(run: Run) -> None:
    if run.error:
        print(f"{run.case} seed {run.seed} {run.run}: FAILED {run.error}", flush=True)
    else:
        print(
            f"{run.case} seed {run.seed} {run.run}: loss {run.train_loss:.3e}, {run.passes:.0f} passes, "
            f"{run.seconds:.1f} s, metric {run.metric:.4g}",
            flush=True,
        )


def _x(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.3g}x" if value < 1000 else f"{value:.2e}x"


def table(runs: list[Run]) -> str:
    """The runs as a markdown table."""
    lines = [
        "| case | seed | run | swap epoch | phase at end | train loss | metric | passes | wall s | s/pass, 2nd phase "
        "| Adam/run, =epochs | Adam/run, =compute | practice/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if r.error is not None:
            lines.append(f"| {r.case} | {r.seed} | {r.run} | failed: {r.error[:160]} |" + " |" * 9)
            continue
        metric_name = CASES[r.case].module.metric_name  # type: ignore[attr-defined]
        spp = r.seconds_per_pass
        lines.append(
            f"| {r.case} | {r.seed} | {r.run} | {'-' if r.swap_epoch is None else r.swap_epoch} | {r.phase} "
            f"| {r.train_loss:.3e} | {metric_name} {r.metric:.4g} | {r.passes:.0f} | {r.seconds:.1f} "
            f"| {'-' if math.isnan(spp) else f'{1000 * spp:.1f} ms'} | {_x(r.ratio_adam_equal_epochs)} "
            f"| {_x(r.ratio_adam_equal_compute)} | {_x(r.ratio_practice)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Run]:
    """Run the benchmark; print the markdown table and write the runs as JSON to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--callback",
        action="append",
        type=parse_callback,
        help="a callback run: default, cg30, lbfgs30, torch-lbfgs30, or NAME={...} (its keyword arguments); repeatable "
        "(without any: default and torch-lbfgs30)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override every case's epochs")
    parser.add_argument("--adam-cap", type=int, default=25, help="Adam alone runs at most this many times E epochs")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the runs")
    args = parser.parse_args(argv)
    callbacks = args.callback or [parse_callback("default"), parse_callback("torch-lbfgs30")]
    names = [name for name, _ in callbacks]
    if len(set(names)) != len(names):
        parser.error(f"callback runs need distinct names, got {names}")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    runs: list[Run] = []
    for name in args.cases:
        case = CASES[name]
        if args.epochs is not None:
            case = Case(case.name, case.module, case.datamodule, args.epochs)
        for seed in args.seeds:
            runs += run_case(case, seed, callbacks, args.adam_cap)
            if args.out is not None:
                _write(args.out, runs)
    print(f"\ntorch {torch.__version__}, lightning {pl.__version__}, 1 CPU thread\n")
    print(table(runs))
    return runs


def _write(path: Path, runs: list[Run]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in runs], indent=1))


if __name__ == "__main__":
    main()
