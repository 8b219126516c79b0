"""Let Lightning step a closure optimizer once per macro-batch, on the macro-batch's exact mean loss (private).

The CG phase's optimizer as the Trainer sees it. Lightning still calls ``step(closure)`` once per mini-batch, so the
progress bar, ``training_step``'s logging, validation and checkpointing all work as usual. Each call runs the training
loop's own forward and backward pass for the current batch (which the CG phase supplies), with the gradient kept
rank-local; the batch's loss and gradient are added up (weighted by batch size) and the batch is kept. After the last
batch of the macro-batch (``batches_per_step`` batches, or the rest of the epoch) the sums are added up across ranks
and the wrapped optimizer takes one step on :class:`~lightning_twophase.objective.TrainingObjective`: its start point
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
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
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
    start_samples: int = 0


class _MacroBatchOptimizer(Optimizer):
    """Accumulate mini-batches into a macro-batch and step ``optimizer`` once per macro-batch.

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
        self._params = [p for p in params if p.requires_grad]
        self._grad_sum: list[Tensor] | None = None
        self._loss_sum: Tensor | None = None
        self._finite: list[tuple[int, Tensor]] = []  # (batch_idx, whether its loss was finite), read once per step
        # The package's optimizers promise finite weights after every step; other optimizers' steps are checked.
        self._guard_weights = not isinstance(optimizer, (ConjugateGradient, LBFGS))
        #: Macro-batch steps taken (also the iteration counter of the random seeds; saved with the state).
        self.steps = 0

    def discard(self) -> None:
        """Drop a partly accumulated macro-batch (the epoch ended early, or training was interrupted)."""
        self.objective.clear()
        self._loss_sum = None
        self._finite.clear()
        if self._grad_sum is not None:
            torch._foreach_zero_(self._grad_sum)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Run the training loop's pass for one mini-batch; step the wrapped optimizer if the macro-batch is full."""
        if closure is None:
            raise RuntimeError(
                "The CG phase's optimizer needs the training loop's closure (forward and backward of the batch)."
            )
        batch, batch_idx, last_in_epoch = self._current_batch()
        state = self.objective.snapshot_state()  # the module's data as the loop's pass of this batch finds it
        with self.objective.seeded(len(self.objective)), self._loop_pass():
            loss = closure()
        if loss is not None:
            size = self.objective.add(batch, batch_idx, state)
            self._accumulate(loss, size)
            self._finite.append((batch_idx, torch.isfinite(loss.detach())))
        full = self.batches_per_step is not None and len(self.objective) >= self.batches_per_step
        if full or last_in_epoch:
            self.finish()
        return loss

    def _accumulate(self, loss: Tensor, size: int) -> None:
        if self._grad_sum is None:
            self._grad_sum = [torch.zeros_like(p) for p in self._params]
        pairs = [(total, p.grad) for total, p in zip(self._grad_sum, self._params) if p.grad is not None]
        if pairs:
            totals, grads = zip(*pairs)
            torch._foreach_add_(list(totals), list(grads), alpha=size)
        weighted = loss.detach().double() * size
        self._loss_sum = weighted if self._loss_sum is None else self._loss_sum + weighted

    @torch.no_grad()
    def finish(self) -> None:
        """Step the wrapped optimizer on the batches accumulated so far (nothing if there are none)."""
        if len(self.objective) == 0:
            return
        assert self._grad_sum is not None and self._loss_sum is not None
        # The start point: the exact sample-weighted means over the macro-batch of every rank.
        mean, loop_samples = self.objective.global_mean_(self._loss_sum, self.objective.num_samples, self._grad_sum)
        start_loss = float(mean)
        for p, mean_grad in zip(self._params, self._grad_sum):
            if p.grad is None:
                p.grad = mean_grad.clone()
            else:
                p.grad.copy_(mean_grad)
        forward_before, backward_before = self.objective.forward_samples, self.objective.backward_samples
        if self.objective.unscale_gradient(start_loss):
            # Under loss scaling the loop's scaled gradients overflowed: the start's again, at the lowered scale.
            with self.objective.side_effects_suspended():
                start_loss = float(self.objective.value_and_gradient())
        grad_norm = _norm([p.grad for p in self._params])  # type: ignore[misc]
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
                failed, diagnostics = self._step(start_loss)
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
                loop_samples,
            )
        )

    def _step(self, start_loss: float) -> tuple[bool, StepDiagnostics | None]:
        """One step of the wrapped optimizer from the accumulated start; whether it failed, and its diagnostics."""
        self.objective.set_start(start_loss)
        weights = [p.detach().clone() for p in self._params] if self._guard_weights else []
        with self.objective.side_effects_suspended():
            if self._accepts_value_closure:
                self.optimizer.step(self.objective.closure, value_closure=self.objective.value)
            else:
                self.optimizer.step(self.objective.closure)
        diagnostics = getattr(self.optimizer, "diagnostics", None)
        diagnostics = diagnostics if isinstance(diagnostics, StepDiagnostics) else None
        if weights and not all(bool(torch.isfinite(p).all()) for p in self._params):
            torch._foreach_copy_([p.detach() for p in self._params], weights)
            return True, diagnostics  # a step into NaN or inf made no progress: undone
        return (diagnostics.failed if diagnostics is not None else False), diagnostics

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Parameters added after the swap (``BaseFinetuning`` unfreezing a layer) join the macro-batch gradient and
        the wrapped optimizer; a partly accumulated macro-batch, which lacks their gradient, is dropped."""
        if "optimizer" not in self.__dict__:  # Optimizer.__init__ adds the initial groups
            super().add_param_group(param_group)
            return
        self.discard()
        params = [param_group["params"]] if isinstance(param_group["params"], Tensor) else list(param_group["params"])
        self.optimizer.add_param_group({"params": params})
        added = [p for p in params if p.requires_grad]
        self._params.extend(added)
        if self._grad_sum is not None:
            self._grad_sum.extend(torch.zeros_like(p) for p in added)
        self.objective.params.extend(added)
        self._on_params_added(added)

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
        # torch's load_state_dict replaces the wrapped optimizer's state and groups: share them again.
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
