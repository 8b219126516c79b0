"""Let Lightning step a closure optimizer once per macro-batch, on the macro-batch's exact mean loss (private).

The CG phase's optimizer as the Trainer sees it. Lightning still calls ``step(closure)`` once per mini-batch, so the
progress bar, ``training_step``'s logging, validation and checkpointing all work as usual. Each call runs the training
loop's own forward and backward pass for the current batch (which the CG phase supplies), with the gradient kept
rank-local; the batch's loss and gradient are added up (weighted by batch size) and the batch is kept (the gradient as
backward accumulates it, before any hook or clipping changes it). After the last batch of the macro-batch
(``batches_per_step`` batches, or the rest of the epoch) the sums are added up across ranks and the wrapped optimizer
takes one step on :class:`~lightning_twophase.objective.TrainingObjective`: its start point
is known from the accumulated pass, and its line search evaluates trial points on the kept batches. Each such step
hands one :class:`MacroBatchStep` to the CG phase, with what the CG phase's checks need whatever the optimizer (the
loss where the step started and the norm of the macro-batch's gradient there): the same check path for
``ConjugateGradient`` and for any optimizer a factory builds (the callback's ``optimizer``). A start that is not
finite is never stepped on, and a step that leaves non-finite weights is undone.

Under loss scaling (16-mixed with a GradScaler) the loop's passes give scaled gradients: their sums are unscaled once
added up across ranks, and if they overflowed the start point's gradient is evaluated again at a lowered scale by the
objective (:mod:`lightning_twophase._scaling`). No batch of the macro-batch is left out.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.optim import Optimizer

from lightning_twophase.objective import TrainingObjective
from lightning_twophase.optim.conjugate_gradient import ConjugateGradient, NonFiniteObjectiveError, StepDiagnostics
from lightning_twophase.optim.lbfgs import LBFGS

__all__ = ["MacroBatchStep"]  # the adapter itself is private to the CG phase

#: ``current_batch()``: the batch the next ``step()`` belongs to, its index, and whether it is the epoch's last.
BatchSource = Callable[[], tuple[Any, int, bool]]


@dataclass(frozen=True)
class MacroBatchStep:
    """What one step on a macro-batch did.

    Attributes:
        loss: the mean loss over the macro-batch (of every rank) where the step started, from the training loop's
            own pass.
        grad_norm: the norm of the mean gradient over the macro-batch there.
        failed: whether the step made no progress: its line search failed (``ConjugateGradient``), or it left
            non-finite weights, which were put back.
        diagnostics: the wrapped optimizer's diagnostics, if it keeps any (``ConjugateGradient`` does): extras.
        non_finite: why no step was taken, if the loss or gradient where it would have started was not finite (the
            parameters are unchanged).
        non_finite_batches: indices of the batches (on this rank) whose loss was not finite.
        forward_samples: samples passed forward for the macro-batch, over all ranks: the training loop's passes and
            the trial evaluations.
        backward_samples: samples passed backward, over all ranks.
        decay: the weight-decay term of the objective where the step started: the wrapped optimizer minimised
            ``loss + decay`` (``0.0`` without weight decay).
        start_samples: samples of the training loop's own pass (forward and backward), over all ranks: what measuring
            ``loss`` cost.

    """

    loss: float
    grad_norm: float
    failed: bool
    diagnostics: StepDiagnostics | None
    non_finite: str | None
    non_finite_batches: list[int]
    forward_samples: int
    backward_samples: int
    decay: float = 0.0
    start_samples: int = 0


class _MacroBatchOptimizer(Optimizer):
    """Accumulate mini-batches into a macro-batch and step ``optimizer`` once per macro-batch.

    Which parameters a step trains is decided when it is taken: those of the optimizer's groups that require grad at
    that moment and are not ``excluded``; the others are held where they are, at every trial point too, whatever the
    wrapped optimizer's state says (a direction built while they were trained, say), as Adam in the loop would leave
    a frozen layer alone. Each batch's gradient is taken as backward accumulates it, before Lightning's and the
    module's hooks (``on_after_backward``, ``on_before_optimizer_step``, ``configure_gradient_clipping``) can change
    it: the start is the macro-batch's exact, unclipped mean gradient. A parameter that began to require grad after
    the macro-batch's first batch lacks the earlier batches' gradients: the start's gradient is then evaluated again
    on the kept batches.

    Args:
        optimizer: a closure optimizer (:class:`~lightning_twophase.ConjugateGradient`, or e.g. ``torch.optim.LBFGS``).
            If its ``step`` accepts ``value_closure``, value-only line-search trials run forward passes only.
        objective: evaluates the loss (and gradient) on the kept batches.
        current_batch: supplies the batch each ``step()`` call belongs to.
        on_step: receives the result of every macro-batch step.
        batches_per_step: mini-batches per macro-batch; ``None`` means the whole epoch (full-batch, the paper's CG).
        loop_pass: a context for the training loop's own pass, in which its backward leaves the gradient rank-local
            (DDP's ``no_sync``): the sums are added up across ranks once per macro-batch instead.
        on_params_added: told of parameters added to the optimizer after the swap (the fallback's optimizer must
            know them too).
        warn: how to warn (rank zero only, in a Trainer).
        excluded: parameters of the groups that are never trained (a first-optimizer group with ``lr=0``).
        weight_decay: per parameter, the coefficient ``c`` (a number, or a tensor shaped like the parameter) of the
            term ``0.5 * sum(c * p**2)`` that the steps add to the objective (the first optimizer's weight decay).
            The steps' reported loss is the objective's without it (the loss ``training_step`` returns); their
            gradient norm is that of the objective the optimizer minimises.

    """

    def __init__(
        self,
        optimizer: Optimizer,
        objective: TrainingObjective,
        current_batch: BatchSource,
        on_step: Callable[[MacroBatchStep], None],
        batches_per_step: int | None = None,
        loop_pass: Callable[[], AbstractContextManager[Any]] = nullcontext,
        on_params_added: Callable[[list[Tensor]], None] = lambda params: None,
        warn: Callable[[str], None] = warnings.warn,
        excluded: Iterable[Tensor] = (),
        weight_decay: Mapping[Tensor, float | Tensor] | None = None,
    ) -> None:
        if batches_per_step is not None and batches_per_step < 1:
            raise ValueError(f"`batches_per_step` must be at least 1 or None, got {batches_per_step}.")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        super().__init__(params, {})
        # Share the wrapped optimizer's groups and state: schedulers, monitors and checkpoints see the real ones.
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self.optimizer = optimizer
        self.objective = objective
        self.batches_per_step = batches_per_step
        self._current_batch = current_batch
        self._on_step = on_step
        self._loop_pass = loop_pass
        self._on_params_added = on_params_added
        self._warn = warn
        self._accepts_value_closure = "value_closure" in inspect.signature(optimizer.step).parameters
        #: Parameters of the groups that no step trains.
        self.excluded: set[Tensor] = set(excluded)
        #: Per parameter, the coefficient of ``0.5 * c * p**2`` in the objective the steps minimise.
        self.weight_decay: dict[Tensor, float | Tensor] = dict(weight_decay or {})
        # Per parameter, the size-weighted sum of the loop's gradients over the macro-batch (kept between steps).
        self._sums: dict[Tensor, Tensor] = {}
        # The parameters that required grad at every loop pass of the macro-batch so far: their sums are complete.
        self._covered: set[Tensor] = set()
        self._hooks: dict[Tensor, Any] = {}
        self._size = 0  # the size of the batch whose loop pass runs now; 0 outside the loop's passes
        self._loss_sum: Tensor | None = None
        self._finite: list[tuple[int, Tensor]] = []  # (batch_idx, whether its loss was finite), read once per step
        # The package's optimizers promise finite weights after every step; other optimizers' steps are checked.
        self._guard_weights = not isinstance(optimizer, (ConjugateGradient, LBFGS))
        #: Macro-batch steps taken (also the iteration counter of the random seeds; saved with the state).
        self.steps = 0

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def trained_params(self) -> list[Tensor]:
        """The parameters a step taken now trains: those of the groups that require grad and are not excluded."""
        return [p for p in self._all_params() if p.requires_grad and p not in self.excluded]

    def discard(self) -> None:
        """Drop a partly accumulated macro-batch (the epoch ended early, or training was interrupted)."""
        self.objective.clear()
        self._loss_sum = None
        self._finite.clear()
        self._covered = set()
        if self._sums:
            torch._foreach_zero_(list(self._sums.values()))

    def close(self) -> None:
        """Drop a partly accumulated macro-batch and stop taking gradients from the loop's passes."""
        self.discard()
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Run the training loop's pass for one mini-batch; step the wrapped optimizer if the macro-batch is full."""
        if closure is None:
            raise RuntimeError(
                "The CG phase's optimizer needs the training loop's closure (forward and backward of the batch)."
            )
        batch, batch_idx, last_in_epoch = self._current_batch()
        requiring = [p for p in self._all_params() if p.requires_grad]
        if len(self.objective) == 0:
            self._covered = set(requiring)
        else:
            self._covered.intersection_update(requiring)
        for p in requiring:
            if p not in self._hooks:
                self._hooks[p] = p.register_post_accumulate_grad_hook(self._take_gradient)
        # The batch (copied: training_step may change it), the module's data and the step as the loop's pass finds them.
        state = self.objective.snapshot_state(batch)
        self._size = extract_batch_size(batch)
        try:
            with self.objective.seeded(len(self.objective)), self._loop_pass():
                loss = closure()
        finally:
            self._size = 0
        if loss is not None:
            size = self.objective.add(state.batch, batch_idx, state)
            weighted = loss.detach().double() * size
            self._loss_sum = weighted if self._loss_sum is None else self._loss_sum + weighted
            self._finite.append((batch_idx, torch.isfinite(loss.detach())))
        full = self.batches_per_step is not None and len(self.objective) >= self.batches_per_step
        if full or last_in_epoch:
            self.finish()
        return loss

    def _take_gradient(self, p: Tensor) -> None:
        # The batch's gradient as backward accumulated it, before any hook or clipping changes it.
        if self._size and p.grad is not None:
            total = self._sums.get(p)
            if total is None:
                total = self._sums[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
            total.add_(p.grad.detach(), alpha=self._size)

    def _sum(self, p: Tensor) -> Tensor:
        if p not in self._sums:  # no batch of the macro-batch reached it: a zero gradient
            self._sums[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return self._sums[p]

    @torch.no_grad()
    def finish(self) -> None:
        """Step the wrapped optimizer on the batches accumulated so far (nothing if there are none)."""
        if len(self.objective) == 0:
            return
        assert self._loss_sum is not None
        trained = self.trained_params()
        self.objective.params[:] = trained  # in place: the objective's gradient code shares the list
        complete = all(p in self._covered for p in trained)
        sums = [self._sum(p) for p in trained] if complete else []
        # The start point: the exact sample-weighted means over the macro-batch of every rank.
        mean, loop_samples = self.objective.global_mean_(self._loss_sum, self.objective.num_samples, sums)
        start_loss = float(mean)
        chosen = set(trained)
        for p in self._all_params():
            if p not in chosen:
                p.grad = None  # held: no optimizer sees a gradient for it
        for p, mean_grad in zip(trained, sums):
            if p.grad is None:
                p.grad = mean_grad.clone()
            else:
                p.grad.copy_(mean_grad)
        forward_before, backward_before = self.objective.forward_samples, self.objective.backward_samples
        if not complete and trained:
            # A parameter began to require grad within the macro-batch: the start's gradient again, on every batch.
            with self.objective.side_effects_suspended():
                start_loss = float(self.objective.value_and_gradient())
        elif self.objective.unscale_gradient(start_loss):
            # Under loss scaling the loop's scaled gradients overflowed: the start's again, at the lowered scale.
            with self.objective.side_effects_suspended():
                start_loss = float(self.objective.value_and_gradient())
        decay = self._weight_decay(trained, gradient=True)
        grad_norm = _norm([p.grad for p in trained])  # type: ignore[misc]
        non_finite_batches = [index for index, finite in self._finite if not bool(finite)]
        non_finite = None
        failed = False
        diagnostics = None
        try:
            if not (math.isfinite(start_loss) and math.isfinite(grad_norm)):
                # Never hand a non-finite start to an optimizer, whichever it is: no step, the weights untouched.
                what = "loss" if not math.isfinite(start_loss) else "gradient"
                non_finite = (
                    f"The {what} is not finite where the step starts (loss {start_loss}, gradient norm {grad_norm}); "
                    "the parameters were left unchanged. Check the data and the model for overflow."
                )
            else:
                failed, diagnostics = self._step(start_loss + decay, trained)
        except NonFiniteObjectiveError as error:
            non_finite = str(error)
        finally:
            forward = loop_samples + self.objective.forward_samples - forward_before
            backward = loop_samples + self.objective.backward_samples - backward_before
            self.discard()
        self.steps += 1
        self.objective.iteration = self.steps
        self._on_step(
            MacroBatchStep(
                start_loss,
                grad_norm,
                failed,
                diagnostics,
                non_finite,
                non_finite_batches,
                forward,
                backward,
                decay,
                loop_samples,
            )
        )

    def _weight_decay(self, params: list[Tensor], gradient: bool) -> float:
        """``sum 0.5 * c * p**2`` over ``params`` with a weight-decay coefficient ``c``; with ``gradient``, ``c * p`` is
        added to their ``.grad``."""
        terms = []
        for p in params:
            coefficient = self.weight_decay.get(p)
            if coefficient is None:
                continue
            weights = p.detach()
            scaled = weights * coefficient
            terms.append(0.5 * torch.sum(scaled.double() * weights.double()))
            if gradient and p.grad is not None:
                p.grad.add_(scaled)
        if not terms:
            return 0.0
        return float(torch.stack([term.to(terms[0].device) for term in terms]).sum())

    def _step(self, start: float, trained: list[Tensor]) -> tuple[bool, StepDiagnostics | None]:
        """One step of the wrapped optimizer from the accumulated start (its objective's value ``start``, gradient in
        ``.grad``), training ``trained`` only; whether it failed, and its diagnostics."""
        chosen = set(trained)
        held = [p.detach() for p in self._all_params() if p not in chosen]
        held_values = [p.clone() for p in held]

        def hold() -> None:
            # The wrapped optimizer may move what it was not given a gradient for (a direction from earlier steps).
            if held:
                with torch.no_grad():
                    torch._foreach_copy_(held, held_values)

        started = False

        def closure() -> Tensor:
            nonlocal started
            if not started:  # the start is known from the loop's own passes
                started = True
                return torch.tensor(start, dtype=torch.float64)
            hold()
            loss = self.objective.value_and_gradient()
            return loss + self._weight_decay(trained, gradient=True)

        def value_closure() -> Tensor:
            hold()
            return self.objective.value() + self._weight_decay(trained, gradient=False)

        weights = [p.detach().clone() for p in trained] if self._guard_weights else []
        with self.objective.side_effects_suspended():
            if self._accepts_value_closure:
                self.optimizer.step(closure, value_closure=value_closure)
            else:
                self.optimizer.step(closure)
        hold()
        diagnostics = getattr(self.optimizer, "diagnostics", None)
        diagnostics = diagnostics if isinstance(diagnostics, StepDiagnostics) else None
        if weights and not all(bool(torch.isfinite(p).all()) for p in trained):
            torch._foreach_copy_([p.detach() for p in trained], weights)
            return True, diagnostics  # a step into NaN or inf made no progress: undone
        return (diagnostics.failed if diagnostics is not None else False), diagnostics

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Parameters added after the swap (``BaseFinetuning`` unfreezing a layer) join the wrapped optimizer (and the
        first one, for a fallback); the steps train them from then on, with their exact macro-batch gradient (a group
        added with ``lr=0`` is held, as the first optimizer would hold it)."""
        if "optimizer" not in self.__dict__:  # Optimizer.__init__ adds the initial groups
            super().add_param_group(param_group)
            return
        params = [param_group["params"]] if isinstance(param_group["params"], Tensor) else list(param_group["params"])
        self.optimizer.add_param_group({"params": params})
        if "lr" in param_group and float(param_group["lr"]) == 0.0:
            self.excluded.update(params)
        self._on_params_added(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        # The qualified name: the package's LBFGS and torch.optim.LBFGS share a class name, not a state layout.
        state["macro_batch"] = {"steps": self.steps, "optimizer": _qualified_name(type(self.optimizer))}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        macro = state_dict.pop("macro_batch", {"steps": 0})
        self.steps = macro["steps"]
        self.objective.iteration = self.steps
        own_type = _qualified_name(type(self.optimizer))
        saved_type = macro.get("optimizer", own_type)
        if "." not in saved_type:  # written by version 0.3, which kept the class name alone
            own_type = type(self.optimizer).__name__
        if saved_type != own_type:
            self._warn(
                f"ConvexitySwapCallback: the checkpoint's second phase used {saved_type}, this run builds {own_type} "
                f"(the callback's `optimizer` changed): {own_type} starts afresh from the checkpoint's "
                "weights."
            )
            return
        options = {key: value for key, value in self.optimizer.defaults.items()}
        self.optimizer.load_state_dict(state_dict)
        # torch's load_state_dict replaces the wrapped optimizer's state and groups (and something else, such as
        # BaseFinetuning restoring its groups, may have replaced this adapter's): share them again.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        # The options asked for now win over the checkpoint's; say what changed.
        changed = {
            key: (group[key], value)
            for group in self.param_groups
            for key, value in options.items()
            if key in group and group[key] != value
        }
        for group in self.param_groups:
            group.update({key: new for key, (_, new) in changed.items()})
        if changed:
            described = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
            self._warn(
                f"ConvexitySwapCallback: the CG options changed since the checkpoint ({described}); the new ones apply."
            )


def _qualified_name(cls: type) -> str:
    """``module.Class`` of the module that defines the class: it tells apart classes of the same name."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _norm(tensors: list[Tensor]) -> float:
    """The global L2 norm of a list of tensors (one host synchronisation)."""
    if not tensors:
        return 0.0
    norms = [n.to(torch.float64) for n in torch._foreach_norm(tensors)]
    device = norms[0].device
    return float(torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms])))
