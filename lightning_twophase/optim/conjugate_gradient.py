"""Nonlinear conjugate gradient as a ``torch.optim.Optimizer`` that a Lightning Trainer can step.

One iteration: evaluate the loss and gradient ``g`` at ``x``; form the direction ``d = -P g + beta d_prev`` (``P`` is an
optional fixed diagonal preconditioner, the identity by default); search along ``d`` for a step ``t``; move to
``x + t d``. The direction formula (``beta``), the line search and the restart rule are selectable.

With a preconditioner every formula is the one of plain CG run on the rescaled variables ``u = P^(-1/2) x``, where
the gradient is ``P^(1/2) g`` and inner products ``a . b`` become ``a . P b``: the iterates are the same.

Memory: three parameter-sized buffers (the start point of the line search, the direction and the previous
preconditioned gradient), plus the preconditioner when one is set. Updates use ``torch._foreach_*`` kernels, so
there is no Python loop over elements, only over parameter tensors for dot products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_twophase.arguments import check_count, check_flag, check_number
from lightning_twophase.optim import line_search as ls
from lightning_twophase.optim.distributed import DecisionReducer

__all__ = ["BETA_FORMULAS", "LINE_SEARCHES", "ConjugateGradient", "NonFiniteObjectiveError", "StepDiagnostics"]

#: Canonical names of the direction-update (beta) formulas, with their short aliases.
BETA_FORMULAS: dict[str, str] = {
    "fletcher_reeves": "fletcher_reeves",
    "fr": "fletcher_reeves",
    "polak_ribiere": "polak_ribiere",
    "pr": "polak_ribiere",
    "polak_ribiere_plus": "polak_ribiere_plus",
    "pr+": "polak_ribiere_plus",
    "hestenes_stiefel": "hestenes_stiefel",
    "hs": "hestenes_stiefel",
    "dai_yuan": "dai_yuan",
    "dy": "dai_yuan",
    "hager_zhang": "hager_zhang",
    "hz": "hager_zhang",
}

#: The line searches; ``strong_wolfe`` evaluates gradients at trial points, the others only values.
LINE_SEARCHES: tuple[str, ...] = ("strong_wolfe", "armijo", "golden", "brent", "interpolation")

_DEFAULT_MAX_EVALS = {"strong_wolfe": 25, "armijo": 20, "golden": 40, "brent": 20, "interpolation": 20}
# Hager and Zhang's lower bound on beta: max(beta, -1 / (|d| min(eta, |g_prev|))).
_HAGER_ZHANG_ETA = 0.01
# Restart when the new direction's slope is not below this fraction of steepest descent's.
_SUFFICIENT_DESCENT = 1e-3
# Powell's restart test |g . g_prev| >= 0.2 |g|^2, on by default for the formulas that jam without it.
_POWELL_THRESHOLD = 0.2
_JAMMING_FORMULAS = frozenset({"fletcher_reeves", "dai_yuan"})
# The scalars of the whole optimizer (kept in the first parameter's state, as torch.optim.LBFGS does).
_INITIAL_GLOBAL_STATE: dict[str, Any] = {
    "iterations": 0,
    "iterations_since_restart": 0,
    "has_direction": False,
    "prev_step": None,
    "prev_slope": None,
    "prev_gz": None,
    "reset_reason": None,
    "total_value_evaluations": 0,
    "total_gradient_evaluations": 0,
    "total_restarts": 0,
    "total_line_search_failures": 0,
}


class NonFiniteObjectiveError(FloatingPointError):
    """The loss or the gradient at the point where a step starts is NaN or infinite."""


@dataclass(frozen=True)
class StepDiagnostics:
    """What one call of :meth:`ConjugateGradient.step` did.

    Attributes:
        loss: the objective where the step started.
        new_loss: the objective where the step ended (equal to ``loss`` if no move was made).
        grad_norm: the (preconditioned) gradient norm ``sqrt(g . P g)`` where the step started.
        step_size: the line search's step length ``t`` of the last iteration (``0.0`` if it failed).
        beta: the direction-update coefficient of the last iteration (``0.0`` on a restart).
        slope: the directional derivative ``g . d`` at the start of the last iteration (negative).
        value_evaluations: forward-only closure calls made by this step.
        gradient_evaluations: closure calls with gradients made by this step (the first one included).
        iterations: CG iterations made by this step (``max_iter`` unless it stopped early).
        restarted: whether the last iteration used the steepest-descent direction.
        restart_reason: why: ``"start"``, ``"periodic"``, ``"powell"``, ``"not_descent"``, ``"beta_not_finite"``,
            ``"after_failure"``, ``"preconditioner_changed"`` or ``"parameters_added"``; ``None`` if it did not restart.
        line_search_status: ``"converged"``, ``"max_evals"``, ``"failed"``, ``"precision_limit"`` (no decrease, but
            none the loss could resolve: converged to its precision) or ``"not_run"`` (the gradient tolerance was met).

    """

    loss: float
    new_loss: float
    grad_norm: float
    step_size: float
    beta: float
    slope: float
    value_evaluations: int
    gradient_evaluations: int
    iterations: int
    restarted: bool
    restart_reason: str | None
    line_search_status: str

    @property
    def failed(self) -> bool:
        """Whether the last line search failed: it found no decrease where one should have been resolvable (the
        parameters went back to where the step began). ``"precision_limit"`` is not a failure."""
        return self.line_search_status == ls.FAILED


class ConjugateGradient(Optimizer):
    r"""Nonlinear conjugate gradient with a line search, for full-batch or macro-batch objectives.

    ``step(closure)`` follows the contract of :class:`torch.optim.LBFGS`: the closure clears the gradients,
    re-evaluates the loss at the current parameters, calls ``backward()`` and returns the loss. Lightning's
    automatic optimization passes such a closure. An optional ``value_closure`` evaluates the loss only (no
    autograd graph); the value-only line searches use it for their trial points.

    Every step leaves the parameters finite and no worse than it found them (up to ``value_tolerance`` with the
    strong Wolfe search): a trial point whose loss or gradient is NaN or infinite counts as a failed trial (the step
    shrinks); if the line search finds no decrease, the
    parameters return to where the step began, the next direction is steepest descent and
    :attr:`diagnostics` reports the failure. A non-finite loss where a step begins raises
    :class:`NonFiniteObjectiveError` and leaves the parameters untouched. A closure that raises leaves the
    parameters where the step began.

    Under ``torch.distributed`` every scalar that drives a decision is reduced across ranks: loss values are
    averaged (each rank evaluates its own data shard), and with ``sharded=True`` dot products and norms are summed
    (each rank holds a shard of the parameters). Every rank then takes the same branches and makes the same number
    of closure calls; with replicated parameters (DDP) the parameters stay bitwise identical.

    Args:
        params: parameters or parameter groups. All groups are searched along one direction with one step length,
            so options are global: a group may not override them.
        lr: the length of the first trial step, ``lr * min(1, 1 / |g|)``, taken when there is no previous step
            to learn from. Later steps start from the previous step scaled by the ratio of slopes.
        beta: the direction-update formula: ``"fletcher_reeves"`` (``"fr"``), ``"polak_ribiere"`` (``"pr"``),
            ``"polak_ribiere_plus"`` (``"pr+"``, beta clipped at 0), ``"hestenes_stiefel"`` (``"hs"``),
            ``"dai_yuan"`` (``"dy"``) or ``"hager_zhang"`` (``"hz"``).
        line_search: ``"strong_wolfe"``, ``"armijo"``, ``"golden"`` (the paper's) or ``"brent"``.
        max_iter: CG iterations per ``step()`` call. Inside one call the gradient of the accepted point is reused
            where the line search computed it.
        max_evals: bound on closure calls per line search; ``None`` uses the search's default.
        restart_every: restart with steepest descent every this many iterations. Independently of it, the search
            restarts whenever the new direction is not a (sufficient) descent direction or ``beta`` is not finite.
        powell_restart: restart when successive gradients are far from orthogonal, ``|g . P g_prev| >= 0.2 g . P g``
            (Powell). ``None`` turns it on for Fletcher-Reeves and Dai-Yuan, which jam without it, and off for the
            others.
        tolerance_grad: stop (no move) when the gradient norm ``sqrt(g . P g)`` is at most this.
        tolerance_change: stop iterating within a ``step()`` call when the loss changes by less than this.
        c1: sufficient-decrease constant (strong Wolfe, Armijo).
        c2: curvature constant of the strong Wolfe conditions.
        line_search_tolerance: relative tolerance on the step of the golden-section and Brent searches.
        value_tolerance: Hager and Zhang's approximate Wolfe tolerance for the strong Wolfe search. Close to a
            minimum, loss differences drown in rounding error while slopes stay accurate: a trial point whose loss
            is within ``value_tolerance * |loss|`` of the starting loss is then accepted if the slopes show a
            sufficient decrease. ``0`` accepts only points whose loss is not above the starting loss.
        preconditioner: optional fixed diagonal preconditioner, one positive tensor per parameter in the order of
            the parameter groups. It becomes part of the optimizer state (saved and restored with it).
        sharded: whether each rank holds a different shard of the parameters (dot products are then summed
            across ranks). Leave ``False`` for replicated parameters (DDP).
        process_group: the process group for reductions; ``None`` means the default group when one is initialized.

    Example::

        optimizer = ConjugateGradient(model.parameters(), beta="pr+", line_search="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            return loss

        for _ in range(100):
            optimizer.step(closure)

    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        beta: str = "polak_ribiere_plus",
        line_search: str = "strong_wolfe",
        max_iter: int = 1,
        max_evals: int | None = None,
        restart_every: int | None = None,
        powell_restart: bool | None = None,
        tolerance_grad: float = 1e-10,
        tolerance_change: float = 1e-12,
        c1: float = 1e-4,
        c2: float = 0.1,
        line_search_tolerance: float = 1e-2,
        value_tolerance: float = 1e-6,
        preconditioner: Sequence[Tensor] | None = None,
        sharded: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        defaults = _checked_options(
            {
                "lr": lr,
                "beta": beta,
                "line_search": line_search,
                "max_iter": max_iter,
                "max_evals": max_evals,
                "restart_every": restart_every,
                "powell_restart": powell_restart,
                "tolerance_grad": tolerance_grad,
                "tolerance_change": tolerance_change,
                "c1": c1,
                "c2": c2,
                "line_search_tolerance": line_search_tolerance,
                "value_tolerance": value_tolerance,
            }
        )
        super().__init__(params, defaults)
        _check_groups(self.param_groups, defaults)
        self.sharded = check_flag("ConjugateGradient", "sharded", sharded)
        self.process_group = process_group
        self._reduce = DecisionReducer(sharded, process_group)
        self._start_point: list[Tensor] | None = None
        self.diagnostics: StepDiagnostics | None = None
        if preconditioner is not None:
            self.set_preconditioner(preconditioner)

    @property
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _global_state(self) -> dict[str, Any]:
        # Like torch.optim.LBFGS, scalars that concern all parameters live in the first parameter's state, so that
        # the standard state_dict() / load_state_dict() carry them.
        state = self.state[self._params[0]]
        if "iterations" not in state:
            state.update(_INITIAL_GLOBAL_STATE)
        return state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add parameters (a layer unfrozen during training); the next iteration restarts with steepest descent, and a
        preconditioner, if set, covers the new parameters with ones."""
        super().add_param_group(param_group)
        _check_groups(self.param_groups[-1:], self.defaults)
        if "iterations" in self.state.get(self._params[0], {}):
            _include_new_parameters(self.state, self._params)

    @property
    def preconditioner(self) -> list[Tensor] | None:
        """The diagonal preconditioner, one tensor per parameter, or ``None``."""
        params = self._params
        if not params or "preconditioner" not in self.state[params[0]]:
            return None
        return [self.state[p]["preconditioner"] for p in params]

    @torch.no_grad()
    def set_preconditioner(self, preconditioner: Sequence[Tensor] | None) -> None:
        """Set (or with ``None`` remove) the fixed diagonal preconditioner.

        The search restarts with the preconditioned steepest-descent direction, since directions built in another
        geometry are not conjugate in the new one.

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
        state = self._global_state()
        if state["has_direction"]:
            state.update(has_direction=False, reset_reason="preconditioner_changed")

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor | float | None] | None = None,
        value_closure: Callable[[], Tensor | float] | None = None,
    ) -> Tensor | float | None:
        """Perform ``max_iter`` conjugate-gradient iterations.

        Args:
            closure: re-evaluates the model: clears the gradients, computes the loss, calls ``backward()`` and
                returns the loss. Required.
            value_closure: optional; returns the loss at the current parameters without computing gradients. Used
                by the value-only line searches for their trial points; without it they call ``closure``.

        Returns:
            The loss returned by the first closure call (``None`` if the closure returned ``None``, in which case
            nothing is changed).

        """
        if closure is None:
            raise RuntimeError(
                "ConjugateGradient.step() needs a closure that re-evaluates the loss and gradients at the current "
                "parameters: `optimizer.step(closure)`, as for torch.optim.LBFGS. Lightning's automatic "
                "optimization passes one."
            )
        closure = torch.enable_grad()(closure)
        options = self.param_groups[0]
        params = self._params
        state = self._global_state()
        preconditioner = self.preconditioner
        max_evals: int = options["max_evals"]

        value_evals = gradient_evals = 0
        first_loss = closure()
        gradient_evals += 1
        if first_loss is None:
            return None
        value0 = self._reduce.mean(first_loss)

        diagnostics: dict[str, Any] = {}
        start_loss = value0
        start_grad_norm = math.nan
        for iteration in range(options["max_iter"]):
            grads = _gradients(params)
            direction = _buffers(self.state, params, "direction")
            prev_pgrad = _buffers(self.state, params, "prev_pgrad")
            with_direction_norm = options["beta"] == "hager_zhang" and state["has_direction"]
            dots = _iteration_dots(grads, prev_pgrad, direction, preconditioner, with_direction_norm, self._reduce)
            gz, gzp, gd = dots[0], dots[1], dots[2]
            _check_finite_start(value0, gz)
            grad_norm = math.sqrt(gz)
            if iteration == 0:
                start_grad_norm = grad_norm
            value_noise = options["value_tolerance"] * abs(value0)
            rounding = max(value_noise, 4 * torch.finfo(params[0].dtype).eps * abs(value0))
            converged_at = state.get("precision_limit_at")
            # At the gradient tolerance, or back at the point where steepest descent could resolve no decrease (the
            # same point gives the same search): nothing to do.
            repeated = converged_at is not None and abs(value0 - converged_at) <= rounding
            if grad_norm <= options["tolerance_grad"] or repeated:
                status = ls.PRECISION_LIMIT if repeated else "not_run"
                diagnostics = dict(
                    new_loss=value0, step_size=0.0, beta=0.0, slope=-gz, restarted=False, restart_reason=None,
                    line_search_status=status, iterations=iteration,
                )  # fmt: skip
                break

            beta, slope, restart_reason = _direction_coefficients(state, options, gz, gzp, gd, dots)
            _update_direction(direction, prev_pgrad, grads, preconditioner, beta)  # beta = 0 on restarts

            initial_step = _initial_step(state, options["lr"], slope, grad_norm)
            if self._start_point is None or len(self._start_point) != len(params):
                self._start_point = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
            start = self._start_point
            torch._foreach_copy_(start, params)

            phi = _LineFunction(params, start, direction, closure, value_closure, self._reduce)
            try:
                result = _search(phi, options, value0, slope, initial_step, max_evals, value_noise)
            except BaseException:
                # Whatever the closure raised, leave the parameters where the step began.
                torch._foreach_copy_(params, start)
                raise
            finally:
                value_evals += phi.value_evaluations
                gradient_evals += phi.gradient_evaluations

            if result.status == ls.FAILED:
                torch._foreach_copy_(params, start)
                if _at_precision_limit(phi, value0, slope, rounding):
                    result = ls.LineSearchResult(0.0, value0, None, result.evaluations, ls.PRECISION_LIMIT)
            else:
                _move_to(params, start, direction, result.step)
            _advance_state(state, result, slope, gz, restart_reason)
            # Steepest descent finding nothing resolvable is final for this point (a CG direction gets one more try).
            limited = result.status == ls.PRECISION_LIMIT and restart_reason is not None
            state["precision_limit_at"] = value0 if limited else None
            diagnostics = dict(
                new_loss=result.value, step_size=result.step, beta=beta, slope=slope,
                restarted=restart_reason is not None, restart_reason=restart_reason,
                line_search_status=result.status, iterations=iteration + 1,
            )  # fmt: skip
            if result.status in (ls.FAILED, ls.PRECISION_LIMIT) or iteration + 1 == options["max_iter"]:
                break
            if abs(result.value - value0) < options["tolerance_change"]:
                break
            # Next iteration: reuse the gradient if the last trial was the accepted point, else re-evaluate.
            value0 = result.value
            if not (phi.last_with_gradient and phi.last_step == result.step):
                loss = closure()
                gradient_evals += 1
                value0 = self._reduce.mean(loss) if loss is not None else value0

        state["total_value_evaluations"] += value_evals
        state["total_gradient_evaluations"] += gradient_evals
        self.diagnostics = StepDiagnostics(
            loss=start_loss,
            grad_norm=start_grad_norm,
            value_evaluations=value_evals,
            gradient_evaluations=gradient_evals,
            **diagnostics,
        )
        return first_loss

    @property
    def totals(self) -> dict[str, int]:
        """Cumulative counts since the optimizer was created (restored with its state)."""
        state = self._global_state()
        return {
            "iterations": state["iterations"],
            "value_evaluations": state["total_value_evaluations"],
            "gradient_evaluations": state["total_gradient_evaluations"],
            "restarts": state["total_restarts"],
            "line_search_failures": state["total_line_search_failures"],
        }


