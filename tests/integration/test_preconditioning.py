"""Preconditioned conjugate gradient, and the preconditioner the callback builds from Adam's second moments."""

from __future__ import annotations

import io
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_twophase import ConjugateGradient
from lightning_twophase.optim.conjugate_gradient import BETA_FORMULAS
from lightning_twophase.preconditioning import FLOOR, apply_preconditioner, second_moment_preconditioner
from tests.conftest import TinyClassifier, fit, swap_at
from tests.integration.test_cg_phase import FirstOptimizer

BETAS = sorted(set(BETA_FORMULAS.values()))


def test_exact_inverse_diagonal_solves_an_ill_conditioned_quadratic_in_one_iteration():
    n = 50
    curvature = torch.logspace(0, 6, n, dtype=torch.float64)  # condition number 1e6
    target = torch.linspace(-1, 1, n, dtype=torch.float64)
    x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([x], preconditioner=[1.0 / curvature], c1=1e-10, c2=1e-8)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * (curvature * (x - target) ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(x.detach(), target, rtol=0, atol=1e-10)
    plain = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    unpreconditioned = ConjugateGradient([plain], c1=1e-10, c2=1e-8)

    def plain_closure():
        unpreconditioned.zero_grad()
        loss = 0.5 * (curvature * (plain - target) ** 2).sum()
        loss.backward()
        return loss

    unpreconditioned.step(plain_closure)
    assert float((plain.detach() - target).abs().max()) > 0.1  # without P one iteration is far from enough


def logistic_objective() -> Any:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(300, 12, generator=generator, dtype=torch.float64)
    # Badly scaled features (the case a diagonal preconditioner is for), labels from a clear linear signal.
    features = base * torch.logspace(-1, 1.5, 12, dtype=torch.float64)
    signal = base @ (2 * torch.randn(12, generator=generator, dtype=torch.float64))
    labels = (torch.rand(300, generator=generator, dtype=torch.float64) < torch.sigmoid(signal)).double()

    def loss(w: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(features @ w, labels) + 1e-3 * (w * w).sum()

    return loss


@pytest.mark.parametrize("line_search", ["strong_wolfe", "brent"])
@pytest.mark.parametrize("beta", BETAS)
def test_preconditioned_cg_follows_plain_cg_on_the_rescaled_variables(beta, line_search):
    """P-preconditioned CG on x is plain CG on u = P^(-1/2) x: the same iterates, x_k = P^(1/2) u_k."""
    loss = logistic_objective()
    diagonal = torch.logspace(-2, 1, 12, dtype=torch.float64)
    scale = diagonal.sqrt()
    x = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    u = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    options = {"beta": beta, "line_search": line_search}
    preconditioned = ConjugateGradient([x], preconditioner=[diagonal], **options)
    rescaled = ConjugateGradient([u], **options)

    def closure_x():
        preconditioned.zero_grad()
        value = loss(x)
        value.backward()
        return value

    def closure_u():
        rescaled.zero_grad()
        value = loss(scale * u)
        value.backward()
        return value

    for _ in range(12):
        preconditioned.step(closure_x, lambda: loss(x))
        rescaled.step(closure_u, lambda: loss(scale * u))
        # Equal up to the rounding of the two ways of forming the dot products (torch 2.2 rounds them differently).
        torch.testing.assert_close(x.detach(), scale * u.detach(), rtol=0, atol=1e-9)
    assert float(loss(x.detach())) < 0.95 * float(loss(torch.zeros(12, dtype=torch.float64)))  # real progress
    assert preconditioned.totals == rescaled.totals


def test_state_dict_round_trip_carries_the_preconditioner():
    loss = logistic_objective()
    diagonal = torch.logspace(-2, 1, 12, dtype=torch.float64)
    x = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([x], preconditioner=[diagonal])

    def make_closure(opt, w):
        def closure():
            opt.zero_grad()
            value = loss(w)
            value.backward()
            return value

        return closure

    for _ in range(3):
        optimizer.step(make_closure(optimizer, x))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    start = x.detach().clone()
    for _ in range(3):
        optimizer.step(make_closure(optimizer, x))

    y = start.clone().requires_grad_(True)
    restored = ConjugateGradient([y])  # built without a preconditioner: it comes back with the state
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.preconditioner[0], diagonal)
    for _ in range(3):
        restored.step(make_closure(restored, y))
    assert torch.equal(x.detach(), y.detach())


def test_bad_preconditioners_are_refused():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="positive and finite"):
        ConjugateGradient([x], preconditioner=[torch.tensor([1.0, 0.0, 1.0])])
    with pytest.raises(ValueError, match="shape"):
        ConjugateGradient([x], preconditioner=[torch.ones(4)])
    with pytest.raises(ValueError, match="one tensor per parameter"):
        ConjugateGradient([x], preconditioner=[])


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def median_is_one(diagonal: list[torch.Tensor]) -> bool:
    """At least half the entries are at least 1 and at least half at most 1 (for an even count too)."""
    values = flat(diagonal)
    half = values.numel() // 2
    return int((values >= 1).sum()) >= half and int((values <= 1).sum()) >= half


