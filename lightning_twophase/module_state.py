"""The data a module keeps in its attributes, saved before trial evaluations and put back after them.

``training_step`` may change more than the weights: a list of outputs it appends to, a counter, a state carried from
one step to the next (an RNN's hidden state), a summary kept by a child module, a dict of lists, an ``AverageMeter``
updated in place, a numpy array or a deque. The CG phase runs ``training_step`` again at line-search trial points, and
those runs must leave no trace. :meth:`ModuleState.capture` saves that data for the module and every submodule;
:meth:`ModuleState.restore` puts it back: the same containers and objects, refilled in place with what they held (so
references to them stay valid), attributes added since removed.

What is saved: every attribute in ``vars()`` of the module and of each submodule whose name does not start with an
underscore, except ``training`` and callables. Parameters, buffers and submodules are not in ``vars()`` (buffers are
saved separately by the objective); torchmetrics metrics and everything under them keep their own state (the objective
saves it). Inside those attributes: tensors are cloned, numpy arrays copied, lists, tuples, dicts, sets and deques
and plain objects (with a ``__dict__``, without their own copy protocol) are saved element by element; other objects
by :func:`copy.deepcopy`.

Kept by reference, not copied (the limits, named in the support matrix): modules, parameters, buffers and tensors
sharing their memory, callables, objects of torch and Lightning types other than tensors, objects ``copy.deepcopy``
cannot copy (reported once), and tensors or numpy arrays larger than :data:`COPY_LIMIT_BYTES`: a large tensor changed
in place is detected by its version counter and reported, a large numpy array changed in place is not detected. A
tensor is taken as unchanged while its version counter is: a change written through ``.data`` is not seen.
Effects outside the module are not undone either. ``lightning_twophase.is_trial_evaluation()`` lets ``training_step``
skip such changes at trial points.

Snapshots taken one after the other share what did not change (:meth:`ModuleState.capture` with ``previous``), so a
large attribute that stays as it is costs one copy per CG iteration, not one per batch; :attr:`ModuleState.nbytes`
estimates what a snapshot holds beyond what it shares.
"""

from __future__ import annotations

import copy
import enum
import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["COPY_LIMIT_BYTES", "ModuleState", "module_kept"]

