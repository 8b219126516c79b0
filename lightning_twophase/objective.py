"""The training loss of a LightningModule over a fixed set of stored batches: the CG phase's objective.

Conjugate gradient needs one fixed, smooth function per iteration. Here that function is the mean of
``training_step``'s loss over the batches of one macro-batch (the whole epoch by default), each batch weighted by
its size. The batches are the very tensors the training loop produced (augmentation already applied), kept for the
iteration, so every trial point of a line search sees the same data; a per-batch random seed makes dropout and any
other randomness in ``training_step`` repeat too.

Trial evaluations leave no trace: ``self.log`` is silenced, module buffers (batch-norm statistics) and torchmetrics
states are restored afterwards, and DDP's gradient hooks are not involved (gradients come from
``torch.autograd.grad`` and are averaged across ranks here, in one collective).

:class:`TrainingObjective` itself knows nothing of Lightning: it evaluates a loss function of ``(batch, batch_idx)``.
:func:`lightning_objective` builds it for a Trainer and a LightningModule.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn

from lightning_twophase._lightning import logging_suppressed
from lightning_twophase.optim.distributed import all_reduce_mean_, is_distributed, reduce_decision_scalars

__all__ = ["TrainingObjective", "batch_nbytes", "lightning_objective", "training_step_loss"]

#: ``loss_fn(batch, batch_idx)``: the loss of one stored batch, or ``None`` to skip it.
LossFunction = Callable[[Any, int], "Tensor | None"]


def batch_nbytes(batch: Any) -> int:
    """Bytes held by the tensors of a batch."""
    total = 0

    def count(tensor: Tensor) -> None:
        nonlocal total
        total += tensor.numel() * tensor.element_size()

    apply_to_collection(batch, Tensor, count)
    return total


def training_step_loss(output: Any) -> Tensor | None:
    """The loss in ``training_step``'s output (a tensor, a dict with ``"loss"``, or ``None``)."""
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and "loss" in output:
        return output["loss"]
    raise TypeError(
        "The CG phase re-evaluates `training_step`, which must return a loss tensor, a dict with a 'loss' key, or "
        f"None; it returned {type(output).__name__}."
    )


