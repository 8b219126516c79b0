"""ConjugateGradient: convergence, cost against scipy, safety with bad numbers, state, dtypes and distributed use."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lightning_twophase import ConjugateGradient, NonFiniteObjectiveError
from lightning_twophase.optim.conjugate_gradient import BETA_FORMULAS
from tests.conftest import init_gloo, run_on_ranks

BETAS = sorted(set(BETA_FORMULAS.values()))


def make_closure(optimizer, fn, x):
    def closure():
        optimizer.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss

    return closure


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def logistic_problem():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 20, dtype=torch.float64, generator=generator)
    weights = torch.randn(20, dtype=torch.float64, generator=generator)
    labels = (torch.sigmoid(features @ weights) > torch.rand(400, dtype=torch.float64, generator=generator)).double()

    def loss(w):
        logits = features @ w
        return nn.functional.binary_cross_entropy_with_logits(logits, labels) + 1e-3 * (w * w).sum()

    return loss, features, labels


def rosenbrock_start(n: int) -> torch.Tensor:
    return torch.tensor([-1.2, 1.0] * (n // 2), dtype=torch.float64)


def minimize(fn, start, max_iter=5000, **options):
    x = start.clone().requires_grad_(True)
    optimizer = ConjugateGradient([x], max_iter=max_iter, tolerance_grad=1e-5, tolerance_change=0.0, **options)
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss

    def value_closure():
        nonlocal calls
        calls += 1
        return fn(x)

    optimizer.step(closure, value_closure)
    x.grad = None
    x_final = x.detach()
    grad = torch.autograd.functional.jacobian(fn, x_final)
    return x_final, grad, calls, optimizer


@pytest.mark.parametrize("seed", [1, 3])
@pytest.mark.parametrize("beta", BETAS)
def test_quadratic_terminates_in_about_n_iterations(beta, seed):
    """On a strictly convex quadratic, CG with an exact line search terminates after n iterations.

    The spectrum spans a factor 100, for which the linear convergence bound 2 ((sqrt(k) - 1) / (sqrt(k) + 1))^i
    would need about 95 iterations to reach 1e-8: only the finite-termination property gives n (+ rounding slack).
    """
    n = 12
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    hessian = basis @ torch.diag(torch.logspace(0, 2, n, dtype=torch.float64)) @ basis.T
    b = torch.randn(n, dtype=torch.float64, generator=generator)
    x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    # c2 = 1e-8: the search is exact to rounding (an inexact one breaks conjugacy on such a spectrum).
    optimizer = ConjugateGradient([x], beta=beta, line_search="strong_wolfe", c1=1e-10, c2=1e-8, max_evals=50)
    closure = make_closure(optimizer, lambda v: 0.5 * v @ hessian @ v - b @ v, x)
    initial_norm = float(b.norm())
    residuals = []
    while len(residuals) < n + 2 and (not residuals or residuals[-1] > 1e-8 * initial_norm):
        optimizer.step(closure)
        residuals.append(float((hessian @ x.detach() - b).norm()))
    assert residuals[-1] <= 1e-8 * initial_norm, f"{beta}: relative gradient {residuals[-1] / initial_norm:.1e}"
    torch.testing.assert_close(x.detach(), torch.linalg.solve(hessian, b), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("problem", ["rosenbrock-2", "rosenbrock-100", "logistic"])
def test_every_beta_formula_converges(problem, beta):
    if problem == "logistic":
        fn, start = logistic_problem()[0], torch.zeros(20, dtype=torch.float64)
    else:
        fn, start = rosenbrock, rosenbrock_start(int(problem.split("-")[1]))
    x, grad, _, optimizer = minimize(fn, start, beta=beta, line_search="strong_wolfe")
    assert float(grad.norm()) <= 1e-5, optimizer.totals
    if problem != "logistic":
        torch.testing.assert_close(x, torch.ones_like(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("line_search", ["golden", "brent"])
@pytest.mark.parametrize("beta", BETAS)
def test_value_only_line_searches_converge_on_logistic_regression(line_search, beta):
    fn = logistic_problem()[0]
    _, grad, _, optimizer = minimize(fn, torch.zeros(20, dtype=torch.float64), beta=beta, line_search=line_search)
    assert float(grad.norm()) <= 1e-5
    assert optimizer.totals["value_evaluations"] > 0  # trial points were forward-only


@pytest.mark.parametrize("problem", ["rosenbrock-2", "rosenbrock-100", "logistic"])
def test_function_evaluations_within_twice_scipys_cg(problem):
    """Polak-Ribiere+ with the strong Wolfe search against scipy.optimize.minimize(method="CG"), same start."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    if problem == "logistic":
        fn, start = logistic_problem()[0], torch.zeros(20, dtype=torch.float64)
    else:
        fn, start = rosenbrock, rosenbrock_start(int(problem.split("-")[1]))

    def fun_and_grad(values):
        x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
        loss = fn(x)
        loss.backward()
        return float(loss.detach()), x.grad.numpy().copy()

    reference = scipy_optimize.minimize(fun_and_grad, start.numpy(), jac=True, method="CG", options={"gtol": 1e-5})
    assert reference.success
    x, grad, calls, _ = minimize(fn, start, beta="pr+", line_search="strong_wolfe")
    # Our stopping rule (2-norm of the gradient <= 1e-5) is at least as strict as scipy's (max-norm).
    assert float(grad.norm()) <= 1e-5
    assert float(fn(x)) <= reference.fun + 1e-8
    assert calls <= 2 * reference.nfev, f"{calls} evaluations, scipy {reference.nfev}"
    assert np.isfinite(reference.fun)


