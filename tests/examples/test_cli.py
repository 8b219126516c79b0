"""The examples' command line: every shipped config composes, and the quick job runs end to end on the digits."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from example_modules.classifier import ImageClassifier
from example_modules.cli import TwoPhaseCLI, main
from example_modules.data import ImageDataModule
from lightning_twophase import ConvexitySwapCallback

CONFIGS = sorted((Path(__file__).parents[2] / "example_modules" / "configs").glob("*.yaml"))


def test_a_config_per_paper_experiment_and_a_quick_one():
    names = {path.stem for path in CONFIGS}
    models = ("vit-mlp", "vit-nomlp", "vit-nomlp-wkewq", "vit-nomlp-wkewq-wvwo", "vgg5")
    expected = {f"{data}-{model}" for data in ("mnist", "cifar10", "cifar100") for model in models} | {"quick"}
    assert names == expected


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_config_composes_model_data_trainer_and_callback(config, tmp_path):
    parsed = parse_only(config, tmp_path)
    callback = next(cb for cb in parsed.trainer.callbacks if isinstance(cb, ConvexitySwapCallback))
    data = parsed.datamodule
    assert parsed.model.hparams.num_classes == data.num_classes  # linked from the data module
    assert parsed.model.hparams.image_size == data.image_size
    if config.stem != "quick":
        assert parsed.model.hparams.model == config.stem.split("-", 1)[1]
        assert callback._detection["fixed_swap_epoch"] == 0.3  # the paper's table: a fixed 30 % split


def parse_only(config: Path, tmp_path: Path) -> TwoPhaseCLI:
    """Instantiate everything a config describes without training (and without touching the data)."""
    args = ["--config", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    return TwoPhaseCLI(ImageClassifier, ImageDataModule, subclass_mode_data=True, run=False, args=args)


def test_quick_job_trains_swaps_and_reports(tmp_path, caplog, monkeypatch):
    quick = yaml.safe_load((Path(__file__).parents[2] / "example_modules" / "configs" / "quick.yaml").read_text())
    quick["trainer"]["max_epochs"] = 4
    quick["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    quick["trainer"]["callbacks"][0]["init_args"] = {"fixed_swap_epoch": 2}
    config = tmp_path / "quick-short.yaml"
    config.write_text(yaml.safe_dump(quick))
    monkeypatch.chdir(tmp_path)  # the CLI saves its config.yaml next to the logs
    with caplog.at_level(logging.INFO):
        cli = main(["fit", "--config", str(config)])
    text = caplog.text
    assert "parameters (formula:" in text
    assert "two-phase: swap at epoch 2" in text
    assert "final metrics:" in text and "val_acc=" in text
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "norm_vs_loss.png").exists()
    assert any(path.name.startswith("events.out.tfevents") for path in log_dir.iterdir())
