"""ConjugateGradient against scipy's CG and torch's LBFGS on the same problems and starts, measured in one run.

Prints, per problem: iterations, gradient evaluations (closure calls with backward), value-only evaluations,
wall time, the final loss and gradient norm, and our evaluation count relative to scipy's.

    python benchmarks/cg_vs_peers.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import scipy.optimize
import torch
from torch import nn

from lightning_twophase import ConjugateGradient

GRAD_TOLERANCE = 1e-5


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def logistic_regression() -> Callable[[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2000, 50, dtype=torch.float64, generator=generator)
    weights = torch.randn(50, dtype=torch.float64, generator=generator)
    labels = (torch.sigmoid(features @ weights) > torch.rand(2000, dtype=torch.float64, generator=generator)).double()

    def loss(w: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(features @ w, labels) + 1e-3 * (w * w).sum()

    return loss


PROBLEMS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = {
    "rosenbrock-2d": (rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64)),
    "rosenbrock-100d": (rosenbrock, torch.tensor([-1.2, 1.0] * 50, dtype=torch.float64)),
    "logistic-50d": (logistic_regression(), torch.zeros(50, dtype=torch.float64)),
}


def run_ours(fn, start, line_search: str) -> dict:
    x = start.clone().requires_grad_(True)
    optimizer = ConjugateGradient(
        [x], beta="pr+", line_search=line_search, max_iter=20000, tolerance_grad=GRAD_TOLERANCE, tolerance_change=0.0
    )

    def closure():
        optimizer.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss

    def value_closure():
        return fn(x)

    began = time.perf_counter()
    optimizer.step(closure, value_closure)
    seconds = time.perf_counter() - began
    totals = optimizer.totals
    return {
        "method": f"ours PR+ {line_search}",
        "iterations": totals["iterations"],
        "gradient_evals": totals["gradient_evaluations"],
        "value_evals": totals["value_evaluations"],
        "seconds": seconds,
        "x": x.detach(),
    }


def run_scipy(fn, start) -> dict:
    def fun_and_grad(values: np.ndarray) -> tuple[float, np.ndarray]:
        x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
        loss = fn(x)
        loss.backward()
        return float(loss.detach()), x.grad.numpy().copy()

    began = time.perf_counter()
    result = scipy.optimize.minimize(
        fun_and_grad, start.numpy(), jac=True, method="CG", options={"gtol": GRAD_TOLERANCE, "maxiter": 20000}
    )
    seconds = time.perf_counter() - began
    return {
        "method": "scipy CG (PR+, Wolfe)",
        "iterations": result.nit,
        "gradient_evals": result.nfev,
        "value_evals": 0,
        "seconds": seconds,
        "x": torch.tensor(result.x),
    }


def run_lbfgs(fn, start) -> dict:
    x = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [x],
        lr=1.0,
        max_iter=20000,
        max_eval=25000,
        tolerance_grad=GRAD_TOLERANCE,
        tolerance_change=0.0,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss

    began = time.perf_counter()
    optimizer.step(closure)
    seconds = time.perf_counter() - began
    state = optimizer.state[optimizer._params[0]]
    return {
        "method": "torch LBFGS (strong Wolfe)",
        "iterations": state["n_iter"],
        "gradient_evals": state["func_evals"],
        "value_evals": 0,
        "seconds": seconds,
        "x": x.detach(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="wall time is the fastest of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"Stopping rule: gradient norm <= {GRAD_TOLERANCE} (ours: 2-norm, scipy and LBFGS: max-norm).")
    print("gradient evals = closure calls with backward; value evals = forward-only calls (golden, Brent, Armijo).\n")
    header = (
        "| problem | method | iterations | gradient evals | value evals | wall time (ms) | final loss | |grad| "
        "| evals vs scipy |"
    )
    print(header)
    print("|" + "---|" * 9)
    for name, (fn, start) in PROBLEMS.items():
        runners = [partial(run_scipy, fn, start), partial(run_lbfgs, fn, start)]
        runners += [partial(run_ours, fn, start, ls) for ls in ("strong_wolfe", "brent", "golden", "armijo")]
        rows = []
        for runner in runners:
            result = min((runner() for _ in range(args.repeats)), key=lambda r: r["seconds"])
            rows.append(result)
        scipy_evals = rows[0]["gradient_evals"]
        for row in rows:
            x = row["x"].clone().requires_grad_(True)
            loss = fn(x)
            (grad,) = torch.autograd.grad(loss, x)
            loss = loss.detach()
            # A forward-only evaluation costs about a third of a gradient evaluation.
            cost = row["gradient_evals"] + row["value_evals"] / 3
            print(
                f"| {name} | {row['method']} | {row['iterations']} | {row['gradient_evals']} | {row['value_evals']} "
                f"| {1000 * row['seconds']:.1f} | {float(loss):.3e} | {float(grad.norm()):.1e} "
                f"| {cost / scipy_evals:.2f} |"
            )
    print("\nevals vs scipy: (gradient evals + value evals / 3) / scipy's function-and-gradient evaluations.")


if __name__ == "__main__":
    main()
