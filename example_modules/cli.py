"""The command line of the examples: a LightningCLI composing model, data, Trainer and the two-phase callback::

    python -m example_modules fit --config example_modules/configs/quick.yaml
    python -m example_modules fit --config example_modules/configs/mnist-vit-nomlp.yaml --trainer.devices 2 \\
        --trainer.strategy ddp --trainer.precision bf16-mixed

The data module's ``num_classes``, ``image_size`` and ``in_channels`` are linked into the model. Before training the
CLI prints the model's parameter count (checked against its closed formula); after training it prints the swap point
and the final metrics. With ``compare: true`` (the quick job's config sets it) it then trains the first optimizer alone
from the same initial weights and batch order, for the same epochs and on to the same compute, and prints both runs
side by side (:mod:`example_modules.comparison`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from example_modules.classifier import ImageClassifier
from example_modules.comparison import (
    Measurement,
    ModelAtEpoch,
    NeverSwaps,
    Snapshot,
    TrainingSetMonitor,
    comparison_table,
    full_batch_lbfgs,
    loss_vs_compute_figure,
    measure,
    passes,
    snapshot,
)
from example_modules.data import ImageDataModule
from example_modules.vit import expected_parameter_count
from lightning_twophase import ConvexitySwapCallback


class TwoPhaseCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` on any :class:`ImageDataModule`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("num_classes", "image_size", "in_channels"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_argument(
            "--compare",
            type=bool,
            default=False,
            help="After fit, train the first optimizer alone from the same initial weights, to the same epochs and on "
            "to the same compute, and print both runs side by side.",
        )

    def before_fit(self) -> None:
        self._initial: Snapshot | None = snapshot(self.model, self.datamodule) if self._compare else None
        self._began = time.perf_counter()
        model = self.model
        assert isinstance(model, ImageClassifier)
        hparams = model.hparams
        counted = sum(p.numel() for p in model.parameters())
        overrides = {
            key: hparams[key]
            for key in ("patch_size", "width", "depth", "heads", "similarity")
            if hparams.get(key) is not None
        }
        expected = expected_parameter_count(
            hparams.model,
            image_size=hparams.image_size,
            in_channels=hparams.in_channels,
            num_classes=hparams.num_classes,
            **overrides,
        )
        rank_zero_info(
            f"model {hparams.model}: {counted:,} parameters (formula: {expected:,}); data "
            f"{type(self.datamodule).__name__}, {hparams.in_channels}x{hparams.image_size}x{hparams.image_size}, "
            f"{hparams.num_classes} classes"
        )

    @property
    def _compare(self) -> bool:
        return bool(self.config.get(str(self.subcommand), self.config).get("compare", False))

    def after_fit(self) -> None:
        seconds = time.perf_counter() - self._began
        trainer = self.trainer
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, ConvexitySwapCallback):
                if callback.swap_epoch is None:
                    rank_zero_info("two-phase: no swap point was found; the whole run used the first optimizer")
                else:
                    rank_zero_info(
                        f"two-phase: swap at epoch {callback.swap_epoch} (step {callback.swap_step}), phase at the "
                        f"end: {callback.phase}; reason: {callback.swap_reason}"
                    )
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
        rank_zero_info("final metrics: " + ", ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items())))
        if trainer.log_dir is not None:
            rank_zero_info(
                f"logs, norm_vs_loss.png and twophase_history.csv in {trainer.log_dir}; view them with: "
                f"tensorboard --logdir {trainer.log_dir}"
            )
        if self._initial is not None:
            self._compare_with_first_optimizer(seconds)

    def _compare_with_first_optimizer(self, seconds: float) -> None:
        """Train the first optimizer alone from the initial weights (see :mod:`example_modules.comparison`)."""
        trainer, datamodule = self.trainer, self.datamodule
        swap = next((cb for cb in trainer.callbacks if isinstance(cb, ConvexitySwapCallback)), None)  # type: ignore[attr-defined]
        if swap is None or trainer.world_size > 1:
            rank_zero_info("compare: needs the ConvexitySwapCallback and a single process; skipped")
            return
        epochs = trainer.current_epoch
        spent = passes(swap, datamodule)
        two_phase = Measurement(epochs, spent, *measure(self.model, datamodule), seconds)
        assert self._initial is not None
        first_only = self._initial.restore(datamodule)
        counter = ConvexitySwapCallback(detect_only=True, detector=NeverSwaps(), swap_epoch=None, log_figures=False)
        equal_compute = max(epochs, math.ceil(spent - 1e-9))
        monitor = TrainingSetMonitor({epochs, equal_compute}, counter)
        adam_part = ModelAtEpoch(max(1, round(0.3 * epochs)), counter)  # where the practice swaps to L-BFGS
        logger: Any = False
        if isinstance(trainer.logger, TensorBoardLogger):
            logger = TensorBoardLogger(trainer.logger.save_dir, name=f"{trainer.logger.name}-adam-alone")
        rank_zero_info(
            f"compare: the two-phase run spent {spent:.0f} gradient passes in {epochs} epochs; training the first "
            f"optimizer alone from the same initial weights and batch order for {equal_compute} epochs"
        )
        self.instantiate_trainer(max_epochs=equal_compute, callbacks=[counter, monitor, adam_part], logger=logger).fit(
            first_only, datamodule=datamodule
        )
        rank_zero_info(
            f"compare: Adam's model at epoch {adam_part.epoch}, then torch's L-BFGS on the whole training set as a "
            f"plain loop, one step (up to 20 iterations) per epoch to epoch {epochs}"
        )
        practice, _ = full_batch_lbfgs(adam_part, datamodule, epochs)
        rank_zero_info(
            comparison_table(two_phase, monitor.measurements[epochs], monitor.measurements[equal_compute], practice)
        )
        if trainer.log_dir is not None:
            path = Path(trainer.log_dir) / "loss_vs_compute.png"
            if loss_vs_compute_figure(swap.history, counter.history, len(datamodule.train_data[1]), path):
                rank_zero_info(f"loss against compute, both runs: {path}")


def main(args: Any = None) -> TwoPhaseCLI:
    """Run the CLI (``args`` as for LightningCLI: ``None`` reads ``sys.argv``)."""
    return TwoPhaseCLI(
        ImageClassifier,
        ImageDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