#: Tensors and numpy arrays larger than this are kept by reference, not copied.
COPY_LIMIT_BYTES = 16 * 1024**2
# Containers nested deeper than this are kept by reference (a guard against cycles through foreign objects).
_MAX_DEPTH = 32
_ATOMS = frozenset(
    {type(None), bool, int, float, complex, str, bytes, range, type(Ellipsis), torch.dtype, torch.device, torch.Size}
)
# Objects of these packages (other than tensors, which are handled) are machinery, not data kept by the module.
_FOREIGN_PACKAGES = frozenset(
    {"torch", "torchvision", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics"}
)
_OBJECT_GETSTATE = getattr(object, "__getstate__", None)


def _is_atom(value: Any) -> bool:
    return type(value) in _ATOMS or isinstance(value, enum.Enum)


def _all_atoms(values: Any) -> bool:
    return set(map(type, values)) <= _ATOMS


def _metric_type() -> type | None:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics comes with Lightning
        return None
    return Metric


def _numpy_array_type() -> type | None:
    numpy = sys.modules.get("numpy")  # no array can exist unless numpy was imported
    return None if numpy is None else numpy.ndarray


class _Node:
    """A saved value: ``restore`` returns the object to put back, ``matches`` whether a live value is unchanged.
    ``nbytes``: the memory the node itself holds, its children not included."""

    __slots__ = ("nbytes",)

    def restore(self, memo: dict[int, Any], notes: list[str]) -> Any:
        raise NotImplementedError

    def matches(self, live: Any) -> bool:
        raise NotImplementedError


class _Keep(_Node):
    """An immutable value, or an object kept by reference."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value
        self.nbytes = 0

    def restore(self, memo: dict[int, Any], notes: list[str]) -> Any:
        return self.value

    def matches(self, live: Any) -> bool:
        if live is self.value:
            return True
        if type(live) is not type(self.value) or not _is_atom(live):
            return False
        try:
            return bool(live == self.value)
        except Exception:  # an atom whose comparison fails is taken as changed
            return False


def _version(tensor: Tensor) -> int | None:
    if tensor.is_inference():
        return None  # inference tensors keep no version counter
    return tensor._version


class _TensorNode(_Node):
    """A tensor: the original object while its version counter says it was not changed in place, else a clone."""

    __slots__ = ("copy", "original", "path", "version")

    def __init__(self, original: Tensor, path: str) -> None:
        self.original = original
        self.version = _version(original)
        self.path = path
        nbytes = original.numel() * original.element_size()
        self.copy = original.detach().clone() if nbytes <= COPY_LIMIT_BYTES else None
        self.nbytes = nbytes if self.copy is not None else 0

    def restore(self, memo: dict[int, Any], notes: list[str]) -> Any:
        if self.version is not None and _version(self.original) == self.version:
            return self.original
        if self.copy is None:
            notes.append(
                f"the tensor `{self.path}` ({self.original.numel() * self.original.element_size()} bytes, more than "
                f"the {COPY_LIMIT_BYTES} copied) was changed in place at a trial point and could not be put back"
            )
            self.version = _version(self.original)  # reported once
            return self.original
        fresh = self.copy.clone()
        if self.original.requires_grad and self.original.is_leaf:
            fresh.requires_grad_(True)
        return fresh

    def matches(self, live: Any) -> bool:
        return live is self.original and self.version is not None and _version(live) == self.version


class _ArrayNode(_Node):
    """A numpy array: refilled in place where it can be, else a copy."""

    __slots__ = ("copy", "original")

    def __init__(self, original: Any) -> None:
        self.original = original
        self.copy = original.copy()
        self.nbytes = int(original.nbytes)

    def restore(self, memo: dict[int, Any], notes: list[str]) -> Any:
        original, saved = self.original, self.copy
        if original.shape == saved.shape and original.dtype == saved.dtype and original.flags.writeable:
            original[...] = saved
            return original
        return saved.copy()

    def matches(self, live: Any) -> bool:
        if live is not self.original or live.shape != self.copy.shape or live.dtype != self.copy.dtype:
            return False
        try:
            return bool((live == self.copy).all())
        except Exception:  # arrays whose elements do not compare are taken as changed
            return False


class _FlatNode(_Node):
    """A list, deque, dict or set of immutable values (or of hashable ones, for a set): a shallow copy, refilled into
    the original object."""

    __slots__ = ("copy", "original")

    def __init__(self, original: Any) -> None:
        self.original = original
        kind = dict if isinstance(original, dict) else set if isinstance(original, set) else list
        self.copy = kind(original)
        self.nbytes = sys.getsizeof(self.copy)

    def restore(self, memo: dict[int, Any], notes: list[str]) -> Any:
        _refill(self.original, self.copy)
        return self.original

    def matches(self, live: Any) -> bool:
        if live is not self.original or len(live) != len(self.copy):
            return False
        try:
            # Compared in C, without a copy (a deque is compared as a list).
            return bool((list(live) if isinstance(live, deque) else live) == self.copy)
        except Exception:  # elements whose comparison fails are taken as changed
            return False


def _refill(container: Any, contents: Any) -> None:
    if isinstance(container, dict):
        container.clear()
        container.update(contents)
    elif isinstance(container, list):
        container[:] = contents
    else:  # set or deque
        container.clear()
        (container.update if isinstance(container, set) else container.extend)(contents)


class _ContainerNode(_Node):
    """A list, deque or dict holding mutable values, saved element by element and refilled in place."""

    __slots__ = ("children", "original")

    def __init__(self, original: Any, children: list[tuple[Any, _Node]]) -> None:
        self.original = original
        self.children = children  # (key, node) for a dict, (None, node) otherwise
        self.nbytes = sys.getsizeof(children)

    def restore(self, memo: dict[int, Any], notes: list[str]) -> Any:
        if id(self) in memo:
            return memo[id(self)]
        memo[id(self)] = self.original
        values = [(key, child.restore(memo, notes)) for key, child in self.children]
        _refill(self.original, dict(values) if isinstance(self.original, dict) else [value for _, value in values])
        return self.original

    def matches(self, live: Any) -> bool:
        if live is not self.original or len(live) != len(self.children):
            return False
        if isinstance(live, dict):
            return all(key in live and child.matches(live[key]) for key, child in self.children)
        return all(child.matches(value) for (_, child), value in zip(self.children, live))


class _TupleNode(_Node):
    """A tuple (or named tuple) holding mutable values: the original if every element is put back as it was."""

    __slots__ = ("children", "original")

    def __init__(self, original: tuple, children: list[_Node]) -> None:
        self.original = original
        self.children = children
        self.nbytes = sys.getsizeof(children)

    def restore(self, memo: dict[int, Any], notes: list[str]) -> Any:
        if id(self) in memo:
            return memo[id(self)]
        values = [child.restore(memo, notes) for child in self.children]
        if all(a is b for a, b in zip(values, self.original)):
            restored: Any = self.original
        elif hasattr(self.original, "_fields"):
            restored = type(self.original)(*values)
        else:
            restored = type(self.original)(values)
        memo[id(self)] = restored
        return restored

    def matches(self, live: Any) -> bool:
        return live is self.original and all(child.matches(value) for child, value in zip(self.children, live))


class _ObjectNode(_Node):
    """A plain object: its ``__dict__`` saved attribute by attribute and refilled in place."""

    __slots__ = ("children", "original")

    def __init__(self, original: Any, children: dict[str, _Node]) -> None:
        self.original = original
        self.children = children
        self.nbytes = sys.getsizeof(children)

    def restore(self, memo: dict[int, Any], notes: list[str]) -> Any:
        if id(self) in memo:
            return memo[id(self)]
        memo[id(self)] = self.original
        attributes = {name: child.restore(memo, notes) for name, child in self.children.items()}
        state = vars(self.original)
        state.clear()
        state.update(attributes)
        return self.original

    def matches(self, live: Any) -> bool:
        if live is not self.original:
            return False
        state = vars(live)
        return state.keys() == self.children.keys() and all(
            child.matches(state[name]) for name, child in self.children.items()
        )


class _CopyNode(_Node):
    """An object with its own copy protocol: a deep copy, copied again for every restore."""

    __slots__ = ("copy", "original", "shared")

    def __init__(self, original: Any, saved: Any, shared: dict[int, Any]) -> None:
        self.original = original
        self.copy = saved
        self.shared = shared
        self.nbytes = sys.getsizeof(saved)

    def restore(self, memo: dict[int, Any], notes: list[str]) -> Any:
        if id(self) not in memo:
            memo[id(self)] = copy.deepcopy(self.copy, dict(self.shared))
        return memo[id(self)]

    def matches(self, live: Any) -> bool:
        return False  # no cheap way to tell: copied again


class _Capture:
    """One pass over the module's attributes: what is shared with the module, what was seen already."""

    def __init__(self, module: nn.Module, reuse: dict[int, _Node]) -> None:
        self.module = module
        self.reuse = reuse  # the previous snapshot's nodes, by the id of the object each saved
        self.nbytes = 0  # what the nodes made by this capture hold
        self._shared: dict[int, Any] | None = None
        self._storages: set[int] | None = None
        self.memo: dict[int, _Node] = {}
        self.notes: list[str] = []
        self.array_type = _numpy_array_type()

    @property
    def shared(self) -> dict[int, Any]:
        """The module's submodules, parameters and buffers, by id: kept as they are (found once, when first needed:
        most snapshots hold only numbers and strings)."""
        if self._shared is None:
            self._shared = {id(submodule): submodule for submodule in self.module.modules()}
            self._shared.update({id(t): t for t in [*self.module.parameters(), *self.module.buffers()]})
        return self._shared

    def aliases_module_memory(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` shares memory with a parameter or buffer (a view of a weight, say): such a tensor must
        follow the weights, not be put back."""
        if self._storages is None:
            self._storages = {_storage(t) for t in [*self.module.parameters(), *self.module.buffers()]}
        return _storage(tensor) in self._storages

    def save(self, value: Any, path: str, depth: int = 0) -> _Node:
        if _is_atom(value):
            return _Keep(value)
        if id(value) in self.shared:
            return _Keep(value)
        if id(value) in self.memo:
            return self.memo[id(value)]
        node = self.reuse.get(id(value))
        if node is None or not node.matches(value):  # an object unchanged since the previous snapshot is shared
            node = self._save(value, path, depth)
            self.nbytes += node.nbytes
        self.memo[id(value)] = node
        return node

    def _save(self, value: Any, path: str, depth: int) -> _Node:
        if isinstance(value, (nn.Module, nn.Parameter)) or callable(value) or depth > _MAX_DEPTH:
            return _Keep(value)
        if isinstance(value, Tensor):
            return _Keep(value) if self.aliases_module_memory(value) else _TensorNode(value, path)
        if self.array_type is not None and isinstance(value, self.array_type):
            return _ArrayNode(value) if value.nbytes <= COPY_LIMIT_BYTES else _Keep(value)
        if isinstance(value, (set, frozenset)):
            return _Keep(value) if isinstance(value, frozenset) else _FlatNode(value)
        if isinstance(value, (list, deque, dict)):
            return self._container(value, path, depth)
        if isinstance(value, tuple):
            if _all_atoms(value):
                return _Keep(value)
            return _TupleNode(value, [self.save(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)])
        if type(value).__module__.split(".")[0] in _FOREIGN_PACKAGES:
            return _Keep(value)
        if _plain_object(value):
            node = _ObjectNode(value, {})
            self.memo[id(value)] = node  # before the attributes: an attribute may refer back to the object
            children = {name: self.save(v, f"{path}.{name}", depth + 1) for name, v in vars(value).items()}
            node.children = children
            node.nbytes = sys.getsizeof(children)
            return node
        try:
            return _CopyNode(value, copy.deepcopy(value, dict(self.shared)), self.shared)
        except Exception as error:  # an object that cannot be copied is kept as it is, and named
            self.notes.append(f"`{path}` ({type(value).__name__}: {type(error).__name__}: {error})")
            return _Keep(value)

    def _container(self, value: Any, path: str, depth: int) -> _Node:
        values = value.values() if isinstance(value, dict) else value
        if _all_atoms(values):
            return _FlatNode(value)
        node = _ContainerNode(value, [])
        self.memo[id(value)] = node  # before the elements: a container may hold itself
        items = value.items() if isinstance(value, dict) else enumerate(value)
        children = [
            (key if isinstance(value, dict) else None, self.save(v, f"{path}[{key!r}]", depth + 1)) for key, v in items
        ]
        node.children = children
        node.nbytes = sys.getsizeof(children)
        return node


def _storage(tensor: Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, meta)
        return -id(tensor)


def _plain_object(value: Any) -> bool:
    """Whether ``value`` is a plain object that can be saved attribute by attribute: it has a ``__dict__`` and no copy
    protocol of its own (a ``random.Random`` keeps its state elsewhere and says how to copy it)."""
    cls = type(value)
    if not hasattr(value, "__dict__") or isinstance(value, type):
        return False
    if hasattr(cls, "__deepcopy__") or hasattr(cls, "__copy__") or hasattr(cls, "__slots__"):
        return False
    if cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__reduce__ is not object.__reduce__:
        return False
    return getattr(cls, "__getstate__", None) is _OBJECT_GETSTATE and not hasattr(cls, "__setstate__")


def _owners(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The module and its submodules, without torchmetrics metrics and what they hold."""
    metric = _metric_type() or ()
    stack = [("", module)]
    while stack:
        prefix, owner = stack.pop()
        if isinstance(owner, metric):
            continue
        yield prefix, owner
        for name, child in reversed(list(owner._modules.items())):
            if child is not None:
                stack.append((f"{prefix}.{name}" if prefix else name, child))


def _saved_attributes(owner: nn.Module) -> Iterator[tuple[str, Any]]:
    for name, value in vars(owner).items():
        if name[0] != "_" and name != "training" and not callable(value):
            yield name, value


_MISSING = object()


class ModuleState:
    """The data in the attributes of a module and its submodules, as it was when captured.

    Attributes:
        nbytes: the memory this snapshot holds beyond what it shares with the module and with the snapshot it was
            captured after (an estimate for Python objects: their containers' sizes).
        notes: the attributes that could not be copied, and why.

    """

    def __init__(
        self,
        module: nn.Module,
        owners: list[tuple[nn.Module, list[tuple[str, _Node]], frozenset[str]]],
        nbytes: int,
        notes: list[str],
    ) -> None:
        self.module = module
        self._owners = owners
        self._index: dict[tuple[int, str], _Node] | None = None
        self._reuse: dict[int, _Node] = {}
        self.nbytes = nbytes
        self.notes = notes

    @classmethod
    def capture(cls, module: nn.Module, previous: ModuleState | None = None) -> ModuleState:
        """Save the data of ``module`` and its submodules.

        Args:
            module: the module.
            previous: an earlier snapshot of the same module: attributes unchanged since then are shared with it.

        """
        earlier = previous if previous is not None and previous.module is module else None
        # Every node of the snapshots captured one after the other, by the id of the object it saved (each node holds
        # its object, so the ids stay valid): what did not change is shared, however deep.
        reuse = earlier._reuse if earlier is not None else {}
        capture = _Capture(module, reuse)
        shared = earlier._nodes() if earlier is not None else {}
        owners = []
        for prefix, owner in _owners(module):
            entries = []
            for name, value in _saved_attributes(owner):
                node = shared.get((id(owner), name))
                # Numbers and strings are the bulk of it: the same object is the same value.
                if node is None or not (value is getattr(node, "value", _MISSING) or node.matches(value)):
                    node = capture.save(value, f"{prefix}.{name}" if prefix else name)
                entries.append((name, node))
            owners.append((owner, entries, frozenset(vars(owner))))
        reuse.update(capture.memo)
        state = cls(module, owners, capture.nbytes, capture.notes)
        state._reuse = reuse
        return state

    def _nodes(self) -> dict[tuple[int, str], _Node]:
        if self._index is None:
            self._index = {(id(owner), name): node for owner, entries, _ in self._owners for name, node in entries}
        return self._index

    def restore(self, report: Callable[[str], None] | None = None) -> None:
        """Put the module's attributes back as they were captured; attributes added since are removed.

        Args:
            report: told of what could not be put back (a large tensor changed in place).

        """
        memo: dict[int, Any] = {}
        notes: list[str] = []
        for owner, entries, names in self._owners:
            attributes = vars(owner)
            added = attributes.keys() - names
            for name in added:
                value = attributes[name]
                if name[0] != "_" and name != "training" and not callable(value):
                    del attributes[name]
            for name, node in entries:
                if type(node) is _Keep:
                    if attributes.get(name, _MISSING) is not node.value:
                        attributes[name] = node.value
                else:
                    attributes[name] = node.restore(memo, notes)
        if notes and report is not None:
            report("; ".join(notes))


@contextmanager
def module_kept(module: nn.Module, report: Callable[[str], None]) -> Iterator[None]:
    """Put the module's buffers, torchmetrics states and attribute data back as they were on leaving (``report``:
    told of data that could not be put back)."""
    buffers = [b for b in module.buffers() if b is not None]
    saved_buffers = [b.detach().clone() for b in buffers]
    metric = _metric_type()
    metrics = [m for m in module.modules() if metric is not None and isinstance(m, metric)]
    names = [(*m._defaults, "_update_count", "_computed", "_forward_cache") for m in metrics]
    saved_metrics = [{name: _clone(getattr(m, name, None)) for name in keys} for m, keys in zip(metrics, names)]
    attributes = ModuleState.capture(module)
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, saved_buffers):
                buffer.copy_(saved)
        for m, saved in zip(metrics, saved_metrics):
            for name, value in saved.items():
                setattr(m, name, value)
        attributes.restore(report)


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value
