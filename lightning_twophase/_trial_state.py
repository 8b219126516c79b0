"""What a trial evaluation of a kept batch sees: the contract, and the one rule that keeps it (private).

The contract: at every trial point of the CG phase's line search, each kept batch is evaluated as the training loop's
pass of that batch was, that is with the batch's data as the loop saw it, the module's buffers, attributes, metric
states and random streams as they were before that batch's pass, and the ``global_step`` of that pass. What the rule
below cannot put back is named in a warning when it is seen to change, pointing to
:func:`lightning_twophase.is_trial_evaluation`, with which ``training_step`` can skip such a change at trial points.

The rule: a :class:`TrialState` is taken before the loop's pass of each batch and put back before each trial
evaluation of that batch (one taken before the trial evaluations is put back after them). It holds:

- the batch: its containers rebuilt and its tensors cloned before the pass; if the pass changed the loop's tensors in
  place, each evaluation gets a fresh copy (and always freshly built containers);
- every buffer, cloned, and every torchmetrics metric whole: its registered states cloned, its counters and caches
  (``_update_count``, a running window's position) and public attributes kept, wrapped and grouped metrics included;
- random streams: torch's, Python's and numpy's global generators are seeded per batch, the same for the loop's pass
  and each trial evaluation (``TrainingObjective.seeded``); a generator in an attribute (``random.Random``, numpy's,
  ``torch.Generator``) by its state;
- the public attributes (not ``_``-prefixed, not methods) of the module and of each submodule, shallowly: the values
  themselves; in lists, dicts, sets, deques, tuples and plain objects (a ``__dict__``, no copy protocol of their own)
  a shallow copy of their contents; tensors by a clone, numpy arrays by a copy;
- the ``global_step`` the pass read.

What did not change since the previous batch's state is shared with it: a container while it holds the same values,
a tensor while its version counter stands still (not a buffer or metric state up to 64 KiB: batch norm moves its
statistics without moving the counter, so these are cloned for each batch). Nothing is copied deeply: other objects
(with a copy protocol of their own, ``__slots__``, of torch or Lightning) are kept by reference. Not put back:
tensors and numpy arrays over :data:`COPY_LIMIT_BYTES` (a tensor changed in place is warned about), changes inside
objects kept by reference, attributes whose names start with ``_``, a tensor changed through ``.data``, and effects
outside the module; of these only the first is seen.
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

try:
    from torchmetrics import Metric as _METRIC  # imported by Lightning anyway
except ImportError:  # pragma: no cover - torchmetrics comes with Lightning
    _METRIC = type(None)

__all__ = ["COPY_LIMIT_BYTES", "StepCounter", "TrialState", "kept"]

#: Tensors and numpy arrays larger than this are kept by reference (a tensor changed in place is warned about).
COPY_LIMIT_BYTES = 16 * 1024**2
_OWNED_CLONED_ALWAYS = 64 * 1024  # bytes: buffers and metric states up to this size are cloned for each batch
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, range, torch.dtype, torch.device, torch.Size})
_FOREIGN = frozenset({"torch", "torchvision", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics"})
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training"}
#: ``(read, write)``: the training loop's ``global_step``.
StepCounter = tuple[Callable[[], int], Callable[[int], None]]


def _version(tensor: Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version


class _Tensor:
    """A tensor: a clone (none over the copy limit), written back into the same tensor."""

    def __init__(self, tensor: Tensor, path: tuple, owned: bool) -> None:
        self.original, self.path, self.version = tensor, path, _version(tensor)
        size = tensor.numel() * tensor.element_size()
        self.trusted = self.version is not None and (not owned or size > _OWNED_CLONED_ALWAYS)  # see the module
        self.copy = tensor.detach().clone() if size <= COPY_LIMIT_BYTES else None
        self.nbytes = size if self.copy is not None else 0

    def unchanged(self) -> bool:
        return self.trusted and _version(self.original) == self.version

    def problem(self) -> str | None:
        if self.copy is not None or _version(self.original) == self.version:
            return None
        self.version = _version(self.original)  # said once
        name = self.path[0] + "".join(f"[{key!r}]" for key in self.path[1:])
        size = self.original.numel() * self.original.element_size()
        return f"`{name}` ({size} bytes, more than the {COPY_LIMIT_BYTES} copied for each batch) was changed in place"

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


class _State:
    """A numpy array or a random generator: its state, read by ``get`` and written back by ``put``; ``same`` tells
    whether the object still holds it (``None``: cannot tell)."""

    def __init__(self, original: Any, get: Callable, put: Callable, same: Callable | None = None) -> None:
        self.original, self.state, self.put, self.same = original, get(), put, same
        self.nbytes = int(getattr(self.state, "nbytes", 0))

    def unchanged(self) -> bool:
        return self.same is not None and self.same(self.state)

    def restore(self, memo: dict[int, Any]) -> Any:
        if not self.unchanged():
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
        restored = [(key, child.restore(memo)) for key, child in self.children]
        if self.contents is None:  # a tuple: its values put back in place
            return self.original
        changed = [(key, value) for key, value in restored if value is not self.contents[key]]
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
    if not hasattr(value, "__dict__") or isinstance(value, type):
        return False
    if any(hasattr(cls, name) for name in ("__slots__", "__copy__", "__deepcopy__", "__setstate__")):
        return False
    reduces = cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
    return reduces and getattr(cls, "__getstate__", None) is getattr(object, "__getstate__", None)


def _state(value: Any) -> _State | None:
    """A numpy array's or a random generator's state, or ``None`` if ``value`` is neither."""
    numpy = sys.modules.get("numpy")  # no array can exist unless numpy was imported
    if numpy is not None and isinstance(value, numpy.ndarray) and value.flags.writeable:
        if value.nbytes > COPY_LIMIT_BYTES:
            return None
        return _State(value, value.copy, lambda copy: numpy.copyto(value, copy), lambda c: numpy.array_equal(value, c))
    if isinstance(value, random.Random):
        return _State(value, value.getstate, value.setstate)
    if isinstance(value, torch.Generator) or (numpy is not None and isinstance(value, numpy.random.RandomState)):
        return _State(value, value.get_state, value.set_state)
    if numpy is not None and isinstance(value, numpy.random.Generator):
        bits = value.bit_generator
        return _State(value, lambda: bits.state, lambda state: setattr(bits, "state", state))
    return None


class _Capture:
    """One pass over the module's data. ``reuse``: the saved forms of earlier captures of the iteration, by the id of
    what they saved (each holds its object, so the ids stay valid), shared where unchanged."""

    def __init__(self, module: nn.Module, reuse: dict[int, Any]) -> None:
        self.module, self.reuse, self.saved, self.nbytes = module, reuse, {}, 0
        self.unsaved: list[_Tensor] = []
        self._storages: set[int] | None = None

    def follows_weights(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is a parameter, or shares one's memory or a buffer's: it is not put back."""
        if self._storages is None:
            self._storages = {_storage(t) for t in [*self.module.parameters(), *self.module.buffers()]}
        return isinstance(tensor, nn.Parameter) or _storage(tensor) in self._storages

    def save(self, value: Any, path: tuple, owned: bool = False) -> Any:
        """The saved form of ``value`` (``owned``: a buffer or a metric's state); ``None`` if it is kept as it is."""
        if type(value) in _ATOMS or isinstance(value, (enum.Enum, nn.Module)) or len(path) > 32:
            return None
        if id(value) in self.saved:
            return self.saved[id(value)]
        node = self.reuse.get(id(value))
        if node is None or not node.unchanged():
            node = self._save(value, path, owned)
            self.nbytes += node.nbytes if node is not None else 0
        if isinstance(node, _Tensor) and node.copy is None:
            self.unsaved.append(node)
        self.saved[id(value)] = node
        return node

    def _save(self, value: Any, path: tuple, owned: bool) -> Any:
        if isinstance(value, Tensor):
            return None if not owned and self.follows_weights(value) else _Tensor(value, path, owned)
        state = _state(value)
        if state is not None or callable(value) or type(value).__module__.split(".")[0] in _FOREIGN:
            return state
        if isinstance(value, (list, deque, tuple)):
            node = _Contents(value, None if isinstance(value, tuple) else list(value))
        elif isinstance(value, (dict, set)) or _plain(value):
            node = _Contents(value, value.copy() if isinstance(value, (dict, set)) else dict(vars(value)))
        else:
            return None  # kept by reference
        self.saved[id(value)] = node  # before the contents: a container may hold itself
        if not isinstance(value, set):
            items = node.contents.items() if isinstance(node.contents, dict) else enumerate(value)
            node.children = [(k, c) for k, v in items if (c := self.save(v, (*path, k))) is not None]
        return None if node.contents is None and not node.children else node  # a tuple of immutable values


