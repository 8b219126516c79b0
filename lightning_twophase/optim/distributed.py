"""The collective operations every line-search decision goes through.

A line search branches on loss values and directional derivatives. Under data parallelism the loss a closure
returns is rank-local, so two ranks that compare different numbers take different branches, make different
numbers of closure calls and deadlock in the next collective (see ``torch.optim.LBFGS`` under DDP). Every scalar
that drives a decision therefore passes through :func:`reduce_decision_scalars` before it is used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DecisionReducer", "all_reduce_sum_", "broadcast_", "is_distributed", "reduce_decision_scalars"]


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def reduce_decision_scalars(
    means: Tensor,
    sums: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Average ``means`` and add up ``sums`` across ranks in a single collective.

    Without an active multi-rank process group both tensors are returned unchanged.

    Args:
        means: 1-d tensor of rank-local values whose global value is the mean over ranks (losses of data shards).
        sums: optional 1-d tensor of rank-local partial values whose global value is the sum over ranks (dot
            products of parameter shards). Must be on the same device and of the same dtype as ``means``.
        group: the process group; ``None`` means the default group.

    Returns:
        The reduced ``means`` and ``sums``, identical on every rank.

    """
    if not is_distributed(group):
        return means, sums
    world_size = dist.get_world_size(group)
    n_means = means.numel()
    # One all-reduce for both kinds: dividing the means first turns their mean into a sum.
    packed = means.detach().to(torch.float64) / world_size
    if sums is not None:
        packed = torch.cat([packed, sums.detach().to(torch.float64)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    reduced_means = packed[:n_means].to(means.dtype)
    reduced_sums = packed[n_means:].to(sums.dtype) if sums is not None else None
    return reduced_means, reduced_sums


class DecisionReducer:
    """Makes the scalars an optimizer decides on identical on every rank.

    Args:
        sharded: whether each rank holds a different shard of the parameters: dot products are then partial and
            summed across ranks. With replicated parameters (DDP) they are already global.
        group: the process group; ``None`` means the default group when one is initialized.

    """

    def __init__(self, sharded: bool = False, group: dist.ProcessGroup | None = None) -> None:
        self.sharded = sharded
        self.group = group

    def mean(self, value: Tensor | float) -> float:
        """A loss averaged over ranks (each rank evaluates its own data shard)."""
        tensor = torch.as_tensor(value).detach().reshape(1)
        if is_distributed(self.group):
            tensor, _ = reduce_decision_scalars(tensor.to(torch.float64), None, self.group)
        return float(tensor.item())

    def dots(self, local: Tensor) -> Tensor:
        """Dot products over the parameters: summed over ranks if the parameters are sharded."""
        if not self.sharded:
            return local
        _, reduced = reduce_decision_scalars(local[:0], local, self.group)
        assert reduced is not None
        return reduced


def _buckets(tensors: list[Tensor]) -> list[list[Tensor]]:
    """Group tensors by dtype and device, so that each group travels in one flat buffer."""
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    return list(buckets.values())


def _unflatten_into(flat: Tensor, bucket: list[Tensor]) -> None:
    pieces = flat.split([t.numel() for t in bucket])
    torch._foreach_copy_(bucket, [piece.view_as(t) for piece, t in zip(pieces, bucket)])


def all_reduce_sum_(tensors: list[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Add up a list of tensors across ranks in place (gradients computed outside DDP's hooks)."""
    if not is_distributed(group) or not tensors:
        return
    # One flat buffer per dtype/device, so that a model with many tensors costs one collective.
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        _unflatten_into(flat, bucket)


def broadcast_(tensors: list[Tensor], src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (one collective per dtype and device)."""
    if not is_distributed(group) or not tensors:
        return
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.broadcast(flat, src=src, group=group)
        _unflatten_into(flat, bucket)
