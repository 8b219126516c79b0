"""What the user sees: scalars for every Lightning logger, and for TensorBoard a layout, figures and text events.

The tags are defined in :mod:`lightning_twophase.tags`. matplotlib is optional: it is imported only when a figure is
drawn, and without it the figures are skipped with one warning. Nothing here talks to processes other than rank 0
(the loggers are rank-zero only).
"""

from __future__ import annotations

__all__ = [
    "add_custom_scalars_layout",
    "log_figure",
    "log_scalars",
    "log_text",
    "no_swap_message",
    "norm_vs_loss_figure",
    "render_rgb",
    "save_figure",
    "write_history_csv",
]

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from lightning_twophase.tags import CUSTOM_SCALARS_LAYOUT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_twophase.decision import Decision


def _tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


@rank_zero_only
def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send scalars to every logger of the Trainer, at once (not through ``self.log``'s flush interval)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


@rank_zero_only
def add_custom_scalars_layout(trainer: pl.Trainer) -> None:
    """TensorBoard's Custom Scalars tab: gradient norm and loss together, the swap rule, the CG diagnostics."""
    for writer in _tensorboard_writers(trainer):
        writer.add_custom_scalars(CUSTOM_SCALARS_LAYOUT)


@rank_zero_only
def log_text(trainer: pl.Trainer, tag: str, text: str, step: int) -> None:
    """A text event (TensorBoard's Text tab)."""
    for writer in _tensorboard_writers(trainer):
        writer.add_text(tag, text, global_step=step)


_warned_no_matplotlib = False


def norm_vs_loss_figure(
    history: Sequence[dict[str, Any]], swap_index: int | None, peak_index: int | None, title: str = ""
) -> Figure | None:
    """The gradient norm against the loss, the loss decreasing to the right (as in the paper's Fig. 5).

    Args:
        history: one record per check with ``loss``, ``grad_norm`` and ``phase``.
        swap_index: the check at which the swap was made, or ``None``.
        peak_index: the check with the largest gradient norm of the first phase, or ``None``.
        title: an optional title.

    Returns:
        A matplotlib figure (not attached to pyplot), or ``None`` if matplotlib is not installed.

    """
    global _warned_no_matplotlib
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned_no_matplotlib:
            rank_zero_warn("matplotlib is not installed: the norm-vs-loss figure is skipped (pip install matplotlib).")
            _warned_no_matplotlib = True
        return None
    points = [(r["loss"], r["grad_norm"], r["phase"]) for r in history]
    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    colors = {"first": "tab:blue", "second": "tab:orange", "fallback": "tab:green"}
    labels = {"first": "first phase (Adam)", "second": "second phase", "fallback": "fallback"}
    positive = [(x, y, phase) for x, y, phase in points if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]
    if positive:
        axes.plot([x for x, _, _ in positive], [y for _, y, _ in positive], color="0.75", linewidth=0.8, zorder=1)
        for phase, color in colors.items():
            selected = [(x, y) for x, y, p in positive if p == phase]
            if selected:
                axes.scatter(*zip(*selected), s=12, color=color, label=labels[phase], zorder=2)
        axes.set_xscale("log")
        axes.set_yscale("log")
    if peak_index is not None and 0 <= peak_index < len(points):
        x, y, _ = points[peak_index]
        axes.scatter([x], [y], marker="^", s=90, color="black", label="peak of the gradient norm", zorder=3)
    if swap_index is not None and 0 <= swap_index < len(points):
        x, y, _ = points[swap_index]
        axes.scatter([x], [y], marker="*", s=220, color="red", label="swap", zorder=4)
        axes.annotate(f"swap (check {swap_index + 1})", (x, y), textcoords="offset points", xytext=(8, 8))
    axes.invert_xaxis()  # training moves to the right as the loss falls
    axes.set_xlabel("training loss (decreasing to the right)")
    axes.set_ylabel("gradient norm")
    axes.set_title(title or "gradient norm against loss")
    axes.grid(True, which="both", alpha=0.3)
    if positive:
        axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return figure


def render_rgb(figure: Figure) -> Any:
    """The figure as an ``(height, width, 3)`` uint8 array, drawn without pyplot."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


@rank_zero_only
def log_figure(trainer: pl.Trainer, tag: str, figure: Figure, step: int) -> None:
    """Write a figure to TensorBoard's Images tab."""
    writers = _tensorboard_writers(trainer)
    if writers:
        image = render_rgb(figure)
        for writer in writers:
            writer.add_image(tag, image, global_step=step, dataformats="HWC")


@rank_zero_only
def save_figure(figure: Figure, path: str | Path) -> None:
    """Save a figure as an image file (PNG by its suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_figure(str(path))


@rank_zero_only
def write_history_csv(history: Sequence[dict[str, Any]], path: str | Path) -> None:
    """The checks (epoch, step, loss, gradient norm, phase, compute and the detector's columns) as CSV."""
    if not history:
        return
    # The first phase's checks carry the detector's columns, the CG phase's do not: take the union, in order.
    fields = list(dict.fromkeys(key for record in history for key in record))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)


def no_swap_message(history: Sequence[dict[str, Any]], epochs: int, last: Decision | None) -> str:
    """Why training ended without a swap, for the closing line (``last``: the swap rule's last answer)."""
    finite = [r for r in history if math.isfinite(r["loss"])]
    if history and not finite:
        return (
            f"ConvexitySwapCallback: no swap point was found in {epochs} epochs: every check had a non-finite loss "
            f"(the last: {history[-1]['loss']}); check the data and the model for NaN or overflow."
        )
    detail = f" (the rule's last answer: {last.message})" if last is not None and last.message else ""
    return f"ConvexitySwapCallback: no swap point was found in {epochs} epochs{detail}."
