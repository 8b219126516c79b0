"""What a trial evaluation of a kept batch sees: the contract, and the one rule that keeps it (private).

The contract: at every trial point of the CG phase's line search, each kept batch is evaluated as the training loop's
pass of that batch was, that is with the batch's data as the loop saw it, the module's buffers, attributes, metric
states and random streams as they were before that batch's pass, and the ``global_step`` of that pass. What the rule
below cannot put back is named in a warning, when it is seen to change, that points to
:func:`lightning_twophase.is_trial_evaluation`: with it ``training_step`` can skip such changes at trial points.

The rule: a :class:`TrialState` is taken before the loop's pass of each batch and put back before each trial
evaluation of that batch (and one taken before the trial evaluations is put back after them):

- the batch: its containers rebuilt and its tensors cloned before the pass; if the pass changed the loop's tensors in
  place, every trial evaluation gets a fresh copy;
- buffers, and torchmetrics metrics whole: every tensor state cloned, their other attributes (``_update_count``, a
  running window's position...) by a shallow copy, wrapped and grouped metrics included;
- random streams: torch's, Python's and numpy's global generators are seeded per batch, the same for the loop's pass
  and every trial evaluation (``TrainingObjective.seeded``); generators kept in attributes (``random.Random``,
  numpy's, ``torch.Generator``) by their state;
- the public attributes (not ``_``-prefixed, not callables) of the module and of every submodule, shallowly: the values
  themselves; in lists, dicts, sets, deques, tuples and plain objects (a ``__dict__`` and no copy protocol of their
  own), a shallow copy of their contents, shared with the previous batch's while equal; tensors by a clone (one per
  batch up to 64 KiB, since batch norm moves its statistics without moving their version counter; a larger one shared
  from batch to batch while its version counter stands still); numpy arrays by a copy shared while equal;
- the ``global_step`` the pass read.

Nothing is copied deeply: other objects (with a copy protocol of their own, ``__slots__``, of torch or Lightning) are
kept by reference. Not put back: tensors and numpy arrays over :data:`COPY_LIMIT_BYTES` (a tensor changed in place is
warned about), changes inside objects kept by reference, attributes whose names start with ``_``, a tensor changed
through ``.data``, and effects outside the module; of these only the first is seen.
"""

from __future__ import annotations

import enum
import random
import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor, nn

__all__ = ["COPY_LIMIT_BYTES", "StepCounter", "TrialState", "kept"]

