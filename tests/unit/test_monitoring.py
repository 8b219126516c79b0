"""The norm-vs-loss figure and the history CSV, drawn and written without a Trainer."""

from __future__ import annotations

import csv
import math

from lightning_twophase.detection import GradientNormPeakDetector, PlateauDetector
from lightning_twophase.monitoring import no_swap_message, norm_vs_loss_figure, render_rgb, write_history_csv


def test_figure_marks_peak_and_swap_with_the_loss_decreasing_to_the_right():
    history = [
        {"loss": 1.0, "grad_norm": 0.5, "phase": "first"},
        {"loss": 0.5, "grad_norm": 1.0, "phase": "first"},
        {"loss": 0.2, "grad_norm": 0.8, "phase": "first"},
        {"loss": 0.1, "grad_norm": 0.3, "phase": "second"},
    ]
    figure = norm_vs_loss_figure(history, swap_index=2, peak_index=1)
    axes = figure.axes[0]
    left, right = axes.get_xlim()
    assert left > right  # inverted: training moves right as the loss falls
    labels = axes.get_legend_handles_labels()[1]
    assert {"swap", "peak of the gradient norm", "second phase"} <= set(labels)
    assert render_rgb(figure).shape[2] == 3


def test_history_csv_takes_the_columns_of_every_check(tmp_path):
    history = [
        {"epoch": 1, "loss": 1.0, "grad_norm": 0.5, "gn_max": 0.5, "phase": "first"},
        {"epoch": 2, "loss": 0.5, "grad_norm": 0.2, "phase": "second"},  # the CG phase has no detector columns
    ]
    write_history_csv(history, tmp_path / "history.csv")
    with open(tmp_path / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "loss", "grad_norm", "gn_max", "phase"]
    assert rows[1]["gn_max"] == "" and rows[1]["phase"] == "second"


def test_the_closing_line_without_a_swap_says_what_the_rule_last_answered():
    history = [{"loss": 0.5, "grad_norm": 1.0}]
    assert no_swap_message(history, 300, None) == "ConvexitySwapCallback: no swap point was found in 300 epochs."
    paper = GradientNormPeakDetector()
    last = paper.update(0.5, 2.0, epoch=1, step=1)
    assert "(the rule's last answer: the gradient norm is at a new peak 2)" in no_swap_message(history, 300, last)
    plateau = PlateauDetector(window=1)
    plateau.update(1.0, math.nan, epoch=1, step=1)
    last = plateau.update(0.5, math.nan, epoch=2, step=2)
    assert f"(the rule's last answer: {last.message})" in no_swap_message(history, 300, last)


def test_the_closing_line_names_a_loss_that_was_never_finite():
    history = [{"loss": math.nan, "grad_norm": 1.0}, {"loss": math.inf, "grad_norm": math.nan}]
    message = no_swap_message(history, 3, None)
    assert "every check had a non-finite loss (the last: inf)" in message and "NaN or overflow" in message
