"""The callback's arguments, refused when it is made, before any Trainer exists."""

from __future__ import annotations

import math

import pytest

from lightning_twophase import ConvexitySwapCallback, GradientNormPeakDetector, ProbeDetector


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"check_every_n_steps": 0}, "check_every_n_steps"),
        ({"cg_phase": "epoch"}, "cg_phase"),
        ({"preconditioner": "adam"}, "preconditioner"),
        ({"fallback_after_failures": 0}, "fallback_after_failures"),
        ({"fallback_loss_window": 0}, "fallback_loss_window"),
        ({"fallback_loss_rtol": -0.1}, "fallback_loss_rtol"),
        ({"fallback_loss_rtol": math.nan}, "fallback_loss_rtol"),
    ],
)
def test_bad_settings_are_refused_when_the_callback_is_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvexitySwapCallback(**kwargs)


def test_a_detector_together_with_detection_arguments_is_refused():
    with pytest.raises(ValueError, match=r"detection arguments \(factor, patience\) or `detector`"):
        ConvexitySwapCallback(factor=0.8, patience=2, detector=GradientNormPeakDetector())


def test_a_detector_without_the_protocols_methods_is_refused():
    class OnlyUpdate:
        def update(self, loss, grad_norm, *, epoch, step):
            return None

    with pytest.raises(TypeError, match="SwapDetector"):
        ConvexitySwapCallback(detector=OnlyUpdate())


def test_the_detection_arguments_configure_the_papers_rule():
    callback = ConvexitySwapCallback(detector="paper", factor=0.8, smoothing=0.5, patience=2, fixed_swap_epoch=30.0)
    detector = callback.detector
    assert isinstance(detector, GradientNormPeakDetector)
    assert (detector.factor, detector.smoothing, detector.patience, detector.fixed_swap_epoch) == (0.8, 0.5, 2, 30)
    assert ConvexitySwapCallback(fixed_swap_epoch=0.3).detector is None  # a fraction: built at setup


def test_the_default_detector_is_the_probe_and_the_papers_options_need_the_papers_rule():
    assert isinstance(ConvexitySwapCallback().detector, ProbeDetector)
    assert ConvexitySwapCallback(fixed_swap_epoch=5).detector.fixed_swap_epoch == 5
    with pytest.raises(ValueError, match="configure the paper's rule; pass detector='paper'"):
        ConvexitySwapCallback(factor=0.8)
    with pytest.raises(ValueError, match="`detector` must be one of"):
        ConvexitySwapCallback(detector="peak")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"optimizer_kwargs": {"beta": "bogus"}}, ValueError, "optimizer_kwargs.*unknown `beta='bogus'`"),
        ({"optimizer_kwargs": {"momentum": 0.9}}, ValueError, "optimizer_kwargs.*momentum"),
        ({"cg_phase": True}, ValueError, "cg_phase"),
        ({"max_cached_bytes": -1}, ValueError, "max_cached_bytes"),
        ({"fixed_swap_epoch": "3"}, ValueError, "fixed_swap_epoch.*a number"),
        ({"max_swap_epoch": "half"}, ValueError, "max_swap_epoch.*a number"),
    ],
)
def test_more_bad_settings_are_clear_errors_when_the_callback_is_made(kwargs, error, match):
    with pytest.raises(error, match=match):
        ConvexitySwapCallback(**kwargs)
