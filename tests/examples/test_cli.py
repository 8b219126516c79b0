"""The examples' command line: every shipped config composes, and the quick job runs end to end on the digits."""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path

import pytest
import yaml

from example_modules.classifier import ImageClassifier
from example_modules.cli import TwoPhaseCLI, main
from example_modules.comparison import measure
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
        # The paper's table: a fixed 30 % split (no rule), plain CG to the end (the fallback only for failures).
        settings = parsed.config.trainer.callbacks[0].init_args
        assert callback.detector is None and (settings.detector, settings.swap_epoch) == (None, 0.3)
        assert settings.optimizer == {"preconditioner": "none"} and settings.fallback.init_args.progress_window is None


def parse_only(config: Path, tmp_path: Path) -> TwoPhaseCLI:
    """Instantiate everything a config describes without training (and without touching the data)."""
    args = ["--config", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    return TwoPhaseCLI(ImageClassifier, ImageDataModule, subclass_mode_data=True, run=False, args=args)


def table_rows(text: str) -> dict[str, list[str]]:
    """The comparison table's rows by their label, each cell split at the two-space column gaps."""
    start = text.index("two-phase  ")
    rows = {}
    for line in text[start:].splitlines()[1:6]:
        label, *cells = re.split(r"\s{2,}", line.strip())
        rows[label] = cells
    return rows


def test_quick_job_trains_swaps_reports_and_compares_with_adam_alone(tmp_path, caplog, monkeypatch):
    quick = yaml.safe_load((Path(__file__).parents[2] / "example_modules" / "configs" / "quick.yaml").read_text())
    assert quick["compare"] is True  # the README's job prints the comparison
    quick["trainer"]["max_epochs"] = 6
    quick["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    quick["trainer"]["callbacks"][0]["init_args"] = {"detector": None, "swap_epoch": 3}
    config = tmp_path / "quick-short.yaml"
    config.write_text(yaml.safe_dump(quick))
    monkeypatch.chdir(tmp_path)  # the CLI saves its config.yaml next to the logs
    with caplog.at_level(logging.INFO):
        cli = main(["fit", "--config", str(config)])
    text = caplog.text
    assert "parameters (formula:" in text
    assert "two-phase: swap at epoch 3" in text
    assert "final metrics:" in text and "val_acc=" in text
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "norm_vs_loss.png").exists()
    assert any(path.name.startswith("events.out.tfevents") for path in log_dir.iterdir())
    # The comparison: the two-phase run beside Adam alone at equal epochs and at equal compute.
    rows = table_rows(text)
    assert list(rows) == ["epochs", "gradient passes", "training loss", "validation accuracy", "wall time"]
    # A CG epoch costs more than an Adam epoch: equal compute is reached after more epochs of Adam alone.
    two_phase_passes = float(rows["gradient passes"][0])
    swap = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ConvexitySwapCallback))
    equal_compute = math.ceil(swap.compute / (3 * len(cli.datamodule.train_data[1])) - 1e-9)
    assert two_phase_passes > 6 and equal_compute > 6
    # Beside Adam, the practice: Adam for 30 % of the epochs (2 of 6), then torch's L-BFGS to the same epochs.
    assert rows["epochs"] == ["6", "6", str(equal_compute), "6"]
    assert rows["gradient passes"][1:3] == ["6", str(equal_compute)]  # Adam: one gradient pass per epoch
    assert float(rows["gradient passes"][3]) > 2  # Adam's 2, then the plain loop's closure calls
    # The two-phase column is the trained model, measured on the whole training set.
    train_loss, val_accuracy = measure(cli.model, cli.datamodule)
    assert rows["training loss"][0] == f"{train_loss:.3e}"
    assert rows["validation accuracy"][0] == f"{100 * val_accuracy:.2f} %"
    losses = [float(cell) for cell in rows["training loss"]]
    ratios = re.search(r"(\d+\.\d+)x at equal epochs, (\d+\.\d+)x at equal compute", text)
    assert ratios is not None
    assert float(ratios[1]) == pytest.approx(losses[1] / losses[0], abs=0.01)
    assert float(ratios[2]) == pytest.approx(min(losses[1:3]) / losses[0], abs=0.01)
    practice = re.search(r"Adam 30 % -> L-BFGS's over the two-phase run's: (\d+\.\d+)x at equal epochs", text)
    assert practice is not None and float(practice[1]) == pytest.approx(losses[3] / losses[0], abs=0.01)
    # Adam alone started from the same weights and batch order: its first three epochs are the run's first phase.
    runs = tmp_path / "runs"
    (two_phase_csv,) = (runs / "quick").glob("version_*/twophase_history.csv")
    (adam_csv,) = (runs / "quick-adam-alone").glob("version_*/twophase_history.csv")
    with open(two_phase_csv) as handle:
        two_phase = list(csv.DictReader(handle))
    with open(adam_csv) as handle:
        adam = list(csv.DictReader(handle))
    assert [r["phase"] for r in two_phase] == ["first"] * 3 + ["second"] * 3 and len(adam) == equal_compute
    assert [r["loss"] for r in two_phase[:3]] == [r["loss"] for r in adam[:3]]
    png = log_dir / "loss_vs_compute.png"
    assert f"loss against compute, both runs: {png}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
