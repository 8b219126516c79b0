"""The training loss of a LightningModule over a fixed set of stored batches: the CG phase's objective.

Conjugate gradient needs one fixed, smooth function per iteration. Here that function is the mean of
``training_step``'s loss over the batches of one macro-batch (the whole epoch by default), each batch weighted by
its size. The batches are the very tensors the training loop produced (augmentation already applied), kept for the
iteration, so every trial point of a line search sees the same data; a per-batch random seed makes dropout and any
other randomness in ``training_step`` repeat too.

Python's ``random`` and numpy's global generator are seeded the same way.

Trial evaluations leave no trace: ``self.log`` is silenced, and each trial evaluation of a batch sees the batch, the
module's buffers, attributes, metric states and random streams, and the ``global_step`` as the training loop's pass of
that batch saw them (the contract and its limits: :mod:`lightning_twophase._trial_state`); afterwards the module is as
the loop left it. :func:`is_trial_evaluation` tells user code which evaluation it is in. DDP's gradient
hooks are not involved (gradients come from ``torch.autograd.grad``, or from ``backward()`` outside DDP's forward
where a model needs it: reentrant activation checkpointing), and under data parallelism the objective and its
gradient are the mean over every sample of every rank, whatever the shard sizes. Under ``precision="16-mixed"`` with a
GradScaler the gradient comes from the scaled loss and is unscaled once added up across ranks; an overflow lowers the
scale and evaluates it again (see :mod:`lightning_twophase._scaling`).

:class:`TrainingObjective` itself knows nothing of Lightning: it evaluates a loss function of ``(batch, batch_idx)``.
:func:`lightning_objective` builds it for a Trainer and a LightningModule.
"""

from __future__ import annotations

import math
import random
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn

from lightning_twophase._lightning import global_step_counter, grad_scaler, logging_suppressed
from lightning_twophase._scaling import LossScaling
from lightning_twophase._trial_state import StepCounter, TrialState, kept
from lightning_twophase.optim.distributed import all_reduce_sum_, is_distributed, reduce_decision_scalars

__all__ = [
    "TrainingObjective",
    "batch_nbytes",
    "is_trial_evaluation",
    "lightning_objective",
    "training_step_loss",
]

#: ``trial_batching`` values of :class:`TrainingObjective`.
TRIAL_BATCHING = ("auto", "chunks", "batches")

_in_trial = ContextVar("lightning_twophase_trial_evaluation", default=False)


