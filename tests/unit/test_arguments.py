"""Arguments refused when an object is made, before any Trainer exists: the shared checks and the callback's."""

from __future__ import annotations

import fractions
import math

import numpy as np
import pytest
import torch

from lightning_twophase import (
    LBFGS,
    ConjugateGradient,
    ConvexitySwapCallback,
    Decision,
    FallbackPolicy,
    GradientNormPeakDetector,
    PlateauDetector,
    Reason,
    SwapDetector,
)
from lightning_twophase.arguments import check_count, check_epoch, check_flag, check_instance, check_number


def test_counts_take_whole_numbers_and_config_files_floats_but_not_bools_nan_or_fractions():
    assert check_count("X", "n", 3) == 3 and check_count("X", "n", 3.0) == 3
    assert check_count("X", "n", None, optional=True) is None
    for value, error in ((2.5, ValueError), (math.nan, ValueError), (math.inf, ValueError), (True, TypeError)):
        with pytest.raises(error, match="X: `n` must be a whole number"):
            check_count("X", "n", value)
    with pytest.raises(ValueError, match="at least 1, got 0"):
        check_count("X", "n", 0, minimum=1)


def test_numbers_must_be_finite_and_within_their_interval():
    assert check_number("X", "r", 0.5, 0.0, 1.0, strict=True) == 0.5
    with pytest.raises(ValueError, match=r"X: `r` must lie in \(0.0, 1.0\), got 1.0"):
        check_number("X", "r", 1.0, 0.0, 1.0, strict=True)
    with pytest.raises(ValueError, match="finite"):
        check_number("X", "r", math.nan)
    with pytest.raises(TypeError, match="a number"):
        check_number("X", "r", "0.5")


def test_flags_epochs_and_instances():
    assert check_flag("X", "f", False) is False
    with pytest.raises(TypeError, match="X: `f` must be True or False, got 'no'"):
        check_flag("X", "f", "no")
    assert check_epoch("X", "e", 0.3) == 0.3 and check_epoch("X", "e", 30.0) == 30 and check_epoch("X", "e", 0) == 0
    with pytest.raises(ValueError, match=r"an epoch count >= 0 or a fraction of max_epochs in \(0, 1\), got 1.5"):
        check_epoch("X", "e", 1.5)
    with pytest.raises(TypeError, match="epoch count"):
        check_epoch("X", "e", "3")
    with pytest.raises(TypeError, match=r"got the class PlateauDetector: pass PlateauDetector\(...\)"):
        check_instance("X", "d", PlateauDetector, SwapDetector)


# ----------------------------------------------------------------------------------------------------------------------
# The callback's arguments
# ----------------------------------------------------------------------------------------------------------------------


def test_the_default_is_the_plateau_rule_with_plain_lbfgs_and_the_fallback():
    callback = ConvexitySwapCallback()
    assert isinstance(callback.detector, PlateauDetector)
    assert callback._config.preconditioner == "none"
    assert ConvexitySwapCallback(optimizer="cg")._config.preconditioner == "second_moments"
    assert isinstance(callback._config.fallback, FallbackPolicy) and callback._config.fall_back
    assert isinstance(ConvexitySwapCallback(detector="paper").detector, GradientNormPeakDetector)
    assert ConvexitySwapCallback(detector=None, swap_epoch=0.3).detector is None
    # Each callback has its own detector and policy: nothing is shared between two of them.
    assert ConvexitySwapCallback().detector is not callback.detector
    assert ConvexitySwapCallback()._config.fallback is not callback._config.fallback


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"check_every_n_steps": 0}, ValueError, "check_every_n_steps"),
        ({"check_every_n_steps": math.nan}, ValueError, "check_every_n_steps.*whole number"),
        ({"check_every_n_steps": 2.5}, ValueError, "check_every_n_steps.*whole number"),
        ({"min_epochs": math.nan}, ValueError, "min_epochs.*whole number"),
        ({"min_epochs": -1}, ValueError, "min_epochs"),
        ({"swap_epoch": "3"}, TypeError, "swap_epoch.*epoch count"),
        ({"swap_epoch": 1.5}, ValueError, r"swap_epoch.*fraction of max_epochs in \(0, 1\)"),
        ({"swap_epoch": math.nan}, ValueError, "swap_epoch"),
        ({"swap_epoch": None, "detector": None}, ValueError, "with detector=None the swap comes at `swap_epoch`"),
        ({"detect_only": "no"}, TypeError, "detect_only.*True or False"),
        ({"log_figures": 1}, TypeError, "log_figures.*True or False"),
        ({"fallback": "no"}, TypeError, "fallback.*FallbackPolicy"),
        ({"fallback": FallbackPolicy}, TypeError, r"got the class FallbackPolicy: pass FallbackPolicy\(...\)"),
        ({"detector": PlateauDetector}, TypeError, r"got the class PlateauDetector: pass PlateauDetector\(...\)"),
        ({"detector": "peak"}, ValueError, "`detector` must be one of"),
        ({"detector": "probe"}, ValueError, "the probe rule was removed"),
        ({"detector": object()}, TypeError, "Subclass lightning_twophase.SwapDetector"),
        ({"batches_per_iteration": 0}, ValueError, "batches_per_iteration"),
        ({"batches_per_iteration": True}, TypeError, "batches_per_iteration"),
        ({"max_cached_bytes": -1}, ValueError, "max_cached_bytes"),
        ({"optimizer": {"name": "cg", "beta": "bogus"}}, ValueError, "ConjugateGradient .* unknown `beta='bogus'`"),
        ({"optimizer": {"momentum": 0.9}}, ValueError, "LBFGS .* refuses.*momentum"),
        ({"optimizer": {"beta": "pr+"}}, ValueError, r"LBFGS \('lbfgs'\) refuses.*beta.*\{'name': 'cg', ...\}"),
        ({"optimizer": {"max_iter": 2.5}}, ValueError, "LBFGS .* refuses.*max_iter"),
        ({"optimizer": {"lr": math.nan}}, ValueError, "LBFGS .* refuses.*lr.*finite"),
        ({"optimizer": {"preconditioner": "adam"}}, ValueError, "preconditioner"),
        ({"optimizer": "bfgs"}, ValueError, r"second phase 'bfgs' is unknown; choose one of \('lbfgs', 'cg'\)"),
        ({"optimizer": 3}, TypeError, "a second phase's name .* or a factory"),
        ({"scheduler_factory": 3}, TypeError, "scheduler_factory"),
    ],
)
def test_bad_arguments_are_refused_when_the_callback_is_made(kwargs, error, match):
    with pytest.raises(error, match=match):
        ConvexitySwapCallback(**kwargs)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"fixed_swap_epoch": 0.3}, "swap_epoch=<epoch> with detector=None"),
        ({"max_swap_epoch": 100}, r"swap_epoch=<epoch> \(the latest swap"),
        ({"factor": 0.8}, r"detector=GradientNormPeakDetector\(factor=...\)"),
        ({"cg_phase": 4}, "batches_per_iteration"),
        ({"optimizer_kwargs": {}}, "optimizer="),
        ({"preconditioner": "none"}, r"optimizer=\{'preconditioner': ...\}"),
        ({"fallback_progress_window": None}, r"fallback=FallbackPolicy\(progress_window=...\)"),
        ({"trial_batching": "auto"}, "it was removed"),
    ],
)
def test_arguments_of_earlier_versions_are_refused_with_their_new_spelling(old, new):
    with pytest.raises(TypeError, match="renamed or removed in version 0.3.*" + new):
        ConvexitySwapCallback(**old)
    with pytest.raises(TypeError, match="unexpected argument"):
        ConvexitySwapCallback(bogus=1)


