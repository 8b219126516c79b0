"""The reproduction harness on a fabricated MNIST: the four schedules, the table, the CSV, the figures, determinism."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from example_modules.reproduce import PRESETS, SCHEDULES, main
from tests.examples.conftest import fabricate_mnist


def run(tmp_path: Path, name: str) -> list[dict[str, str]]:
    out = tmp_path / name
    main(
        [
            "--preset", "cpu", "--data-dir", str(tmp_path / "data"), "--out", str(out), "--log-dir",
            str(tmp_path / f"logs-{name}"), "--epochs", "4", "--train-subset", "64",
            "--models", "vit-nomlp-wkewq-wvwo",
        ]
    )  # fmt: skip
    with open(out / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_four_schedules_table_figures_and_the_same_numbers_twice(tmp_path):
    fabricate_mnist(tmp_path / "data", "MNIST")
    first = run(tmp_path, "first")
    assert [row["schedule"] for row in first] == list(SCHEDULES)
    swaps = {row["schedule"]: row["swap_epoch"] for row in first}
    assert swaps["adam30+cg"] == "1" and swaps["cg"] == "0"  # 30 % of 4 epochs rounds to 1
    table = (tmp_path / "first" / "results.md").read_text()
    assert "| mnist | vit-nomlp-wkewq-wvwo |" in table and "Adam 30 % + CG" in table
    figures = tmp_path / "first" / "figures"
    assert (figures / "mnist-vit-nomlp-wkewq-wvwo-loss_vs_compute.png").exists()
    assert (figures / "mnist-vit-nomlp-wkewq-wvwo-adam30+cg-norm_vs_loss.png").exists()
    assert any((tmp_path / "logs-first" / "mnist-vit-nomlp-wkewq-wvwo" / "adam30+cg").iterdir())
    second = run(tmp_path, "second")
    for a, b in zip(first, second):
        a.pop("seconds"), b.pop("seconds")
        assert a == b  # seeds fixed: the same results


def test_presets_cover_the_papers_grid_and_a_cpu_budget():
    paper, cpu = PRESETS["paper"], PRESETS["cpu"]
    assert set(paper.datasets) == {"mnist", "cifar10", "cifar100"} and paper.train_subset is None
    assert paper.epochs.get("vit-mlp") == 700 and paper.default_epochs == 1000
    assert cpu.datasets == ("mnist",) and len(cpu.models) == 5 and cpu.accelerator == "cpu"