def is_trial_evaluation() -> bool:
    """Whether the code running now is a line-search trial evaluation of the CG phase, not a training step.

    ``training_step`` runs again at every trial point of a line search. Code with side effects that should happen once
    per real training step (appending to a list of outputs, counting steps, updating a carried state by hand) can skip
    them here::

        def training_step(self, batch, batch_idx):
            loss = ...
            if not is_trial_evaluation():
                self.training_step_outputs.append(loss.detach())
            return loss

    (The module's data is put back for trial evaluations anyway, with the limits named in
    :mod:`lightning_twophase._trial_state`; this is for effects elsewhere, and for data beyond those limits.)
    """
    return _in_trial.get()


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
        module: the module whose buffers, torchmetrics states and attribute data trial evaluations must not change.
        device: the training device (kept batches live there, and the random state forked there).
        to_device: moves a batch kept in host memory back to the device.
        rank: this process's rank (part of the per-batch seeds).
        max_device_bytes: batches, with the module's data saved for them (:meth:`snapshot_state`), stay on the device
            within this bound; the rest wait in host memory and are copied back for each evaluation.
        step_counter: reads and writes the training loop's ``global_step`` (each batch's trial evaluations run at
            the step of its loop pass); ``None``: no step to keep.
        seed: base of the per-batch random seeds.
        quiet: a context manager factory under which trial evaluations run (``self.log`` silenced, for instance).
        trial_batching: forward-only evaluations go through the kept batches ``"batches"`` one by one, as the loop
            did, or ``"chunks"`` joined into one (fewer, larger calls); ``"auto"`` tries both at the first evaluation
            and keeps chunks where they give the same value to ``1e-6`` and raise nothing (leaving no trace).
        inform: told which batching ``"auto"`` chose and why, and when gradients need ``backward()``.
        warn: told of the module's data that cannot be put back.
        scaling: the loss scaling of gradient evaluations (16-mixed with a GradScaler); ``None``: none.

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
        trial_batching: str = "batches",
        inform: Callable[[str], None] = lambda message: None,
        warn: Callable[[str], None] = warnings.warn,
        scaling: LossScaling | None = None,
        step_counter: StepCounter | None = None,
    ) -> None:
        if trial_batching not in TRIAL_BATCHING:
            raise ValueError(f"`trial_batching` must be one of {TRIAL_BATCHING}, got {trial_batching!r}.")
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        self.module = module
        self.device = torch.device(device)
        self.to_device = to_device or (lambda batch: apply_to_collection(batch, Tensor, lambda t: t.to(self.device)))
        self.rank = rank
        self.max_device_bytes = max_device_bytes
        self.seed = seed
        self.quiet = quiet
        self.trial_batching = trial_batching
        self.inform = inform
        self.warn = warn
        self.scaling = scaling
        self._counter = step_counter
        self._gradients = _Gradients(self.params, module, scaling, inform)
        self.iteration = 0
        # (batch, batch_idx, size, on_device, what the loop's pass of the batch found: TrialState)
        self._batches: list[tuple[Any, int, int, bool, TrialState | None]] = []
        self._device_bytes = 0
        self._state_bytes = 0
        self._reuse: dict[int, Any] = {}  # the module's data saved for this iteration, shared where unchanged
        self._states_fit = True
        self._warned_states = False
        self._reported: set[str] = set()
        self._start_loss: float | None = None
        self._chunk: Any = None  # the kept device batches joined, for trial_batching="chunks" (made once per iteration)
        #: Samples passed forward and backward by trial evaluations, over all ranks (for compute accounting).
        self.forward_samples = 0
        self.backward_samples = 0

    @property
    def num_samples(self) -> int:
        """Samples stored on this rank."""
        return sum(entry[2] for entry in self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def snapshot_state(self, batch: Any = None) -> TrialState:
        """What the training loop's pass of the next batch finds, for :meth:`add`: a copy of ``batch`` (if given), the
        module's data and the ``global_step`` (:class:`~lightning_twophase._trial_state.TrialState`).

        The module's data unchanged since the previous batch is shared with it. The first batch of an iteration always
        gets its module data saved; a later batch does not once that data and the batches on the device would exceed
        ``max_device_bytes`` (with a warning): its trial evaluations then go on from the module's data the previous
        batch's evaluation left, as the training loop's pass did.
        """
        if self._batches and not self._states_fit:
            return TrialState(self._counter, batch)
        state = TrialState.capture(self.module, self._counter, batch, self._reuse)
        if self._batches and self._device_bytes + self._state_bytes + state.nbytes > self.max_device_bytes:
            self._states_fit = False
            if not self._warned_states:
                self._warned_states = True
                self.warn(
                    f"ConvexitySwapCallback: the module's data saved for each kept batch (about {state.nbytes} bytes "
                    f"for this one, {self._state_bytes} so far) exceeds max_cached_bytes={self.max_device_bytes}: "
                    f"from batch {len(self._batches)} of this iteration on, trial evaluations go on from the data the "
                    "previous batch's evaluation left instead of the data the training loop's pass saw. Raise "
                    "max_cached_bytes, or keep large data out of the module's attributes and buffers, or leave it "
                    "unchanged at trial points with `lightning_twophase.is_trial_evaluation()`."
                )
            state = state.without_module_data()
        return state

    def add(self, batch: Any, batch_idx: int, state: TrialState | None = None) -> int:
        """Keep a batch for this iteration and return its size; ``state``: what the training loop's pass of this batch
        found (:meth:`snapshot_state`), which trial evaluations of the batch start from. The pass is over: what it
        changed that trial evaluations cannot put back is warned about."""
        size = extract_batch_size(batch)
        nbytes = batch_nbytes(batch)
        if state is not None:
            self._state_bytes += state.nbytes
            state.batch = None  # the batch is kept below, where it waits (on the device or not)
            for problem in state.passed():
                self._report(problem)
        on_device = self._device_bytes + self._state_bytes + nbytes <= self.max_device_bytes
        if on_device:
            self._device_bytes += nbytes
        else:
            batch = apply_to_collection(batch, Tensor, lambda t: t.to("cpu"))
        self._batches.append((batch, batch_idx, size, on_device, state))
        return size

    def clear(self) -> None:
        """Drop the stored batches (the iteration is over)."""
        self._batches.clear()
        self._device_bytes = 0
        self._state_bytes = 0
        self._reuse = {}
        self._states_fit = True
        self._start_loss = None
        self._chunk = None

    def seeded(self, position: int) -> AbstractContextManager[None]:
        """Run with the random state of the batch at ``position`` in this iteration (the same at every trial point):
        torch's generators, Python's ``random`` and numpy's global generator, all restored afterwards."""
        return _seeded(zlib.crc32(f"{self.seed}:{self.iteration}:{position}:{self.rank}".encode()), self.device)

    def set_start(self, mean_loss: float) -> None:
        """Record the loss at the current point, already known from the training loop's own pass.

        The gradient at that point must already be in ``p.grad``; the first :meth:`closure` call returns it unchanged.
        """
        self._start_loss = mean_loss

    def _loss_on(self, position: int) -> tuple[Tensor | None, int]:
        batch, batch_idx, size, on_device, state = self._batches[position]
        if not on_device:
            batch = self.to_device(batch)
        if state is not None:
            for problem in state.restore():
                self._report(problem)
            batch = state.evaluation_batch(batch)
        with self.seeded(position):
            loss = self.loss_fn(batch, batch_idx)
        return loss, size

    def _report(self, problem: str) -> None:
        if problem not in self._reported:  # once each
            self._reported.add(problem)
            self.warn(
                f"ConvexitySwapCallback: the module's attribute {problem}, which trial evaluations of the CG phase "
                "cannot put back: they see it as it is, not as the training loop's pass of each kept batch saw it. "
                "Skip that change at trial points with `lightning_twophase.is_trial_evaluation()`."
            )

    def value(self) -> Tensor:
        """The mean loss over the stored batches (forward passes only: no gradient is taken)."""
        if self.trial_batching == "auto":
            by_batch = self._forward_value(chunked=False)
            by_chunk, error = self._chunked_value_tried()
            agree = error is None and bool(abs(by_chunk - by_batch) <= 1e-6 * abs(by_batch))
            self.trial_batching = "chunks" if agree else "batches"
            self.inform(_batching_message(agree, error, float(by_batch), float(by_chunk)))
            return by_batch
        return self._forward_value(self.trial_batching == "chunks")

    def _forward_sums(self, chunked: bool) -> tuple[Tensor, int]:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        # Autograd stays on, as in the loop's pass: a loss may take gradients of its own (a PINN's u'' through
        # torch.autograd.grad). Each batch's graph is dropped with its loss.
        with torch.enable_grad():
            for evaluate in self._evaluations(chunked):
                loss, size = evaluate()
                if loss is not None:
                    total += loss.detach().double() * size
                    count += size
        return total, count

    def _forward_value(self, chunked: bool) -> Tensor:
        total, count = self._forward_sums(chunked)
        mean, samples = self.global_mean_(total, count, [])
        self.forward_samples += samples
        return mean

    def _chunked_value_tried(self) -> tuple[Tensor, str | None]:
        """The value evaluated in chunks, and what went wrong if it could not be: the attempt leaves the module's data,
        buffers and metric states as it found them (the random generators are forked anyway). Every rank meets in the
        same reduction, so the comparison with batch-by-batch evaluation comes out the same on every rank."""
        error = None
        with kept(self.module, self._counter, self._report):
            try:
                total, count = self._forward_sums(chunked=True)
            except Exception as exception:  # any failure of the chunk means batch by batch
                error = f"{type(exception).__name__}: {exception}"
                total, count = torch.tensor(math.nan, dtype=torch.float64, device=self.device), self.num_samples
        mean, samples = self.global_mean_(total, count, [])
        if error is None:
            self.forward_samples += samples
        return mean, error

    def _evaluations(self, chunked: bool) -> list[Callable[[], tuple[Tensor | None, int]]]:
        """One evaluation per kept batch, or, ``chunked``, one of the batches kept on the device joined into one chunk
        (made once per iteration) and one per batch kept on the host."""
        if not chunked:
            return [partial(self._loss_on, position) for position in range(len(self._batches))]
        kept = [entry for entry in self._batches if entry[3]]
        evaluations = [partial(self._loss_on, position) for position, entry in enumerate(self._batches) if not entry[3]]
        if kept:
            # Made once per iteration, unless training_step changes its batch in place (then a fresh chunk each time).
            changed = any(entry[4] is not None and entry[4].batch_changed for entry in kept)
            if self._chunk is None or changed:
                self._chunk = _concatenate([entry[0] for entry in kept])
            evaluations.insert(0, partial(self._chunk_loss, kept[0][1], kept[0][4], sum(entry[2] for entry in kept)))
        return evaluations

    def _chunk_loss(self, batch_idx: int, state: TrialState | None, size: int) -> tuple[Tensor | None, int]:
        if state is not None:
            for problem in state.restore():
                self._report(problem)
        with self.seeded(0):
            # Containers rebuilt for each evaluation: training_step may replace an entry (batch["x"] = ...).
            return self.loss_fn(apply_to_collection(self._chunk, Tensor, lambda t: t), batch_idx), size

    def value_and_gradient(self) -> Tensor:
        """The mean loss, with its gradient written to ``p.grad``: means over every sample of every rank.

        Under loss scaling the gradient is that of the scaled loss, unscaled; after an overflow the scale is lower and
        the gradient is evaluated again.
        """
        loss = self._value_and_gradient()
        while self.unscale_gradient(float(loss)):
            loss = self._value_and_gradient()
        return loss

    def _value_and_gradient(self) -> Tensor:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        if self.trial_batching == "auto":
            self.value()  # decided once, at the first evaluation, by the values (a forward pass more, counted)
        with self._gradients.others_kept():
            for evaluate in self._evaluations(self.trial_batching == "chunks"):
                with torch.enable_grad():
                    loss, size = evaluate()
                    if loss is None:
                        continue
                    loss = self._gradients.add(loss, size, evaluate)
                total += loss.detach().double() * size
                count += size
        mean, samples = self.global_mean_(total, count, [p.grad for p in self.params])
        self.forward_samples += samples
        self.backward_samples += samples
        return mean

    def unscale_gradient(self, loss: float) -> bool:
        """Under loss scaling, unscale the mean scaled gradient in ``p.grad`` (identical on every rank, as ``loss``);
        whether it overflowed and is to be evaluated again at the lowered scale. Without loss scaling: ``False``."""
        return self._gradients.unscale(loss)

    @property
    def gradient_mode(self) -> str:
        """How gradients are taken: ``"autograd"`` (``torch.autograd.grad``) until a model needs ``"backward"``."""
        return self._gradients.mode

    def global_mean_(self, total: Tensor, count: int, grad_sums: list[Tensor]) -> tuple[Tensor, int]:
        """The mean loss over every sample of every rank, from this rank's sum ``total`` over ``count`` samples, and
        the number of those samples; the sample-weighted gradient sums ``grad_sums`` become the global mean gradient in
        place."""
        local = torch.stack([total.detach().double(), total.new_tensor(float(count), dtype=torch.float64)])
        if is_distributed():
            _, sums = reduce_decision_scalars(local[:0], local)
            assert sums is not None
            local = sums
            all_reduce_sum_(grad_sums)
        samples = float(local[1])
        if grad_sums:
            torch._foreach_div_(grad_sums, samples)
        return local[0] / local[1], round(samples)

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
        """Run trial evaluations without leaving a trace in logs, module buffers, torchmetrics states, the data in
        the module's attributes or the ``global_step``; :func:`is_trial_evaluation` is true inside."""
        token = _in_trial.set(True)
        with self.quiet():
            try:
                with kept(self.module, self._counter, self._report):
                    yield
            finally:
                _in_trial.reset(token)


class _Gradients:
    """How the objective takes the gradient of a batch's loss into ``p.grad``: with ``torch.autograd.grad``, which
    leaves DDP's reducer out of it, or with ``backward()`` where a model refuses ``autograd.grad`` (reentrant activation
    checkpointing); under loss scaling (16-mixed with a GradScaler) from the scaled loss."""

    def __init__(
        self, params: list[Tensor], module: nn.Module, scaling: LossScaling | None, inform: Callable[[str], None]
    ) -> None:
        self.params, self.module, self.scaling, self.inform = params, module, scaling, inform
        #: ``"autograd"`` until a model needs ``"backward"`` (decided once).
        self.mode = "autograd"

    def add(self, loss: Tensor, size: int, evaluate_again: Callable[[], tuple[Tensor | None, int]]) -> Tensor:
        """Add the gradient of ``loss * size`` to ``p.grad``; return the loss (evaluated again with
        ``evaluate_again`` if the first attempt found that the model needs ``backward()``)."""
        # Under loss scaling the batch's loss is scaled as the loop scales it, and weighted afterwards.
        outputs, weight = (loss * size, 1) if self.scaling is None else (self.scaling.scale(loss), size)
        if self.mode == "autograd":
            try:
                # The ranks are added up in TrainingObjective.global_mean_.
                grads = torch.autograd.grad(outputs, self.params, allow_unused=True)
            except RuntimeError as error:
                if not _needs_backward(error):
                    raise
                self.mode = "backward"
                self.inform(
                    "ConvexitySwapCallback: the model does not support torch.autograd.grad (reentrant activation "
                    "checkpointing); the CG phase takes its gradients with backward() instead."
                )
                evaluated, size = evaluate_again()  # the failed attempt freed the graph: the same evaluation again
                assert evaluated is not None
                loss = evaluated
                outputs = loss * size if self.scaling is None else self.scaling.scale(loss)
            else:
                for p, grad in zip(self.params, grads):
                    if grad is not None:
                        p.grad.add_(grad, alpha=weight)  # type: ignore[union-attr]
                return loss
        # backward() adds into p.grad; called on the module, not on DDP's wrapper, it starts none of DDP's reductions.
        if weight == 1:
            outputs.backward()
            return loss
        grads = [p.grad for p in self.params]
        earlier = [g.clone() for g in grads]  # type: ignore[union-attr]
        torch._foreach_zero_(grads)
        outputs.backward()
        torch._foreach_mul_(grads, weight)
        torch._foreach_add_(grads, earlier)
        return loss

    def unscale(self, loss: float) -> bool:
        """Unscale the scaled gradient in ``p.grad``; whether it overflowed and can be evaluated again at the lowered
        scale (``False`` without loss scaling)."""
        return self.scaling is not None and self.scaling.unscale_(self.params, loss) and self.scaling.can_back_off

    @contextmanager
    def others_kept(self) -> Iterator[None]:
        """Keep the ``.grad`` of the module's parameters that the objective does not train as it was (``backward()``
        would add to them)."""
        own = {id(p) for p in self.params}
        others = [p for p in self.module.parameters() if p.requires_grad and id(p) not in own]
        saved = [p.grad for p in others]
        for p in others:
            p.grad = None
        try:
            yield
        finally:
            for p, grad in zip(others, saved):
                p.grad = grad


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with torch's generators, Python's ``random`` and numpy's global generator seeded with ``seed``; all
    restored afterwards."""
    devices = [device] if device.type == "cuda" else []
    python_state = random.getstate()
    numpy_random = _numpy_random()
    numpy_state = numpy_random.get_state() if numpy_random is not None else None
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            # The generators the evaluation can draw from, not torch.manual_seed: on a CUDA build without an
            # initialised GPU that queues a seeding of every GPU with a captured stack trace, 4 ms per batch.
            torch.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.manual_seed(seed)
            random.seed(seed)
            if numpy_random is not None:
                numpy_random.seed(seed)
            yield
    finally:
        random.setstate(python_state)
        if numpy_random is not None:
            numpy_random.set_state(numpy_state)


def lightning_objective(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    params: list[Tensor],
    seed: int,
    *,
    max_device_bytes: int = 2 * 1024**3,
    trial_batching: str = "auto",
) -> TrainingObjective:
    """The mean of ``pl_module.training_step``'s loss over kept batches, evaluated as the training loop would: in the
    precision plugin's context, on the strategy's device, with ``self.log`` silenced at trial points."""
    # The same rule as Lightning's training loop: pass batch_idx if training_step takes a second argument.
    passes_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)

    def loss_fn(batch: Any, batch_idx: int) -> Tensor | None:
        args = (batch, batch_idx) if passes_batch_idx else (batch,)
        with trainer.precision_plugin.train_step_context():
            return training_step_loss(pl_module.training_step(*args))

    scaler = grad_scaler(trainer)
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
        trial_batching=trial_batching,
        inform=rank_zero_info,
        warn=rank_zero_warn,
        scaling=LossScaling(scaler) if scaler is not None else None,
        step_counter=global_step_counter(trainer),
    )


def _batching_message(agree: bool, error: str | None, by_batch: float, by_chunk: float) -> str:
    why = (
        f"evaluating them in one chunk failed: {error}"
        if error is not None
        else (f"the two ways gave {by_batch:.8g} and {by_chunk:.8g}")
    )
    how = "in one chunk of" if agree else "batch by batch over"
    return f"ConvexitySwapCallback: trial evaluations run {how} the kept batches ({why})."


def _needs_backward(error: RuntimeError) -> bool:
    """Whether ``torch.autograd.grad`` failed because the graph holds reentrant activation checkpoints, which only
    ``backward()`` supports (torch's message: "... is incompatible with .grad() ..." since 2.4, "... is not compatible
    with .grad() ..." before)."""
    return "compatible with .grad()" in str(error)


def _numpy_random() -> Any:
    """numpy's global ``random`` module if numpy is installed (it comes with torch), else ``None``."""
    try:
        import numpy
    except ImportError:  # pragma: no cover
        return None
    return numpy.random


def _concatenate(batches: list[Any]) -> Any:
    """Batches of the same structure joined along their first dimension (``TypeError`` if that cannot be done)."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return type(first)({key: _concatenate([batch[key] for batch in batches]) for key in first})
    if isinstance(first, (tuple, list)):
        parts = [_concatenate(list(items)) for items in zip(*batches)]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    raise TypeError(f"cannot concatenate batches of {type(first).__name__}")
