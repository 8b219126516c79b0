"""Let Lightning step a closure optimizer once per macro-batch, on the macro-batch's exact mean loss (private).

The CG phase's optimizer as the Trainer sees it. Lightning still calls ``step(closure)`` once per mini-batch, so the
progress bar, ``training_step``'s logging, validation and checkpointing all work as usual. Each call runs the training
loop's own forward and backward pass for the current batch (which the CG phase supplies); the batch's loss and
gradient are added up (weighted by batch size) and the batch is kept. After the last batch of the macro-batch
(``batches_per_step`` batches, or the rest of the epoch) the wrapped optimizer takes one step on
:class:`~lightning_twophase.objective.TrainingObjective`: its start point is known from the accumulated pass, and its
line search evaluates trial points on the kept batches. Each such step hands one :class:`MacroBatchStep` to the
CG phase.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_twophase.objective import TrainingObjective
from lightning_twophase.optim.conjugate_gradient import NonFiniteObjectiveError, StepDiagnostics

__all__ = ["MacroBatchStep"]  # the adapter itself is private to the CG phase

#: ``current_batch()``: the batch the next ``step()`` belongs to, its index, and whether it is the epoch's last.
BatchSource = Callable[[], tuple[Any, int, bool]]


@dataclass(frozen=True)
class MacroBatchStep:
    """What one step on a macro-batch did.

    Attributes:
        diagnostics: the wrapped optimizer's diagnostics, if it keeps any (``ConjugateGradient`` does).
        non_finite: the error the wrapped optimizer raised at a non-finite start (the parameters are unchanged),
            when the adapter was told not to re-raise it.
        forward_samples: samples this rank passed forward for the macro-batch: the training loop's passes and the
            trial evaluations.
        backward_samples: samples this rank passed backward.

    """

    diagnostics: StepDiagnostics | None
    non_finite: NonFiniteObjectiveError | None
    forward_samples: int
    backward_samples: int


class _MacroBatchOptimizer(Optimizer):
    """Accumulate mini-batches into a macro-batch and step ``optimizer`` once per macro-batch.

    Args:
        optimizer: a closure optimizer (:class:`~lightning_twophase.ConjugateGradient`, or e.g. ``torch.optim.LBFGS``).
            If its ``step`` accepts ``value_closure``, value-only line-search trials run forward passes only.
        objective: evaluates the loss (and gradient) on the kept batches.
        current_batch: supplies the batch each ``step()`` call belongs to.
        on_step: receives the result of every macro-batch step.
        batches_per_step: mini-batches per macro-batch; ``None`` means the whole epoch (full-batch, the paper's CG).
        raise_on_non_finite: re-raise :class:`~lightning_twophase.NonFiniteObjectiveError` from the wrapped optimizer;
            if ``False`` it is reported in the step's result (the parameters are intact).

    """

    def __init__(
        self,
        optimizer: Optimizer,
        objective: TrainingObjective,
        current_batch: BatchSource,
        on_step: Callable[[MacroBatchStep], None],
        batches_per_step: int | None = None,
        raise_on_non_finite: bool = True,
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
        self.raise_on_non_finite = raise_on_non_finite
        self._current_batch = current_batch
        self._on_step = on_step
        self._accepts_value_closure = "value_closure" in inspect.signature(optimizer.step).parameters
        self._params = [p for p in params if p.requires_grad]
        self._grad_sum: list[Tensor] | None = None
        self._loss_sum: Tensor | None = None
        self._loop_samples = 0
        #: Macro-batch steps taken (also the iteration counter of the random seeds; saved with the state).
        self.steps = 0

    def discard(self) -> None:
        """Drop a partly accumulated macro-batch (the epoch ended early, or training was interrupted)."""
        self.objective.clear()
        self._loss_sum = None
        self._loop_samples = 0
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
        with self.objective.seeded(len(self.objective)):
            loss = closure()
        if loss is not None:
            size = self.objective.add(batch, batch_idx)
            self._accumulate(loss, size)
            self._loop_samples += size
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
        count = self.objective.num_samples
        # The gradient at the start point: the exact size-weighted mean over the macro-batch.
        torch._foreach_mul_(self._grad_sum, 1.0 / count)
        for p, mean_grad in zip(self._params, self._grad_sum):
            if p.grad is None:
                p.grad = mean_grad.clone()
            else:
                p.grad.copy_(mean_grad)
        start_loss = float(self.objective.global_mean(self._loss_sum, count))
        forward_before, backward_before = self.objective.forward_samples, self.objective.backward_samples
        loop_samples = self._loop_samples
        self.objective.set_start(start_loss)
        non_finite = None
        try:
            with self.objective.side_effects_suspended():
                if self._accepts_value_closure:
                    self.optimizer.step(self.objective.closure, value_closure=self.objective.value)
                else:
                    self.optimizer.step(self.objective.closure)
        except NonFiniteObjectiveError as error:
            if self.raise_on_non_finite:
                raise
            non_finite = error
        finally:
            forward = loop_samples + self.objective.forward_samples - forward_before
            backward = loop_samples + self.objective.backward_samples - backward_before
            self.discard()
        self.steps += 1
        self.objective.iteration = self.steps
        self._on_step(MacroBatchStep(getattr(self.optimizer, "diagnostics", None), non_finite, forward, backward))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        state["macro_batch"] = {"steps": self.steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        macro = state_dict.pop("macro_batch", {"steps": 0})
        self.steps = macro["steps"]
        self.objective.iteration = self.steps
        self.optimizer.load_state_dict(state_dict)
        # torch's load_state_dict replaces the wrapped optimizer's state and groups: share them again.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