def nan_beyond_two(x: torch.Tensor) -> torch.Tensor:
    # Minimum at x = 3, but the objective is NaN wherever a coordinate exceeds 2.
    loss = ((x - 3) ** 2).sum()
    return torch.where((x > 2).any(), torch.full_like(loss, math.nan), loss)


@pytest.mark.parametrize("line_search", ["strong_wolfe", "armijo", "golden", "brent", "interpolation"])
def test_nan_regions_are_failed_trials_and_never_accepted(line_search):
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([x], line_search=line_search, lr=10.0)
    closure = make_closure(optimizer, nan_beyond_two, x)
    previous = float(nan_beyond_two(x.detach()))
    for _ in range(8):
        optimizer.step(closure, lambda: nan_beyond_two(x))
        current = float(nan_beyond_two(x.detach()))
        assert math.isfinite(current) and bool(torch.isfinite(x).all())
        assert current <= previous
        previous = current
    assert previous < 6.0  # from 45 at the start to near 5, the infimum on the finite region x <= 2


def test_non_finite_start_raises_and_leaves_parameters_untouched():
    x = torch.tensor([3.0, 0.0], dtype=torch.float64, requires_grad=True)  # x > 2: the loss is NaN here
    before = x.detach().clone()
    optimizer = ConjugateGradient([x])
    with pytest.raises(NonFiniteObjectiveError, match="loss is not finite"):
        optimizer.step(make_closure(optimizer, nan_beyond_two, x))
    assert torch.equal(x.detach(), before)


def test_non_finite_gradient_at_start_raises():
    x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)  # d/dx sqrt(|x|) is infinite at 0
    before = x.detach().clone()
    optimizer = ConjugateGradient([x])
    with pytest.raises(NonFiniteObjectiveError, match="gradient is not finite"):
        optimizer.step(make_closure(optimizer, lambda v: v.abs().sqrt().sum(), x))
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("line_search", ["strong_wolfe", "golden", "interpolation"])
def test_closure_that_raises_mid_search_leaves_parameters_at_the_start(line_search):
    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = ConjugateGradient([x], line_search=line_search)
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyError("data loader broke")
        optimizer.zero_grad()
        loss = rosenbrock(x)
        loss.backward()
        return loss

    before = x.detach().clone()
    with pytest.raises(KeyError, match="data loader broke"):
        optimizer.step(closure)
    assert torch.equal(x.detach(), before)


def test_missing_closure_is_a_clear_error():
    optimizer = ConjugateGradient([torch.zeros(2, requires_grad=True)])
    with pytest.raises(RuntimeError, match="needs a closure"):
        optimizer.step()


def test_failed_line_search_restores_the_start_and_restarts():
    # Every trial point is NaN: the search fails, the parameters return, the next direction is steepest descent.
    x = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    start = x.detach().clone()
    optimizer = ConjugateGradient([x], line_search="brent")

    def closure():
        optimizer.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    def value_closure():
        return torch.tensor(math.nan) if not torch.equal(x.detach(), start) else (x**2).sum()

    optimizer.step(closure, value_closure)
    assert optimizer.diagnostics.failed
    assert optimizer.diagnostics.step_size == 0.0
    assert torch.equal(x.detach(), start)
    optimizer.step(closure, value_closure)
    assert optimizer.diagnostics.restart_reason == "after_failure"
    assert optimizer.totals["line_search_failures"] == 2


