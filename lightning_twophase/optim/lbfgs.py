"""Limited-memory BFGS as a ``torch.optim.Optimizer`` that a Lightning Trainer can step: the default second phase.

One iteration: evaluate the loss and gradient ``g`` at ``x``; form the quasi-Newton direction ``d = -H g`` with the
two-loop recursion over the last ``history_size`` pairs ``(s, y)`` of steps and gradient changes; search along ``d``
for a step ``t`` that satisfies the strong Wolfe conditions (so ``s . y > 0`` and ``H`` stays positive definite); move
to ``x + t d``. ``max_iter`` iterations make one ``step()``: on the full-batch objective of the callback's second
phase, several iterations per epoch on the batches the epoch kept.

The initial inverse Hessian of every recursion is ``H0 = gamma D``: ``D`` an optional fixed diagonal (the callback
passes the first optimizer's ``1 / sqrt(v_hat)``, Adam's own geometry) and ``gamma = s . y / y . D y`` from the latest
pair (Nocedal and Wright, 7.20), so that ``D`` sets the shape and the pairs the scale.

Memory: ``2 * history_size`` flat copies of the parameters, plus the start point of the line search. Each iteration
costs its line search's closure calls (usually one: the step ``t = 1`` is accepted once the pairs know the scale) and
``4 * history_size`` dot products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_twophase.arguments import check_count, check_flag, check_number
from lightning_twophase.optim import line_search as ls
from lightning_twophase.optim.conjugate_gradient import (
    StepDiagnostics,
    _at_precision_limit,
    _check_finite_start,
    _checked_preconditioner,
    _gradients,
    _LineFunction,
    _move_to,
)
from lightning_twophase.optim.distributed import DecisionReducer

__all__ = ["LBFGS"]

_OWNER = "LBFGS"
# A pair whose curvature s . y is not clearly positive would make H indefinite: it is skipped (torch's rule).
_MIN_CURVATURE = 1e-10


class LBFGS(Optimizer):
    r"""Limited-memory BFGS with a strong Wolfe line search, for full-batch or macro-batch objectives.

    ``step(closure)`` follows the contract of :class:`torch.optim.LBFGS`: the closure clears the gradients,
    re-evaluates the loss at the current parameters, calls ``backward()`` and returns the loss. It promises what
    :class:`~lightning_twophase.ConjugateGradient` does: every step leaves the parameters finite and no worse than it
    found them, up to ``value_tolerance`` (a trial whose loss or gradient is not finite counts as failed and the step
    shrinks; a search that finds no decrease puts the parameters back and drops the history, so the next iteration is
    steepest descent in the geometry of ``D``); a non-finite loss or gradient where a step begins raises
    :class:`~lightning_twophase.NonFiniteObjectiveError` with the parameters untouched; a closure that raises leaves
    the parameters where the iteration began. Under ``torch.distributed`` the loss values it decides on are averaged
    across ranks (and with ``sharded=True`` its dot products summed), so every rank takes the same branches.

    Args:
        params: parameters or parameter groups, of one dtype and device; options are global (a group may not
            override them).
        lr: the step the line search tries first once there is a history (``1``: the quasi-Newton step); without
            one the first trial is ``lr * min(1, 1 / |g|_D)``.
        max_iter: iterations per ``step()`` call.
        history_size: how many ``(s, y)`` pairs the inverse-Hessian approximation remembers.
        max_evals: bound on closure calls per line search.
        tolerance_grad: stop (no move) when the gradient norm ``sqrt(g . D g)`` is at most this.
        tolerance_change: stop iterating within a ``step()`` call when the loss changes by less than this, or the step's
            length is at most this (torch's rules and defaults: a converged phase spends no more compute).
        c1: sufficient-decrease constant of the strong Wolfe conditions.
        c2: curvature constant (``0.9``, the usual choice for quasi-Newton methods: the unit step is mostly accepted).
        value_tolerance: Hager and Zhang's approximate Wolfe tolerance (see
            :class:`~lightning_twophase.ConjugateGradient`): near a minimum, where loss differences drown in rounding,
            a point within ``value_tolerance * |loss|`` of the start is accepted if the slopes show the decrease.
        preconditioner: optional fixed diagonal ``D`` of the initial inverse Hessian, one positive tensor per
            parameter in the order of the parameter groups; part of the optimizer state.
        sharded: whether each rank holds a different shard of the parameters (dot products are then summed).
        process_group: the process group for reductions; ``None``: the default group when one is initialized.

    Example::

        optimizer = LBFGS(model.parameters(), max_iter=20)

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            return loss

        for _ in range(10):
            optimizer.step(closure)

    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        max_iter: int = 20,
        history_size: int = 20,
        max_evals: int = 25,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        c1: float = 1e-4,
        c2: float = 0.9,
        value_tolerance: float = 1e-6,
        preconditioner: Sequence[Tensor] | None = None,
        sharded: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        defaults = {
            "lr": check_number(_OWNER, "lr", lr, minimum=0.0, strict=True),
            "max_iter": check_count(_OWNER, "max_iter", max_iter, 1),
            "history_size": check_count(_OWNER, "history_size", history_size, 1),
            "max_evals": check_count(_OWNER, "max_evals", max_evals, 1),
            "tolerance_grad": check_number(_OWNER, "tolerance_grad", tolerance_grad, minimum=0.0),
            "tolerance_change": check_number(_OWNER, "tolerance_change", tolerance_change, minimum=0.0),
            "c1": check_number(_OWNER, "c1", c1, 0.0, 1.0, strict=True),
            "c2": check_number(_OWNER, "c2", c2, 0.0, 1.0, strict=True),
            "value_tolerance": check_number(_OWNER, "value_tolerance", value_tolerance, 0.0, 1.0),
        }
        if not defaults["c1"] < defaults["c2"]:
            raise ValueError(f"{_OWNER}: need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}.")
        super().__init__(params, defaults)
        self.sharded = check_flag(_OWNER, "sharded", sharded)
        self._reduce = DecisionReducer(sharded, process_group)
        self._check_groups()
        self.diagnostics: StepDiagnostics | None = None
        if preconditioner is not None:
            self.set_preconditioner(preconditioner)

    @property
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _check_groups(self) -> None:
        for index, group in enumerate(self.param_groups):
            overridden = {key: group[key] for key in self.defaults if group[key] != self.defaults[key]}
            if overridden:
                raise ValueError(
                    f"{_OWNER} moves all parameters along one direction with one step, so options are global; "
                    f"parameter group {index} overrides {overridden}. Pass them to the constructor instead."
                )
        params = self._params
        if any(p.is_sparse for p in params):
            raise ValueError(f"{_OWNER} does not support sparse parameters.")
        if len({(p.dtype, p.device) for p in params}) > 1:
            raise ValueError(
                f"{_OWNER} keeps its history as flat vectors and needs parameters of one dtype and device, got "
                f"{sorted({f'{p.dtype} on {p.device}' for p in params})}."
            )

    def _global_state(self) -> dict[str, Any]:
        # As in torch.optim.LBFGS, what concerns all parameters lives in the first parameter's state, so that the
        # standard state_dict() / load_state_dict() carry it (the history included: resume is exact).
        state = self.state[self._params[0]]
        if "iterations" not in state:
            state.update(
                iterations=0, s_history=[], y_history=[], rhos=[], reset_reason="start", total_value_evaluations=0,
                total_gradient_evaluations=0, total_restarts=0, total_line_search_failures=0,
            )  # fmt: skip
        return state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add parameters (a layer unfrozen during training): the history spans other variables now and is dropped;
        a preconditioner, if set, covers the new parameters with ones."""
        super().add_param_group(param_group)
        self._check_groups()
        params = self._params
        if "iterations" in self.state.get(params[0], {}):
            self._reset(self._global_state(), "parameters_added")
            if "preconditioner" in self.state[params[0]]:
                for p in params:
                    self.state[p].setdefault("preconditioner", torch.ones_like(p))

    @property
    def preconditioner(self) -> list[Tensor] | None:
        """The diagonal ``D`` of the initial inverse Hessian, one tensor per parameter, or ``None``."""
        params = self._params
        if not params or "preconditioner" not in self.state[params[0]]:
            return None
        return [self.state[p]["preconditioner"] for p in params]

    @torch.no_grad()
    def set_preconditioner(self, preconditioner: Sequence[Tensor] | None) -> None:
        """Set (or with ``None`` remove) the diagonal ``D``; the history, built in the old geometry, is dropped.

        Args:
            preconditioner: one tensor per parameter, same shapes, all entries positive and finite.

        """
        params = self._params
        if preconditioner is None:
            for p in params:
                self.state[p].pop("preconditioner", None)
        else:
            for p, diagonal in zip(params, _checked_preconditioner(params, preconditioner)):
                self.state[p]["preconditioner"] = diagonal.detach().to(dtype=p.dtype, device=p.device).clone()
        self._reset(self._global_state(), "preconditioner_changed")

    @staticmethod
    def _reset(state: dict[str, Any], reason: str) -> None:
        if state["s_history"]:
            state["s_history"], state["y_history"], state["rhos"] = [], [], []
        state["reset_reason"] = reason

    @property
    def totals(self) -> dict[str, int]:
        """Cumulative counts since the optimizer was created (restored with its state); a restart is a dropped
        history."""
        state = self._global_state()
        return {
            "iterations": state["iterations"],
            "value_evaluations": state["total_value_evaluations"],
            "gradient_evaluations": state["total_gradient_evaluations"],
            "restarts": state["total_restarts"],
            "line_search_failures": state["total_line_search_failures"],
        }

    def _dot(self, a: Tensor, b: Tensor) -> float:
        if not self.sharded:  # replicated parameters: the dot is already global
            return torch.dot(a, b).item()
        return float(self._reduce.dots(torch.dot(a, b).double().reshape(1)))

    def _direction(self, state: dict[str, Any], grad: Tensor, diagonal: Tensor | None) -> Tensor:
        """``-H g`` by the two-loop recursion (Nocedal and Wright, Algorithm 7.4) with ``H0 = gamma D``."""
        s_history, y_history, rhos = state["s_history"], state["y_history"], state["rhos"]
        q = grad.neg()
        alphas = []
        for s, y, rho in zip(reversed(s_history), reversed(y_history), reversed(rhos)):
            alpha = rho * self._dot(s, q)
            q.add_(y, alpha=-alpha)
            alphas.append(alpha)
        if s_history:
            y = y_history[-1]
            gamma = self._dot(s_history[-1], y) / self._dot(y, y if diagonal is None else diagonal * y)
            q.mul_(gamma)
        if diagonal is not None:
            q.mul_(diagonal)
        for s, y, rho, alpha in zip(s_history, y_history, rhos, reversed(alphas)):
            q.add_(s, alpha=alpha - rho * self._dot(y, q))
        return q

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | float | None] | None = None) -> Tensor | float | None:  # type: ignore[override]
        """Perform up to ``max_iter`` L-BFGS iterations.

        Args:
            closure: re-evaluates the model: clears the gradients, computes the loss, calls ``backward()`` and
                returns the loss. Required.

        Returns:
            The loss returned by the first closure call (``None`` if it returned ``None``: nothing is changed).

        """
        if closure is None:
            raise RuntimeError(
                f"{_OWNER}.step() needs a closure that re-evaluates the loss and gradients at the current parameters: "
                "`optimizer.step(closure)`, as for torch.optim.LBFGS. Lightning's automatic optimization passes one."
            )
        closure = torch.enable_grad()(closure)
        options, params, state = self.defaults, self._params, self._global_state()
        preconditioner = self.preconditioner
        diagonal = None if preconditioner is None else _flat(preconditioner)
        first_loss = closure()
        if first_loss is None:
            return None
        gradient_evals, value0 = 1, self._reduce.mean(first_loss)
        grad = _flat(_gradients(params))
        if _dims_changed(state, grad):
            self._reset(state, "parameters_added")
        start_loss = value0
        start_grad_norm = math.nan
        summary: dict[str, Any] = {}
        start = [torch.empty_like(p) for p in params]
        for iteration in range(options["max_iter"]):
            gz = self._dot(grad, grad if diagonal is None else diagonal * grad)
            _check_finite_start(value0, gz, _OWNER)
            grad_norm = math.sqrt(gz)
            if iteration == 0:
                start_grad_norm = grad_norm
            if grad_norm <= options["tolerance_grad"]:
                summary = _summary(value0, 0.0, -gz, None, "not_run", iteration)
                break
            restart_reason = None if state["s_history"] else state["reset_reason"]
            direction = self._direction(state, grad, diagonal)
            slope = self._dot(grad, direction)
            if not slope < 0:  # rounding made H indefinite: steepest descent in D's geometry
                self._reset(state, "not_descent")
                restart_reason = "not_descent"
                direction = self._direction(state, grad, diagonal)
                slope = -gz
            if restart_reason is not None:
                state["total_restarts"] += 1
            first_step = options["lr"] if state["s_history"] else options["lr"] * min(1.0, 1.0 / grad_norm)
            torch._foreach_copy_(start, params)
            views = _views(direction, params)
            phi = _LineFunction(params, start, views, closure, None, self._reduce)
            value_noise = options["value_tolerance"] * abs(value0)
            try:
                result = ls.strong_wolfe(
                    phi, value0, slope, first_step, c1=options["c1"], c2=options["c2"],
                    max_evals=options["max_evals"], value_noise=value_noise,
                )  # fmt: skip
            except BaseException:
                torch._foreach_copy_(params, start)  # whatever the closure raised: back where the iteration began
                raise
            finally:
                gradient_evals += phi.gradient_evaluations
            state["iterations"] += 1
            if result.status == ls.FAILED:
                torch._foreach_copy_(params, start)
                rounding = max(value_noise, 4 * torch.finfo(params[0].dtype).eps * abs(value0))
                if restart_reason is None:  # a quasi-Newton direction failed: steepest descent gets a try
                    state["total_line_search_failures"] += 1
                    self._reset(state, "after_failure")
                    summary = _summary(value0, 0.0, slope, None, ls.FAILED, iteration + 1)
                    continue
                status = ls.PRECISION_LIMIT if _at_precision_limit(phi, value0, slope, rounding) else ls.FAILED
                state["total_line_search_failures"] += status == ls.FAILED
                summary = _summary(value0, 0.0, slope, restart_reason, status, iteration + 1)
                break
            _move_to(params, start, views, result.step)
            summary = _summary(result.value, result.step, slope, restart_reason, result.status, iteration + 1)
            if not (phi.last_with_gradient and phi.last_step == result.step):
                closure()  # the gradient at the accepted point
                gradient_evals += 1
            new_grad = _flat(_gradients(params))
            self._remember(state, direction.mul_(result.step), new_grad.sub(grad))
            moved = math.sqrt(self._dot(direction, direction))  # the step t d: the same on every rank
            converged = abs(result.value - value0) < options["tolerance_change"] or moved <= options["tolerance_change"]
            value0, grad = result.value, new_grad
            if converged:
                break
        state["total_gradient_evaluations"] += gradient_evals
        self.diagnostics = StepDiagnostics(
            loss=start_loss, grad_norm=start_grad_norm, value_evaluations=0, gradient_evaluations=gradient_evals,
            **summary,
        )  # fmt: skip
        return first_loss

    def _remember(self, state: dict[str, Any], s: Tensor, y: Tensor) -> None:
        """Keep the pair ``(s, y)`` if its curvature is positive, dropping the oldest beyond ``history_size``."""
        curvature = self._dot(s, y)
        if not curvature > _MIN_CURVATURE:
            return
        state["s_history"].append(s)
        state["y_history"].append(y)
        state["rhos"].append(1.0 / curvature)
        if len(state["s_history"]) > self.defaults["history_size"]:
            del state["s_history"][0], state["y_history"][0], state["rhos"][0]


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _views(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """``flat`` cut into tensors shaped like ``params`` (views: no copy)."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


def _dims_changed(state: dict[str, Any], grad: Tensor) -> bool:
    """Whether the history was built on another set of parameters (a checkpoint of another model)."""
    return bool(state["s_history"]) and state["s_history"][0].numel() != grad.numel()


def _summary(
    new_loss: float, step: float, slope: float, restart_reason: str | None, status: str, iterations: int
) -> dict[str, Any]:
    return {
        "new_loss": new_loss,
        "step_size": step,
        "beta": 0.0,
        "slope": slope,
        "restarted": restart_reason is not None,
        "restart_reason": restart_reason,
        "line_search_status": status,
        "iterations": iterations,
    }