def _storage(tensor: Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, meta)
        return -id(tensor)


def _attributes(owner: nn.Module) -> list[tuple[str, Any, bool]]:
    """The saved attributes of ``owner``, and whether each is a metric's state: the public ones that are not methods;
    of a torchmetrics metric also its states, and its counters and caches (private numbers, tensors, ``None``)."""
    if not isinstance(owner, _METRIC):
        return [(n, v, False) for n, v in vars(owner).items() if n[0] != "_" and n != "training" and not callable(v)]
    states = owner._defaults
    return [
        (name, value, name in states)
        for name, value in vars(owner).items()
        if _public(name, value)
        or name in states
        or (name not in _MODULE_INTERNALS and (type(value) in _ATOMS or isinstance(value, Tensor)))
    ]


def _public(name: str, value: Any) -> bool:
    return name[0] != "_" and name != "training" and not callable(value)


def _copy_batch(batch: Any, versions: list[tuple[Tensor, int | None]] | None = None) -> Any:
    """A copy of ``batch``: containers rebuilt, tensors cloned (with their versions added to ``versions``)."""

    def clone(tensor: Tensor) -> Tensor:
        if versions is not None:
            versions.append((tensor, _version(tensor)))
        copy = tensor.detach().clone()
        return copy.requires_grad_() if tensor.requires_grad else copy

    return apply_to_collection(batch, Tensor, clone)


