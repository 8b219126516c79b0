"""What the user sees: TensorBoard scalars, layout, figure and text read back from the event files; CSV and PNG."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_twophase import ConvexitySwapCallback, FallbackPolicy, Phase, Reason, tags
from tests.conftest import PeakingClassifier, TinyClassifier, fit, swap_at, trainer_kwargs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tensorboard")
    callback = ConvexitySwapCallback(detector="paper", swap_epoch=None)  # the paper's rule alone
    logger = TensorBoardLogger(directory, name="run")
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=10, logger=logger))
    trainer.fit(PeakingClassifier())
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return callback, trainer, events, logger.log_dir


def test_scalars_of_every_check_and_of_the_cg_steps(run):
    callback, _, events, _ = run
    tags = set(events.Tags()["scalars"])
    per_check = {"loss", "grad_norm", "gn_max", "threshold", "phase", "compute", "swap_epoch", "swap_step"}
    per_cg_step = {"step_size", "beta", "gradient_evaluations", "value_evaluations", "restarts", "line_search_failures"}
    assert {f"twophase/{name}" for name in per_check} <= tags
    assert {f"twophase/second/{name}" for name in per_cg_step} <= tags
    # One value per check, and the new phase at the step of the swap itself.
    phases = [event.value for event in events.Scalars("twophase/phase")]
    assert phases == [0.0] * callback.swap_epoch + [1.0] * (10 - callback.swap_epoch + 1)
    norms = [event.value for event in events.Scalars("twophase/grad_norm")]
    assert norms == pytest.approx([record["grad_norm"] for record in callback.history])


def test_every_tag_of_the_custom_scalars_layout_is_logged(run):
    _, _, events, _ = run
    layout = tags.CUSTOM_SCALARS_LAYOUT
    charted = {tag for section in layout.values() for _, names in section.values() for tag in names}
    # This run uses the paper's rule; the chart of the improvement is the plateau rule's.
    assert charted - {tags.IMPROVEMENT} <= set(events.Tags()["scalars"])


def test_swap_text_figure_and_layout(run):
    callback, _, events, _ = run
    tensors = set(events.Tags()["tensors"])
    assert "twophase/swap/text_summary" in tensors
    (text_event,) = events.Tensors("twophase/swap/text_summary")
    text = text_event.tensor_proto.string_val[0].decode()
    assert f"epoch {callback.swap_epoch}" in text and "Adam -> LBFGS" in text  # the default second phase, named
    assert "custom_scalars__config__" in tensors
    # The figure is written at the swap and again at the end of training.
    figures = events.Images("twophase/norm_vs_loss")
    assert len(figures) == 2 and figures[0].width > 100


def test_history_csv_and_png_next_to_the_logs(run):
    callback, _, _, log_dir = run
    with open(f"{log_dir}/twophase_history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(callback.history) == 10
    assert rows[callback.swap_epoch]["phase"] == "second"
    with open(f"{log_dir}/norm_vs_loss.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_attributes_and_callback_metrics_after_fit(run):
    callback, trainer, _, _ = run
    assert callback.swap_step == callback.swap_epoch * trainer.num_training_batches
    assert callback.swap_decision.reason is Reason.NORM_PEAK and callback.swap_reason.startswith("the gradient norm")
    metrics = trainer.callback_metrics
    assert float(metrics["twophase/swap_epoch"]) == callback.swap_epoch
    assert float(metrics["twophase/swap_step"]) == callback.swap_step
    assert float(metrics["twophase/phase"]) == 1.0


def test_the_default_rules_measure_is_logged_for_its_chart(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = ConvexitySwapCallback(log_figures=False)
    fit(PeakingClassifier(), callback, max_epochs=5, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    measured = [record["improvement"] for record in callback.history if "improvement" in record]
    assert measured and [event.value for event in events.Scalars(tags.IMPROVEMENT)] == pytest.approx(measured)


def test_the_phase_jumps_at_the_step_of_the_swap_and_of_the_fallback(run, tmp_path):
    callback, _, events, _ = run
    swapped = [event.step for event in events.Scalars(tags.PHASE) if event.value == 1.0]
    assert swapped[0] == callback.swap_step  # not one check later
    # A CG phase that barely moves falls back at a check (as in test_callback's progress guard test).
    logger = TensorBoardLogger(tmp_path, name="run")
    fallback = swap_at(
        3, optimizer={"lr": 1e-12, "max_evals": 1}, fallback=FallbackPolicy(progress_window=3), log_figures=False
    )
    with pytest.warns(UserWarning, match="falling back"):
        fit(TinyClassifier(), fallback, max_epochs=11, logger=logger)
    assert fallback.phase == Phase.FALLBACK
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    (text,) = events.Tensors("twophase/fallback/text_summary")
    fell_back = [event.step for event in events.Scalars(tags.PHASE) if event.value == 2.0]
    assert fell_back[0] == text.step
    checks = [record["step"] for record in fallback.history if record["phase"] == "fallback"]
    assert fell_back[0] < checks[0]  # before the first check of the fallback