@pytest.mark.parametrize("line_search", ["strong_wolfe", "armijo", "golden", "brent", "interpolation"])
def test_no_decrease_below_the_rounding_of_the_loss_is_convergence_not_failure(line_search):
    # 1e-9 from the minimum of 1 + |x - c|^2 / 2: the gradient (1e-9) is above tolerance_grad, but no step can lower
    # the loss by more than 5e-19, far below its rounding (2e-16). The search finds no decrease, and that is the
    # precision limit of the loss, not a failure of the CG phase. (Armijo's and Wolfe's tests accept a step whose
    # value equals the start's to rounding; the value-only searches want a strict decrease.)
    centre = torch.tensor([0.5, -0.25], dtype=torch.float64)
    x = (centre + 1e-9).requires_grad_(True)
    optimizer = ConjugateGradient([x], line_search=line_search)
    loss = lambda v: 1.0 + 0.5 * (v - centre).square().sum()  # noqa: E731
    optimizer.step(make_closure(optimizer, loss, x))
    expected = "precision_limit" if line_search in ("golden", "brent", "interpolation") else "converged"
    assert optimizer.diagnostics.line_search_status == expected
    assert not optimizer.diagnostics.failed
    assert optimizer.totals["line_search_failures"] == 0
    assert float(loss(x.detach())) == 1.0


def test_back_at_the_precision_limit_the_search_is_not_repeated():
    # The same point gives the same search: once no decrease was resolvable there, later steps from it (the next
    # epoch of a converged CG phase) cost only the closure's gradient.
    centre = torch.tensor([0.5, -0.25], dtype=torch.float64)
    x = (centre + 1e-9).requires_grad_(True)
    optimizer = ConjugateGradient([x], line_search="interpolation")
    loss = lambda v: 1.0 + 0.5 * (v - centre).square().sum()  # noqa: E731
    closure = make_closure(optimizer, loss, x)
    optimizer.step(closure, lambda: loss(x))
    first = optimizer.diagnostics
    assert first.line_search_status == "precision_limit" and first.value_evaluations > 0
    for _ in range(3):
        optimizer.step(closure, lambda: loss(x))
        assert optimizer.diagnostics.line_search_status == "precision_limit"
        assert (optimizer.diagnostics.value_evaluations, optimizer.diagnostics.gradient_evaluations) == (0, 1)
    assert optimizer.totals["line_search_failures"] == 0


def test_diagnostics_describe_the_step():
    x = rosenbrock_start(2).requires_grad_(True)
    optimizer = ConjugateGradient([x], beta="pr+")
    closure = make_closure(optimizer, rosenbrock, x)
    optimizer.step(closure)
    first = optimizer.diagnostics
    assert first.restarted and first.restart_reason == "start" and first.beta == 0.0
    assert first.loss == pytest.approx(24.2) and first.new_loss < first.loss
    assert first.step_size > 0 and first.slope < 0 and first.gradient_evaluations >= 2
    assert first.line_search_status == "converged"
    for _ in range(5):
        optimizer.step(closure)
    assert optimizer.diagnostics.beta >= 0.0  # PR+ clips beta at zero
    assert optimizer.totals["iterations"] == 6


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def mlp_closure(model, optimizer, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 4, generator=generator).to(dtype)
    targets = torch.randn(64, 3, generator=generator).to(dtype)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    def value_closure():
        return nn.functional.mse_loss(model(inputs), targets)

    return closure, value_closure


@pytest.mark.parametrize("line_search", ["strong_wolfe", "brent"])
def test_state_dict_round_trip_gives_the_same_next_steps(line_search):
    model = mlp()
    optimizer = ConjugateGradient(model.parameters(), line_search=line_search, beta="hz")
    closure, value_closure = mlp_closure(model, optimizer)
    for _ in range(3):
        optimizer.step(closure, value_closure)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    for _ in range(2):
        optimizer.step(closure, value_closure)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    restored_model = mlp(seed=123)
    restored_model.load_state_dict(checkpoint["model"])
    restored = ConjugateGradient(restored_model.parameters(), line_search=line_search, beta="hz")
    restored.load_state_dict(checkpoint["optimizer"])
    restored_closure, restored_value_closure = mlp_closure(restored_model, restored)
    for _ in range(2):
        restored.step(restored_closure, restored_value_closure)
    for original, resumed in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(original, resumed)
    assert restored.totals == optimizer.totals


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64(dtype):
    model = mlp(dtype)
    optimizer = ConjugateGradient(model.parameters())
    closure, _ = mlp_closure(model, optimizer, dtype)
    first = float(closure())
    for _ in range(30):
        optimizer.step(closure)
    assert all(p.dtype == dtype for p in model.parameters())
    assert float(closure()) < 0.8 * first
    assert optimizer.totals["line_search_failures"] == 0