def _ratio(numerator: float, denominator: float) -> float:
    # A zero denominator gives a non-finite beta, which triggers a restart.
    return numerator / denominator if denominator != 0 else math.nan


def _beta(
    formula: str, *, gz: float, prev_gz: float, y_pg: float, d_y: float, gzp: float, gd: float, dots: list[float]
) -> float:
    """The direction-update coefficient, in the geometry of the preconditioner.

    ``gz = g . P g``, ``prev_gz = g_prev . P g_prev``, ``y_pg = y . P g``, ``d_y = d_prev . y``,
    ``gzp = g . P g_prev``, ``gd = g . d_prev`` and ``dots[3] = |d_prev|^2`` (Hager-Zhang only), ``y = g - g_prev``.
    """
    if formula == "fletcher_reeves":
        return _ratio(gz, prev_gz)
    if formula == "polak_ribiere":
        return _ratio(y_pg, prev_gz)
    if formula == "polak_ribiere_plus":
        return max(0.0, _ratio(y_pg, prev_gz))
    if formula == "hestenes_stiefel":
        return _ratio(y_pg, d_y)
    if formula == "dai_yuan":
        return _ratio(gz, d_y)
    # Hager-Zhang: beta = (y - 2 d |y|^2 / d.y) . g / d.y, bounded below by -1 / (|d| min(eta, |g_prev|)).
    y_py = gz - 2.0 * gzp + prev_gz
    beta = _ratio(y_pg, d_y) - 2.0 * _ratio(y_py * gd, d_y * d_y)
    lower = _ratio(-1.0, math.sqrt(max(dots[3], 0.0)) * min(_HAGER_ZHANG_ETA, math.sqrt(max(prev_gz, 0.0))))
    return max(beta, lower) if math.isfinite(lower) else beta


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options with the formula's canonical name and the search's default ``max_evals``, after checking each
    (an error names the option and its valid range)."""
    owner = "ConjugateGradient"
    beta, line_search = options["beta"], options["line_search"]
    check_number(owner, "lr", options["lr"], minimum=0.0, strict=True)
    beta_name = BETA_FORMULAS.get(str(beta).lower())
    if beta_name is None:
        raise ValueError(
            f"ConjugateGradient: unknown `beta={beta!r}`. Choose one of {sorted(set(BETA_FORMULAS.values()))} "
            f"or their aliases {sorted(k for k in BETA_FORMULAS if k not in BETA_FORMULAS.values())}."
        )
    if line_search not in LINE_SEARCHES:
        raise ValueError(f"ConjugateGradient: unknown `line_search={line_search!r}`. Choose one of {LINE_SEARCHES}.")
    counts = {name: check_count(owner, name, options[name], 1, name != "max_iter") for name in _COUNTS}
    if options["powell_restart"] is not None:
        check_flag(owner, "powell_restart", options["powell_restart"])
    for name in ("tolerance_grad", "tolerance_change"):
        check_number(owner, name, options[name], minimum=0.0)
    c1 = check_number(owner, "c1", options["c1"], 0.0, 1.0, strict=True)
    c2 = check_number(owner, "c2", options["c2"], 0.0, 1.0, strict=True)
    if line_search == "strong_wolfe" and not c1 < c2:  # type: ignore[operator]
        raise ValueError(f"ConjugateGradient: need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}.")
    value_tolerance = check_number(owner, "value_tolerance", options["value_tolerance"], 0.0, 1.0)
    if value_tolerance == 1.0:
        raise ValueError(f"ConjugateGradient: `value_tolerance` must lie in [0, 1), got {value_tolerance}.")
    check_number(owner, "line_search_tolerance", options["line_search_tolerance"], 0.0, 1.0, strict=True)
    max_evals = counts["max_evals"] if counts["max_evals"] is not None else _DEFAULT_MAX_EVALS[line_search]
    return {**options, **counts, "beta": beta_name, "max_evals": max_evals}


#: The options that count something (``max_iter`` is required, the others may be ``None``).
_COUNTS = ("max_iter", "max_evals", "restart_every")


# ----------------------------------------------------------------------------------------------------------------
# The pieces of an iteration
# ----------------------------------------------------------------------------------------------------------------


def _gradients(params: list[Tensor]) -> list[Tensor]:
    grads = []
    for p in params:
        if p.grad is None:
            grads.append(torch.zeros_like(p))
        elif p.grad.is_sparse:
            raise RuntimeError("ConjugateGradient does not support sparse gradients.")
        else:
            grads.append(p.grad)
    return grads


def _local_dot(a: list[Tensor], b: list[Tensor], weight: list[Tensor] | None = None) -> Tensor:
    """``sum_i a_i . (w_i * b_i)`` over parameter tensors, accumulated in at least float32."""
    parts = []
    device = a[0].device
    for index, (x, y) in enumerate(zip(a, b)):
        if weight is not None:
            y = y * weight[index]
        x, y = x.reshape(-1), y.reshape(-1)
        if x.dtype in (torch.float16, torch.bfloat16):
            x, y = x.float(), y.float()
        parts.append(torch.dot(x, y).to(device=device, dtype=torch.float64))
    return torch.stack(parts).sum()


def _move_to(params: list[Tensor], start: list[Tensor], direction: list[Tensor], step: float) -> None:
    # Always rebuilt from the start point, so a point is reproduced bitwise whenever it is revisited.
    torch._foreach_copy_(params, start)
    if step != 0.0:
        torch._foreach_add_(params, direction, alpha=step)


class _LineFunction:
    """The objective along ``direction`` from ``start``: ``phi(t, need_derivative)`` for the line searches.

    It counts its evaluations and remembers what the step needs afterwards: whether the last evaluation computed a
    gradient (reused by the next iteration) and, to tell convergence from failure, the finite trial closest to the
    start and whether any trial was not finite.
    """

    def __init__(
        self,
        params: list[Tensor],
        start: list[Tensor],
        direction: list[Tensor],
        closure: Callable[[], Tensor | float | None],
        value_closure: Callable[[], Tensor | float] | None,
        reduce: DecisionReducer,
    ) -> None:
        self.params, self.start, self.direction = params, start, direction
        self.closure, self.value_closure = closure, value_closure
        self.reduce = reduce
        self.value_evaluations = self.gradient_evaluations = 0
        self.last_step: float | None = None
        self.last_with_gradient = False
        self.nearest: tuple[float, float] | None = None  # (step, value)
        self.non_finite = False
        self.trials: list[tuple[float, float]] = []  # (step, value) of every trial

    def __call__(self, t: float, need_derivative: bool) -> ls.Trial:
        trial = self._evaluate(t, need_derivative)
        self.trials.append((t, trial.value))
        if not (math.isfinite(trial.value) and (trial.derivative is None or math.isfinite(trial.derivative))):
            self.non_finite = True
        elif self.nearest is None or t < self.nearest[0]:
            self.nearest = (t, trial.value)
        return trial

    def _evaluate(self, t: float, need_derivative: bool) -> ls.Trial:
        _move_to(self.params, self.start, self.direction, t)
        self.last_step, self.last_with_gradient = t, False
        if need_derivative or self.value_closure is None:
            loss = self.closure()
            self.gradient_evaluations += 1
            if loss is None:
                raise RuntimeError("ConjugateGradient: the closure returned None at a line-search trial point.")
            local_slope = _local_dot(_gradients(self.params), self.direction).reshape(1)
            value = self.reduce.mean(loss)
            slope = self.reduce.dots(local_slope)
            self.last_with_gradient = True
            return ls.Trial(value, float(slope.item()))
        with torch.no_grad():
            loss = self.value_closure()
        self.value_evaluations += 1
        return ls.Trial(self.reduce.mean(loss), None)


def _direction_coefficients(
    state: dict[str, Any], options: dict[str, Any], gz: float, gzp: float, gd: float, dots: list[float]
) -> tuple[float, float, str | None]:
    """Return ``(beta, slope, restart_reason)`` for the new direction ``beta d_prev - P g``."""
    if not state["has_direction"]:
        return 0.0, -gz, state.get("reset_reason") or "start"
    restart_every = options["restart_every"]
    if restart_every is not None and state["iterations_since_restart"] >= restart_every:
        return 0.0, -gz, "periodic"
    powell = options["powell_restart"]
    if powell is None:
        powell = options["beta"] in _JAMMING_FORMULAS
    if powell and abs(gzp) >= _POWELL_THRESHOLD * gz:
        # Successive gradients far from orthogonal: the directions have lost conjugacy (Powell, 1977).
        return 0.0, -gz, "powell"
    prev_gz, prev_slope = state["prev_gz"], state["prev_slope"]
    # y = g - g_prev; in the rescaled variables y . P g = gz - gzp and d_prev . y = gd - prev_slope.
    y_pg = gz - gzp
    d_y = gd - prev_slope
    beta = _beta(options["beta"], gz=gz, prev_gz=prev_gz, y_pg=y_pg, d_y=d_y, gzp=gzp, gd=gd, dots=dots)
    if not math.isfinite(beta):
        return 0.0, -gz, "beta_not_finite"
    slope = beta * gd - gz
    if not slope < -_SUFFICIENT_DESCENT * gz:
        return 0.0, -gz, "not_descent"
    return beta, slope, None


def _initial_step(state: dict[str, Any], lr: float, slope: float, grad_norm: float) -> float:
    prev_step, prev_slope = state["prev_step"], state["prev_slope"]
    if prev_step is not None and prev_slope is not None:
        # Assume the first-order change is the same as in the previous iteration (Nocedal & Wright, 3.60).
        guess = prev_step * prev_slope / slope
        if math.isfinite(guess) and guess > 0:
            return guess
    return lr * min(1.0, 1.0 / grad_norm)


def _search(
    phi: ls.Phi,
    options: dict[str, Any],
    value0: float,
    slope: float,
    initial_step: float,
    max_evals: int,
    value_noise: float,
) -> ls.LineSearchResult:
    name = options["line_search"]
    if name == "strong_wolfe":
        return ls.strong_wolfe(
            phi,
            value0,
            slope,
            initial_step,
            c1=options["c1"],
            c2=options["c2"],
            max_evals=max_evals,
            value_noise=value_noise,
        )
    if name == "armijo":
        return ls.armijo(phi, value0, slope, initial_step, c1=options["c1"], max_evals=max_evals)
    if name == "interpolation":
        tolerance = options["line_search_tolerance"]
        return ls.interpolation(
            phi, value0, slope, initial_step, tolerance=tolerance, c1=options["c1"], max_evals=max_evals
        )
    if name == "golden":
        return ls.golden_section(
            phi, value0, slope, initial_step, tolerance=options["line_search_tolerance"], max_evals=max_evals
        )
    return ls.brent(phi, value0, slope, initial_step, tolerance=options["line_search_tolerance"], max_evals=max_evals)


def _check_finite_start(value0: float, gz: float, owner: str = "ConjugateGradient") -> None:
    if not (math.isfinite(value0) and math.isfinite(gz)):
        what = "loss" if not math.isfinite(value0) else "gradient"
        raise NonFiniteObjectiveError(
            f"{owner}: the {what} is not finite where the step starts (loss {value0}, squared "
            f"gradient norm {gz}); the parameters were left unchanged. Check the data and the model for "
            "overflow, or start the second phase from a point where the loss is finite."
        )


def _iteration_dots(
    grads: list[Tensor],
    prev_pgrad: list[Tensor],
    direction: list[Tensor],
    preconditioner: list[Tensor] | None,
    with_direction_norm: bool,
    reduce: DecisionReducer,
) -> list[float]:
    """``[g . P g, g . P g_prev, g . d_prev]`` (and ``|d_prev|^2`` in the rescaled variables, for Hager-Zhang), with
    one host synchronisation (and one all-reduce when the parameters are sharded)."""
    pairs: list[tuple[list[Tensor], list[Tensor], list[Tensor] | None]] = [
        (grads, grads, preconditioner),
        (grads, prev_pgrad, None),
        (grads, direction, None),
    ]
    if with_direction_norm:
        inverse = None if preconditioner is None else torch._foreach_reciprocal(preconditioner)
        pairs.append((direction, direction, inverse))
    return reduce.dots(torch.stack([_local_dot(a, b, w) for a, b, w in pairs])).tolist()


def _update_direction(
    direction: list[Tensor],
    prev_pgrad: list[Tensor],
    grads: list[Tensor],
    preconditioner: list[Tensor] | None,
    beta: float,
) -> None:
    """``d = beta d_prev - P g`` in place (``beta = 0``: steepest descent); then remember ``P g`` for the next beta."""
    if beta == 0.0:
        torch._foreach_zero_(direction)
    else:
        torch._foreach_mul_(direction, beta)
    if preconditioner is None:
        torch._foreach_sub_(direction, grads)
        torch._foreach_copy_(prev_pgrad, grads)
    else:
        torch._foreach_addcmul_(direction, preconditioner, grads, value=-1.0)
        torch._foreach_copy_(prev_pgrad, grads)
        torch._foreach_mul_(prev_pgrad, preconditioner)


def _at_precision_limit(phi: _LineFunction, value0: float, slope: float, rounding: float) -> bool:
    """Whether a failed search only failed because the loss cannot resolve a decrease from the start.

    Near a minimum the possible decrease sinks below the loss's rounding: that is convergence, and a caller must not
    treat it as the CG phase failing (the callback would fall back to Adam). The signature: every trial finite, and
    at the shortest one both the first-order decrease and the change the loss showed are below the rounding.
    """
    nearest = phi.nearest
    # A loss computed too coarsely to show small changes (it repeated phi(0) exactly) resolves no finer than the
    # smallest change it did show.
    rounding = max(rounding, ls.value_resolution(value0, phi.trials))
    return (
        not phi.non_finite
        and nearest is not None
        and -slope * nearest[0] <= rounding
        and abs(nearest[1] - value0) <= rounding
    )


def _advance_state(
    state: dict[str, Any], result: ls.LineSearchResult, slope: float, gz: float, restart_reason: str | None
) -> None:
    """Record one finished iteration in the optimizer's global state."""
    if result.status == ls.FAILED:
        # The next direction is steepest descent.
        state["has_direction"] = False
        state["reset_reason"] = "after_failure"
        state["total_line_search_failures"] += 1
    elif result.status != ls.PRECISION_LIMIT:
        state["has_direction"] = True
        state["prev_step"] = result.step
        state["prev_slope"] = slope
    else:
        state["has_direction"] = False
        state["reset_reason"] = "after_failure"
    state["prev_gz"] = gz
    state["iterations"] += 1
    if restart_reason is not None:
        state["iterations_since_restart"] = 0
        state["total_restarts"] += 1
    state["iterations_since_restart"] += 1