def test_second_moment_preconditioner_is_adams_bias_corrected_scale_relative_to_its_median():
    model = nn.Linear(4, 2)
    adam = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(5):
        adam.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()
        adam.step()
    diagonal = second_moment_preconditioner(adam)
    scales = []
    for p in model.parameters():
        state = adam.state[p]
        scales.append((state["exp_avg_sq"] / (1 - 0.99 ** float(state["step"]))).sqrt())
    median = flat(scales).median()
    assert float(flat(scales).min()) > FLOOR * float(median)  # no floor here: Adam's own 1 / sqrt(v_hat), rescaled
    for got, scale in zip(diagonal, scales):
        torch.testing.assert_close(got, median / scale)
    assert median_is_one(diagonal)
    assert second_moment_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1)) is None


def test_second_moment_preconditioner_floors_vanishing_scales_and_gives_weights_without_state_the_median():
    model = nn.Linear(4, 2)
    silent = nn.Parameter(torch.ones(3))  # its gradient is always zero: v_hat = 0
    unused = nn.Parameter(torch.ones(2))  # never gets a gradient: no state
    adam = torch.optim.Adam([*model.parameters(), silent, unused], lr=0.01)
    for _ in range(3):
        adam.zero_grad()
        (model(torch.randn(8, 4)).pow(2).sum() + 0 * silent.sum()).backward()
        adam.step()
    *used, for_silent, for_unused = second_moment_preconditioner(adam)
    assert all(bool(torch.isfinite(d).all()) for d in used)
    # The silent weights get the floor's step scale, not an infinite one; the unused ones the median's.
    torch.testing.assert_close(for_silent, torch.full((3,), 1 / FLOOR))
    assert torch.equal(for_unused, torch.ones(2))


class SGDClassifier(TinyClassifier):
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def swap_preconditioner(model: pl.LightningModule, **callback_kwargs: Any) -> tuple[Any, Any]:
    """The CG phase's preconditioner after a swap at epoch 1, and the first-phase optimizer it came from."""
    first = FirstOptimizer()
    trainer = fit(model, swap_at(1, **callback_kwargs), first, max_epochs=2)
    return trainer.optimizers[0].optimizer.preconditioner, first.optimizer


@pytest.mark.parametrize(
    "options",
    ["cg", {"preconditioner": "second_moments"}, {"name": "cg", "preconditioner": "second_moments"}],
    ids=["cg-default", "lbfgs-asked-for", "cg-asked-for"],
)
def test_the_callback_preconditions_with_the_first_phases_second_moments(options):
    diagonal, adam = swap_preconditioner(TinyClassifier(), optimizer=options)
    assert isinstance(adam, torch.optim.Adam)
    for got, expected in zip(diagonal, second_moment_preconditioner(adam)):
        assert torch.equal(got, expected)
    assert median_is_one(diagonal)
    assert float(torch.cat([d.reshape(-1) for d in diagonal]).std()) > 0.05  # a real, non-uniform scaling


def test_plain_lbfgs_is_the_default():
    diagonal, _ = swap_preconditioner(TinyClassifier())
    assert diagonal is None


def test_a_first_optimizer_without_second_moments_gives_plain_cg_with_a_warning():
    with pytest.warns(UserWarning, match="has no Adam-style second moments"):
        diagonal, _ = swap_preconditioner(SGDClassifier(), optimizer="cg")  # CG's default asks for second moments
    assert diagonal is None


def test_second_moments_that_are_not_finite_give_plain_cg_with_a_warning():
    # An inf in Adam's second moments would make a zero diagonal entry: CG then runs plain, and says why.
    model = nn.Linear(3, 1)
    adam = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    adam.step()
    adam.state[model.weight]["exp_avg_sq"][0, 0] = math.inf
    with pytest.raises(ValueError, match="Adam's second moments are not all finite"):
        second_moment_preconditioner(adam)
    cg = ConjugateGradient(model.parameters())
    warnings: list[str] = []
    apply_preconditioner("second_moments", adam, cg, warnings.append)
    assert cg.preconditioner is None
    assert len(warnings) == 1 and "not all finite" in warnings[0] and "plain conjugate gradient" in warnings[0]


@pytest.mark.parametrize(
    "bad",
    [lambda adam: 2.0, lambda adam: [torch.zeros_like(p) for g in adam.param_groups for p in g["params"]]],
    ids=["not-tensors", "zeros"],
)
def test_a_preconditioner_callable_that_gives_no_usable_diagonal_means_plain_cg_with_a_warning(bad):
    with pytest.warns(UserWarning, match="the `preconditioner` callable gave no usable diagonal"):
        diagonal, _ = swap_preconditioner(TinyClassifier(), optimizer={"preconditioner": bad})
    assert diagonal is None  # the run went on, in plain CG


def test_no_preconditioner_and_a_user_supplied_one():
    diagonal, _ = swap_preconditioner(TinyClassifier(), optimizer={"preconditioner": "none"})
    assert diagonal is None  # plain CG

    def halves(optimizer):
        return [torch.full_like(p, 0.5) for group in optimizer.param_groups for p in group["params"]]

    diagonal, _ = swap_preconditioner(TinyClassifier(), optimizer={"preconditioner": halves})
    assert all(bool((d == 0.5).all()) for d in diagonal)
