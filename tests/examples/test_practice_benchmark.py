"""Tests of ``benchmarks/practice.py``: the callback runs it takes from the command line, how it measures, and a short
run of every schedule on one case."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.practice import (
    FIRST_SHARE,
    main,
    make_callback,
    parse_callback,
    training_loss,
)
from example_modules.pinn import PoissonCollocationDataModule, PoissonPINN
from lightning_twophase import ConvexitySwapCallback


def test_named_callbacks_are_the_defaults_the_fixed_split_and_torch_lbfgs() -> None:
    assert parse_callback("default") == ("default", {})
    assert parse_callback("cg30") == ("cg30", {"detector": None, "swap_epoch": FIRST_SHARE, "optimizer": "cg"})
    assert parse_callback("lbfgs30") == ("lbfgs30", {"detector": None, "swap_epoch": FIRST_SHARE, "optimizer": "lbfgs"})
    name, kwargs = parse_callback("torch-lbfgs30")
    assert name == "torch-lbfgs30" and kwargs["detector"] is None and kwargs["swap_epoch"] == FIRST_SHARE
    optimizer = kwargs["optimizer"]([{"params": [torch.zeros(2, requires_grad=True)]}])
    assert isinstance(optimizer, torch.optim.LBFGS)
    defaults = optimizer.defaults
    assert defaults["line_search_fn"] == "strong_wolfe" and defaults["history_size"] == 50
    assert defaults["max_iter"] == 20
    assert isinstance(make_callback(kwargs), ConvexitySwapCallback)


def test_a_callback_run_takes_keyword_arguments_as_a_python_literal() -> None:
    name, kwargs = parse_callback("late={'swap_epoch': 0.5, 'detector': None, 'fallback': {'progress_window': None}}")
    assert name == "late"
    assert kwargs == {"swap_epoch": 0.5, "detector": None, "fallback": {"progress_window": None}}
    callback = make_callback(kwargs)  # the fallback's dict made a FallbackPolicy: the callback takes no dict there
    assert callback.detector is None
    # Options the callback does not know are its to refuse, when the run is made.
    with pytest.raises(TypeError):
        make_callback({"no_such_option": 1})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("plateau", "unknown callback"),
        ("x=[1, 2]", "must be a dict"),
        ("x={'swap_epoch': ", "not a Python literal"),
        ("x={'swap_epoch': max}", "not a Python literal"),
        ("adam={}", "a name of its own"),
        ("={}", "a name of its own"),
    ],
)
def test_bad_callback_runs_are_refused_with_the_problem(text: str, problem: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=problem):
        parse_callback(text)


def test_the_training_loss_of_a_pinn_is_measured_even_without_gradients() -> None:
    torch.manual_seed(0)
    model, datamodule = PoissonPINN(), PoissonCollocationDataModule(num_interior=32)
    datamodule.setup("fit")
    with torch.no_grad():
        loss = training_loss(model, datamodule)
    assert math.isfinite(loss) and loss > 0
    assert model.training  # the mode is put back


def test_a_short_run_compares_every_schedule_from_the_same_start(tmp_path: Path) -> None:
    out = tmp_path / "runs.json"
    runs = main(
        ["--cases", "regression", "--epochs", "4", "--callback", "cg30", "--callback", "late={'swap_epoch': 0.5, "
         "'detector': None}", "--adam-cap", "5", "--out", str(out)]
    )  # fmt: skip
    by_name = {run.run: run for run in runs}
    assert list(by_name) == ["adam", "practice", "cg30", "late"]
    assert all(run.error is None for run in runs), [run.error for run in runs]
    adam, practice, cg30 = by_name["adam"], by_name["practice"], by_name["cg30"]
    # Adam: one pass per epoch, its loss after every epoch up to E and its metric.
    assert adam.passes == 4 and set(adam.curve) >= {1, 2, 3, 4} and adam.curve[4] == adam.train_loss
    assert 0 < adam.metric < 1.5
    # The practice: Adam for 30 % of 4 epochs (1), then one L-BFGS step per remaining epoch of 1 to 25 closure calls.
    assert practice.swap_epoch == 1
    assert 1 + 3 <= practice.passes <= 1 + 3 * 25 and practice.second_phase_passes == practice.passes - 1
    assert practice.second_phase_seconds > 0 and practice.seconds > practice.second_phase_seconds
    # The callback at 30 %: Adam's one epoch, then CG epochs that cost more than a pass each.
    assert cg30.swap_epoch == 1 and cg30.passes > 4
    assert 0 < cg30.second_phase_passes < cg30.passes and cg30.second_phase_seconds > 0
    assert by_name["late"].swap_epoch == 2
    # Ratios: Adam's loss over the run's; at equal compute from Adam's curve, where it ran that far (cap: 5 x E).
    for run in (practice, cg30):
        assert run.ratio_adam_equal_epochs == pytest.approx(adam.train_loss / run.train_loss)
        assert run.ratio_practice == pytest.approx(practice.train_loss / run.train_loss)
    assert cg30.ratio_adam_equal_compute == pytest.approx(adam.curve[math.ceil(cg30.passes)] / cg30.train_loss)
    assert math.isnan(practice.ratio_adam_equal_compute) == (practice.passes > 20)
    written = json.loads(out.read_text())
    assert [run["run"] for run in written] == ["adam", "practice", "cg30", "late"]