#: Tensors and numpy arrays larger than this are kept by reference (a tensor changed in place is warned about).
COPY_LIMIT_BYTES = 16 * 1024**2
_BUFFERS_CLONED_EVERY_TIME = 64 * 1024  # bytes: buffers up to this size are cloned for each batch, changed or not
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, range, torch.dtype, torch.device, torch.Size})
_FOREIGN = frozenset({"torch", "torchvision", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics"})
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training"}
_OBJECT_GETSTATE = getattr(object, "__getstate__", None)
#: ``(read, write)``: the training loop's ``global_step``.
StepCounter = tuple[Callable[[], int], Callable[[int], None]]


def _version(tensor: Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version


class _Tensor:
    """A tensor: a clone (none over the copy limit), put back into the same tensor."""

    def __init__(self, tensor: Tensor, path: str, buffer: bool) -> None:
        self.original, self.path, self.version = tensor, path, _version(tensor)
        size = tensor.numel() * tensor.element_size()
        # Whether an unmoved version counter means unchanged (batch norm moves its small statistics without it).
        self.trusted = self.version is not None and (not buffer or size > _BUFFERS_CLONED_EVERY_TIME)
        self.copy = tensor.detach().clone() if size <= COPY_LIMIT_BYTES else None
        self.nbytes = size if self.copy is not None else 0

    def unchanged(self) -> bool:
        return self.trusted and _version(self.original) == self.version

    def problem(self) -> str | None:
        if self.copy is not None or _version(self.original) == self.version:
            return None
        self.version = _version(self.original)  # said once
        return (
            f"`{self.path}` ({self.original.numel() * self.original.element_size()} bytes, more than the "
            f"{COPY_LIMIT_BYTES} copied for each batch) was changed in place"
        )

    def restore(self, memo: dict[int, Any]) -> Tensor:
        tensor, copy = self.original, self.copy
        if copy is None or self.unchanged():
            return tensor
        if tensor.shape != copy.shape or tensor.is_inference():
            return copy.clone()
        with torch.no_grad():
            tensor.copy_(copy)
        self.version = _version(tensor)
        return tensor


class _Array:
    """A numpy array: a copy (shared with the previous batch's while equal), refilled in place."""

    def __init__(self, array: Any) -> None:
        self.original, self.copy, self.nbytes = array, array.copy(), int(array.nbytes)

    def unchanged(self) -> bool:
        live, copy = self.original, self.copy
        return live.shape == copy.shape and live.dtype == copy.dtype and bool((live == copy).all())

    def restore(self, memo: dict[int, Any]) -> Any:
        if self.unchanged():
            return self.original
        if self.original.flags.writeable and self.original.shape == self.copy.shape:
            self.original[...] = self.copy
            return self.original
        return self.copy.copy()


class _Generator:
    """A random generator kept in an attribute: its state."""

    def __init__(self, generator: Any, get: Callable[[], Any], put: Callable[[Any], Any]) -> None:
        self.original, self.put, self.nbytes = generator, put, 0
        self.state = get()

    def unchanged(self) -> bool:
        return False

    def restore(self, memo: dict[int, Any]) -> Any:
        self.put(self.state)
        return self.original


class _Contents:
    """A list, deque, dict, set, plain object (its ``__dict__``) or tuple (``contents`` ``None``): a shallow copy of
    its contents, and the saved forms of the values in it that can change in place (``children``, by key)."""

    def __init__(self, original: Any, contents: Any) -> None:
        self.original, self.contents, self.children = original, contents, []
        self.nbytes = sys.getsizeof(contents) if contents is not None else 0

    def live(self) -> Any:
        return self.original if isinstance(self.original, (list, deque, dict, set)) else vars(self.original)

    def holds(self, values: Any) -> bool:
        if self.children:  # mutable values: the same objects
            pairs = values.items() if isinstance(values, dict) else enumerate(values)
            return len(values) == len(self.contents) and all(self.contents[k] is v for k, v in pairs)
        try:  # immutable values, compared in C
            return bool((list(values) if isinstance(values, deque) else values) == self.contents)
        except Exception:  # a comparison that fails is taken as a change
            return False

    def unchanged(self) -> bool:
        return (self.contents is None or self.holds(self.live())) and all(c.unchanged() for _, c in self.children)

    def restore(self, memo: dict[int, Any]) -> Any:
        if id(self) in memo:
            return memo[id(self)]
        memo[id(self)] = self.original
        source = self.original if self.contents is None else self.contents
        changed = [(k, v) for k, child in self.children if (v := child.restore(memo)) is not source[k]]
        if self.contents is None:  # a tuple: another one if an element came back as another object
            if changed:
                values = list(self.original)
                for key, value in changed:
                    values[key] = value
                cls = type(self.original)
                memo[id(self)] = cls(*values) if hasattr(cls, "_fields") else cls(values)
            return memo[id(self)]
        contents = self.contents.copy() if changed else self.contents
        for key, value in changed:
            contents[key] = value
        live = self.live()
        if not self.holds(live):
            live.clear()
            (live.update if isinstance(live, (dict, set)) else live.extend)(contents)
        return self.original


def _plain(value: Any) -> bool:
    """Whether ``value``'s data is its ``__dict__``: no ``__slots__`` and no copy protocol of its own."""
    cls = type(value)
    if not hasattr(value, "__dict__") or isinstance(value, type) or hasattr(cls, "__slots__"):
        return False
    if any(hasattr(cls, name) for name in ("__copy__", "__deepcopy__", "__setstate__")):
        return False
    own_reduce = cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__reduce__ is not object.__reduce__
    return not own_reduce and getattr(cls, "__getstate__", None) is _OBJECT_GETSTATE


class _Capture:
    """One pass over the module's data. ``reuse``: the saved forms of earlier captures of the iteration, by the id of
    what they saved (each holds its object, so the ids stay valid), shared where unchanged."""

    def __init__(self, module: nn.Module, reuse: dict[int, Any]) -> None:
        self.module, self.reuse, self.saved, self.nbytes = module, reuse, {}, 0
        self.unsaved: list[_Tensor] = []
        self._storages: set[int] | None = None

    def follows_weights(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is a parameter or a view of one or of a buffer: it is not put back."""
        if self._storages is None:
            module = self.module
            self._storages = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        return isinstance(tensor, nn.Parameter) or tensor.untyped_storage().data_ptr() in self._storages

    def save(self, value: Any, path: str, depth: int = 0) -> Any:
        """The saved form of ``value``; ``None`` where the reference is all there is to keep."""
        if type(value) in _ATOMS or isinstance(value, (enum.Enum, nn.Module)) or depth > 32:
            return None
        if id(value) in self.saved:
            return self.saved[id(value)]
        previous = self.reuse.get(id(value))
        if previous is not None and previous.unchanged():
            node = previous
        else:
            node = self._save(value, path, depth)
            self.nbytes += node.nbytes if node is not None else 0
        if isinstance(node, _Tensor) and node.copy is None:
            self.unsaved.append(node)
        self.saved[id(value)] = node
        return node

    def _save(self, value: Any, path: str, depth: int) -> Any:
        numpy = sys.modules.get("numpy")  # no array can exist unless numpy was imported
        if isinstance(value, Tensor):
            if depth > 0 and self.follows_weights(value):
                return None
            return _Tensor(value, path, buffer=depth == 0)
        if numpy is not None and isinstance(value, numpy.ndarray):
            return _Array(value) if value.nbytes <= COPY_LIMIT_BYTES else None
        generator = _generator(value, numpy)
        if generator is not None:
            return generator
        if callable(value) or type(value).__module__.split(".")[0] in _FOREIGN:
            return None
        if isinstance(value, (list, deque, tuple)):
            node = _Contents(value, None if isinstance(value, tuple) else list(value))
        elif isinstance(value, (dict, set)) or _plain(value):
            node = _Contents(value, value.copy() if isinstance(value, (dict, set)) else dict(vars(value)))
        else:
            return None  # kept by reference
        self.saved[id(value)] = node  # before the contents: a container may hold itself
        if not isinstance(value, set):
            items = node.contents.items() if isinstance(node.contents, dict) else enumerate(value)
            node.children = [(k, c) for k, v in items if (c := self.save(v, f"{path}[{k!r}]", depth + 1)) is not None]
        return node


def _generator(value: Any, numpy: Any) -> _Generator | None:
    """The state of a random generator (Python's, torch's or numpy's), or ``None`` if ``value`` is none."""
    if isinstance(value, random.Random):
        return _Generator(value, value.getstate, value.setstate)
    if isinstance(value, torch.Generator) or (numpy is not None and isinstance(value, numpy.random.RandomState)):
        return _Generator(value, value.get_state, value.set_state)
    if numpy is not None and isinstance(value, numpy.random.Generator):
        bits = value.bit_generator
        return _Generator(value, lambda: bits.state, lambda state: setattr(bits, "state", state))
    return None


def _metric_type() -> type:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics comes with Lightning
        return type(None)
    return Metric


_METRIC = _metric_type()


def _copy_batch(batch: Any) -> tuple[Any, list[tuple[Tensor, int | None]]]:
    """A copy of ``batch`` (containers rebuilt, tensors cloned), and the version of each of its tensors."""
    versions: list[tuple[Tensor, int | None]] = []

    def clone(tensor: Tensor) -> Tensor:
        versions.append((tensor, _version(tensor)))
        copy = tensor.detach().clone()
        return copy.requires_grad_() if tensor.requires_grad else copy

    return apply_to_collection(batch, Tensor, clone), versions


class TrialState:
    """The batch, the module's data and the ``global_step`` as a training loop's pass finds them (see the module).

    Attributes:
        batch: a copy of the batch, taken before the pass (``None`` if the capture got none).
        nbytes: the memory the saved data takes beyond what it shares with earlier captures.

    """

    def __init__(self, counter: StepCounter | None) -> None:
        self.counter = counter
        self.step = counter[0]() if counter is not None else None
        self.batch: Any = None
        self.nbytes = 0
        self._batch_changed = False
        self._loop_tensors: list[tuple[Tensor, int | None]] = []
        self._owners: list[tuple[nn.Module, list[tuple[str, Any, Any]], frozenset[str]]] = []
        self._unsaved: list[_Tensor] = []

    @classmethod
    def capture(
        cls,
        module: nn.Module | None,
        counter: StepCounter | None = None,
        batch: Any = None,
        reuse: dict[int, Any] | None = None,
    ) -> TrialState:
        """Save what the next pass will find: ``module``'s data (``None``: not saved), ``batch`` (if given) and the
        step; ``reuse`` (a dict kept for an iteration's captures) shares unchanged data from one to the next."""
        state = cls(counter)
        if batch is not None:
            state.batch, state._loop_tensors = _copy_batch(batch)
        if module is None:
            return state
        capture = _Capture(module, reuse if reuse is not None else {})
        for prefix, owner in module.named_modules():
            entries = [
                (name, value, capture.save(value, f"{prefix}.{name}".lstrip("."), 1), False)
                for name, value in list(vars(owner).items())
                if _kept(owner, name, value)
            ]
            entries += [
                (name, buffer, capture.save(buffer, f"{prefix}.{name}".lstrip(".")), True)
                for name, buffer in owner._buffers.items()
                if buffer is not None
            ]
            state._owners.append((owner, entries, frozenset(name for name, *_ in entries)))
        if reuse is not None:
            reuse.update(capture.saved)
        state.nbytes, state._unsaved = capture.nbytes, capture.unsaved
        return state

    def without_module_data(self) -> TrialState:
        """This state with only the batch and the step (the module's data did not fit)."""
        state = TrialState(None)
        state.counter, state.step, state.batch, state._loop_tensors = (
            self.counter,
            self.step,
            self.batch,
            self._loop_tensors,
        )
        return state

    def passed(self) -> list[str]:
        """Told that the loop's pass is over: what it changed that cannot be put back (empty if nothing)."""
        self._batch_changed = any(version is None or _version(t) != version for t, version in self._loop_tensors)
        self._loop_tensors = []  # the loop's batch is not kept
        return self._problems()

    def evaluation_batch(self, batch: Any) -> Any:
        """The kept ``batch`` for an evaluation, which may change it as the loop's pass did: its containers rebuilt,
        its tensors cloned if the loop's pass changed them in place."""
        return apply_to_collection(batch, Tensor, lambda t: _copy_batch(t)[0] if self._batch_changed else t)

    def restore(self) -> list[str]:
        """Put the module's data and the step back as captured; what could not be put back (empty if nothing)."""
        if self.counter is not None and self.step is not None:
            self.counter[1](self.step)
        memo: dict[int, Any] = {}
        for owner, entries, names in self._owners:
            attributes = vars(owner)
            for name in [n for n, value in attributes.items() if n not in names and _kept(owner, n, value)]:
                del attributes[name]  # added since
            for name, value, node, is_buffer in entries:
                restored = value if node is None else node.restore(memo)
                where = owner._buffers if is_buffer else attributes
                if where.get(name) is not restored:
                    where[name] = restored
        return self._problems()

    def _problems(self) -> list[str]:
        return [problem for node in self._unsaved if (problem := node.problem()) is not None]


def _kept(owner: nn.Module, name: str, value: Any) -> bool:
    """Whether the attribute ``name`` of ``owner`` is saved: a public one that is not a method; every one of a
    torchmetrics metric (its counters are private)."""
    if name in _MODULE_INTERNALS:
        return False
    return isinstance(owner, _METRIC) or (name[0] != "_" and not callable(value))


@contextmanager
def kept(module: nn.Module, counter: StepCounter | None, report: Callable[[str], None]) -> Iterator[None]:
    """Put ``module``'s data and the step back as they were on entering (``report``: told what could not be)."""
    state = TrialState.capture(module, counter)
    try:
        yield
    finally:
        for problem in state.restore():
            report(problem)