class TrainingObjective:
    """The size-weighted mean of a loss function over stored batches, with its gradient.

    Args:
        loss_fn: the loss of one batch, ``loss_fn(batch, batch_idx)`` (``None`` skips the batch).
        params: the parameters the optimizer updates (gradients are computed for these).
        module: the module whose buffers and torchmetrics states trial evaluations must not change.
        device: the training device (kept batches live there, and the random state forked there).
        to_device: moves a batch kept in host memory back to the device.
        rank: this process's rank (part of the per-batch seeds).
        max_device_bytes: batches are kept on the training device while their total stays within this bound; the
            rest wait in host memory and are copied back for each evaluation.
        seed: base of the per-batch random seeds.
        quiet: a context manager factory under which trial evaluations run (``self.log`` silenced, for instance).

    """

    def __init__(
        self,
        loss_fn: LossFunction,
        params: list[Tensor],
        module: nn.Module,
        *,
        device: torch.device | str = "cpu",
        to_device: Callable[[Any], Any] | None = None,
        rank: int = 0,
        max_device_bytes: int = 2 * 1024**3,
        seed: int = 0,
        quiet: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        self.module = module
        self.device = torch.device(device)
        self.to_device = to_device or (lambda batch: apply_to_collection(batch, Tensor, lambda t: t.to(self.device)))
        self.rank = rank
        self.max_device_bytes = max_device_bytes
        self.seed = seed
        self.quiet = quiet
        self.iteration = 0
        self._batches: list[tuple[Any, int, int, bool]] = []  # (batch, batch_idx, size, on_device)
        self._device_bytes = 0
        self._start_loss: float | None = None
        #: Samples passed forward and backward by trial evaluations (for compute accounting).
        self.forward_samples = 0
        self.backward_samples = 0

    # ------------------------------------------------------------------------------------------------------------
    # The stored batches
    # ------------------------------------------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Samples stored on this rank."""
        return sum(size for _, _, size, _ in self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, batch: Any, batch_idx: int) -> int:
        """Keep a batch for this iteration and return its size."""
        size = extract_batch_size(batch)
        nbytes = batch_nbytes(batch)
        on_device = self._device_bytes + nbytes <= self.max_device_bytes
        if on_device:
            self._device_bytes += nbytes
        else:
            batch = apply_to_collection(batch, Tensor, lambda t: t.to("cpu"))
        self._batches.append((batch, batch_idx, size, on_device))
        return size

    def clear(self) -> None:
        """Drop the stored batches (the iteration is over)."""
        self._batches.clear()
        self._device_bytes = 0
        self._start_loss = None

    @contextmanager
    def seeded(self, position: int) -> Iterator[None]:
        """Run with the random state of the batch at ``position`` in this iteration (same at every trial point)."""
        key = f"{self.seed}:{self.iteration}:{position}:{self.rank}".encode()
        device = self.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.manual_seed(zlib.crc32(key))
            yield

    # ------------------------------------------------------------------------------------------------------------
    # Evaluations
    # ------------------------------------------------------------------------------------------------------------

    def set_start(self, mean_loss: float) -> None:
        """Record the loss at the current point, already known from the training loop's own pass.

        The gradient at that point must already be in ``p.grad``; the first :meth:`closure` call returns it unchanged.
        """
        self._start_loss = mean_loss

    def _loss_on(self, position: int) -> tuple[Tensor | None, int]:
        batch, batch_idx, size, on_device = self._batches[position]
        if not on_device:
            batch = self.to_device(batch)
        with self.seeded(position):
            loss = self.loss_fn(batch, batch_idx)
        return loss, size

    def global_mean(self, total: Tensor, count: int) -> Tensor:
        """The loss averaged over every sample of every rank."""
        local = torch.stack([total.detach().double(), total.new_tensor(float(count), dtype=torch.float64)])
        if is_distributed():
            local, _ = reduce_decision_scalars(local, None)
        return local[0] / local[1]

    def value(self) -> Tensor:
        """The mean loss over the stored batches (forward passes only, no autograd graph)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        with torch.no_grad():
            for position in range(len(self._batches)):
                loss, size = self._loss_on(position)
                if loss is not None:
                    total += loss.detach().double() * size
                    count += size
        self.forward_samples += count
        return self.global_mean(total, count)

    def value_and_gradient(self) -> Tensor:
        """The mean loss, with its gradient written to ``p.grad`` (averaged across ranks)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        weights_total = self.num_samples
        for position in range(len(self._batches)):
            with torch.enable_grad():
                loss, size = self._loss_on(position)
                if loss is None:
                    continue
                # autograd.grad leaves DDP's reducer out of it; the ranks are averaged below in one collective.
                grads = torch.autograd.grad(loss * (size / weights_total), self.params, allow_unused=True)
            for p, grad in zip(self.params, grads):
                if grad is not None:
                    p.grad.add_(grad)
            total += loss.detach().double() * size
            count += size
        if count != weights_total:
            # Some batches returned None: renormalise to the batches that did contribute.
            for p in self.params:
                p.grad.mul_(weights_total / max(count, 1))
        all_reduce_mean_([p.grad for p in self.params])
        self.forward_samples += count
        self.backward_samples += count
        return self.global_mean(total, count)

    def closure(self) -> Tensor:
        """The closure for :meth:`ConjugateGradient.step`: loss and gradient at the current parameters.

        Its first call after :meth:`set_start` returns the known start loss (the gradient is already in place).
        """
        if self._start_loss is not None:
            start, self._start_loss = self._start_loss, None
            return torch.tensor(start, dtype=torch.float64)
        return self.value_and_gradient()

    @contextmanager
    def side_effects_suspended(self) -> Iterator[None]:
        """Run trial evaluations without leaving a trace in logs, module buffers or torchmetrics states."""
        buffers = [b for b in self.module.buffers() if b is not None]
        saved_buffers = [b.detach().clone() for b in buffers]
        metric_states = _metric_states(self.module)
        with self.quiet():
            try:
                yield
            finally:
                with torch.no_grad():
                    for buffer, saved in zip(buffers, saved_buffers):
                        buffer.copy_(saved)
                _restore_metric_states(metric_states)


def lightning_objective(
    trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[Tensor], max_device_bytes: int, seed: int
) -> TrainingObjective:
    """The mean of ``pl_module.training_step``'s loss over kept batches, evaluated as the training loop would: in the
    precision plugin's context, on the strategy's device, with ``self.log`` silenced at trial points."""
    # The same rule as Lightning's training loop: pass batch_idx if training_step takes a second argument.
    passes_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)

    def loss_fn(batch: Any, batch_idx: int) -> Tensor | None:
        args = (batch, batch_idx) if passes_batch_idx else (batch,)
        with trainer.precision_plugin.train_step_context():
            return training_step_loss(pl_module.training_step(*args))

    return TrainingObjective(
        loss_fn,
        params,
        pl_module,
        device=trainer.strategy.root_device,
        to_device=trainer.strategy.batch_to_device,
        rank=trainer.global_rank,
        max_device_bytes=max_device_bytes,
        seed=seed,
        quiet=lambda: logging_suppressed(pl_module),
    )


def _metric_states(module: torch.nn.Module) -> list[tuple[Any, dict[str, Any]]]:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics comes with Lightning
        return []
    saved = []
    for submodule in module.modules():
        if isinstance(submodule, Metric):
            state = {name: _clone(getattr(submodule, name)) for name in submodule._defaults}
            for name in ("_update_count", "_computed", "_forward_cache"):
                state[name] = _clone(getattr(submodule, name, None))
            saved.append((submodule, state))
    return saved


def _restore_metric_states(saved: list[tuple[Any, dict[str, Any]]]) -> None:
    for metric, state in saved:
        for name, value in state.items():
            setattr(metric, name, value)


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value
