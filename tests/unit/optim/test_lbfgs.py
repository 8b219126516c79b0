"""LBFGS: convergence against torch's L-BFGS on the same closures, safety with bad numbers, state, distributed use."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lightning_twophase import LBFGS, NonFiniteObjectiveError
from tests.conftest import init_gloo, run_on_ranks
from tests.unit.optim.test_conjugate_gradient import (
    make_closure,
    mlp,
    mlp_closure,
    nan_beyond_two,
    rosenbrock,
    rosenbrock_start,
)


def counted(optimizer, fn, x):
    calls = [0]
    inner = make_closure(optimizer, fn, x)

    def closure():
        calls[0] += 1
        return inner()

    return closure, calls


def quadratic(n: int = 40, condition: float = 1e3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    hessian = basis @ torch.diag(torch.logspace(0, math.log10(condition), n, dtype=torch.float64)) @ basis.T
    b = torch.randn(n, dtype=torch.float64, generator=generator)
    return (lambda x: 0.5 * x @ hessian @ x - b @ x), torch.linalg.solve(hessian, b)


@pytest.mark.parametrize("history_size", [10, 40])
def test_an_ill_conditioned_quadratic_as_torchs_lbfgs_solves_it(history_size):
    fn, solution = quadratic()
    errors, calls = [], []
    for optimizer_class, options in (
        (LBFGS, {}),
        (torch.optim.LBFGS, {"line_search_fn": "strong_wolfe", "max_eval": 10**4}),
    ):
        x = torch.zeros_like(solution).requires_grad_(True)
        optimizer = optimizer_class(
            [x], max_iter=200, history_size=history_size, tolerance_grad=1e-9, tolerance_change=0.0, **options
        )
        closure, count = counted(optimizer, fn, x)
        optimizer.step(closure)
        errors.append(float((x.detach() - solution).norm() / solution.norm()))
        calls.append(count[0])
    assert errors[0] < 1e-5
    assert errors[0] <= 1.2 * errors[1]
    assert calls[0] <= 1.1 * calls[1]  # the unit step mostly accepted at once, as torch's


@pytest.mark.parametrize("n", [2, 10])
def test_rosenbrock_as_well_as_torchs_lbfgs_on_the_same_closure(n):
    ours_x = rosenbrock_start(n).requires_grad_(True)
    ours = LBFGS([ours_x], max_iter=200, history_size=10, tolerance_change=0.0)
    ours_closure, ours_calls = counted(ours, rosenbrock, ours_x)
    theirs_x = rosenbrock_start(n).requires_grad_(True)
    theirs = torch.optim.LBFGS(
        [theirs_x], max_iter=200, max_eval=10_000, history_size=10, line_search_fn="strong_wolfe",
        tolerance_change=0.0,
    )  # fmt: skip
    theirs_closure, theirs_calls = counted(theirs, rosenbrock, theirs_x)
    ours.step(ours_closure)
    theirs.step(theirs_closure)
    ours_loss, theirs_loss = float(rosenbrock(ours_x.detach())), float(rosenbrock(theirs_x.detach()))
    assert ours_loss < 1e-12
    assert ours_loss <= max(theirs_loss, 1e-14)
    assert ours_calls[0] <= 1.25 * theirs_calls[0]


def iterations_to_solve(scales: torch.Tensor, preconditioner: list[torch.Tensor] | None) -> int:
    x = torch.ones_like(scales).requires_grad_(True)
    optimizer = LBFGS([x], max_iter=1, preconditioner=preconditioner)
    fn = lambda v: 0.5 * (scales * v * v).sum()  # noqa: E731
    closure = make_closure(optimizer, fn, x)
    for iteration in range(1, 50):
        optimizer.step(closure)
        if float(fn(x.detach())) < 1e-20:
            return iteration
    return 50


def test_the_preconditioner_shapes_the_initial_inverse_hessian():
    # A badly scaled quadratic whose diagonal is known: D = its inverse makes the first direction point at the
    # minimum, and the first pair then scales H exactly.
    scales = torch.logspace(0, 4, 20, dtype=torch.float64)
    assert iterations_to_solve(scales, [1.0 / scales]) <= 2
    assert iterations_to_solve(scales, None) > 5


def test_nan_regions_are_failed_trials_and_never_accepted():
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    optimizer = LBFGS([x], lr=10.0, max_iter=5)
    closure = make_closure(optimizer, nan_beyond_two, x)
    previous = float(nan_beyond_two(x.detach()))
    for _ in range(4):
        optimizer.step(closure)
        current = float(nan_beyond_two(x.detach()))
        assert math.isfinite(current) and bool(torch.isfinite(x).all())
        assert current <= previous
        previous = current
    assert previous < 6.0


def test_non_finite_start_raises_and_leaves_parameters_untouched():
    x = torch.tensor([3.0, 0.0], dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    optimizer = LBFGS([x])
    with pytest.raises(NonFiniteObjectiveError, match="loss is not finite"):
        optimizer.step(make_closure(optimizer, nan_beyond_two, x))
    assert torch.equal(x.detach(), before)


def test_closure_that_raises_mid_search_leaves_parameters_where_the_iteration_began():
    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = LBFGS([x], max_iter=1)
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


def test_a_failed_search_puts_the_parameters_back_and_drops_the_history():
    x = rosenbrock_start(4).requires_grad_(True)
    optimizer = LBFGS([x], max_iter=3)
    closure = make_closure(optimizer, rosenbrock, x)
    optimizer.step(closure)  # builds a history
    start = x.detach().clone()

    def poisoned():
        loss = closure()
        if not torch.equal(x.detach(), start):
            return torch.tensor(math.nan, dtype=torch.float64)
        return loss

    optimizer.step(poisoned)
    assert optimizer.diagnostics.failed
    assert torch.equal(x.detach(), start)
    assert optimizer.totals["line_search_failures"] == 2  # the quasi-Newton direction, then steepest descent
    restarts = optimizer.totals["restarts"]
    optimizer.step(closure)
    assert optimizer.totals["restarts"] == restarts + 1  # from steepest descent again


def test_missing_closure_and_bad_options_are_clear_errors():
    with pytest.raises(RuntimeError, match="needs a closure"):
        LBFGS([torch.zeros(2, requires_grad=True)]).step()
    with pytest.raises(ValueError, match="0 < c1 < c2 < 1"):
        LBFGS([torch.zeros(2, requires_grad=True)], c1=0.5, c2=0.1)
    with pytest.raises(ValueError, match="history_size"):
        LBFGS([torch.zeros(2, requires_grad=True)], history_size=0)
    with pytest.raises(ValueError, match="one dtype and device"):
        LBFGS([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(ValueError, match="overrides"):
        LBFGS([{"params": [torch.zeros(2, requires_grad=True)], "max_iter": 3}])


def test_state_dict_round_trip_gives_the_same_next_steps():
    model = mlp()
    optimizer = LBFGS(model.parameters(), max_iter=4, history_size=5)
    closure, _ = mlp_closure(model, optimizer)
    for _ in range(3):
        optimizer.step(closure)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    for _ in range(2):
        optimizer.step(closure)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    restored_model = mlp(seed=123)
    restored_model.load_state_dict(checkpoint["model"])
    restored = LBFGS(restored_model.parameters(), max_iter=4, history_size=5)
    restored.load_state_dict(checkpoint["optimizer"])
    restored_closure, _ = mlp_closure(restored_model, restored)
    for _ in range(2):
        restored.step(restored_closure)
    for original, resumed in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(original, resumed)
    assert restored.totals == optimizer.totals


def test_added_parameters_drop_the_history_and_get_a_preconditioner_of_ones():
    first = rosenbrock_start(4).requires_grad_(True)
    optimizer = LBFGS([first], max_iter=3, preconditioner=[torch.full((4,), 2.0, dtype=torch.float64)])
    second = rosenbrock_start(2).requires_grad_(True)
    closure = make_closure(optimizer, lambda v: rosenbrock(v[0]) + rosenbrock(v[1]), [first, second])
    optimizer.step(closure)
    optimizer.defaults["max_iter"] = optimizer.param_groups[0]["max_iter"] = 1  # one iteration, to see its restart
    optimizer.add_param_group({"params": [second]})
    before = second.detach().clone()
    optimizer.step(closure)
    assert optimizer.diagnostics.restart_reason == "parameters_added"
    assert torch.equal(optimizer.preconditioner[1], torch.ones(2, dtype=torch.float64))
    assert not torch.equal(second.detach(), before)  # the added parameters train


# ----------------------------------------------------------------------------------------------------------------
# Distributed: two CPU processes joined by gloo
# ----------------------------------------------------------------------------------------------------------------


def _replicated_rank(rank: int, world_size: int) -> dict:
    init_gloo(rank, world_size)
    model = nn.parallel.DistributedDataParallel(mlp(torch.float32))
    optimizer = LBFGS(model.parameters(), max_iter=3)
    # Each rank holds a different data shard, so its loss differs: only the all-reduce keeps decisions equal.
    generator = torch.Generator().manual_seed(100 + rank)
    inputs, targets = torch.randn(32, 4, generator=generator), torch.randn(32, 3, generator=generator)
    local_losses = []

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    for _ in range(4):
        local_losses.append(float(optimizer.step(closure)))
    return {"params": [p.detach().clone() for p in model.parameters()], "local_losses": local_losses,
            "totals": optimizer.totals}  # fmt: skip


def test_ddp_ranks_stay_bitwise_identical():
    rank0, rank1 = run_on_ranks(_replicated_rank)
    assert rank0["local_losses"] != rank1["local_losses"]  # the ranks really saw different data
    assert rank0["totals"] == rank1["totals"]  # the same closure calls on every rank
    assert rank0["totals"]["iterations"] == 12
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)


def _sharded_rank(rank: int, world_size: int) -> torch.Tensor:
    init_gloo(rank, world_size)
    shard = rosenbrock_start(6).clone().add_(0.1 * rank).requires_grad_(True)
    optimizer = LBFGS([shard], sharded=True, max_iter=30)

    def closure():
        optimizer.zero_grad()
        loss = rosenbrock(shard)
        loss.backward()
        return loss * world_size  # the optimizer averages losses over ranks: the mean is the global sum

    optimizer.step(closure)
    return shard.detach().clone()


def test_sharded_parameters_follow_the_unsharded_path():
    shards = run_on_ranks(_sharded_rank)
    full = [rosenbrock_start(6).clone().add_(0.1 * rank).requires_grad_(True) for rank in range(2)]
    optimizer = LBFGS(full, max_iter=30)
    optimizer.step(make_closure(optimizer, lambda xs: sum(rosenbrock(x) for x in xs), full))
    for shard, reference in zip(shards, full):
        torch.testing.assert_close(shard, reference.detach(), rtol=1e-8, atol=1e-10)
