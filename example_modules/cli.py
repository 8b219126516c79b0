"""The command line of the examples: a LightningCLI composing model, data, Trainer and the two-phase callback::

    python -m example_modules fit --config example_modules/configs/quick.yaml
    python -m example_modules fit --config example_modules/configs/mnist-vit-nomlp.yaml --trainer.devices 2 \\
        --trainer.strategy ddp --trainer.precision bf16-mixed

The data module's ``num_classes``, ``image_size`` and ``in_channels`` are linked into the model. Before training the
CLI prints the model's parameter count (checked against its closed formula); after training it prints the swap point
and the final metrics.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from example_modules.classifier import ImageClassifier
from example_modules.data import ImageDataModule
from example_modules.vit import expected_parameter_count
from lightning_twophase import ConvexitySwapCallback


class TwoPhaseCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` on any :class:`ImageDataModule`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("num_classes", "image_size", "in_channels"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def before_fit(self) -> None:
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

    def after_fit(self) -> None:
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


def main(args: Any = None) -> TwoPhaseCLI:
    """Run the CLI (``args`` as for LightningCLI: ``None`` reads ``sys.argv``)."""
    return TwoPhaseCLI(
        ImageClassifier,
        ImageDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