def test_several_parameter_groups_follow_the_same_path_as_one_group():
    one, two = mlp(), mlp()
    single = ConjugateGradient(one.parameters())
    weights = [p for name, p in two.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in two.named_parameters() if name.endswith("bias")]
    # Same parameter order as model.parameters(): weight, bias, weight, bias -> interleave per layer.
    grouped = ConjugateGradient([{"params": [weights[0], biases[0]]}, {"params": [weights[1], biases[1]]}])
    closure_one, _ = mlp_closure(one, single)
    closure_two, _ = mlp_closure(two, grouped)
    for _ in range(5):
        single.step(closure_one)
        grouped.step(closure_two)
    for a, b in zip(one.parameters(), two.parameters()):
        assert torch.equal(a, b)
    assert all(not torch.equal(a, b) for a, b in zip(one.parameters(), mlp().parameters()))


def test_per_group_options_are_refused():
    model = mlp()
    with pytest.raises(ValueError, match="options are global"):
        ConjugateGradient([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": "steepest"}, "unknown `beta"),
        ({"line_search": "exact"}, "unknown `line_search"),
        ({"lr": -1.0}, r"`lr` must lie in \(0.0, inf\)"),
        ({"c1": 0.5, "c2": 0.1}, "0 < c1 < c2 < 1"),
        ({"max_iter": 0}, "max_iter"),
        # NaN compares false with everything: named as such, not as a parameter-group override.
        ({"c2": math.nan}, "`c2` must be a finite number"),
        ({"line_search_tolerance": math.nan}, "`line_search_tolerance` must be a finite number"),
        ({"max_iter": 2.5}, "`max_iter` must be a whole number"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConjugateGradient([torch.zeros(2, requires_grad=True)], **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Distributed: two CPU processes joined by gloo
# ----------------------------------------------------------------------------------------------------------------


def _replicated_rank(rank: int, world_size: int, line_search: str) -> dict:
    init_gloo(rank, world_size)
    model = nn.parallel.DistributedDataParallel(mlp(torch.float32))
    optimizer = ConjugateGradient(model.parameters(), line_search=line_search)
    # Each rank holds a different data shard, so its loss differs: only the all-reduce keeps decisions equal.
    generator = torch.Generator().manual_seed(100 + rank)
    inputs, targets = torch.randn(32, 4, generator=generator), torch.randn(32, 3, generator=generator)
    local_losses = []

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    for _ in range(6):
        local_losses.append(float(optimizer.step(closure)))
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "local_losses": local_losses,
        "totals": optimizer.totals,
    }


@pytest.mark.parametrize("line_search", ["strong_wolfe", "golden"])
def test_ddp_ranks_stay_bitwise_identical(line_search):
    rank0, rank1 = run_on_ranks(_replicated_rank, line_search)
    assert rank0["local_losses"] != rank1["local_losses"]  # the ranks really saw different data
    assert rank0["totals"] == rank1["totals"]  # same number of closure calls on every rank
    assert rank0["totals"]["iterations"] == 6 and rank0["totals"]["line_search_failures"] == 0
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)
    initial = [p.detach() for p in mlp(torch.float32).parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(rank0["params"], initial))


def _separable_rosenbrock(shards: list[torch.Tensor]) -> torch.Tensor:
    return sum(rosenbrock(shard) for shard in shards)


def _sharded_rank(rank: int, world_size: int) -> torch.Tensor:
    init_gloo(rank, world_size)
    # Each rank owns one shard of the parameters; the objective is the sum of a Rosenbrock term per shard.
    shard = rosenbrock_start(6).clone().add_(0.1 * rank).requires_grad_(True)
    optimizer = ConjugateGradient([shard], sharded=True, beta="pr+")

    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(shard)
        loss.backward()
        # The optimizer averages losses over ranks; scale so that the mean is the global sum.
        return loss * world_size

    for _ in range(10):
        optimizer.step(closure)
    return shard.detach().clone()


def test_sharded_parameters_follow_the_unsharded_path():
    shards = run_on_ranks(_sharded_rank)
    full = [rosenbrock_start(6).clone().add_(0.1 * rank).requires_grad_(True) for rank in range(2)]
    optimizer = ConjugateGradient(full, beta="pr+")
    closure = make_closure(optimizer, _separable_rosenbrock, full)
    for _ in range(10):
        optimizer.step(closure)
    for shard, reference in zip(shards, full):
        torch.testing.assert_close(shard, reference.detach(), rtol=1e-10, atol=1e-12)
    assert not torch.equal(shards[0], rosenbrock_start(6))