def test_the_optimizer_argument_takes_a_name_its_options_or_a_factory():
    def groups():  # an optimizer fills its groups in: a fresh list for each
        return [{"params": [torch.zeros(2, requires_grad=True)]}]

    default = ConvexitySwapCallback()._config
    assert isinstance(default.build_optimizer(groups()), LBFGS) and default.preconditioner == "none"
    assert default.build_optimizer(groups()).defaults["max_iter"] == 20
    callback = ConvexitySwapCallback(optimizer={"name": "cg", "beta": "pr+", "preconditioner": "none"})
    assert callback._config.preconditioner == "none"
    optimizer = callback._config.build_optimizer(groups())
    assert isinstance(optimizer, ConjugateGradient) and optimizer.defaults["beta"] == "polak_ribiere_plus"
    assert isinstance(ConvexitySwapCallback(optimizer="cg")._config.build_optimizer(groups()), ConjugateGradient)
    five = ConvexitySwapCallback(optimizer={"max_iter": 5})._config.build_optimizer(groups())
    assert five.defaults["max_iter"] == 5
    factory = ConvexitySwapCallback(optimizer=torch.optim.LBFGS)._config
    assert factory.build_optimizer is torch.optim.LBFGS and factory.preconditioner == "none"


def test_a_fallback_policy_of_ones_own_and_no_fallback():
    policy = FallbackPolicy(after_failures=5)
    assert ConvexitySwapCallback(fallback=policy)._config.fallback is policy
    off = ConvexitySwapCallback(fallback=False)._config
    assert not off.fall_back and isinstance(off.fallback, FallbackPolicy)  # it still judges, to warn


def test_reason_codes_are_strings_for_logs_and_configs():
    assert Reason.PLATEAU == "plateau" and Reason("swap_epoch") is Reason.SWAP_EPOCH


@pytest.mark.parametrize(
    "value",
    [np.float32(0.5), np.float64(0.5), fractions.Fraction(1, 2)],
    ids=["float32", "float64", "fraction"],
)
def test_any_real_number_type_is_taken_and_made_a_python_number(value):
    callback = ConvexitySwapCallback(swap_epoch=value, detector=PlateauDetector(window=value * 0.4))
    assert ConvexitySwapCallback(detector=None, swap_epoch=value) is not None
    assert type(callback.detector.window) is float and callback.detector.window == pytest.approx(0.2)
    assert type(check_epoch("X", "e", value)) is float and check_epoch("X", "e", value * 60) == 30
    assert type(check_number("X", "r", value, 0.0, 1.0)) is float
    assert type(check_count("X", "n", value * 6)) is int and check_count("X", "n", np.int64(3)) == 3
    assert type(PlateauDetector(min_improvement=value).min_improvement) is float


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ConjugateGradient([torch.zeros(1, requires_grad=True)], sharded="no"), TypeError, "`sharded`"),
        (lambda: ConvexitySwapCallback(optimizer={"sharded": "no"}), ValueError, "`sharded` must be True or False"),
        (lambda: Decision(False, Reason.WAITING, "", [1, 2]), TypeError, "`scalars` must be a mapping"),
        (lambda: Decision(False, Reason.WAITING, None), TypeError, "`message` must be a string"),
    ],
    ids=["cg-sharded", "callback-sharded", "decision-scalars", "decision-message"],
)
def test_flags_scalars_and_messages_of_a_wrong_type_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()