def _checked_preconditioner(params: list[Tensor], preconditioner: Sequence[Tensor]) -> list[Tensor]:
    """The preconditioner as a list, after checking it has one positive, finite tensor of the right shape per
    parameter."""
    preconditioner = list(preconditioner)
    if len(preconditioner) != len(params):
        raise ValueError(
            f"ConjugateGradient: the preconditioner has {len(preconditioner)} tensors for {len(params)} "
            "parameters; pass one tensor per parameter, in the order of the parameter groups."
        )
    for index, (p, diagonal) in enumerate(zip(params, preconditioner)):
        if diagonal.shape != p.shape:
            raise ValueError(
                f"ConjugateGradient: preconditioner tensor {index} has shape {tuple(diagonal.shape)}, "
                f"its parameter {tuple(p.shape)}."
            )
        if not bool(torch.isfinite(diagonal).all()) or not bool((diagonal > 0).all()):
            raise ValueError(
                f"ConjugateGradient: preconditioner tensor {index} must be positive and finite everywhere."
            )
    return preconditioner


def _check_groups(param_groups: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
    for index, group in enumerate(param_groups):
        overridden = {key: group[key] for key in defaults if group[key] != defaults[key]}
        if overridden:
            raise ValueError(
                "ConjugateGradient searches all parameters along one direction with one step, so options are "
                f"global; parameter group {index} overrides {overridden}. Pass them to the constructor instead."
            )
        if any(p.is_sparse for p in group["params"]):
            raise ValueError("ConjugateGradient does not support sparse parameters.")


def _include_new_parameters(state: dict[Tensor, dict[str, Any]], params: list[Tensor]) -> None:
    """After parameters were added: restart the directions (they span other variables now), and give the new
    parameters a preconditioner of ones if the others have one."""
    global_state = state[params[0]]
    if global_state["has_direction"]:
        global_state.update(has_direction=False, reset_reason="parameters_added")
    if "preconditioner" in global_state:
        for p in params:
            state[p].setdefault("preconditioner", torch.ones_like(p))


def _buffers(state: dict[Tensor, dict[str, Any]], params: list[Tensor], name: str) -> list[Tensor]:
    """The per-parameter buffer ``name`` of every parameter, created as zeros where missing."""
    for p in params:
        if name not in state[p]:
            state[p][name] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return [state[p][name] for p in params]