class TrialState:
    """The batch, the module's data and the ``global_step`` as a training loop's pass finds them (see the module).

    Attributes:
        batch: a copy of the batch taken before the pass (``None`` if none was given, or once the objective keeps it).
        nbytes: the memory of what is saved, beyond what is shared with earlier captures.

    """

    def __init__(self, counter: StepCounter | None, batch: Any = None) -> None:
        self.counter, self.step = counter, counter[0]() if counter is not None else None
        self._loop_tensors: list[tuple[Tensor, int | None]] = []
        self.batch = _copy_batch(batch, self._loop_tensors) if batch is not None else None
        self.nbytes = 0
        self._batch_changed = False
        self._owners: list[tuple[nn.Module, list[tuple[str, Any, Any, bool]], Any]] = []
        self._unsaved: list[_Tensor] = []
        self._private: list[tuple[nn.Module, str, dict[str, Any]]] = []  # not saved: only their changes are seen

    @classmethod
    def capture(
        cls, module: nn.Module, counter: StepCounter | None = None, batch: Any = None, reuse: dict | None = None
    ) -> TrialState:
        """Save what the next pass will find: ``module``'s data, ``batch`` (if given) and the step; ``reuse`` (a dict
        kept for an iteration's captures) shares unchanged data from one capture to the next."""
        state, capture = cls(counter, batch), _Capture(module, reuse if reuse is not None else {})
        for prefix, owner in module.named_modules():
            entries = [
                (name, value, capture.save(value, (f"{prefix}.{name}" if prefix else name,), owned), False)
                for name, value, owned in _attributes(owner)
            ]
            entries += [
                (name, buffer, capture.save(buffer, (f"{prefix}.{name}" if prefix else name,), True), True)
                for name, buffer in owner._buffers.items()
                if buffer is not None
            ]
            state._owners.append((owner, entries, vars(owner).keys() | ()))  # the names it had
            if not isinstance(owner, _METRIC):
                private = {name: v for name, v in vars(owner).items() if name[0] == "_"}
                state._private.append((owner, prefix, private))
        if reuse is not None:
            reuse.update(capture.saved)
        state.nbytes, state._unsaved = capture.nbytes, capture.unsaved
        return state

    def without_module_data(self) -> TrialState:
        """This state with the batch and the step only (the module's data is not saved)."""
        state = TrialState(self.counter)
        state.step, state.batch, state._loop_tensors = self.step, self.batch, self._loop_tensors
        return state

    def passed(self) -> list[str]:
        """Told that the loop's pass is over: what it changed that cannot be put back (empty if nothing)."""
        self._batch_changed = any(version is None or _version(t) != version for t, version in self._loop_tensors)
        self._loop_tensors = []  # the loop's batch is not kept
        changed = [
            f"{prefix}.{name}" if prefix else name
            for owner, prefix, private in self._private
            for name, value in vars(owner).items()
            if name[0] == "_" and private.get(name, self) is not value and name not in _MODULE_INTERNALS
        ]
        self._private = []
        return [f"`{name}` (whose name starts with `_`: not saved) was changed" for name in changed] + self._problems()

    @property
    def batch_changed(self) -> bool:
        """Whether the loop's pass changed the batch's tensors in place."""
        return self._batch_changed

    def evaluation_batch(self, batch: Any) -> Any:
        """The kept ``batch`` for an evaluation, which may change it as the loop's pass did: its containers rebuilt,
        its tensors cloned if the loop's pass changed them in place."""
        return _copy_batch(batch) if self._batch_changed else apply_to_collection(batch, Tensor, lambda t: t)

    def restore(self) -> list[str]:
        """Put the module's data and the step back as captured; what could not be put back (empty if nothing)."""
        if self.counter is not None and self.step is not None:
            self.counter[1](self.step)
        memo: dict[int, Any] = {}
        for owner, entries, names in self._owners:
            attributes = vars(owner)
            for name in [name for name in attributes.keys() - names if _public(name, attributes[name])]:
                del attributes[name]  # added since
            for name, value, node, is_buffer in entries:
                restored = value if node is None else node.restore(memo)
                where = owner._buffers if is_buffer else attributes
                if where.get(name) is not restored:
                    where[name] = restored
        return self._problems()

    def _problems(self) -> list[str]:
        return [problem for node in self._unsaved if (problem := node.problem()) is not None]


@contextmanager
def kept(module: nn.Module, counter: StepCounter | None, report: Callable[[str], None]) -> Iterator[None]:
    """Put ``module``'s data and the step back as they were on entering (``report``: told what could not be)."""
    state = TrialState.capture(module, counter)
    try:
        yield
    finally:
        for problem in state.restore():
            report(problem)
